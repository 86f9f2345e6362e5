"""The generated model card of an omni model (`OmniBind.save_pretrained` writes it)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lightning_modules.inference import OmniBind


def model_card_text(bind: OmniBind, results: str | None, command: str | None) -> str:
    """The markdown body of an omni model's card."""
    layout, record = bind.model.layout, bind.model.layout.record
    name = f"OmniBind {layout.variant or ''} ({layout.kind})".replace("  (", " (")
    lines = [
        f"# {name}",
        "",
        "An omni embedding model trained with the open OmniBind framework "
        "([paper](https://arxiv.org/abs/2407.11895)). It maps "
        f"embeddings of {len(layout.spaces) + 1} frozen spaces into one {bind.dim}-d space (the "
        f"anchor `{layout.anchor}`'s) for {', '.join(bind.modalities)}. Outputs are "
        "L2-normalised.",
        "",
        "## Spaces",
        "",
        "| space | input dims | experts | hidden dim |",
        "|---|---|---|---|",
        f"| `{layout.anchor}` (anchor, used as is) | {bind.dim} | | |",
    ]
    for space, b in layout.spaces.items():
        dims = ", ".join(f"{m} {d}" for m, d in b["dims"].items())
        experts = ", ".join(map(str, b["experts"]))
        lines.append(f"| `{space}` | {dims} | {experts} | {b['hidden_dim']} |")
    lines += ["", "## Routing", "", "| modality | groups | router reads |", "|---|---|---|"]
    for m in bind.modalities:
        groups = ", ".join(f"`{g}`" for g in layout.groups[m])
        predictors = ", ".join(f"`{p}`" for p in layout.predictors[m])
        lines.append(f"| {m} | {groups} | {predictors} |")
    if layout.blends:
        lines += ["", f"Fixed blends: `{json.dumps(layout.blends, sort_keys=True)}`."]
    if record.get("checkpoint_sha256"):
        digest = record["checkpoint_sha256"]
        source = f"converted from an official OmniBind checkpoint (sha256 `{digest}`)"
    else:
        source = f"`{record['pairs']}`" if record.get("pairs") else "not recorded in the export"
    command = command or record.get("command")
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


