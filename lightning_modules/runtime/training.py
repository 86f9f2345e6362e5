"""Trainers, callbacks, loggers, checkpoints and resume: what the training stages share.

Everything here is built from the config (`trainer`, `callbacks`, `logger` groups) with
hydra.utils.instantiate; checkpointing and resume are Lightning's own.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, ProgressBar
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig

from datamodules.artifacts import atomic_write
from lightning_modules.runtime.config import to_plain

log = logging.getLogger(__name__)


def precision(value: str | int | None) -> str | int:
    """`auto` means bf16-mixed on a GPU and 32-true elsewhere."""
    if value in (None, "auto"):
        return "bf16-mixed" if torch.cuda.is_available() else "32-true"
    return value


WANDB_ID_FILE = "wandb_id"  # in the run dir: the W&B run that resume=true reconnects


class _NoProductTips(logging.Filter):
    """Drops Lightning's product tips (litlogger, litmodels), printed at every Trainer start."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "\N{ELECTRIC LIGHT BULB} Tip:" not in str(record.msg)


# Lightning logs them through rank_zero_info on this logger, once per Trainer (~9 a pipeline).
logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_NoProductTips())


def make_logger(cfg: DictConfig):
    """The configured Lightning logger (it gets the resolved config), or False for logger=none."""
    if not cfg.get("logger"):
        return False
    if cfg.logger._target_.endswith("WandbLogger"):
        logger = _wandb_logger(cfg)
    else:
        logger = hydra.utils.instantiate(cfg.logger)
        metrics = Path(logger.log_dir or cfg.run_dir) / "metrics.csv"
        if isinstance(logger, CSVLogger) and metrics.exists() and _last_checkpoint(cfg):
            if rank_zero_only.rank == 0:  # CSVLogger deletes metrics.csv: keep the earlier rows
                attempt = len(list(metrics.parent.glob("metrics*.csv")))
                kept = metrics.with_name(f"metrics.{attempt}.csv")
                metrics.rename(kept)
                log.info("resume: the earlier attempt's metrics are kept in %s", kept)
    # Nested under one key: the LightningModule logs its own hparams (space, anchor...) flat.
    logger.log_hyperparams({"config": to_plain(cfg)})
    return logger


def _wandb_logger(cfg: DictConfig) -> WandbLogger:
    """WandbLogger whose run id lives in the run dir; offline when no API key is configured."""
    import wandb

    if wandb.run is not None:  # a previous stage's run (pipeline); a new logger would reuse it
        wandb.finish()
    id_file = Path(cfg.run_dir) / WANDB_ID_FILE
    if _last_checkpoint(cfg) is not None and id_file.exists():
        run_id = id_file.read_text().strip()
        log.info("resume: reconnecting W&B run %s (from %s)", run_id, id_file)
    else:  # a fresh start is a new W&B run; a sweep agent has already chosen its id
        run_id = os.environ.get("WANDB_RUN_ID") or secrets.token_hex(4)
        if rank_zero_only.rank == 0:
            atomic_write(id_file, lambda f: f.write(run_id.encode()))
    kwargs = {}
    mode = cfg.logger.get("mode") or os.environ.get("WANDB_MODE")
    if mode is None and not wandb.login(prompt=False, verify=False):  # no network: reads env/netrc
        kwargs["mode"] = "offline"
        log.warning(
            "W&B: no API key (WANDB_API_KEY or ~/.netrc; run `wandb login`), so run %s logs "
            "offline to %s; upload it later with `wandb sync`",
            run_id,
            Path(cfg.run_dir) / "wandb",
        )
    return hydra.utils.instantiate(cfg.logger, id=run_id, resume="allow", **kwargs)


class WandbSummary(L.Callback):
    """At the end of fit: the best monitored score and a table of the final val metrics."""

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        logger = trainer.logger
        if not isinstance(logger, WandbLogger) or not trainer.is_global_zero:
            return
        rows: dict[str, dict[str, float]] = {}  # val/<direction>/<metric> -> one row a direction
        for key, value in trainer.callback_metrics.items():
            parts = key.split("/")
            if len(parts) == 3 and parts[0] == "val":
                rows.setdefault(parts[1], {})[parts[2]] = float(value)
        if rows:
            columns = sorted({k for r in rows.values() for k in r})
            data = [[d, *(r.get(c) for c in columns)] for d, r in sorted(rows.items())]
            logger.log_table("val/summary", columns=["direction", *columns], data=data)
        ckpt = best_checkpoint(trainer)
        if ckpt is not None and ckpt.best_model_score is not None:
            # What W&B sweeps optimise: the summary keeps only the last value of a metric.
            logger.experiment.summary[f"{ckpt.monitor}_best"] = float(ckpt.best_model_score)


