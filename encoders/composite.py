"""A space whose modalities come from different encoders, as the release's Uni3D space does.

Uni3D trains only a point tower into EVA02-E-14-plus's image-text space, so the Uni3D space is
Uni3D's point encoder beside EVA02-E's image and text towers:

    encoder:
      _target_: encoders.composite.CompositeEncoder
      _recursive_: false          # the parts are built here, each with its own modalities' dims
      parts:
        - modalities: [point]
          encoder: {_target_: encoders.uni3d.Uni3DEncoder, checkpoint: /path/to/model.pt}
        - modalities: [image, text]
          encoder: {_target_: encoders.openclip.OpenClipEncoder, model: EVA02-E-14-plus, ...}

Each part is an ordinary `encoder:` block; the composite hands every modality to its part.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from encoders.base import Encoder, Processor


def _parts(parts: Sequence[Mapping] | None, dims: Mapping[str, int] | None) -> list[dict]:
    """The parts as plain dicts, each naming modalities no other part names (and, with dims,
    together every modality of the space)."""
    if isinstance(parts, DictConfig) or (parts is not None and OmegaConf.is_config(parts)):
        parts = OmegaConf.to_container(parts, resolve=True)
    if not parts:
        raise ValueError("CompositeEncoder: encoder.parts is empty; list {modalities, encoder}")
    out, seen = [], {}
    for i, part in enumerate(parts):
        if not isinstance(part, Mapping) or set(part) != {"modalities", "encoder"}:
            raise ValueError(
                f"encoder.parts[{i}]: expected {{modalities: [...], encoder: {{_target_: ...}}}}, "
                f"got {part!r}"
            )
        for m in part["modalities"]:
            if m in seen:
                raise ValueError(f"encoder.parts[{i}]: {m!r} is already parts[{seen[m]}]'s")
            seen[m] = i
        out.append({"modalities": list(part["modalities"]), "encoder": dict(part["encoder"])})
    if dims is not None and set(dims) - set(seen):
        raise ValueError(
            f"encoder.parts: no part embeds {sorted(set(dims) - set(seen))} "
            f"(the space's dims are {sorted(dims)}; the parts cover {sorted(seen)})"
        )
    return out


class CompositeProcessor(Processor):
    """Each modality's input preparation is its part's."""

    def __init__(self, by_modality: Mapping[str, Processor]) -> None:
        self.by_modality = dict(by_modality)
        audio = self.by_modality.get("audio")
        self.sample_rate = getattr(audio, "sample_rate", None)
        self.clip_samples = getattr(audio, "clip_samples", None)
        point = self.by_modality.get("point")
        for key in ("num_points", "min_points", "missing_rgb"):  # what the point reader asks
            if hasattr(point, key):
                setattr(self, key, getattr(point, key))

    def item(self, modality: str, raw: Any) -> Any:
        return self.by_modality[modality].item(modality, raw)

    def batch(self, modality: str, items: Sequence[Any]) -> Any:
        return self.by_modality[modality].batch(modality, items)


class CompositeEncoder(Encoder):
    """Modalities of one space embedded by different encoders (`parts`)."""

    @classmethod
    def build_processor(cls, parts: Sequence[Mapping], **_: Any) -> CompositeProcessor:
        """The parts' processors, without building any model."""
        from encoders import build_processor

        by_modality = {}
        for part in _parts(parts, None):
            processor = build_processor(part["encoder"], dict.fromkeys(part["modalities"], 0))
            by_modality.update(dict.fromkeys(part["modalities"], processor))
        return CompositeProcessor(by_modality)

    def __init__(
        self, dims: Mapping[str, int], parts: Sequence[Mapping], load_weights: bool = True
    ) -> None:
        from encoders import build_encoder

        parts = _parts(parts, dims)
        built, by_modality = [], {}
        for part in parts:
            wanted = {m: dims[m] for m in part["modalities"] if m in dims}
            if not wanted:
                continue
            encoder = build_encoder(part["encoder"], wanted, load_weights=load_weights)
            built.append(encoder)
            by_modality.update(dict.fromkeys(wanted, encoder))
        processors = {m: e.processor for m, e in by_modality.items()}
        super().__init__(dims, CompositeProcessor(processors))
        self.parts = torch.nn.ModuleList(built)
        self.index = {m: built.index(e) for m, e in by_modality.items()}

    def embed(self, modality: str, batch: Any) -> torch.Tensor:
        return self.parts[self.index[modality]].embed(modality, batch)

    def pretrained_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Every part's checkpoint weights keyed as in this module (for ZeRO-3 loading)."""
        out = {}
        for i, part in enumerate(self.parts):
            state = part.pretrained_state_dict() if hasattr(part, "pretrained_state_dict") else None
            if state is None:
                return None
            out.update({f"parts.{i}.{k}": v for k, v in state.items()})
        return out
