"""Exact against approximate pair search at 1x, 4x and 20x the default pools, then the paper's.

    python bench/pair_scale.py [--scales 1 4 20] [--threads 2] [--search-queries 16384]
                               [--nprobe N] [--hnsw-m N] [--ef-search N] [--ef-construction N]

Pools: the default world's (data=world_v2) audio and text pools in WavCaps' space (1024-d; the
audio_text route, the largest at the paper's pools: 2M clips x 3M captions), made by the world's
own code (`datamodules.synthetic.world`) at s x the default 8,000 rows per pool with s x its
1,000 train concepts (data=world_medium's ratio at 20x), stored float16 as the caches are and read
memory-mapped as the pair stage reads them. One direction: the top-1 caption of every clip.

Methods, each in a fresh process so that its peak RSS (wait4) is its own, data included:
- exact: `search.search`, the pair stage's default (pair.backend=torch, pair.chunk x
  pair.gallery_chunk blocks);
- ivf: `ann.build_index` + `ann.search_index` with faiss IndexIVFFlat; nlist per scale is the
  largest power of two <= min(4 sqrt(rows), rows / 39) (faiss's guidance and minimum), nprobe
  as given (capped at nlist; default: the pair stage's pair.nprobe);
- hnsw: the same with faiss IndexHNSWFlat (M, efSearch, efConstruction as given).
Seconds are the index build (over the whole gallery) plus the search. The search runs over all
queries when there are at most --search-queries, else over a seeded sample of that many, and is
scaled to all queries: at a fixed index every method's search cost is linear in its queries.
recall@1: of 1,000 seeded queries (of those searched), the share whose top-1 is the exact one
(or ties with it), as pairs_summary.json records it.

Then the paper's pools (800k points, 2M audio, 1.2M images, 3M texts), every direction the
default config's plan searches (conf/config.yaml pair.routes, pair.chain), each route in its own
space's dim: exact from the measured seconds per (query x gallery row x dim) at the largest
scale; the approximate ones from their measured build seconds per row and search seconds per
query, grown with the gallery as a power law fitted between the two largest scales (an
extrapolation: recall at those sizes is not measured). GPU: a faiss-gpu estimate from FLOPs and
memory bandwidth, labelled as such (no GPU here).

Last line: `RESULT pair_scale ratio=<exact seconds / hnsw seconds at the largest scale>`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

SPACE, QUERY, GALLERY = "wavcaps", "audio", "text"
DEFAULT_ROWS, DEFAULT_CONCEPTS = 8000, 1000  # conf/data/world.yaml (world_v2 keeps them)
PAPER = {"point": 800_000, "audio": 2_000_000, "image": 1_200_000, "text": 3_000_000}
RECALL_QUERIES = 1000
# faiss-gpu estimate (not measured): an H100-class GPU, FP32 GEMM at ~50% of its 67 TFLOP/s for
# exact search (GpuIndexFlatIP), and IVF scans bound by ~3 TB/s of memory bandwidth.
GPU_FLOPS, GPU_BYTES_PER_S = 33e12, 3e12


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides)


def make_pools(scale: int, folder: Path) -> dict[str, Path]:
    """The world's audio and text pools in SPACE at `scale` x the default, as float16 .npy."""
    from datamodules.synthetic.world import World, _pool, embed
    from lightning_modules.runtime.config import space_configs

    n = DEFAULT_ROWS * scale
    cfg = compose(["data=world_v2", f"data.n_concepts={DEFAULT_CONCEPTS * scale}",
                   f"data.pool_size={{point:{n},audio:{n},image:{n},text:{n}}}"]).data  # fmt: skip
    plain = lambda c: OmegaConf.to_container(c, resolve=True)  # noqa: E731
    world = World(plain(cfg), {k: plain(v) for k, v in space_configs([SPACE]).items()})
    out = {}
    for m in (QUERY, GALLERY):
        emb, _ = embed(world, "pool", SPACE, m, _pool(world, m))
        out[m] = folder / f"{m}_{scale}.npy"
        np.save(out[m], emb.astype(np.float16))
    return out


def nlist_for(rows: int) -> int:
    """The largest power of two <= min(4 sqrt(rows), rows / 39)."""
    return 2 ** int(math.log2(min(4 * math.sqrt(rows), rows / 39)))


