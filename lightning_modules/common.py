"""What every stage shares: space configs, data, tuple tables, the Trainer."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf

from datamodules.world import ensure_world

log = logging.getLogger(__name__)
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def space_configs(names: Iterable[str]) -> dict[str, DictConfig]:
    """The `conf/space/<name>.yaml` of each name, composed by Hydra."""
    available = sorted(p.stem for p in (CONF_DIR / "space").glob("*.yaml"))
    out = {}
    for name in names:
        if name not in available:
            raise ValueError(f"unknown space {name!r}; conf/space has {available}")
        if GlobalHydra.instance().is_initialized():
            out[name] = hydra.compose(config_name=f"space/{name}").space
        else:
            with hydra.initialize_config_dir(str(CONF_DIR), version_base="1.3"):
                out[name] = hydra.compose(config_name=f"space/{name}").space
    return out


def ensure_data(cfg: DictConfig, names: Iterable[str]) -> Path:
    """The cache root for these spaces; the synthetic world writes missing caches first."""
    spaces = space_configs(dict.fromkeys(names))
    if cfg.data.kind == "synthetic":
        return ensure_world(cfg.data, spaces)
    root = Path(cfg.data.root)
    if not root.is_dir():
        raise FileNotFoundError(f"data.root {root} does not exist; run stage=extract first")
    return root


def tuples_path(cfg: DictConfig, which: str, root: Path) -> Path:
    """The tuple table that bind or route trains on: oracle, pseudo, or an explicit path."""
    if which == "oracle":
        if cfg.data.kind != "synthetic":
            raise ValueError(
                "pairs=oracle needs the synthetic world (data=world); real data has no oracle"
            )
        return root / "tuples" / "oracle.npz"
    if which == "pseudo":
        return Path(cfg.pair.output)
    return Path(which)


def precision(value: str | int | None) -> str | int:
    """`auto` means bf16-mixed on a GPU and 32-true elsewhere."""
    if value in (None, "auto"):
        return "bf16-mixed" if torch.cuda.is_available() else "32-true"
    return value


def make_logger(cfg: DictConfig):
    """The configured Lightning logger, or False for logger=none."""
    if not cfg.get("logger"):
        return False
    return hydra.utils.instantiate(cfg.logger)


def make_trainer(cfg: DictConfig, epochs: int, callbacks: list, logger=None) -> L.Trainer:
    """A Trainer from `cfg.trainer`; the stage's epoch count unless trainer.max_epochs is set."""
    Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
    return hydra.utils.instantiate(
        cfg.trainer,
        precision=precision(cfg.trainer.precision),
        max_epochs=cfg.trainer.max_epochs or epochs,
        callbacks=callbacks,
        logger=make_logger(cfg) if logger is None else logger,
        default_root_dir=cfg.run_dir,
        use_distributed_sampler=False,  # our samplers shard by rank themselves
    )


def resume_checkpoint(cfg: DictConfig) -> str | None:
    """last.ckpt of this run when resume=true and it exists; says so either way."""
    if not cfg.resume:
        return None
    last = Path(cfg.run_dir) / "checkpoints" / "last.ckpt"
    if last.exists():
        log.info("resuming %s from %s", cfg.run_name, last)
        return str(last)
    log.warning("resume=true but %s does not exist: starting %s fresh", last, cfg.run_name)
    return None


def to_plain(cfg) -> dict:
    """A resolved plain dict of a config node (for hyperparameters and metadata)."""
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