class StepLogCadence(L.Callback):
    """Logs training steps at least once an epoch: trainer.log_every_n_steps is capped at the
    epoch's number of batches (Lightning warns, and logs no step, when it exceeds them)."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        datamodule = trainer.datamodule
        if stage != "fit" or datamodule is None:
            return
        # The datamodule is set up before the callbacks; its loader is cheap to build.
        batches = len(datamodule.train_dataloader())
        limit = trainer.limit_train_batches
        if isinstance(limit, int):
            batches = min(batches, limit)
        elif isinstance(limit, float):
            batches = int(batches * limit)
        trainer.log_every_n_steps = max(1, min(trainer.log_every_n_steps, batches))


class StartCompetes(L.Callback):
    """Validates the model before its first step, so that the untrained start competes.

    Lightning validates only after training steps, so checkpoint selection never sees the start
    (for a router, uniform averaging: the baseline it must beat). This runs the fit's own
    validation loop once in on_train_start, where loggers and early stopping (checked on
    validation end) see it like any other validation, and keeps the start's trainable weights.
    ModelCheckpoint saves nothing before a step, so `fit_best` exports the start when no later
    validation beat it. The score and weights are callback state: a resumed run keeps them.
    """

    def __init__(self, monitor: str = "val/mean_R@1") -> None:
        self.monitor = monitor
        self.score: float | None = None
        self.weights: dict[str, torch.Tensor] = {}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step > 0 or self.score is not None:  # resumed: the start was validated
            return
        frozen = {n for n, p in pl_module.named_parameters() if not p.requires_grad}
        self.weights = {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()
                        if k not in frozen}  # fmt: skip
        trainer.validating = True  # as Lightning's training loop does around its validations
        trainer.fit_loop.epoch_loop.val_loop.run()
        trainer.training = True
        self.score = float(trainer.callback_metrics[self.monitor])
        log.info("the start validates at %s %.4f", self.monitor, self.score)

    def restore(self, pl_module: L.LightningModule) -> L.LightningModule:
        """`pl_module` with the start's weights."""
        pl_module.load_state_dict({**pl_module.state_dict(), **self.weights}, strict=True)
        return pl_module

    def state_dict(self) -> dict:
        return {"score": self.score, "weights": self.weights}

    def load_state_dict(self, state_dict: dict) -> None:
        self.score, self.weights = state_dict["score"], state_dict["weights"]


def make_callbacks(cfg: DictConfig, logger) -> list[L.Callback]:
    """The `callbacks` group, instantiated; a callback set to null is off.

    LearningRateMonitor is left out without a logger, since Lightning refuses it there.
    """
    callbacks = []
    for name, node in (cfg.get("callbacks") or {}).items():
        if node is None:
            continue
        callback = hydra.utils.instantiate(node)
        if isinstance(callback, LearningRateMonitor) and not logger:
            log.info("callbacks.%s needs a logger; logger=none, so it is off", name)
            continue
        if isinstance(callback, ProgressBar) and not cfg.trainer.get("enable_progress_bar", True):
            continue  # trainer.enable_progress_bar=false turns every progress bar off

        callbacks.append(callback)
    return callbacks


def make_trainer(cfg: DictConfig, epochs: int, callbacks: list, logger=None) -> L.Trainer:
    """A Trainer from `cfg.trainer`; the stage's epoch count unless trainer.max_epochs is set."""
    Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
    logger = make_logger(cfg) if logger is None else logger
    if logger:
        callbacks = [*callbacks, StepLogCadence()]
    if isinstance(logger, WandbLogger):
        callbacks = [*callbacks, WandbSummary()]
    trainer = hydra.utils.instantiate(
        cfg.trainer,
        precision=precision(cfg.trainer.precision),
        max_epochs=cfg.trainer.max_epochs or epochs,
        callbacks=callbacks,
        logger=logger,
        default_root_dir=cfg.run_dir,
        use_distributed_sampler=False,  # our samplers shard by rank themselves
    )
    multirun = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    environment = getattr(trainer.strategy, "cluster_environment", None)
    launches = environment is not None and not environment.creates_processes_externally
    if multirun and trainer.world_size > 1 and launches:
        # Lightning starts the other ranks by rerunning sys.argv: with -m, the whole sweep.
        raise ValueError(
            f"trainer.strategy={cfg.trainer.get('strategy')} on {trainer.world_size} processes "
            "cannot run inside a Hydra multirun (-m): Lightning would rerun the whole sweep in "
            "every rank. Start the processes yourself (torchrun or srun, see the README) or use "
            "a W&B sweep."
        )
    return trainer


def best_checkpoint(trainer: L.Trainer) -> ModelCheckpoint | None:
    """The checkpoint callback that keeps the best monitored score (callbacks.model_checkpoint);
    last_checkpoint, which has no monitor, only keeps the latest epoch."""
    return next(
        (c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint) and c.monitor),
        None,
    )


def load_checkpoint(cls: type[L.LightningModule], path: str | Path) -> L.LightningModule:
    """A module from a Lightning checkpoint file, or from DeepSpeed's checkpoint directory."""
    path = Path(path)
    if path.is_dir():  # DeepSpeed: partitioned states; Lightning's converter joins them
        from lightning.pytorch.utilities.deepspeed import (
            convert_zero_checkpoint_to_fp32_state_dict,
        )

        single = path.with_name(path.name + ".fp32")
        convert_zero_checkpoint_to_fp32_state_dict(str(path), str(single))
        path = single
    return cls.load_from_checkpoint(path, map_location="cpu")


