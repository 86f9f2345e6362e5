"""Extract throughput on a GPU: the extract stage vs a bare loop, random weights, bf16.

    python bench/gpu_extract.py [--model ViT-L-14] [--items 1024] [--batch-size 128]
    python bench/gpu_extract.py --families [--items 512]     # every family at full size
    python bench/gpu_extract.py --zero3 [--items 256]        # EVA-CLIP-18B under ZeRO-3

The raw files of bench/extract.py (JPEGs, wav files, .npy clouds), the encoders with random
weights at their real sizes (nothing is downloaded; no checkpoint is read), one row per
(space, modality):
- default: open_clip `--model` (ViT-L-14) on images, as this script has always timed;
- --families: wavcaps (audio), imagebind (audio, image), uni3d (point), eva02_e (image) and
  clap (audio), each space's dims cut to the timed modality so only that tower is built.
  WavCaps and CLAP need a text config folder to build at all: they get the tiny BERT / RoBERTa
  of their smoke spaces, which changes nothing on the audio side that is timed;
- --zero3: eva_clip_18b at size 18B (18.3B parameters).
Per row:
- ours: the extract stage (`lightning_modules.stages.extract.run`) on one GPU, writing float16
        shards:
        trainer.precision=bf16-mixed, or with --zero3 trainer=deepspeed_infer (DeepSpeed
        ZeRO-3, bf16-true; on one GPU the partitions are whole, so this measures ZeRO-3's
        gather hooks, not memory sharing);
- bare: the same encoder built on the GPU (as Lightning builds it, under the root device; with
        --zero3 directly in bfloat16), in a plain loop over the same DataLoader, writing nothing,
        under torch.autocast(bfloat16) (not with --zero3, whose weights are bfloat16).
Both include the encoder's build. Prints a table with each side's peak GPU memory, then
`RESULT gpu_extract ratio=<min over the rows of ours / bare items/s>` (target >= 0.9);
--families prints `RESULT gpu_extract_families`, --zero3 `RESULT gpu_extract_zero3`.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

DIMS = {"ViT-L-14": 768, "ViT-H-14": 1024, "ViT-bigG-14": 1280, "ViT-B-32": 512}
GPU = ["trainer.accelerator=gpu", "trainer.devices=1", "trainer.precision=bf16-mixed"]
ZERO3 = ["trainer.devices=1"]  # trainer=deepspeed_infer: bf16-true, DeepSpeed stage 3


def families(models: Path) -> list:
    """The full-size rows of --families; `models` holds the tiny text configs they borrow."""
    from extract import Bench

    text = {"wavcaps": (f"space.encoder.text_model_dir={models}/tiny-bert",),
            "clap": (f"space.encoder.text_model_dir={models}/tiny-roberta",
                     "++space.encoder.tiny_text=true")}  # fmt: skip
    rows = [("wavcaps", "audio", 1024, "space.encoder.checkpoint=null"),
            ("imagebind", "audio", 1024, "space.encoder.checkpoint=null"),
            ("imagebind", "image", 1024, "space.encoder.checkpoint=null"),
            ("uni3d", "point", 1024, "space.encoder.parts.0.encoder.checkpoint=null"),
            ("eva02_e", "image", 1024, "space.encoder.pretrained=null"),
            ("clap", "audio", 512, "space.encoder.checkpoint=null")]  # fmt: skip
    # `~` then `+`: an override of a dict merges into it; the timed tower alone must remain.
    return [Bench(space, m, (weights, "~space.dims", f"+space.dims={{{m}: {dim}}}",
                             *text.get(space, ()))) for space, m, dim, weights in rows]  # fmt: skip


def to_cuda(x):
    """Tensors (or dicts of them) onto the GPU, as Lightning moves batches."""
    if isinstance(x, dict):
        return {k: to_cuda(v) for k, v in x.items()}
    return x.cuda(non_blocking=True) if hasattr(x, "cuda") else x


def build_gpu(cfg, dtype=None):
    """The row's encoder built on the GPU (default dtype `dtype` while it is built)."""
    import torch
    from extract import build

    previous = torch.get_default_dtype()
    if dtype is not None:
        torch.set_default_dtype(dtype)
    try:
        return build(cfg, "cuda").cuda()
    finally:
        torch.set_default_dtype(previous)


def time_bare(cfg, dtype=None, batches: int | None = None) -> tuple[float, int]:
    """Seconds and peak GPU bytes: the encoder over the stage's own DataLoader (`batches` of
    it), under bf16 autocast unless it was built in `dtype`."""
    import contextlib

    import torch
    from extract import bare_loader, modality_of

    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    modality, encoder = modality_of(cfg), build_gpu(cfg, dtype)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if dtype is None else None
    out = None
    with torch.inference_mode(), autocast or contextlib.nullcontext():
        for i, batch in enumerate(bare_loader(cfg)):
            if batches is not None and i >= batches:
                break
            out = encoder({modality: to_cuda(batch["inputs"])})
    torch.cuda.synchronize()
    del out, encoder
    return time.perf_counter() - start, torch.cuda.max_memory_allocated()


