"""Readers: one raw file -> an array or image, the first step of every encoder's input path.

Each raises on anything unreadable (RawDataError names what is wrong; callers add the file).

image   load_image     any format Pillow decodes, as RGB
audio   load_audio     any format soundfile reads, mono, resampled (scipy) and fitted
point   load_points    .ply vertices (plyfile), a .npy array (n, 3 | 6) or the release's .npy
                       dict ('xyz', 'rgb'; unpickled numpy-only), .npz 'xyz' + 'rgb' or one
                       array; checked, normalised and sampled by prepare_points, whose errors
                       name the file themselves (Encoder.encode reads files directly)
video   load_frames    a frame folder, a (T, H, W, 3) .npy, or a video file (PyAV)
        load_audio_track   its audio: a sidecar audio file of the same stem, or a video file's
                           audio stream (PyAV); None when the clip has neither
"""

from __future__ import annotations

import logging
import math
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from encoders.video import frame_indices

EXTENSIONS = {
    "image": (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"),
    "audio": (".wav", ".flac", ".ogg", ".mp3", ".aiff", ".aif"),
    "point": (".npy", ".npz", ".ply"),
}
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".npy")
DEFAULT_RGB = 0.4  # colour of uncoloured point clouds (Uni3D's convention)
MISSING_RGB = ("default", "raise")  # an uncoloured cloud: give it DEFAULT_RGB, or refuse it
SAFE_NUMPY = ("_reconstruct", "scalar")  # numpy.core.multiarray names a pickled array needs
FRAME_SIZE_POLICIES = ("resize", "raise")

log = logging.getLogger(__name__)
_UNCOLOURED: list[str] = []  # the first cloud given the default colour (it is logged once)


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


def _numpy_global(module: str, name: str) -> Any:
    """The numpy callables an np.save'd dict of arrays needs to unpickle, and nothing else."""
    if (module, name) in (("numpy", "ndarray"), ("numpy", "dtype")):
        return getattr(np, name)
    if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name in SAFE_NUMPY:
        try:
            from numpy._core import multiarray
        except ImportError:  # numpy < 1.26
            from numpy.core import multiarray
        return getattr(multiarray, name)
    raise RawDataError(f"refuses to unpickle {module}.{name} (only numpy arrays are read)")


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays, dicts, lists and scalars; any other class or function is refused
    (np.load(allow_pickle=True) would run whatever the file names)."""

    def find_class(self, module: str, name: str) -> Any:
        return _numpy_global(module, name)


def _xyz_rgb(mapping: Any, keys: list[str]) -> np.ndarray:
    """(n, 3 | 6) points from a mapping's `xyz` and optional `rgb` entries."""
    if "xyz" not in keys:
        raise RawDataError(f"holds {sorted(keys)}, not the point cloud's 'xyz' (and 'rgb')")
    xyz = np.asarray(mapping["xyz"])
    if "rgb" not in keys:
        return xyz
    rgb = np.asarray(mapping["rgb"])
    if xyz.ndim != 2 or xyz.shape[1] != 3 or rgb.shape != xyz.shape:
        raise RawDataError(f"'xyz' has shape {xyz.shape} and 'rgb' {rgb.shape}; expected (n, 3)")
    return np.concatenate([xyz, rgb], 1)


def read_npy(path: str) -> np.ndarray:
    """A plain (n, 3 | 6) array, or the release's np.save'd dict (Uni3D's and OpenShape's .npy:
    keys 'xyz' (n, 3) and optionally 'rgb' (n, 3); other keys, such as features, are ignored)."""
    with open(path, "rb") as f:
        try:
            version = np.lib.format.read_magic(f)
            header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                      else np.lib.format.read_array_header_2_0)  # fmt: skip
            shape, _, dtype = header(f)
        except ValueError as e:
            raise RawDataError(f"not a .npy file ({e})") from e
        try:
            if not dtype.hasobject:
                f.seek(0)
                return np.lib.format.read_array(f, allow_pickle=False)
            obj = _ArrayUnpickler(f).load()
        except RawDataError:
            raise
        except Exception as e:  # noqa: BLE001 - a truncated array or corrupt pickle, many types
            raise RawDataError(f"unreadable .npy ({type(e).__name__}: {e})") from e
    obj = obj.item() if isinstance(obj, np.ndarray) and obj.shape == () else obj
    if not isinstance(obj, dict):
        raise RawDataError(f"holds an object array of shape {shape}, not a dict with 'xyz'")
    return _xyz_rgb(obj, list(obj))


