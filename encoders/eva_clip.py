"""EVA-CLIP-18B (BAAI), the anchor space, as our own module under the released checkpoint's names.

    encoder: {_target_: encoders.eva_clip.EvaClip18BEncoder, checkpoint: /path/to/EVA-CLIP-18B,
              size: 18B, precision: bf16}

The release loads the Hugging Face folder BAAI/EVA-CLIP-18B with `AutoModel.from_pretrained(dir,
trust_remote_code=True)` in float16: the folder's modeling_evaclip.py builds `EvaCLIPModel`, whose
weights are the folder's 8 fp32 shards pytorch_model-0000k-of-00008.bin listed by
pytorch_model.bin.index.json (1051 keys, 18,325,482,240 parameters). open_clip has no such
architecture. `EvaClipModel` below is that architecture written anew from its description, with the
same parameter names and shapes, so the folder's state dict loads into it as it is (no prefix):
- vision (`vision_model`): 224 px, patch 14, CLS token plus learned positions; 48 post-norm blocks
  of width 5120 (40 heads, q/k/v projections without bias, GELU MLP of 25600), RMSNorm without
  bias everywhere; the CLS token, RMS-normed, is projected by `visual_projection` (no bias);
- text (`text_model`): CLIP's causal transformer, 32 pre-LayerNorm blocks of width 1280 (20 heads,
  biased q/k/v), the end-of-text token pooled and projected by `text_projection` (no bias);
- embed_dim 1536, no `logit_scale` and no `position_ids` in the state dict.
It builds from `size` alone (`18B`, or `tiny` for tests and smoke runs), on the meta device or
inside DeepSpeed's `zero.Init` (`trainer=deepspeed_infer`: load_weights=False, then
`pretrained_state_dict()`); every module that owns a parameter runs its own forward, which is what
ZeRO-3 hooks to gather it. A folder's config.json, when present, must agree with the preset
(its norm epsilons and activations, which no weight shows, are taken from it).

`backend: transformers` loads the folder exactly as the release does instead (its own remote code,
through encoders/hf_clip.py's strict loader). Preprocessing is the release's either way: openai/
clip-vit-large-patch14's CLIPImageProcessor (its settings, or the folder `image_processor` names)
and a CLIPTokenizer (the checkpoint folder's, `tokenizer`'s, or CLIP's BPE as open_clip ships it)
cut at `max_length` 42 tokens. `checkpoint: null` means random weights drawn from `seed`.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from encoders.base import Encoder, seeded
from encoders.hf_clip import (
    HFClipProcessor,
    check_state,
    checkpoint_folder,
    clip_processor,
    dtype_of,
    load_model,
    module_shapes,
    read_checkpoint,
)

MODALITIES = ("image", "text")
BACKENDS = ("native", "transformers")
# transformers 5's two implementations of CLIP's image processor, by `encoder.image_backend`.
CLIP_IMAGE_PROCESSORS = {"pil": "CLIPImageProcessorPil", "torchvision": "CLIPImageProcessor"}
TOKENIZER_FILES = ("vocab.json", "tokenizer.json")  # the release folder has vocab.json, merges.txt
EXPECTED = "the BAAI/EVA-CLIP-18B folder (config.json, pytorch_model.bin.index.json and its shards)"


@dataclass(frozen=True)
class Tower:
    """One transformer tower: width, depth, heads, MLP width and its norm/bias choices."""

    width: int
    layers: int
    heads: int
    mlp: int
    eps: float
    rms_norm: bool  # RMSNorm (weight only) instead of LayerNorm
    post_norm: bool  # norm after attention / MLP, inside the residual, instead of before
    qkv_bias: bool
    act: str = "gelu"  # the MLP's: exact GELU, or CLIP's sigmoid approximation "quick_gelu"


@dataclass(frozen=True)
class EvaClipConfig:
    """The architecture: both towers, the input sizes and the shared embedding dim."""

    embed_dim: int
    vision: Tower
    text: Tower
    image_size: int = 224
    patch_size: int = 14
    vocab_size: int = 49408
    context_length: int = 77


PRESETS = {
    "18B": EvaClipConfig(
        embed_dim=1536,
        vision=Tower(5120, 48, 40, 25600, 1e-6, rms_norm=True, post_norm=True, qkv_bias=False),
        text=Tower(1280, 32, 20, 5120, 1e-5, rms_norm=False, post_norm=False, qkv_bias=True),
    ),
    "tiny": EvaClipConfig(
        embed_dim=32,
        image_size=56,
        vision=Tower(64, 2, 2, 160, 1e-6, rms_norm=True, post_norm=True, qkv_bias=False),
        text=Tower(32, 2, 2, 64, 1e-5, rms_norm=False, post_norm=False, qkv_bias=True),
    ),  # fmt: skip
}


def preset(size: str) -> EvaClipConfig:
    """The architecture of an `encoder.size` name."""
    if size not in PRESETS:
        raise ValueError(f"encoder.size {size!r}: expected one of {sorted(PRESETS)}")
    return PRESETS[size]


def hf_config(cfg: EvaClipConfig) -> dict:
    """The fields of the release's config.json that fix the architecture, for `cfg`."""

    def tower(t: Tower) -> dict:
        return dict(hidden_size=t.width, num_hidden_layers=t.layers, num_attention_heads=t.heads,
                    intermediate_size=t.mlp, layer_norm_eps=t.eps, use_rms_norm=t.rms_norm,
                    post_layernorm=t.post_norm, q_bias=t.qkv_bias, k_bias=t.qkv_bias,
                    v_bias=t.qkv_bias, hidden_act=t.act)  # fmt: skip

    return {
        "projection_dim": cfg.embed_dim,
        "vision_config": {**tower(cfg.vision), "image_size": cfg.image_size,
                          "patch_size": cfg.patch_size, "num_channels": 3},
        "text_config": {**tower(cfg.text), "vocab_size": cfg.vocab_size,
                        "max_position_embeddings": cfg.context_length},
    }  # fmt: skip


