"""The embedding cache: round trips, interrupted writers, corruption, refusals."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from datamodules import artifacts
from datamodules.artifacts import CacheError
from datamodules.cache import MANIFEST, CacheWriter, EmbeddingCache, cache_dir, finalize

DIM = 8


def _rows(n: int, seed: int = 0) -> np.ndarray:
    """n L2-normalised rows (n, DIM) in float32."""
    x = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _write(directory: Path, shards: list[int], dtype: str = "float16", **kw) -> np.ndarray:
    """A complete cache of the given shard sizes with a `labels` extra; returns all rows."""
    writer = CacheWriter(
        directory, space="clap", modality="audio", dim=DIM, dtype=dtype, fingerprint="fp0", **kw
    )
    parts, start = [], 0
    for i, n in enumerate(shards):
        emb = _rows(n, seed=i)
        writer.append(emb, np.arange(start, start + n), labels=np.arange(n) % 3)
        parts.append(emb)
        start += n
    writer.close(dataset="unit")
    return np.concatenate(parts)


def _manifest(directory: Path) -> dict:
    return json.loads((directory / MANIFEST).read_text())


def _edit_manifest(directory: Path, edit) -> None:
    manifest = _manifest(directory)
    edit(manifest)
    (directory / MANIFEST).write_text(json.dumps(manifest))


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


# ---------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_round_trip(tmp_path: Path, dtype: str) -> None:
    rows = _write(tmp_path / "c", [5, 7, 3], dtype=dtype)
    cache = EmbeddingCache(
        tmp_path / "c", verify=True, expect_dim=DIM, expect_space="clap", expect_modality="audio"
    )
    assert (cache.count, cache.dim, len(cache)) == (15, DIM, 15)
    assert cache.space == "clap" and cache.modality == "audio" and cache.fingerprint == "fp0"
    assert cache.manifest["dataset"] == "unit"
    np.testing.assert_array_equal(cache.load(), rows.astype(dtype).astype(np.float32))
    assert cache.load(dtype=dtype).dtype == np.dtype(dtype)
    np.testing.assert_array_equal(cache.ids, np.arange(15))
    np.testing.assert_array_equal(
        cache.extra("labels"), np.r_[np.arange(5), np.arange(7), np.arange(3)] % 3
    )
    chunks = list(cache.iter_chunks(rows=4))
    assert [start for start, _ in chunks] == [0, 4, 5, 9, 12]  # chunks never straddle shards
    np.testing.assert_array_equal(np.concatenate([c for _, c in chunks]), cache.load())


def test_per_rank_writers_merge_in_finalize(tmp_path: Path) -> None:
    d = tmp_path / "c"
    for rank in range(2):
        w = CacheWriter(d, space="clap", modality="text", dim=DIM, shard_prefix=f"rank{rank}_")
        w.append(_rows(4, seed=rank), np.arange(4) + 4 * rank)
    finalize(d, space="clap", modality="text", dim=DIM, dtype="float16", normalized=True)
    cache = EmbeddingCache(d, verify=True)
    np.testing.assert_array_equal(cache.ids, np.arange(8))
    assert [s["name"] for s in cache.manifest["shards"]] == ["rank0_00000", "rank1_00000"]


def test_a_rank_does_not_delete_another_ranks_temp_files(tmp_path: Path) -> None:
    # A temp file of rank 0's shard being written while rank 1's writer starts.
    d = tmp_path / "c"
    d.mkdir()
    in_flight = d / ".rank0_00000.emb.npy.abc.tmp"
    in_flight.write_bytes(b"partial")
    CacheWriter(d, space="clap", modality="text", dim=DIM, shard_prefix="rank1_")
    assert in_flight.exists()


# ---------------------------------------------------------------------------- interruption


def _interrupt_during_emb(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the next `.emb.npy` write die half-way, as a killed process would."""
    real = artifacts.atomic_write

    def dying(path: Path, write) -> None:
        if path.name.endswith(".emb.npy"):

            def half(f) -> None:
                f.write(b"\x93NUMPY partial")
                raise KeyboardInterrupt

            return real(path, half)
        return real(path, write)

    monkeypatch.setattr(artifacts, "atomic_write", dying)


