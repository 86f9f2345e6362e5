"""Benchmark manifests: what the evaluate stage scores, parsed and checked before anything runs.

A manifest is JSON or YAML (the world writes `benchmarks_{val,test}.json` at its root):
    {"name": "world-test",              # optional; the title of results.md
     "root": ".",                       # the cache root (datamodules/cache.py), relative to here
     "retrieval": [                     # one entry per paired set; both directions are scored
       {"name": "coco", "dataset": "coco_5k", "modalities": ["image", "text"],
        "items": {"text": "item"}}],    # optional per modality: which item each row shows, as
                                        # the name of an extra of its cache, or a mapping file
                                        # (.npy or .json list, relative to the manifest) with one
                                        # item id per row. Default: the extra `item`, else
                                        # `items`, else the rows' own `ids`. Several captions of
                                        # one item (COCO, MSR-VTT) share its id.
     "zeroshot": [
       {"name": "esc50", "dataset": "esc50", "modality": "audio",
        "multilabel": false,            # true: labels are multi-hot (n, classes), mAP is scored
        "labels": "labels",             # optional: the items' label extra
        "classes": ["dog", ...],        # optional: the class names (`classnames` is an alias)
        "templates": ["the sound of a {}."],  # optional: default evaluate.templates.<modality>
        "prompts": "esc50_prompts"}]}   # optional: dataset of the class prompts' text cache
`dataset` may also map modality -> dataset where the two sides of a pair live in different ones.

Prompts (zero-shot): a manifest entry naming `classes` has its class x template prompts embedded
by the extract stage into the text cache of dataset `<name>_prompts`, rows class-major with a
`label` extra (`zeroshot_prompts`). An entry without `classes` (the world's) reads prompts that
its data already holds (dataset `prompts`, default `dataset`, with a `label` or `labels` extra).

Video: a `video` item is embedded by a space's image encoder (frames averaged, re-normalised), so
its rows are cached as the `image` modality of their dataset and an omni model routes them through
its image router and image groups. Results still name it `video` (`text_to_video/R@1`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from encoders.modalities import MODALITIES

# Benchmark modalities: the cached ones plus those embedded as another (video through images).
CACHED_AS: dict[str, str] = {"video": "image"}
BENCH_MODALITIES: tuple[str, ...] = (*MODALITIES, *CACHED_AS)
RETRIEVAL_KEYS = {"name", "dataset", "modalities", "items"}
ZEROSHOT_KEYS = {"name", "dataset", "modality", "multilabel", "prompts", "labels", "classes",
                 "classnames", "templates"}  # fmt: skip
MAPPING_SUFFIXES = (".npy", ".json")


def cached_modality(modality: str) -> str:
    """The cache modality that holds a benchmark modality's rows (`video` -> `image`)."""
    return CACHED_AS.get(modality, modality)


def covered(modalities: tuple[str, ...] | list[str]) -> set[str]:
    """The benchmark modalities a method embedding these cache modalities can score."""
    return {m for m in BENCH_MODALITIES if cached_modality(m) in modalities}


def check_bench_modality(name: object, where: str) -> str:
    """Return `name` if it is a benchmark modality, else raise naming the choices."""
    if name not in BENCH_MODALITIES:
        raise ValueError(
            f"unknown modality {name!r} in {where}; expected one of {list(BENCH_MODALITIES)}"
        )
    return str(name)


@dataclass
class Retrieval:
    """A paired retrieval set: `datasets[m]` holds modality m's rows; item ids say which match.

    `items[m]` is an extra name or the path of a mapping file (see the module docstring).
    """

    name: str
    modalities: tuple[str, str]
    datasets: dict[str, str]
    items: dict[str, str] = field(default_factory=dict)


@dataclass
class ZeroShot:
    """Zero-shot classification of `modality` items against class prompts in a text cache.

    `templates` is set (resolved from the config when the entry gives none) iff `classes` is.
    """

    name: str
    dataset: str
    modality: str
    multilabel: bool = False
    prompts: str = ""
    labels: str = "labels"
    classes: list[str] | None = None
    templates: list[str] | None = None


@dataclass
class Benchmarks:
    """A parsed manifest: its cache root and its benchmarks."""

    path: Path
    name: str
    root: Path
    retrieval: list[Retrieval]
    zeroshot: list[ZeroShot]