def time_ours(cfg) -> tuple[float, int]:
    """Seconds and peak GPU bytes of the extract stage."""
    import torch
    from extract import time_ours as seconds

    torch.cuda.reset_peak_memory_stats()
    s = seconds(cfg)
    torch.cuda.synchronize()
    return s, torch.cuda.max_memory_allocated()


def measure(cfg, dtype, repeats: int) -> dict[str, list[tuple[float, int]]]:
    """(seconds, peak bytes) per run: bare and ours interleaved after a one-batch warm-up."""
    import torch

    time_bare(cfg, dtype, batches=1)  # warm-up: CUDA context, kernels, page cache
    times: dict[str, list[tuple[float, int]]] = {"ours": [], "bare": []}
    for _ in range(repeats):
        times["bare"].append(time_bare(cfg, dtype))
        gc.collect()
        torch.cuda.empty_cache()
        times["ours"].append(time_ours(cfg))
        gc.collect()
        torch.cuda.empty_cache()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-L-14", choices=sorted(DIMS))
    parser.add_argument("--families", action="store_true", help="every family at full size")
    parser.add_argument("--zero3", action="store_true", help="EVA-CLIP-18B under ZeRO-3")
    parser.add_argument("--items", "--images", dest="items", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args()
    import torch
    from extract import DEFAULT, Bench, config, make_inputs
    from rich.console import Console
    from rich.table import Table

    from encoders.wavcaps import ensure_tiny_text_model

    if not torch.cuda.is_available():
        sys.exit("gpu_extract: needs a CUDA device (torch.cuda.is_available() is False)")
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    name = "gpu_extract_zero3" if args.zero3 else "gpu_extract"
    name = "gpu_extract_families" if args.families else name
    n = args.items or (256 if args.zero3 else 512 if args.families else 1024)
    bs = args.batch_size or (32 if args.zero3 else 64 if args.families else 128)
    repeats = args.repeats or (1 if args.zero3 else 2)
    trainer, extra, dtype = ("deepspeed_infer", ZERO3, torch.bfloat16) if args.zero3 else (
        "default", GPU, None)  # fmt: skip
    table = Table(title=f"extract on {torch.cuda.get_device_name()}: {n} items per row, random "
                  f"weights, batch {bs}, {args.workers} workers, best of {repeats}")  # fmt: skip
    for col in ("space", "modality", "ours items/s", "bare items/s", "ours / bare",
                "peak GiB ours | bare", "seconds ours | bare"):  # fmt: skip
        table.add_column(col)
    ratios = []
    with tempfile.TemporaryDirectory() as tmp:
        models = Path(tmp) / "models"
        ensure_tiny_text_model(models / "tiny-bert")
        if args.families:
            rows = families(models)
        elif args.zero3:
            rows = [Bench("eva_clip_18b", "image", ("space.encoder.checkpoint=null",
                          "space.dims={image: 1536}"), "eva_clip_18b (18B, ZeRO-3)")]  # fmt: skip
        else:
            d = DIMS[args.model]
            rows = [Bench(DEFAULT.space, "image", (f"space.encoder.model={args.model}",
                          "space.encoder.model_cfg=null", f"space.dims={{image: {d}, text: {d}}}"),
                          f"open_clip {args.model}")]  # fmt: skip
        for i, bench in enumerate(rows):
            source = make_inputs(Path(tmp) / "raw", bench.modality, n)
            cfg = config(Path(tmp) / f"out{i}", bench, source, bs, args.workers, extra, trainer)
            try:
                times = measure(cfg, dtype, repeats)
            except Exception as e:  # noqa: BLE001 - one family failing must not hide the rest
                print(f"{bench.label or bench.space} {bench.modality}: failed "
                      f"({type(e).__name__}: {str(e)[:300]})", flush=True)  # fmt: skip
                ratios.append(0.0)
                continue
            best = {k: min(s for s, _ in v) for k, v in times.items()}
            peak = {k: max(p for _, p in v) / 2**30 for k, v in times.items()}
            ratios.append(best["bare"] / best["ours"])
            runs = " | ".join(" ".join(f"{s:.1f}" for s, _ in times[k]) for k in ("ours", "bare"))
            table.add_row(bench.label or bench.space, bench.modality, f"{n / best['ours']:.1f}",
                          f"{n / best['bare']:.1f}", f"{ratios[-1]:.3f}",
                          f"{peak['ours']:.1f} | {peak['bare']:.1f}", runs)  # fmt: skip
            print(f"{bench.label or bench.space} {bench.modality}: ours/bare {ratios[-1]:.3f}",
                  flush=True)  # fmt: skip
    Console(width=140).print(table)
    print(f"RESULT {name} ratio={min(ratios):.3f}")


if __name__ == "__main__":
    main()