def test_write_interrupted_mid_shard(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = tmp_path / "c"
    writer = CacheWriter(d, space="clap", modality="audio", dim=DIM, fingerprint="fp0")
    writer.append(_rows(5), np.arange(5), labels=np.zeros(5, np.int64))
    with monkeypatch.context() as m:
        _interrupt_during_emb(m)
        with pytest.raises(KeyboardInterrupt):
            writer.append(_rows(6, seed=1), np.arange(5, 11), labels=np.ones(6, np.int64))
    # The dying write left no temp file and no embeddings of shard 1; there is no manifest.
    assert not list(d.glob(".*.tmp"))
    assert sorted(p.name for p in d.glob("*.emb.npy")) == ["shard_00000.emb.npy"]
    with pytest.raises(CacheError, match="interrupted") as e:
        EmbeddingCache(d)
    assert str(d) in str(e.value)

    # Finalizing what is there gives a cache of the complete shard only.
    finalize(d, **writer.meta)
    cache = EmbeddingCache(d, verify=True)
    assert cache.count == 5
    np.testing.assert_array_equal(cache.ids, np.arange(5))


def test_resume_after_interruption(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = tmp_path / "c"
    writer = CacheWriter(d, space="clap", modality="audio", dim=DIM, fingerprint="fp0")
    writer.append(_rows(5), np.arange(5), labels=np.zeros(5, np.int64))
    with monkeypatch.context() as m:
        _interrupt_during_emb(m)
        with pytest.raises(KeyboardInterrupt):
            writer.append(_rows(6, seed=1), np.arange(5, 11), labels=np.ones(6, np.int64))
    (d / ".shard_00001.emb.npy.left-by-kill.tmp").write_bytes(b"junk")  # SIGKILL skips cleanup

    resumed = CacheWriter(
        d, space="clap", modality="audio", dim=DIM, fingerprint="fp0", resume=True
    )
    np.testing.assert_array_equal(resumed.done_ids(), np.arange(5))
    resumed.append(_rows(6, seed=1), np.arange(5, 11), labels=np.ones(6, np.int64))
    resumed.close()
    cache = EmbeddingCache(d, verify=True)
    np.testing.assert_array_equal(cache.ids, np.arange(11))
    np.testing.assert_array_equal(cache.extra("labels"), np.r_[np.zeros(5), np.ones(6)])

    # Without resume, a new writer starts over: leftovers of the old one are gone.
    (d / MANIFEST).unlink()
    fresh = CacheWriter(d, space="clap", modality="audio", dim=DIM, fingerprint="fp0")
    assert len(fresh.done_ids()) == 0 and not list(d.glob(".*.tmp"))


def test_existing_cache_with_other_fingerprint_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "c"
    _write(d, [4])
    with pytest.raises(CacheError, match="different configuration") as e:
        CacheWriter(d, space="clap", modality="audio", dim=DIM, fingerprint="fp1")
    assert str(d) in str(e.value) and "overwrite" in str(e.value)
    with pytest.raises(CacheError, match="already complete"):
        CacheWriter(d, space="clap", modality="audio", dim=DIM, fingerprint="fp0")
    CacheWriter(d, space="clap", modality="audio", dim=DIM, fingerprint="fp1", overwrite=True)
    assert not (d / MANIFEST).exists()


# ---------------------------------------------------------------------------- corruption


def _age(directory: Path, seconds: int = 3600) -> None:
    """Date every file in `directory` back, as if written long ago (outside the racy window)."""
    for path in directory.iterdir():
        t = path.stat().st_mtime_ns - seconds * 10**9
        os.utime(path, ns=(t, t))


def _count_hashing(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record every file that verification hashes."""
    hashed, real = [], artifacts.sha256_file
    monkeypatch.setattr(artifacts, "sha256_file", lambda p: hashed.append(Path(p).name) or real(p))
    return hashed


@pytest.mark.parametrize("key", ["emb", "ids", "labels"])
def test_flipped_byte_is_refused_on_open(tmp_path: Path, key: str) -> None:
    d = tmp_path / "c"
    _write(d, [4, 4])
    bad = d / f"shard_00001.{key}.npy"
    recorded = _manifest(d)["shards"][1]["sha256"][key]
    _flip_last_byte(bad)
    EmbeddingCache(d, verify=False)  # the header is intact, so only hashing can tell
    with pytest.raises(CacheError, match="sha256") as e:
        EmbeddingCache(d)
    message = str(e.value)
    assert str(bad) in message and recorded in message and artifacts.sha256_file(bad) in message
    assert "overwrite=true" in message and str(d / MANIFEST) in message


def test_flipped_finite_value_is_refused_even_after_a_verified_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    d = tmp_path / "c"
    _write(d, [4, 4])
    _age(d)
    EmbeddingCache(d)  # verified, and stamped
    shard = d / "shard_00000.emb.npy"
    before = np.load(shard)
    data = bytearray(shard.read_bytes())
    data[-2] ^= 0x01  # the low mantissa bit of the last float16: still a finite, plausible value
    shard.write_bytes(bytes(data))
    after = np.load(shard)
    assert np.isfinite(after).all() and (after != before).sum() == 1
    with pytest.raises(artifacts.CorruptFileError, match="shard_00000.emb.npy: sha256"):
        EmbeddingCache(d)
    artifacts.forget_verified()  # a new process, reading only the stamp, refuses it too
    with pytest.raises(artifacts.CorruptFileError, match="shard_00000.emb.npy: sha256"):
        EmbeddingCache(d)


def test_unchanged_cache_is_hashed_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = tmp_path / "c"
    _write(d, [4, 4])
    _age(d)
    hashed = _count_hashing(monkeypatch)
    EmbeddingCache(d)
    assert len(hashed) == 6  # 2 shards x (emb, ids, labels)
    EmbeddingCache(d)
    assert len(hashed) == 6  # this process remembers them
    artifacts.forget_verified()
    EmbeddingCache(d)
    assert len(hashed) == 6  # another process trusts the stamp: sizes, mtimes, inodes unchanged
    assert (d / artifacts.STAMP).exists()
    # Rewriting a shard with the same bytes moves its mtime: only that file is hashed again.
    ids = d / "shard_00001.ids.npy"
    ids.write_bytes(ids.read_bytes())
    artifacts.forget_verified()
    EmbeddingCache(d)
    assert hashed[6:] == ["shard_00001.ids.npy"]
    EmbeddingCache(d, verify=False)
    assert len(hashed) == 7


def test_manifest_without_digests_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "c"
    _write(d, [4])
    _edit_manifest(d, lambda m: m["shards"][0].pop("sha256"))
    with pytest.raises(CacheError, match="records no sha256") as e:
        EmbeddingCache(d)
    assert "shard_00000.emb.npy" in str(e.value)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda m: m.update(count=m["count"] + 1), "count is 9 but shards hold 8"),
        (lambda m: m["shards"][1].update(rows=5), "shard_00001.emb.npy: 4 rows, manifest says 5"),
        (lambda m: m.update(dim=DIM + 1), r"shard_00000.emb.npy: shape \(4, 8\), expected"),
        (lambda m: m.update(dtype="float32"), "shard_00000.emb.npy: dtype float16"),
        (lambda m: m.update(dtype="int8"), "dtype 'int8' not in"),
        (
            lambda m: m["shards"].append(dict(name="shard_00002", rows=4, sha256={})),
            "shard_00002.emb.npy: listed in the manifest but missing",
        ),
        (lambda m: m.pop("dim"), r"missing keys \['dim'\]"),
    ],
)
def test_manifest_that_disagrees_with_shards(tmp_path: Path, edit, match: str) -> None:
    d = tmp_path / "c"
    _write(d, [4, 4])
    _edit_manifest(d, edit)
    with pytest.raises(CacheError, match=match):
        EmbeddingCache(d)


def test_unreadable_manifest_and_shard(tmp_path: Path) -> None:
    d = tmp_path / "c"
    _write(d, [4])
    (d / "shard_00000.emb.npy").write_bytes(b"not a numpy file")
    with pytest.raises(CacheError, match="shard_00000.emb.npy: unreadable"):
        EmbeddingCache(d)
    (d / MANIFEST).write_text("{ truncated")
    with pytest.raises(CacheError, match="manifest is not valid JSON") as e:
        EmbeddingCache(d)
    assert str(d / MANIFEST) in str(e.value)


def test_wrong_dim_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "c"
    _write(d, [4])
    with pytest.raises(CacheError, match="dim is 8, expected 16") as e:
        EmbeddingCache(d, expect_dim=16)
    assert str(d / MANIFEST) in str(e.value)
    writer = CacheWriter(tmp_path / "w", space="clap", modality="audio", dim=DIM)
    with pytest.raises(CacheError, match=r"shape \(3, 16\), expected \(rows, 8\)"):
        writer.append(np.zeros((3, 16), np.float32), np.arange(3))
    with pytest.raises(CacheError, match="labels has 2 rows, embeddings 3"):
        writer.append(_rows(3), np.arange(3), labels=np.arange(2))


def test_nan_rows_are_refused_on_write_and_on_load(tmp_path: Path) -> None:
    writer = CacheWriter(tmp_path / "w", space="clap", modality="audio", dim=DIM)
    bad = _rows(4)
    bad[2, 1] = np.nan
    with pytest.raises(CacheError, match="row 2"):
        writer.append(bad, np.arange(4))

    d = tmp_path / "c"
    _write(d, [4, 4])
    shard = d / "shard_00001.emb.npy"
    emb = np.load(shard)
    emb[3, 0] = np.inf
    np.save(shard, emb)  # corrupted behind the manifest's back, same shape and dtype
    with pytest.raises(CacheError, match="sha256"):
        EmbeddingCache(d)
    cache = EmbeddingCache(d, verify=False)  # unverified reads still never yield NaN/inf
    with pytest.raises(CacheError, match="row 3 holds NaN or inf") as e:
        cache.load()
    assert str(shard) in str(e.value)
    with pytest.raises(CacheError, match="row 3 holds NaN or inf"):
        list(cache.iter_chunks(rows=2))


def test_missing_cache(tmp_path: Path) -> None:
    missing = cache_dir(tmp_path, "pool", "nosuch_space", "audio")
    with pytest.raises(CacheError, match="no such cache directory") as e:
        EmbeddingCache(missing)
    assert "nosuch_space" in str(e.value)
    missing.mkdir(parents=True)
    with pytest.raises(CacheError, match="no manifest.json"):
        EmbeddingCache(missing)


def test_unknown_space_modality_and_extra(tmp_path: Path) -> None:
    d = tmp_path / "c"
    _write(d, [4])
    with pytest.raises(CacheError, match="space is 'clap', expected 'wavcaps'"):
        EmbeddingCache(d, expect_space="wavcaps")
    with pytest.raises(CacheError, match="modality is 'audio', expected 'text'"):
        EmbeddingCache(d, expect_modality="text")
    with pytest.raises(ValueError, match=r"unknown modality 'video'.*'point', 'audio'"):
        CacheWriter(tmp_path / "v", space="clap", modality="video", dim=DIM)
    with pytest.raises(CacheError, match=r"has no 'provenance' array; it has \['ids', 'labels'\]"):
        EmbeddingCache(d).extra("provenance")
    with pytest.raises(CacheError, match="dtype 'bfloat16'"):
        CacheWriter(tmp_path / "b", space="clap", modality="audio", dim=DIM, dtype="bfloat16")
