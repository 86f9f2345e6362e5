"""ImageBind-huge (facebookresearch/ImageBind) audio, image and text towers, in plain torch.

    encoder: {_target_: encoders.imagebind.ImageBindEncoder,
              checkpoint: /path/to/imagebind_huge.pth, size: huge, seed: 0}

The release's `imagebind` package needs torchaudio, pytorchvideo and decord, which do not install
beside our torch, so the model is written here with the release's state-dict names
(modality_{preprocessors,trunks,heads,postprocessors}.<vision|text|audio|...>.*), torch's
nn.MultiheadAttention and timm's Mlp. `size` is `huge` or a mapping that replaces dims of huge,
named as the release's ImageBindModel arguments (`vision_embed_dim`, `audio_num_blocks`, ...).
`checkpoint: null` means random weights drawn from `seed`.

imagebind_huge.pth is one flat state dict of all six modalities (vision, text, audio, depth,
thermal, imu). Only the towers of the space's modalities are built; every other key is checked
by name and shape against the same architecture built on the meta device, then dropped, so
that no key goes unchecked and depth, thermal and IMU (128M parameters, 0.5 GB) never take
memory. At full size the three built towers hold 1.07B parameters (4.3 GB in float32).

Preprocessing follows the release's imagebind/data.py:
- image: resize the short side to 224 (bicubic), centre crop 224, CLIP's mean and std;
- text: CLIP's BPE with 77 tokens. open_clip's SimpleTokenizer ships the same vocabulary file
  and truncates to the same 76 tokens plus end-of-text; they differ only on a caption that
  spells a special token out (the release's `<|endoftext|>`, open_clip's `<end_of_text>`);
- audio at 16 kHz: three 2 s clips spread evenly over the waveform (pytorchvideo's
  ConstantClipsPerVideoSampler), each a Kaldi log-mel filterbank (torchaudio.compliance.kaldi.fbank
  with 128 bins, 25 ms frames every 10 ms, a Hann window, no dither; written here in torch)
  cut or zero-padded to 204 frames and normalised with the release's mean -4.268 and std 9.138.
  The audio embedding is the mean of the clips' unit embeddings, as the release's forward does.
  A file read here is mixed down to mono and resampled with scipy (encoders/readers.py); the
  release reads the first channel and resamples with torchaudio.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import zipfile
from collections.abc import Mapping, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from encoders.base import Encoder, Processor, param_dtype, seeded
from encoders.readers import RawDataError

MODALITIES = ("audio", "image", "text")
RELEASE_NAME = {"audio": "audio", "image": "vision", "text": "text"}  # ours -> the release's
RELEASE_MODALITIES = ("vision", "text", "audio", "depth", "thermal", "imu")  # checkpoint order
GROUPS = ("modality_preprocessors", "modality_trunks", "modality_heads", "modality_postprocessors")

IMAGE_SIZE = 224
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CONTEXT, VOCAB = 77, 49408

SAMPLE_RATE = 16000
CLIP_SECONDS, CLIPS = 2, 3
MEL_BINS, TARGET_FRAMES = 128, 204
AUDIO_MEAN, AUDIO_STD = -4.268, 9.138
FRAME, SHIFT, N_FFT = 400, 160, 512  # 25 ms frames every 10 ms at 16 kHz, FFT to a power of 2
PREEMPHASIS, LOW_HZ = 0.97, 20.0  # Kaldi's defaults, which the release keeps

# Input shapes after the processor, per item.
INPUT_SHAPES = {"image": (3, IMAGE_SIZE, IMAGE_SIZE), "audio": (CLIPS, 1, MEL_BINS, TARGET_FRAMES),
                "text": (CONTEXT,)}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class ImageBindSize:
    """Tower dims, named as the release's ImageBindModel arguments; the defaults are huge's."""

    out_embed_dim: int = 1024
    vision_embed_dim: int = 1280
    vision_num_blocks: int = 32
    vision_num_heads: int = 16
    text_embed_dim: int = 1024
    text_num_blocks: int = 24
    text_num_heads: int = 16
    audio_embed_dim: int = 768
    audio_num_blocks: int = 12
    audio_num_heads: int = 12
    depth_embed_dim: int = 384
    depth_num_blocks: int = 12
    depth_num_heads: int = 8
    thermal_embed_dim: int = 768
    thermal_num_blocks: int = 12
    thermal_num_heads: int = 12
    imu_embed_dim: int = 512
    imu_num_blocks: int = 6
    imu_num_heads: int = 8

    def tower(self, modality: str) -> tuple[int, int, int]:
        """(width, blocks, heads) of one release modality's trunk."""
        return tuple(getattr(self, f"{modality}_{k}") for k in ("embed_dim", "num_blocks",
                                                                 "num_heads"))  # fmt: skip


