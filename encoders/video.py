"""Video through an image encoder: frames are sampled, embedded one by one, and averaged.

A video is a set of frames embedded by a space's image encoder; the clip's embedding is the mean
of the L2-normalised frame embeddings, L2-normalised again (as the paper and CLIP4Clip do).

Audio track (`video: {audio_track: true, audio_weight: w}` in a space config; off by default): in
a space that also embeds audio (ImageBind), the clip's audio track joins the frames,
    v = normalize((1 - w) * normalize(mean_t f_t) + w * a),   a: the unit audio embedding,
so w = 0.5 is the mean of the two unit vectors, re-normalised. A clip without an audio track keeps
its frames-only embedding. Off by default: on the world, raw ImageBind's text<->video R@1 drops by
about 6 points at w = 0.5 and does not move at w = 0.25 (bench/video_audio.py, bench/RESULTS.md).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

AUDIO_WEIGHT = 0.5  # video.audio_weight when a space config leaves it out


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


def audio_track_weight(name: str, space: Mapping[str, Any]) -> float | None:
    """The weight `w` of the audio track in a space's video embeddings, or None when the space's
    `video.audio_track` is off (or absent); refuses the option in a space without an audio side."""
    video = space.get("video") or {}
    if not video.get("audio_track"):
        return None
    dims = sorted(space["dims"])
    if "audio" not in dims or "image" not in dims:
        raise ValueError(
            f"space {name!r}: video.audio_track=true joins the clip's audio embedding to its "
            f"frames, which needs a space that embeds audio and image; {name!r} embeds {dims} "
            f"(set video.audio_track=false in conf/space/{name}.yaml)"
        )
    w = float(video.get("audio_weight", AUDIO_WEIGHT))
    if not 0 < w <= 1:
        raise ValueError(f"space {name!r}: video.audio_weight is {w}; expected 0 < w <= 1")
    return w


def join_audio(video: torch.Tensor, audio: torch.Tensor, weight: float) -> torch.Tensor:
    """Unit video (n, dim) and audio-track (n, dim) embeddings -> normalize((1 - w) v + w a)."""
    return F.normalize((1 - weight) * video + weight * audio, dim=-1)


def encode_video(
    encoder,
    frames: torch.Tensor,
    mask: torch.Tensor | None = None,
    audio: Any = None,
    has_audio: torch.Tensor | None = None,
    audio_weight: float | None = None,
) -> torch.Tensor:
    """frames (batch, time, 3, H, W) -> (batch, dim): the mean of the L2-normalised frame
    embeddings of `encoder`'s image side, L2-normalised again. `mask` (batch, time) marks real
    frames of zero-padded shorter clips; padded frames are not embedded.

    With `audio_weight`, `audio` is the encoder's audio batch of the clips that have a track,
    `has_audio` (batch,) marks them, and their audio embeddings join (`join_audio`)."""
    if frames.ndim != 5:
        raise ValueError(f"video frames must be (batch, time, 3, H, W), got {tuple(frames.shape)}")
    b, t = frames.shape[:2]
    if mask is None:
        emb = encoder({"image": frames.flatten(0, 1)})["image"]
        out = F.normalize(emb.view(b, t, -1).mean(dim=1), dim=-1)
    else:
        mask = mask.to(frames.device)
        real = encoder({"image": frames[mask]})["image"]  # (real frames, dim)
        owner = torch.arange(b, device=frames.device).repeat_interleave(mask.sum(1))
        sums = real.new_zeros(b, real.shape[1]).index_add_(0, owner, real)
        out = F.normalize(sums / mask.sum(1, keepdim=True).clamp_min(1), dim=-1)
    if audio_weight is None or audio is None or has_audio is None or not has_audio.any():
        return out
    rows = has_audio.to(out.device).nonzero().squeeze(1)
    out[rows] = join_audio(out[rows], encoder({"audio": audio})["audio"], audio_weight)
    return out
