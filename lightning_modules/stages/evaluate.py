"""Evaluate stage: the paper's Tables 2 and 3 for any method on any benchmark manifest.

`python train.py stage=evaluate evaluate.methods=[raw:clap,bound:clap,omni:base/routed]`

Where each concern lives (in lightning_modules/evaluation/):
    benchmarks.py  manifests (retrieval, zero-shot, prompts, video rows)
    methods.py     raw:/bound:/omni: methods that embed cached rows
    scoring.py     R@K and zero-shot scoring (CLIP_benchmark semantics)
    reports.py     results.md, the compact console summary, the W&B table
Real benchmarks plug in by pointing `evaluate.benchmarks` at a manifest; entries naming `classes`
use `evaluate.templates.<modality>` when they give no templates of their own.
"""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from datamodules.artifacts import atomic_write, atomic_write_json
from encoders.modalities import resolve_device
from lightning_modules.evaluation.benchmarks import Benchmarks, load_benchmarks, manifest_path
from lightning_modules.evaluation.methods import Method, make_method
from lightning_modules.evaluation.reports import compact_summary, markdown
from lightning_modules.evaluation.scoring import TIES, evaluate_method, mean_r1
from lightning_modules.runtime import lineage
from lightning_modules.runtime.config import ensure_data
from lightning_modules.runtime.training import make_logger

log = logging.getLogger(__name__)


def _entry(method: Method, scores: dict, benchmarks: Benchmarks) -> dict:
    """A method's results.json entry: rounded scores and its mean R@1 over covered directions."""
    if not scores["retrieval"] and not scores["zeroshot"]:
        log.warning("evaluate: %s (modalities %s) covers no benchmark of %s", method.name,
                    list(method.modalities), benchmarks.path)  # fmt: skip
    # Metrics compute in float32: 6 decimals keep every digit that means anything.
    scores = {kind: {k: round(v, 6) for k, v in s.items()} for kind, s in scores.items()}
    r1 = [v for k, v in scores["retrieval"].items() if k.endswith("/R@1")]
    mean = mean_r1(scores["retrieval"])
    summary = {"mean_R@1": None if mean is None else round(mean, 6), "directions": len(r1)}
    tuples = getattr(method, "tuples", None)  # what a trained method was trained on
    return dict(modalities=list(method.modalities), **scores, summary=summary) | (
        {"tuples": tuples} if tuples else {}
    )


def run(cfg: DictConfig) -> float | None:
    """Score every method of `evaluate.methods` on the manifest; write results.json/.md.

    Returns the first method's mean R@1 over the directions it covers (for sweepers).
    """
    ev = cfg.evaluate
    if not ev.methods:
        raise ValueError(
            "evaluate.methods is empty; e.g. evaluate.methods=[raw:clap,omni:base/routed]"
        )
    spaces = {**cfg.variant.spaces, cfg.anchor.name: cfg.anchor}
    methods = [make_method(spec, ev.bound_dir, ev.omni_dir, spaces) for spec in ev.methods]
    names = [m.name for m in methods]
    if len(set(names)) < len(names):
        raise ValueError(f"evaluate.methods: names must be unique, got {names}")
    root = ensure_data(cfg, dict.fromkeys(s for m in methods for s in m.spaces))
    templates = OmegaConf.to_container(ev.templates) if ev.get("templates") else None
    benchmarks = load_benchmarks(manifest_path(ev.benchmarks, root), templates)
    device = resolve_device(ev.device)
    ks, topk = tuple(int(k) for k in ev.ks), tuple(int(k) for k in ev.topk)
    results: dict = dict(benchmarks=str(benchmarks.path), root=str(benchmarks.root), methods={})
    total = len(methods) * (len(benchmarks.retrieval) + len(benchmarks.zeroshot))
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeRemainingColumn()]  # fmt: skip
    with Progress(*columns, disable=not cfg.trainer.get("enable_progress_bar", True)) as bar:
        task = bar.add_task("evaluate", total=total)
        for method in methods:
            log.info("evaluate: %s on %s", method.name, benchmarks.path)
            advance = lambda name, who=method.name: bar.update(  # noqa: E731
                task, advance=1, description=f"evaluate: {who} on {name}"
            )
            scores = evaluate_method(method, benchmarks, ks, topk, int(ev.chunk), device, advance)
            results["methods"][method.name] = _entry(method, scores, benchmarks)
    if not any(m["retrieval"] or m["zeroshot"] for m in results["methods"].values()):
        raise ValueError(f"no method in {list(ev.methods)} covers any benchmark of "
                         f"{benchmarks.path}")  # fmt: skip
    results["config"] = {
        "ks": list(ks),
        "topk": list(topk),
        "methods": [str(m) for m in ev.methods],
        "ties": TIES,
    }
    out = Path(ev.output_dir)
    atomic_write_json(out / "results.json", results)
    text = markdown(results, benchmarks)
    atomic_write(out / "results.md", lambda f: f.write(text.encode()))
    log.info("evaluate: wrote results.json and results.md to %s", out)
    logger = make_logger(cfg)
    lineage.log_evaluate(logger, cfg, results, benchmarks)  # the table; W&B: what it scored
    if lineage.is_wandb(cfg):
        logger.experiment.finish()  # now: W&B's closing lines must come before the summary
    # The full table is wider than a terminal: results.md holds it, the console a summary.
    print(f"evaluate: {benchmarks.name} (%)\n{compact_summary(results)}\nall results: "
          f"{out / 'results.md'}")  # fmt: skip
    return results["methods"][methods[0].name]["summary"]["mean_R@1"]
