"""Data path: rows/s of EmbeddingDataModule's train loader vs a per-item Dataset + default collate.

    python bench/data_path.py [--quick] [--root DIR] [--threads N]

All readers serve the same epoch of the same tuple table from the same pool caches (a synthetic
world, float16 as stored, float32 out):
- ours:   EmbeddingDataModule.train_dataloader(), one full epoch (index-tensor batches), reading
          the memory-mapped cache shards (it never loads a whole cache);
- naive:  what a user would otherwise write: a Dataset whose __getitem__ returns one row dict per
          modality, DataLoader(batch_size=..., shuffle=True) with the default collate, over
          whole caches loaded in memory (the old way; in-memory favours it);
- gather: the floor, no DataLoader at all, over the in-memory copies: `array[rows[idx]].float()`
          per array per batch (and, for reference, the same with `index_select`).
Prints a table, then `RESULT data_path ratio=<ours / naive>` (target >= 10); the table also gives
ours / gather (target >= 0.5).
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hydra  # noqa: E402
import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

from datamodules.embeddings import load_embeddings  # noqa: E402
from datamodules.synthetic.world import ensure_world  # noqa: E402
from lightning_modules.runtime.config import CONF_DIR, space_configs  # noqa: E402

SPACES = ("clap", "eva_clip_18b")  # an audio-text source space and the anchor: 4 arrays per row


class PerItemTuples(Dataset):
    """The naive reader: one tuple per __getitem__, as {"emb": {space: {modality: (dim,)}}}."""

    def __init__(
        self,
        arrays: dict[tuple[str, str], torch.Tensor],
        rows: dict[str, torch.Tensor],
        columns: dict[str, torch.Tensor],
    ) -> None:
        self.arrays, self.rows, self.columns = arrays, rows, columns

    def __len__(self) -> int:
        return len(self.columns["start"])

    def __getitem__(self, i: int) -> dict:
        emb: dict[str, dict[str, torch.Tensor]] = {}
        for (space, modality), array in self.arrays.items():
            emb.setdefault(space, {})[modality] = array[self.rows[modality][i]].float()
        return {"emb": emb, "index": i, **{k: v[i] for k, v in self.columns.items()}}


def world_root(args: argparse.Namespace) -> Path:
    """A world whose pools hold `rows` items per modality (written unless it exists)."""
    n = args.rows
    overrides = [
        f"paths.output_dir={args.root}",
        f"data.pool_size={{point:{n},audio:{n},image:{n},text:{n}}}",
        f"data.oracle_tuples={n}",
        "data.n_concepts=1000",
        "data.zeroshot={classes:10,per_class:2,templates:2,multilabel_items:20}",
    ]
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    return ensure_world(cfg.data, space_configs(SPACES))


def measure(
    readers: dict[str, Callable[[], Iterable[dict]]], rounds: int, min_s: float
) -> tuple[dict[str, list[float]], dict[str, int]]:
    """Rows/s of each reader per round, and each reader's rows per epoch.

    Rounds interleave the readers so that load from other processes hits them alike; in a round
    each reader runs whole epochs until `min_s` seconds have passed.
    """
    rates: dict[str, list[float]] = {name: [] for name in readers}
    rows_per_epoch = {}
    for _ in range(rounds):
        for name, epoch in readers.items():
            start, rows = time.perf_counter(), 0
            while True:
                n = 0
                for batch in epoch():
                    n += len(batch["start"])
                rows += n
                elapsed = time.perf_counter() - start
                if elapsed >= min_s:
                    break
            rates[name].append(rows / elapsed)
            rows_per_epoch[name] = n
    return rates, rows_per_epoch


def ratios(ours: list[float], other: list[float]) -> tuple[float, float, float]:
    """Median, min and max over rounds of ours / other (each round's pair ran back to back)."""
    r = [a / b for a, b in zip(ours, other, strict=True)]
    return statistics.median(r), min(r), max(r)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="20k tuples, 5 short rounds (< 2 min)")
    parser.add_argument(
        "--root", default=None, help="output dir for the world (default: a temp dir)"
    )
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (1: steadier on a shared machine)",
    )
    args = parser.parse_args()
    args.rows, rounds, min_s = (20_000, 5, 1.0) if args.quick else (200_000, 7, 3.0)
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)

    with tempfile.TemporaryDirectory() as tmp:
        args.root = args.root or tmp
        t0 = time.perf_counter()
        root = world_root(args)
        setup_s = time.perf_counter() - t0
        needs = [("clap", m) for m in ("audio", "text")]
        needs += [("eva_clip_18b", m) for m in ("image", "text")]
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            configured = hydra.utils.instantiate(compose("config", ["seed=0"]).datamodule)
        dm = configured(root, root / "tuples" / "oracle.npz", needs, {}, batch_size=args.batch_size)
        dm.setup("fit")
        data = dm.train_set
        loader = dm.train_dataloader()
        # The other readers get whole in-memory copies of the caches ours maps.
        arrays = {(s, m): load_embeddings(root, "pool", s, m) for s, m in data.arrays}
        rows = data.rows
        naive = DataLoader(
            PerItemTuples(arrays, rows, data.columns),
            batch_size=args.batch_size,
            shuffle=True,
            drop_last=True,
        )

        def gather(select: bool) -> Iterable[dict]:
            order = torch.randperm(len(data))
            for idx in order.split(args.batch_size)[: len(data) // args.batch_size]:
                emb = {}
                for (space, modality), array in arrays.items():
                    pool_rows = rows[modality][idx]
                    out = array.index_select(0, pool_rows) if select else array[pool_rows]
                    emb.setdefault(space, {})[modality] = out.float()
                yield {"emb": emb, **{k: v[idx] for k, v in data.columns.items()}}

        readers = {
            "ours": lambda: loader,
            "naive": lambda: naive,
            "gather": lambda: gather(select=False),
            "select": lambda: gather(select=True),
        }
        rates, rows = measure(readers, rounds, min_s)

    table = Table(
        title=f"data path: {len(data):,} tuples x {len(needs)} arrays, batch "
        f"{args.batch_size}, {args.threads} thread(s), {rounds} rounds"
    )
    for col in (
        "reader",
        "rows/epoch",
        "rows/s (median)",
        "ours / reader (median, range)",
        "target",
    ):
        table.add_column(col, justify="left" if col == "reader" else "right")
    labels = {
        "ours": "EmbeddingDataModule.train_dataloader()",
        "naive": "per-item Dataset + default collate",
        "gather": "raw tensor[idx] gather, no DataLoader",
        "select": "raw index_select gather, no DataLoader",
    }
    targets = {"ours": "", "naive": ">= 10", "gather": ">= 0.5", "select": ""}
    result = {}
    for name in readers:
        result[name] = mid, lo, hi = ratios(rates["ours"], rates[name])
        table.add_row(
            labels[name],
            f"{rows[name]:,}",
            f"{statistics.median(rates[name]):,.0f}",
            f"{mid:.2f} ({lo:.2f}-{hi:.2f})",
            targets[name],
        )
    Console(width=120).print(table)
    print(f"(world setup {setup_s:.1f} s, not timed)")
    print(f"RESULT data_path_vs_gather ratio={result['gather'][0]:.3f}")
    print(f"RESULT data_path ratio={result['naive'][0]:.2f}")


if __name__ == "__main__":
    main()
