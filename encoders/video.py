"""Video through an image encoder: frames are embedded one by one and their embeddings averaged."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from encoders.base import Encoder


def frame_indices(total: int, frames: int) -> np.ndarray:
    """`frames` indices spread evenly over `total` frames (the centre of each equal segment)."""
    if total < 1:
        raise ValueError("a video with no frames")
    return np.minimum(((np.arange(frames) + 0.5) * total / frames).astype(np.int64), total - 1)


def encode_video(encoder: Encoder, frames: torch.Tensor) -> torch.Tensor:
    """frames (batch, time, 3, H, W) -> (batch, dim): the mean of the L2-normalised frame
    embeddings, L2-normalised again (mean pooling, as CLIP4Clip does)."""
    if frames.ndim != 5:
        raise ValueError(f"video frames must be (batch, time, 3, H, W), got {tuple(frames.shape)}")
    b, t = frames.shape[:2]
    emb = encoder({"image": frames.flatten(0, 1)})["image"]
    return F.normalize(emb.view(b, t, -1).mean(dim=1), dim=-1)
