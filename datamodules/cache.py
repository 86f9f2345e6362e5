"""Embedding cache: one directory per (dataset, space, modality).

Layout of a cache directory:
    manifest.json             written last; the only proof that the cache is complete
    shard_00000.emb.npy       (rows, dim) float16 or float32, memory-mappable
    shard_00000.ids.npy       (rows,) item ids
    shard_00000.<extra>.npy   optional per-row arrays (labels, provenance, items, ...)

Every file is written to a temporary name and renamed into place, and a shard's `.emb.npy` is
renamed last, so a shard whose embeddings exist is complete. An interrupted writer leaves at
most temporary files and complete shards, never a manifest that lies. The manifest records
every file's sha256; a reader verifies each file against it before first use in a process
(datamodules/artifacts.py, cheap on reruns thanks to a stamp keyed by size, mtime and inode).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from datamodules.artifacts import (
    CacheError,
    atomic_save_npy,
    atomic_write_json,
    sha256_file,
    verify_files,
)
from encoders.modalities import check_modality

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
DTYPES = ("float16", "float32")
REQUIRED_KEYS = ("format", "space", "modality", "dim", "count", "dtype", "normalized", "shards")


def read_manifest(directory: str | os.PathLike) -> dict | None:
    """The parsed manifest of a cache directory, or None when it has none."""
    path = Path(directory) / MANIFEST
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CacheError(f"{path}: manifest is not valid JSON ({e})") from e


def cache_is_complete(directory: str | os.PathLike, fingerprint: str | None = None) -> bool:
    """True when `directory` holds a manifest (with this fingerprint, if one is given)."""
    manifest = read_manifest(directory)
    return manifest is not None and (
        fingerprint is None or manifest.get("fingerprint") == fingerprint
    )


class CacheWriter:
    """Append embedding shards to a cache directory, then write its manifest last.

    fingerprint: a hash of the configuration that produced the embeddings. An existing cache with
    another fingerprint is refused unless `overwrite`. `resume` keeps complete shards left by an
    interrupted writer (see `done_ids`); otherwise they are removed.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        space: str,
        modality: str,
        dim: int,
        dtype: str = "float16",
        normalized: bool = True,
        fingerprint: str = "",
        overwrite: bool = False,
        resume: bool = False,
        shard_prefix: str = "shard_",
    ) -> None:
        if dtype not in DTYPES:
            raise CacheError(f"{directory}: dtype {dtype!r} is not one of {DTYPES}")
        self.directory = Path(directory)
        self.meta = dict(
            space=space,
            modality=check_modality(modality, str(directory)),
            dim=int(dim),
            dtype=dtype,
            normalized=bool(normalized),
            fingerprint=fingerprint,
        )
        self.prefix = shard_prefix
        existing = read_manifest(self.directory) if self.directory.exists() else None
        if existing is not None and not overwrite:
            if existing.get("fingerprint") != fingerprint:
                raise CacheError(
                    f"{self.directory}: an existing cache was written with a different "
                    f"configuration (fingerprint {existing.get('fingerprint')!r}, now "
                    f"{fingerprint!r}); pass overwrite=true to replace it"
                )
            raise CacheError(f"{self.directory}: cache is already complete; pass overwrite=true")
        if overwrite or not resume:
            self._clear(everything=overwrite)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._next = len(self._complete_shards(self.prefix))

    def _clear(self, everything: bool) -> None:
        if not self.directory.exists():
            return
        if everything:
            shutil.rmtree(self.directory)
            return
        for path in self.directory.glob(f"{self.prefix}*"):
            path.unlink()
        # Only this writer's temp files: another rank may be mid-write in the same directory.
        for path in self.directory.glob(f".{self.prefix}*.tmp"):
            path.unlink(missing_ok=True)

    def _complete_shards(self, prefix: str = "") -> list[str]:
        return sorted(p.name[: -len(".emb.npy")] for p in self.directory.glob(f"{prefix}*.emb.npy"))

    def done_ids(self) -> np.ndarray:
        """Ids of the items in complete shards (those an interrupted run already wrote)."""
        parts = [
            np.load(self.directory / f"{s}.ids.npy") for s in self._complete_shards(self.prefix)
        ]
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)

    def append(self, embeddings: np.ndarray, ids: np.ndarray, **extras: np.ndarray) -> str:
        """Write one shard: embeddings (rows, dim), ids (rows,), optional per-row extras."""
        emb = np.asarray(embeddings)
        rows = len(emb)
        if emb.ndim != 2 or emb.shape[1] != self.meta["dim"]:
            raise CacheError(
                f"{self.directory}: shard has shape {emb.shape}, "
                f"expected (rows, {self.meta['dim']})"
            )
        if not np.isfinite(emb).all():
            bad = int(np.flatnonzero(~np.isfinite(emb).all(1))[0])
            raise CacheError(f"{self.directory}: refusing to write NaN/inf (row {bad} of shard)")
        for name, arr in {"ids": ids, **extras}.items():
            if len(arr) != rows:
                raise CacheError(f"{self.directory}: {name} has {len(arr)} rows, embeddings {rows}")
        name = f"{self.prefix}{self._next:05d}"
        for key, arr in {"ids": ids, **extras}.items():
            atomic_save_npy(self.directory / f"{name}.{key}.npy", np.asarray(arr))
        atomic_save_npy(self.directory / f"{name}.emb.npy", emb.astype(self.meta["dtype"]))
        self._next += 1
        return name

    def close(self, **info: Any) -> dict:
        """Hash every complete shard (of every prefix) and write the manifest. Returns it."""
        return finalize(self.directory, **self.meta, **info)


