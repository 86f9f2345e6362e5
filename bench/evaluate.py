"""Retrieval evaluation speed: the evaluate stage's chunked R@K against what users would run.

    python bench/evaluate.py [--quick] [--dim 1536]

Ours is `lightning_modules.evaluation.metrics.recall_at_k` (query chunks of 1024 rows: one
matmul, a gather of the positives, a top-K; never the whole score matrix). The references
materialise the whole (n, n) score matrix, so they run at a size where it fits:
- clip_benchmark: LAION CLIP_benchmark's recipe: full scores and a dense positive mask, then a
  top-K per batch of queries;
- full argsort: the whole score matrix, stably argsorted row by row;
- torchmetrics: `RetrievalHitRate(top_k)` on the flattened matrix with query indexes (at a
  smaller size still: it stores three n*n tensors).
Then ours alone runs at the full size (50k x 50k; 20k with --quick), with its wall and CPU time.
The final line is `RESULT evaluate ratio=<x>`: the fastest reference's wall time over ours at the
reference size, both measured in this run (higher is better).
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lightning_modules.evaluation.metrics import recall_at_k  # noqa: E402

KS = (1, 5)


def paired(n: int, dim: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries (n, dim) and gallery (n, dim), L2-normalised; query i's positive is gallery row i."""
    g = torch.Generator().manual_seed(seed)
    gallery = torch.randn(n, dim, generator=g)
    # Enough noise that R@1 is well below 1 at these sizes, so hits and misses are both exercised.
    query = gallery + 9.0 * torch.randn(n, dim, generator=g)
    return F.normalize(query, dim=-1), F.normalize(gallery, dim=-1)


def ours(query: torch.Tensor, gallery: torch.Tensor) -> dict[int, float]:
    items = torch.arange(len(query))
    return {k: float(v) for k, v in recall_at_k(query, gallery, items, items, KS).items()}


def clip_benchmark(query: torch.Tensor, gallery: torch.Tensor, batch: int = 64) -> dict[int, float]:
    """CLIP_benchmark's retrieval recall: full scores, dense positive pairs, batched top-K."""
    scores = query @ gallery.T
    positive = torch.eye(len(query), dtype=torch.bool)
    out = {}
    for k in KS:
        hits = []
        for i in range(0, len(query), batch):
            top = scores[i : i + batch].topk(k, dim=1).indices
            hits.append(positive[i : i + batch].gather(1, top).any(1))
        out[k] = float(torch.cat(hits).float().mean())
    return out


def full_argsort(query: torch.Tensor, gallery: torch.Tensor) -> dict[int, float]:
    order = torch.sort(-(query @ gallery.T), dim=1, stable=True).indices
    hit = order == torch.arange(len(query))[:, None]
    return {k: float(hit[:, :k].any(1).float().mean()) for k in KS}


def torchmetrics_hit_rate(query: torch.Tensor, gallery: torch.Tensor) -> dict[int, float]:
    from torchmetrics.retrieval import RetrievalHitRate

    scores = (query @ gallery.T).flatten()
    target = torch.eye(len(query), dtype=torch.bool).flatten()
    indexes = torch.arange(len(query)).repeat_interleave(len(gallery))
    return {k: float(RetrievalHitRate(top_k=k)(scores, target, indexes=indexes)) for k in KS}


def timed(fn, *args, repeats: int = 1) -> tuple[dict[int, float], float, float]:
    """(result, wall seconds, CPU seconds over all threads), each the best of `repeats` runs.

    The best run is the least disturbed one on a machine shared with other jobs.
    """
    walls, cpus = [], []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        result = fn(*args)
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return result, min(walls), min(cpus)


def matrix_gib(name: str, n: int, chunk: int = 1024) -> float:
    """Score-matrix memory a method holds at once (computed from its shapes, not measured)."""
    per = {"ours (chunked)": min(chunk, n) * n * 4, "clip_benchmark": n * n * (4 + 1),
           "full argsort": n * n * (4 + 4 + 8), "torchmetrics": n * n * (4 + 1 + 8)}  # fmt: skip
    return per[name] / 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes (under 2 minutes)")
    parser.add_argument(
        "--dim", type=int, default=1536, help="embedding dim (the omni space: 1536)"
    )
    args = parser.parse_args()
    full, ref, tm = (20_000, 4_000, 2_000) if args.quick else (50_000, 10_000, 4_000)
    repeats = 2 if args.quick else 3
    rows = []
    query, gallery = paired(ref, args.dim)
    base = timed(ours, query, gallery, repeats=repeats)
    rows.append(("ours (chunked)", ref, *base))
    references = {}
    for name, fn in (("clip_benchmark", clip_benchmark), ("full argsort", full_argsort)):
        references[name] = timed(fn, query, gallery, repeats=repeats)
        rows.append((name, ref, *references[name]))
    small_q, small_g = paired(tm, args.dim)
    small = timed(ours, small_q, small_g, repeats=repeats)
    rows.append(("ours (chunked)", tm, *small))
    tm_run = timed(torchmetrics_hit_rate, small_q, small_g)
    rows.append(("torchmetrics", tm, *tm_run))
    del query, gallery, small_q, small_g
    query, gallery = paired(full, args.dim)
    rows.append(("ours (chunked)", full, *timed(ours, query, gallery)))

    threads = torch.get_num_threads()
    print(f"R@1/R@5, one positive per query, dim {args.dim}, {threads} threads")
    print(f"times: best of {repeats} runs, except torchmetrics and the {full}-row run (one each)")
    head = f"{'method':<16} {'n x n':>15} {'wall s':>8} {'CPU s':>8} {'R@1':>7} {'R@5':>7}"
    print(f"{head} {'matrix GiB':>10}")
    for name, n, result, wall, cpu in rows:
        size = f"{n} x {n}"
        line = f"{name:<16} {size:>15} {wall:8.2f} {cpu:8.2f} {result[1]:7.4f} {result[5]:7.4f}"
        print(f"{line} {matrix_gib(name, n):10.2f}")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"peak RSS of this process: {peak:.1f} GiB")
    for name, (result, *_) in [*references.items(), ("torchmetrics", tm_run)]:
        want = small[0] if name == "torchmetrics" else base[0]
        agree = all(abs(result[k] - want[k]) < 1e-6 for k in KS)
        print(f"{name} agrees with ours: {agree}")
        if not agree:
            raise SystemExit(f"{name} disagrees with ours: {result} vs {want}")
    fastest = min(references, key=lambda n: references[n][1])
    ratio = references[fastest][1] / base[1]
    cpu_ratio = references[fastest][2] / base[2]
    print(f"fastest reference at {ref} x {ref}: {fastest}; reference / ours: wall {ratio:.2f}, "
          f"CPU {cpu_ratio:.2f}")  # fmt: skip
    print(f"RESULT evaluate ratio={ratio:.2f}")


if __name__ == "__main__":
    main()
