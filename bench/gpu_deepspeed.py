"""DeepSpeed ZeRO-3 inference of the largest random open_clip model that fits, bf16.

    python bench/gpu_deepspeed.py [--models EVA02-E-14-plus,ViT-bigG-14,ViT-H-14,ViT-L-14]

For each model in order (largest first) until one works: build it with random weights inside
`deepspeed.zero.Init` (each rank materialises only its partition of every parameter), wrap it
in a ZeRO-3 inference engine (bf16), and embed `--batches` batches of random images. Prints the
model, its parameter count, peak GPU memory, images/s, and `RESULT gpu_deepspeed
ratio=<peak GPU memory / bf16 size of the whole model>` (below 1 once ranks > 1 share the
partitions; about 1 on one GPU, where ZeRO-3 has no one to share with).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def ds_config(batch: int) -> dict:
    """ZeRO-3 inference: bf16 partitions, no optimizer."""
    return {
        "train_micro_batch_size_per_gpu": batch,
        "bf16": {"enabled": True},
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
    }


def try_model(name: str, batch: int, batches: int) -> dict:
    """Build `name` partitioned under ZeRO-3 and time `batches` forward passes."""
    import deepspeed
    import open_clip
    import torch

    config = ds_config(batch)
    torch.cuda.reset_peak_memory_stats()
    with deepspeed.zero.Init(config_dict_or_path=config, dtype=torch.bfloat16):
        model = open_clip.create_model(name, pretrained=None).visual
    params = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in model.parameters())
    engine, *_ = deepspeed.initialize(model=model, config=config)
    engine.eval()
    size = model.image_size if hasattr(model, "image_size") else 224
    size = size[0] if isinstance(size, tuple | list) else size
    x = torch.randn(batch, 3, size, size, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        engine(x)  # warm-up: the first gather allocates
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(batches):
            out = engine(x)
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    assert torch.isfinite(out.float()).all(), f"{name}: non-finite embeddings"
    return dict(model=name, params=params, peak=torch.cuda.max_memory_allocated(),
                images_per_s=batch * batches / seconds)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="EVA02-E-14-plus,ViT-bigG-14,ViT-H-14,ViT-L-14")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=5)
    args = parser.parse_args()
    import deepspeed
    import torch

    if not torch.cuda.is_available():
        sys.exit("gpu_deepspeed: needs a CUDA device (DeepSpeed ZeRO-3 runs on CUDA only)")
    for key, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                           MASTER_PORT="29531").items():  # fmt: skip
        os.environ.setdefault(key, value)
    deepspeed.init_distributed()
    for name in args.models.split(","):
        try:
            r = try_model(name, args.batch_size, args.batches)
        except Exception as e:  # noqa: BLE001 - OOM, a missing timm tower: try the next model
            print(f"{name}: failed ({type(e).__name__}: {str(e)[:200]})")
            torch.cuda.empty_cache()
            continue
        whole, world = r["params"] * 2, torch.distributed.get_world_size()  # bf16 bytes
        print(f"{torch.cuda.get_device_name()}: ZeRO-3 inference of random {name}, "
              f"{r['params'] / 1e9:.2f} B params ({whole / 2**30:.1f} GiB in bf16), peak GPU "
              f"memory {r['peak'] / 2**30:.1f} GiB, {r['images_per_s']:.1f} images/s "
              f"(batch {args.batch_size}, world size {world})")  # fmt: skip
        print(f"RESULT gpu_deepspeed ratio={r['peak'] / whole:.3f}")
        return
    sys.exit("gpu_deepspeed: no model in --models could run")


if __name__ == "__main__":
    main()
