"""Raw items (images, audio, point clouds, text, video) for the extract stage, and their caches.

A raw data config (`conf/data/demo_raw.yaml`) lists datasets, and per dataset one source per
modality:
    image, audio, point   a folder (searched recursively), or a list: .txt (one path per line),
                          .csv / .json / .jsonl records with `path` (and optional `label`, `id`);
                          list paths are relative to the list's folder
    image with `frames`   video: sub-folders of frame images, (T, H, W, 3) .npy arrays, or video
                          files (these need PyAV); `frames` frames are sampled evenly
    text                  .txt (one caption per line), .csv / .json / .jsonl records with `text`
                          and optional `provenance` (point | audio | image), `label` and `id`
An item's id is its row in that list (sorted paths for folders); its key is its path relative to
the source without suffix, or a text record's `id`. Extras: `labels` (`labels: dirs` takes the
class from the parent folder) and, for text, `provenance`.

Extraction writes a cache in chunks of `shard_size` items; chunk c becomes shard
`shard_<c:06d>_00000`, whoever writes it, so the row order never depends on the number of ranks
and a finished chunk is skipped on resume.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import re
import shutil
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NamedTuple

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from datamodules.cache import (
    MANIFEST,
    CacheError,
    CacheWriter,
    atomic_write_json,
    finalize,
    read_manifest,
)
from encoders.base import Processor
from encoders.modalities import PROVENANCES, check_modality
from encoders.video import frame_indices

log = logging.getLogger(__name__)

EXTENSIONS = {
    "image": (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"),
    "audio": (".wav", ".flac", ".ogg", ".mp3", ".aiff", ".aif"),
    "point": (".npy", ".ply"),
}
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".npy")
PROVENANCE_ALIASES = {"3d": "point", "sound": "audio", **{p: p for p in PROVENANCES}}
DEFAULT_RGB = 0.4  # colour of uncoloured point clouds (Uni3D's convention)
SIDECAR, ITEMS, ERRORS = "extract.json", "items.json", "errors.json"
SHARD = re.compile(r"^shard_(\d{6})_\d{5}\.emb\.npy$")


class RawDataError(ValueError):
    """A raw item or list is unreadable or malformed; the message names the file."""


# ---------------------------------------------------------------------------------------------
# Item lists
# ---------------------------------------------------------------------------------------------


@dataclass
class Items:
    """The items of one (dataset, modality): row i has id i."""

    modality: str
    keys: list[str]
    sources: list[str]  # file paths, or the texts themselves
    extras: dict[str, np.ndarray] = field(default_factory=dict)
    classes: list[str] | None = None  # label names, when labels were given as names

    def __len__(self) -> int:
        return len(self.keys)

    def digest(self) -> str:
        """A hash of the keys and sources, for cache fingerprints."""
        h = hashlib.sha256()
        for key, source in zip(self.keys, self.sources, strict=True):
            h.update(f"{key}\0{source}\0".encode())
        for name, arr in sorted(self.extras.items()):
            h.update(name.encode() + np.ascontiguousarray(arr).tobytes())
        return h.hexdigest()[:16]


def _read_records(path: Path) -> list[Any]:
    """Rows of a .txt / .csv / .json / .jsonl list: strings or dicts."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise RawDataError(f"{path}: unreadable list ({e})") from e
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return [line.strip() for line in text.splitlines() if line.strip()]
    if suffix == ".csv":
        return list(csv.DictReader(io.StringIO(text)))
    if suffix == ".json":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise RawDataError(f"{path}: not valid JSON ({e})") from e
        if not isinstance(rows, list):
            raise RawDataError(f"{path}: expected a JSON list of records or strings")
        return rows
    if suffix == ".jsonl":
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise RawDataError(f"{path}:{n}: not valid JSON ({e})") from e
        return rows
    raise RawDataError(f"{path}: a list must be .txt, .csv, .json or .jsonl")


def _field(row: Any, names: Sequence[str], where: str, required: bool = True) -> Any:
    if isinstance(row, str):
        return row if names[0] in ("text", "path") else None
    if not isinstance(row, Mapping):
        raise RawDataError(f"{where}: expected a record (object) or a string, got {row!r}")
    for name in names:
        if row.get(name) not in (None, ""):
            return row[name]
    if required:
        raise RawDataError(f"{where}: record has no {' or '.join(names)} field")
    return None


