"""W&B lineage and tables (lightning_modules/runtime/lineage.py), offline, and the main job's
console.

The pipeline test reads what the offline runs wrote (their `.wandb` transaction logs), so it
checks what `wandb sync` would upload, not only which functions were called.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import struct
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import SMALL_WORLD, compose_config
from lightning.pytorch.loggers import CSVLogger
from wandb.proto import wandb_internal_pb2 as pb

from lightning_modules.runtime import lineage
from train import train

# The main job at its smallest: one route run, no oracle upper bound, one epoch a stage.
PIPELINE = ("stage=pipeline", "variant=small", "~pipeline.routes.fixed", "bind.epochs=1",
            "bind.hidden_dim=64", "bind.batch_size=256", "route.epochs=1",
            "route.batch_size=256")  # fmt: skip
SPACES = ("clap", "imagebind", "uni3d")  # variant=small


def records(path: Path) -> Iterator[pb.Record]:
    """The records of a W&B transaction log (`.wandb`: LevelDB's log format, 32 KiB blocks)."""
    data, block, header = path.read_bytes(), 32768, 7
    assert data[:4] == b":W&B", f"{path}: not a W&B transaction log"
    pos, buf = 7, b""  # after the file header: ':W&B', a 2-byte magic, a version byte
    while pos + header <= len(data):
        if block - pos % block < header:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + header])
        chunk = data[pos + header : pos + header + length]
        pos += header + length
        if kind == 0:  # zero padding
            continue
        buf = chunk if kind in (1, 2) else buf + chunk  # FULL, FIRST | MIDDLE, LAST
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf)
            yield record


def offline_run(run_dir: Path) -> dict:
    """What one stage's offline W&B run holds: group, job type, artifacts in and out, keys."""
    (log,) = sorted((run_dir / "wandb").glob("offline-run-*/*.wandb"))
    run = {"inputs": {}, "outputs": {}, "files": {}, "keys": set()}
    for r in records(log):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            run["group"], run["job_type"] = r.run.run_group, r.run.job_type
        elif kind == "artifact" and r.artifact.type != "run_table":
            side = "inputs" if r.artifact.use_after_commit else "outputs"
            run[side][r.artifact.name] = r.artifact.digest
            run["files"][r.artifact.name] = sorted(e.path for e in r.artifact.manifest.contents)
        elif kind == "history":
            run["keys"] |= {i.key or i.nested_key[0] for i in r.history.item}
    return run


@pytest.fixture(scope="module")
def wandb_pipeline(small_world: Path, world_cfg, tmp_path_factory) -> dict:
    """The main job on the small world with logger=wandb (offline), and its console."""
    out = tmp_path_factory.mktemp("lineage")
    cfg = compose_config([*SMALL_WORLD, f"paths.output_dir={out}",
                          f"paths.data_dir={world_cfg.paths.data_dir}", *PIPELINE,
                          "logger=wandb"])  # fmt: skip
    # capsys and caplog are per test: the console and the log are captured by hand.
    stdout, logs = io.StringIO(), io.StringIO()
    handler = logging.StreamHandler(logs)
    logging.getLogger().addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(stdout):
            warnings.simplefilter("always")
            train(cfg)
    finally:
        logging.getLogger().removeHandler(handler)
    runs = Path(cfg.paths.runs_dir)
    return {
        "cfg": cfg,
        "out": out,
        "stdout": stdout.getvalue(),
        "logs": logs.getvalue(),
        "warnings": [str(w.message) for w in caught],
        "pair": offline_run(runs / "pair"),
        "bind": {s: offline_run(runs / f"bind-{s}") for s in SPACES},
        "route": offline_run(runs / "route-small-routed"),
        "evaluate": offline_run(runs / cfg.run_name),
    }


def test_pipeline_runs_share_a_group_and_carry_their_stage(wandb_pipeline: dict) -> None:
    runs = [wandb_pipeline[s] for s in ("pair", "route", "evaluate")]
    runs += list(wandb_pipeline["bind"].values())
    assert {r["group"] for r in runs} == {wandb_pipeline["cfg"].run_name}
    assert [r["job_type"] for r in runs] == ["pair", "route", "evaluate", *["bind"] * 3]


