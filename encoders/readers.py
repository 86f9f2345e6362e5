"""Readers: one raw file -> an array or image, the first step of every encoder's input path.

Each raises on anything unreadable (RawDataError names what is wrong; callers add the file).

image   load_image     any format Pillow decodes, as RGB
audio   load_audio     any format soundfile reads, mono, resampled (scipy) and fitted
point   load_points    .npy (n, 3 | 6) or .ply vertices (plyfile), normalised and sampled
video   load_frames    a frame folder, a (T, H, W, 3) .npy, or a video file (PyAV)
        load_audio_track   its audio: a sidecar audio file of the same stem, or a video file's
                           audio stream (PyAV); None when the clip has neither
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from encoders.video import frame_indices

EXTENSIONS = {
    "image": (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"),
    "audio": (".wav", ".flac", ".ogg", ".mp3", ".aiff", ".aif"),
    "point": (".npy", ".ply"),
}
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".npy")
DEFAULT_RGB = 0.4  # colour of uncoloured point clouds (Uni3D's convention)
FRAME_SIZE_POLICIES = ("resize", "raise")


class RawDataError(ValueError):
    """A raw item or list is unreadable or malformed; the message names the file."""


def load_image(path: str):
    """An RGB PIL image, fully decoded (a truncated file fails here, not later)."""
    from PIL import Image

    with Image.open(path) as img:
        img.load()
        return img.convert("RGB")


def fit_length(
    wave: np.ndarray, samples: int, clip: str = "start", pad: str = "repeat"
) -> np.ndarray:
    """Clip (from the start or the centre) or pad (by repeating or with zeros) to `samples`."""
    n = len(wave)
    if n > samples:
        start = 0 if clip == "start" else (n - samples) // 2
        return wave[start : start + samples]
    if n < samples:
        if pad == "repeat":  # laion_clap's "repeatpad": whole repeats, then zeros
            wave = np.tile(wave, samples // n)
        return np.pad(wave, (0, samples - len(wave)))
    return wave


def load_audio(
    path: str,
    sample_rate: int | None,
    clip_samples: int | None = None,
    clip: str = "start",
    pad: str = "repeat",
) -> np.ndarray:
    """A mono float32 waveform (samples,) at `sample_rate`, fitted to `clip_samples`."""
    import soundfile as sf
    from scipy.signal import resample_poly

    wave, rate = sf.read(path, dtype="float32", always_2d=True)
    wave = wave.mean(axis=1)
    if len(wave) == 0:
        raise RawDataError("no samples")
    if not np.isfinite(wave).all():
        raise RawDataError("samples are NaN or inf")
    if sample_rate and rate != sample_rate:
        g = math.gcd(int(rate), int(sample_rate))
        wave = resample_poly(wave, int(sample_rate) // g, int(rate) // g).astype(np.float32)
    if clip_samples:
        wave = fit_length(wave, int(clip_samples), clip, pad)
    return np.ascontiguousarray(wave, dtype=np.float32)


def read_ply(path: str) -> np.ndarray:
    """Vertices of a .ply (ascii or binary, via plyfile) as (n, 3) xyz or (n, 6) xyz + rgb."""
    from plyfile import PlyData, PlyParseError

    try:
        ply = PlyData.read(str(path))
    except (PlyParseError, ValueError, EOFError, IndexError) as e:
        raise RawDataError(f"not a readable PLY file ({type(e).__name__}: {e})") from e
    if "vertex" not in [el.name for el in ply.elements]:
        raise RawDataError("PLY file has no vertex element")
    vertex = ply["vertex"].data
    names = vertex.dtype.names or ()
    if not all(c in names for c in "xyz"):
        raise RawDataError(f"PLY vertices lack x, y or z (they have {list(names)})")
    xyz = np.stack([vertex[c].astype(np.float64) for c in "xyz"], 1)
    rgb_names = next((n for n in (("red", "green", "blue"), ("r", "g", "b"))
                      if all(c in names for c in n)), None)  # fmt: skip
    if rgb_names is None:
        return xyz
    return np.concatenate([xyz, np.stack([vertex[c].astype(np.float64) for c in rgb_names], 1)], 1)


def load_points(
    path: str, num_points: int | None = None, seed: int = 0, normalize: bool = True
) -> np.ndarray:
    """A point cloud (num_points, 6): xyz (centred, in the unit sphere) and rgb in [0, 1].

    .npy holds (n, 3) xyz or (n, 6) xyz + rgb (0..1 or 0..255); .ply vertices likewise. Points
    are drawn with a generator seeded by `seed`, without replacement when there are enough.
    """
    if path.lower().endswith(".ply"):
        pts = read_ply(path)
    else:
        pts = np.load(path, allow_pickle=False)
    pts = np.asarray(pts, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] not in (3, 6):
        raise RawDataError(f"point cloud has shape {pts.shape}, expected (n, 3) or (n, 6)")
    if len(pts) == 0:
        raise RawDataError("point cloud has no points")
    if not np.isfinite(pts).all():
        raise RawDataError("point cloud holds NaN or inf")
    xyz = pts[:, :3]
    if pts.shape[1] == 6:
        rgb = pts[:, 3:] / (255.0 if pts[:, 3:].max() > 1.0 else 1.0)
    else:
        rgb = np.full_like(xyz, DEFAULT_RGB)
    if normalize:
        xyz = xyz - xyz.mean(0)
        scale = np.linalg.norm(xyz, axis=1).max()
        if scale == 0:
            raise RawDataError("point cloud is a single point (cannot normalise its scale)")
        xyz = xyz / scale
    out = np.concatenate([xyz, rgb], 1).astype(np.float32)
    if num_points:
        rng = np.random.default_rng(seed)
        out = out[rng.choice(len(out), int(num_points), replace=len(out) < num_points)]
    return out


def _decode_video(path: Path) -> list:
    """Every frame of a video file as RGB PIL images (PyAV)."""
    try:
        import av
    except ImportError as e:  # pragma: no cover - av is a declared dependency
        raise RawDataError(f"decoding video files needs PyAV (pip install av): {e}") from e
    try:
        with av.open(str(path)) as container:
            return [frame.to_image().convert("RGB") for frame in container.decode(video=0)]
    except (av.FFmpegError, ValueError, IndexError) as e:
        raise RawDataError(f"undecodable video ({type(e).__name__}: {e})") from e


def load_frames(
    path: str, frames: int, stride: int | None = None, frame_size: str = "resize"
) -> list:
    """Up to `frames` RGB PIL frames of a video (frame folder, .npy or video file).

    Sampling: `stride` None spreads `frames` evenly over the video; an int takes every
    stride-th frame from the first, at most `frames` of them (fewer for a short video). A frame
    whose size differs from the first sampled frame's is resized to it (`frame_size: resize`)
    or refused with its index named (`raise`).
    """
    from PIL import Image

    if frame_size not in FRAME_SIZE_POLICIES:
        raise ValueError(f"frame_size is {frame_size!r}; expected one of {FRAME_SIZE_POLICIES}")
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix.lower() in EXTENSIONS["image"])
        if not files:
            raise RawDataError("frame folder holds no images")
        index = frame_indices(len(files), frames, stride)
        out = [load_image(str(files[i])) for i in index]
    elif p.suffix.lower() == ".npy":
        video = np.load(p, mmap_mode="r", allow_pickle=False)
        if video.ndim != 4 or video.shape[-1] != 3 or len(video) == 0:
            raise RawDataError(f"video array has shape {video.shape}, expected (T, H, W, 3)")
        index = frame_indices(len(video), frames, stride)
        out = [Image.fromarray(np.asarray(video[i], np.uint8)) for i in index]
    else:
        decoded = _decode_video(p)
        if not decoded:
            raise RawDataError("video has no frames")
        index = frame_indices(len(decoded), frames, stride)
        out = [decoded[i] for i in index]
    size = out[0].size
    for n, (i, frame) in enumerate(zip(index, out, strict=True)):
        if frame.size != size:
            if frame_size == "raise":
                raise RawDataError(
                    f"frame {int(i)} is {frame.size[0]}x{frame.size[1]}, but the video's first "
                    f"sampled frame is {size[0]}x{size[1]} (set data.load.frame_size=resize)"
                )
            out[n] = frame.resize(size)
    return out


def audio_sidecar(path: str) -> Path | None:
    """The audio file beside a video with its stem (`clip/` or `clip.npy` -> `clip.wav`), if any."""
    p = Path(path)
    stem = p.name if p.is_dir() else p.stem
    found = [p.parent / f"{stem}{ext}" for ext in EXTENSIONS["audio"]]
    found = [f for f in found if f.is_file()]
    if len(found) > 1:
        raise RawDataError(f"several audio tracks beside the video: {[f.name for f in found]}")
    return found[0] if found else None


def _decode_audio_stream(path: Path, sample_rate: int | None) -> np.ndarray | None:
    """A video file's first audio stream as a mono float32 waveform (PyAV), or None."""
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                return None
            stream = container.streams.audio[0]
            rate = int(sample_rate or stream.codec_context.sample_rate)
            resampler = av.AudioResampler(format="flt", layout="mono", rate=rate)
            chunks = [f.to_ndarray().reshape(-1) for frame in container.decode(stream)
                      for f in resampler.resample(frame)]  # fmt: skip
            chunks += [f.to_ndarray().reshape(-1) for f in resampler.resample(None)]
    except (av.FFmpegError, ValueError, IndexError) as e:
        raise RawDataError(f"undecodable audio stream ({type(e).__name__}: {e})") from e
    wave = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
    if len(wave) == 0:
        return None  # an audio stream without samples: no track
    if not np.isfinite(wave).all():
        raise RawDataError("audio track samples are NaN or inf")
    return wave.astype(np.float32)