# Options of the remote code's configs that this module does not implement: refused when on.
UNSUPPORTED = ("use_swiglu_mlp", "use_rope", "use_sub_ln")
ACTIVATIONS = {"gelu": F.gelu, "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x)}
# Fields that change no weight's shape, taken from a folder's config.json rather than refused.
NUMERIC = ("layer_norm_eps", "hidden_act")


def folder_config(folder: Path, cfg: EvaClipConfig, size: str) -> EvaClipConfig:
    """Preset `size` as the folder's config.json refines it: its norm epsilons and activations,
    which no weight shape shows, are taken; any other field that differs is refused."""
    path = folder / "config.json"
    if not path.is_file():
        return cfg
    have, want = json.loads(path.read_text()), hf_config(cfg)
    for part in ("vision_config", "text_config"):
        for option in UNSUPPORTED:
            if have.get(part, {}).get(option):
                raise ValueError(f"{path}: {part}.{option} is on; EvaClipModel does not have it")
    for name, value in want.items():
        pairs = value.items() if isinstance(value, dict) else [(None, value)]
        for field, expected in pairs:
            got = have.get(name) if field is None else have.get(name, {}).get(field)
            if got is not None and got != expected and field not in NUMERIC:
                where = name if field is None else f"{name}.{field}"
                raise ValueError(f"{path}: {where} is {got!r}, but encoder.size {size!r} has "
                                 f"{expected!r}")  # fmt: skip

    def refine(tower: Tower, part: str) -> Tower:
        fields = have.get(part, {})
        act = fields.get("hidden_act", tower.act)
        if act not in ACTIVATIONS:
            raise ValueError(f"{path}: {part}.hidden_act {act!r}: EvaClipModel has "
                             f"{sorted(ACTIVATIONS)}")  # fmt: skip
        return dataclasses.replace(tower, eps=float(fields.get("layer_norm_eps", tower.eps)),
                                   act=act)  # fmt: skip

    return dataclasses.replace(cfg, vision=refine(cfg.vision, "vision_config"),
                               text=refine(cfg.text, "text_config"))  # fmt: skip


class RMSNorm(nn.Module):
    """Root-mean-square norm with a weight and no bias, computed in float32."""

    def __init__(self, width: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * (x.float() * scale).to(self.weight.dtype)


def norm(t: Tower) -> nn.Module:
    """The norm layer of a tower."""
    return RMSNorm(t.width, t.eps) if t.rms_norm else nn.LayerNorm(t.width, eps=t.eps)


class Attention(nn.Module):
    """Multi-head self-attention with separate q/k/v projections (scaled dot product)."""

    def __init__(self, t: Tower) -> None:
        super().__init__()
        self.heads = t.heads
        self.q_proj = nn.Linear(t.width, t.width, bias=t.qkv_bias)
        self.k_proj = nn.Linear(t.width, t.width, bias=t.qkv_bias)
        self.v_proj = nn.Linear(t.width, t.width, bias=t.qkv_bias)
        self.out_proj = nn.Linear(t.width, t.width)

    def forward(self, x: torch.Tensor, causal: bool) -> torch.Tensor:
        b, n, w = x.shape

        def heads(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, n, self.heads, w // self.heads).transpose(1, 2)

        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, w))


class MLP(nn.Module):
    """fc1, GELU, fc2."""

    def __init__(self, t: Tower) -> None:
        super().__init__()
        self.act = ACTIVATIONS[t.act]
        self.fc1 = nn.Linear(t.width, t.mlp)
        self.fc2 = nn.Linear(t.mlp, t.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """One transformer layer, pre- or post-norm as the tower says."""

    def __init__(self, t: Tower) -> None:
        super().__init__()
        self.post_norm = t.post_norm
        self.self_attn = Attention(t)
        self.layer_norm1 = norm(t)
        self.mlp = MLP(t)
        self.layer_norm2 = norm(t)

    def forward(self, x: torch.Tensor, causal: bool) -> torch.Tensor:
        if self.post_norm:
            x = x + self.layer_norm1(self.self_attn(x, causal))
            return x + self.layer_norm2(self.mlp(x))
        x = x + self.self_attn(self.layer_norm1(x), causal)
        return x + self.mlp(self.layer_norm2(x))


class Layers(nn.Module):
    """The stack of blocks (`encoder.layers.<i>` in the checkpoint)."""

    def __init__(self, t: Tower) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Block(t) for _ in range(t.layers))

    def forward(self, x: torch.Tensor, causal: bool) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, causal)
        return x