def test_artifacts_carry_the_lineage_pair_bind_route_evaluate(wandb_pipeline: dict) -> None:
    pair, bind = wandb_pipeline["pair"], wandb_pipeline["bind"]
    route, evaluate = wandb_pipeline["route"], wandb_pipeline["evaluate"]
    tuples = pair["outputs"]["tuples-pseudo"]
    assert pair["inputs"] == {} and list(pair["outputs"]) == ["tuples-pseudo"]
    assert pair["files"]["tuples-pseudo"] == ["pairs_summary.json", "tuples.npz"]
    # An input is the very artifact its stage logged: the same digest, so W&B links them.
    bound = {}
    for space, run in bind.items():
        assert run["inputs"] == {"tuples-pseudo": tuples}
        (name,) = run["outputs"]
        assert name == f"bound-{space}-pseudo"
        assert run["files"][name] == ["bound.json", "projectors.safetensors"]
        bound[name] = run["outputs"][name]
    assert route["inputs"] == {"tuples-pseudo": tuples, **bound}
    assert list(route["outputs"]) == ["omni-small-routed"]
    # By the time evaluate reads them the folders hold stamps too: they are left out.
    out = wandb_pipeline["out"]
    assert (out / "bound" / "clap" / "pipeline_config.json").exists()
    assert (out / "bound" / "clap" / ".verified.json").exists()
    assert evaluate["inputs"] == {
        **bound,
        "omni-small-routed": route["outputs"]["omni-small-routed"],
    }
    assert evaluate["outputs"] == {}


def test_pair_summary_and_results_are_wandb_tables(wandb_pipeline: dict) -> None:
    assert "pair/summary" in wandb_pipeline["pair"]["keys"]
    assert "evaluate/results" in wandb_pipeline["evaluate"]["keys"]


def test_console_ends_with_the_summary_and_the_plots(wandb_pipeline: dict) -> None:
    lines = wandb_pipeline["stdout"].rstrip("\n").splitlines()
    start = max(i for i, line in enumerate(lines) if line.startswith("evaluate: "))
    screen = lines[start:]
    assert screen[1].split()[:3] == ["method", "dirs", "mean"], screen
    assert all(len(line) <= 100 for line in screen[:-2]), screen  # the paths may be longer
    runs = Path(wandb_pipeline["cfg"].paths.runs_dir)
    assert screen[-2] == f"all results: {runs / wandb_pipeline['cfg'].run_name / 'results.md'}"
    png = runs / "route-small-routed" / "router_weights.png"
    assert screen[-1] == f"router weights: {png}" and png.exists()
    # Log lines get an 11-column prefix on the console ("12:03:44 I ", conf/config.yaml's
    # hydra.job_logging); with it every line fits 100 columns, but for those naming a path here.
    long = [m for m in wandb_pipeline["logs"].splitlines() if len(m) + 11 > 100 and "/" not in m]
    assert not long, long
    everything = wandb_pipeline["stdout"] + wandb_pipeline["logs"]
    assert "litlogger" not in everything and "litmodels" not in everything
    assert not [w for w in wandb_pipeline["warnings"] if "log_every_n_steps" in w]


