"""Route memory: peak RSS of a route-like epoch over projected-size caches, at pool sizes 1x and 8x.

    python bench/route_memory.py [--quick] [--root DIR] [--resident-mb MB]

Writes, with CacheWriter, the caches a Base-like route run reads (per modality: the projected
groups, dim 1024, and the router's predictor spaces, float16) for pools of N and 8N rows per
modality, and a tuple table over each. Each measurement is a fresh subprocess (so ru_maxrss is
its own) that opens EmbeddingDataModule and reads one whole train epoch, as the route stage does:
- datamodule:   EmbeddingDataModule as configured (`--resident-mb`, its default 256): caches that
                fit are loaded whole, the others are read per batch;
- streaming:    resident_mb=0, every cache read per batch from disk;
- whole caches: the old way, every cache loaded in memory (load_embeddings), then the same
                batches gathered from those tensors (reference: what grows with the pool).
Prints a table, then `RESULT route_memory ratio=<peak 1x / peak 8x>` for the datamodule (goal
>= 0.8) and the same ratio for the other two.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from datamodules.cache import CacheWriter, cache_dir  # noqa: E402
from datamodules.tuples import save_tuples  # noqa: E402
from encoders.modalities import MODALITIES  # noqa: E402

DIM = 1024
# Base: groups per modality (projected caches) and the router's predictor spaces (raw caches).
GROUPS = {
    "audio": ["wavcaps", "wavcaps_audiocaps", "wavcaps_clotho", "imagebind"],
    "image": ["eva02_e", "imagebind"],
    "point": ["uni3d", "imagebind"],
    "text": ["wavcaps", "wavcaps_audiocaps", "wavcaps_clotho", "eva02_e", "uni3d", "imagebind"],
}
PREDICTORS = {"audio": ["wavcaps"], "image": ["eva02_e"], "point": ["uni3d"],
              "text": ["wavcaps", "eva02_e", "uni3d"]}  # fmt: skip
MODES = ("datamodule", "streaming", "whole caches")


def needs() -> list[tuple[str, str]]:
    """The (space, modality) arrays a Base route batch reads."""
    out = {(f"{g}@omni", m) for m, gs in GROUPS.items() for g in gs}
    return sorted(out | {(p, m) for m, ps in PREDICTORS.items() for p in ps})


def write_world(root: Path, n: int, batch: int) -> Path:
    """Caches of n rows per modality for every needed array, and an n-row tuple table."""
    rng = np.random.default_rng(0)
    block = rng.standard_normal((min(n, 8192), DIM)).astype(np.float32)
    block = (block / np.linalg.norm(block, axis=1, keepdims=True)).astype(np.float16)
    for space, m in needs():
        writer = CacheWriter(
            cache_dir(root, "pool", space, m), space=space, modality=m, dim=DIM, overwrite=True
        )
        for lo in range(0, n, 65536):  # shards as extract writes them
            rows = np.arange(lo, min(lo + 65536, n))
            writer.append(block[rows % len(block)], rows)
        writer.close()
    table = {m: rng.permutation(n) for m in GROUPS}
    table["start"] = rng.integers(0, len(MODALITIES), n)
    table["provenance"] = rng.integers(0, 3, n)
    save_tuples(root / "tuples.npz", table, pool="pool")
    return root


def child(root: Path, mode: str, resident_mb: float, batch: int) -> None:
    """One epoch in this process; prints a JSON line with the peak RSS and the epoch time."""
    import hydra
    from hydra import compose, initialize_config_dir

    from datamodules.embeddings import load_embeddings
    from lightning_modules.runtime.config import CONF_DIR

    torch.set_num_threads(1)
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        configured = hydra.utils.instantiate(compose("config").datamodule)  # a functools.partial
    kw = {"resident_mb": 0 if mode == "streaming" else resident_mb}
    dm = configured(root, root / "tuples.npz", needs(), {}, batch_size=batch, **kw)
    dm.setup("fit")
    if mode == "whole caches":
        for (s, m), cache in dm.train_set.arrays.items():
            cache.memory = load_embeddings(root, "pool", s, m)
    start, total = time.perf_counter(), 0.0
    for b in dm.train_dataloader():
        # A stand-in for the step: touch every array (the model's memory does not grow with N).
        total += sum(float(x[:, 0].sum()) for per in b["emb"].values() for x in per.values())
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    print(json.dumps(dict(peak=peak, seconds=seconds, loaded=sum(
        c.memory is not None for c in dm.train_set.arrays.values()))))  # fmt: skip


def measure(root: Path, mode: str, resident_mb: float, batch: int) -> dict:
    """Run `child` in a fresh interpreter; returns its JSON."""
    cmd = [sys.executable, __file__, "--child", str(root), "--mode", mode,
           "--resident-mb", str(resident_mb), "--batch-size", str(batch)]  # fmt: skip
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N = 6,144 rows (1x), about 2 min")
    parser.add_argument("--rows", type=int, default=None, help="rows per modality at 1x")
    parser.add_argument("--root", default=None, help="where to write the caches (default: temp)")
    parser.add_argument("--resident-mb", type=float, default=256, help="as the datamodule")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="datamodule", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(Path(args.child), args.mode, args.resident_mb, args.batch_size)
        return
    n = args.rows or (6144 if args.quick else 32768)
    from rich.console import Console
    from rich.table import Table

    with tempfile.TemporaryDirectory(dir=args.root) as tmp:
        results = {}
        for scale in (1, 8):
            root = write_world(Path(tmp) / f"x{scale}", n * scale, args.batch_size)
            size = sum(f.stat().st_size for f in root.rglob("*.emb.npy"))
            for mode in MODES:
                results[(scale, mode)] = measure(root, mode, args.resident_mb, args.batch_size)
                results[(scale, mode)]["size"] = size
    table = Table(
        title=f"route-like epoch: {len(needs())} arrays of dim {DIM} float16, batch "
        f"{args.batch_size}, resident_mb {args.resident_mb:g}"
    )
    for col in ("pool rows/modality", "caches on disk", "reader", "whole caches loaded",
                "peak RSS", "epoch s"):  # fmt: skip
        table.add_column(col, justify="right")
    for (scale, mode), r in results.items():
        table.add_row(f"{scale}x = {n * scale:,}", f"{r['size'] / 2**20:,.0f} MiB", mode,
                      f"{r['loaded']}/{len(needs())}", f"{r['peak'] / 2**20:,.0f} MiB",
                      f"{r['seconds']:.1f}")  # fmt: skip
    Console(width=130).print(table)
    for mode in MODES[1:]:
        ratio = results[(1, mode)]["peak"] / results[(8, mode)]["peak"]
        print(f"{mode}: peak 1x / peak 8x = {ratio:.3f}")
    ratio = results[(1, "datamodule")]["peak"] / results[(8, "datamodule")]["peak"]
    print(f"RESULT route_memory ratio={ratio:.3f}")


if __name__ == "__main__":
    main()
