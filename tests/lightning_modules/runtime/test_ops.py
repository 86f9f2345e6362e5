"""Operations: resume by run name (W&B run included), DDP, W&B logging, sweeps and multirun.

Everything runs on CPU with WANDB_MODE=offline (conftest) and never reaches the network.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import wandb
import yaml
from conftest import CONF_DIR, REPO, SMALL_WORLD, compose_config
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.loggers import WandbLogger
from omegaconf import DictConfig, open_dict
from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

from lightning_modules.runtime import training
from lightning_modules.runtime.training import (
    WANDB_ID_FILE,
    check_compatible,
    make_logger,
    make_trainer,
    resume_checkpoint,
)
from lightning_modules.stages.bind import BindModule
from train import job_run_name, train

# 2,000 oracle tuples in batches of 256: 7 steps an epoch, about a second on one core.
BIND = (
    "stage=bind",
    "space=clap",
    "bind.pairs=oracle",
    "bind.hidden_dim=64",
    "bind.batch_size=256",
)
SWEEPS = sorted((CONF_DIR / "sweep").glob("*.yaml"))
# The route sweep on the session's world: its three source spaces stand in for variant=base.
WORLD_VARIANT = ("variant=small",)


def _ckpt(run_dir: str | Path, name: str = "last.ckpt") -> dict:
    return torch.load(Path(run_dir) / "checkpoints" / name, map_location="cpu", weights_only=False)


def _offline_runs(run_dir: str | Path) -> list[Path]:
    return sorted((Path(run_dir) / "wandb").glob("offline-run-*"))


@pytest.fixture(scope="module")
def wandb_run(small_world: Path, world_cfg: DictConfig, tmp_path_factory) -> dict:
    """A 2-epoch bind run logged to W&B (offline), with what reached the logger recorded."""
    out = tmp_path_factory.mktemp("wandb_run")
    cfg = compose_config(
        [*SMALL_WORLD, f"paths.output_dir={out}", f"paths.data_dir={world_cfg.paths.data_dir}",
         *BIND, "bind.epochs=2", "logger=wandb"]
    )  # fmt: skip
    calls: dict[str, list] = {"hparams": [], "metrics": [], "tables": [], "summary": {}}
    real = {n: getattr(WandbLogger, n) for n in ("log_hyperparams", "log_metrics", "log_table")}
    real_finish = wandb.finish

    def spy(name: str, key: str):
        def method(self, *args, **kwargs):
            calls[key].append((args, kwargs))
            return real[name](self, *args, **kwargs)

        return method

    def finish(*args, **kwargs):  # the summary as it stands when train() finishes the run
        calls["summary"] = {k: wandb.run.summary.get(k) for k in wandb.run.summary.keys()}
        calls["finish"] = kwargs
        return real_finish(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(WandbLogger, "log_hyperparams", spy("log_hyperparams", "hparams"))
        mp.setattr(WandbLogger, "log_metrics", spy("log_metrics", "metrics"))
        mp.setattr(WandbLogger, "log_table", spy("log_table", "tables"))
        mp.setattr(wandb, "finish", finish)
        result = train(cfg)
    assert wandb.run is None
    best = _ckpt(cfg.run_dir, "best.ckpt")
    monitor = next(v for k, v in best["callbacks"].items() if k.startswith("ModelCheckpoint"))
    return {"cfg": cfg, "result": result, "best": float(monitor["best_model_score"]), **calls}


# ---------------------------------------------------------------------------- W&B


def test_wandb_logs_config_metrics_every_epoch_and_a_summary(wandb_run: dict) -> None:
    cfg = wandb_run["cfg"]
    # The resolved config, nested under one key beside the module's own hyperparameters.
    params = [(a or [kw.get("params")])[0] for a, kw in wandb_run["hparams"]]
    config = next(p["config"] for p in params if "config" in p)
    assert config["run_dir"] == cfg.run_dir and config["bind"]["hidden_dim"] == 64
    assert "${" not in json.dumps(config)

    # Every direction's R@1 and R@5, once per epoch.
    directions = {"audio_to_image", "image_to_audio", "audio_to_text", "text_to_audio",
                  "image_to_text", "text_to_image"}  # fmt: skip
    logged = [(a or [kw.get("metrics")])[0] for a, kw in wandb_run["metrics"]]
    for d in directions:
        for k in ("R@1", "R@5"):
            epochs = [m["epoch"] for m in logged if f"val/{d}/{k}" in m]
            assert epochs == [0, 1], (d, k, epochs)

    # The summary table: one row per direction, the final epoch's values.
    ((args, kwargs),) = wandb_run["tables"]
    assert args[0] == "val/summary" and kwargs["columns"] == ["direction", "R@1", "R@5"]
    rows = {r[0]: r[1:] for r in kwargs["data"]}
    assert set(rows) == directions
    last = {}
    for m in logged:
        last.update(m)
    for d, (r1, r5) in rows.items():
        assert (r1, r5) == (last[f"val/{d}/R@1"], last[f"val/{d}/R@5"])
    # What a sweep optimises is the best score, which is also what train() returns.
    assert isinstance(wandb_run["result"], float) and 0 < wandb_run["result"] <= 1
    assert wandb_run["result"] == pytest.approx(wandb_run["best"])
    assert wandb_run["summary"]["val/mean_R@1_best"] == pytest.approx(wandb_run["result"])
    assert wandb_run["finish"] == {"exit_code": 0}
    assert (Path(cfg.run_dir) / WANDB_ID_FILE).read_text() in _offline_runs(cfg.run_dir)[0].name


def test_wandb_run_is_finished_when_the_stage_fails(small_world, compose_cfg, monkeypatch) -> None:
    finished = []
    real_finish = wandb.finish

    def boom(self) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(wandb, "finish", lambda **kw: finished.append(kw) or real_finish(**kw))
    monkeypatch.setattr(BindModule, "on_validation_epoch_end", boom)
    with pytest.raises(RuntimeError, match="boom"):
        train(compose_cfg(*BIND, "bind.epochs=1", "logger=wandb"))
    assert finished == [{"exit_code": 1}] and wandb.run is None


def test_wandb_goes_offline_without_an_api_key(compose_cfg, monkeypatch, tmp_path, caplog) -> None:
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_CONFIG_DIR", "NETRC"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc, no ~/.config/wandb/settings
    # The run is not started here: were detection wrong, it would go online.
    monkeypatch.setattr(WandbLogger, "log_hyperparams", lambda self, params: None)
    cfg = compose_cfg(*BIND, "logger=wandb")
    with caplog.at_level(logging.WARNING, "lightning_modules.runtime.training"):
        logger = make_logger(cfg)
    assert logger._wandb_init["mode"] == "offline"
    assert logger._wandb_init["project"] == "omnibind"
    assert "no API key" in caplog.text and "offline" in caplog.text

    monkeypatch.setattr(wandb, "login", lambda **kwargs: True)  # a configured key: stay online
    caplog.clear()
    assert make_logger(cfg)._wandb_init.get("mode") is None
    assert "no API key" not in caplog.text


# ---------------------------------------------------------------------------- resume


def test_resume_without_a_checkpoint_starts_fresh(compose_cfg, caplog) -> None:
    cfg = compose_cfg(*BIND, "resume=true")
    with caplog.at_level(logging.WARNING, "lightning_modules.runtime.training"):
        assert resume_checkpoint(cfg) is None
    assert "does not exist: starting bind-clap fresh" in caplog.text
    assert resume_checkpoint(compose_cfg(*BIND)) is None  # resume=false never resumes


def test_incompatible_checkpoint_is_refused(wandb_run: dict, compose_cfg) -> None:
    cfg = wandb_run["cfg"]
    last = Path(cfg.run_dir) / "checkpoints" / "last.ckpt"
    wandb_id = (Path(cfg.run_dir) / WANDB_ID_FILE).read_text()
    runs = _offline_runs(cfg.run_dir)
    hp = dict(_ckpt(cfg.run_dir)["hyper_parameters"])
    check_compatible(last, BindModule(**hp))  # the same hyperparameters pass

    changed = compose_config(
        [*SMALL_WORLD, f"paths.output_dir={cfg.paths.output_dir}",
         f"paths.data_dir={cfg.paths.data_dir}", *BIND, "bind.epochs=2", "logger=wandb",
         "resume=true", "bind.hidden_dim=32", "loss.temperature=0.05"]
    )  # fmt: skip
    with pytest.raises(ValueError, match="incompatible config") as e:
        train(changed)
    message = str(e.value)
    assert str(last) in message
    assert "hidden_dim: checkpoint 64, now 32" in message
    assert "temperature: checkpoint 0.03, now 0.05" in message
    assert "lr:" not in message  # only the mismatches are named
    # Refused before the logger started: the W&B run was not reconnected (nor marked failed).
    assert (Path(cfg.run_dir) / WANDB_ID_FILE).read_text() == wandb_id
    assert _offline_runs(cfg.run_dir) == runs


def test_resume_continues_the_run_and_its_wandb_run(wandb_run: dict, caplog) -> None:
    cfg = wandb_run["cfg"].copy()
    before = _ckpt(cfg.run_dir)
    wandb_id = (Path(cfg.run_dir) / WANDB_ID_FILE).read_text()
    with open_dict(cfg):
        cfg.resume, cfg.trainer.max_epochs = True, 3
    with caplog.at_level(logging.INFO, "lightning_modules.runtime.training"):
        train(cfg)
    after = _ckpt(cfg.run_dir)
    assert (before["epoch"], after["epoch"]) == (1, 2)
    assert after["global_step"] == before["global_step"] * 3 // 2  # one more epoch, not three
    assert f"resuming bind-clap from {cfg.run_dir}/checkpoints/last.ckpt" in caplog.text
    # The same W&B run, reconnected: its id is kept and a second offline segment carries it.
    assert (Path(cfg.run_dir) / WANDB_ID_FILE).read_text() == wandb_id
    assert f"reconnecting W&B run {wandb_id}" in caplog.text
    runs = _offline_runs(cfg.run_dir)
    assert len(runs) == 2 and all(r.name.endswith(wandb_id) for r in runs)


class _Crash(L.Callback):
    """Raises in epoch 1 after batch 3 of 7: last.ckpt then holds the end of epoch 0."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.current_epoch == 1 and batch_idx == 2:
            raise RuntimeError("crash")


