"""Files that stages hand each other: atomic writes, digests, fingerprints and verification.

There is one helper for each concern:
- `atomic_write`, `atomic_write_json`, `atomic_save_npy`: write a temp file beside the target,
  fsync it, then rename it onto the target, so a reader never sees half a file.
- `sha256_file`: the digest that manifests and export metadata record.
- `fingerprint(obj)`: a short hash of a JSON-able configuration.
- `verify_file` / `verify_files`: check files against their recorded sha256.
- `file_sha256`: a file's sha256 for freshness checks, hashed once per change of the file.

Verification hashes each file at most once per process (a memo) and, across processes, once
per change of the file: a stamp file `.verified.json` in the file's directory records
(size, mtime_ns, inode) -> sha256 for every file that matched. A file that is rewritten,
replaced or edited in place gets a new mtime (and usually a new inode), so its stamp no longer
applies and it is hashed again. bench/verify.py: sha256 runs at 0.35-0.7 GB/s on a 2-core EPYC.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

STAMP = ".verified.json"
# Filesystem timestamps are coarse (one kernel tick, up to 2 s on some filesystems). A file
# modified within that window after it was hashed could keep the same mtime, so a digest is
# remembered only for files whose mtime is at least this much older than the hashing.
RACY_NS = 2_000_000_000
REPAIR = "rerun the stage that produced it (or pass overwrite=true) to rewrite it"

# str(absolute path) -> (stat key, sha256) of files verified in this process.
_memo: dict[str, tuple[list[int], str]] = {}


class CacheError(ValueError):
    """A cache or artifact is missing, corrupt, or does not match what the caller expected."""


class CorruptFileError(CacheError):
    """A file's sha256 differs from the digest recorded for it."""


def sha256_file(path: str | os.PathLike, block: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def fingerprint(obj: Any, n: int = 16) -> str:
    """The first n hex digits of the sha256 of obj as canonical JSON (sorted keys, str fallback)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]


def atomic_write(path: Path, write) -> None:
    """Call write(fileobj) on a temp file beside `path`, fsync, then rename it onto `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_save_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    """np.save, atomically."""
    atomic_write(Path(path), lambda f: np.save(f, np.asarray(array), allow_pickle=False))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """json.dump, atomically."""
    data = json.dumps(obj, indent=1, sort_keys=False).encode()
    atomic_write(Path(path), lambda f: f.write(data))


def _stat_key(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def _read_stamp(directory: Path) -> dict:
    try:
        stamp = json.loads((directory / STAMP).read_text())
    except (OSError, ValueError):
        return {}  # none yet, or unreadable: every file is hashed (and a fresh stamp written)
    return stamp if isinstance(stamp, dict) else {}


def _remembered(path: Path, key: list[int], stamp: dict) -> str | None:
    """The digest this process or a stamp holds for `path` in its current state, if any."""
    known = _memo.get(str(path))
    if known and known[0] == key:
        return known[1]
    entry = stamp.get(path.name)
    if isinstance(entry, dict) and entry.get("key") == key and isinstance(entry.get("sha256"), str):
        return entry["sha256"]
    return None


def _hash(path: Path, key: list[int], stamp: dict) -> tuple[str, bool]:
    """Hash `path`; remember the digest (memo and `stamp`) when that is safe. -> (hex, stamped)."""
    started = time.time_ns()
    got = sha256_file(path)
    # Only if the file is old enough that a change would move its mtime, and it did not change
    # while it was being hashed.
    if started - key[1] > RACY_NS and _stat_key(path) == key:
        _memo[str(path)] = (key, got)
        stamp[path.name] = {"key": key, "sha256": got}
        return got, True
    return got, False


def _write_stamp(directory: Path, stamp: dict) -> None:
    try:
        atomic_write_json(directory / STAMP, stamp)
    except OSError:
        pass  # a read-only directory: the memo still spares this process


def file_sha256(path: str | os.PathLike) -> str:
    """A file's sha256, hashed once per change of the file (memo and stamp, as verify_files)."""
    path = Path(path).absolute()
    key = _stat_key(path)
    known = _memo.get(str(path))
    if known and known[0] == key:
        return known[1]
    stamp = _read_stamp(path.parent)
    got = _remembered(path, key, stamp)
    if got is not None:
        _memo[str(path)] = (key, got)
        return got
    got, stamped = _hash(path, key, stamp)
    if stamped:
        _write_stamp(path.parent, stamp)
    return got


def verify_files(
    expected: Mapping[str | os.PathLike, str | None],
    recorded_in: str | os.PathLike = "its metadata",
    repair: str = REPAIR,
) -> int:
    """Check each file's sha256 against `expected` {path: hex digest}; returns how many were hashed.

    Raises CorruptFileError naming the file and both digests on a mismatch, and CacheError when
    a file is missing or no digest was recorded for it. `recorded_in` and `repair` go into the
    message: where the digest came from and how to rewrite the file.
    """
    by_dir: dict[Path, list[tuple[Path, str | None]]] = {}
    for path, want in expected.items():
        path = Path(path).absolute()
        by_dir.setdefault(path.parent, []).append((path, want))
    hashed = 0
    for directory, files in by_dir.items():
        stamp, changed = _read_stamp(directory), False
        for path, want in files:
            if not want:
                raise CacheError(f"{path}: {recorded_in} records no sha256 for it; {repair}")
            try:
                key = _stat_key(path)
            except FileNotFoundError as e:
                raise CacheError(f"{path}: missing, although {recorded_in} lists it") from e
            if _remembered(path, key, stamp) == want:
                _memo[str(path)] = (key, want)
                continue
            got, stamped = _hash(path, key, stamp)  # a remembered other digest is re-checked too
            hashed += 1
            changed |= stamped
            if got != want:
                raise CorruptFileError(
                    f"{path}: sha256 does not match {recorded_in}: recorded {want}, the file has "
                    f"{got} (it is corrupt or was replaced); {repair}"
                )
        if changed:
            _write_stamp(directory, stamp)
    return hashed


def verify_file(
    path: str | os.PathLike,
    expected_sha256: str | None,
    recorded_in: str | os.PathLike = "its metadata",
    repair: str = REPAIR,
) -> None:
    """Check one file against its recorded sha256 (see verify_files); raises naming both digests."""
    verify_files({path: expected_sha256}, recorded_in, repair)


def forget_verified() -> None:
    """Drop this process's memo of verified files (the on-disk stamps stay)."""
    _memo.clear()
