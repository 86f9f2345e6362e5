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
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from encoders.modalities import check_modality


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

    @torch.inference_mode()
    def encode(self, raw: Mapping[str, Sequence[Any]]) -> dict[str, torch.Tensor]:
        """Raw items (PIL images, waveforms, strings) -> unit embeddings, on the model's device."""
        inputs = {}
        for modality, items in raw.items():
            prepared = [self.processor.item(modality, x) for x in items]
            inputs[modality] = to_device(self.processor.batch(modality, prepared), self.device)
        return self(inputs)

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
