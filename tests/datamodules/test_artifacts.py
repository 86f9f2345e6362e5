"""Artifact helpers: the one fingerprint, atomic writes, and verification against digests."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from datamodules import artifacts
from datamodules.artifacts import (
    STAMP,
    CacheError,
    CorruptFileError,
    atomic_write_json,
    file_sha256,
    fingerprint,
    forget_verified,
    sha256_file,
    verify_file,
    verify_files,
)


def _old_file(path: Path, data: bytes, age_s: int = 3600) -> Path:
    """A file written `age_s` seconds ago (outside the racy window of coarse mtimes)."""
    path.write_bytes(data)
    t = path.stat().st_mtime_ns - age_s * 10**9
    os.utime(path, ns=(t, t))
    return path


def test_fingerprint_is_canonical_json_sha256() -> None:
    obj = {"b": [1, 2.5, None], "a": {"y": "x", "path": Path("/p")}}
    canonical = json.dumps(obj, sort_keys=True, default=str).encode()
    assert fingerprint(obj) == hashlib.sha256(canonical).hexdigest()[:16]
    reordered = {"a": {"path": Path("/p"), "y": "x"}, "b": [1, 2.5, None]}
    assert fingerprint(reordered) == fingerprint(obj)
    assert fingerprint(obj, n=64) == hashlib.sha256(canonical).hexdigest()
    assert fingerprint({**obj, "b": [1, 2.5]}) != fingerprint(obj)


def test_atomic_write_json_leaves_no_temp_file_on_failure(tmp_path: Path) -> None:
    atomic_write_json(tmp_path / "a.json", {"x": 1})
    with pytest.raises(TypeError):
        atomic_write_json(tmp_path / "a.json", {"x": object()})
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_mismatch_names_the_file_and_both_digests(tmp_path: Path) -> None:
    path = _old_file(tmp_path / "w.bin", b"weights")
    want = sha256_file(path)
    verify_file(path, want)
    path.write_bytes(b"weightz")
    with pytest.raises(CorruptFileError) as e:
        verify_file(path, want, recorded_in=tmp_path / "meta.json", repair="rerun stage=x")
    message = str(e.value)
    assert str(path) in message and want in message and sha256_file(path) in message
    assert str(tmp_path / "meta.json") in message and "rerun stage=x" in message
    assert isinstance(e.value, CacheError)  # callers that catch CacheError catch it too


def test_missing_file_or_digest_is_refused(tmp_path: Path) -> None:
    with pytest.raises(CacheError, match="nope.bin: missing, although meta.json lists it"):
        verify_file(tmp_path / "nope.bin", "0" * 64, recorded_in="meta.json")
    path = _old_file(tmp_path / "w.bin", b"x")
    with pytest.raises(CacheError, match="w.bin: meta.json records no sha256"):
        verify_file(path, None, recorded_in="meta.json")


def test_stamp_spares_rehashing_until_the_file_changes(tmp_path: Path) -> None:
    files = {_old_file(tmp_path / f"{i}.bin", bytes([i]) * 100): None for i in range(3)}
    files = {p: sha256_file(p) for p in files}
    assert verify_files(files) == 3
    assert verify_files(files) == 0  # memo
    forget_verified()
    assert verify_files(files) == 0  # stamp, read by "another process"
    stamp = json.loads((tmp_path / STAMP).read_text())
    assert sorted(stamp) == ["0.bin", "1.bin", "2.bin"]

    # A stale stamp (another mtime, same bytes) forces a re-hash, which passes and re-stamps.
    first = next(iter(files))
    t = first.stat().st_mtime_ns - 10**9
    os.utime(first, ns=(t, t))
    forget_verified()
    assert verify_files(files) == 1
    assert verify_files(files) == 0

    # A stamp naming another digest than the one expected now is not trusted either.
    other = {first: hashlib.sha256(b"something else").hexdigest()}
    with pytest.raises(CorruptFileError):
        verify_files(other)


def test_recently_written_files_are_not_remembered(tmp_path: Path) -> None:
    # An edit within one mtime tick of the hashing would keep the mtime: do not trust it.
    path = tmp_path / "fresh.bin"
    path.write_bytes(b"fresh")
    want = sha256_file(path)
    assert verify_file(path, want) is None
    assert verify_files({path: want}) == 1  # hashed again
    assert not (tmp_path / STAMP).exists()


def test_file_sha256_hashes_once_per_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hashed, real = [], artifacts.sha256_file
    monkeypatch.setattr(artifacts, "sha256_file", lambda p: hashed.append(p) or real(p))
    path = _old_file(tmp_path / "t.npz", b"table")
    want = hashlib.sha256(b"table").hexdigest()
    assert file_sha256(path) == want and file_sha256(path) == want
    forget_verified()
    assert file_sha256(path) == want and len(hashed) == 1  # the stamp, in "another process"
    verify_file(path, want)  # shares the memo and stamp
    path.write_bytes(b"tablE")
    assert file_sha256(path) == hashlib.sha256(b"tablE").hexdigest() and len(hashed) == 2
    with pytest.raises(CorruptFileError):
        verify_file(path, want)


def test_unreadable_stamp_is_ignored(tmp_path: Path) -> None:
    path = _old_file(tmp_path / "w.bin", b"w")
    (tmp_path / STAMP).write_text("{ torn")
    forget_verified()
    assert verify_files({path: sha256_file(path)}) == 1
    assert "w.bin" in json.loads((tmp_path / STAMP).read_text())

