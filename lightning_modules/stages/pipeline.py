"""The main job: [extract ->] pair -> bind (every space of the variant) -> route -> evaluate.

A stage is skipped when its output exists, loads, is the very output the pipeline stamped, and
was made from the same configuration AND the same input artifacts (the tuple table, the bound
spaces' weights); force=true redoes everything. So editing a space's config, rebinding a space
by hand or replacing the tuple table reruns exactly what depends on it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import lightning as L
from omegaconf import DictConfig, OmegaConf, open_dict

from datamodules.artifacts import CacheError, atomic_write_json, file_sha256, fingerprint
from datamodules.tuples import load_tuples
from lightning_modules.omni.export import BOUND_WEIGHTS, OMNI_WEIGHTS, load_bound_space, load_omni
from lightning_modules.runtime.config import pairs_source, space_configs, to_plain
from lightning_modules.runtime.lineage import stage_changes
from lightning_modules.stages import bind, evaluate, extract, pair, route

log = logging.getLogger(__name__)
STAMP = "pipeline_config.json"  # beside each stage's output: what made it, and what it was


def _sub(cfg: DictConfig, **changes) -> DictConfig:
    """A copy of cfg with top-level keys replaced (space, run_name, ...), resolved eagerly."""
    sub = cfg.copy()
    with open_dict(sub):
        for key, value in changes.items():
            OmegaConf.update(sub, key, value, merge=False)
    return sub


def _digest(cfg: DictConfig, keys: tuple[str, ...], **inputs: str) -> str:
    """A hash of the resolved config sections that decide a stage's output and of the digests
    of the artifacts it reads."""
    plain = {k: to_plain(OmegaConf.select(cfg, k)) for k in keys}
    return fingerprint({"config": plain, "inputs": inputs})


def _fresh(directory: Path, digest: str, output: Callable[[], str], check) -> bool:
    """True when `directory` holds a valid output (check() passes) that this pipeline stamped
    (its digest is the stamped one) and that was made with this digest."""
    stamp = directory / STAMP
    if not stamp.exists():
        return False
    stamped = json.loads(stamp.read_text())
    if stamped.get("digest") != digest:
        log.info("pipeline: %s was made from another config or other inputs; redoing", directory)
        return False
    try:
        check()
        if stamped.get("output") != output():
            log.info("pipeline: %s changed since the pipeline made it; redoing it", directory)
            return False
    except (CacheError, OSError, ValueError) as e:
        log.warning("pipeline: %s is invalid (%s); redoing it", directory, e)
        return False
    return True


def _step(
    cfg: DictConfig, name: str, directory: Path, digest: str, output: Callable[[], str], check, run
) -> str:
    """Run one stage unless its output is fresh; stamp the output. Returns the output's digest,
    which the stages downstream fold into their own digests."""
    if not cfg.force and _fresh(directory, digest, output, check):
        log.info("pipeline: %s is done (%s); skipping", name, directory)
        return output()
    log.info("pipeline: running %s", name)
    # Each stage starts from the seed, as it does when run alone: its result then depends neither
    # on how much randomness the stages before it drew nor on which of them were skipped as fresh.
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    run()
    made = output()
    atomic_write_json(directory / STAMP, {"digest": digest, "stage": name, "output": made})
    return made


def _extract(cfg: DictConfig) -> None:
    """On raw data, fill the caches of every space the pipeline reads (the variant's and the
    anchor); extraction itself skips finished shards, so a rerun costs a check per cache."""
    if cfg.data.kind != "raw":
        return
    spaces = {**cfg.variant.spaces, cfg.anchor.name: cfg.anchor}
    for name, overrides in cfg.pipeline.extract.items():  # read by the pair stage's routes only
        spaces[name] = OmegaConf.merge(space_configs([name])[name], overrides)
    only = cfg.pipeline.get("extract_datasets") or {}
    unknown = sorted(set(only) - set(spaces))
    if unknown:
        raise ValueError(f"pipeline.extract_datasets names {unknown}, which the pipeline does not "
                         f"extract; expected some of {sorted(spaces)}")  # fmt: skip
    for name, space in spaces.items():
        log.info("pipeline: extract %s", name)
        datasets = {"extract.datasets": only[name]} if only.get(name) is not None else {}
        extract.run(_sub(cfg, space=space, run_name=f"extract-{name}-{cfg.data.name}", **datasets))


def _pools(cfg: DictConfig) -> str:
    """On raw data, the identity of the pool caches the pair stage reads (their fingerprints
    cover their items): re-extracted with items added, the tuple table is made again. The
    world's caches follow from its config, which every digest holds."""
    if cfg.data.kind != "raw":
        return ""
    pool = Path(cfg.data.root) / cfg.pair.dataset
    made = {str(m.parent.relative_to(pool)): json.loads(m.read_text()).get("fingerprint")
            for m in sorted(pool.glob("*/*/manifest.json"))}  # fmt: skip
    return fingerprint(made)


