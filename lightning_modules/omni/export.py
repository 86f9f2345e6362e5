"""One export format: safetensors weights beside a JSON record that carries their sha256.

Bound spaces (`bound.json` + `projectors.safetensors`), omni models (`omni.json` +
`omni.safetensors`) and the Hub directory (`config.json` + `model.safetensors`, written through
huggingface_hub's ModelHubMixin) all use `write` and `read_weights`. The weights are serialised in
memory and written atomically, then the record (written last, so a record always describes
complete weights); a reader verifies the digest before the weights are used.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from safetensors import SafetensorError

from datamodules.artifacts import CacheError, atomic_write, atomic_write_json, verify_file
from lightning_modules.omni.layers import ProjectorMixture
from lightning_modules.omni.layout import LayoutError, OmniLayout
from lightning_modules.omni.model import OmniModel

BOUND_WEIGHTS, BOUND_META = "projectors.safetensors", "bound.json"
OMNI_WEIGHTS, OMNI_META = "omni.safetensors", "omni.json"


def write(
    directory: str | Path, weights: str, meta: str, module: torch.nn.Module, record: Mapping
) -> dict[str, Any]:
    """Write `module`'s state dict to directory/weights, then record + its sha256 to meta."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    data = safetensors.torch.save(tensors)
    atomic_write(directory / weights, lambda f: f.write(data))
    record = {**record, "sha256": hashlib.sha256(data).hexdigest()}
    atomic_write_json(directory / meta, record)
    return record


def read_record(directory: str | Path, meta: str, what: str) -> dict[str, Any]:
    """The JSON record of an export; a missing or unreadable one names the file."""
    path = Path(directory) / meta
    if not path.exists():
        raise CacheError(f"{directory}: no {what} here ({meta} missing)")
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CacheError(f"{path}: not a valid {what.replace(' ', '-')} description ({e!r})") from e
    if not isinstance(record, dict):
        raise CacheError(f"{path}: expected a JSON object, got {type(record).__name__}")
    return record


def read_weights(
    module: torch.nn.Module, weights: Path, sha256: str | None, recorded_in: str | Path, repair: str
) -> torch.nn.Module:
    """Load `weights` into `module` strictly, after checking them against `sha256` (if any)."""
    # Exports written before digests were recorded have none; absent weights fail below.
    if sha256 is not None and weights.exists():
        verify_file(weights, sha256, recorded_in=recorded_in, repair=repair)
    try:
        module.load_state_dict(safetensors.torch.load_file(str(weights)), strict=True)
    except (RuntimeError, OSError, SafetensorError) as e:
        raise CacheError(f"{weights}: does not match {recorded_in} ({e})") from e
    return module.eval()


def save_bound_space(mixture: ProjectorMixture, directory: str | Path, record: Mapping) -> Path:
    """A bound space: its projector mixture and record (space, dims, experts, ...)."""
    write(directory, BOUND_WEIGHTS, BOUND_META, mixture, record)
    return Path(directory)


def load_bound_space(directory: str | Path) -> tuple[ProjectorMixture, dict]:
    """A bound space's projectors (eval mode) and record; every key and shape must match."""
    directory = Path(directory)
    meta = read_record(directory, BOUND_META, "bound space")
    try:
        in_dim = next(iter(meta["dims"].values()))
        mixture = ProjectorMixture(
            in_dim, meta["out_dim"], meta["hidden_dim"], len(meta["experts"]), meta["renormalize"]
        )
    except (ValueError, KeyError, TypeError, StopIteration, AttributeError) as e:
        raise CacheError(
            f"{directory / BOUND_META}: not a valid bound-space description ({e!r})"
        ) from e
    repair = f"rerun stage=bind space={meta.get('space')} to rewrite it"
    read_weights(mixture, directory / BOUND_WEIGHTS, meta.get("sha256"), directory / BOUND_META,
                 repair)  # fmt: skip
    return mixture, meta


def save_omni(model: OmniModel, directory: str | Path) -> Path:
    """An omni model: its weights and layout (with the weights' digest)."""
    write(directory, OMNI_WEIGHTS, OMNI_META, model, model.layout.to_dict())
    return Path(directory)


def layout_of(record: Mapping, where: str | Path) -> OmniLayout:
    """The OmniLayout a stored record describes (its sha256 is the export's, not the layout's)."""
    try:
        return OmniLayout.from_dict({k: v for k, v in record.items() if k != "sha256"}, str(where))
    except (LayoutError, TypeError) as e:
        raise CacheError(str(e)) from e


def load_omni(directory: str | Path) -> OmniModel:
    """Load an omni export strictly: every key consumed, every shape checked."""
    directory = Path(directory)
    record = read_record(directory, OMNI_META, "omni export")
    model = OmniModel(layout_of(record, directory / OMNI_META))
    return read_weights(model, directory / OMNI_WEIGHTS, record.get("sha256"),
                        directory / OMNI_META,
                        "rerun the stage that wrote it (stage=route or stage=convert)")  # fmt: skip
