"""What the extract stage embeds: one job per (dataset, modality) cache, plus zero-shot prompts.

Every item list is read (and checked) here, before anything is embedded, so a bad data config
(a missing folder, repeated ids, captions without provenance, a manifest naming classes without
templates) stops the run without touching a cache already extracted.

Zero-shot prompts: `data.benchmarks` lists benchmark manifests
(lightning_modules/evaluation/benchmarks.py).
Each zero-shot entry naming `classes` has its class x template prompts embedded by every space
with a text side into dataset `<name>_prompts` under `data.root`, rows class-major with a `label`
extra (class index) and a `template` extra. A copy of the manifest with `root: "."` is written
beside the caches (`<data.root>/<manifest file name>`): point `evaluate.benchmarks` at it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from datamodules.artifacts import atomic_write_json, fingerprint
from datamodules.cache import cache_dir
from datamodules.items import Items, RawDataError, link_captions, list_items
from datamodules.jobs import ExtractJob
from encoders import encoder_class
from encoders.precomputed import dump_identity
from encoders.video import audio_track_weight
from lightning_modules.evaluation.benchmarks import load_benchmarks, zeroshot_prompts
from lightning_modules.runtime.config import to_plain


def _portable(encoder_cfg: Mapping, data: DictConfig) -> Mapping:
    """The encoder config with a path under `data.source` made relative to it, so that moving
    the raw folder (dumps included) keeps the caches' fingerprints."""
    path, source = encoder_cfg.get("path"), data.get("source")
    if path is None or source is None or not Path(path).is_relative_to(source):
        return encoder_cfg
    return {**encoder_cfg, "path": f"<data.source>/{Path(path).relative_to(source).as_posix()}"}


def _dump(encoder_cfg: Mapping, dataset: str, modalities: list[str]) -> dict:
    """A precomputed space's dump files (name, size, mtime): an updated dump re-extracts."""
    if not encoder_cfg or not encoder_class(encoder_cfg).precomputed:
        return {}
    return {"dump": dump_identity(encoder_cfg["path"], dataset, modalities)}


def _job(cfg: DictConfig, dataset: str, modality: str, items: Items, spec: Mapping) -> ExtractJob:
    data, space, ex = cfg.data, cfg.space, cfg.extract
    encoder_cfg, dim = to_plain(space.encoder), int(space.dims[modality])
    video = dict(frames=spec.get("frames"), stride=spec.get("stride"))
    audio = audio_track_weight(space.name, space) if video["frames"] else None
    load = to_plain(data.get("load", {}))
    # The audio track enters the fingerprint only when on: caches extracted without it keep theirs.
    joined = {} if audio is None else {"audio_track": audio}
    config = fingerprint(dict(space=space.name, dim=dim, encoder=_portable(encoder_cfg, data),
                              modality=modality, dataset=dataset, load=load, **video, **joined,
                              shard_size=ex.shard_size, dtype=ex.dtype))  # fmt: skip
    dumps = _dump(encoder_cfg, dataset, [modality, *(["audio"] if joined else [])])
    fp = fingerprint(dict(config=config, items=items.digest(), **dumps))
    return ExtractJob(
        dataset, modality, items, cache_dir(data.root, dataset, space.name, modality),
        space.name, dim, fp, int(ex.shard_size), ex.dtype, video["frames"], video["stride"],
        audio, meta=dict(source=f"extract: {data.name}", encoder=encoder_cfg, **joined),
        config=config,
    )  # fmt: skip


def manifests(cfg: DictConfig) -> list:
    """The benchmark manifests `data.benchmarks` names, parsed and checked (lightning_modules/
    benchmarks.py); zero-shot entries without templates take `evaluate.templates`."""
    paths = cfg.data.get("benchmarks") or []
    paths = [paths] if isinstance(paths, str) else list(paths)
    templates = to_plain(cfg.get("evaluate", {}).get("templates") or {})
    return [load_benchmarks(Path(str(p)), templates) for p in paths]