def pair_step(cfg: DictConfig) -> str:
    """The pair stage, when bind or route read its table, unless fresh; returns the tuples'
    digest. Bind and route run alone call it too when their table is missing (ensure_tuples)."""
    sources = {pairs_source(cfg.bind.pairs), pairs_source(cfg.route.pairs)}
    if "pseudo" not in sources:
        return ",".join(sorted(sources))  # the world's oracle (its config is in every digest)
    out = Path(cfg.pair.output)
    return _step(
        cfg,
        "pair",
        out.parent,
        _digest(cfg, pair.DEPENDS, pools=_pools(cfg)),
        lambda: file_sha256(out),
        lambda: load_tuples(out),
        lambda: pair.run(_sub(cfg, run_name="pair", **stage_changes(cfg, "pair"))),
    )


def _bind_all(cfg: DictConfig, tuples: str, suffix: str = "") -> dict[str, str]:
    """Bind every space of the variant into route.bound_dir; returns {space: weights digest}."""
    bound = {}
    seed = cfg.seed if cfg.bind.seed is None else cfg.bind.seed
    for name, space in cfg.variant.spaces.items():
        directory = Path(cfg.route.bound_dir) / name
        sub = _sub(cfg, space=space, seed=seed, run_name=f"bind-{name}{suffix}",
                   **stage_changes(cfg, "bind"))  # fmt: skip
        sub.bind.export_dir = str(directory)
        bound[name] = _step(
            sub,
            f"bind {name}{suffix}",
            directory,
            _digest(sub, bind.DEPENDS, tuples=tuples),
            lambda d=directory: file_sha256(d / BOUND_WEIGHTS),
            lambda d=directory: load_bound_space(d),
            lambda s=sub: bind.run(s),
        )
    return bound


def _route(cfg: DictConfig, name: str, overrides: dict, inputs: dict) -> Path:
    """Train (unless fresh) the route run `name`; returns its export directory."""
    export = Path(cfg.evaluate.omni_dir) / cfg.variant.name / name
    changes = {"route.export_dir": str(export), "run_name": f"route-{cfg.variant.name}-{name}"}
    changes |= stage_changes(cfg, "route")
    sub = _sub(cfg, **changes, **overrides)
    _step(
        cfg,
        f"route {name}",
        export,
        _digest(sub, route.DEPENDS, **inputs),
        lambda: file_sha256(export / OMNI_WEIGHTS),
        lambda: load_omni(export),
        lambda: route.run(sub),
    )
    return export


def run(cfg: DictConfig) -> float | None:
    """Run every stage for `cfg.variant`; returns the routed model's mean R@1 on the test sets."""
    _extract(cfg)
    tuples = pair_step(cfg)
    # The route reads the spaces' own configs too (text specialty, dims): they are inputs.
    spaces = to_plain(cfg.variant.spaces)
    inputs = dict(tuples=tuples, bound=_bind_all(cfg, tuples), spaces=spaces)
    exports = {
        name: _route(cfg, name, to_plain(overrides), inputs)
        for name, overrides in cfg.pipeline.routes.items()
    }
    if cfg.pipeline.oracle and cfg.data.kind == "synthetic" and tuples != "oracle":
        # The upper bound: the same method on the world's ground-truth tuples.
        bound_dir = str(cfg.route.bound_dir).rstrip("/") + "_oracle"
        changes = {"bind.pairs": "oracle", "route.pairs": "oracle", "route.bound_dir": bound_dir}
        oracle = _sub(cfg, **changes)
        bound = _bind_all(oracle, "oracle", suffix="-oracle")
        exports["routed_oracle"] = _route(
            oracle, "routed_oracle", {}, dict(tuples="oracle", bound=bound, spaces=spaces)
        )
    # Each space native (its own cache) and projected (bound): the difference is the binding loss.
    methods = [f"{kind}:{s}" for s in cfg.variant.spaces for kind in ("raw", "bound")]
    for name, directory in exports.items():
        where = directory.relative_to(cfg.evaluate.omni_dir)
        if name == "routed":
            methods.append(f"average=omni:{where}:average")
        methods.append(f"{name}=omni:{where}")
    changes = {"evaluate.methods": methods, "evaluate.output_dir": cfg.run_dir}
    evaluate.run(_sub(cfg, **changes, **stage_changes(cfg, "evaluate")))
    # The last screen: evaluate's summary and results.md, then the routers' weight plots.
    runs = [Path(_sub(cfg, run_name=f"route-{cfg.variant.name}-{n}").run_dir) for n in exports]
    print("\n".join(f"router weights: {r / 'router_weights.png'}" for r in runs))
    results = json.loads((Path(cfg.run_dir) / "results.json").read_text())
    best = results["methods"].get("routed") or next(iter(results["methods"].values()))
    return best["summary"]["mean_R@1"]