def fit_best(
    cfg: DictConfig,
    model: L.LightningModule,
    datamodule: L.LightningDataModule,
    epochs: int,
    start_competes: bool = False,
) -> tuple[L.Trainer, L.LightningModule, float]:
    """Fit with the configured callbacks (resuming when asked); reload the best checkpoint.

    Returns the trainer, the best model (the ModelCheckpoint callback's best, else the last
    weights) and its monitored score (val/mean_R@1). start_competes: the model before its first
    step is validated too, and returned when no checkpoint validated above it (`StartCompetes`).
    """
    resume = resume_checkpoint(cfg, model)  # checked before the logger reconnects a run
    logger = make_logger(cfg)
    callbacks = make_callbacks(cfg, logger)
    start = StartCompetes() if start_competes else None
    trainer = make_trainer(cfg, epochs, [*callbacks, *([start] if start else [])], logger=logger)
    trainer.fit(model, datamodule, ckpt_path=resume)
    ckpt = best_checkpoint(trainer)
    if ckpt is not None and ckpt.best_model_path:
        best, score = load_checkpoint(type(model), ckpt.best_model_path), ckpt.best_model_score
    else:
        best, score = model, trainer.callback_metrics.get("val/mean_R@1")
    score = float(score) if score is not None else 0.0
    if start is not None and start.score is not None and start.score >= score:
        log.info("no epoch validated above the start (%.4f >= %.4f): the start is kept",
                 start.score, score)  # fmt: skip
        return trainer, start.restore(model), start.score
    return trainer, best, score


def _last_checkpoint(cfg: DictConfig) -> Path | None:
    """The run's last.ckpt (a file, or a directory for DeepSpeed) when resume=true."""
    last = Path(cfg.run_dir) / "checkpoints" / "last.ckpt"
    return last if cfg.resume and last.exists() else None


def _clear_checkpoints(cfg: DictConfig) -> None:
    """A fresh run starts over: an earlier attempt's checkpoints must not pass for this run's."""
    stale = Path(cfg.run_dir) / "checkpoints"
    # Only the first process: Lightning-launched DDP ranks start later, during fit.
    if (
        stale.exists()
        and os.environ.get("LOCAL_RANK", "0") == "0"
        and os.environ.get("NODE_RANK", "0") == "0"
    ):
        log.info("starting %s fresh: removing the earlier checkpoints in %s", cfg.run_name, stale)
        shutil.rmtree(stale)


def resume_checkpoint(cfg: DictConfig, model: L.LightningModule | None = None) -> str | None:
    """last.ckpt of this run when resume=true and it exists; says so either way.

    With `model`, the checkpoint's saved hyperparameters must equal the model's (ValueError
    naming the checkpoint and every mismatch otherwise).
    """
    last = _last_checkpoint(cfg)
    if last is None:
        if cfg.resume:
            log.warning(
                "resume=true but %s does not exist: starting %s fresh",
                Path(cfg.run_dir) / "checkpoints" / "last.ckpt",
                cfg.run_name,
            )
        _clear_checkpoints(cfg)
        return None
    if model is not None:
        check_compatible(last, model)
    log.info("resuming %s from %s", cfg.run_name, last)
    return str(last)


def checkpoint_hparams(path: str | Path) -> dict:
    """The hyperparameters saved in a Lightning checkpoint (a file, or DeepSpeed's directory)."""
    path = Path(path)
    if path.is_dir():  # DeepSpeed: <ckpt>/<tag>/*model_states.pt holds Lightning's client state
        tag = (path / "latest").read_text().strip() if (path / "latest").exists() else "checkpoint"
        states = sorted((path / tag).glob("*model_states.pt"))
        if not states:
            raise ValueError(f"{path}: not a DeepSpeed checkpoint (no {tag}/*model_states.pt)")
        path = states[0]
    try:
        # mmap: only the pickled metadata is read, not every tensor.
        ckpt = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except Exception as e:
        raise ValueError(f"{path}: cannot be read as a checkpoint ({e})") from e
    return dict(ckpt.get("hyper_parameters") or {})


def check_compatible(path: str | Path, model: L.LightningModule) -> None:
    """Raise if the checkpoint at `path` was written with other hyperparameters than `model`'s."""

    def plain(value) -> object:  # tuples vs lists and numpy scalars must not count as changes
        return json.loads(json.dumps(value, sort_keys=True, default=str))

    saved, now = plain(checkpoint_hparams(path)), plain(dict(model.hparams))
    diff = [k for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]
    if diff:

        def show(v) -> str:
            s = json.dumps(v, sort_keys=True)
            return s if len(s) <= 80 else s[:77] + "..."

        lines = "\n".join(
            f"  {k}: checkpoint {show(saved.get(k))}, now {show(now.get(k))}" for k in diff
        )
        raise ValueError(
            f"{path} was written by an incompatible config; these hyperparameters differ:\n"
            f"{lines}\nResume with the config that wrote it, or start a new run: resume=false "
            f"(overwrites {Path(path).parent.parent}) or run_name=<a new name>."
        )