def test_pair_and_evaluate_write_their_tables_with_the_csv_logger(
    wandb_pipeline: dict, compose_cfg, tmp_path: Path
) -> None:
    train(compose_cfg("stage=pair", "logger=csv"))
    summary = json.loads((tmp_path / "pairs" / "pairs_summary.json").read_text())
    with open(tmp_path / "runs" / "pair" / "csv" / "pair_summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["modality"] for r in rows] == ["point", "audio", "image", "text"]
    for r in rows:
        m = r["modality"]
        assert float(r["concept_agreement"]) == summary["concept_agreement"][m]
        assert int(r["items"]) == summary["items"][m]
        for t, v in summary["target_agreement"][m].items():
            assert float(r[f"target_agreement/{t}"]) == v

    # The pipeline's exports, scored by the evaluate stage on its own.
    out, methods = wandb_pipeline["out"], "evaluate.methods=[raw:clap,bound:clap,omni:small/routed]"
    where = [f"evaluate.bound_dir={out / 'bound'}", f"evaluate.omni_dir={out / 'omni'}"]
    train(compose_cfg("stage=evaluate", "logger=csv", *where, methods))
    run_dir = tmp_path / "runs" / "evaluate"
    results = json.loads((run_dir / "results.json").read_text())
    with open(run_dir / "csv" / "evaluate_results.csv") as f:
        rows = {r["method"]: r for r in csv.DictReader(f)}
    assert list(rows) == ["raw:clap", "bound:clap", "omni:small/routed"]
    for name, r in rows.items():
        mean = results["methods"][name]["summary"]["mean_R@1"]
        assert float(r["mean_R@1"]) == pytest.approx(100 * mean)  # percent, as results.md
        r1 = results["methods"][name]["retrieval"]["audio_to_text/R@1"]
        assert float(r["audio_to_text/R@1"]) == pytest.approx(100 * r1)


# ---------------------------------------------------------------------------- units


def test_stage_changes_only_with_a_wandb_logger(compose_cfg) -> None:
    assert lineage.stage_changes(compose_cfg("logger=csv"), "bind") == {}
    cfg = compose_cfg("logger=wandb", "run_name=main")
    assert lineage.stage_changes(cfg, "bind") == {"logger.group": "main", "logger.job_type": "bind"}
    cfg = compose_cfg("logger=wandb", "run_name=main", "logger.group=mine")
    assert lineage.stage_changes(cfg, "route")["logger.group"] == "mine"


def test_export_artifact_leaves_out_stamps_and_keeps_its_digest(tmp_path: Path) -> None:
    (tmp_path / "bound.json").write_text(json.dumps({"space": "clap", "pairs": "oracle"}))
    (tmp_path / "projectors.safetensors").write_bytes(b"weights")
    first = lineage.export_artifact(tmp_path)
    (tmp_path / ".verified.json").write_text("{}")
    (tmp_path / "pipeline_config.json").write_text("{}")
    (tmp_path / ".projectors.safetensors.tmp").write_bytes(b"partial")
    again = lineage.export_artifact(tmp_path)
    assert again.name == "bound-clap-oracle" and again.type == "bound_space"
    assert sorted(again.manifest.entries) == ["bound.json", "projectors.safetensors"]
    assert again.manifest.digest() == first.manifest.digest()
    (tmp_path / "projectors.safetensors").write_bytes(b"other weights")
    assert lineage.export_artifact(tmp_path).manifest.digest() != first.manifest.digest()
    with pytest.raises(ValueError, match="neither a bound space"):
        lineage.export_artifact(tmp_path / "nothing")


def test_summary_table_has_a_row_per_modality() -> None:
    summary = {"modalities": ["audio", "text"], "tuples": 3, "items": {"audio": 3, "text": 2},
               "target_agreement": {"audio": {"text": 0.5}, "text": {"audio": 0.25}},
               "routes": {"audio_text": "clap"}, "clean": {"soft": False}}  # fmt: skip
    columns, rows = lineage.summary_table(summary)
    assert columns == ["modality", "items", "target_agreement/text", "target_agreement/audio"]
    assert rows == [["audio", 3, 0.5, None], ["text", 2, None, 0.25]]


def test_log_table_writes_csv_for_the_csv_logger(tmp_path: Path) -> None:
    logger = CSVLogger(tmp_path, name="csv", version="")
    path = lineage.log_table(logger, "pair/summary", ["a", "b"], [[1, None], [2, 0.5]])
    assert path == tmp_path / "csv" / "pair_summary.csv"
    assert path.read_text().splitlines() == ["a,b", "1,", "2,0.5"]
    assert lineage.log_table(False, "pair/summary", ["a"], [[1]]) is None


# ---------------------------------------------------------------------------- console


def test_lightning_product_tips_are_silenced(tmp_path: Path) -> None:
    import lightning as L

    import lightning_modules.runtime.training  # noqa: F401  (installs the filter)

    lines = io.StringIO()
    handler = logging.StreamHandler(lines)
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    rank_zero.addHandler(handler)  # the filter sits on this logger, before its handlers
    try:
        L.Trainer(logger=CSVLogger(tmp_path), accelerator="cpu", enable_progress_bar=False)
    finally:
        rank_zero.removeHandler(handler)
    assert "GPU available" in lines.getvalue()  # Lightning's other messages still show
    assert "Tip:" not in lines.getvalue() and "litlogger" not in lines.getvalue()


def test_an_epoch_shorter_than_log_every_n_steps_still_logs_its_steps(small_world, compose_cfg):
    # 2,000 oracle tuples in batches of 256: 7 steps an epoch, fewer than log_every_n_steps=10.
    cfg = compose_cfg("stage=bind", "space=clap", "bind.pairs=oracle", "bind.hidden_dim=64",
                      "bind.batch_size=256", "bind.epochs=1", "logger=csv")  # fmt: skip
    assert cfg.trainer.log_every_n_steps == 10
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(cfg)
    assert not [w for w in caught if "log_every_n_steps" in str(w.message)]
    with open(Path(cfg.run_dir) / "csv" / "metrics.csv") as f:
        steps = [r for r in csv.DictReader(f) if r.get("train/loss_step")]
    assert [int(r["step"]) for r in steps] == [6]  # once, at the epoch's last step
