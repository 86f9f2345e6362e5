"""Extraction throughput: the extract stage vs a bare loop calling the same encoder.

    python bench/extract.py [--quick] [--items N] [--repeats R]     # open_clip ViT-B-32, images
    python bench/extract.py --space tiny_wavcaps [--modalities audio,text] [--set KEY=VALUE ...]
    python bench/extract.py --families [--quick]                     # every family's tiny space

Each row embeds the same raw files, written into a temporary folder, with the same encoder (random
weights; nothing is downloaded), per (space, modality):
- image: JPEGs, random 256 px crops of scikit-image's colour samples;
- audio: 3 s mono wav files at 44.1 kHz (soundfile), tones plus noise, so every encoder resamples;
- point: .npy (2048, 6) clouds, xyz + rgb in [0, 1];
- text:  a .jsonl caption list (`text`, `provenance`), datamodules/items.py's format.
The default row is the one this script has always timed: space tiny_clip at open_clip ViT-B-32's
real size (`space.encoder.model_cfg=null`, 512-d). `--space <name>` times any conf/space config
on each modality it embeds from raw files (all but text unless `--modalities` names it);
`--set` adds Hydra overrides (e.g. `--space eva_clip_18b --set space.encoder.size=tiny ...`).
`--families` times the tiny smoke space of every encoder family in one run (FAMILIES below).
Per row:
- ours:  the extract stage, `lightning_modules.stages.extract.run(cfg)`: Lightning predict over
         RawDataModule, the CacheShardWriter writing float16 shards, the manifest at the end;
- bare:  the same encoder built the same way, called in a plain `for batch in loader` loop on the
         same DataLoader (same dataset, load settings, batches, collate and workers), writing
         nothing;
- model: for context, the encoder alone on batches already decoded into memory (one run).
Each timing builds the encoder inside the timed region (ours must too); after a warm-up (one
build, one batch) ours and bare are interleaved and the best of `repeats` counts. `--quick`: 32
items (16 per row with --families), 2 repeats. Prints one table row per (space, modality), then
`RESULT extract ratio=<min over the rows of ours / bare items/s>` (target >= 0.9): the worst
row, which with the default single row is the ratio this line has always reported.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
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
from encoders.base import Encoder  # noqa: E402
from lightning_modules.runtime.config import CONF_DIR, to_plain  # noqa: E402
from lightning_modules.stages.extract import run  # noqa: E402
from lightning_modules.stages.extract_plan import plan  # noqa: E402


@dataclass(frozen=True)
class Bench:
    """One table row: a space (with overrides) embedding one modality from raw files."""

    space: str
    modality: str
    overrides: tuple[str, ...] = ()
    label: str | None = None  # what the table calls the space (default: its name)


# Today's row: tiny_clip's encoder at open_clip ViT-B-32's real size (a real CLIP size).
DEFAULT = Bench("tiny_clip", "image", ("space.encoder.model_cfg=null",
                "space.dims={image: 512, text: 512}"), "open_clip ViT-B-32")  # fmt: skip
# Every encoder family's smoke space and the modalities it embeds from raw files.
FAMILIES: dict[str, tuple[str, ...]] = {
    "tiny_wavcaps": ("audio",),  # encoders/wavcaps.py
    "tiny_imagebind": ("audio", "image"),  # encoders/imagebind.py
    "tiny_uni3d": ("point",),  # encoders/composite.py -> encoders/uni3d.py
    "tiny_eva02_e": ("image",),  # encoders/openclip.py, timm EVA02 tower
    "tiny_clip": ("image",),  # encoders/openclip.py
    "tiny_clap": ("audio",),  # encoders/clap.py
}
# EVA-CLIP-18B (encoders/eva_clip.py) has no smoke space: its `tiny` preset, random weights.
TINY_EVA_CLIP = Bench("eva_clip_18b", "image", ("space.encoder.size=tiny",
                      "space.encoder.checkpoint=null", "space.encoder.precision=fp32",
                      "space.dims={image: 32, text: 32}"), "eva_clip_18b (size=tiny)")  # fmt: skip
RAW = ("image", "audio", "point")  # what --space times by default (text: with --modalities)


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


def make_audio(folder: Path, n: int, seed: int = 0, rate: int = 44100, seconds: float = 3) -> None:
    """n mono 16-bit wav files: two random tones plus noise."""
    import soundfile as sf

    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    t = np.arange(int(rate * seconds)) / rate
    for i in range(n):
        f1, f2 = rng.uniform(110, 2000, 2)
        wave = 0.4 * np.sin(2 * np.pi * f1 * t) + 0.2 * np.sin(2 * np.pi * f2 * t)
        wave += 0.05 * rng.standard_normal(len(t))
        sf.write(folder / f"{i:05d}.wav", wave.astype(np.float32), rate, subtype="PCM_16")


def make_points(folder: Path, n: int, seed: int = 0, points: int = 2048) -> None:
    """n .npy (points, 6) float32 clouds: xyz on a random ellipsoid shell, rgb in [0, 1]."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        xyz = rng.standard_normal((points, 3))
        xyz = xyz / np.linalg.norm(xyz, axis=1, keepdims=True) * rng.uniform(0.3, 1.5, 3)
        rgb = np.clip(0.5 + 0.5 * xyz / np.abs(xyz).max() + 0.1 * rng.random((points, 3)), 0, 1)
        np.save(folder / f"{i:05d}.npy", np.concatenate([xyz, rgb], 1).astype(np.float32))


