"""DataModules that serve cached embeddings in whole batches gathered from cache shards.

A batch is never built item by item: a sampler yields a tensor of row indices, and the dataset
gathers every needed (space, modality) array with one index operation per array. Caches that fit
the datamodule's memory budget (`resident_mb`) are loaded whole; the others stay on disk and each
batch reads only its rows, so peak RSS does not grow with the pool (bench/route_memory.py).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from datamodules.artifacts import CacheError
from datamodules.cache import EmbeddingCache, cache_dir, rows_digest
from datamodules.tuples import check_pool_rows, load_tuples, modalities_of, weights_of
from encoders.modalities import MODALITIES

log = logging.getLogger(__name__)
Needs = Iterable[tuple[str, str]]  # (space, modality) pairs a model reads
TORCH_DTYPES = {"float16": torch.float16, "float32": torch.float32}


def load_embeddings(
    root: str | Path, dataset: str, space: str, modality: str, expect_dim: int | None = None
) -> torch.Tensor:
    """A whole cache as a tensor in its stored dtype (float16 stays float16 in memory)."""
    cache = EmbeddingCache(
        cache_dir(root, dataset, space, modality), expect_dim=expect_dim,
        expect_space=space, expect_modality=modality,
    )  # fmt: skip
    return torch.from_numpy(cache.load(dtype=cache.manifest["dtype"]))


class CacheRows:
    """Rows of one cache: in memory after `load()`, else read from the shard files per batch.

    Opening validates the cache (EmbeddingCache: manifest, shapes, digests). On-disk reads use
    pread, not mmap: a kernel whose page cache holds large folios maps up to ~1 MiB into the
    process per row read through a map, so a 512-row batch grew RSS by ~150 MiB per array.
    """

    def __init__(
        self,
        directory: str | Path,
        expect_dim: int | None = None,
        expect_space: str | None = None,
        expect_modality: str | None = None,
    ) -> None:
        cache = EmbeddingCache(
            directory, expect_dim=expect_dim, expect_space=expect_space,
            expect_modality=expect_modality,
        )  # fmt: skip
        self.directory, self.dim = cache.directory, cache.dim
        self.dtype = cache.manifest["dtype"]
        self.row_bytes = self.dim * np.dtype(self.dtype).itemsize
        # np.memmap's public filename/offset: where each shard's rows start in its .npy file.
        self.files = [(str(s.filename), int(s.offset)) for s in cache.shards]
        self.starts = torch.tensor([0, *np.cumsum([len(s) for s in cache.shards])])
        self.nbytes = len(self) * self.row_bytes
        self.memory: torch.Tensor | None = None  # (count, dim) stored dtype, after load()
        self._fds: list[int] | None = None

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fds": None}  # each process opens its own descriptors

    def __del__(self) -> None:
        for fd in getattr(self, "_fds", None) or ():
            os.close(fd)

    def load(self) -> None:
        """Hold the whole cache in memory (stored dtype), checked for NaN/inf once."""
        cache = EmbeddingCache(self.directory, verify=False)  # verified when opened above
        self.memory = torch.from_numpy(cache.load(dtype=self.dtype))

    def take(self, rows: np.ndarray | torch.Tensor) -> torch.Tensor:
        """(n, dim) float32 copy of pool rows (n,) int64; rows of -1 (missing items) are zeros."""
        rows = torch.as_tensor(rows, dtype=torch.int64)
        missing = rows < 0
        any_missing = bool(missing.any())
        safe = rows.clamp(min=0) if any_missing else rows
        if self.memory is not None:
            out = self.memory.index_select(0, safe)
        else:
            # Each distinct row once, in file order (runs of neighbours in one read), then
            # scattered back to the asked order.
            unique, inverse = torch.unique(safe, sorted=True, return_inverse=True)
            out = self._read(unique.numpy()).index_select(0, inverse)
        out = out.float()
        if any_missing:
            out.masked_fill_(missing[:, None], 0.0)
        return out

    def _read(self, rows: np.ndarray) -> torch.Tensor:
        """(n, dim) stored-dtype rows for sorted unique pool rows (n,), read with pread."""
        if self._fds is None:
            self._fds = [os.open(path, os.O_RDONLY) for path, _ in self.files]
        starts = self.starts.numpy()
        shard = np.searchsorted(starts, rows, side="right") - 1
        # A run: consecutive rows of one shard, read with one call.
        first = np.flatnonzero(np.r_[True, (np.diff(rows) != 1) | (np.diff(shard) != 0)])
        lengths = np.diff(np.r_[first, len(rows)])
        width, pread = self.row_bytes, os.pread
        offsets = [off for _, off in self.files]
        chunks = [
            pread(self._fds[i], n * width, offsets[i] + (r - int(starts[i])) * width)
            for r, n, i in zip(
                rows[first].tolist(), lengths.tolist(), shard[first].tolist(), strict=True
            )
        ]
        data = bytearray(b"".join(chunks))  # writable, so torch wraps it without a copy warning
        return torch.frombuffer(data, dtype=TORCH_DTYPES[self.dtype]).view(len(rows), self.dim)


class BatchGather(Dataset):
    """Map-style dataset whose index is a whole batch of rows.

    arrays: {(space, modality): CacheRows}. rows: {modality: (n,) int64 tensor} maps a dataset
    row to each modality's pool row, -1 where the tuple has no item of it (tuples), or None when
    row i of every array belongs together (paired sets). weights: {modality: (n,) float32}
    (absent: ones). columns: extra per-row arrays (n,) returned as they are (start, provenance).
    """

    def __init__(
        self,
        arrays: Mapping[tuple[str, str], CacheRows],
        rows: Mapping[str, torch.Tensor] | None,
        columns: Mapping[str, torch.Tensor],
        length: int,
        weights: Mapping[str, np.ndarray] | None = None,
    ) -> None:
        self.arrays, self.rows, self.columns, self.length = arrays, rows, columns, length
        self.weights = {m: torch.from_numpy(w) for m, w in (weights or {}).items()}
        self.modalities = sorted({m for _, m in arrays})

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: torch.Tensor) -> dict:
        emb: dict[str, dict[str, torch.Tensor]] = {}
        for (space, modality), cache in self.arrays.items():
            rows = index if self.rows is None else self.rows[modality].index_select(0, index)
            out = cache.take(rows)
            if cache.memory is None and not math.isfinite(float(out.sum())):
                # Read from disk after the open's digest check: catch a file changed since. One
                # sum (rows are finite and small, so it cannot overflow) costs a tenth of
                # torch.isfinite(out).all(). Loaded caches were checked whole by load().
                bad = int(rows[int((~torch.isfinite(out)).any(1).nonzero()[0])])
                raise CacheError(f"{cache.directory}: pool row {bad} holds NaN or inf")
            emb.setdefault(space, {})[modality] = out
        weight = {
            m: self.weights[m][index] if m in self.weights else torch.ones(len(index))
            for m in self.modalities
        }
        columns = {k: v[index] for k, v in self.columns.items()}
        return {"emb": emb, "weight": weight, "index": index, **columns}


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
    roots: per-space cache roots that differ from `root` (e.g. projected caches);
    resident_mb: memory for whole caches (the smallest first); the others stay on disk and
    each batch reads its rows (see CacheRows). seed, resident_mb, val_share and val_max are
    conf/datamodule/embeddings.yaml's, declared there once; the stage gives the batch size.

    Train batches: {"emb": {space: {modality: (B, dim) float32}}, "weight": {modality: (B,)},
    "start", "provenance", "index"}; a row whose tuple lacks modality m has zeros and weight 0
    for m, and its weight is the table's conf_m otherwise (1 when the table has none).
    """

    def __init__(
        self,
        root: str | Path,
        tuples: str | Path,
        needs: Needs,
        dims: Mapping[tuple[str, str], int],
        val_pairs: Iterable[tuple[str, str]] = (),
        *,
        batch_size: int,
        seed: int,
        resident_mb: float,
        val_share: float,
        val_max: int,
        val_batch_size: int = 1024,
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
        self.resident_mb = resident_mb
        self.val_share, self.val_max = val_share, val_max
        self.pseudo_validated: list[tuple[str, str]] = []  # pairs validated on held-out tuples
        self.train_set: BatchGather | None = None
        self.val_sets: list[BatchGather] = []

    def _root(self, space: str) -> Path:
        return self.roots.get(space, self.root)

    def _rank(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            table, meta = load_tuples(self.tuples)
            paired = {p: self._has_paired(*p) for p in self.val_pairs}
            held = None if all(paired.values()) else self._held_out(len(table["start"]))
            self.train_set = self._tuple_set(table, meta, held)
            self.val_sets = []
            for a, b in self.val_pairs:
                if paired[(a, b)]:
                    self.val_sets.append(self._paired_set(a, b))
                    continue
                self.val_sets.append(self._pseudo_set(a, b, table, held))
                self.pseudo_validated.append((a, b))
            if self.pseudo_validated:
                log.warning(
                    "no paired %s_<a>_<b> sets for %s under %s: validating on %d held-out pseudo "
                    "tuples instead (pseudo-validated: the scores measure agreement with the pair "
                    "stage, not ground truth)", self.val_prefix, self.pseudo_validated,
                    self.root, len(held),
                )  # fmt: skip
            self._load_within_budget([self.train_set, *self.val_sets])

    def _has_paired(self, a: str, b: str) -> bool:
        """True when every cache the model reads of `<val_prefix>_<a>_<b>` exists."""
        dataset = f"{self.val_prefix}_{a}_{b}"
        return all(
            cache_dir(self._root(s), dataset, s, m).exists() for s, m in self.needs if m in (a, b)
        )

    def _held_out(self, n: int) -> np.ndarray:
        """Sorted tuple rows kept out of training to validate on: val_share of n, <= val_max."""
        count = min(self.val_max, max(2, int(self.val_share * n)))
        if count >= n:
            raise CacheError(f"{self.tuples}: {n} tuples are too few to hold {count} out for "
                             "validation; give paired val sets or more tuples")  # fmt: skip
        return np.sort(np.random.default_rng(self.seed).choice(n, count, replace=False))

    def _pseudo_set(self, a: str, b: str, table: Mapping, held: np.ndarray) -> BatchGather:
        """Validation pairs (a, b) from held-out tuples that have both items."""
        both = held[(table[a][held] >= 0) & (table[b][held] >= 0)]
        if len(both) < 2:
            raise CacheError(
                f"{self.tuples}: fewer than 2 held-out tuples have both {a} and {b} to validate "
                f"{a}<->{b} on; give a {self.val_prefix}_{a}_{b} set"
            )
        arrays = {(s, m): c for (s, m), c in self.train_set.arrays.items() if m in (a, b)}
        rows = {m: torch.from_numpy(np.asarray(table[m][both], np.int64)) for m in (a, b)}
        return BatchGather(arrays, rows, {}, len(both))

    def _load_within_budget(self, sets: list[BatchGather]) -> None:
        """Load the smallest caches whole while they fit `resident_mb`; the rest read per batch."""
        caches = sorted((c for s in sets for c in s.arrays.values()), key=lambda c: c.nbytes)
        left = self.resident_mb * 2**20
        for cache in caches:
            if cache.nbytes > left:
                break
            cache.load()
            left -= cache.nbytes

    def _open(self, dataset: str, wanted: Iterable[tuple[str, str]]) -> dict:
        arrays = {
            (s, m): CacheRows(cache_dir(self._root(s), dataset, s, m), self.dims.get((s, m)), s, m)
            for s, m in wanted
        }
        self._check_aligned(dataset, arrays)
        return arrays

    def _tuple_set(self, table: Mapping, meta: Mapping, held: np.ndarray | None) -> BatchGather:
        """The training tuples, less the `held` rows (validation) when given."""
        if held is not None:
            keep = np.ones(len(table["start"]), bool)
            keep[held] = False
            table = {k: v[keep] for k, v in table.items()}
        pool = meta["pool"]
        modalities = sorted({m for _, m in self.needs})
        lacking = [m for m in modalities if m not in table]
        if lacking:
            raise CacheError(
                f"{self.tuples}: tuple table has no column for {lacking} (it covers "
                f"{modalities_of(table)}), but the model reads {lacking}"
            )
        arrays = self._open(pool, self.needs)
        self._check_lineage(meta.get("pool_rows") or {}, arrays)  # tables before it have none
        check_pool_rows(self.tuples, table, {m: len(c) for (_, m), c in arrays.items()})
        rows = {m: torch.from_numpy(np.asarray(table[m], np.int64)) for m in modalities}
        weights = {m: weights_of(table, m) for m in modalities}
        columns = {k: torch.from_numpy(table[k].astype(np.int64)) for k in ("start", "provenance")}
        return BatchGather(arrays, rows, columns, len(table["start"]), weights)

    def _check_lineage(self, recorded: Mapping[str, str], arrays: Mapping) -> None:
        """The pool caches must hold the items the table was paired on (`pool_rows`); the
        spaces' caches of a modality are aligned (_check_aligned), so one of them is read."""
        first = {m: c for (_, m), c in reversed(arrays.items())}
        for m, c in first.items():
            if m in recorded and rows_digest(EmbeddingCache(c.directory).ids) != recorded[m]:
                raise CacheError(
                    f"{self.tuples}: paired on another {m} pool than {c.directory} holds now (its"
                    " items changed since, e.g. re-extracted with items added); remake the table:"
                    " python train.py stage=pair (with this run's overrides)"
                )

    def _check_aligned(self, dataset: str, arrays: Mapping[tuple[str, str], CacheRows]) -> None:
        """All spaces' caches of one (dataset, modality) must hold the same items in order."""
        for m in MODALITIES:
            dirs = [c.directory for (_, mm), c in arrays.items() if mm == m]
            if len(dirs) < 2:
                continue
            ids = [EmbeddingCache(d).ids for d in dirs]
            for d, i in zip(dirs[1:], ids[1:], strict=True):
                if len(i) != len(ids[0]) or not np.array_equal(i, ids[0]):
                    raise CacheError(
                        f"{d}: item ids differ from {dirs[0]}; caches must be row-aligned"
                    )

    def _paired_set(self, a: str, b: str) -> BatchGather:
        dataset = f"{self.val_prefix}_{a}_{b}"
        arrays = self._open(dataset, [(s, m) for s, m in self.needs if m in (a, b)])
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
