"""Approximate top-k inner-product search for the pair stage: faiss IVF-Flat and HNSW-Flat.

`pair.search` names the index: `exact` (search.py, the default), `ivf` (faiss IndexIVFFlat: the
gallery in nlist k-means cells, a query scans the nprobe cells nearest to it) or `hnsw` (faiss
IndexHNSWFlat: a graph with M links per row, efSearch candidates kept per query). Both use inner
product (METRIC_INNER_PRODUCT), store the rows uncompressed and run on faiss-cpu.

Results have search.py's shape, so the cleaning rules consume them unchanged: (scores (n, k)
float32, rows (n, k) int64), best first, and among the rows the index returned an equal score
goes to the lower row. Which rows are returned is approximate. A query for which the index found
fewer than k rows (an IVF query whose probed cells hold fewer) is searched exactly instead.

A gallery too small for its index (IVF: fewer than 39 rows per cell, faiss's own minimum to train
the cells; HNSW: no more rows than efSearch, which then visits about all of them) is searched
exactly, and the report says why. Every approximate direction reports the recall@1 of its top-1
against exact search on a seeded sample of its queries.

CSLS (pair.clean.csls) works on both: the hubness penalties are means of the approximate top-k
scores, then the corrected search runs on an index of the rows with their penalty as one extra
column ([g, b_g] . [q, 1] = q . g + b_g); the query's own penalty is added after, since it does
not change its ranking. The reported recall is that of the corrected search given the penalties.

Reproducibility: IVF is deterministic (seeded training sample, faiss's seeded k-means). HNSW's
graph, when built with several OpenMP threads, depends on their timing, so two runs may differ
in a few neighbours; `OMP_NUM_THREADS=1` makes it deterministic.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import NamedTuple

import numpy as np

from lightning_modules.pairing.search import Array, order_ties, search, take_rows
from lightning_modules.runtime.config import to_plain

SEARCHES = ("exact", "ivf", "hnsw")
MIN_POINTS_PER_CENTROID = 39  # faiss's ClusteringParameters default: fewer training rows warn
MAX_POINTS_PER_CENTROID = 256  # ... and more are subsampled; we sample them ourselves (memory)
Advance = Callable[[int], None]


@dataclass(frozen=True)
class Ann:
    """`pair.search` and the faiss settings of its index (conf/config.yaml documents each)."""

    search: str  # exact | ivf | hnsw
    nlist: int  # ivf: cells
    nprobe: int  # ivf: cells scanned per query
    hnsw_m: int  # hnsw: links per row (faiss's M)
    ef_search: int  # hnsw: candidates kept per query (faiss's efSearch)
    ef_construction: int  # hnsw: candidates kept per inserted row (faiss's efConstruction)
    recall_queries: int  # queries per direction whose top-1 is checked against exact

    @classmethod
    def from_config(cls, pc: Mapping) -> Ann:
        """The `pair:` block's search keys (their types are checked by the config schema)."""
        out = cls(**{f.name: to_plain(pc[f.name]) for f in fields(cls)})
        if out.nprobe > out.nlist:
            raise ValueError(f"pair.nprobe={out.nprobe} exceeds pair.nlist={out.nlist}")
        return out

    @property
    def approximate(self) -> bool:
        return self.search != "exact"

    def settings(self) -> dict[str, int]:
        """The index's settings under faiss's names ({} for exact)."""
        if self.search == "ivf":
            return dict(nlist=self.nlist, nprobe=self.nprobe)
        if self.search == "hnsw":
            return dict(M=self.hnsw_m, efSearch=self.ef_search, efConstruction=self.ef_construction)
        return {}

    def fallback(self, rows: int) -> str | None:
        """Why an index over `rows` gallery rows would not beat exact search; None if it fits."""
        if self.search == "ivf" and rows < MIN_POINTS_PER_CENTROID * self.nlist:
            return (f"{rows} gallery rows < {MIN_POINTS_PER_CENTROID} x pair.nlist={self.nlist} "
                    f"({MIN_POINTS_PER_CENTROID * self.nlist}), faiss's minimum to train the "
                    "cells")  # fmt: skip
        if self.search == "hnsw" and rows <= self.ef_search:
            return (f"{rows} gallery rows <= pair.ef_search={self.ef_search}: a search would "
                    "visit about all of them")  # fmt: skip
        return None