def zeroshot_prompts(
    classes: list[str], templates: list[str]
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Prompt texts class-major (class 0's templates first), with class and template index (n,)."""
    if not classes or not templates:
        raise ValueError("zero-shot prompts need at least one class name and one template")
    bad = [t for t in templates if "{}" not in t]
    if bad:
        raise ValueError(f"zero-shot templates need a '{{}}' for the class name: {bad}")
    texts = [t.format(c) for c in classes for t in templates]
    labels = np.repeat(np.arange(len(classes), dtype=np.int64), len(templates))
    template = np.tile(np.arange(len(templates), dtype=np.int64), len(classes))
    return texts, labels, template


def _read(path: Path) -> Mapping:
    if not path.is_file():
        raise FileNotFoundError(f"benchmark manifest {path} does not exist")
    if path.suffix in (".yaml", ".yml"):
        spec = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    else:
        try:
            spec = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(spec, Mapping):
        raise ValueError(f"{path}: a manifest is a mapping with `retrieval` and `zeroshot` lists")
    unknown = sorted(set(spec) - {"name", "root", "retrieval", "zeroshot"})
    if unknown:
        raise ValueError(
            f"{path}: unknown keys {unknown}; allowed: name, root, retrieval, zeroshot"
        )
    return spec


def _entries(spec: Mapping, key: str, allowed: set[str], path: Path) -> list[dict]:
    entries = spec.get(key) or []
    if not isinstance(entries, list):
        raise ValueError(
            f"{path}: `{key}` must be a list of benchmarks, got {type(entries).__name__}"
        )
    out = []
    for i, entry in enumerate(entries):
        where = f"{path}: {key}[{i}]"
        if not isinstance(entry, Mapping):
            raise ValueError(f"{where} must be a mapping, got {entry!r}")
        unknown = sorted(set(entry) - allowed)
        if unknown:
            raise ValueError(f"{where} has unknown keys {unknown}; allowed: {sorted(allowed)}")
        for required in ("name", "dataset"):
            if required not in entry:
                raise ValueError(f"{where} lacks `{required}`")
        out.append(dict(entry))
    return out


def _retrieval(e: dict, where: str, path: Path) -> Retrieval:
    mods = e.get("modalities")
    if not isinstance(mods, list) or len(mods) != 2 or mods[0] == mods[1]:
        raise ValueError(f"{where}: `modalities` must name two different modalities, got {mods!r}")
    mods = tuple(check_bench_modality(m, where) for m in mods)
    ds = e["dataset"]
    datasets = dict(ds) if isinstance(ds, Mapping) else {m: ds for m in mods}
    if set(datasets) != set(mods):
        raise ValueError(f"{where}: `dataset` maps {sorted(datasets)}, expected {sorted(mods)}")
    items = {m: str(v) for m, v in dict(e.get("items") or {}).items()}
    if set(items) - set(mods):
        raise ValueError(f"{where}: `items` names {sorted(items)}, not modalities of {list(mods)}")
    for m, value in items.items():
        if value.endswith(MAPPING_SUFFIXES):  # a mapping file, relative to the manifest
            file = (path.parent / value).resolve()
            if not file.is_file():
                raise FileNotFoundError(f"{where}: `items.{m}` mapping file {file} does not exist")
            items[m] = str(file)
    return Retrieval(e["name"], mods, datasets, items)


def _zeroshot(e: dict, where: str, templates: Mapping | None) -> ZeroShot:
    modality = check_bench_modality(e.get("modality", ""), where)
    if modality == "text":
        raise ValueError(f"{where}: zero-shot classifies point, audio, image or video items")
    if "classes" in e and "classnames" in e:
        raise ValueError(f"{where}: give `classes` or its alias `classnames`, not both")
    classes = e.get("classes", e.get("classnames"))
    chosen = e.get("templates")
    if classes is not None:
        if (
            not isinstance(classes, list)
            or not classes
            or not all(isinstance(c, str) for c in classes)
        ):
            raise ValueError(
                f"{where}: `classes` must be a non-empty list of names, got {classes!r}"
            )
        if chosen is None:  # the config's default templates for this modality
            chosen = (templates or {}).get(modality)
        if not chosen:
            raise ValueError(
                f"{where} names classes but no templates: give `templates` in the entry or "
                f"`evaluate.templates.{modality}` in the config"
            )
        chosen = [str(t) for t in chosen]
        zeroshot_prompts(classes, chosen)  # checks every template has a '{}'
    elif chosen is not None:
        raise ValueError(f"{where}: `templates` needs `classes` (the names to fill them with)")
    default_prompts = f"{e['name']}_prompts" if classes is not None else e["dataset"]
    return ZeroShot(
        e["name"], e["dataset"], modality, bool(e.get("multilabel", False)),
        e.get("prompts") or default_prompts, e.get("labels", "labels"), classes, chosen,
    )  # fmt: skip


def load_benchmarks(
    path: str | Path, templates: Mapping[str, list[str]] | None = None
) -> Benchmarks:
    """Parse and check a manifest (.json, .yaml or .yml); see the module docstring.

    templates: {modality: [template, ...]} (`evaluate.templates`), the default templates of
    zero-shot entries that name classes without templates.
    """
    path = Path(path)
    spec = _read(path)
    retrieval = [
        _retrieval(e, f"{path}: retrieval[{i}] ({e['name']})", path)
        for i, e in enumerate(_entries(spec, "retrieval", RETRIEVAL_KEYS, path))
    ]
    zeroshot = [
        _zeroshot(e, f"{path}: zeroshot[{i}] ({e['name']})", templates)
        for i, e in enumerate(_entries(spec, "zeroshot", ZEROSHOT_KEYS, path))
    ]
    names = [b.name for b in retrieval] + [b.name for b in zeroshot]
    if not names:
        raise ValueError(
            f"{path}: the manifest is empty (no `retrieval` and no `zeroshot` entries)"
        )
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"{path}: benchmark names must be unique; repeated: {dupes}")
    root = (path.parent / spec.get("root", ".")).resolve()
    return Benchmarks(path, str(spec.get("name", path.stem)), root, retrieval, zeroshot)


def prompt_sets(benchmarks: Benchmarks) -> dict[str, tuple[list[str], np.ndarray]]:
    """{prompt dataset: (texts, label (n,) int64)} that the extract stage embeds for each space.

    Only entries naming `classes` appear; write each as the text cache of that dataset with the
    `label` extra, and `prompts=texts` in its manifest (CacheWriter.close) so that evaluate can
    tell a stale prompt cache from a current one.
    """
    out: dict[str, tuple[list[str], np.ndarray]] = {}
    for bench in benchmarks.zeroshot:
        if bench.classes is None or bench.templates is None:
            continue
        texts, label, _ = zeroshot_prompts(bench.classes, bench.templates)
        if bench.prompts in out and out[bench.prompts][0] != texts:
            raise ValueError(f"{benchmarks.path}: zero-shot entries share the prompt dataset "
                             f"{bench.prompts!r} with different classes or templates")  # fmt: skip
        out[bench.prompts] = (texts, label)
    return out


def manifest_path(which: str, root: Path) -> Path:
    """`evaluate.benchmarks`: val or test (the world's manifests under the data root) or a path."""
    if str(which) in ("val", "test"):
        return Path(root) / f"benchmarks_{which}.json"
    return Path(str(which))


def _by_k(key: str) -> tuple[str, int]:
    """Sort key: R@5 before R@10, top1 before top5."""
    head, _, last = key.rpartition("/")
    digits = "".join(c for c in last if c.isdigit())
    return head + "/" + last.rstrip("0123456789@"), int(digits or 0)


def columns(benchmarks: Benchmarks, methods: Mapping[str, Mapping]) -> tuple[list, list]:
    """Retrieval and zero-shot result keys in manifest order, as produced by any method."""
    seen = {k for m in methods.values() for k in m["retrieval"]}
    retrieval = []
    for bench in benchmarks.retrieval:
        for q, t in (bench.modalities, bench.modalities[::-1]):
            for key in sorted((k for k in seen if k.startswith(f"{q}_to_{t}/")), key=_by_k):
                if key.count("/") == 1 or f"/{bench.name}/" in key:
                    retrieval.append(key)
    retrieval = list(dict.fromkeys(retrieval))
    seen = {k for m in methods.values() for k in m["zeroshot"]}
    zeroshot = []
    for bench in benchmarks.zeroshot:
        prefix = f"{bench.modality}/{bench.name}/"
        zeroshot += sorted((k for k in seen if k.startswith(prefix)), key=_by_k)
    return retrieval, zeroshot
