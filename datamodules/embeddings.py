"""DataModules that serve cached embeddings in whole batches gathered from in-memory tensors.

A batch is never built item by item: a sampler yields a tensor of row indices, and the dataset
gathers every needed (space, modality) array with one index operation per array.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from datamodules.cache import CacheError, EmbeddingCache, cache_dir
from datamodules.tuples import load_tuples
from encoders.modalities import MODALITIES

Needs = Iterable[tuple[str, str]]  # (space, modality) pairs a model reads


def load_embeddings(
    root: str | Path, dataset: str, space: str, modality: str, expect_dim: int | None = None
) -> torch.Tensor:
    """A whole cache as a tensor in its stored dtype (float16 stays float16 in memory)."""
    cache = EmbeddingCache(
        cache_dir(root, dataset, space, modality), expect_dim=expect_dim,
        expect_space=space, expect_modality=modality,
    )  # fmt: skip
    return torch.from_numpy(cache.load(dtype=cache.manifest["dtype"]))


class BatchGather(Dataset):
    """Map-style dataset whose index is a whole batch of rows.

    arrays: {(space, modality): (n_rows_of_that_pool, dim)} tensors.
    rows: {modality: (n,) int64} maps a dataset row to each modality's pool row (tuples), or None
    when row i of every array belongs together (paired sets).
    columns: extra per-row tensors (n,) returned as they are (start, provenance, labels).
    """

    def __init__(
        self,
        arrays: Mapping[tuple[str, str], torch.Tensor],
        rows: Mapping[str, torch.Tensor] | None,
        columns: Mapping[str, torch.Tensor],
        length: int,
    ) -> None:
        self.arrays, self.rows, self.columns, self.length = arrays, rows, columns, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: torch.Tensor) -> dict:
        emb: dict[str, dict[str, torch.Tensor]] = {}
        for (space, modality), array in self.arrays.items():
            # index_select copies whole rows; tensor[idx] goes through the generic advanced-
            # indexing kernel and made the loader 1.6x slower (bench/data_path.py).
            idx = index if self.rows is None else self.rows[modality].index_select(0, index)
            emb.setdefault(space, {})[modality] = array.index_select(0, idx).float()
        return {"emb": emb, "index": index, **{k: v[index] for k, v in self.columns.items()}}


class EpochBatchSampler(Sampler[torch.Tensor]):
    """Yields index tensors: a seeded permutation per epoch (or the identity), sharded by rank.

    Every rank draws the same permutation (seed + epoch) and takes every world_size-th batch, so
    an interrupted run that restarts an epoch sees exactly the same batches again.
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        shuffle: bool,
        drop_last: bool,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if n == 0:
            raise ValueError("cannot sample batches from an empty dataset")
        self.n, self.batch_size, self.shuffle, self.drop_last = n, batch_size, shuffle, drop_last
        self.seed, self.rank, self.world_size, self.epoch = seed, rank, world_size, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _batches(self) -> list[torch.Tensor]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.n, generator=g)
        else:
            order = torch.arange(self.n)
        batches = list(order.split(self.batch_size))
        if self.drop_last and len(batches) > 1 and len(batches[-1]) < self.batch_size:
            batches.pop()
        # Pad so that every rank runs the same number of steps (DDP needs it); metrics dedupe rows.
        per_rank = math.ceil(len(batches) / self.world_size)
        batches += batches[: per_rank * self.world_size - len(batches)]
        return batches[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[torch.Tensor]:
        # Lazy: on resume Lightning creates the iterator before it calls set_epoch, so the
        # permutation must be drawn at the first batch, not here (else epoch 0 is replayed).
        yield from self._batches()

    def __len__(self) -> int:
        return len(self._batches())


def _loader(dataset: BatchGather, sampler: EpochBatchSampler, workers: int) -> DataLoader:
    # batch_size=None: the sampler's index tensor is the batch; no default collate runs.
    return DataLoader(
        dataset,
        sampler=sampler,
        batch_size=None,
        num_workers=workers,
        persistent_workers=workers > 0,
    )


class EmbeddingDataModule(L.LightningDataModule):
    """Train batches of pseudo tuples and validation batches of paired retrieval sets.

    root: the cache root; tuples: a tuple table whose rows index the `pool` dataset's caches;
    needs: the (space, modality) arrays the model reads; dims: {(space, modality): dim} expected;
    val_pairs: modality pairs whose `<val_prefix>_<a>_<b>` datasets serve validation;
    roots: per-space cache roots that differ from `root` (e.g. projected caches).
    """

    def __init__(
        self,
        root: str | Path,
        tuples: str | Path,
        needs: Needs,
        dims: Mapping[tuple[str, str], int],
        val_pairs: Iterable[tuple[str, str]] = (),
        batch_size: int = 512,
        val_batch_size: int = 1024,
        seed: int = 0,
        num_workers: int = 0,
        val_prefix: str = "val",
        roots: Mapping[str, str | Path] | None = None,
    ) -> None:
        super().__init__()
        self.root, self.tuples = Path(root), Path(tuples)
        self.roots = {s: Path(r) for s, r in (roots or {}).items()}
        self.needs = sorted(set(needs))
        self.dims = dict(dims)
        self.val_pairs = [tuple(p) for p in val_pairs]
        self.batch_size, self.val_batch_size = batch_size, val_batch_size
        self.seed, self.num_workers, self.val_prefix = seed, num_workers, val_prefix
        self.train_set: BatchGather | None = None
        self.val_sets: list[BatchGather] = []

    def _root(self, space: str) -> Path:
        return self.roots.get(space, self.root)

    def _rank(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            self.train_set = self._tuple_set()
            self.val_sets = [self._paired_set(a, b) for a, b in self.val_pairs]

    def _tuple_set(self) -> BatchGather:
        table, meta = load_tuples(self.tuples)
        pool = meta["pool"]
        arrays = {(s, m): load_embeddings(self._root(s), pool, s, m, self.dims.get((s, m)))
                  for s, m in self.needs}  # fmt: skip
        rows = {}
        for m in sorted({m for _, m in self.needs}):
            idx = torch.from_numpy(table[m])
            count = min(len(a) for (s, mm), a in arrays.items() if mm == m)
            if len(idx) and (idx.min() < 0 or idx.max() >= count):
                raise CacheError(
                    f"{self.tuples}: column {m!r} indexes row {int(idx.max())}, but the {pool!r} "
                    f"{m} caches hold {count} rows (tuples from another pool?)"
                )
            rows[m] = idx
        self._check_aligned(pool, arrays)
        columns = {k: torch.from_numpy(table[k].astype(np.int64)) for k in ("start", "provenance")}
        return BatchGather(arrays, rows, columns, len(table["start"]))

    def _check_aligned(self, dataset: str, arrays: Mapping) -> None:
        """All spaces' caches of one (dataset, modality) must hold the same items in order."""
        for m in MODALITIES:
            spaces = [s for s, mm in arrays if mm == m]
            dirs = [cache_dir(self._root(s), dataset, s, m) for s in spaces]
            ids = [EmbeddingCache(d).ids for d in dirs]
            for d, i in zip(dirs[1:], ids[1:], strict=True):
                if len(i) != len(ids[0]) or not np.array_equal(i, ids[0]):
                    raise CacheError(
                        f"{d}: item ids differ from {dirs[0]}; caches must be row-aligned"
                    )

    def _paired_set(self, a: str, b: str) -> BatchGather:
        dataset = f"{self.val_prefix}_{a}_{b}"
        wanted = [(s, m) for s, m in self.needs if m in (a, b)]
        arrays = {(s, m): load_embeddings(self._root(s), dataset, s, m, self.dims.get((s, m)))
                  for s, m in wanted}  # fmt: skip
        lengths = {len(x) for x in arrays.values()}
        if len(lengths) != 1:
            raise CacheError(f"{self.root / dataset}: its caches disagree on row count {lengths}")
        return BatchGather(arrays, None, {}, lengths.pop())

    def train_dataloader(self) -> DataLoader:
        rank, world = self._rank()
        sampler = EpochBatchSampler(
            len(self.train_set),
            self.batch_size,
            shuffle=True,
            drop_last=True,
            seed=self.seed,
            rank=rank,
            world_size=world,
        )
        return _loader(self.train_set, sampler, self.num_workers)

    def val_dataloader(self) -> list[DataLoader]:
        rank, world = self._rank()
        return [
            _loader(
                s, EpochBatchSampler(len(s), self.val_batch_size, False, False, 0, rank, world), 0
            )
            for s in self.val_sets
        ]
