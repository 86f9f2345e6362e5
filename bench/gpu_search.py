"""Exact pair search on a GPU: search_torch on CUDA vs faiss, top-1 inner product.

    python bench/gpu_search.py [--rows 1000000] [--dim 1024] [--faiss-queries 16384]

Both sides get the same float16 unit rows (as caches store them). Ours: `search_torch` with
device=cuda over all `rows` queries x `rows` gallery rows, both directions in one pass (what the
pair stage runs). Reference: faiss-gpu (GpuIndexFlatIP) when it is installed, else faiss-cpu's
IndexFlatIP on the same machine over the first `--faiss-queries` queries (a full 1M x 1M run
takes hours on a CPU), extrapolated linearly in queries and doubled for the two directions.
Top-1 rows of the faiss subset must equal ours. Prints a table, then
`RESULT gpu_search ratio=<faiss seconds / ours seconds>`.

`--approx ivf,hnsw` adds the pair stage's approximate indexes (lightning_modules/pairing/ann.py,
the settings of conf/config.yaml's `pair:` block) for the a->b direction: each is built over the
whole gallery (IVF on the GPU when faiss-gpu is installed, else on this machine's CPU cores, as
the pair stage runs it), searched with the first `--faiss-queries` queries, the search scaled to
all queries (the build counted once) and the whole doubled for the two directions; recall@1 is
against ours on those queries.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def unit_rows(n: int, dim: int, seed: int):
    """(n, dim) float16 unit rows, generated on the GPU in blocks (CPU when there is none)."""
    import numpy as np
    import torch

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator(device=dev).manual_seed(seed)
    out = np.empty((n, dim), np.float16)
    for i in range(0, n, 65536):
        x = torch.randn(min(65536, n - i), dim, generator=g, device=dev)
        out[i : i + len(x)] = torch.nn.functional.normalize(x, dim=1).half().cpu().numpy()
    return out


def approximate(method: str, queries, gallery, exact_rows, gpu: bool) -> tuple:
    """Build seconds, search seconds of `queries`, recall@1 against exact_rows, where it ran."""
    import faiss
    from stage_costs import compose  # bench/stage_costs.py: conf/config.yaml with overrides

    from lightning_modules.pairing.ann import Ann, build_index, search_index

    ann = Ann.from_config({**compose([]).pair, "search": method})
    start = time.perf_counter()
    index = build_index(gallery, ann)
    build, where = time.perf_counter() - start, "CPU"
    if gpu and method == "ivf":  # faiss-gpu has IVF but no HNSW
        index, where = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index), "GPU"
    start = time.perf_counter()
    _, rows = search_index(index, queries, 1)
    search = time.perf_counter() - start
    return build, search, float((rows[:, 0] == exact_rows).mean()), where


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--faiss-queries", type=int, default=16384)
    parser.add_argument("--approx", default="", help="comma-separated: ivf, hnsw (default: none)")
    args = parser.parse_args()
    import faiss
    import numpy as np
    import torch
    from rich.console import Console
    from rich.table import Table

    from lightning_modules.pairing.search import search_torch

    if not torch.cuda.is_available():
        sys.exit("gpu_search: needs a CUDA device (torch.cuda.is_available() is False)")
    a, b = unit_rows(args.rows, args.dim, 0), unit_rows(args.rows, args.dim, 1)
    search_torch(a[:4096], b[:65536], 1, device="cuda")  # warm-up: CUDA context, kernels
    torch.cuda.synchronize()
    start = time.perf_counter()
    ours = search_torch(a, b, 1, a_to_b=True, b_to_a=True, device="cuda", chunk=16384,
                        gallery_chunk=65536)  # fmt: skip
    torch.cuda.synchronize()
    ours_s = time.perf_counter() - start

    q = min(args.faiss_queries, args.rows)
    gpu = hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    start = time.perf_counter()
    if gpu:
        res = faiss.StandardGpuResources()
        index = faiss.GpuIndexFlatIP(res, args.dim)
        q = args.rows
    else:
        index = faiss.IndexFlatIP(args.dim)
    index.add(b.astype(np.float32))
    _, rows = index.search(a[:q].astype(np.float32), 1)
    faiss_s = (time.perf_counter() - start) * (args.rows / q) * 2  # both directions
    agree = float((rows[:, 0] == ours["a_to_b"][1][:q, 0]).mean())

    table = Table(title=f"exact top-1, {args.rows:,} x {args.rows:,}, dim {args.dim}, "
                  f"{torch.cuda.get_device_name()}")  # fmt: skip
    for col in ("search", "seconds", "note"):
        table.add_column(col)
    table.add_row("ours: search_torch, cuda, both directions", f"{ours_s:.1f}", "float32 products")
    note = "measured" if gpu else f"faiss-cpu, {q:,} queries x {args.rows / q:.0f} x 2 directions"
    table.add_row(f"faiss {'GPU' if gpu else 'CPU'} IndexFlatIP", f"{faiss_s:.1f}", note)
    for method in filter(None, args.approx.split(",")):
        build, t, recall, where = approximate(method, a[:q], b, ours["a_to_b"][1][:q, 0], gpu)
        table.add_row(f"approximate: {method} ({where})", f"{(build + t * args.rows / q) * 2:.1f}",
                      f"build {build:.0f} s + search of {q:,} queries scaled, x 2 directions; "
                      f"recall@1 {recall:.4f}")  # fmt: skip
    Console(width=120).print(table)
    print(f"top-1 rows equal to faiss on {q:,} queries: {agree:.4f}")
    print(f"RESULT gpu_search ratio={faiss_s / ours_s:.2f}")


if __name__ == "__main__":
    main()
