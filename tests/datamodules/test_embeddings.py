"""EmbeddingDataModule: the batch contract, memory-mapped gathers, bounded residency."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import configured

from datamodules.artifacts import CacheError
from datamodules.cache import CacheWriter, cache_dir, rows_digest
from datamodules.embeddings import CacheRows, EmbeddingDataModule
from datamodules.tuples import save_tuples
from encoders.modalities import MODALITIES

POOL = {"audio": 50, "text": 40}
DIM = {"sa": 6, "sb": 4}


def _write(root: Path, dataset: str, space: str, m: str, data: np.ndarray, shards: int) -> None:
    writer = CacheWriter(
        cache_dir(root, dataset, space, m), space=space, modality=m, dim=data.shape[1]
    )
    ids = np.arange(len(data))
    for part in np.array_split(np.arange(len(data)), shards):
        writer.append(data[part], ids[part])
    writer.close()


@pytest.fixture
def world(tmp_path: Path) -> dict:
    """Pools of two spaces in 3 shards each, and a tuple table with missing items and conf."""
    rng = np.random.default_rng(0)
    data = {}
    for s, d in DIM.items():
        for m, n in POOL.items():
            data[(s, m)] = rng.standard_normal((n, d)).astype(np.float16)
            _write(tmp_path, "pool", s, m, data[(s, m)], shards=3)
    n = 30
    table = {
        "audio": rng.integers(0, POOL["audio"], n),
        "text": rng.integers(0, POOL["text"], n),
        "start": np.full(n, MODALITIES.index("audio")),
        "provenance": rng.integers(-1, 3, n),
        "conf_text": rng.random(n).astype(np.float32),
    }
    table["text"][[3, 7, 8]] = -1  # tuples without a text
    save_tuples(tmp_path / "t.npz", table, pool="pool")
    return dict(root=tmp_path, data=data, table=table)


def _dm(world: dict, **kw) -> EmbeddingDataModule:
    needs = [(s, m) for s in DIM for m in POOL]
    dm = EmbeddingDataModule(world["root"], world["root"] / "t.npz", needs, {},
                             **configured("datamodule", batch_size=8, **kw))  # fmt: skip
    dm.setup("fit")
    return dm


@pytest.mark.parametrize("resident_mb", [0, 1024])  # read from disk per batch / loaded whole
def test_batches_follow_the_contract(world: dict, resident_mb: float) -> None:
    dm = _dm(world, resident_mb=resident_mb)
    table, seen = world["table"], []
    for batch in dm.train_dataloader():
        idx = batch["index"].numpy()
        seen += idx.tolist()
        for (s, m), pool in world["data"].items():
            rows = table[m][idx]
            want = np.where((rows >= 0)[:, None], pool[rows].astype(np.float32), 0)
            got = batch["emb"][s][m]
            assert got.dtype == torch.float32 and got.shape == (len(idx), DIM[s])
            assert np.array_equal(got.numpy(), want)
        np.testing.assert_array_equal(batch["weight"]["audio"].numpy(), np.ones(len(idx)))
        conf = np.where(table["text"][idx] >= 0, table["conf_text"][idx], 0)
        np.testing.assert_array_equal(batch["weight"]["text"].numpy(), conf)
        np.testing.assert_array_equal(batch["provenance"].numpy(), table["provenance"][idx])
        np.testing.assert_array_equal(batch["start"].numpy(), table["start"][idx])
    assert len(seen) == 24 and len(set(seen)) == 24  # drop_last: 3 whole batches of 8


@pytest.mark.parametrize("in_memory", [False, True])
def test_take_reads_across_shards_in_any_order_with_repeats(world: dict, in_memory: bool) -> None:
    cache = CacheRows(cache_dir(world["root"], "pool", "sa", "audio"))
    assert len(cache) == POOL["audio"] and len(cache.files) == 3
    if in_memory:
        cache.load()
    # 16 and 17 straddle shards 0 and 1 (17 rows each): one run, two reads.
    rows = np.array([49, 0, 17, -1, 17, 33, 16, 0, -1, 34, 15])
    want = world["data"][("sa", "audio")][np.maximum(rows, 0)].astype(np.float32)
    want[rows < 0] = 0
    assert np.array_equal(cache.take(rows).numpy(), want)
    # A pickled copy (a DataLoader worker under spawn) opens the files anew and reads the same.
    assert np.array_equal(pickle.loads(pickle.dumps(cache)).take(rows).numpy(), want)


def test_whole_caches_are_loaded_only_within_the_budget(world: dict) -> None:
    # The 4 pool caches: sb (4 dims) hold 50*4*2 and 40*4*2 bytes, sa 50*6*2 and 40*6*2.
    sizes = {k: c.nbytes for k, c in _dm(world).train_set.arrays.items()}
    assert sizes[("sb", "text")] == 320 and sizes[("sa", "audio")] == 600
    loaded = {k for k, c in _dm(world, resident_mb=800 / 2**20).train_set.arrays.items()
              if c.memory is not None}  # fmt: skip
    assert loaded == {("sb", "text"), ("sb", "audio")}  # 320 + 400 fit; + 480 would not
    dm = _dm(world, resident_mb=0)
    assert all(c.memory is None for c in dm.train_set.arrays.values())
    assert len(list(dm.train_dataloader())) == 3  # and batches still follow the contract


def test_a_table_without_a_needed_modality_is_refused(world: dict, tmp_path: Path) -> None:
    table = {k: v for k, v in world["table"].items() if k not in ("text", "conf_text")}
    save_tuples(tmp_path / "t.npz", table, pool="pool")
    with pytest.raises(CacheError, match=r"t.npz: tuple table has no column for \['text'\]"):
        _dm(world)


def test_a_table_paired_on_another_pool_is_refused(world: dict, tmp_path: Path) -> None:
    """The table records each pool's items (as the pair stage does); re-extracting a pool with
    items added changes them under the table's rows: refused, naming the table and the cache."""
    ids = {m: np.arange(n) for m, n in POOL.items()}  # _write's ids
    save_tuples(tmp_path / "t.npz", world["table"], pool="pool",
                pool_rows={m: rows_digest(i) for m, i in ids.items()})  # fmt: skip
    _dm(world)  # the pools it was paired on: accepted
    for space in DIM:  # every space re-extracted, so their pools stay aligned
        data = world["data"][(space, "text")]
        shutil.rmtree(cache_dir(tmp_path, "pool", space, "text"))
        _write(tmp_path, "pool", space, "text", np.concatenate([data, data[:4]]), shards=3)
    with pytest.raises(CacheError, match=r"t.npz: paired on another text pool than .*/s[ab]/text"):
        _dm(world)


def test_rows_outside_the_pool_are_refused(world: dict, tmp_path: Path) -> None:
    table = dict(world["table"])
    table["audio"] = table["audio"].copy()
    table["audio"][0] = POOL["audio"]
    save_tuples(tmp_path / "t.npz", table, pool="pool")
    with pytest.raises(CacheError, match=r"column 'audio' indexes row 50, but the audio pool"):
        _dm(world)