def finalize(directory: str | os.PathLike, **meta: Any) -> dict:
    """Write the manifest for all complete shards in `directory` (e.g. after per-rank writers)."""
    directory = Path(directory)
    shards, extras = [], None
    for name in sorted(p.name[: -len(".emb.npy")] for p in directory.glob("*.emb.npy")):
        files = {p.name[len(name) + 1 : -len(".npy")]: p for p in directory.glob(f"{name}.*.npy")}
        keys = sorted(k for k in files if k not in ("emb", "ids"))
        if extras is None:
            extras = keys
        elif keys != extras:
            raise CacheError(f"{directory}: shard {name} has extras {keys}, others have {extras}")
        rows = int(np.load(files["emb"], mmap_mode="r").shape[0])
        shards.append(
            dict(name=name, rows=rows, sha256={k: sha256_file(p) for k, p in sorted(files.items())})
        )
    manifest = dict(
        format=FORMAT_VERSION,
        **meta,
        count=sum(s["rows"] for s in shards),
        extras=extras or [],
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        shards=shards,
    )
    atomic_write_json(directory / MANIFEST, manifest)
    return manifest


class EmbeddingCache:
    """Read a cache directory: memory-maps its shards and validates them.

    Opening checks the manifest against the shards (files present, shapes, dtype, counts) and,
    unless `verify=False`, every file's sha256: a file is hashed once per process and once per
    change of the file (datamodules/artifacts.py). `load()` checks for NaN/inf.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        verify: bool = True,
        expect_dim: int | None = None,
        expect_space: str | None = None,
        expect_modality: str | None = None,
    ) -> None:
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise CacheError(f"{self.directory}: no such cache directory")
        manifest = read_manifest(self.directory)
        if manifest is None:
            raise CacheError(
                f"{self.directory}: no {MANIFEST}; the cache is missing or its writer was "
                "interrupted before finishing"
            )
        missing = [k for k in REQUIRED_KEYS if k not in manifest]
        if missing:
            raise CacheError(f"{self.directory / MANIFEST}: missing keys {missing}")
        self.manifest = manifest
        for key, want in (
            ("dim", expect_dim),
            ("space", expect_space),
            ("modality", expect_modality),
        ):
            if want is not None and manifest[key] != want:
                raise CacheError(
                    f"{self.directory / MANIFEST}: {key} is {manifest[key]!r}, expected {want!r}"
                )
        if manifest["dtype"] not in DTYPES:
            raise CacheError(
                f"{self.directory / MANIFEST}: dtype {manifest['dtype']!r} not in {DTYPES}"
            )
        self.shards: list[np.ndarray] = []
        digests: dict[Path, str | None] = {}  # every file of every shard -> its recorded sha256
        for shard in manifest["shards"]:
            self.shards.append(self._open_shard(shard, digests))
        total = sum(len(s) for s in self.shards)
        if total != manifest["count"]:
            raise CacheError(
                f"{self.directory / MANIFEST}: count is {manifest['count']} but shards hold {total}"
            )
        if verify:  # after the structural checks, whose messages say more than a digest's
            verify_files(
                digests,
                recorded_in=self.directory / MANIFEST,
                repair="rerun the stage that wrote this cache, or pass overwrite=true to it",
            )
        self._extras: dict[str, np.ndarray] = {}

    def _open_shard(self, shard: Mapping, digests: dict[Path, str | None]) -> np.ndarray:
        name = shard["name"]
        for key in ("emb", "ids", *self.manifest.get("extras", [])):
            path = self.directory / f"{name}.{key}.npy"
            if not path.exists():
                raise CacheError(f"{path}: listed in the manifest but missing")
            digests[path] = shard.get("sha256", {}).get(key)
        path = self.directory / f"{name}.emb.npy"
        try:
            emb = np.load(path, mmap_mode="r")
        except (ValueError, OSError) as e:
            raise CacheError(f"{path}: unreadable ({e})") from e
        if emb.ndim != 2 or emb.shape[1] != self.dim:
            raise CacheError(f"{path}: shape {emb.shape}, expected (rows, {self.dim})")
        if emb.shape[0] != shard["rows"]:
            raise CacheError(f"{path}: {emb.shape[0]} rows, manifest says {shard['rows']}")
        if str(emb.dtype) != self.manifest["dtype"]:
            raise CacheError(f"{path}: dtype {emb.dtype}, manifest says {self.manifest['dtype']}")
        return emb

    space = property(lambda self: self.manifest["space"])
    modality = property(lambda self: self.manifest["modality"])
    dim = property(lambda self: int(self.manifest["dim"]))
    count = property(lambda self: int(self.manifest["count"]))
    normalized = property(lambda self: bool(self.manifest["normalized"]))
    fingerprint = property(lambda self: self.manifest.get("fingerprint", ""))

    def __len__(self) -> int:
        return self.count

    def extra(self, key: str) -> np.ndarray:
        """A per-row array ('ids', 'labels', ...), concatenated over shards."""
        if key not in self._extras:
            if key != "ids" and key not in self.manifest.get("extras", []):
                raise CacheError(
                    f"{self.directory}: has no {key!r} array; it has "
                    f"{['ids', *self.manifest.get('extras', [])]}"
                )
            parts = []
            for shard in self.manifest["shards"]:
                path = self.directory / f"{shard['name']}.{key}.npy"
                arr = np.load(path)
                if len(arr) != shard["rows"]:
                    raise CacheError(f"{path}: {len(arr)} rows, manifest says {shard['rows']}")
                parts.append(arr)
            self._extras[key] = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        return self._extras[key]

    @property
    def ids(self) -> np.ndarray:
        return self.extra("ids")

    def has(self, key: str) -> bool:
        return key == "ids" or key in self.manifest.get("extras", [])

    def iter_chunks(self, rows: int = 65536) -> Iterator[tuple[int, np.ndarray]]:
        """Yield (first_row, float32 chunk) over all shards, checking each chunk is finite."""
        start = 0
        for shard_index, shard in enumerate(self.shards):
            for i in range(0, len(shard), rows):
                chunk = np.asarray(shard[i : i + rows], dtype=np.float32)
                self._check_finite(chunk, shard_index, i)
                yield start + i, chunk
            start += len(shard)

    def load(self, dtype: str = "float32") -> np.ndarray:
        """All rows in memory as one (count, dim) array; NaN/inf rows raise naming the shard."""
        out = np.empty((self.count, self.dim), dtype=dtype)
        start = 0
        for shard_index, shard in enumerate(self.shards):
            out[start : start + len(shard)] = shard
            self._check_finite(out[start : start + len(shard)], shard_index, 0)
            start += len(shard)
        return out

    def _check_finite(self, chunk: np.ndarray, shard_index: int, offset: int) -> None:
        finite = np.isfinite(chunk).all(1)
        if not finite.all():
            row = offset + int(np.flatnonzero(~finite)[0])
            name = self.manifest["shards"][shard_index]["name"]
            raise CacheError(
                f"{self.directory / (name + '.emb.npy')}: row {row} holds NaN or inf "
                f"({int((~finite).sum())} bad rows in this part)"
            )


def rows_digest(ids: np.ndarray) -> str:
    """A digest of a pool's items in their order. A tuple table records it for each modality it
    indexes, so that a reader can tell that the pool changed under the table's rows."""
    if np.issubdtype(ids.dtype, np.integer):  # the format's ids: one pass over their bytes
        return hashlib.sha256(np.ascontiguousarray(ids, np.int64).tobytes()).hexdigest()[:16]
    h = hashlib.sha256()
    for item in ids.tolist():
        h.update(str(item).encode() + b"\0")
    return h.hexdigest()[:16]


def cache_dir(root: str | os.PathLike, dataset: str, space: str, modality: str) -> Path:
    """Where the cache of (dataset, space, modality) lives under `root`."""
    return Path(root) / dataset / space / modality