def resolve_size(size: str | Mapping[str, int]) -> ImageBindSize:
    """`huge`, or a mapping of ImageBindSize fields that replace huge's."""
    if isinstance(size, str):
        if size != "huge":
            raise ValueError(f"encoder.size is {size!r}; expected 'huge' or a mapping of dims")
        return ImageBindSize()
    fields = [f.name for f in dataclasses.fields(ImageBindSize)]
    unknown = sorted(set(size) - set(fields))
    if unknown:
        raise ValueError(f"encoder.size: unknown dims {unknown}; expected some of {fields}")
    out = ImageBindSize(**{k: int(v) for k, v in size.items()})
    for m in RELEASE_MODALITIES:
        width, _, heads = out.tower(m)
        if width % heads:
            raise ValueError(f"encoder.size: {m}_embed_dim {width} is not a multiple of "
                             f"{m}_num_heads {heads}")  # fmt: skip
    return out


# ---- audio: the release's clips and Kaldi filterbank ----


def mel_banks() -> torch.Tensor:
    """Kaldi's triangular mel filters (MEL_BINS, N_FFT // 2 + 1) on the HTK mel scale
    1127 ln(1 + f / 700), from 20 Hz to Nyquist; the Nyquist FFT bin gets no weight."""

    def mel(f: float) -> float:
        return 1127.0 * math.log(1.0 + f / 700.0)

    low, high = mel(LOW_HZ), mel(SAMPLE_RATE / 2)
    delta = (high - low) / (MEL_BINS + 1)
    index = torch.arange(MEL_BINS, dtype=torch.float32).unsqueeze(1)
    left, centre, right = (low + (index + k) * delta for k in (0.0, 1.0, 2.0))
    freqs = (SAMPLE_RATE / N_FFT) * torch.arange(N_FFT // 2, dtype=torch.float32)
    fft_mel = 1127.0 * (1.0 + freqs / 700.0).log()
    up = (fft_mel - left) / (centre - left)
    down = (right - fft_mel) / (right - centre)
    return F.pad(torch.minimum(up, down).clamp_min(0.0), (0, 1))


def kaldi_fbank(wave: torch.Tensor, banks: torch.Tensor) -> torch.Tensor:
    """Log mel energies (frames, MEL_BINS) of a 16 kHz waveform (samples,), as
    torchaudio.compliance.kaldi.fbank with the release's arguments: each 25 ms frame loses its
    mean, is pre-emphasised (0.97), Hann-windowed and zero-padded to 512 for the power spectrum."""
    frames = wave.unfold(0, FRAME, SHIFT)  # only whole frames (Kaldi's snip_edges)
    frames = frames - frames.mean(dim=1, keepdim=True)
    previous = torch.cat([frames[:, :1], frames[:, :-1]], dim=1)
    window = torch.hann_window(FRAME, periodic=False, dtype=wave.dtype)
    power = torch.fft.rfft((frames - PREEMPHASIS * previous) * window, n=N_FFT).abs().pow(2.0)
    return (power @ banks.T).clamp_min(torch.finfo(torch.float32).eps).log()


def clip_bounds(samples: int) -> list[tuple[int, int]]:
    """Sample ranges of the release's 3 clips of 2 s: starts spread evenly from 0 to the last
    full clip (pytorchvideo's ConstantClipsPerVideoSampler, in its exact fractions)."""
    last_start = Fraction(max(samples / SAMPLE_RATE - CLIP_SECONDS, 0))
    step = last_start / (CLIPS - 1)
    return [(int(step * i * SAMPLE_RATE), int((step * i + CLIP_SECONDS) * SAMPLE_RATE))
            for i in range(CLIPS)]  # fmt: skip


def audio_clips(wave: np.ndarray | torch.Tensor, banks: torch.Tensor) -> torch.Tensor:
    """A mono 16 kHz waveform -> the release's normalised clips (3, 1, 128, 204)."""
    w = torch.as_tensor(np.asarray(wave, dtype=np.float32)).clone()
    if w.ndim != 1:
        raise RawDataError(f"a waveform must be mono (samples,), got shape {tuple(w.shape)}")
    if len(w) < FRAME:
        raise RawDataError(f"audio has {len(w)} samples at 16 kHz; ImageBind needs at least "
                           f"{FRAME} (one 25 ms frame)")  # fmt: skip
    if not torch.isfinite(w).all():
        raise RawDataError("samples are NaN or inf")
    clips = []
    for start, end in clip_bounds(len(w)):
        clip = w[start:end]
        # In place, as the release does on a view of the waveform: a clip overlapping an
        # earlier one sees that clip's mean already removed.
        clip -= clip.mean()
        fbank = kaldi_fbank(clip, banks).T
        gap = TARGET_FRAMES - fbank.shape[1]
        clips.append(F.pad(fbank, (0, gap)) if gap > 0 else fbank[:, :TARGET_FRAMES])
    mean, std = torch.tensor(AUDIO_MEAN), torch.tensor(AUDIO_STD)
    return (torch.stack(clips).unsqueeze(1) - mean) / std


# ---- the model, keyed as the release's ImageBindModel ----


class _PatchStem(nn.Module):
    """Patches (batch, tokens, width) from a conv, then maybe a LayerNorm (PatchEmbedGeneric)."""

    def __init__(self, proj: nn.Module, norm: nn.Module | None = None) -> None:
        super().__init__()
        self.proj = proj
        self.norm_layer = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x).flatten(2).transpose(1, 2)
        return x if self.norm_layer is None else self.norm_layer(x)


