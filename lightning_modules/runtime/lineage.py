"""W&B lineage: what each stage read and made, as Artifacts; its tables to W&B and to the CSV log.

The main job's stage runs share a W&B `group` (the pipeline's run name) and each carries a
`job_type` (pair, bind, route, evaluate); see `stage_changes`. A stage logs what it made as an
Artifact and declares what it read as an input, so W&B's lineage graph shows which tuples made
which bound spaces and which omni model:

    tuples-<source> (pair) -> bound-<space>-<source> (bind) -> omni-<variant>-<run> (route)
    -> evaluate

An input is declared with an Artifact built from the same files as the one its stage logged, so
W&B identifies the two by digest; this also works offline, where an artifact cannot be looked
up by name, and `wandb sync` links the uploaded runs. Nothing here runs without a W&B logger,
except the tables, which the CSV logger writes as `<key>.csv` beside its metrics.csv.
"""

from __future__ import annotations

import csv
import json
import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger, WandbLogger
from omegaconf import DictConfig

from datamodules.artifacts import STAMP as VERIFIED
from encoders.modalities import MODALITIES
from lightning_modules.evaluation.benchmarks import columns
from lightning_modules.evaluation.methods import parse_method
from lightning_modules.omni.export import BOUND_META, OMNI_META
from lightning_modules.runtime.config import pairs_source, tuples_path

log = logging.getLogger(__name__)

# Left out of exported folders: per-machine verification stamps and the pipeline's own stamp
# (lightning_modules/stages/pipeline.py STAMP); neither is part of the model, and both change
# between machines and runs, which would change the artifact's digest.
LEFT_OUT = {VERIFIED, "pipeline_config.json"}
PAIRS_SUMMARY = "pairs_summary.json"  # pair.SUMMARY, written beside the tuple table


def is_wandb(cfg: DictConfig) -> bool:
    """True when the configured logger is W&B's."""
    return bool(cfg.get("logger")) and str(cfg.logger.get("_target_", "")).endswith("WandbLogger")


def stage_changes(cfg: DictConfig, job_type: str) -> dict[str, str]:
    """Overrides for a pipeline stage's sub-config: its W&B run joins the pipeline's group with
    `job_type` (nothing without a W&B logger)."""
    if not is_wandb(cfg):
        return {}
    return {"logger.group": cfg.logger.get("group") or cfg.run_name, "logger.job_type": job_type}


def _name(*parts: str) -> str:
    """An artifact name: W&B allows letters, digits, '-', '_' and '.'."""
    return re.sub(r"[^\w.-]", "_", "-".join(str(p) for p in parts if p))


def _artifact(name: str, kind: str, files: Iterable[Path], metadata: Mapping):
    """A W&B Artifact holding `files` (each under its own name)."""
    import wandb  # optional and slow to import: only with a W&B logger

    artifact = wandb.Artifact(name, type=kind, metadata=dict(metadata))
    for path in files:
        artifact.add_file(str(path), name=path.name)
    return artifact


def tuples_artifact(path: str | Path, source: str):
    """The tuple table at `path` (and the pair summary beside it) as a `tuples` Artifact.

    `source` is the table's pairs source (pseudo, oracle, or the table's path).
    """
    path = Path(path)
    label = source if source in ("pseudo", "oracle") else path.stem
    files = [path] + [p for p in [path.with_name(PAIRS_SUMMARY)] if p.exists()]
    return _artifact(_name("tuples", label), "tuples", files, {"source": source})


def export_artifact(directory: str | Path):
    """A bind export (`bound_space`) or a route export (`omni_model`) folder as an Artifact.

    Every file of the folder but the stamps of LEFT_OUT and hidden temporaries.
    """
    directory = Path(directory)
    if (directory / BOUND_META).exists():
        meta = json.loads((directory / BOUND_META).read_text())
        name, kind = _name("bound", meta.get("space", directory.name), meta.get("pairs")), "bound"
    elif (directory / OMNI_META).exists():
        meta = json.loads((directory / OMNI_META).read_text())
        name, kind = _name("omni", meta.get("variant"), directory.name), "omni"
    else:
        raise ValueError(f"{directory}: neither a bound space ({BOUND_META}) nor an omni model "
                         f"({OMNI_META})")  # fmt: skip
    files = sorted(
        p
        for p in directory.iterdir()
        if p.is_file() and p.name not in LEFT_OUT and not p.name.startswith(".")
    )
    keep = ("space", "variant", "kind", "anchor", "pairs", "tuples_sha256", "best_val_mean_R1")
    metadata = {k: meta[k] for k in keep if k in meta} | {"path": str(directory)}
    return _artifact(name, {"bound": "bound_space", "omni": "omni_model"}[kind], files, metadata)


def record(logger, uses: Sequence = (), makes: Sequence = ()) -> None:
    """Declare Artifacts `uses` as the W&B run's inputs and log `makes` as its outputs."""
    run = logger.experiment
    for artifact in uses:
        if run.offline:
            # use_artifact refuses offline runs, even for an Artifact object. This is what it
            # does online for one not yet logged: log it, marked as used (`wandb sync` links it).
            run._log_artifact(artifact, is_user_created=True, use_after_commit=True)
        else:
            run.use_artifact(artifact)
    for artifact in makes:
        run.log_artifact(artifact)