def _whole_and_resumed(compose_cfg, *args: str) -> tuple[dict, dict]:
    """The last checkpoints of a run, and of the same run crashed (_Crash) and then resumed."""
    whole = compose_cfg(*args, "run_name=whole")
    train(whole)
    make = training.make_trainer
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(
            training, "make_trainer", lambda c, e, cbs, logger=None: make(c, e, [*cbs, _Crash()])
        )
        with pytest.raises(RuntimeError, match="crash"):
            train(compose_cfg(*args, "run_name=crashed"))
    crashed = compose_cfg(*args, "run_name=crashed", "resume=true")
    assert _ckpt(crashed.run_dir)["epoch"] == 0
    train(crashed)
    return _ckpt(whole.run_dir), _ckpt(crashed.run_dir)


def test_a_crashed_run_resumes_to_the_uninterrupted_result(small_world, compose_cfg, tmp_path):
    a, b = _whole_and_resumed(compose_cfg, *BIND, "bind.epochs=3")
    assert a["global_step"] == b["global_step"] == 21
    # Bit for bit: epoch 1 replays the same batches (the sampler's seed is seed + epoch).
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key


def test_a_crashed_route_resumes_from_router_only_checkpoints(small_world, compose_cfg):
    """Route checkpoints hold no projectors (the bound spaces supply them): resuming one still
    gives the uninterrupted run's routers, bit for bit."""
    train(compose_cfg(*BIND))
    a, b = _whole_and_resumed(
        compose_cfg, "stage=route", "variant=small", "~variant.spaces.imagebind",
        "~variant.spaces.uni3d", "route.pairs=oracle", "route.epochs=3", "route.batch_size=64",
    )  # fmt: skip
    assert a["global_step"] == b["global_step"] > 6
    assert a["state_dict"].keys() == b["state_dict"].keys()
    assert not any(k.startswith("model.projectors.") for k in a["state_dict"])
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key


