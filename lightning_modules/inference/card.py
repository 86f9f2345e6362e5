"""The generated model card of an omni model (`OmniBind.save_pretrained` writes it)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lightning_modules.inference import OmniBind


def model_card_text(bind: OmniBind, results: str | None, command: str | None) -> str:
    """The markdown body of an omni model's card."""
    meta = bind.model.meta
    name = f"OmniBind {meta.get('variant', '')} ({meta.get('kind', 'routed')})".replace(" ()", "")
    lines = [
        f"# {name}",
        "",
        "An omni embedding model trained with the open OmniBind framework "
        "([paper](https://arxiv.org/abs/2407.11895)). It maps "
        f"embeddings of {len(meta['spaces']) + 1} frozen spaces into one {bind.dim}-d space (the "
        f"anchor `{meta['anchor']}`'s) for {', '.join(bind.modalities)}. Outputs are "
        "L2-normalised.",
        "",
        "## Spaces",
        "",
        "| space | input dims | experts | hidden dim |",
        "|---|---|---|---|",
        f"| `{meta['anchor']}` (anchor, used as is) | {bind.dim} | | |",
    ]
    for space, b in meta["spaces"].items():
        dims = ", ".join(f"{m} {d}" for m, d in b["dims"].items())
        experts = ", ".join(map(str, b["experts"]))
        lines.append(f"| `{space}` | {dims} | {experts} | {b['hidden_dim']} |")
    lines += ["", "## Routing", "", "| modality | groups | router reads |", "|---|---|---|"]
    for m in bind.modalities:
        groups = ", ".join(f"`{g}`" for g in meta["groups"][m])
        predictors = ", ".join(f"`{p}`" for p in meta["predictors"][m])
        lines.append(f"| {m} | {groups} | {predictors} |")
    if meta.get("blends"):
        lines += ["", f"Fixed blends: `{json.dumps(meta['blends'], sort_keys=True)}`."]
    if meta.get("checkpoint_sha256"):
        digest = meta["checkpoint_sha256"]
        source = f"converted from an official OmniBind checkpoint (sha256 `{digest}`)"
    else:
        source = f"`{meta['pairs']}`" if meta.get("pairs") else "not recorded in the export"
    command = command or meta.get("command")
    lines += [
        "",
        "## Training data",
        "",
        f"Tuple source: {source}.",
        "",
        "## Results",
        "",
        results.strip() if results else "No results table was given.",
        "",
        "## Training command",
        "",
        f"```bash\n{command}\n```" if command else "Not recorded in the export.",
        "",
        "## Usage",
        "",
        "```python",
        "from lightning_modules.inference import OmniBind",
        "",
        'bind = OmniBind.from_pretrained("<this directory or Hub id>")',
        "z = bind.embed_spaces({space: {modality: embeddings}})  # {modality: (n, "
        f"{bind.dim})}}",
        "```",
        "",
    ]
    return "\n".join(lines)


