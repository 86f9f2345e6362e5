"""open_clip image-text encoders: any open_clip model name, `pretrained` a tag or a local file.

    encoder: {_target_: encoders.openclip.OpenClipEncoder, model: EVA02-E-14-plus,
              pretrained: laion2b_s9b_b144k}
    encoder: {_target_: encoders.openclip.OpenClipEncoder, model: ViT-B-32, pretrained: null,
              seed: 0, model_cfg: {...}}

`model` is a built-in open_clip name or `local-dir:/path` (a folder with open_clip_config.json and
its weights); `model_cfg` replaces top-level keys of the built-in config (embed_dim, vision_cfg,
text_cfg), which is how the tiny smoke space gets tiny dims. `pretrained: null` means random
weights drawn from `seed`. `tokenizer` may name a local Hugging Face tokenizer folder for models
whose tokenizer lives on the Hub (SigLIP), and `preprocess` overrides image preprocessing keys
(size, mean, std, interpolation, resize_mode) when a local file gives no tag to take them from.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import open_clip
import torch
from open_clip.factory import load_state_dict
from open_clip.transform import PreprocessCfg, image_transform_v2, merge_preprocess_dict

from encoders.base import Encoder, Processor, param_dtype, seeded

MODALITIES = ("image", "text")


def model_config(model: str, model_cfg: Mapping | None = None) -> dict:
    """The open_clip architecture config of `model`, with `model_cfg`'s top-level keys replaced."""
    cfg = open_clip.get_model_config(model) if not model.startswith("hf-hub:") else None
    if cfg is None:
        raise ValueError(
            f"open_clip has no model config {model!r}; use a built-in name "
            f"(e.g. {open_clip.list_models()[:3]}...) or local-dir:/path/with/open_clip_config.json"
        )
    cfg = copy.deepcopy(cfg)
    cfg.update(copy.deepcopy(dict(model_cfg or {})))
    return cfg


def preprocess_config(
    model: str, pretrained: str | None, cfg: Mapping, overrides: Mapping | None = None
) -> dict:
    """Image preprocessing as open_clip's create_model sets it, plus `overrides`."""
    out = merge_preprocess_dict(PreprocessCfg(), {})
    if model.startswith("local-dir:"):
        path = Path(model.removeprefix("local-dir:")) / "open_clip_config.json"
        out = merge_preprocess_dict(out, json.loads(path.read_text()).get("preprocess_cfg", {}))
    elif pretrained and not os.path.isfile(pretrained):
        out = merge_preprocess_dict(out, open_clip.get_pretrained_cfg(model, pretrained))
    out["size"] = cfg["vision_cfg"].get("image_size", out["size"])
    return merge_preprocess_dict(out, dict(overrides or {}))


class OpenClipProcessor(Processor):
    """open_clip's eval image transform (per item) and tokenizer (per batch)."""

    def __init__(self, transform, tokenizer) -> None:
        self.transform, self.tokenizer = transform, tokenizer

    def item(self, modality: str, raw: Any) -> Any:
        return self.transform(raw) if modality == "image" else raw

    def batch(self, modality: str, items: Sequence[Any]) -> Any:
        if modality == "text":
            return self.tokenizer(list(items))
        return torch.stack(list(items))


def build_processor(
    model: str,
    pretrained: str | None = None,
    model_cfg: Mapping | None = None,
    tokenizer: str | None = None,
    preprocess: Mapping | None = None,
    **_: Any,
) -> OpenClipProcessor:
    """The processor of an open_clip encoder config, without building the model."""
    cfg = model_config(model, model_cfg)
    pre = preprocess_config(model, pretrained, cfg, preprocess)
    transform = image_transform_v2(PreprocessCfg(**pre), is_train=False)
    text_cfg = cfg.get("text_cfg", {})
    context = text_cfg.get("context_length", 77)
    if tokenizer:
        if not Path(tokenizer).is_dir():
            raise FileNotFoundError(f"encoder.tokenizer {tokenizer}: no such tokenizer folder")
        tok = open_clip.tokenizer.HFTokenizer(
            str(tokenizer), context_length=context, **text_cfg.get("tokenizer_kwargs", {})
        )
    else:
        tok = open_clip.get_tokenizer(model, context_length=context)
    return OpenClipProcessor(transform, tok)


class OpenClipEncoder(Encoder):
    """An open_clip CLIP model: image (batch, 3, H, W) and text tokens (batch, context) in."""

    @classmethod
    def build_processor(
        cls,
        model: str,
        pretrained: str | None = None,
        model_cfg: Mapping | None = None,
        tokenizer: str | None = None,
        preprocess: Mapping | None = None,
        precision: str = "fp32",
        seed: int = 0,
    ) -> OpenClipProcessor:
        """The processor of this encoder config, without building the model."""
        return build_processor(model, pretrained, model_cfg, tokenizer, preprocess)

    def __init__(
        self,
        dims: Mapping[str, int],
        model: str,
        pretrained: str | None = None,
        model_cfg: Mapping | None = None,
        tokenizer: str | None = None,
        preprocess: Mapping | None = None,
        precision: str = "fp32",
        seed: int = 0,
        load_weights: bool = True,
    ) -> None:
        unknown = sorted(set(dims) - set(MODALITIES))
        if unknown:
            raise ValueError(f"open_clip encoder {model!r} embeds {MODALITIES}, not {unknown}")
        cfg = model_config(model, model_cfg)
        wrong = {m: d for m, d in dims.items() if d != cfg["embed_dim"]}
        if wrong:
            raise ValueError(
                f"open_clip {model!r} has embed_dim {cfg['embed_dim']}, but the space says {wrong}"
            )
        super().__init__(dims, build_processor(model, pretrained, model_cfg, tokenizer, preprocess))
        self.source = dict(model=model, pretrained=pretrained)
        with seeded(seed):
            try:
                self.model = open_clip.create_model(
                    model, pretrained=pretrained if load_weights else None, precision=precision,
                    load_weights=load_weights, **dict(model_cfg or {}),
                )  # fmt: skip
            except RuntimeError as e:
                if "pretrained" not in str(e).lower() and "download" not in str(e).lower():
                    raise
                raise RuntimeError(
                    f"open_clip {model!r}: pretrained {pretrained!r} could not be loaded ({e}). "
                    "Offline, set encoder.pretrained to a local checkpoint file (and "
                    "encoder.preprocess to its mean/std if they are not OpenAI's)"
                ) from e
        self.freeze()

    def embed(self, modality: str, batch: Any) -> torch.Tensor:
        # Through forward(), not encode_image(): ZeRO-3 gathers a module's own parameters
        # (positional embedding, projections) only when its forward runs.
        if modality == "image":
            return self.model(image=batch.to(param_dtype(self.model)))[0]
        return self.model(text=batch)[1]

    def pretrained_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The weights `pretrained` names, keyed as in this module (for ZeRO-3 loading)."""
        model, pretrained = self.source["model"], self.source["pretrained"]
        if model.startswith("local-dir:"):
            folder = Path(model.removeprefix("local-dir:"))
            files = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin"))
            path = str(files[0]) if files else None
        elif pretrained and os.path.isfile(pretrained):
            path = pretrained
        elif pretrained:
            path = open_clip.download_pretrained(open_clip.get_pretrained_cfg(model, pretrained))
        else:
            return None
        if path is None:
            raise FileNotFoundError(f"{model}: no weights file in the local-dir folder")
        return {f"model.{k}": v for k, v in load_state_dict(path).items()}