class _TwoFrames(nn.Module):
    """An image (batch, 3, H, W) as a clip of two equal frames, for the vision tower's 3D conv."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.unsqueeze(2).repeat(1, 1, 2, 1, 1)


class _Positions(nn.Module):
    """Holds the learned position embedding (SpatioTemporalPosEmbeddingHelper's key)."""

    def __init__(self, tokens: int, width: int) -> None:
        super().__init__()
        self.pos_embed = nn.Parameter(torch.randn(1, tokens, width) * 0.02)


class PatchPreprocessor(nn.Module):
    """Patch tokens with a CLS token in front and learned positions (RGBDTPreprocessor)."""

    def __init__(self, stem_name: str, stem: _PatchStem, patches: int, width: int) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.randn(1, 1, width) * 0.02)
        self.stem_name = stem_name
        self.add_module(stem_name, stem)
        self.pos_embedding_helper = _Positions(patches + 1, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = getattr(self, self.stem_name)(x)
        tokens = torch.cat([self.cls_token.expand(len(tokens), -1, -1), tokens], dim=1)
        return tokens + self.pos_embedding_helper.pos_embed


class TextPreprocessor(nn.Module):
    """Token plus position embeddings, and the causal mask the text trunk attends with."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(VOCAB, width)
        self.pos_embed = nn.Parameter(torch.randn(1, CONTEXT, width) * 0.01)
        self.register_buffer("mask", torch.full((CONTEXT, CONTEXT), float("-inf")).triu(1))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.token_embedding(tokens) + self.pos_embed


class _ImuKeys(nn.Module):
    """The release's IMU preprocessor's tensors, built only to check a checkpoint's IMU keys."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.pos_embed = nn.Parameter(torch.zeros(1, 2000 // 8 + 1, width))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.imu_stem = _PatchStem(nn.Linear(48, width, bias=False), nn.LayerNorm(width))


class Block(nn.Module):
    """A pre-norm transformer block on (tokens, batch, width) (the release's BlockWithMasking)."""

    def __init__(self, width: int, heads: int, bias_kv: bool) -> None:
        from timm.layers import Mlp

        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads, bias=True, add_bias_kv=bias_kv)
        self.norm_1 = nn.LayerNorm(width, eps=1e-6)
        self.mlp = Mlp(width, 4 * width, act_layer=nn.GELU)
        self.norm_2 = nn.LayerNorm(width, eps=1e-6)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        h = self.norm_1(x)
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=mask)[0]
        return x + self.mlp(self.norm_2(x))