def test_last_ckpt_is_the_last_epoch_even_when_it_is_not_the_best(small_world, compose_cfg):
    # Monitored on the epoch with mode=min, epoch 0 stays the best: epoch 1 writes no best.ckpt.
    cfg = compose_cfg(*BIND, "bind.epochs=2", "callbacks.model_checkpoint.monitor=epoch",
                      "callbacks.model_checkpoint.mode=min")  # fmt: skip
    train(cfg)
    best, last = _ckpt(cfg.run_dir, "best.ckpt"), _ckpt(cfg.run_dir)
    assert (best["epoch"], best["global_step"]) == (0, 7)
    # Saved at epoch 1's validation, not after the fit loop counted it done (epoch 2).
    assert (last["epoch"], last["global_step"]) == (1, 14)


def test_resume_keeps_the_csv_history(small_world, compose_cfg) -> None:
    cfg = compose_cfg(*BIND, "bind.epochs=1", "logger=csv")
    train(cfg)
    train(compose_cfg(*BIND, "bind.epochs=2", "logger=csv", "resume=true"))
    csv_dir = Path(cfg.run_dir) / "csv"
    first, second = (csv_dir / "metrics.1.csv").read_text(), (csv_dir / "metrics.csv").read_text()
    assert "\n0," in first and "\n1," in second and "\n1," not in first


