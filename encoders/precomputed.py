"""Precomputed embeddings, for spaces with no pip package (Uni3D, WavCaps, ImageBind).

Run the space's own code, dump its embeddings, and the extract stage imports them into the cache
format, row-aligned with the dataset's item list. Layout under `encoder.path`:

    <path>/<dataset>/<modality>.npy            (n, dim) array; ids in <modality>.ids.{npy,txt,json}
    <path>/<dataset>/<modality>.pt             {"embeddings": (n, dim), "ids": [...]} (or a tensor
                                               plus a sidecar ids file)
    <path>/<dataset>/<modality>.safetensors    tensors "embeddings" and, if integer, "ids"

An id is either the item's key (its file path relative to the source folder, without suffix, or
a text record's `id`), its file stem, or an integer row of the item list.

Videos with the space's `video.audio_track` on: `<path>/<dataset>/image.*` holds the clips' frame
averages and `<path>/<dataset>/audio.*` their audio tracks' embeddings, under the same ids (a clip
without a track is left out); the extract stage joins them as encoders/video.py says.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from encoders.base import Encoder, Processor

SUFFIXES = (".npy", ".pt", ".safetensors")
ID_SUFFIXES = (".ids.npy", ".ids.txt", ".ids.json")


class DumpError(ValueError):
    """A precomputed dump is missing, malformed, or does not match the dataset."""


def find_dump(directory: str | Path, dataset: str, modality: str) -> Path:
    """The dump file of (dataset, modality) under `directory`."""
    folder = Path(directory) / dataset
    found = [folder / f"{modality}{s}" for s in SUFFIXES if (folder / f"{modality}{s}").exists()]
    if not found:
        raise DumpError(
            f"{folder}: no {modality}{{{','.join(SUFFIXES)}}}; dump the space's {modality} "
            f"embeddings of dataset {dataset!r} there (see encoders/precomputed.py)"
        )
    if len(found) > 1:
        raise DumpError(f"{folder}: several dumps for {modality}: {[p.name for p in found]}")
    return found[0]


def dump_identity(directory: str | Path, dataset: str, modalities: Sequence[str]) -> list:
    """[name, size, mtime_ns] of each dump and ids file of (dataset, modality), for the cache
    fingerprint: an updated dump is re-extracted."""
    folder = Path(directory) / dataset
    files = [folder / f"{m}{s}" for m in modalities for s in (*SUFFIXES, *ID_SUFFIXES)]
    return [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files if f.exists()]


def _sidecar_ids(path: Path, modality: str) -> list | None:
    for suffix in ID_SUFFIXES:
        side = path.with_name(f"{modality}{suffix}")
        if not side.exists():
            continue
        if suffix == ".ids.npy":
            return np.load(side, allow_pickle=False).tolist()
        if suffix == ".ids.json":
            return list(json.loads(side.read_text()))
        return [line for line in side.read_text().splitlines() if line.strip()]
    return None


def load_dump(path: str | Path, modality: str) -> tuple[np.ndarray, list]:
    """(embeddings (n, dim) float32, ids) from a .npy, .pt or .safetensors dump."""
    path = Path(path)
    ids = None
    try:
        if path.suffix == ".npy":
            emb = np.load(path, allow_pickle=False)
        elif path.suffix == ".safetensors":
            from safetensors.numpy import load_file

            tensors = load_file(str(path))
            emb = tensors.get("embeddings")
            if "ids" in tensors:
                ids = tensors["ids"].tolist()
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(obj, Mapping):
                emb, ids = obj.get("embeddings"), obj.get("ids")
                ids = ids.tolist() if isinstance(ids, torch.Tensor) else ids
            else:
                emb = obj
            emb = emb.float().numpy() if isinstance(emb, torch.Tensor) else emb
    except Exception as e:
        raise DumpError(f"{path}: unreadable dump ({e})") from e
    if emb is None:
        raise DumpError(f"{path}: no 'embeddings' in the dump")
    emb = np.asarray(emb, dtype=np.float32)
    if emb.ndim != 2:
        raise DumpError(f"{path}: embeddings have shape {emb.shape}, expected (n, dim)")
    ids = ids if ids is not None else _sidecar_ids(path, modality)
    if ids is None:
        raise DumpError(f"{path}: no ids; add an 'ids' entry or a {modality}.ids.{{npy,txt,json}}")
    if len(ids) != len(emb):
        raise DumpError(f"{path}: {len(ids)} ids for {len(emb)} embeddings")
    if len(set(map(str, ids))) != len(ids):
        raise DumpError(f"{path}: ids are not unique")
    return emb, list(ids)


def match_rows(ids: Sequence, keys: Sequence[str], where: str) -> np.ndarray:
    """For each item key, its row in a dump with these ids, or -1 when the dump lacks it."""
    if all(isinstance(i, (int, np.integer)) for i in ids):
        rows = np.full(len(keys), -1, np.int64)
        for row, i in enumerate(ids):
            if not 0 <= int(i) < len(keys):
                raise DumpError(
                    f"{where}: integer id {i} is outside the item list (0..{len(keys) - 1})"
                )
            rows[int(i)] = row
        return rows
    index = {str(i): row for row, i in enumerate(ids)}
    rows = np.array([index.get(k, -1) for k in keys], np.int64)
    if (rows < 0).all() and len(keys):
        stems = [Path(k).name for k in keys]
        if len(set(stems)) != len(stems):
            raise DumpError(f"{where}: no id matches an item key, and item stems are not unique")
        rows = np.array([index.get(s, -1) for s in stems], np.int64)
    return rows


class PrecomputedProcessor(Processor):
    """Items are their keys: nothing is read from the raw files."""

    def batch(self, modality: str, items: Sequence[Any]) -> list[str]:
        """Keys (or paths) stay a list of strings."""
        return [str(x) for x in items]


class PrecomputedEncoder(Encoder):
    """{modality: item keys} -> the dumped rows of those items, L2-normalised."""

    precomputed = True

    @classmethod
    def build_processor(cls, path: str) -> PrecomputedProcessor:
        """Items are their keys: nothing to prepare."""
        return PrecomputedProcessor()

    def __init__(
        self, dims: Mapping[str, int], path: str, dataset: str, keys: Mapping[str, Sequence[str]]
    ) -> None:
        super().__init__(dims, PrecomputedProcessor())
        self.path, self.dataset, self.keys = Path(path), dataset, keys
        self.tables: dict[str, tuple[np.ndarray, dict[str, int]]] = {}

    def table(self, modality: str) -> tuple[np.ndarray, dict[str, int]]:
        """(embeddings, {item key: row}) of one modality's dump, checked against the space dim."""
        if modality not in self.tables:
            path = find_dump(self.path, self.dataset, modality)
            emb, ids = load_dump(path, modality)
            if emb.shape[1] != self.dims[modality]:
                raise DumpError(f"{path}: dim {emb.shape[1]}, the space says {self.dims[modality]}")
            rows = match_rows(ids, self.keys[modality], str(path))
            found = {k: int(r) for k, r in zip(self.keys[modality], rows, strict=True) if r >= 0}
            self.tables[modality] = (emb, found)
        return self.tables[modality]

    def resolve(self, modality: str, item: str | Path) -> str:
        """An item key, or a raw file's path whose name without suffix ends with an item key
        (`.../test/points/ball/ball_00.ply` is item `ball/ball_00`), as its key."""
        found = self.table(modality)[1]
        if str(item) in found:
            return str(item)
        stem = Path(item).with_suffix("").as_posix()
        matches = [k for k in found if stem == k or stem.endswith("/" + k)]
        return max(matches, key=len) if matches else str(item)

    def embed(self, modality: str, batch: Sequence[str]) -> torch.Tensor:
        emb, found = self.table(modality)
        batch = [self.resolve(modality, k) for k in batch]
        missing = [k for k in batch if k not in found]
        if missing:
            raise DumpError(
                f"{self.path / self.dataset}: {modality} dump lacks items {missing[:5]}"
            )
        return torch.from_numpy(emb[[found[k] for k in batch]])

    def has(self, modality: str, key: str) -> bool:
        """Whether the dump holds item `key`."""
        return key in self.table(modality)[1]
