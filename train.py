"""Entry point: `python train.py stage=<stage> [space=...] [variant=...] [key=value ...]`."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # laion_clap fetches tokenizers at import otherwise

import hydra  # noqa: E402
import lightning as L  # noqa: E402
from omegaconf import DictConfig  # noqa: E402


def train(cfg: DictConfig) -> float | None:
    """Seed, then run the configured stage; returns its optimised metric (for sweepers)."""
    L.seed_everything(cfg.seed, workers=True)
    return hydra.utils.get_method(cfg.stage.run)(cfg)


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    return train(cfg)


if __name__ == "__main__":
    main()