class VisionEmbeddings(nn.Module):
    """Patches (conv) after a learned CLS token, plus learned positions."""

    def __init__(self, cfg: EvaClipConfig) -> None:
        super().__init__()
        w = cfg.vision.width
        self.class_embedding = nn.Parameter(torch.randn(w) * w**-0.5)
        self.patch_embedding = nn.Conv2d(3, w, cfg.patch_size, stride=cfg.patch_size)
        self.position_embedding = nn.Embedding((cfg.image_size // cfg.patch_size) ** 2 + 1, w)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(pixels).flatten(2).transpose(1, 2)
        cls = self.class_embedding.to(patches.dtype).expand(len(patches), 1, -1)
        x = torch.cat([cls, patches], dim=1)
        return x + self.position_embedding(torch.arange(x.shape[1], device=x.device))


class VisionTower(nn.Module):
    """Image (batch, 3, 224, 224) -> the RMS-normed CLS feature (batch, width)."""

    def __init__(self, cfg: EvaClipConfig) -> None:
        super().__init__()
        self.image_size = cfg.image_size
        self.embeddings = VisionEmbeddings(cfg)
        self.encoder = Layers(cfg.vision)
        self.post_layernorm = norm(cfg.vision)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        size = self.image_size
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != (3, size, size):
            raise ValueError(f"EVA-CLIP takes images of shape (batch, 3, {size}, {size}), "
                             f"not {tuple(pixels.shape)}")  # fmt: skip
        x = self.encoder(self.embeddings(pixels), causal=False)
        return self.post_layernorm(x[:, 0])


class TextEmbeddings(nn.Module):
    """Token plus learned position embeddings."""

    def __init__(self, cfg: EvaClipConfig) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.text.width)
        self.position_embedding = nn.Embedding(cfg.context_length, cfg.text.width)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)
        return self.token_embedding(ids) + self.position_embedding(positions)


