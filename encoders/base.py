"""The interface every frozen encoder shares: {modality: batch} in, {modality: unit embeddings} out.

An encoder is split in two so that DataLoader workers never hold model weights:
- a `Processor` prepares inputs: `item()` runs per item in the workers (resize and normalise
  an image, quantise a waveform), `batch()` turns prepared items into one model batch (stack,
  tokenise);
- the `Encoder` (an nn.Module) maps prepared batches to (batch, dim) embeddings, L2-normalised in
  float32 by `forward`, whatever precision the model runs in.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from encoders.modalities import check_modality
from encoders.readers import LoadSettings, load_frames, load_raw
from encoders.video import encode_video, pad_frames


class Processor:
    """Input preparation of one encoder, without its weights.

    Audio reaches `item` as a mono float32 waveform at `sample_rate`, clipped or padded to
    `clip_samples` (None: any length); images as RGB PIL images; texts as strings.
    """

    sample_rate: int | None = None
    clip_samples: int | None = None

    def item(self, modality: str, raw: Any) -> Any:
        """Prepare one raw item (runs in DataLoader workers)."""
        return raw

    def batch(self, modality: str, items: Sequence[Any]) -> Any:
        """Prepared items -> the encoder's batch for `modality`."""
        if modality == "text":
            return list(items)
        return torch.stack([torch.as_tensor(x) for x in items])


class Encoder(nn.Module):
    """A frozen encoder of one space; `dims` maps each modality it embeds to its output dim."""

    precomputed = False  # True: items are keys into dumps, nothing is read from raw files

    @classmethod
    def build_processor(cls, **kwargs: Any) -> Processor:
        """The processor of an encoder config (the constructor's keyword arguments)."""
        return Processor()

    def __init__(self, dims: Mapping[str, int], processor: Processor) -> None:
        super().__init__()
        self.dims = {check_modality(m, type(self).__name__): int(d) for m, d in dims.items()}
        self.processor = processor

    def embed(self, modality: str, batch: Any) -> torch.Tensor:
        """(batch, dim) embeddings of one prepared batch, not yet normalised."""
        raise NotImplementedError

    def forward(self, inputs: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """{modality: prepared batch} -> {modality: (batch, dim) float32, L2-normalised}."""
        out = {}
        for modality, batch in inputs.items():
            if modality not in self.dims:
                name, dims = type(self).__name__, sorted(self.dims)
                raise ValueError(f"{name} does not embed {modality!r}; it embeds {dims}")
            emb = self.embed(modality, batch).float()
            if emb.ndim != 2 or emb.shape[1] != self.dims[modality]:
                raise ValueError(
                    f"{type(self).__name__}: {modality} embeddings have shape {tuple(emb.shape)}, "
                    f"expected (batch, {self.dims[modality]}) as the space config says"
                )
            out[modality] = F.normalize(emb, dim=-1)
        return out

    def embed_video(
        self,
        frames: torch.Tensor,
        mask: torch.Tensor | None = None,
        audio: Any = None,
        has_audio: torch.Tensor | None = None,
        audio_weight: float | None = None,
    ) -> torch.Tensor:
        """Video clips (batch, time, 3, H, W) -> (batch, dim) through the image side (see
        encoders/video.py): frame embeddings averaged, then re-normalised; with `audio_weight`,
        the audio batch of the clips `has_audio` marks joins them."""
        return encode_video(self, frames, mask, audio, has_audio, audio_weight)

    @torch.inference_mode()
    def encode(
        self, raw: Mapping[str, Sequence[Any]], settings: LoadSettings | None = None
    ) -> dict[str, torch.Tensor]:
        """{modality: raw items} -> {modality: (n, dim) unit embeddings} on the model's device.

        Items: image paths or PIL images; audio paths (any rate) or mono waveforms at the
        processor's rate; captions; .ply/.npy point paths or arrays; `video`: frame folders,
        (T, H, W, 3) .npy clips, video files or lists of PIL frames, through the image side.
        A precomputed encoder takes item keys. `settings` says how files are read.
        """
        s = settings or LoadSettings()
        out = {}
        for modality, items in raw.items():
            if modality == "video":
                clips = []
                for x in items:
                    frames = x if isinstance(x, (list, tuple)) else load_frames(
                        str(x), s.frames, s.stride, s.frame_size)  # fmt: skip
                    clips.append(torch.stack([self.processor.item("image", f) for f in frames]))
                batch, mask = pad_frames(clips)
                out[modality] = self.embed_video(to_device(batch, self.device), mask)
                continue
            if self.precomputed:
                prepared = [self.processor.item(modality, x) for x in items]
            else:
                p = self.processor
                prepared = [p.item(modality, load_raw(modality, x, p, s, i))
                            for i, x in enumerate(items)]  # fmt: skip
            batch = to_device(self.processor.batch(modality, prepared), self.device)
            out[modality] = self({modality: batch})[modality]
        return out

    @property
    def device(self) -> torch.device:
        return next(iter(self.parameters()), torch.zeros(0)).device

    def freeze(self) -> Encoder:
        """Eval mode and no gradients: encoders are never trained here."""
        self.requires_grad_(False)
        return self.eval()


def to_device(batch: Any, device: torch.device) -> Any:
    """Move tensors (or dicts of tensors) to `device`; lists of strings stay where they are."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


def param_dtype(module: nn.Module) -> torch.dtype:
    """The dtype floating inputs must have to match the module's weights."""
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)


@contextlib.contextmanager
def seeded(seed: int | None) -> Iterator[None]:
    """Seed torch for a random-weight build without touching the caller's RNG state."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        yield


def write_folder_once(directory: str | Path, write: Callable[[Path], None]) -> Path:
    """`directory`, filled by write(folder) in a temporary sibling renamed into place unless it
    already holds a config.json: a crash leaves no half folder, and concurrent writers agree."""
    directory = Path(directory)
    if (directory / "config.json").exists():
        return directory
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}."))
    try:
        write(tmp)
        try:
            tmp.rename(directory)
        except OSError:  # another process wrote it first
            if not (directory / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory
