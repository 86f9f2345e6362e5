"""Extraction throughput: the extract stage vs a bare loop calling the same encoder.

    python bench/extract.py [--quick] [--images N] [--repeats R]

Both embed the same JPEG images (scikit-image samples, randomly cropped to 256 px) with the same
encoder, open_clip ViT-B-32 with random weights (a real CLIP size; nothing is downloaded):
- ours:  the extract stage, `lightning_modules.extract.run(cfg)`: Lightning predict over
         RawDataModule, the CacheShardWriter writing float16 shards, the manifest at the end;
- bare:  the same encoder built the same way, called in a plain `for batch in loader` loop on the
         same DataLoader (same dataset, batches, collate and workers), writing nothing;
- model: for context, the encoder alone on batches already decoded into memory.
Each timing builds the encoder inside the timed region (ours must too), runs are interleaved and
the best of `repeats` counts. Prints a table, then `RESULT extract ratio=<ours / bare items/s>`
(target >= 0.9).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from datamodules.extraction import (  # noqa: E402
    ChunkBatchSampler,
    Collate,
    LoadSettings,
    RawDataset,
)
from encoders import build_encoder, build_processor  # noqa: E402
from lightning_modules.config import CONF_DIR  # noqa: E402
from lightning_modules.extract import run  # noqa: E402
from lightning_modules.extract_plan import plan  # noqa: E402


def make_images(folder: Path, n: int, seed: int = 0) -> None:
    """n JPEGs: random 256 px crops of scikit-image's colour samples."""
    from PIL import Image
    from skimage import data

    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    names = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field")
    sources = [Image.fromarray(getattr(data, k)()).convert("RGB") for k in names]
    for i in range(n):
        img = sources[i % len(sources)]
        x, y = rng.integers(0, img.width - 256), rng.integers(0, img.height - 256)
        img.crop((x, y, x + 256, y + 256)).save(folder / f"{i:05d}.jpg", quality=90)


def config(out: Path, images: Path, batch_size: int, workers: int):
    overrides = [
        "stage=extract", "space=tiny_clip", "data=demo_raw", "trainer=cpu", "logger=none",
        f"paths.output_dir={out}", "data.generate=null", "space.encoder.model_cfg=null",
        "space.dims={image: 512, text: 512}", "extract.datasets=[bench]",
        f"+data.datasets.bench={{image: {{source: '{images}'}}}}",
        f"extract.batch_size={batch_size}", f"extract.num_workers={workers}",
        "extract.overwrite=true", "trainer.enable_progress_bar=false", "data.benchmarks=[]",
    ]  # fmt: skip
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def time_ours(cfg) -> float:
    start = time.perf_counter()
    run(cfg)
    return time.perf_counter() - start


def bare_loader(cfg) -> DataLoader:
    """The DataLoader the stage builds for this job, made by hand."""
    enc_cfg, dims = OmegaConf.to_container(cfg.space.encoder, resolve=True), dict(cfg.space.dims)
    job = plan(cfg)[0]
    chunks = [job.chunk(c) for c in range(job.n_chunks)]
    bs = cfg.extract.batch_size
    sampler = ChunkBatchSampler(chunks, bs, ChunkBatchSampler.count(chunks, bs), 0)
    processor = build_processor(enc_cfg, dims)
    return DataLoader(RawDataset(job, processor, LoadSettings()), batch_sampler=sampler,
                      collate_fn=Collate(processor, "image", False),
                      num_workers=cfg.extract.num_workers)  # fmt: skip


def time_bare(cfg) -> float:
    start = time.perf_counter()
    enc_cfg, dims = OmegaConf.to_container(cfg.space.encoder, resolve=True), dict(cfg.space.dims)
    encoder = build_encoder(enc_cfg, dims)
    with torch.inference_mode():
        for batch in bare_loader(cfg):
            encoder({"image": batch["inputs"]})
    return time.perf_counter() - start


def time_model(cfg) -> float:
    enc_cfg, dims = OmegaConf.to_container(cfg.space.encoder, resolve=True), dict(cfg.space.dims)
    batches = [b["inputs"] for b in bare_loader(cfg)]
    start = time.perf_counter()
    encoder = build_encoder(enc_cfg, dims)
    with torch.inference_mode():
        for x in batches:
            encoder({"image": x})
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="32 images, 2 repeats (< 2 min)")
    parser.add_argument("--images", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    n = args.images or (32 if args.quick else 192)
    repeats = args.repeats or (2 if args.quick else 3)
    logging.disable(logging.WARNING)  # open_clip warns that the weights are random, each build
    with tempfile.TemporaryDirectory() as tmp:
        make_images(Path(tmp) / "images", n)
        cfg = config(Path(tmp) / "out", Path(tmp) / "images", args.batch_size, args.workers)
        times: dict[str, list[float]] = {"ours": [], "bare": [], "model": []}
        time_bare(cfg)  # warm-up: imports, first-call allocations
        for _ in range(repeats):
            times["ours"].append(time_ours(cfg))
            times["bare"].append(time_bare(cfg))
            times["model"].append(time_model(cfg))
    best = {k: min(v) for k, v in times.items()}
    table = Table(
        title=f"extract: {n} images, open_clip ViT-B-32, batch {args.batch_size}, "
        f"{args.workers} worker(s), {torch.get_num_threads()} threads, best of {repeats}"
    )
    for col in ("path", "seconds (all runs)", "items/s (best)", "vs bare"):
        table.add_column(col, justify="right" if col != "path" else "left")
    labels = {"ours": "ours: extract stage (predict + shards)", "bare": "bare loop, same loader",
              "model": "encoder only, batches in memory"}  # fmt: skip
    for k, label in labels.items():
        table.add_row(label, " ".join(f"{t:.2f}" for t in times[k]), f"{n / best[k]:.2f}",
                      f"{best['bare'] / best[k]:.3f}")  # fmt: skip
    Console().print(table)
    print(f"RESULT extract ratio={best['bare'] / best['ours']:.3f}")


if __name__ == "__main__":
    main()