def read_npz(path: str) -> np.ndarray:
    """Arrays 'xyz' (n, 3) and optionally 'rgb' (n, 3), or the archive's one array (n, 3 | 6)."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            keys = list(archive.files)
            if "xyz" not in keys and len(keys) == 1:
                return archive[keys[0]]
            return _xyz_rgb(archive, keys)
    except RawDataError:
        raise
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise RawDataError(f"not a readable .npz archive ({type(e).__name__}: {e})") from e


def read_points(path: str) -> np.ndarray:
    """The raw points of a .ply, .npy or .npz file: (n, 3) xyz or (n, 6) xyz + rgb."""
    suffix = Path(path).suffix.lower()
    readers = {".ply": read_ply, ".npy": read_npy, ".npz": read_npz}
    if suffix not in readers:
        raise RawDataError(f"not a point cloud file (expected one of {list(readers)})")
    return readers[suffix](path)


def _note_default_rgb(name: str) -> None:
    """Log, once per process, that uncoloured clouds get DEFAULT_RGB (naming the first)."""
    if _UNCOLOURED:
        return
    _UNCOLOURED.append(name)
    log.info(
        "point clouds without colour (the first: %s) get the default rgb %.1f, Uni3D's convention "
        "(encoder.missing_rgb=raise refuses them); logged once per process",
        name,
        DEFAULT_RGB,
    )


def prepare_points(
    pts: Any,
    name: str,
    num_points: int | None = None,
    seed: int = 0,
    normalize: bool = True,
    min_points: int = 1,
    missing_rgb: str = "default",
) -> np.ndarray:
    """Raw points (n, 3 | 6) -> (num_points, 6) float32: xyz centred in the unit sphere, rgb in
    [0, 1]; errors name `name` (the file).

    rgb above 1 is read as 0..255. A cloud without rgb gets DEFAULT_RGB (`missing_rgb: default`,
    logged once) or is refused (`raise`). Fewer than `min_points` points (what the encoder's
    grouping needs) are refused; at least that many are sampled to `num_points` with a generator
    seeded by `seed`: a subset without replacement when there are more, every point plus random
    repeats when there are fewer, and the cloud as it is when it has exactly that many (FPS starts
    at point 0, so the release's 10,000-point files embed as stored).
    """
    if missing_rgb not in MISSING_RGB:
        raise ValueError(f"missing_rgb is {missing_rgb!r}; expected one of {MISSING_RGB}")
    try:
        pts = np.asarray(pts, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise RawDataError(f"{name}: point cloud is not numeric ({e})") from e
    if pts.ndim != 2 or pts.shape[1] not in (3, 6):
        raise RawDataError(f"{name}: point cloud has shape {pts.shape}, expected (n, 3) or (n, 6)")
    if len(pts) == 0:
        raise RawDataError(f"{name}: point cloud has no points")
    if not np.isfinite(pts).all():
        raise RawDataError(f"{name}: point cloud holds NaN or inf")
    if len(pts) < min_points:
        raise RawDataError(
            f"{name}: point cloud has {len(pts)} points, fewer than the {min_points} the encoder "
            "needs to group it into patches (from that many on, points are repeated to fill)"
        )
    xyz = pts[:, :3]
    if pts.shape[1] == 6:
        rgb = pts[:, 3:] / (255.0 if pts[:, 3:].max() > 1.0 else 1.0)
    elif missing_rgb == "raise":
        raise RawDataError(
            f"{name}: point cloud has no colour (xyz only) and encoder.missing_rgb=raise; set "
            f"encoder.missing_rgb=default to colour it {DEFAULT_RGB} (Uni3D's convention)"
        )
    else:
        _note_default_rgb(name)
        rgb = np.full_like(xyz, DEFAULT_RGB)
    if normalize:
        xyz = xyz - xyz.mean(0)
        scale = np.linalg.norm(xyz, axis=1).max()
        if scale == 0:
            raise RawDataError(
                f"{name}: point cloud is a single point (cannot normalise its scale)"
            )
        xyz = xyz / scale
    out = np.concatenate([xyz, rgb], 1).astype(np.float32)
    n = len(out)
    if num_points and n != num_points:
        rng = np.random.default_rng(seed)
        if n > num_points:
            index = rng.choice(n, int(num_points), replace=False)
        else:
            index = np.concatenate([np.arange(n), rng.choice(n, int(num_points) - n)])
        out = out[index]
    return out


def load_points(
    path: str,
    num_points: int | None = None,
    seed: int = 0,
    normalize: bool = True,
    min_points: int = 1,
    missing_rgb: str = "default",
) -> np.ndarray:
    """A point cloud file (.ply, .npy or .npz; see read_points) as prepare_points makes it:
    (num_points, 6) xyz in the unit sphere and rgb in [0, 1]. Errors name the file."""
    try:
        pts = read_points(path)
    except RawDataError as e:
        raise RawDataError(f"{path}: {e}") from e
    return prepare_points(pts, path, num_points, seed, normalize, min_points, missing_rgb)


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
    num_points: int | None = 10000  # points per cloud (None: all); an encoder's own count wins
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
    sample rate; point: a .ply/.npy/.npz path or an (n, 3 | 6) array, both prepared alike
    (prepare_points; points are drawn with a seed derived from `settings.seed` and `index`, as
    many as the processor's `num_points` or else `settings.num_points`, and the processor's
    `min_points` and `missing_rgb` apply); text: the caption.
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
        # An encoder that batches clouds of one size (Uni3D's npoints) says how many it takes.
        fit = dict(num_points=getattr(processor, "num_points", None) or s.num_points,
                   seed=s.seed * 1_000_003 + index, normalize=s.normalize_points,
                   min_points=getattr(processor, "min_points", 1),
                   missing_rgb=getattr(processor, "missing_rgb", "default"))  # fmt: skip
        if path:
            return torch.from_numpy(load_points(str(item), **fit))
        return torch.from_numpy(prepare_points(item, f"point array {index}", **fit))
    raise ValueError(f"no reader for modality {modality!r}")
