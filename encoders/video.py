"""Video through an image encoder: frames are sampled, embedded one by one, and averaged.

A video is a set of frames embedded by a space's image encoder; the clip's embedding is the mean
of the L2-normalised frame embeddings, L2-normalised again (as the paper and CLIP4Clip do).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F


def frame_indices(total: int, frames: int, stride: int | None = None) -> np.ndarray:
    """Which of `total` frames to embed: `frames` spread evenly (the centre of each equal
    segment), or with a `stride` every stride-th frame from the first, at most `frames`."""
    if total < 1:
        raise ValueError("a video with no frames")
    if frames < 1:
        raise ValueError(f"frames is {frames}; expected at least 1")
    if stride:
        if stride < 1:
            raise ValueError(f"stride is {stride}; expected at least 1")
        return np.arange(0, total, int(stride), dtype=np.int64)[:frames]
    return np.minimum(((np.arange(frames) + 0.5) * total / frames).astype(np.int64), total - 1)


def pad_frames(clips: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Clips (t_i, 3, H, W) -> (batch, max t, 3, H, W) zero-padded, and a (batch, max t) mask."""
    t = max(len(c) for c in clips)
    out = clips[0].new_zeros((len(clips), t, *clips[0].shape[1:]))
    mask = torch.zeros(len(clips), t, dtype=torch.bool)
    for i, c in enumerate(clips):
        out[i, : len(c)] = c
        mask[i, : len(c)] = True
    return out, mask


def encode_video(encoder, frames: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """frames (batch, time, 3, H, W) -> (batch, dim): the mean of the L2-normalised frame
    embeddings of `encoder`'s image side, L2-normalised again. `mask` (batch, time) marks real
    frames of zero-padded shorter clips; padded frames are not embedded."""
    if frames.ndim != 5:
        raise ValueError(f"video frames must be (batch, time, 3, H, W), got {tuple(frames.shape)}")
    b, t = frames.shape[:2]
    if mask is None:
        emb = encoder({"image": frames.flatten(0, 1)})["image"]
        return F.normalize(emb.view(b, t, -1).mean(dim=1), dim=-1)
    mask = mask.to(frames.device)
    real = encoder({"image": frames[mask]})["image"]  # (real frames, dim)
    owner = torch.arange(b, device=frames.device).repeat_interleave(mask.sum(1))
    sums = real.new_zeros(b, real.shape[1]).index_add_(0, owner, real)
    return F.normalize(sums / mask.sum(1, keepdim=True).clamp_min(1), dim=-1)