def log_table(logger, key: str, columns: Sequence[str], rows: Sequence[Sequence]) -> Path | None:
    """A table to the logger: a W&B Table, or `<key>.csv` in the CSV logger's folder.

    Returns the CSV file's path when one was written. `key` like `pair/summary` gives
    `pair_summary.csv`.
    """
    if isinstance(logger, WandbLogger):
        logger.log_table(key=key, columns=list(columns), data=[list(r) for r in rows])
    elif isinstance(logger, CSVLogger):
        path = Path(logger.log_dir) / f"{key.replace('/', '_')}.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(columns)
            writer.writerows(rows)
        return path
    return None


# ---------------------------------------------------------------------------- stages


def summary_table(summary: Mapping) -> tuple[list[str], list[list]]:
    """The pair summary as one row per modality: every per-modality number of the summary.

    A {modality: number} entry (counts, concept_agreement...) is a column; a {modality:
    {modality: number}} entry (target_agreement) gives a column per target, `<key>/<target>`.
    """
    present = [m for m in MODALITIES if m in summary.get("modalities", MODALITIES)]
    cells: dict[str, dict[str, float]] = {}  # column -> {modality: value}
    for key, value in summary.items():
        if not isinstance(value, Mapping) or not value or not set(value) <= set(MODALITIES):
            continue
        for m, v in value.items():
            if isinstance(v, int | float) and not isinstance(v, bool):
                cells.setdefault(key, {})[m] = v
            elif isinstance(v, Mapping):
                for t, w in v.items():
                    if isinstance(w, int | float) and not isinstance(w, bool):
                        cells.setdefault(f"{key}/{t}", {})[m] = w
    columns = ["modality", *cells]
    return columns, [[m, *(cells[c].get(m) for c in cells)] for m in present]


def log_pair(logger, output: Path, summary: Mapping) -> None:
    """The pair stage: its summary as a table (W&B and CSV), the tuple table as an Artifact."""
    if not logger:
        return
    columns, rows = summary_table(summary)
    log_table(logger, "pair/summary", columns, rows)
    if isinstance(logger, WandbLogger):
        for key in ("tuples", "concept_agreement_overall", "duplicates_removed"):
            if isinstance(summary.get(key), int | float):
                logger.experiment.summary[f"pair/{key}"] = summary[key]
        record(logger, makes=[tuples_artifact(output, "pseudo")])


def _tuples_read(cfg: DictConfig, which: str, root: Path):
    """The Artifact of the tuple table that bind or route reads (`bind.pairs`/`route.pairs`)."""
    return tuples_artifact(tuples_path(cfg, which, root), pairs_source(which))


def log_bind(logger, cfg: DictConfig, root: Path) -> None:
    """The bind stage: the tuple table it read in, the bound space it exported out."""
    if not isinstance(logger, WandbLogger):
        return
    uses = [_tuples_read(cfg, cfg.bind.pairs, root)]
    record(logger, uses=uses, makes=[export_artifact(cfg.bind.export_dir)])


def log_route(logger, cfg: DictConfig, root: Path) -> None:
    """The route stage: the tuple table and bound spaces it read in, the omni model out."""
    if not isinstance(logger, WandbLogger):
        return
    uses = [_tuples_read(cfg, cfg.route.pairs, root)]
    uses += [export_artifact(Path(cfg.route.bound_dir) / s) for s in cfg.variant.spaces]
    record(logger, uses=uses, makes=[export_artifact(cfg.route.export_dir)])


def scored_exports(cfg: DictConfig) -> list[Path]:
    """The export folders that `evaluate.methods` scores (bound: and omni: methods), once each."""
    ev, found = cfg.evaluate, []
    for spec in ev.methods:
        _, kind, argument = parse_method(spec)
        if kind == "bound":
            found.append(Path(ev.bound_dir) / argument)
        elif kind == "omni":
            found.append(Path(ev.omni_dir) / argument.partition(":")[0])
    return list(dict.fromkeys(found))


def results_table(results: Mapping, retrieval: list[str], zeroshot: list[str]) -> list[list]:
    """One row a method: its name, each result in percent (None where not covered), mean R@1."""
    rows = []
    for name, m in results["methods"].items():
        values = [m["retrieval"].get(k) for k in retrieval] + [
            m["zeroshot"].get(k) for k in zeroshot
        ]
        values.append(m["summary"]["mean_R@1"])
        rows.append([name, *(None if v is None else 100 * v for v in values)])
    return rows


def log_evaluate(logger, cfg: DictConfig, results: Mapping, benchmarks) -> None:
    """The evaluate stage: the results table (W&B Table or CSV); on W&B also every score in the
    run's summary and the scored exports as the run's inputs."""
    if not logger:
        return
    retrieval, zeroshot = columns(benchmarks, results["methods"])
    rows = results_table(results, retrieval, zeroshot)
    log_table(logger, "evaluate/results", ["method", *retrieval, *zeroshot, "mean_R@1"], rows)
    if isinstance(logger, WandbLogger):
        summary = logger.experiment.summary
        for name, m in results["methods"].items():
            for kind in ("retrieval", "zeroshot", "summary"):
                for key, value in m[kind].items():
                    summary[f"evaluate/{name}/{kind}/{key}"] = value
        record(logger, uses=[export_artifact(d) for d in scored_exports(cfg)])
