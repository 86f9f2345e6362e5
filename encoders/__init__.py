"""Frozen encoders: raw items in, L2-normalised embeddings out, one interface for every space.

`conf/space/<name>.yaml` names its encoder in an `encoder:` block; `kind` picks the module:
    open_clip    image, text  encoders/openclip.py     EVA02-E, SigLIP, DFN, EVA-CLIP-18B, tiny_clip
    laion_clap   audio, text  encoders/clap.py         CLAP, tiny_clap
    precomputed  any          encoders/precomputed.py  Uni3D, WavCaps, ImageBind (their dumps)
Video goes through the image encoder frame by frame and is averaged (encoders/video.py).
The other keys of the block are the encoder's constructor arguments.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from encoders.base import Encoder, Processor

KINDS = ("open_clip", "laion_clap", "precomputed")


def _split(cfg: Mapping) -> tuple[str, dict]:
    cfg = dict(cfg)
    kind = cfg.pop("kind", None)
    if kind not in KINDS:
        raise ValueError(f"encoder.kind is {kind!r}; expected one of {list(KINDS)}")
    return kind, cfg


def _check_keys(cls: type, kwargs: Mapping, kind: str) -> None:
    allowed = set(inspect.signature(cls.__init__).parameters) - {"self", "dims", "load_weights"}
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise ValueError(f"encoder ({kind}): unknown keys {unknown}; it takes {sorted(allowed)}")


def build_processor(cfg: Mapping, dims: Mapping[str, int]) -> Processor:
    """The weightless input preparation of an encoder config (cheap; DataLoaders use it)."""
    kind, kwargs = _split(cfg)
    if kind == "open_clip":
        from encoders.openclip import OpenClipEncoder
        from encoders.openclip import build_processor as make

        _check_keys(OpenClipEncoder, kwargs, kind)
        return make(**kwargs)
    if kind == "laion_clap":
        from encoders.clap import ClapEncoder, ClapProcessor

        _check_keys(ClapEncoder, kwargs, kind)
        return ClapProcessor(**kwargs)
    from encoders.precomputed import PrecomputedProcessor

    return PrecomputedProcessor()


def build_encoder(
    cfg: Mapping, dims: Mapping[str, int], load_weights: bool = True, **context: Any
) -> Encoder:
    """The frozen encoder of a space's `encoder:` block, embedding the modalities in `dims`.

    load_weights=False builds the architecture only (ZeRO-3 loads the weights afterwards).
    A precomputed encoder needs `dataset` and `keys` ({modality: item keys}) in `context`.
    """
    kind, kwargs = _split(cfg)
    if kind == "open_clip":
        from encoders.openclip import OpenClipEncoder as cls
    elif kind == "laion_clap":
        from encoders.clap import ClapEncoder as cls
    else:
        from encoders.precomputed import PrecomputedEncoder

        _check_keys(PrecomputedEncoder, {**kwargs, **context}, kind)
        return PrecomputedEncoder(dims, **kwargs, **context)
    _check_keys(cls, kwargs, kind)
    return cls(dims, **kwargs, load_weights=load_weights)


__all__ = ["KINDS", "Encoder", "Processor", "build_encoder", "build_processor"]
