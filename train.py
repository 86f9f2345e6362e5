"""Entry point: `python train.py stage=<stage> [space=...] [variant=...] [key=value ...]`."""

from __future__ import annotations

import hashlib
import os
import re
import sys

# First, before `lightning` imports huggingface_hub: it sets the offline default (see there).
import lightning_modules.runtime.config  # noqa: F401

# isort: split
import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from datamodules.artifacts import CacheError
from lightning_modules.runtime.schema import ConfigError, validate

# A user's mistake, not a bug: a bad config, or a missing, stale or corrupt artifact. The
# command line prints its message alone; debug=true shows the traceback.
USER_ERRORS = (ConfigError, CacheError)
# Overrides that say how a job runs, not what it trains: they do not name a multirun job.
OPERATIONAL = ("resume", "force", "debug", "run_name", "logger", "trainer", "paths", "hydra")


def train(cfg: DictConfig) -> float | None:
    """Seed, then run the configured stage; returns its optimised metric (for sweepers)."""
    validate(cfg, strict=True)  # a missing, undeclared or wrong-typed key fails here, before work
    L.seed_everything(cfg.seed, workers=True)
    failed = True
    try:
        result = hydra.utils.get_method(cfg.stage.run)(cfg)
        failed = False
        return result
    finally:  # a W&B run is finished even when the stage raises (or is interrupted)
        wandb = sys.modules.get("wandb")
        if wandb is not None and wandb.run is not None:
            wandb.finish(exit_code=1 if failed else 0)


def job_run_name(cfg: DictConfig, hydra_cfg: DictConfig) -> str:
    """run_name of this job: each W&B sweep run and Hydra multirun job gets a run dir of its own.

    A sweep run appends its W&B run id; a multirun job appends its own overrides (those in
    OPERATIONAL left out; their hash when long, its job number when none), so rerunning the same
    multirun with resume=true finds each job's run again.
    """
    name = cfg.run_name
    run_id = os.environ.get("WANDB_RUN_ID")
    if os.environ.get("WANDB_SWEEP_ID") and run_id:
        return name if run_id in name else f"{name}-{run_id}"
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return name
    tags = [
        o
        for o in hydra_cfg.overrides.task
        if re.split(r"[.=@]", o.lstrip("+~"), maxsplit=1)[0] not in OPERATIONAL
    ]
    tag = re.sub(r"[^\w.=,+:@{}\[\]-]", "_", ",".join(tags))  # no '/' or quotes in a dir name
    if not tag:
        tag = f"job{hydra_cfg.job.num}"
    elif len(tag) > 100:
        tag = hashlib.sha1(tag.encode()).hexdigest()[:10]
    return f"{name}-{tag}"


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    cfg.run_name = job_run_name(cfg, HydraConfig.get())
    try:
        return train(cfg)
    except USER_ERRORS as e:
        if cfg.get("debug"):
            raise
        print(f"error: {e}\n(debug=true shows the traceback)", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