class Trunk(nn.Module):
    """A stack of blocks on (batch, tokens, width), with an optional LayerNorm first."""

    def __init__(self, width: int, blocks: int, heads: int, first_norm: bool, bias_kv: bool):
        super().__init__()
        first = nn.LayerNorm(width, eps=1e-6) if first_norm else nn.Identity()
        self.pre_transformer_layer = nn.Sequential(first)
        self.blocks = nn.Sequential(*(Block(width, heads, bias_kv) for _ in range(blocks)))

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.pre_transformer_layer(tokens).transpose(0, 1)  # the release's sequence-first
        for block in self.blocks:
            x = block(x, mask)
        return x.transpose(0, 1)


class _ClsToken(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 0]


class TextHead(nn.Module):
    """The end-of-text token's features (the highest id in each row), projected."""

    def __init__(self, width: int, out: int) -> None:
        super().__init__()
        self.proj = nn.Sequential(nn.LayerNorm(width, eps=1e-6), nn.Linear(width, out, bias=False))

    def forward(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return self.proj(x[torch.arange(len(x), device=x.device), tokens.argmax(dim=-1)])


class _Normalize(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=-1)


class LogitScale(nn.Module):
    """Multiplies by exp(log_logit_scale), at most 100 (the release's LearnableLogitScaling)."""

    def __init__(self, init: float, learnable: bool) -> None:
        super().__init__()
        value = torch.ones([]) * math.log(init)
        if learnable:
            self.log_logit_scale = nn.Parameter(value)
        else:
            self.register_buffer("log_logit_scale", value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.log_logit_scale.exp().clamp(max=100.0) * x


def _preprocessor(m: str, size: ImageBindSize) -> nn.Module:
    width = size.tower(m)[0]
    if m == "vision":
        conv = nn.Conv3d(3, width, kernel_size=(2, 14, 14), stride=(2, 14, 14), bias=False)
        stem = _PatchStem(nn.Sequential(_TwoFrames(), conv))
        return PatchPreprocessor("rgbt_stem", stem, (IMAGE_SIZE // 14) ** 2, width)
    if m == "text":
        return TextPreprocessor(width)
    if m == "imu":
        return _ImuKeys(width)
    if m == "audio":  # 16x16 patches every 10 bins/frames over (128 mels, 204 frames)
        conv = nn.Conv2d(1, width, kernel_size=16, stride=10, bias=False)
        patches = ((MEL_BINS - 16) // 10 + 1) * ((TARGET_FRAMES - 16) // 10 + 1)
    else:  # depth, thermal: 16x16 patches of a 224x224 one-channel image
        conv = nn.Conv2d(1, width, kernel_size=16, stride=16, bias=False)
        patches = (IMAGE_SIZE // 16) ** 2
    stem = _PatchStem(conv, nn.LayerNorm(width))
    return PatchPreprocessor("depth_stem" if m == "depth" else "rgbt_stem", stem, patches, width)


def _head(m: str, size: ImageBindSize) -> nn.Module:
    width, out = size.tower(m)[0], size.out_embed_dim
    if m == "text":
        return TextHead(width, out)
    layers = [nn.LayerNorm(width, eps=1e-6), _ClsToken()]
    if m == "imu":
        layers.append(nn.Dropout(0.5))
    return nn.Sequential(*layers, nn.Linear(width, out, bias=False))


def _postprocessor(m: str) -> nn.Module:
    if m == "vision":
        return _Normalize()
    scale = {"text": 1 / 0.07, "audio": 20.0, "depth": 5.0, "thermal": 10.0, "imu": 5.0}[m]
    return nn.Sequential(_Normalize(), LogitScale(scale, learnable=m == "text"))


class ImageBindModel(nn.Module):
    """The release's ImageBindModel for some of its modalities, with its state-dict keys."""

    def __init__(self, size: ImageBindSize, modalities: Sequence[str]) -> None:
        super().__init__()
        built = [m for m in RELEASE_MODALITIES if m in modalities]
        self.modality_preprocessors = nn.ModuleDict({m: _preprocessor(m, size) for m in built})
        self.modality_trunks = nn.ModuleDict({
            m: Trunk(*size.tower(m), first_norm=m == "vision", bias_kv=m not in ("vision", "text"))
            for m in built
        })  # fmt: skip
        self.modality_heads = nn.ModuleDict({m: _head(m, size) for m in built})
        self.modality_postprocessors = nn.ModuleDict({m: _postprocessor(m) for m in built})

    def forward(self, modality: str, x: torch.Tensor) -> torch.Tensor:
        """(batch, ...) inputs of a release modality -> its (batch, out_embed_dim) output; inputs
        of several clips (batch, clips, ...) give the mean of the clips' outputs."""
        clips = x.shape[1] if x.ndim >= 5 else None
        if clips:
            x = x.flatten(0, 1)
        pre = self.modality_preprocessors[modality]
        if modality == "text":
            h = self.modality_trunks[modality](pre(x), pre.mask)
            h = self.modality_heads[modality](h, x)
        else:
            h = self.modality_heads[modality](self.modality_trunks[modality](pre(x)))
        out = self.modality_postprocessors[modality](h)
        return out.unflatten(0, (-1, clips)).mean(dim=1) if clips else out


def expected_keys(size: ImageBindSize) -> dict[str, tuple[int, ...]]:
    """Every key of the release's six-modality checkpoint at `size`, with its shape."""
    with torch.device("meta"):
        model = ImageBindModel(size, RELEASE_MODALITIES)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def load_imagebind_checkpoint(
    path: str | Path, size: ImageBindSize, modalities: Sequence[str]
) -> dict[str, torch.Tensor]:
    """The tensors of the release `modalities` in an ImageBind checkpoint (a flat state dict),
    after every key of all six modalities is checked by name and shape against `size`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"encoder.checkpoint {path}: no such file (the release's "
                                "imagebind_huge.pth)")  # fmt: skip
    try:
        state = torch.load(path, map_location="cpu", weights_only=True,
                           mmap=zipfile.is_zipfile(path))  # fmt: skip
    except Exception as e:
        raise ValueError(f"{path}: not a loadable ImageBind checkpoint ({e})") from e
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor)
                                                 for v in state.values()):  # fmt: skip
        raise ValueError(f"{path}: expected the release's flat state dict of tensors")
    expected = expected_keys(size)
    for key, shape in expected.items():
        if key not in state:
            raise ValueError(f"{path}: missing key {key!r} (shape {shape}) of ImageBind at "
                             "encoder.size")  # fmt: skip
        if tuple(state[key].shape) != shape:
            raise ValueError(f"{path}: key {key!r} has shape {tuple(state[key].shape)}, but "
                             f"ImageBind at encoder.size expects {shape}")  # fmt: skip
    extra = [k for k in state if k not in expected]
    if extra:
        raise ValueError(f"{path}: unexpected key {extra[0]!r} ({len(extra)} keys that "
                         "ImageBind at encoder.size does not have)")  # fmt: skip
    keep = tuple(f"{g}.{m}." for g in GROUPS for m in modalities)
    return {k: v.float() if v.is_floating_point() else v
            for k, v in state.items() if k.startswith(keep)}  # fmt: skip


# ---- the processor and the encoder ----


class ImageBindProcessor(Processor):
    """Images -> (3, 224, 224); waveforms at 16 kHz -> (3, 1, 128, 204) clips; captions ->
    (batch, 77) CLIP tokens (in `batch`)."""

    sample_rate = SAMPLE_RATE
    clip_samples = None  # the clips are spread over the whole waveform

    def __init__(self) -> None:
        from open_clip.tokenizer import SimpleTokenizer
        from torchvision import transforms

        self.tokenizer = SimpleTokenizer(context_length=CONTEXT)
        self.transform = transforms.Compose([
            transforms.Resize(IMAGE_SIZE, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(IMAGE_SIZE),
            transforms.ToTensor(),
            transforms.Normalize(mean=CLIP_MEAN, std=CLIP_STD),
        ])  # fmt: skip
        self.banks = mel_banks()

    def item(self, modality: str, raw: Any) -> Any:
        if modality == "image":
            from PIL import Image

            if not isinstance(raw, Image.Image):
                raise RawDataError(f"ImageBind takes PIL images or image paths, got "
                                   f"{type(raw).__name__}")  # fmt: skip
            return self.transform(raw.convert("RGB"))
        if modality == "audio":
            return audio_clips(raw, self.banks)
        return raw

    def batch(self, modality: str, items: Sequence[Any]) -> Any:
        if modality == "text":
            return self.tokenizer([str(t) for t in items])
        return torch.stack(list(items))


class ImageBindEncoder(Encoder):
    """ImageBind's audio, image and text towers: unit embeddings in one shared space."""

    @classmethod
    def build_processor(
        cls, checkpoint: str | None = None, size: str | Mapping = "huge", seed: int = 0
    ) -> ImageBindProcessor:
        """The processor of this encoder config, without building the model."""
        return ImageBindProcessor()

    def __init__(
        self,
        dims: Mapping[str, int],
        checkpoint: str | None = None,
        size: str | Mapping[str, int] = "huge",
        seed: int = 0,
        load_weights: bool = True,
    ) -> None:
        unknown = sorted(set(dims) - set(MODALITIES))
        if unknown:
            raise ValueError(f"ImageBind encoder embeds {MODALITIES}, not {unknown}")
        self.size = resolve_size(size)
        wrong = {m: d for m, d in dims.items() if int(d) != self.size.out_embed_dim}
        if wrong:
            raise ValueError(f"ImageBind embeds to out_embed_dim {self.size.out_embed_dim}, but "
                             f"the space's dims say {wrong}")  # fmt: skip
        super().__init__(dims, ImageBindProcessor())
        self.checkpoint = checkpoint
        self.release_modalities = [RELEASE_NAME[m] for m in MODALITIES if m in dims]
        state = None
        if checkpoint and load_weights:
            state = load_imagebind_checkpoint(checkpoint, self.size, self.release_modalities)
        # With a checkpoint the weights are its tensors: build on meta, skip the random init.
        where = torch.device("meta") if state is not None else contextlib.nullcontext()
        with seeded(seed), where:
            self.model = ImageBindModel(self.size, self.release_modalities)
        if state is not None:
            self.model.load_state_dict(state, strict=True, assign=True)
        self.freeze()

    def embed(self, modality: str, batch: Any) -> torch.Tensor:
        expected = INPUT_SHAPES[modality]
        if not isinstance(batch, torch.Tensor) or tuple(batch.shape[1:]) != expected:
            got = tuple(batch.shape) if isinstance(batch, torch.Tensor) else type(batch).__name__
            raise ValueError(f"ImageBind {modality} batches are (batch, *{expected}), got {got}; "
                             "prepare them with ImageBindProcessor")  # fmt: skip
        if batch.is_floating_point():
            batch = batch.to(param_dtype(self.model))
        # Through forward(), which ZeRO-3 hooks (it gathers a module's parameters as it runs).
        return self.model(RELEASE_NAME[modality], batch)

    def pretrained_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The checkpoint's weights keyed as in this module (for ZeRO-3 loading)."""
        if not self.checkpoint:
            return None
        state = load_imagebind_checkpoint(self.checkpoint, self.size, self.release_modalities)
        return {f"model.{k}": v for k, v in state.items()}