# ---------------------------------------------------------------------------- run names


def _hydra_cfg(*overrides: str, mode: RunMode = RunMode.MULTIRUN, num: int = 3) -> DictConfig:
    """A composed config with its `hydra` node, as a multirun job (or a single run) sees it."""
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=list(overrides), return_hydra_config=True)
    cfg.hydra.mode, cfg.hydra.job.num = mode, num
    return cfg


def test_each_multirun_job_and_sweep_run_gets_its_own_run(monkeypatch) -> None:
    monkeypatch.delenv("WANDB_SWEEP_ID", raising=False)
    args = ("stage=bind", "space=clap", "loss.temperature=0.05", "paths.output_dir=/tmp/x/y",
            "resume=true", "trainer.devices=2", "space@anchor=siglip")  # fmt: skip
    cfg = _hydra_cfg(*args)
    name = job_run_name(cfg, cfg.hydra)
    # Only what the job trains names it; a path never adds a directory level.
    assert name == "bind-clap-stage=bind,space=clap,loss.temperature=0.05,space@anchor=siglip"
    assert job_run_name(cfg, _hydra_cfg(*args[:2], "loss.lambda_dec=2").hydra) != name
    # A single run keeps its name: rerunning the command finds the run again.
    assert job_run_name(cfg, _hydra_cfg(*args, mode=RunMode.RUN).hydra) == "bind-clap"
    # A job with nothing to name it by gets its number; a long list of overrides, their hash.
    assert job_run_name(cfg, _hydra_cfg("resume=true", num=4).hydra) == "bind-clap-job4"
    long = job_run_name(cfg, _hydra_cfg(*args, *SMALL_WORLD).hydra)
    assert len(long) == len("bind-clap-") + 10
    # A W&B sweep run appends its run id, unless run_name already carries it.
    monkeypatch.setenv("WANDB_SWEEP_ID", "sw1")
    monkeypatch.setenv("WANDB_RUN_ID", "r42")
    assert job_run_name(cfg, _hydra_cfg(*args, mode=RunMode.RUN).hydra) == "bind-clap-r42"
    with open_dict(cfg):
        cfg.run_name = "sweep-bind-r42"
    assert job_run_name(cfg, cfg.hydra) == "sweep-bind-r42"


def test_ddp_launched_by_lightning_is_refused_inside_a_multirun(compose_cfg, monkeypatch) -> None:
    # Lightning launches the ranks itself only when no launcher's variables are set (an earlier
    # in-process DDP run may leave LOCAL_RANK and friends behind).
    for name in ("LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "WORLD_SIZE", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    cfg = compose_cfg(*BIND, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2")
    make_trainer(cfg, 1, [])  # a single run may launch its ranks
    HydraConfig.instance().set_config(_hydra_cfg(*BIND))
    try:
        with pytest.raises(ValueError, match="Hydra multirun"):
            make_trainer(cfg, 1, [])
    finally:
        HydraConfig.instance().cfg = None


# ---------------------------------------------------------------------------- sweeps