def prompt_items(bench, where: str, listed: Mapping[tuple[str, str], Items]) -> Items:
    """The class x template prompts of a zero-shot entry, checked against its items' classes."""
    items = listed.get((bench.dataset, "image" if bench.modality == "video" else bench.modality))
    if items is not None and items.classes is not None and items.classes != bench.classes:
        raise RawDataError(
            f"{where}: zero-shot {bench.name!r} names classes {bench.classes[:5]}..., but the "
            f"items of {bench.dataset} are labelled {items.classes[:5]}... (label order is the "
            "sorted class names; list them in that order)"
        )
    texts, labels, template = zeroshot_prompts(bench.classes, bench.templates)
    keys = [f"{bench.classes[c]}/{t}" for c, t in zip(labels, template, strict=True)]
    return Items("text", keys, texts, {"label": labels, "template": template})


def plan(cfg: DictConfig) -> list[ExtractJob]:
    """One job per (dataset, modality) of the data config that the space embeds, and one per
    zero-shot prompt set of `data.benchmarks` when the space embeds text."""
    data, space, ex = cfg.data, cfg.space, cfg.extract
    dims = dict(space.dims)
    audio_track_weight(space.name, space)  # a space without audio refuses video.audio_track
    datasets = to_plain(data.datasets)
    chosen = list(ex.datasets) if ex.get("datasets") else list(datasets)
    unknown = sorted(set(chosen) - set(datasets))
    if unknown:
        raise ValueError(
            f"extract.datasets names {unknown}; data {data.name!r} has {sorted(datasets)}"
        )
    wanted = set(ex.modalities) if ex.get("modalities") else set(dims)
    listed: dict[tuple[str, str], Items] = {}
    jobs = []
    for dataset in chosen:
        specs = datasets[dataset] or {}
        for modality, spec in specs.items():
            where = f"data.datasets.{dataset}.{modality}"
            listed[(dataset, modality)] = list_items(modality, spec, where)
        for modality, spec in specs.items():
            items = listed[(dataset, modality)]
            if spec.get("items"):  # a caption list: each caption's row in its items' list
                target = str(spec["items"])
                if target not in specs:
                    raise RawDataError(f"data.datasets.{dataset}.{modality}: `items: {target}` "
                                       f"names no modality of dataset {dataset}")  # fmt: skip
                link_captions(items, listed[(dataset, target)], str(spec["source"]),
                              f"data.datasets.{dataset}.{modality}")  # fmt: skip
            if modality in dims and modality in wanted:
                jobs.append(_job(cfg, dataset, modality, items, spec))
    benches = manifests(cfg)
    if "text" in dims and "text" in wanted:
        for benchmarks in benches:
            for bench in benchmarks.zeroshot:
                name = f"{bench.name}_prompts"
                if bench.classes is None or (ex.get("datasets") and bench.dataset not in chosen
                                             and name not in chosen):  # fmt: skip
                    continue
                items = prompt_items(bench, str(benchmarks.path), listed)
                jobs.append(_job(cfg, bench.prompts or name, "text", items, {}))
    if not jobs:
        raise ValueError(
            f"nothing to extract: space {space.name!r} embeds {sorted(dims)}, and data "
            f"{data.name!r} has no such modality in {chosen}"
        )
    return jobs


def write_manifests(cfg: DictConfig) -> list[Path]:
    """Copy each manifest of `data.benchmarks` beside the caches (root "."), templates resolved."""
    out = []
    for benchmarks in manifests(cfg):
        src = benchmarks.path
        if src.suffix == ".json":
            spec = json.loads(src.read_text())
        else:
            spec = OmegaConf.to_container(OmegaConf.load(src), resolve=True)
        spec["root"] = "."
        for entry, bench in zip(spec.get("zeroshot") or [], benchmarks.zeroshot, strict=True):
            if bench.classes is not None:
                entry["templates"] = list(bench.templates)
        path = Path(str(cfg.data.root)) / f"{src.stem}.json"
        atomic_write_json(path, spec)
        out.append(path)
    return out