def child(method: str, query_path: str, gallery_path: str, settings: str) -> None:
    """Time one method on one pair of pools; print its result as JSON (last line)."""
    import torch

    from lightning_modules.pairing.ann import Ann, build_index, recall_at_1, search_index
    from lightning_modules.pairing.search import search

    s = json.loads(settings)
    torch.set_num_threads(s["threads"])
    pair = compose([]).pair
    kw = dict(chunk=int(pair.chunk), gallery_chunk=int(pair.gallery_chunk), device="cpu")
    q, g = np.load(query_path, mmap_mode="r"), np.load(gallery_path, mmap_mode="r")
    n = len(q)
    rng = np.random.default_rng(0)
    searched = np.arange(n) if n <= s["search_queries"] else np.sort(
        rng.choice(n, s["search_queries"], replace=False))  # fmt: skip
    qs = np.asarray(q[searched])  # the sample's rows, float16 as stored
    build = 0.0
    t = time.perf_counter()
    if method == "exact":
        _, rows = search(qs, g, 1, **kw)["a_to_b"]
    else:
        ann = Ann.from_config({**pair, "search": method, **{k: s[k] for k in (
            "nlist", "nprobe", "hnsw_m", "ef_search", "ef_construction")}})  # fmt: skip
        index = build_index(g, ann)
        build = time.perf_counter() - t
        t = time.perf_counter()
        _, rows = search_index(index, qs, 1, chunk=int(pair.chunk))
    seconds = time.perf_counter() - t
    sample = np.sort(rng.choice(len(qs), min(RECALL_QUERIES, len(qs)), replace=False))
    recall = recall_at_1(qs, g, rows[:, 0], sample, exact=kw)
    print(json.dumps(dict(build=build, search=seconds * n / len(qs), searched=len(qs),
                          queries=n, gallery=len(g), dim=g.shape[1], recall=recall,
                          nlist=s["nlist"], nprobe=s["nprobe"])))  # fmt: skip


def run_child(method: str, pools: dict[str, Path], settings: dict) -> dict:
    """child() in a fresh process; its result with the process's peak RSS (bytes)."""
    cmd = [sys.executable, __file__, "--child", method, str(pools[QUERY]), str(pools[GALLERY]),
           json.dumps(settings)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(settings["threads"])}
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        out.seek(0)
        text = out.read()
    if os.waitstatus_to_exitcode(status):
        raise RuntimeError(f"{method} failed:\n{text[-3000:]}")
    return dict(json.loads(text.strip().splitlines()[-1]), peak=usage.ru_maxrss * 1024)


def plan_directions() -> list[tuple[str, str, str, int]]:
    """(space, query, gallery, dim) of every direction the default pair config searches."""
    from lightning_modules.pairing.plan import pair_key, parse_routes, plan_paths
    from lightning_modules.runtime.config import space_configs, to_plain

    pc = compose([]).pair
    routes = parse_routes(to_plain(pc.routes))
    plan = plan_paths(list(pc.starts), routes, to_plain(pc.chain) or {})
    hops = {(x, y) for paths in plan.values() for p in paths.values()
            for x, y in zip(p, p[1:], strict=False)}  # fmt: skip
    dims = space_configs(set(routes.values()))
    out = []
    for x, y in sorted(hops):
        space = routes[pair_key(f"{x}_{y}", "pair")]
        out.append((space, x, y, int(dims[space]["dims"][x])))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scales", type=int, nargs="+", default=[1, 4, 20])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--search-queries", type=int, default=16384)
    pc = compose([]).pair  # the index settings default to the pair stage's (conf/config.yaml)
    parser.add_argument("--nprobe", type=int, default=pc.nprobe)
    parser.add_argument("--hnsw-m", type=int, default=pc.hnsw_m)
    parser.add_argument("--ef-search", type=int, default=pc.ef_search)
    parser.add_argument("--ef-construction", type=int, default=pc.ef_construction)
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    t_all = time.perf_counter()
    base = dict(threads=args.threads, search_queries=args.search_queries, hnsw_m=args.hnsw_m,
                ef_search=args.ef_search, ef_construction=args.ef_construction)  # fmt: skip
    print(f"# {SPACE} {QUERY}->{GALLERY} top-1 on world_v2 pools, {args.threads} threads; "
          f"searches over more than {args.search_queries} queries run on a seeded sample and "
          "are scaled to all queries (marked *)")  # fmt: skip
    header = (f"{'scale':>5} {'rows':>7} {'method':<6} {'settings':<30} {'build s':>8} "
              f"{'search s':>9} {'total s':>8} {'peak RSS':>9} {'recall@1':>8} "
              f"{'exact/this':>10}")  # fmt: skip
    print(header)
    results: dict[int, dict[str, dict]] = {}
    with tempfile.TemporaryDirectory(prefix="pair_scale_") as tmp:
        for scale in args.scales:
            t = time.perf_counter()
            pools = make_pools(scale, Path(tmp))
            rows = DEFAULT_ROWS * scale
            nlist = nlist_for(rows)
            settings = {
                "exact": "torch, pair.chunk x gallery_chunk",
                "ivf": f"nlist={nlist} nprobe={min(args.nprobe, nlist)}",
                "hnsw": f"M={args.hnsw_m} efSearch={args.ef_search} efC={args.ef_construction}",
            }
            print(f"# {scale}x: pools of {rows} rows made in {time.perf_counter() - t:.1f} s",
                  flush=True)  # fmt: skip
            results[scale] = {}
            for method in ("exact", "ivf", "hnsw"):
                s = dict(base, nlist=nlist, nprobe=min(args.nprobe, nlist))
                r = run_child(method, pools, s)
                r["total"] = r["build"] + r["search"]
                results[scale][method] = r
                mark = "*" if r["searched"] < r["queries"] else " "
                ratio = results[scale]["exact"]["total"] / r["total"]
                print(f"{scale:>4}x {rows:>7} {method:<6} {settings[method]:<30} "
                      f"{r['build']:>8.1f} "
                      f"{r['search']:>8.1f}{mark} {r['total']:>8.1f} {r['peak'] / 2**30:>7.2f} G "
                      f"{r['recall']:>8.4f} {ratio:>10.2f}", flush=True)  # fmt: skip
            for p in pools.values():
                p.unlink()
    top = max(args.scales)
    paper(results, args.scales)
    hnsw = results[top]["hnsw"]
    print(f"# at {top}x: hnsw recall@1 {hnsw['recall']:.4f}, ivf "
          f"{results[top]['ivf']['recall']:.4f}; "
          f"whole run {time.perf_counter() - t_all:.0f} s")  # fmt: skip
    print(f"RESULT pair_scale ratio={results[top]['exact']['total'] / hnsw['total']:.3f}")