def load_audio_track(
    path: str,
    sample_rate: int | None,
    clip_samples: int | None = None,
    clip: str = "start",
    pad: str = "repeat",
) -> np.ndarray | None:
    """A video's audio track as load_audio gives it, or None when it has none: a sidecar audio
    file of the same stem (frame folders, .npy clips and video files), else a video file's own
    audio stream (PyAV)."""
    sidecar = audio_sidecar(path)
    if sidecar is not None:
        return load_audio(str(sidecar), sample_rate, clip_samples, clip, pad)
    p = Path(path)
    if p.is_dir() or p.suffix.lower() == ".npy":
        return None
    wave = _decode_audio_stream(p, sample_rate)
    if wave is not None and clip_samples:
        wave = fit_length(wave, int(clip_samples), clip, pad)
    return wave


@dataclass
class LoadSettings:
    """How raw files become encoder inputs, beside what the processor says."""

    clip: str = "start"  # audio longer than the encoder's window: keep its start or its centre
    pad: str = "repeat"  # audio shorter: repeat it (laion_clap's default) or pad with zeros
    num_points: int | None = 10000
    normalize_points: bool = True
    frame_size: str = "resize"  # a video frame of another size: resize it, or raise
    frames: int = 8  # video frames per clip when a caller gives none (the extract stage does)
    stride: int | None = None  # video: every stride-th frame (None: `frames` spread evenly)
    seed: int = 0