def _labels(values: list[Any], where: str) -> tuple[np.ndarray | None, list[str] | None]:
    """Per-row labels as int64 (class names become indices into their sorted set)."""
    given = [v for v in values if v not in (None, "")]
    if not given:
        return None, None
    if len(given) != len(values):
        raise RawDataError(f"{where}: some rows have a label and some do not")
    try:
        return np.array([int(v) for v in values], np.int64), None
    except (TypeError, ValueError):
        classes = sorted({str(v) for v in values})
        index = {c: i for i, c in enumerate(classes)}
        return np.array([index[str(v)] for v in values], np.int64), classes


def _provenance(values: list[Any], default: str | None, where: str) -> np.ndarray | None:
    values = [v if v not in (None, "") else default for v in values]
    if all(v is None for v in values):
        return None
    out = np.empty(len(values), np.int8)
    for i, v in enumerate(values):
        name = PROVENANCE_ALIASES.get(str(v).lower()) if v is not None else None
        if name is None:
            raise RawDataError(
                f"{where}: row {i} has provenance {v!r}; expected one of {list(PROVENANCES)} "
                "(or set `provenance:` for the whole source)"
            )
        out[i] = PROVENANCES.index(name)
    return out


def _file_key(path: str) -> str:
    return str(Path(path).with_suffix("")).replace("\\", "/")


def _list_folder(root: Path, exts: Sequence[str], video: bool) -> list[Path]:
    if video:  # frame folders and video/array files directly under root
        return sorted(p for p in root.iterdir()
                      if p.is_dir() or p.suffix.lower() in VIDEO_EXTENSIONS)  # fmt: skip
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in exts)


def list_items(modality: str, spec: Mapping, where: str = "") -> Items:
    """The items of one modality source (see the module docstring for the accepted forms)."""
    check_modality(modality, where)
    if "source" not in spec:
        raise RawDataError(f"{where}: no `source` (a folder or a list file)")
    source = Path(str(spec["source"]))
    if not source.exists():
        raise RawDataError(f"{where}: source {source} does not exist")
    video = bool(spec.get("frames"))
    if video and modality != "image":
        raise RawDataError(f"{where}: `frames` (video) applies to the image modality only")
    labels_from = spec.get("labels")
    if labels_from not in (None, "dirs"):
        raise RawDataError(f"{where}: labels is {labels_from!r}; expected dirs (or leave it out)")
    keys: list[str]
    if modality == "text":
        if source.is_dir():
            raise RawDataError(
                f"{where}: a text source is a .txt/.csv/.json/.jsonl file, not a folder"
            )
        rows = _read_records(source)
        sources, keys, provs, labels = [], [], [], []
        for i, row in enumerate(rows):
            at = f"{source} (row {i})"
            sources.append(str(_field(row, ("text", "caption"), at)))
            rid = _field(row, ("id",), at, required=False)
            keys.append(str(rid) if rid is not None else str(i))
            provs.append(_field(row, ("provenance",), at, required=False))
            labels.append(_field(row, ("label",), at, required=False))
        extras = {}
        prov = _provenance(provs, spec.get("provenance"), str(source))
        if prov is not None:
            extras["provenance"] = prov
    else:
        if source.is_dir():
            paths = _list_folder(source, EXTENSIONS[modality], video)
            rel = [p.relative_to(source).as_posix() for p in paths]
            labels = [Path(r).parent.name if labels_from == "dirs" else None for r in rel]
        else:
            rows = _read_records(source)
            rel, labels = [], []
            for i, row in enumerate(rows):
                at = f"{source} (row {i})"
                rel.append(str(_field(row, ("path", "file"), at)))
                labels.append(_field(row, ("label",), at, required=False))
            paths = [source.parent / r for r in rel]
        sources = [str(p) for p in paths]
        keys = [_file_key(r) for r in rel]
        extras = {}
    if not keys:
        raise RawDataError(f"{where}: source {source} holds no {modality} items")
    if len(set(keys)) != len(keys):
        dup = Counter(keys).most_common(1)[0][0]
        raise RawDataError(f"{where}: source {source} has duplicate item key {dup!r}")
    label_arr, classes = _labels(labels, str(source))
    if label_arr is not None:
        extras["labels"] = label_arr
    return Items(modality, keys, sources, extras, classes)


# ---------------------------------------------------------------------------------------------
# Loaders: one raw file -> an array or image (they raise on anything unreadable)
# ---------------------------------------------------------------------------------------------


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


