"""Cost of verifying an embedding cache against its manifest's sha256 digests.

    python bench/verify.py [--quick] [--mb MB] [--repeats R]

Writes a cache of float16 shards (dim 1024, `--mb` MiB in all) with CacheWriter, dates it back
(outside the racy window, as any cache from an earlier run), then times, interleaved, best of R:
- hash speed of one pass over every shard file: sha256 (hashlib, what manifests record),
  xxh3-128 (xxhash) and blake3 (single thread, and its default multi-threaded mode), if installed;
- opening the cache: `verify=False` (structural checks only), a first verified open (every file
  hashed: no memo, no stamp), and a verified open in a new process (memo cleared, stamp kept).
Files are in the page cache, so this measures the hashing, not the disk. Prints a table, then
`RESULT verify ratio=<first verified open / stamped open>` (higher is better).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from datamodules import artifacts  # noqa: E402
from datamodules.cache import CacheWriter, EmbeddingCache  # noqa: E402

DIM, ROWS_PER_SHARD = 1024, 32768  # 64 MiB float16 shards


def write_cache(directory: Path, mib: int) -> list[Path]:
    """A cache of about `mib` MiB of float16 embeddings, dated an hour back; returns its files."""
    writer = CacheWriter(directory, space="bench", modality="audio", dim=DIM, fingerprint="b")
    rng = np.random.default_rng(0)
    rows = mib * 2**20 // (DIM * 2)
    for start in range(0, rows, ROWS_PER_SHARD):
        n = min(ROWS_PER_SHARD, rows - start)
        emb = rng.standard_normal((n, DIM), dtype=np.float32)
        writer.append(emb, np.arange(start, start + n), labels=np.arange(n) % 7)
    writer.close()
    files = sorted(p for p in directory.glob("*.npy"))
    for path in files:
        t = path.stat().st_mtime_ns - 3600 * 10**9
        os.utime(path, ns=(t, t))
    return files


def hash_files(files: list[Path], new) -> None:
    """One pass of a hashlib-like constructor over every file, in 4 MiB blocks."""
    for path in files:
        h = new()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
        h.hexdigest()


def main() -> None:
    """Time the hashes and the verified opens; print the table and the RESULT line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="128 MiB, 3 repeats")
    parser.add_argument("--mb", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    mib, repeats = (128, 3) if args.quick else (args.mb, args.repeats)

    import hashlib

    hashes = {"sha256 (hashlib)": hashlib.sha256}
    try:
        import xxhash

        hashes["xxh3-128 (xxhash)"] = xxhash.xxh3_128
    except ImportError:
        pass
    try:
        import blake3

        hashes["blake3, 1 thread"] = blake3.blake3
        hashes["blake3, all threads"] = lambda: blake3.blake3(max_threads=blake3.blake3.AUTO)
    except ImportError:
        pass

    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / "cache"
        files = write_cache(d, mib)
        size = sum(p.stat().st_size for p in files) / 2**20

        def first_open() -> None:
            artifacts.forget_verified()
            (d / artifacts.STAMP).unlink(missing_ok=True)
            EmbeddingCache(d)

        def stamped_open() -> None:
            artifacts.forget_verified()
            EmbeddingCache(d)

        timed = {f"hash: {k}": (lambda n=new: hash_files(files, n)) for k, new in hashes.items()}
        timed |= {
            "open, verify=False": lambda: EmbeddingCache(d, verify=False),
            "open, verified, first time": first_open,
            "open, verified, stamp (new process)": stamped_open,
            "open, verified, memo (same process)": lambda: EmbeddingCache(d),
        }
        best = dict.fromkeys(timed, float("inf"))
        for _ in range(repeats):  # interleaved rounds: machine noise hits every row alike
            for name, fn in timed.items():
                t = time.perf_counter()
                fn()
                best[name] = min(best[name], time.perf_counter() - t)

    table = Table(title=f"verifying a {size:.0f} MiB cache ({len(files)} files), best of {repeats}")
    for column in ("what", "seconds", "MiB/s", "s per 100 GiB"):
        table.add_column(column, justify="left" if column == "what" else "right")
    for name, s in best.items():
        rate = size / s
        table.add_row(name, f"{s:.4f}", f"{rate:,.0f}", f"{100 * 1024 / rate:,.1f}")
    Console().print(table)
    ratio = best["open, verified, first time"] / best["open, verified, stamp (new process)"]
    print(f"RESULT verify ratio={ratio:.1f}")


if __name__ == "__main__":
    main()