def load_raw(
    modality: str, item: Any, processor: Any, settings: LoadSettings, index: int = 0
) -> Any:
    """One raw item -> what `processor.item` takes: a path is read, anything else is passed on.

    image: a path or a PIL image; audio: a path, or a mono waveform array at the processor's
    sample rate; point: a .npy/.ply path or an (n, 3 | 6) array (points are drawn with a seed
    derived from `settings.seed` and `index`); text: the caption.
    """
    s = settings
    path = isinstance(item, (str, Path))
    if modality == "text":
        return str(item)
    if modality == "image":
        return load_image(str(item)) if path else item
    if modality == "audio":
        if path:
            return load_audio(str(item), processor.sample_rate, processor.clip_samples, s.clip,
                              s.pad)  # fmt: skip
        wave = np.asarray(item, dtype=np.float32)
        if wave.ndim != 1:
            raise RawDataError(f"a waveform must be mono (samples,), got shape {wave.shape}")
        if processor.clip_samples:
            wave = fit_length(wave, int(processor.clip_samples), s.clip, s.pad)
        return wave
    if modality == "point":
        seed = s.seed * 1_000_003 + index
        if path:
            pts = load_points(str(item), s.num_points, seed=seed, normalize=s.normalize_points)
        else:
            pts = np.asarray(item, dtype=np.float32)
        return torch.from_numpy(pts)
    raise ValueError(f"no reader for modality {modality!r}")
