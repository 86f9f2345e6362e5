"""Bind step: BindModule training throughput through the Lightning Trainer vs a plain PyTorch loop.

    python bench/bind_step.py [--quick] [--root DIR] [--threads N] [--hidden-dim H]

Both run the same BindModule (space clap into the anchor eva_clip_18b, FreeBind's 4 experts), the
same batches from the same EmbeddingDataModule loader, AdamW with a LambdaLR stepped every step,
for the same number of steps; the first `warmup` steps are not timed. Rows:
- plain:     for batch in loader: loss = model.training_step(batch); backward; step; zero_grad;
- lightning: Trainer.fit with logger, checkpointing, progress bar and model summary off;
- defaults:  Trainer.fit as `train.py stage=bind` builds it (make_trainer: conf/trainer/default,
             CSV logger, progress bar on, Lightning's default checkpointing), for reference.
Validation is off in all three (limit_val_batches=0): this measures training steps.
Prints a table, then `RESULT bind_step ratio=<lightning / plain steps/s>` (target >= 0.85).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hydra  # noqa: E402
import lightning as L  # noqa: E402
import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402
from omegaconf import DictConfig  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from datamodules.embeddings import EmbeddingDataModule  # noqa: E402
from lightning_modules.runtime.config import CONF_DIR, ensure_data  # noqa: E402
from lightning_modules.runtime.training import make_trainer
from lightning_modules.stages.bind import BindModule  # noqa: E402


class StepTimer(Callback):
    """Time from the end of step `warmup` to the end of the last step."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.steps, self.start, self.end = warmup, 0, 0.0, 0.0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.steps += 1
        self.end = time.perf_counter()
        if self.steps == self.warmup:
            self.start = self.end

    def steps_per_s(self) -> float:
        return (self.steps - self.warmup) / (self.end - self.start)


def compose_cfg(args: argparse.Namespace) -> DictConfig:
    """The bind config of `train.py stage=bind space=clap` on a world of `rows` rows per pool."""
    n = args.rows
    overrides = [
        "stage=bind",
        "space=clap",
        f"paths.output_dir={args.root}",
        f"data.pool_size={{point:{n},audio:{n},image:{n},text:{n}}}",
        f"data.oracle_tuples={n}",
        "data.zeroshot={classes:10,per_class:2,templates:2,multilabel_items:20}",
        f"bind.hidden_dim={args.hidden_dim}",
        f"bind.batch_size={args.batch_size}",
        "trainer.accelerator=cpu",
        "+trainer.limit_val_batches=0",
        f"+trainer.max_steps={args.steps}",
    ]
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def build(cfg: DictConfig, root: Path) -> tuple[BindModule, EmbeddingDataModule]:
    """The model and data of bind.run(), seeded so that every row starts from the same weights."""
    space, anchor = cfg.space, cfg.anchor
    dims, anchor_dims = dict(space.dims), dict(anchor.dims)
    needs = [(space.name, m) for m in dims] + [(anchor.name, m) for m in anchor_dims]
    dm = hydra.utils.instantiate(cfg.datamodule)(
        root, root / "tuples" / "oracle.npz", needs, {}, batch_size=cfg.bind.batch_size
    )
    L.seed_everything(cfg.seed, verbose=False)
    model = hydra.utils.instantiate(cfg.model.bind, _recursive_=False)
    return model, dm


def plain(cfg: DictConfig, root: Path, steps: int, warmup: int) -> float:
    """Steps/s of a hand-written loop over the same loader, model and optimizer."""
    model, dm = build(cfg, root)
    dm.setup("fit")
    loader = dm.train_dataloader()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.bind.lr, weight_decay=cfg.bind.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)  # the cost of a schedule
    model.train()
    done, epoch, start = 0, 0, 0.0
    with warnings.catch_warnings():  # training_step's self.log() warns without a Trainer
        warnings.simplefilter("ignore")
        while done < steps:
            loader.sampler.set_epoch(epoch)
            for batch in loader:
                loss = model.training_step(batch, done)
                loss.backward()
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                done += 1
                if done == warmup:
                    start = time.perf_counter()
                if done == steps:
                    break
            epoch += 1
    return (steps - warmup) / (time.perf_counter() - start)