PLY_TYPES = {"char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1", "short": "i2",
             "int16": "i2", "ushort": "u2", "uint16": "u2", "int": "i4", "int32": "i4",
             "uint": "u4", "uint32": "u4", "float": "f4", "float32": "f4", "double": "f8",
             "float64": "f8"}  # fmt: skip


def read_ply(path: str) -> np.ndarray:
    """Vertices of a .ply (ascii or binary) as (n, 3) xyz or (n, 6) xyz + rgb."""
    with open(path, "rb") as f:
        if f.readline().strip() != b"ply":
            raise RawDataError("not a PLY file (no 'ply' magic)")
        fmt, elements = None, []  # elements: [name, count, [(prop, type) or (prop, None list)]]
        while True:
            line = f.readline()
            if not line:
                raise RawDataError("PLY header has no end_header")
            words = line.decode("ascii", "replace").split()
            if not words or words[0] in ("comment", "obj_info"):
                continue
            if words[0] == "end_header":
                break
            if words[0] == "format":
                fmt = words[1]
            elif words[0] == "element":
                elements.append([words[1], int(words[2]), []])
            elif words[0] == "property" and elements:
                is_list = words[1] == "list"
                elements[-1][2].append((words[-1], None if is_list else PLY_TYPES.get(words[1])))
        if fmt not in ("ascii", "binary_little_endian", "binary_big_endian"):
            raise RawDataError(f"PLY format {fmt!r} is not supported")
        order = "<" if fmt == "binary_little_endian" else ">"
        for name, count, props in elements:
            if any(t is None for _, t in props):
                if name == "vertex":
                    raise RawDataError("PLY vertex element with list properties")
                if fmt != "ascii":
                    raise RawDataError(
                        f"PLY element {name!r} before the vertices has list properties"
                    )
            if fmt == "ascii":
                rows = [f.readline() for _ in range(count)]
                if name != "vertex":
                    continue
                data = np.loadtxt(rows, dtype=np.float64, ndmin=2)
                cols = {p: data[:, i] for i, (p, _) in enumerate(props)}
            else:
                dtype = np.dtype([(p, order + t) for p, t in props])
                raw = f.read(dtype.itemsize * count)
                if len(raw) < dtype.itemsize * count:
                    raise RawDataError(f"PLY file ends inside element {name!r}")
                if name != "vertex":
                    continue
                data = np.frombuffer(raw, dtype=dtype, count=count)
                cols = {p: data[p].astype(np.float64) for p, _ in props}
            if not all(c in cols for c in "xyz"):
                raise RawDataError("PLY vertices lack x, y or z")
            xyz = np.stack([cols["x"], cols["y"], cols["z"]], 1)
            rgb_names = next((n for n in (("red", "green", "blue"), ("r", "g", "b"))
                              if all(c in cols for c in n)), None)  # fmt: skip
            if rgb_names is None:
                return xyz
            return np.concatenate([xyz, np.stack([cols[c] for c in rgb_names], 1)], 1)
    raise RawDataError("PLY file has no vertex element")


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


def load_frames(path: str, frames: int) -> list:
    """`frames` RGB PIL frames spread evenly over a video (frame folder, .npy or video file)."""
    from PIL import Image

    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix.lower() in EXTENSIONS["image"])
        if not files:
            raise RawDataError("frame folder holds no images")
        return [load_image(str(files[i])) for i in frame_indices(len(files), frames)]
    if p.suffix.lower() == ".npy":
        video = np.load(p, mmap_mode="r", allow_pickle=False)
        if video.ndim != 4 or video.shape[-1] != 3:
            raise RawDataError(f"video array has shape {video.shape}, expected (T, H, W, 3)")
        return [
            Image.fromarray(np.asarray(video[i], np.uint8))
            for i in frame_indices(len(video), frames)
        ]
    try:
        from torchvision.io import read_video

        video, _, _ = read_video(str(p), output_format="THWC", pts_unit="sec")
    except ImportError as e:
        raise RawDataError(f"decoding video files needs PyAV (pip install av): {e}") from e
    if len(video) == 0:
        raise RawDataError("video has no frames")
    return [Image.fromarray(video[i].numpy()) for i in frame_indices(len(video), frames)]


# ---------------------------------------------------------------------------------------------
# One cache being extracted
# ---------------------------------------------------------------------------------------------