def make_captions(path: Path, n: int, seed: int = 0) -> None:
    """A .jsonl caption list of n rows with `text` and `provenance`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    things = ("a dog", "a red car", "the ocean", "a violin", "an old chair", "a rocket")
    scenes = ("on a beach", "at night", "in the rain", "next to a window", "far away")
    rows = [dict(text=f"{rng.choice(things)} {rng.choice(scenes)}, photo {i}", provenance="image")
            for i in range(n)]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


MAKERS = {"image": (make_images, "images"), "audio": (make_audio, "audio"),
          "point": (make_points, "points"), "text": (make_captions, "captions.jsonl")}  # fmt: skip


def make_inputs(folder: Path, modality: str, n: int) -> Path:
    """Write n raw items of `modality` under `folder` once; the source a data config names."""
    make, name = MAKERS[modality]
    path = folder / name
    if not path.exists():
        make(path, n)
    return path


def config(
    out: Path,
    bench: Bench,
    source: Path,
    batch_size: int,
    workers: int,
    extra: Sequence[str] = (),
    trainer: str = "cpu",
):
    """The extract stage's config for one row: dataset `bench` holding `source` only."""
    m = bench.modality
    overrides = [
        "stage=extract", f"space={bench.space}", "data=demo_raw", f"trainer={trainer}",
        "logger=none", f"paths.output_dir={out}", "data.generate=null",
        "extract.datasets=[bench]", f"+data.datasets.bench={{{m}: {{source: '{source}'}}}}",
        f"extract.modalities=[{m}]", f"extract.batch_size={batch_size}",
        f"extract.num_workers={workers}", "extract.overwrite=true",
        "trainer.enable_progress_bar=false", "data.benchmarks=[]", *bench.overrides, *extra,
    ]  # fmt: skip
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def time_ours(cfg) -> float:
    start = time.perf_counter()
    run(cfg)
    return time.perf_counter() - start


def modality_of(cfg) -> str:
    """The one modality a row's config extracts."""
    return plan(cfg)[0].modality


def bare_loader(cfg) -> DataLoader:
    """The DataLoader the stage builds for this job, made by hand."""
    enc_cfg, dims = OmegaConf.to_container(cfg.space.encoder, resolve=True), dict(cfg.space.dims)
    job = plan(cfg)[0]
    chunks = [job.chunk(c) for c in range(job.n_chunks)]
    bs = cfg.extract.batch_size
    sampler = ChunkBatchSampler(chunks, bs, ChunkBatchSampler.count(chunks, bs), 0)
    processor = build_processor(enc_cfg, dims)
    settings = LoadSettings(**to_plain(cfg.data.get("load", {})), seed=int(cfg.data.seed))
    return DataLoader(RawDataset(job, processor, settings, cfg.extract.on_error),
                      batch_sampler=sampler, collate_fn=Collate(processor, job.modality, False),
                      num_workers=cfg.extract.num_workers,
                      pin_memory=torch.cuda.is_available())  # fmt: skip


def build(cfg, device: str = "cpu") -> Encoder:
    """The row's encoder, built on `device` as the stage builds it (Lightning runs
    configure_model under the root device)."""
    enc_cfg, dims = OmegaConf.to_container(cfg.space.encoder, resolve=True), dict(cfg.space.dims)
    with torch.device(device):
        return build_encoder(enc_cfg, dims)