def _sweep(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _proposals(sweep: dict, n: int = 2) -> list[dict]:
    import sweeps

    return [run.config for run in sweeps.next_runs(sweep, [], validate=True, n=n)]


def _command(sweep: dict, proposal: dict, extra: tuple[str, ...] = ()) -> list[str]:
    """The command `wandb agent` runs for a proposal; `extra` overrides go before the sampled."""
    values = create_sweep_command_args({"args": proposal})
    macros = {"env": [], "interpreter": [sys.executable], "program": [str(REPO / "train.py")]}
    out = []
    for token in sweep["command"]:
        if token == "${args_no_hyphens}":
            out += [*extra, *values["args_no_hyphens"]]
        elif token.startswith("${") and token.endswith("}"):
            out += macros[token[2:-1]]
        else:
            out.append(token)
    return out


@pytest.mark.parametrize("path", SWEEPS, ids=[p.stem for p in SWEEPS])
def test_sweep_configs_are_valid_and_propose_runnable_overrides(path: Path, monkeypatch) -> None:
    import sweeps

    sweep = _sweep(path)
    assert sweeps.schema_violations_from_proposed_config(sweep) == []
    sweeps.SweepConfig(sweep)  # raises on a schema violation
    assert sweep["metric"] == {"name": "val/mean_R@1_best", "goal": "maximize"}
    command = sweep["command"]
    assert command[:3] == ["${env}", "${interpreter}", "${program}"]
    assert command[-1] == "${args_no_hyphens}" and "${args_no_hyphens}" not in command[:-1]
    fixed = command[3:-1]
    assert fixed and all("=" in t and not t.startswith("$") for t in fixed)
    params = set(sweep["parameters"])
    assert {"loss.temperature"} < params and any(p.endswith(".lr") for p in params)

    monkeypatch.setenv("WANDB_RUN_ID", "abc123")
    for proposal in _proposals(sweep):
        cfg = compose_config(_command(sweep, proposal)[2:])  # what train.py would compose
        for key, value in proposal.items():
            node = cfg
            for part in key.split("."):
                node = node[part]
            assert node == pytest.approx(value["value"]), key
        # Its own run dir and export: runs never resume or overwrite each other.
        assert cfg.run_name.endswith("-abc123") and cfg.logger.project == "omnibind"
        export = cfg.bind.export_dir if cfg.stage.name == "bind" else cfg.route.export_dir
        assert export.startswith(cfg.run_dir)


def test_a_bind_sweep_proposal_runs_with_fast_dev_run(small_world, compose_cfg, monkeypatch):
    sweep = _sweep(CONF_DIR / "sweep" / "bind.yaml")
    (proposal,) = _proposals(sweep, n=1)
    monkeypatch.setenv("WANDB_RUN_ID", "fdr1")
    fixed = [t for t in sweep["command"][3:-1]]
    sampled = create_sweep_command_args({"args": proposal})["args_no_hyphens"]
    extra = ("bind.hidden_dim=64", "bind.pairs=oracle", "++trainer.fast_dev_run=true")
    cfg = compose_cfg(*fixed, *extra, *sampled)
    result = train(cfg)
    assert isinstance(result, float)
    assert (Path(cfg.run_dir) / "bound" / "bound.json").exists()
    assert wandb.run is None


# ---------------------------------------------------------------------------- slow: subprocesses


def _env(**extra: str) -> dict[str, str]:
    # Without WANDB_SERVICE: an earlier in-process wandb.init exports it, and a subprocess would
    # then share that service, where a killed run's id stays "in use".
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
    return {**env, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
            "HYDRA_FULL_ERROR": "1", **extra}  # fmt: skip


def _run(args: list[str], cwd: Path, env: dict | None = None, check: bool = True, timeout=600):
    proc = subprocess.run(args, cwd=cwd, env=env or _env(), capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def _cli(world_cfg: DictConfig, out: Path, *overrides: str) -> list[str]:
    return [*SMALL_WORLD, f"paths.output_dir={out}", f"paths.data_dir={world_cfg.paths.data_dir}",
            "trainer.enable_progress_bar=false", *overrides]  # fmt: skip


KILLER = """
import os, runpy, signal, sys
import psutil
sys.path.insert(0, {repo!r})
import lightning as L
import lightning_modules.runtime.training as training


class KillMidEpoch(L.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.current_epoch == 1 and batch_idx == 2:
            # Like a preemption: every process of the job dies, W&B's service child included
            # (an orphaned service would keep holding the run id).
            for child in psutil.Process().children(recursive=True):
                child.kill()
            os.kill(os.getpid(), signal.SIGKILL)


make_trainer = training.make_trainer
training.make_trainer = lambda cfg, epochs, callbacks, logger=None: make_trainer(
    cfg, epochs, [*callbacks, KillMidEpoch()], logger
)
sys.argv[0] = os.path.join({repo!r}, "train.py")
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_matches_an_uninterrupted_run(
    small_world, world_cfg, tmp_path
) -> None:
    # The run kills itself with SIGKILL at a known step (epoch 1, batch 3 of 7), so the test
    # does not race the training loop; nothing in the process gets to clean up.
    args = [*BIND, "bind.epochs=3", "logger=wandb"]
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    _run([sys.executable, str(REPO / "train.py"), *_cli(world_cfg, whole, *args)], tmp_path)
    killer = tmp_path / "killer.py"
    killer.write_text(KILLER.format(repo=str(REPO)))
    killed = _run([sys.executable, str(killer), *_cli(world_cfg, broken, *args)], tmp_path,
                  check=False)  # fmt: skip
    assert killed.returncode == -9, killed.stderr[-3000:]
    run_dir = broken / "runs" / "bind-clap"
    assert _ckpt(run_dir)["epoch"] == 0  # only epoch 0 was saved
    wandb_id = (run_dir / WANDB_ID_FILE).read_text()

    resumed = _run([sys.executable, str(REPO / "train.py"),
                    *_cli(world_cfg, broken, *args, "resume=true")], tmp_path)  # fmt: skip
    assert "resuming bind-clap from" in resumed.stderr + resumed.stdout
    a, b = _ckpt(whole / "runs" / "bind-clap"), _ckpt(run_dir)
    assert (a["epoch"], a["global_step"]) == (b["epoch"], b["global_step"]) == (2, 21)
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    monitor = next(v for k, v in a["callbacks"].items() if k.startswith("ModelCheckpoint"))
    monitor_b = next(v for k, v in b["callbacks"].items() if k.startswith("ModelCheckpoint"))
    for key in ("current_score", "best_model_score"):  # the final and best val/mean_R@1
        assert float(monitor[key]) == float(monitor_b[key]), key
    meta_a = json.loads((whole / "bound" / "clap" / "bound.json").read_text())
    meta_b = json.loads((broken / "bound" / "clap" / "bound.json").read_text())
    assert meta_a["sha256"] == meta_b["sha256"]  # the same exported projectors, byte for byte
    # The resumed process reconnected the killed one's W&B run.
    assert (run_dir / WANDB_ID_FILE).read_text() == wandb_id
    assert [r.name.endswith(wandb_id) for r in _offline_runs(run_dir)] == [True, True]


VALIDATE = """
import json, sys
sys.path.insert(0, {repo!r})
import torch
torch.set_num_threads(1)
import hydra
from hydra import compose, initialize_config_dir
from lightning_modules.stages.bind import BindModule
from lightning_modules.runtime.training import make_trainer

overrides, checkpoint, world, out = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
with initialize_config_dir({conf!r}, version_base="1.3"):
    cfg = compose("config", overrides=overrides)
model = BindModule.load_from_checkpoint(checkpoint, map_location="cpu")
hp = model.hparams
needs = [(hp.space, m) for m in hp.dims] + [(hp.anchor, m) for m in hp.anchor_dims]
# 300 pairs in batches of 64: 5 batches, so 2 ranks get 3 each, one of them a padding repeat.
dm = hydra.utils.instantiate(cfg.datamodule)(world, world + "/tuples/oracle.npz", needs, {{}},
                                             model.val_pairs, batch_size=64, val_batch_size=64)
trainer = make_trainer(cfg, 1, [], logger=False)
metrics = trainer.validate(model, dm, verbose=False)[0]
if trainer.is_global_zero:
    json.dump({{k: float(v) for k, v in metrics.items()}}, open(out, "w"))
"""


@pytest.mark.slow
def test_ddp_on_two_cpu_processes_syncs_retrieval_metrics(small_world, compose_cfg, tmp_path):
    cfg = compose_cfg(*BIND, "bind.epochs=1")
    train(cfg)  # a trained projector, so that R@K is far from chance
    script = tmp_path / "validate.py"
    script.write_text(VALIDATE.format(repo=str(REPO), conf=str(CONF_DIR)))
    got = {}
    for devices in (1, 2):
        overrides = [*SMALL_WORLD, f"paths.output_dir={tmp_path / str(devices)}", "trainer=ddp",
                     "trainer.accelerator=cpu", f"trainer.devices={devices}",
                     "trainer.enable_progress_bar=false"]  # fmt: skip
        out = tmp_path / f"metrics{devices}.json"
        _run([sys.executable, str(script), json.dumps(overrides),
              str(Path(cfg.run_dir) / "checkpoints" / "last.ckpt"), str(small_world), str(out)],
             tmp_path)  # fmt: skip
        got[devices] = json.loads(out.read_text())
    recall = {k: v for k, v in got[1].items() if "/R@" in k}
    assert len(recall) == 12 and recall["val/audio_to_text/R@1"] > 0.3
    assert {k: got[2][k] for k in recall} == recall


@pytest.mark.slow
def test_ddp_on_two_cpu_processes_trains_and_resumes(small_world, world_cfg, tmp_path) -> None:
    ddp = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "logger=wandb"]
    cli = [sys.executable, str(REPO / "train.py")]
    _run([*cli, *_cli(world_cfg, tmp_path, *BIND, *ddp, "bind.epochs=1")], tmp_path)
    run_dir = tmp_path / "runs" / "bind-clap"
    first = _ckpt(run_dir)
    wandb_id = (run_dir / WANDB_ID_FILE).read_text()
    _run([*cli, *_cli(world_cfg, tmp_path, *BIND, *ddp, "bind.epochs=2", "resume=true")],
         tmp_path)  # fmt: skip
    second = _ckpt(run_dir)
    # 2,000 tuples in batches of 256 on 2 ranks: 4 steps an epoch (7 batches, one padded).
    assert (first["epoch"], first["global_step"]) == (0, 4)
    assert (second["epoch"], second["global_step"]) == (1, 8)
    assert (run_dir / "hydra" / "train_ddp_process_1.log").exists()  # rank 1 ran in the run dir
    assert (run_dir / WANDB_ID_FILE).read_text() == wandb_id
    assert len(_offline_runs(run_dir)) == 2  # rank 0 alone logs: one W&B segment per attempt
    assert (tmp_path / "bound" / "clap" / "bound.json").exists()


@pytest.mark.slow
@pytest.mark.parametrize("path", SWEEPS, ids=[p.stem for p in SWEEPS])
def test_sweep_proposals_run_through_the_command_line(path, small_world, world_cfg, tmp_path):
    sweep = _sweep(path)
    extra = _cli(world_cfg, tmp_path, "++trainer.fast_dev_run=true", "bind.hidden_dim=64",
                 "bind.pairs=oracle")  # fmt: skip
    if "stage=route" in sweep["command"]:
        extra += [*WORLD_VARIANT, "route.batch_size=256"]
        for space in ("clap", "imagebind", "uni3d"):  # the bound spaces route reads
            train(compose_config([*SMALL_WORLD, f"paths.output_dir={tmp_path}",
                                  f"paths.data_dir={world_cfg.paths.data_dir}", "stage=bind",
                                  "bind.pairs=oracle",
                                  f"space={space}", "bind.hidden_dim=64",
                                  "++trainer.fast_dev_run=true"]))  # fmt: skip
    for i, proposal in enumerate(_proposals(sweep)):
        # As `wandb agent` runs it: the sweep's fixed overrides first, the sampled ones last.
        command = _command(sweep, proposal, tuple(extra))
        assert (
            command[-len(proposal) :]
            == create_sweep_command_args({"args": proposal})["args_no_hyphens"]
        )
        _run(command, tmp_path, _env(WANDB_SWEEP_ID="sweep0", WANDB_RUN_ID=f"run{i}"))
    runs = sorted(p.name for p in (tmp_path / "runs").iterdir() if p.name.startswith("sweep-"))
    assert len(runs) == 2 and runs[0].endswith("run0") and runs[1].endswith("run1")


@pytest.mark.slow
def test_multirun_jobs_get_their_own_runs(small_world, world_cfg, tmp_path) -> None:
    _run([sys.executable, str(REPO / "train.py"), "-m",
          *_cli(world_cfg, tmp_path, *BIND, "++trainer.fast_dev_run=true",
                "loss.temperature=0.03,0.05")], tmp_path)  # fmt: skip
    # The small world's overrides make the names long, so each job is named by their hash.
    runs = sorted(p.name for p in (tmp_path / "runs").iterdir() if p.name != "multirun")
    assert len(runs) == 2 and all(r.startswith("bind-clap-") for r in runs)
    assert sorted(p.name for p in (tmp_path / "runs" / "multirun").iterdir())[:2] == ["0", "1"]