class Direction(NamedTuple):
    """One direction's top-k and how it was found (a `pairs_summary.json` search entry)."""

    scores: np.ndarray  # (queries, k) float32, best first
    rows: np.ndarray  # (queries, k) int64 gallery rows
    report: dict


def _float_rows(x: Array, start: int, stop: int, column: np.ndarray | float | None) -> np.ndarray:
    """Rows [start, stop) as contiguous float32, with one more column: a gallery's biases
    [start, stop), or a constant (1 for queries of a biased index); None: none."""
    block = np.asarray(x[start:stop], np.float32)
    if column is None:
        return np.ascontiguousarray(block)
    extra = np.broadcast_to(column if np.isscalar(column) else column[start:stop], len(block))
    return np.ascontiguousarray(np.concatenate([block, np.asarray(extra, np.float32)[:, None]], 1))


def build_index(
    gallery: Array, ann: Ann, bias: np.ndarray | None = None, chunk: int = 65536, seed: int = 0
):
    """A trained faiss index of `ann.search` over gallery (n, d) rows (+ a bias column)."""
    import faiss

    n, d = len(gallery), gallery.shape[1] + (bias is not None)
    if ann.search == "ivf":
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, ann.nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = seed
        # faiss trains on at most 256 rows per cell; sampling them here avoids a float32 copy of
        # the whole gallery.
        size = min(n, MAX_POINTS_PER_CENTROID * ann.nlist)
        sample = np.sort(np.random.default_rng(seed).choice(n, size, replace=False))
        train = take_rows(gallery, sample)
        if bias is not None:
            train = np.concatenate([train, np.asarray(bias, np.float32)[sample, None]], 1)
        index.train(np.ascontiguousarray(train, np.float32))
        index.nprobe = ann.nprobe
    elif ann.search == "hnsw":
        index = faiss.IndexHNSWFlat(d, ann.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = ann.ef_construction
        index.hnsw.efSearch = ann.ef_search
    else:
        raise ValueError(f"pair.search={ann.search!r} has no index; expected ivf or hnsw")
    for i in range(0, n, chunk):
        index.add(_float_rows(gallery, i, i + chunk, bias))
    return index


def search_index(
    index,
    queries: Array,
    k: int,
    *,
    biased: bool = False,
    chunk: int = 4096,
    advance: Advance | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(scores (n, k) float32, rows (n, k) int64) of queries (n, d) in a built index; rows the
    index could not fill are -1 (scores -inf). `biased`: the index has a bias column."""
    import torch

    n = len(queries)
    scores, rows = np.empty((n, k), np.float32), np.empty((n, k), np.int64)
    for i in range(0, n, chunk):
        q = _float_rows(queries, i, i + chunk, 1.0 if biased else None)
        values, found = index.search(q, k)
        values[found < 0] = -np.inf
        v, r = order_ties(torch.from_numpy(values), torch.from_numpy(found))
        scores[i : i + chunk], rows[i : i + chunk] = v.numpy(), r.numpy()
        if advance is not None:
            advance(1)
    return scores, rows


def recall_at_1(
    queries: Array,
    gallery: Array,
    found: np.ndarray,
    sample: np.ndarray,
    *,
    query_bias: np.ndarray | None = None,
    gallery_bias: np.ndarray | None = None,
    exact: Mapping | None = None,
    tol: float = 1e-6,
) -> float:
    """Share of the sampled queries whose approximate top-1 (found (n,) gallery rows) is their
    exact top-1, or scores equal to it within tol (a tie). exact: keywords of `search`."""
    q = take_rows(queries, sample)
    qb = None if query_bias is None else np.asarray(query_bias)[sample]
    best, _ = search(q, gallery, 1, a_bias=qb, b_bias=gallery_bias, **(exact or {}))["a_to_b"]
    g = take_rows(gallery, found[sample])
    got = np.einsum("nd,nd->n", q.astype(np.float64), g.astype(np.float64))
    if gallery_bias is not None:
        got += np.asarray(gallery_bias, np.float64)[found[sample]]
    if qb is not None:
        got += qb
    return float((got >= best[:, 0] - tol).mean())


def search_direction(
    queries: Array,
    gallery: Array,
    k: int,
    ann: Ann,
    *,
    query_bias: np.ndarray | None = None,
    gallery_bias: np.ndarray | None = None,
    chunk: int = 4096,
    seed: int = 0,
    exact: Mapping | None = None,
    advance: Advance | None = None,
) -> Direction:
    """Top-k of each query row over the gallery by `ann` (exact when the gallery is too small).

    Scores are q . g (+ query_bias[q] + gallery_bias[g]); exact: keywords of search.search
    (backend, device, blocks) for the fallback, the unfilled rows and the recall sample.
    """
    exact = dict(exact or {})
    n = len(queries)
    settings = ann.settings()
    why = ann.fallback(len(gallery))
    report = dict(index=ann.search, settings=settings, fallback=why)
    t0 = time.perf_counter()
    if why is not None:
        scores, rows = search(queries, gallery, k, a_bias=query_bias, b_bias=gallery_bias,
                              **exact)["a_to_b"]  # fmt: skip
        report.update(index="exact", build_seconds=0.0, search_seconds=time.perf_counter() - t0,
                      recall_at_1=None, recall_queries=0, exact_rows=n)  # fmt: skip
        if advance is not None:
            advance(-(-n // chunk))
        return Direction(scores, rows, _rounded(report))
    index = build_index(gallery, ann, gallery_bias, seed=seed)
    t1 = time.perf_counter()
    scores, rows = search_index(index, queries, k, biased=gallery_bias is not None, chunk=chunk,
                                advance=advance)  # fmt: skip
    del index
    if query_bias is not None:
        scores += np.asarray(query_bias, np.float32)[:, None]
    short = np.flatnonzero((rows < 0).any(1))
    if len(short):  # the probed cells held fewer than k rows: these queries are searched exactly
        qb = None if query_bias is None else np.asarray(query_bias)[short]
        redo = search(take_rows(queries, short), gallery, k, a_bias=qb, b_bias=gallery_bias,
                      **exact)["a_to_b"]  # fmt: skip
        scores[short], rows[short] = redo
    t2 = time.perf_counter()
    sample = np.sort(np.random.default_rng(seed).choice(n, min(n, ann.recall_queries), False))
    recall = recall_at_1(queries, gallery, rows[:, 0], sample, query_bias=query_bias,
                         gallery_bias=gallery_bias, exact=exact)  # fmt: skip
    report.update(build_seconds=t1 - t0, search_seconds=t2 - t1,
                  recall_seconds=time.perf_counter() - t2, recall_at_1=recall,
                  recall_queries=len(sample), exact_rows=len(short))  # fmt: skip
    return Direction(scores, rows, _rounded(report))


def _rounded(report: dict) -> dict:
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in report.items()}


def search_pass(
    a: Array,
    b: Array,
    want: Mapping[str, int],
    ann: Ann,
    *,
    a_bias: np.ndarray | None = None,
    b_bias: np.ndarray | None = None,
    **kw,
) -> dict[str, Direction]:
    """`search_direction` for each of want's directions ({"a_to_b": k, "b_to_a": k}) between
    rows of a and b; kw goes to search_direction. One index per direction (over its gallery)."""
    out = {}
    if "a_to_b" in want:
        out["a_to_b"] = search_direction(a, b, want["a_to_b"], ann, query_bias=a_bias,
                                         gallery_bias=b_bias, **kw)  # fmt: skip
    if "b_to_a" in want:
        out["b_to_a"] = search_direction(b, a, want["b_to_a"], ann, query_bias=b_bias,
                                         gallery_bias=a_bias, **kw)  # fmt: skip
    return out


def csls_bias(
    a: Array, b: Array, k: int, ann: Ann, **kw
) -> tuple[np.ndarray, np.ndarray, dict[str, Direction]]:
    """search.csls_bias on approximate top-k: (a_bias (n_a,), b_bias (n_b,), the two searches)."""
    res = search_pass(a, b, {"a_to_b": k, "b_to_a": k}, ann, **kw)
    return -res["a_to_b"].scores.mean(1) / 2, -res["b_to_a"].scores.mean(1) / 2, res


def search_steps(n_a: int, n_b: int, want: Mapping[str, int], chunk: int) -> int:
    """How many times `search_pass` calls `advance` (for a progress bar's total)."""
    return ("a_to_b" in want) * -(-n_a // chunk) + ("b_to_a" in want) * -(-n_b // chunk)
