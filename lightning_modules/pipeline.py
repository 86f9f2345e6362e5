"""The main job: pair -> bind (every space of the variant) -> route -> evaluate.

A stage whose outputs exist, load, and were made by the same configuration is skipped unless
force=true; a changed configuration reruns it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from datamodules.cache import CacheError, atomic_write_json
from datamodules.tuples import load_tuples
from lightning_modules import bind, evaluate, pair, route
from lightning_modules.common import pairs_source, space_configs, to_plain
from lightning_modules.omni import OmniModel

log = logging.getLogger(__name__)
STAMP = "pipeline_config.json"  # beside each stage's output: the config that made it


def _sub(cfg: DictConfig, **changes) -> DictConfig:
    """A copy of cfg with top-level keys replaced (space, run_name, ...), resolved eagerly."""
    sub = cfg.copy()
    with open_dict(sub):
        for key, value in changes.items():
            OmegaConf.update(sub, key, value, merge=False)
    return sub


def _digest(cfg: DictConfig, keys: list[str]) -> str:
    """A hash of the resolved config sections that decide a stage's output."""
    plain = {k: to_plain(OmegaConf.select(cfg, k)) for k in keys}
    return hashlib.sha256(json.dumps(plain, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _fresh(directory: Path, digest: str, check) -> bool:
    """True when `directory` holds a valid output (check() passes) made with this digest."""
    stamp = directory / STAMP
    if not stamp.exists():
        return False
    if json.loads(stamp.read_text()).get("digest") != digest:
        log.info("pipeline: %s was made with another configuration; redoing it", directory)
        return False
    try:
        check()
    except (CacheError, OSError, ValueError) as e:
        log.warning("pipeline: %s is invalid (%s); redoing it", directory, e)
        return False
    return True


def _step(cfg: DictConfig, name: str, directory: Path, digest: str, check, run) -> None:
    """Run one stage unless its output is fresh; stamp the output with the config digest."""
    if not cfg.force and _fresh(directory, digest, check):
        log.info("pipeline: %s is done (%s); skipping", name, directory)
        return
    log.info("pipeline: running %s", name)
    run()
    atomic_write_json(directory / STAMP, {"digest": digest, "stage": name})


def run(cfg: DictConfig) -> float | None:
    """Run every stage for `cfg.variant`; returns the routed model's mean R@1 on the test sets."""
    data_keys = ["data", "anchor", "seed"]
    if "pseudo" in (pairs_source(cfg, cfg.bind.pairs), pairs_source(cfg, cfg.route.pairs)):
        out = Path(cfg.pair.output)
        _step(
            cfg,
            "pair",
            out.parent,
            _digest(cfg, [*data_keys, "pair"]),
            lambda: load_tuples(out),
            lambda: pair.run(_sub(cfg, run_name="pair")),
        )
    pairs_digest = _digest(cfg, [*data_keys, "pair", "bind.pairs", "route.pairs"])
    for name, space in space_configs(cfg.variant.spaces).items():
        sub = _sub(cfg, space=space, run_name=f"bind-{name}")
        sub.bind.export_dir = str(Path(cfg.route.bound_dir) / name)
        digest = _digest(sub, [*data_keys, "space", "bind", "loss.temperature", "loss.weights"])
        _step(
            cfg,
            f"bind {name}",
            Path(sub.bind.export_dir),
            digest + pairs_digest,
            lambda d=sub.bind.export_dir: bind.load_bound_space(d),
            lambda s=sub: bind.run(s),
        )
    bound_digest = _digest(cfg, [*data_keys, "variant", "bind", "loss"]) + pairs_digest
    exports = {}
    for name, overrides in cfg.pipeline.routes.items():
        changes = {
            "route.export_dir": str(Path(cfg.evaluate.omni_dir) / cfg.variant.name / name),
            "run_name": f"route-{cfg.variant.name}-{name}",
            **to_plain(overrides),
        }
        sub = _sub(cfg, **changes)
        exports[name] = Path(sub.route.export_dir)
        digest = _digest(sub, ["route", "loss"]) + bound_digest
        _step(
            cfg,
            f"route {name}",
            exports[name],
            digest,
            lambda d=exports[name]: OmniModel.load(d),
            lambda s=sub: route.run(s),
        )
    # Each space native (its own cache) and projected (bound): the difference is the binding loss.
    methods = [f"{kind}:{s}" for s in cfg.variant.spaces for kind in ("raw", "bound")]
    for name, directory in exports.items():
        where = directory.relative_to(cfg.evaluate.omni_dir)
        if name == "routed":
            methods.append(f"average=omni:{where}:average")
        methods.append(f"{name}=omni:{where}")
    sub = _sub(cfg, **{"evaluate.methods": methods, "evaluate.output_dir": cfg.run_dir})
    evaluate.run(sub)
    results = json.loads((Path(cfg.run_dir) / "results.json").read_text())
    best = results["methods"].get("routed") or next(iter(results["methods"].values()))
    return best["summary"]["mean_R@1"]