class TextTower(nn.Module):
    """Token ids (batch, length) -> the end-of-text feature (batch, width), causally encoded."""

    def __init__(self, cfg: EvaClipConfig) -> None:
        super().__init__()
        self.context, self.vocab = cfg.context_length, cfg.vocab_size
        self.embeddings = TextEmbeddings(cfg)
        self.encoder = Layers(cfg.text)
        self.final_layer_norm = norm(cfg.text)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.ndim != 2 or ids.shape[1] > self.context or ids.dtype.is_floating_point:
            raise ValueError(f"EVA-CLIP takes token ids of shape (batch, <= {self.context}), "
                             f"not {tuple(ids.shape)} {ids.dtype}")  # fmt: skip
        if len(ids) and (ids.min() < 0 or ids.max() >= self.vocab):
            raise ValueError(f"EVA-CLIP token ids must lie in [0, {self.vocab})")
        x = self.final_layer_norm(self.encoder(self.embeddings(ids), causal=True))
        # End of text has the highest id in CLIP's vocabulary; argmax takes its first occurrence,
        # so padding with it (or anything lower) changes nothing under the causal mask.
        return x[torch.arange(len(x), device=x.device), ids.argmax(dim=-1)]


class EvaClipModel(nn.Module):
    """Both towers and their projections into the shared (batch, embed_dim) space."""

    def __init__(self, cfg: EvaClipConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.text_model = TextTower(cfg)
        self.vision_model = VisionTower(cfg)
        self.visual_projection = nn.Linear(cfg.vision.width, cfg.embed_dim, bias=False)
        self.text_projection = nn.Linear(cfg.text.width, cfg.embed_dim, bias=False)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """Images (batch, 3, H, W) -> (batch, embed_dim), not normalised."""
        return self.visual_projection(self.vision_model(pixels))

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids (batch, length) -> (batch, embed_dim), not normalised."""
        return self.text_projection(self.text_model(ids))


def clip_bpe_tokenizer(context: int = 77):
    """transformers' CLIPTokenizer over CLIP's BPE as open_clip ships it (the vocabulary of
    openai/clip-vit-large-patch14, 49408 tokens), for use without a tokenizer folder."""
    from open_clip.tokenizer import bytes_to_unicode, default_bpe
    from transformers import CLIPTokenizer

    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")
    # The merges CLIP's vocabulary was built from, as open_clip's SimpleTokenizer reads them.
    merges = [tuple(m.split()) for m in lines[1 : 49152 - 256 - 2 + 1]]
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(vocab)}, merges=merges,
                         model_max_length=context)  # fmt: skip


def build_processor(
    checkpoint: str | None = None,
    size: str = "18B",
    image_processor: str | None = None,
    tokenizer: str | None = None,
    max_length: int = 42,
    padding: str | bool = "longest",
    image_backend: str = "pil",
    **_: Any,
) -> HFClipProcessor:
    """The release's preprocessing: CLIP-L/14's image processor and CLIP's tokenizer."""
    import transformers
    from transformers import AutoImageProcessor, CLIPTokenizer

    cfg = preset(size)
    if image_processor:
        folder = checkpoint_folder(
            image_processor,
            "image_processor",
            "openai/clip-vit-large-patch14's preprocessor_config.json",
        )
        images = AutoImageProcessor.from_pretrained(folder, backend=image_backend)
    elif image_backend in CLIP_IMAGE_PROCESSORS:
        # CLIP's image processor defaults are openai/clip-vit-large-patch14's settings (resize the
        # short side to 224 bicubic, crop 224, OpenAI mean/std); the tiny preset scales them down.
        side = cfg.image_size
        images = getattr(transformers, CLIP_IMAGE_PROCESSORS[image_backend])(
            size={"shortest_edge": side}, crop_size={"height": side, "width": side}
        )
    else:
        raise ValueError(f"encoder.image_backend {image_backend!r}: expected one of "
                         f"{sorted(CLIP_IMAGE_PROCESSORS)}")  # fmt: skip
    text_folder = tokenizer or checkpoint
    if text_folder and any((Path(text_folder) / n).is_file() for n in TOKENIZER_FILES):
        texts = CLIPTokenizer.from_pretrained(text_folder)
    elif tokenizer:
        raise FileNotFoundError(f"encoder.tokenizer {tokenizer}: expected a CLIPTokenizer folder "
                                f"(one of {list(TOKENIZER_FILES)})")  # fmt: skip
    else:
        texts = clip_bpe_tokenizer(cfg.context_length)
    # The tiny preset shares CLIP's 49408-token vocabulary, so one tokenizer serves both sizes.
    return clip_processor(images, texts, max_length, padding, False, cfg.context_length,
                          cfg.vocab_size, str(text_folder or "CLIP's BPE"))  # fmt: skip


class EvaClip18BEncoder(Encoder):
    """EVA-CLIP-18B: images (batch, 3, 224, 224) and CLIP token ids in, (batch, 1536) out."""

    @classmethod
    def build_processor(
        cls,
        checkpoint: str | None = None,
        size: str = "18B",
        backend: str = "native",
        image_processor: str | None = None,
        tokenizer: str | None = None,
        max_length: int = 42,
        padding: str | bool = "longest",
        image_backend: str = "pil",
        precision: str = "fp32",
        seed: int = 0,
    ) -> HFClipProcessor:
        """The processor of this encoder config, without building the model."""
        return build_processor(checkpoint, size, image_processor, tokenizer, max_length, padding,
                               image_backend)  # fmt: skip

    def __init__(
        self,
        dims: Mapping[str, int],
        checkpoint: str | None = None,
        size: str = "18B",
        backend: str = "native",
        image_processor: str | None = None,
        tokenizer: str | None = None,
        max_length: int = 42,
        padding: str | bool = "longest",
        image_backend: str = "pil",
        precision: str = "fp32",
        seed: int = 0,
        load_weights: bool = True,
    ) -> None:
        unknown = sorted(set(dims) - set(MODALITIES))
        if unknown:
            raise ValueError(f"EVA-CLIP embeds {MODALITIES}, not {unknown}")
        cfg = preset(size)  # refined by the folder's config.json below
        wrong = {m: d for m, d in dims.items() if d != cfg.embed_dim}
        if wrong:
            raise ValueError(f"EVA-CLIP {size} has embed_dim {cfg.embed_dim}, but the space says "
                             f"{wrong}")  # fmt: skip
        if backend not in BACKENDS:
            raise ValueError(f"encoder.backend {backend!r}: expected one of {list(BACKENDS)}")
        folder = checkpoint_folder(checkpoint, "checkpoint", EXPECTED) if checkpoint else None
        if folder:
            cfg = folder_config(folder, cfg, size)
        super().__init__(dims, build_processor(checkpoint, size, image_processor, tokenizer,
                                               max_length, padding, image_backend))  # fmt: skip
        self.folder = folder
        dtype = dtype_of(precision)
        if backend == "transformers":
            if not self.folder:
                raise ValueError("encoder.backend transformers loads encoder.checkpoint; set it")
            self.model = load_model(self.folder, dtype, True, load_weights)
        elif self.folder and load_weights:
            with torch.device("meta"):  # no memory until the checkpoint's tensors are assigned
                self.model = EvaClipModel(cfg)
            state, source = read_checkpoint(self.folder, dtype)
            check_state(module_shapes(self.model), state, source, self.folder, f"EVA-CLIP {size}")
            self.model.load_state_dict(state, strict=True, assign=True)
        else:
            with seeded(seed):
                self.model = EvaClipModel(cfg)
            # fp32 casts nothing: under ZeRO-3 the partitions keep the dtype DeepSpeed gave them.
            if dtype != torch.float32:
                self.model.to(dtype)
        self.freeze()

    def embed(self, modality: str, batch: Any) -> torch.Tensor:
        model = self.model
        if modality == "image":
            dtype = model.vision_model.embeddings.patch_embedding.weight.dtype
            return model.encode_image(batch.to(dtype))
        return model.encode_text(batch["input_ids"])

    def pretrained_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The checkpoint's tensors keyed as in this module, cast to its dtype (for ZeRO-3)."""
        if self.folder is None:
            return None
        dtype = next(self.model.parameters()).dtype
        state, source = read_checkpoint(self.folder, dtype)
        check_state(module_shapes(self.model), state, source, self.folder,
                    f"EVA-CLIP ({type(self.model).__name__})")  # fmt: skip
        return {f"model.{k}": v for k, v in state.items()}
