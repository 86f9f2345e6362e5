"""Frozen encoders: raw items in, L2-normalised embeddings out, one interface for every space.

`conf/space/<name>.yaml` declares its encoder as a Hydra `_target_` config; the other keys of
the block are the class's constructor arguments (Hydra names a wrong key when it builds it):
    encoders.openclip.OpenClipEncoder        image, text         EVA02-E, DFN, tiny_clip
    encoders.hf_clip.HFClipEncoder           image, text         SigLIP (transformers)
    encoders.eva_clip                        image, text         EVA-CLIP-18B
    encoders.clap.ClapEncoder                audio, text         CLAP, tiny_clap
    encoders.wavcaps.WavCapsEncoder          audio, text         WavCaps HTSAT-BERT
    encoders.imagebind.ImageBindEncoder      audio, image, text  ImageBind-huge
    encoders.uni3d.Uni3DEncoder              point               Uni3D-g
    encoders.composite.CompositeEncoder      any                 Uni3D's point tower + EVA02-E's
    encoders.precomputed.PrecomputedEncoder  any                 any space's own dumps
Video goes through the image encoder frame by frame and is averaged (encoders/video.py).

Raw items to embeddings in one call (what the inference API uses):
    encoder = build_encoder(space_cfg.encoder, space_cfg.dims)
    encoder.encode({"image": ["a.jpg"], "audio": ["a.wav"], "text": ["a dog"],
                    "point": ["a.ply"], "video": ["clip_frames/"]})   # {modality: (n, dim)}
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from encoders.base import Encoder, Processor


def _plain(cfg: Mapping | DictConfig | None, where: str) -> dict:
    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_container(cfg, resolve=True)
    if not cfg or not isinstance(cfg, Mapping) or not cfg.get("_target_"):
        raise ValueError(
            f"{where}: the space has no `encoder:` block with a `_target_` (e.g. "
            "encoders.openclip.OpenClipEncoder); add one to conf/space/<name>.yaml"
        )
    return dict(cfg)


def encoder_class(cfg: Mapping | DictConfig | None) -> type[Encoder]:
    """The Encoder subclass an `encoder:` block names with `_target_`."""
    target = _plain(cfg, "encoder")["_target_"]
    cls = get_class(target)
    if not (isinstance(cls, type) and issubclass(cls, Encoder)):
        raise ValueError(f"encoder._target_ {target!r} is not an encoders.base.Encoder subclass")
    return cls


def build_processor(cfg: Mapping | DictConfig | None, dims: Mapping[str, int]) -> Processor:
    """The weightless input preparation of an encoder config (cheap; DataLoaders use it)."""
    kwargs = _plain(cfg, "encoder")
    cls = encoder_class(kwargs)
    kwargs.pop("_target_")
    return cls.build_processor(**kwargs)


def build_encoder(
    cfg: Mapping | DictConfig | None,
    dims: Mapping[str, int],
    load_weights: bool = True,
    **context: Any,
) -> Encoder:
    """The frozen encoder of a space's `encoder:` block, embedding the modalities in `dims`.

    load_weights=False builds the architecture only (ZeRO-3 loads the weights afterwards).
    A precomputed encoder needs `dataset` and `keys` ({modality: item keys}) in `context`.
    """
    cfg = _plain(cfg, "encoder")
    extra = dict(context) if encoder_class(cfg).precomputed else {"load_weights": load_weights}
    try:
        return instantiate(cfg, dims=dict(dims), **extra, _convert_="all")
    except InstantiationException as e:
        # Hydra wraps every error; the constructor's own (a wrong key's TypeError, a dim
        # mismatch's ValueError, a missing checkpoint's FileNotFoundError) says more, typed.
        if e.__cause__ is None:
            raise
        raise e.__cause__ from None


__all__ = ["Encoder", "Processor", "build_encoder", "build_processor", "encoder_class"]