def paper(results: dict[int, dict[str, dict]], scales: list[int]) -> None:
    """Extrapolate every searched direction to the paper's pools (CPU), and a GPU estimate."""
    top = max(scales)
    prev = sorted(scales)[-2] if len(scales) > 1 else None
    ex = results[top]["exact"]
    per_mac = ex["total"] / (ex["queries"] * ex["gallery"] * ex["dim"])  # s / (query x row x dim)

    def growth(method: str, key: str, per: str) -> float:
        """Exponent a of cost per row ~ gallery^a between the two largest scales (0: one scale)."""
        if prev is None:
            return 0.0
        a, b = results[prev][method], results[top][method]
        ca, cb = a[key] / a[per], b[key] / b[per]
        return max(0.0, math.log(cb / ca) / math.log(b["gallery"] / a["gallery"]))

    fits = {m: (growth(m, "build", "gallery"), growth(m, "search", "queries"))
            for m in ("ivf", "hnsw")}  # fmt: skip
    print(f"\n# paper pools {PAPER}: every direction the default plan searches, CPU hours at "
          f"the rates measured at {top}x. Approximate: cost per "
          f"row x (gallery / {ex['gallery']})^a, fitted a (build, search) = "
          + ", ".join(f"{m} ({b:.2f}, {s:.2f})" for m, (b, s) in fits.items()))  # fmt: skip
    print(f"{'direction':<24} {'queries':>9} {'gallery':>9} {'dim':>5} {'exact h':>9} "
          f"{'ivf h':>8} {'hnsw h':>8} {'GPU exact h (est.)':>19} "
          f"{'GPU ivf h (est.)':>17}")  # fmt: skip
    totals = dict.fromkeys(("exact", "ivf", "hnsw", "gpu_exact", "gpu_ivf"), 0.0)
    for space, x, y, dim in plan_directions():
        nq, ng = PAPER[x], PAPER[y]
        cost = {"exact": per_mac * nq * ng * dim}
        for m, (a_b, a_s) in fits.items():
            r = results[top][m]
            grow = lambda a, ng=ng, r=r: (ng / r["gallery"]) ** a  # noqa: E731
            cost[m] = (r["build"] / r["gallery"] * ng * grow(a_b)
                       + r["search"] / r["queries"] * nq * grow(a_s)) * dim / r["dim"]  # fmt: skip
        cost["gpu_exact"] = 2 * nq * ng * dim / GPU_FLOPS
        # IVF on a GPU: the coarse GEMM against nlist cells, then the probed lists read from
        # memory at this run's largest-scale nprobe / nlist fraction.
        nlist, ivf = nlist_for(ng), results[top]["ivf"]
        probed = ivf["nprobe"] / ivf["nlist"] * ng
        cost["gpu_ivf"] = (2 * nq * nlist * dim / GPU_FLOPS
                           + nq * probed * dim * 4 / GPU_BYTES_PER_S)  # fmt: skip
        for k in totals:
            totals[k] += cost[k]
        print(f"{space + ' ' + x + '->' + y:<24} {nq:>9} {ng:>9} {dim:>5} "
              f"{cost['exact'] / 3600:>9.1f} {cost['ivf'] / 3600:>8.1f} "
              f"{cost['hnsw'] / 3600:>8.1f} "
              f"{cost['gpu_exact'] / 3600:>19.2f} {cost['gpu_ivf'] / 3600:>17.2f}")  # fmt: skip
    print(f"{'total':<24} {'':>9} {'':>9} {'':>5} {totals['exact'] / 3600:>9.1f} "
          f"{totals['ivf'] / 3600:>8.1f} {totals['hnsw'] / 3600:>8.1f} "
          f"{totals['gpu_exact'] / 3600:>19.2f} {totals['gpu_ivf'] / 3600:>17.2f}")  # fmt: skip
    print("# exact (torch) serves both directions of a route in one pass, so its pair-stage cost "
          "is about half the exact column's sum over a route's two directions; GPU columns are "
          f"estimates, not measured: exact {GPU_FLOPS / 1e12:.0f} TFLOP/s FP32 GEMM, ivf scans "
          f"at {GPU_BYTES_PER_S / 1e12:.0f} TB/s")  # fmt: skip


if __name__ == "__main__":
    main()