def time_bare(cfg) -> float:
    start = time.perf_counter()
    modality, encoder = modality_of(cfg), build(cfg)
    with torch.inference_mode():
        for batch in bare_loader(cfg):
            encoder({modality: batch["inputs"]})
    return time.perf_counter() - start


def time_model(cfg) -> float:
    modality = modality_of(cfg)
    batches = [b["inputs"] for b in bare_loader(cfg)]
    start = time.perf_counter()
    encoder = build(cfg)
    with torch.inference_mode():
        for x in batches:
            encoder({modality: x})
    return time.perf_counter() - start


def warm_up(cfg) -> None:
    """One build and one batch: imports, first-call allocations, files an encoder writes."""
    modality, encoder = modality_of(cfg), build(cfg)
    with torch.inference_mode():
        encoder({modality: next(iter(bare_loader(cfg)))["inputs"]})


def measure(cfg, repeats: int) -> dict[str, list[float]]:
    """Seconds per run: ours and bare interleaved `repeats` times after a warm-up, then model
    once (it is context, not compared)."""
    times: dict[str, list[float]] = {"ours": [], "bare": []}
    warm_up(cfg)
    for _ in range(repeats):
        times["ours"].append(time_ours(cfg))
        times["bare"].append(time_bare(cfg))
    times["model"] = [time_model(cfg)]
    return times


def benches(args: argparse.Namespace) -> list[Bench]:
    """The rows the arguments ask for."""
    if args.families:
        rows = [Bench(s, m) for s, ms in FAMILIES.items() for m in ms]
        return rows + [TINY_EVA_CLIP]
    if args.space is None:
        return [DEFAULT]
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        space = compose(config_name="config", overrides=[f"space={args.space}", *args.set]).space
    have = list(space.dims)
    wanted = args.modalities.split(",") if args.modalities else [m for m in have if m in RAW]
    missing = sorted(set(wanted) - set(have))
    if missing or not wanted:
        sys.exit(f"extract: space {args.space} embeds {have}; --modalities asks for {wanted}")
    return [Bench(args.space, m, tuple(args.set)) for m in wanted]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="32 items (16 with --families), 2 repeats"
    )
    parser.add_argument("--space", default=None, help="a conf/space config (default: ViT-B-32)")
    parser.add_argument("--modalities", default=None, help="comma-separated (default: raw ones)")
    parser.add_argument("--set", nargs="*", default=[], help="Hydra overrides for --space")
    parser.add_argument("--families", action="store_true", help="every family's tiny space")
    parser.add_argument("--items", "--images", dest="items", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    n = args.items or ((16 if args.families else 32) if args.quick else 192)
    repeats = args.repeats or (2 if args.quick else 3)
    rows = benches(args)
    logging.disable(logging.WARNING)  # open_clip warns that the weights are random, each build
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")  # Lightning on torch 2.14, per run
    table = Table(title=f"extract vs a bare loop: {n} items per row, random weights, batch "
                  f"{args.batch_size}, {args.workers} worker(s), {torch.get_num_threads()} "
                  f"threads, best of {repeats}")  # fmt: skip
    for col in ("space", "modality", "ours items/s", "bare items/s", "ours / bare",
                "encoder only items/s", "seconds ours | bare"):  # fmt: skip
        table.add_column(col, justify="left" if col in ("space", "modality") else "right")
    ratios = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, bench in enumerate(rows):
            source = make_inputs(Path(tmp) / "raw", bench.modality, n)
            cfg = config(Path(tmp) / f"out{i}", bench, source, args.batch_size, args.workers)
            start = time.perf_counter()
            times = measure(cfg, repeats)
            best = {k: min(v) for k, v in times.items()}
            ratios.append(best["bare"] / best["ours"])
            runs = " ".join(f"{t:.2f}" for t in times["ours"]) + " | " + " ".join(
                f"{t:.2f}" for t in times["bare"])  # fmt: skip
            table.add_row(bench.label or bench.space, bench.modality, f"{n / best['ours']:.2f}",
                          f"{n / best['bare']:.2f}", f"{ratios[-1]:.3f}",
                          f"{n / best['model']:.2f}", runs)  # fmt: skip
            print(f"{bench.label or bench.space} {bench.modality}: ours/bare {ratios[-1]:.3f} "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)  # fmt: skip
    Console(width=140).print(table)
    print(f"RESULT extract ratio={min(ratios):.3f}")


if __name__ == "__main__":
    main()