def lightning(cfg: DictConfig, root: Path, steps: int, warmup: int, defaults: bool) -> float:
    """Steps/s of Trainer.fit: everything optional off, or as make_trainer() configures it."""
    model, dm = build(cfg, root)
    timer = StepTimer(warmup)
    if defaults:
        trainer = make_trainer(cfg, epochs=-1, callbacks=[timer])  # max_steps: from compose_cfg
        with contextlib.redirect_stdout(io.StringIO()):  # the progress bar
            trainer.fit(model, dm)
    else:
        trainer = L.Trainer(
            accelerator="cpu",
            devices=1,
            max_steps=steps,
            limit_val_batches=0,
            num_sanity_val_steps=0,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            use_distributed_sampler=False,
            callbacks=[timer],
        )
        trainer.fit(model, dm)
    assert timer.steps == steps, (timer.steps, steps)
    return timer.steps_per_s()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small projector, 5 rounds (< 2 min)")
    parser.add_argument("--root", default=None, help="output dir (default: a temp dir)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--hidden-dim", type=int, default=None, help="default: 256 quick, 2048")
    parser.add_argument("--batch-size", type=int, default=512)
    args = parser.parse_args()
    rounds, steps, warmup = (5, 20, 4) if args.quick else (3, 40, 8)
    args.hidden_dim = args.hidden_dim or (256 if args.quick else 2048)
    args.rows = 8000
    torch.set_num_threads(args.threads)
    for name in ("lightning.pytorch", "lightning.fabric"):  # "GPU available: ..." per Trainer
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*(LeafSpec|exists and is not empty).*")

    with tempfile.TemporaryDirectory() as tmp:
        args.root = args.root or tmp
        args.steps = steps
        cfg = compose_cfg(args)
        root = ensure_data(cfg, [cfg.space.name, cfg.anchor.name])
        runs = {
            "plain": lambda: plain(cfg, root, steps, warmup),
            "lightning": lambda: lightning(cfg, root, steps, warmup, defaults=False),
            "defaults": lambda: lightning(cfg, root, steps, warmup, defaults=True),
        }
        rates: dict[str, list[float]] = {name: [] for name in runs}
        # Interleaved, in alternating order, so that load from other processes hits all alike.
        for i in range(rounds):
            for name in list(runs)[:: 1 if i % 2 == 0 else -1]:
                rates[name].append(runs[name]())

    labels = {
        "plain": "plain PyTorch loop",
        "lightning": "Lightning Trainer (logger/ckpt/progress bar/summary off)",
        "defaults": "Lightning Trainer as train.py configures it (CSV, bar, ckpt)",
    }
    table = Table(
        title=f"bind step: clap -> eva_clip_18b, batch {args.batch_size}, hidden "
        f"{args.hidden_dim}, 4 experts, {steps - warmup} timed steps after "
        f"{warmup}, {args.threads} thread(s), {rounds} rounds"
    )
    for col in ("loop", "steps/s (median)", "rows/s", "/ plain (median, range)", "target"):
        table.add_column(col, justify="left" if col == "loop" else "right")
    ratio = {}
    for name in runs:
        r = [a / b for a, b in zip(rates[name], rates["plain"], strict=True)]
        ratio[name] = statistics.median(r)
        median = statistics.median(rates[name])
        table.add_row(
            labels[name],
            f"{median:.2f}",
            f"{median * args.batch_size:,.0f}",
            f"{ratio[name]:.3f} ({min(r):.3f}-{max(r):.3f})",
            ">= 0.85" if name == "lightning" else "",
        )
    Console(width=140).print(table)
    print(f"RESULT bind_step_defaults ratio={ratio['defaults']:.3f}")
    print(f"RESULT bind_step ratio={ratio['lightning']:.3f}")


if __name__ == "__main__":
    main()