@dataclass
class ExtractJob:
    """The extraction of one (dataset, space, modality) cache, in chunks of `shard_size` items."""

    dataset: str
    modality: str
    items: Items
    directory: Path
    space: str
    dim: int
    fingerprint: str
    shard_size: int = 4096
    dtype: str = "float16"
    frames: int | None = None  # video: frames per item, averaged
    meta: dict = field(default_factory=dict)  # recorded in the manifest (encoder, source)

    @property
    def name(self) -> str:
        return f"{self.dataset}/{self.space}/{self.modality}"

    @property
    def n_chunks(self) -> int:
        return math.ceil(len(self.items) / self.shard_size)

    def chunk(self, c: int) -> range:
        return range(c * self.shard_size, min((c + 1) * self.shard_size, len(self.items)))

    def is_complete(self) -> bool:
        manifest = read_manifest(self.directory) if self.directory.exists() else None
        return manifest is not None and manifest.get("fingerprint") == self.fingerprint

    def prepare(self, overwrite: bool = False) -> bool:
        """Get the directory ready (run once, on rank 0); False when the cache is complete.

        A complete cache with this fingerprint is kept; one with another fingerprint, or an
        interrupted one from another configuration, is refused unless `overwrite`.
        """
        d = self.directory
        if self.is_complete() and not overwrite:
            return False
        if overwrite and d.exists():
            shutil.rmtree(d)
        manifest = read_manifest(d) if d.exists() else None
        if manifest is not None:
            raise CacheError(
                f"{d}: an existing cache was extracted with a different configuration "
                f"(fingerprint {manifest.get('fingerprint')!r}, now {self.fingerprint!r}); pass "
                "extract.overwrite=true to replace it"
            )
        sidecar = d / SIDECAR
        if sidecar.exists():
            started = json.loads(sidecar.read_text()).get("fingerprint")
            if started != self.fingerprint:
                raise CacheError(
                    f"{d}: holds an interrupted extraction with another configuration "
                    f"(fingerprint {started!r}, now {self.fingerprint!r}); pass "
                    "extract.overwrite=true to discard it"
                )
        elif d.exists() and any(d.glob("*.npy")):
            raise CacheError(f"{d}: holds shards of unknown origin; pass extract.overwrite=true")
        d.mkdir(parents=True, exist_ok=True)
        atomic_write_json(sidecar, dict(
            fingerprint=self.fingerprint, dataset=self.dataset, space=self.space,
            modality=self.modality, items=len(self.items), shard_size=self.shard_size,
            started=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        ))  # fmt: skip
        atomic_write_json(d / ITEMS, dict(keys=self.items.keys, sources=self.items.sources,
                                          classes=self.items.classes))  # fmt: skip
        return True

    def done_chunks(self) -> set[int]:
        """Chunks whose shard is written (complete shards only: `.emb.npy` is renamed last)."""
        if not self.directory.exists():
            return set()
        return {int(m.group(1)) for p in self.directory.iterdir() if (m := SHARD.match(p.name))}

    def pending_chunks(self) -> list[int]:
        done = self.done_chunks()
        return [c for c in range(self.n_chunks) if c not in done]

    def write_chunk(
        self, c: int, emb: np.ndarray, ids: np.ndarray, errors: Sequence[tuple[int, str]] = ()
    ) -> None:
        """Write chunk c: its embeddings (rows, dim) with ids, and its failed items' errors."""
        errors_path = self.directory / "errors" / f"chunk_{c:06d}.json"
        if errors:
            atomic_write_json(errors_path, [
                dict(id=int(i), key=self.items.keys[i], source=self.items.sources[i], error=msg)
                for i, msg in sorted(errors)
            ])  # fmt: skip
        else:
            errors_path.unlink(missing_ok=True)
        if len(ids) == 0:
            return  # every item failed: no shard, the errors file says why
        writer = CacheWriter(
            self.directory, space=self.space, modality=self.modality, dim=self.dim,
            dtype=self.dtype, fingerprint=self.fingerprint, resume=True,
            shard_prefix=f"shard_{c:06d}_",
        )  # fmt: skip
        extras = {k: v[ids] for k, v in self.items.extras.items()}
        writer.append(emb, ids.astype(np.int64), **extras)

    def finalize(self) -> dict:
        """Check every chunk is accounted for, merge the errors, and write the manifest."""
        done = self.done_chunks()
        errors: list[dict] = []
        for path in sorted((self.directory / "errors").glob("chunk_*.json")):
            errors.extend(json.loads(path.read_text()))
        failed = {}
        for e in errors:
            failed.setdefault(e["id"] // self.shard_size, []).append(e)
        missing = [c for c in range(self.n_chunks)
                   if c not in done and len(failed.get(c, ())) != len(self.chunk(c))]  # fmt: skip
        if missing:
            raise CacheError(f"{self.directory}: chunks {missing[:10]} were not extracted")
        if errors:
            atomic_write_json(self.directory / ERRORS, sorted(errors, key=lambda e: e["id"]))
        else:
            (self.directory / ERRORS).unlink(missing_ok=True)
        manifest = finalize(
            self.directory, space=self.space, modality=self.modality, dim=self.dim,
            dtype=self.dtype, normalized=True, fingerprint=self.fingerprint,
            dataset=self.dataset, items=len(self.items), errors=len(errors), **self.meta,
        )  # fmt: skip
        if manifest["count"] + len(errors) != len(self.items):
            (self.directory / MANIFEST).unlink()
            raise CacheError(
                f"{self.directory}: {manifest['count']} rows + {len(errors)} errors != "
                f"{len(self.items)} items; extract it again with extract.overwrite=true"
            )
        if errors:
            log.warning("%s: %d of %d items failed and were skipped; see %s", self.name,
                        len(errors), len(self.items), self.directory / ERRORS)  # fmt: skip
        return manifest


# ---------------------------------------------------------------------------------------------
# Datasets and batching
# ---------------------------------------------------------------------------------------------


class Sample(NamedTuple):
    index: int
    pad: bool  # not a real row: a sampler pad, or a failed item standing in with fallback data
    data: Any
    error: str | None


@dataclass
class LoadSettings:
    """How raw files become encoder inputs, beside what the processor says."""

    clip: str = "start"  # audio longer than the encoder's window: keep its start or its centre
    pad: str = "repeat"  # audio shorter: repeat it (laion_clap's default) or pad with zeros
    num_points: int | None = 10000
    normalize_points: bool = True
    seed: int = 0


class RawDataset(Dataset):
    """Loads and prepares one item per index; a failed item either raises (on_error=raise) or
    comes back flagged, with a loadable item's data standing in so that batches keep their shape.
    """

    def __init__(
        self, job: ExtractJob, processor: Processor, settings: LoadSettings, on_error: str = "skip"
    ) -> None:
        if on_error not in ("skip", "raise"):
            raise ValueError(f"extract.on_error is {on_error!r}; expected skip or raise")
        self.job, self.processor, self.settings, self.on_error = job, processor, settings, on_error
        self._fallback: Any = None

    def __len__(self) -> int:
        return len(self.job.items)

    def load(self, index: int) -> Any:
        """Item `index` prepared for the encoder (raises on an unreadable file)."""
        m, s, p = self.job.modality, self.settings, self.processor
        source = self.job.items.sources[index]
        if m == "text":
            return p.item(m, source)
        if self.job.frames:
            return torch.stack([p.item(m, f) for f in load_frames(source, self.job.frames)])
        if m == "image":
            raw = load_image(source)
        elif m == "audio":
            raw = load_audio(source, p.sample_rate, p.clip_samples, s.clip, s.pad)
        else:
            raw = load_points(source, s.num_points, seed=s.seed * 1_000_003 + index,
                              normalize=s.normalize_points)  # fmt: skip
            raw = torch.from_numpy(raw)
        return p.item(m, raw)

    def fallback(self) -> Any:
        """The data of the first loadable item (stands in for failed items)."""
        if self._fallback is None:
            for i in range(len(self)):
                try:
                    self._fallback = self.load(i)
                    break
                except Exception:  # noqa: BLE001 - any unreadable item is skipped here
                    continue
            else:
                raise RawDataError(f"{self.job.name}: no item could be loaded")
        return self._fallback

    def __getitem__(self, key: tuple[int, bool]) -> Sample:
        index, pad = key
        try:
            return Sample(index, pad, self.load(index), None)
        except Exception as e:  # noqa: BLE001 - decoders raise many types; all mean "unreadable"
            source = self.job.items.sources[index]
            where = source if self.job.modality != "text" else f"text item {index}"
            message = f"{type(e).__name__}: {e}"
            if self.on_error == "raise":
                raise RawDataError(
                    f"{where}: unreadable {self.job.modality} ({message}); set "
                    "extract.on_error=skip to skip and list such items"
                ) from e
            # A sampler pad that fails is a duplicate of a real item: not an error of its own.
            return Sample(index, True, self.fallback(), None if pad else message)


class ChunkBatchSampler(Sampler[list[tuple[int, bool]]]):
    """Batches of (index, pad) that never cross a chunk; pads up to `n_batches` so every rank
    runs the same number of forward passes (ZeRO-3 gathers weights collectively)."""

    def __init__(
        self, chunks: Sequence[range], batch_size: int, n_batches: int, pad_index: int
    ) -> None:
        self.chunks, self.batch_size = list(chunks), batch_size
        self.n_batches, self.pad_index = n_batches, pad_index
        self.num_items = sum(len(c) for c in self.chunks)

    @staticmethod
    def count(chunks: Sequence[range], batch_size: int) -> int:
        return sum(math.ceil(len(c) / batch_size) for c in chunks)

    def __iter__(self) -> Iterator[list[tuple[int, bool]]]:
        n = 0
        for chunk in self.chunks:
            for start in range(0, len(chunk), self.batch_size):
                yield [(i, False) for i in chunk[start : start + self.batch_size]]
                n += 1
        for _ in range(self.n_batches - n):
            yield [(self.pad_index, True)]

    def __len__(self) -> int:
        return self.n_batches


class Collate:
    """Samples -> {ids (B,), pad (B,), inputs (the processor's batch), errors [(id, msg)]}."""

    def __init__(self, processor: Processor, modality: str, video: bool) -> None:
        self.processor, self.modality, self.video = processor, modality, video

    def __call__(self, samples: Sequence[Sample]) -> dict:
        return dict(
            ids=torch.tensor([s.index for s in samples], dtype=torch.long),
            pad=torch.tensor([s.pad for s in samples], dtype=torch.bool),
            inputs=self.processor.batch(self.modality, [s.data for s in samples]),
            errors=[(s.index, s.error) for s in samples if s.error is not None],
            modality=self.modality,
            video=self.video,
        )


def _rank(trainer) -> tuple[int, int, Callable[[], None]]:
    if trainer is None:
        return 0, 1, lambda: None
    return trainer.global_rank, trainer.world_size, trainer.strategy.barrier


class RawDataModule(L.LightningDataModule):
    """One predict DataLoader per cache with chunks left to extract, sharded by rank.

    `setup` prepares the cache directories on rank 0, then every rank reads which chunks are
    done and takes every world_size-th pending chunk.
    """

    def __init__(
        self,
        jobs: Sequence[ExtractJob],
        processor: Processor,
        settings: LoadSettings,
        batch_size: int = 64,
        num_workers: int = 0,
        on_error: str = "skip",
        overwrite: bool = False,
    ) -> None:
        super().__init__()
        self.jobs, self.processor, self.settings = list(jobs), processor, settings
        self.batch_size, self.num_workers = int(batch_size), int(num_workers)
        self.on_error, self.overwrite = on_error, overwrite
        self.active: list[ExtractJob] = []  # not complete: finalize these at the end
        self.loaders: list[tuple[ExtractJob, ChunkBatchSampler]] = []
        self.finished = False

    def setup(self, stage: str | None = None) -> None:
        rank, world, barrier = _rank(getattr(self, "trainer", None))
        if rank == 0:
            for job in self.jobs:
                if not job.prepare(self.overwrite):
                    log.info("%s is already extracted (%s)", job.name, job.directory)
        barrier()
        self.active = [job for job in self.jobs if not job.is_complete()]
        self.loaders = []
        for job in self.active:
            pending = [job.chunk(c) for c in job.pending_chunks()]
            if not pending:
                continue
            mine = pending[rank::world]
            n_batches = max(ChunkBatchSampler.count(pending[r::world], self.batch_size)
                            for r in range(world))  # fmt: skip
            sampler = ChunkBatchSampler(mine, self.batch_size, n_batches, pending[0].start)
            self.loaders.append((job, sampler))
        barrier()  # nobody writes a chunk before every rank has read what is pending

    def predict_dataloader(self) -> list[DataLoader]:
        return [
            DataLoader(
                RawDataset(job, self.processor, self.settings, self.on_error),
                batch_sampler=sampler,
                collate_fn=Collate(self.processor, job.modality, bool(job.frames)),
                num_workers=self.num_workers,
                pin_memory=torch.cuda.is_available(),
            )
            for job, sampler in self.loaders
        ]

    def finish(self, trainer=None) -> list[dict]:
        """After every rank has written its chunks: rank 0 writes each cache's manifest."""
        rank, _, barrier = _rank(trainer)
        barrier()
        manifests = []
        if rank == 0 and not self.finished:
            manifests = [job.finalize() for job in self.active]
        self.finished = True
        return manifests
