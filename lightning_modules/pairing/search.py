"""Exact top-k inner-product search between two sets of rows, blocked, on torch or faiss.

Library code used by the pair stage and the inference API. Search is exact and blocked: a
(chunk, gallery_chunk) float32 score block is the only large temporary, whatever the input sizes.
Ties are broken deterministically: of equal scores, the lower gallery row wins (also inside a
top-k list), on both backends.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch

from datamodules.cache import EmbeddingCache
from encoders.modalities import resolve_device

Array = np.ndarray | torch.Tensor
Advance = Callable[[int], None]
log = logging.getLogger(__name__)


class ShardRows:
    """The shards of a cache as one (count, dim) array whose row ranges are read on demand."""

    def __init__(self, shards: Sequence[np.ndarray]) -> None:
        self.shards = list(shards)
        self.offsets = np.cumsum([0, *map(len, self.shards)])
        self.shape = (int(self.offsets[-1]), int(self.shards[0].shape[1]))

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows: slice) -> np.ndarray:
        start, stop, _ = rows.indices(len(self))
        parts = [
            s[max(start - o, 0) : max(stop - o, 0)]
            for s, o in zip(self.shards, self.offsets[:-1], strict=True)
        ]
        return np.concatenate([p for p in parts if len(p)] or [self.shards[0][:0]])


def take_rows(x: np.ndarray | ShardRows, index: np.ndarray, chunk: int = 65536) -> np.ndarray:
    """Rows `index` (n,) of an array, memmap or ShardRows as (n, dim) float32."""
    index = np.asarray(index, np.int64)
    if not isinstance(x, ShardRows):
        return np.asarray(x[index], np.float32)
    out = np.empty((len(index), x.shape[1]), np.float32)
    shard = np.searchsorted(x.offsets, index, side="right") - 1
    for i, part in enumerate(x.shards):
        hit = np.flatnonzero(shard == i)
        for j in range(0, len(hit), chunk):  # bounded temporaries on a huge index
            rows = hit[j : j + chunk]
            out[rows] = part[index[rows] - x.offsets[i]]
    return out


def pool_rows(cache: EmbeddingCache) -> np.ndarray | ShardRows:
    """A cache's rows without loading them: its memmap, or its shards as one array."""
    return cache.shards[0] if len(cache.shards) == 1 else ShardRows(cache.shards)


def _block(x: Array, start: int, stop: int, device: torch.device) -> torch.Tensor:
    """Rows [start, stop) of a numpy array, memmap or tensor as float32 on `device`."""
    if isinstance(x, torch.Tensor):
        return x[start:stop].to(device=device, dtype=torch.float32)
    arr = np.asarray(x[start:stop])
    if not arr.flags.writeable:  # a read-only memmap slice; torch.from_numpy wants writable memory
        arr = arr.copy()
    return torch.from_numpy(arr).to(device=device, dtype=torch.float32)


