"""Extract throughput on a GPU: the extract stage vs a bare loop, random open_clip ViT-L-14, bf16.

    python bench/gpu_extract.py [--model ViT-L-14] [--images 1024] [--batch-size 128]

The same JPEGs as bench/extract.py (scikit-image crops), the same encoder with random weights
(nothing is downloaded):
- ours: the extract stage (`lightning_modules.extract.run`) with trainer.precision=bf16-mixed on
        one GPU, writing float16 shards;
- bare: the encoder on the GPU in a plain loop over the same DataLoader, under
        torch.autocast(bfloat16), writing nothing.
Prints a table, then `RESULT gpu_extract ratio=<ours / bare items/s>` (target >= 0.9).
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
sys.path.insert(0, str(Path(__file__).resolve().parent))

DIMS = {"ViT-L-14": 768, "ViT-H-14": 1024, "ViT-bigG-14": 1280, "ViT-B-32": 512}


def config(out: Path, images: Path, model: str, batch_size: int, workers: int):
    """The extract stage's config for this job (one GPU, bf16-mixed, random weights)."""
    from hydra import compose, initialize_config_dir

    from lightning_modules.config import CONF_DIR

    dim = DIMS[model]
    overrides = [
        "stage=extract", "space=tiny_clip", "data=demo_raw", "logger=none",
        "trainer.accelerator=gpu", "trainer.devices=1", "trainer.precision=bf16-mixed",
        f"paths.output_dir={out}", "data.generate=null", f"space.encoder.model={model}",
        "space.encoder.model_cfg=null", f"space.dims={{image: {dim}, text: {dim}}}",
        "extract.datasets=[bench]", f"+data.datasets.bench={{image: {{source: '{images}'}}}}",
        f"extract.batch_size={batch_size}", f"extract.num_workers={workers}",
        "extract.overwrite=true", "trainer.enable_progress_bar=false", "data.benchmarks=[]",
    ]  # fmt: skip
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def time_bare(cfg) -> float:
    """Seconds for the encoder on the GPU over the stage's own DataLoader, bf16 autocast."""
    import torch
    from extract import bare_loader
    from omegaconf import OmegaConf

    from encoders import build_encoder

    start = time.perf_counter()
    enc_cfg, dims = OmegaConf.to_container(cfg.space.encoder, resolve=True), dict(cfg.space.dims)
    encoder = build_encoder(enc_cfg, dims).cuda().eval()
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        for batch in bare_loader(cfg):
            out = encoder({"image": batch["inputs"].cuda(non_blocking=True)})
    torch.cuda.synchronize()
    del out
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-L-14", choices=sorted(DIMS))
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    import torch
    from extract import make_images, time_ours
    from rich.console import Console
    from rich.table import Table

    if not torch.cuda.is_available():
        sys.exit("gpu_extract: needs a CUDA device (torch.cuda.is_available() is False)")
    logging.disable(logging.WARNING)
    times: dict[str, list[float]] = {"ours": [], "bare": []}
    with tempfile.TemporaryDirectory() as tmp:
        make_images(Path(tmp) / "images", args.images)
        cfg = config(Path(tmp) / "out", Path(tmp) / "images", args.model, args.batch_size,
                     args.workers)  # fmt: skip
        time_bare(cfg)  # warm-up: CUDA context, cudnn autotune, page cache
        for _ in range(args.repeats):
            times["ours"].append(time_ours(cfg))
            times["bare"].append(time_bare(cfg))
    best = {k: min(v) for k, v in times.items()}
    table = Table(title=f"extract on {torch.cuda.get_device_name()}: {args.images} images, "
                  f"random {args.model}, bf16, batch {args.batch_size}")  # fmt: skip
    for col in ("path", "seconds (all runs)", "items/s (best)"):
        table.add_column(col)
    for k in times:
        table.add_row(k, " ".join(f"{t:.1f}" for t in times[k]), f"{args.images / best[k]:.1f}")
    Console(width=120).print(table)
    print(f"RESULT gpu_extract ratio={best['bare'] / best['ours']:.3f}")


if __name__ == "__main__":
    main()