def order_ties(values: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort each row of (rows, k) results by value descending, then by index ascending."""
    by_index = index.argsort(dim=1)
    values, index = values.gather(1, by_index), index.gather(1, by_index)
    order = values.argsort(dim=1, descending=True, stable=True)
    return values.gather(1, order), index.gather(1, order)


def _block_topk(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k of each row of a (rows, cols) block, ties to the lower column."""
    k = min(k, scores.shape[1])
    values, index = scores.topk(k, dim=1)
    # topk picks arbitrarily among values equal to the k-th; rows where more than k columns reach
    # it are redone with a stable sort, which keeps the lower columns.
    crowded = ((scores >= values[:, -1:]).sum(1) > k).nonzero().squeeze(1)
    if len(crowded):
        sv, si = scores.index_select(0, crowded).sort(dim=1, descending=True, stable=True)
        values[crowded], index[crowded] = sv[:, :k], si[:, :k]
    return order_ties(values, index)


def _reduce(scores: torch.Tensor, best: torch.Tensor, arg: torch.Tensor, offset: int) -> None:
    """Merge a (rows, cols) score block into running (rows, k) best scores and gallery rows.

    Blocks arrive in increasing gallery order, so on equal scores the running entry (a lower
    gallery row) is kept: the merge is strict for top-1 and a stable sort for top-k.
    """
    k = best.shape[1]
    if k == 1:
        # amax is several times cheaper than max-with-indices; only rows that improve need indices.
        top = scores.amax(dim=1)
        win = (top > best[:, 0]).nonzero().squeeze(1)
        if len(win):
            # torch.max returns the first maximal index on ties. A transposed block (the column
            # direction) is gathered row by row only when few rows win; a copy is faster else.
            if scores.stride(1) == 1 or 8 * len(win) < len(scores):
                idx = scores.index_select(0, win).max(dim=1).indices
            else:
                idx = scores.contiguous().max(dim=1).indices[win]
            best[win, 0] = top[win]
            arg[win, 0] = idx + offset
        return
    values, index = _block_topk(scores.contiguous(), k)
    values = torch.cat([best, values], 1)
    index = torch.cat([arg, index + offset], 1)
    order = values.argsort(dim=1, descending=True, stable=True)[:, :k]
    best.copy_(values.gather(1, order))
    arg.copy_(index.gather(1, order))


def _check_bias(bias: np.ndarray | None, n: int, name: str) -> None:
    if bias is not None and np.shape(bias) != (n,):
        raise ValueError(f"{name} has shape {np.shape(bias)}; expected ({n},), one per row")


def _check_inputs(queries: Array, gallery: Array, k: int) -> None:
    if len(queries) == 0 or len(gallery) == 0:
        raise ValueError(f"empty input: {len(queries)} queries, {len(gallery)} gallery rows")
    if queries.shape[1] != gallery.shape[1]:
        raise ValueError(f"queries have dim {queries.shape[1]}, gallery {gallery.shape[1]}")
    if not 1 <= k <= len(gallery):
        raise ValueError(f"topk={k} must be in [1, gallery size {len(gallery)}]")


def search_torch(
    a: Array,
    b: Array,
    k: int = 1,
    *,
    a_to_b: bool = True,
    b_to_a: bool = False,
    chunk: int = 4096,
    gallery_chunk: int = 2048,
    device: str | torch.device = "cpu",
    advance: Advance | None = None,
    a_bias: np.ndarray | None = None,
    b_bias: np.ndarray | None = None,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Exact inner-product top-k between rows of a (n_a, d) and b (n_b, d), by blocked matmul.

    One pass serves both directions: each (chunk, gallery_chunk) block of a @ b.T is reduced
    along its rows (a_to_b: every a row's best b rows) and its columns (b_to_a). Returns
    {"a_to_b": (scores (n_a, k) float32, rows (n_a, k) int64), "b_to_a": (... (n_b, k))}, each
    row sorted by score descending; on equal scores the lower row wins.

    a_bias (n_a,) and b_bias (n_b,), when given, are added: score(i, j) = a_i . b_j + a_bias[i] +
    b_bias[j] (CSLS hubness correction). A row's own bias does not change its ranking, so one
    pass still serves both directions.
    """
    if a_to_b:
        _check_inputs(a, b, k)
    if b_to_a:
        _check_inputs(b, a, k)
    _check_bias(a_bias, len(a), "a_bias")
    _check_bias(b_bias, len(b), "b_bias")
    dev = resolve_device(device)
    n_a, n_b = len(a), len(b)
    out = {}
    rows_best = torch.full((n_a, k), -torch.inf, device=dev) if a_to_b else None
    rows_arg = torch.full((n_a, k), -1, dtype=torch.int64, device=dev) if a_to_b else None
    cols_best = torch.full((n_b, k), -torch.inf, device=dev) if b_to_a else None
    cols_arg = torch.full((n_b, k), -1, dtype=torch.int64, device=dev) if b_to_a else None
    # Exact float32 products: TF32 (Ampere+) would reorder near-ties.
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    # On a GPU the gallery is uploaded once (in its stored dtype) when it fits comfortably.
    if dev.type == "cuda" and not isinstance(b, torch.Tensor):
        row = torch.from_numpy(np.array(b[0:1]))
        if row.nbytes * n_b < torch.cuda.mem_get_info(dev)[0] // 4:
            resident = torch.empty((n_b, row.shape[1]), dtype=row.dtype, device=dev)
            for j in range(0, n_b, gallery_chunk):
                resident[j : j + gallery_chunk] = torch.from_numpy(
                    np.array(b[j : j + gallery_chunk])
                ).to(dev)
            b = resident
    buffer = torch.empty(min(chunk, n_a) * min(gallery_chunk, n_b), device=dev)
    a_bias = None if a_bias is None else torch.as_tensor(a_bias, dtype=torch.float32).to(dev)
    b_bias = None if b_bias is None else torch.as_tensor(b_bias, dtype=torch.float32).to(dev)
    try:
        for i in range(0, n_a, chunk):
            qa = _block(a, i, i + chunk, dev)
            for j in range(0, n_b, gallery_chunk):
                gb = _block(b, j, j + gallery_chunk, dev)
                scores = buffer[: len(qa) * len(gb)].view(len(qa), len(gb))
                torch.matmul(qa, gb.T, out=scores)
                if a_bias is not None:
                    scores += a_bias[i : i + chunk, None]
                if b_bias is not None:
                    scores += b_bias[None, j : j + gallery_chunk]
                if a_to_b:
                    _reduce(scores, rows_best[i : i + chunk], rows_arg[i : i + chunk], j)
                if b_to_a:
                    # Query blocks also arrive in increasing order, so the same rule holds.
                    _reduce(
                        scores.T,
                        cols_best[j : j + gallery_chunk],
                        cols_arg[j : j + gallery_chunk],
                        i,
                    )
            if advance is not None:
                advance(1)
    finally:
        torch.set_float32_matmul_precision(precision)
    if a_to_b:
        out["a_to_b"] = (rows_best.cpu().numpy(), rows_arg.cpu().numpy())
    if b_to_a:
        out["b_to_a"] = (cols_best.cpu().numpy(), cols_arg.cpu().numpy())
    return out


def _augment(x: torch.Tensor, bias: torch.Tensor | None, query: bool) -> torch.Tensor:
    """[x, bias, 1] for a query block, [x, 1, bias] for a gallery block: products add both."""
    b = torch.zeros(len(x), 1) if bias is None else bias[:, None]
    one = torch.ones(len(x), 1)
    return torch.cat([x, b, one] if query else [x, one, b], 1)


def search_faiss(
    queries: Array,
    gallery: Array,
    k: int = 1,
    *,
    chunk: int = 4096,
    gallery_chunk: int = 2048,
    advance: Advance | None = None,
    query_bias: np.ndarray | None = None,
    gallery_bias: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-k by faiss IndexFlatIP, one index per gallery block (CPU).

    Returns (scores (n, k) float32, rows (n, k) int64) like `search_torch`; blocks are merged with
    the same lower-row-wins rule, and faiss keeps the lower row on ties inside a block. Biases
    are added as in `search_torch`, as two extra columns of each block ([q, qb, 1] . [g, 1, gb]).
    """
    import faiss

    _check_inputs(queries, gallery, k)
    _check_bias(query_bias, len(queries), "query_bias")
    _check_bias(gallery_bias, len(gallery), "gallery_bias")
    biased = query_bias is not None or gallery_bias is not None
    qbias = None if query_bias is None else torch.as_tensor(query_bias, dtype=torch.float32)
    gbias = None if gallery_bias is None else torch.as_tensor(gallery_bias, dtype=torch.float32)
    n, cpu = len(queries), torch.device("cpu")
    best = torch.full((n, k), -torch.inf)
    arg = torch.full((n, k), -1, dtype=torch.int64)
    for j in range(0, len(gallery), gallery_chunk):
        gb = _block(gallery, j, j + gallery_chunk, cpu)
        if biased:
            gb = _augment(gb, None if gbias is None else gbias[j : j + gallery_chunk], query=False)
        gb = gb.numpy()
        index = faiss.IndexFlatIP(gb.shape[1])
        index.add(gb)
        kk = min(k, len(gb))
        # faiss keeps the lower row on ties for top-1, but its top-k heap may not: one extra rank
        # shows rows with ties at the k-th score, and those are redone exactly.
        extra = int(1 < k < len(gb))
        for i in range(0, n, chunk):
            qb = _block(queries, i, i + chunk, cpu)
            if biased:
                qb = _augment(qb, None if qbias is None else qbias[i : i + chunk], query=True)
            values, rows = index.search(qb.numpy(), kk + extra)
            values, rows = torch.from_numpy(values), torch.from_numpy(rows)
            if extra:
                tied = (values[:, k] == values[:, k - 1]).nonzero().squeeze(1)
                values, rows = values[:, :k].contiguous(), rows[:, :k].contiguous()
                if len(tied):
                    exact = _block_topk(qb[tied] @ torch.from_numpy(gb).T, k)
                    values[tied], rows[tied] = exact
            values, rows = order_ties(values, rows)
            merged_v = torch.cat([best[i : i + chunk], values], 1)
            merged_i = torch.cat([arg[i : i + chunk], rows + j], 1)
            order = merged_v.argsort(dim=1, descending=True, stable=True)[:, :k]
            best[i : i + chunk] = merged_v.gather(1, order)
            arg[i : i + chunk] = merged_i.gather(1, order)
            if advance is not None:
                advance(1)
    return best.numpy(), arg.numpy()


BACKENDS = ("auto", "torch", "faiss")
PROBE_ROWS = (2048, 16384)  # at most queries x gallery rows of the kernel probe (dim 1024: ~1 s)


def pick_backend(
    backend: str,
    a_to_b: bool,
    b_to_a: bool,
    device: str | torch.device,
    dim: int = 1024,
    chunk: int = 4096,
    gallery_chunk: int = 2048,
) -> str:
    """The kernel `search` runs for `backend`. `auto`: our blocked matmul for both directions
    at once (one pass of score blocks serves both) and on a GPU; for one direction on the CPU,
    whichever of ours and faiss IndexFlatIP the probe times faster on this machine at these
    block sizes (bench/pair_retrieval.py: faiss on some CPUs, ours on others)."""
    if backend not in BACKENDS:
        raise ValueError(f"pair.backend={backend!r}; expected one of {list(BACKENDS)}")
    if backend != "auto":
        return backend
    if a_to_b == b_to_a or resolve_device(device).type != "cpu":
        return "torch"
    return _faster_one_way(dim, chunk, gallery_chunk, torch.get_num_threads())


@functools.cache
def _faster_one_way(dim: int, chunk: int, gallery_chunk: int, threads: int) -> str:
    """Time both exact kernels on seeded unit rows, one query block over 8 gallery blocks (at
    most PROBE_ROWS), best of 3 interleaved runs each; logs the choice."""
    rng = np.random.default_rng(0)
    rows = (min(chunk, PROBE_ROWS[0]), min(8 * gallery_chunk, PROBE_ROWS[1]))
    q, g = (rng.standard_normal((n, dim), dtype=np.float32) for n in rows)
    q, g = (x / np.linalg.norm(x, axis=1, keepdims=True) for x in (q, g))
    seconds = {"torch": float("inf"), "faiss": float("inf")}
    for _ in range(3):  # interleaved, so that warm-up and a busy spell hit both kernels alike
        for name in seconds:
            start = time.perf_counter()
            search(q, g, 1, backend=name, chunk=chunk, gallery_chunk=gallery_chunk)
            seconds[name] = min(seconds[name], time.perf_counter() - start)
    pick = min(seconds, key=seconds.get)
    log.info("pair.backend=auto: one-direction search on this CPU uses %s (probe %s)", pick,
             ", ".join(f"{k} {v:.3f} s" for k, v in seconds.items()))  # fmt: skip
    return pick


def search(
    a: Array,
    b: Array,
    k: int = 1,
    *,
    a_to_b: bool = True,
    b_to_a: bool = False,
    backend: str = "torch",
    chunk: int = 4096,
    gallery_chunk: int = 2048,
    device: str | torch.device = "cpu",
    advance: Advance | None = None,
    a_bias: np.ndarray | None = None,
    b_bias: np.ndarray | None = None,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Exact top-k in either or both directions between a and b on the chosen backend.

    Scores are a_i . b_j (+ a_bias[i] + b_bias[j] when given); see `search_torch`.
    """
    backend = pick_backend(backend, a_to_b, b_to_a, device, a.shape[1], chunk, gallery_chunk)
    if backend == "torch":
        kw = dict(chunk=chunk, gallery_chunk=gallery_chunk, device=device, advance=advance)
        return search_torch(a, b, k, a_to_b=a_to_b, b_to_a=b_to_a, a_bias=a_bias, b_bias=b_bias,
                            **kw)  # fmt: skip
    if resolve_device(device).type != "cpu":
        raise ValueError(
            f"pair.backend=faiss runs on the CPU (faiss-cpu), not pair.device={device}"
        )
    out = {}
    kw = dict(chunk=chunk, gallery_chunk=gallery_chunk, advance=advance)
    if a_to_b:
        out["a_to_b"] = search_faiss(a, b, k, query_bias=a_bias, gallery_bias=b_bias, **kw)
    if b_to_a:
        out["b_to_a"] = search_faiss(b, a, k, query_bias=b_bias, gallery_bias=a_bias, **kw)
    return out


def search_steps(
    n_a: int,
    n_b: int,
    a_to_b: bool,
    b_to_a: bool,
    backend: str,
    chunk: int,
    gallery_chunk: int,
    device: str | torch.device = "cpu",
    dim: int = 1024,
) -> int:
    """How many times `search` calls `advance` (for a progress bar's total)."""
    if pick_backend(backend, a_to_b, b_to_a, device, dim, chunk, gallery_chunk) == "torch":
        return -(-n_a // chunk)
    blocks = lambda q, g: -(-q // chunk) * -(-g // gallery_chunk)  # noqa: E731
    return a_to_b * blocks(n_a, n_b) + b_to_a * blocks(n_b, n_a)


def csls_bias(a: Array, b: Array, k: int = 10, **kw) -> tuple[np.ndarray, np.ndarray]:
    """CSLS hubness penalties (a_bias (n_a,), b_bias (n_b,)) for `search` (Conneau et al. 2018).

    CSLS(i, j) = 2 a_i . b_j - r_b(a_i) - r_a(b_j), r the mean score of a row's k nearest rows on
    the other side. Halved, it is a_i . b_j + a_bias[i] + b_bias[j] with bias = -r / 2; a hub
    (a row near everything) gets a large r and is retrieved less often. kw goes to `search`.
    """
    res = search(a, b, k, a_to_b=True, b_to_a=True, **kw)
    return -res["a_to_b"][0].mean(1) / 2, -res["b_to_a"][0].mean(1) / 2
