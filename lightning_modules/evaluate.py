"""Evaluate stage: the paper's Tables 2 and 3 for any method on any benchmark manifest.

`python train.py stage=evaluate evaluate.methods=[raw:clap,bound:clap,omni:base/routed]`

A *method* turns cached rows into L2-normalised embeddings (n, d) of one shared space:
    raw:<space>                  the space's own cache; only the pairs the space covers
    bound:<space or dir>         a bound space (stage=bind export) applied to the space's cache
    omni:<dir>[:routed|average]  an omni model (stage=route export); dirs are relative to
                                 evaluate.bound_dir / evaluate.omni_dir unless absolute
Results name each method by its spec (`methods["raw:clap"]`), or by a name given as
`<name>=<spec>` (`routed=omni:base/routed` is `methods["routed"]`).

Benchmark manifest (JSON or YAML; the world writes `benchmarks_{val,test}.json` at its root):
    {"name": "world-test",              # optional; the title of results.md
     "root": ".",                       # the cache root (datamodules/cache.py), relative to here
     "retrieval": [                     # one entry per paired set; both directions are scored
       {"name": "coco", "dataset": "coco_5k", "modalities": ["image", "text"],
        "items": {"text": "items"}}],   # optional per modality: the extra holding each row's item
                                        # id (default `items` where the cache has it, else `ids`).
                                        # Several captions per item: their text rows share an item.
     "zeroshot": [
       {"name": "esc50", "dataset": "esc50", "modality": "audio",
        "multilabel": false,            # true: labels are multi-hot (n, classes) and mAP is scored
        "prompts": "esc50",             # optional: dataset of the text cache of class prompts,
                                        # whose `labels` extra is the class index (default: dataset)
        "labels": "labels",             # optional: the items' label extra
        "classnames": ["dog", ...],     # optional: checked against the prompt cache's classes
        "templates": ["the sound of a {}."]}]}  # optional: overrides evaluate.templates.<modality>
`dataset` may also map modality -> dataset where the two sides of a pair live in different ones.
Real benchmarks plug in by pointing `evaluate.benchmarks` at such a file. The extract stage embeds
`zeroshot_prompts(classnames, templates)` into the prompt cache; the world writes its own prompts.

Metrics (lightning_modules/metrics.py) follow CLIP_benchmark: R@K counts a query as a hit when any
positive is in the top K (text->X: each caption is a query; X->text: one query per item, a hit is
any of its captions); zero-shot class embeddings are the re-normalised mean of the L2-normalised
template embeddings. Ties are broken deterministically: among equal scores the lower gallery row
(retrieval) or class index (zero-shot) ranks first; AP groups equal scores into one threshold.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from datamodules.cache import CacheError, EmbeddingCache, atomic_write, atomic_write_json, cache_dir
from encoders.modalities import MODALITIES, check_modality
from lightning_modules.common import ensure_data, make_logger, space_configs
from lightning_modules.metrics import MeanAveragePrecision, RetrievalRecall, ZeroShotAccuracy

log = logging.getLogger(__name__)
RETRIEVAL_KEYS = {"name", "dataset", "modalities", "items"}
ZEROSHOT_KEYS = {"name", "dataset", "modality", "multilabel", "prompts", "labels", "classnames",
                 "templates"}  # fmt: skip
ARROW = "\u2192"
TIES = (
    "Ties: among equal scores the lower gallery row (retrieval) or class index (zero-shot) "
    "ranks first; AP treats equal scores as one threshold."
)


# ---------------------------------------------------------------------------- benchmarks


@dataclass
class Retrieval:
    """A paired retrieval set: `datasets[m]` holds modality m's rows; item ids say which match."""

    name: str
    modalities: tuple[str, str]
    datasets: dict[str, str]
    items: dict[str, str] = field(default_factory=dict)


@dataclass
class ZeroShot:
    """Zero-shot classification of `modality` items against class prompts in a text cache."""

    name: str
    dataset: str
    modality: str
    multilabel: bool = False
    prompts: str = ""
    labels: str = "labels"
    classnames: list[str] | None = None
    templates: list[str] | None = None


@dataclass
class Benchmarks:
    """A parsed manifest: its cache root and its benchmarks."""

    path: Path
    name: str
    root: Path
    retrieval: list[Retrieval]
    zeroshot: list[ZeroShot]


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


def load_benchmarks(path: str | Path) -> Benchmarks:
    """Parse and check a benchmark manifest (.json, .yaml or .yml); see the module docstring."""
    path = Path(path)
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
    retrieval = []
    for i, e in enumerate(_entries(spec, "retrieval", RETRIEVAL_KEYS, path)):
        mods = e.get("modalities")
        where = f"{path}: retrieval[{i}] ({e['name']})"
        if not isinstance(mods, list) or len(mods) != 2 or mods[0] == mods[1]:
            raise ValueError(
                f"{where}: `modalities` must name two different modalities, got {mods!r}"
            )
        mods = tuple(check_modality(m, where) for m in mods)
        ds = e["dataset"]
        datasets = dict(ds) if isinstance(ds, Mapping) else {m: ds for m in mods}
        if set(datasets) != set(mods):
            raise ValueError(f"{where}: `dataset` maps {sorted(datasets)}, expected {sorted(mods)}")
        items = dict(e.get("items") or {})
        if set(items) - set(mods):
            raise ValueError(
                f"{where}: `items` names {sorted(items)}, not modalities of {list(mods)}"
            )
        retrieval.append(Retrieval(e["name"], mods, datasets, items))
    zeroshot = []
    for i, e in enumerate(_entries(spec, "zeroshot", ZEROSHOT_KEYS, path)):
        where = f"{path}: zeroshot[{i}] ({e['name']})"
        modality = check_modality(e.get("modality", ""), where)
        if modality == "text":
            raise ValueError(f"{where}: zero-shot classifies point, audio or image items, not text")
        zeroshot.append(ZeroShot(
            e["name"], e["dataset"], modality, bool(e.get("multilabel", False)),
            e.get("prompts") or e["dataset"], e.get("labels", "labels"), e.get("classnames"),
            e.get("templates"),
        ))  # fmt: skip
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


def zeroshot_prompts(
    classnames: list[str], templates: list[str]
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """The prompt texts an extract stage embeds, with labels (class index) and template index."""
    if not classnames or not templates:
        raise ValueError("zero-shot prompts need at least one class name and one template")
    bad = [t for t in templates if "{}" not in t]
    if bad:
        raise ValueError(f"zero-shot templates need a '{{}}' for the class name: {bad}")
    texts = [t.format(c) for c in classnames for t in templates]
    labels = np.repeat(np.arange(len(classnames)), len(templates))
    template = np.tile(np.arange(len(templates)), len(classnames))
    return texts, labels, template


def manifest_path(cfg: DictConfig, root: Path) -> Path:
    """`evaluate.benchmarks`: val or test (the world's manifests under the data root) or a path."""
    which = str(cfg.evaluate.benchmarks)
    if which in ("val", "test"):
        return root / f"benchmarks_{which}.json"
    return Path(which)


# ---------------------------------------------------------------------------- methods


class Method(Protocol):
    """Anything that embeds cached rows into one shared space."""

    name: str
    spaces: list[str]  # the spaces whose caches it reads (the world writes them)
    modalities: tuple[str, ...]

    def embed(self, root: Path, dataset: str, modality: str) -> torch.Tensor:
        """L2-normalised embeddings (n, d) of every row of (dataset, modality), in row order."""
        ...


def _open(root: Path, dataset: str, space: str, modality: str, dim: int | None = None):
    return EmbeddingCache(cache_dir(root, dataset, space, modality), expect_dim=dim)


class RawSpace:
    """A space's own embeddings (native, not projected)."""

    def __init__(self, name: str, space: str, cfg: DictConfig) -> None:
        self.name, self.spaces = name, [space]
        self.dims = dict(space_configs([space])[space].dims)
        self.modalities = tuple(m for m in MODALITIES if m in self.dims)

    def embed(self, root: Path, dataset: str, modality: str) -> torch.Tensor:
        cache = _open(root, dataset, self.spaces[0], modality, self.dims[modality])
        return F.normalize(torch.from_numpy(cache.load()), dim=-1)


class BoundSpace:
    """A bound space's projectors applied to its source space's cache (projected, anchor dim)."""

    def __init__(self, name: str, where: str, cfg: DictConfig) -> None:
        from lightning_modules.bind import load_bound_space

        directory = Path(cfg.evaluate.bound_dir) / where  # an absolute `where` replaces bound_dir
        try:
            self.mixture, meta = load_bound_space(directory)
        except CacheError as e:
            raise CacheError(f"method {name!r}: {e}; bind it with: python train.py stage=bind "
                             f"space={Path(where).name}") from e  # fmt: skip
        self.name, self.spaces, self.dims = name, [meta["space"]], dict(meta["dims"])
        self.modalities = tuple(m for m in MODALITIES if m in self.dims)

    @torch.no_grad()
    def embed(self, root: Path, dataset: str, modality: str) -> torch.Tensor:
        cache = _open(root, dataset, self.spaces[0], modality, self.dims[modality])
        chunks = (torch.from_numpy(x) for _, x in cache.iter_chunks(8192))
        parts = [F.normalize(self.mixture(x), dim=-1) for x in chunks]
        return (
            torch.cat(parts)
            if parts
            else torch.zeros(0, self.mixture.experts[0].mlp[3].out_features)
        )


class OmniExport:
    """The route stage's omni model, with its routers or with uniform group weights (`average`)."""

    def __init__(self, name: str, spec: str, cfg: DictConfig) -> None:
        from lightning_modules.omni import OmniModel, modalities_of

        where, _, weighting = spec.partition(":")
        self.weighting = weighting or "routed"
        if self.weighting not in ("routed", "average"):
            raise ValueError(
                f"method {name!r}: weighting {self.weighting!r} is not routed or average"
            )
        directory = Path(cfg.evaluate.omni_dir) / where
        try:
            self.model = OmniModel.load(directory)
        except CacheError as e:
            raise CacheError(f"method {name!r}: {e}; train it with stage=route") from e
        meta = self.model.meta
        self.name, self.modalities = name, tuple(modalities_of(meta))
        self.spaces = list(
            dict.fromkeys(s for m in self.modalities for s in self.model.needed_spaces(m))
        )

    def embed(self, root: Path, dataset: str, modality: str) -> torch.Tensor:
        return self.model.embed(root, dataset, modality, weighting=self.weighting)


# One line per kind of method: spec `<kind>:<argument>`.
METHODS: dict[str, Callable[[str, str, DictConfig], Method]] = {
    "raw": RawSpace,
    "bound": BoundSpace,
    "omni": OmniExport,
}


def make_method(spec: str, cfg: DictConfig) -> Method:
    """The method of `[<name>=]<kind>:<argument>`: `raw:clap`, `avg=omni:base/routed:average`."""
    spec = str(spec)
    name, sep, rest = spec.partition("=")
    if not sep or ":" in name:  # no name given: the spec names itself
        name, rest = spec, spec
    kind, _, argument = rest.partition(":")
    if kind not in METHODS or not argument or not name:
        raise ValueError(
            f"evaluate.methods: {spec!r} is not [<name>=]<kind>:<argument> with kind in "
            f"{list(METHODS)}"
        )
    return METHODS[kind](name, argument, cfg)


# ---------------------------------------------------------------------------- scoring


class _Rows:
    """Per-method memo of embeddings and of the cache whose extras (ids, labels) describe them."""

    def __init__(self, method: Method, root: Path, device: torch.device) -> None:
        self.method, self.root, self.device = method, root, device
        self.memo: dict[tuple[str, str], torch.Tensor] = {}

    def cache(self, dataset: str, modality: str) -> EmbeddingCache:
        """The first cache of (dataset, modality) among the method's spaces."""
        for space in self.method.spaces:
            if cache_dir(self.root, dataset, space, modality).is_dir():
                return _open(self.root, dataset, space, modality)
        dirs = [str(cache_dir(self.root, dataset, s, modality)) for s in self.method.spaces]
        raise CacheError(
            f"method {self.method.name!r}: no cache of {dataset}/{modality}; looked in {dirs}"
        )

    def embed(self, dataset: str, modality: str, benchmark: str) -> torch.Tensor:
        key = (dataset, modality)
        if key not in self.memo:
            count = self.cache(dataset, modality).count
            if count == 0:
                raise ValueError(f"benchmark {benchmark!r}: {dataset}/{modality} is empty (0 rows)")
            emb = self.method.embed(self.root, dataset, modality)
            if emb.ndim != 2 or len(emb) != count:
                raise CacheError(f"method {self.method.name!r} embedded {dataset}/{modality} as "
                                 f"{tuple(emb.shape)}, but its cache has {count} rows")  # fmt: skip
            # Methods normalise already; once more costs little and keeps every score a cosine.
            self.memo[key] = F.normalize(emb.float(), dim=-1).to(self.device)
        return self.memo[key]


def _items(rows: _Rows, bench: Retrieval, modality: str) -> tuple[torch.Tensor, EmbeddingCache]:
    cache = rows.cache(bench.datasets[modality], modality)
    key = bench.items.get(modality) or ("items" if cache.has("items") else "ids")
    items = cache.extra(key)
    if items.ndim != 1 or not np.issubdtype(items.dtype, np.integer):
        raise CacheError(f"{cache.directory}: `{key}` must be integer item ids (n,), got "
                         f"{items.dtype} {items.shape}")  # fmt: skip
    return torch.from_numpy(items.astype(np.int64)), cache


def score_retrieval(
    rows: _Rows, bench: Retrieval, ks: tuple[int, ...], chunk: int
) -> dict[str, float]:
    """R@K both ways on one paired set: {'<query>_to_<target>/R@K': fraction}."""
    a, b = bench.modalities
    emb = {m: rows.embed(bench.datasets[m], m, bench.name) for m in (a, b)}
    items, caches = {}, {}
    for m in (a, b):
        items[m], caches[m] = _items(rows, bench, m)
    for m, other in ((a, b), (b, a)):
        orphan = ~torch.isin(items[m], items[other])
        if orphan.any():
            raise CacheError(
                f"benchmark {bench.name!r}: {int(orphan.sum())} of {len(items[m])} {m} rows in "
                f"{caches[m].directory} have item ids with no {other} row in "
                f"{caches[other].directory} (e.g. {items[m][orphan][:5].tolist()}): the "
                "caption/item mapping does not match its cache"
            )
    out = {}
    for q, t in ((a, b), (b, a)):
        metric = RetrievalRecall(ks, chunk=chunk).to(rows.device)
        qi, ti = items[q].to(rows.device), items[t].to(rows.device)
        query_ids = torch.arange(len(qi), device=rows.device)
        gallery_ids = torch.arange(len(ti), device=rows.device)
        metric.update(emb[q], query_ids, qi, emb[t], ti, gallery_ids=gallery_ids)
        out |= {f"{q}_to_{t}/{k}": float(v) for k, v in metric.compute().items()}
    return out


def class_embeddings(prompts: torch.Tensor, labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    """(classes, d): per class, the mean of its L2-normalised prompt embeddings, re-normalised."""
    sums = torch.zeros(n_classes, prompts.shape[1], device=prompts.device)
    sums.index_add_(0, labels.to(prompts.device), F.normalize(prompts.float(), dim=-1))
    return F.normalize(sums, dim=-1)


def score_zeroshot(
    rows: _Rows, bench: ZeroShot, topk: tuple[int, ...], chunk: int
) -> dict[str, float]:
    """Top-K accuracy, or mAP for a multi-label set: {'<modality>/<name>/top1': fraction, ...}."""
    prompt_cache = rows.cache(bench.prompts, "text")
    prompt_labels = prompt_cache.extra("labels")
    if prompt_labels.ndim != 1 or not np.issubdtype(prompt_labels.dtype, np.integer):
        raise CacheError(f"{prompt_cache.directory}: prompt `labels` must be class indices (n,)")
    if len(prompt_labels) == 0:
        raise ValueError(
            f"benchmark {bench.name!r}: the prompt cache {prompt_cache.directory} is empty"
        )
    n_classes = len(bench.classnames) if bench.classnames else int(prompt_labels.max()) + 1
    missing = np.setdiff1d(np.arange(n_classes), prompt_labels)
    outside = prompt_labels[(prompt_labels < 0) | (prompt_labels >= n_classes)]
    if len(missing) or len(outside):
        raise CacheError(
            f"benchmark {bench.name!r}: prompt labels in {prompt_cache.directory} do not cover "
            f"classes 0..{n_classes - 1} exactly (no prompt for {missing[:10].tolist()}, "
            f"out of range {np.unique(outside)[:10].tolist()})"
        )
    item_cache = rows.cache(bench.dataset, bench.modality)
    labels = item_cache.extra(bench.labels)
    where = f"benchmark {bench.name!r}: {item_cache.directory} `{bench.labels}`"
    if bench.multilabel:
        if labels.ndim != 2 or labels.shape[1] != n_classes:
            raise CacheError(
                f"{where} has shape {labels.shape}; multi-label needs (n, {n_classes})"
            )
        if not np.isin(labels, (0, 1)).all():
            raise CacheError(f"{where} must be multi-hot (0/1)")
    else:
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise CacheError(
                f"{where} must be class indices (n,), got {labels.dtype} {labels.shape}"
            )
        bad = (labels < 0) | (labels >= n_classes)
        if bad.any():
            raise CacheError(f"{where}: {int(bad.sum())} labels are outside [0, {n_classes}) "
                             f"(e.g. {np.unique(labels[bad])[:5].tolist()})")  # fmt: skip
    prompts = rows.embed(bench.prompts, "text", bench.name)
    classes = class_embeddings(prompts, torch.from_numpy(prompt_labels.astype(np.int64)), n_classes)
    items = rows.embed(bench.dataset, bench.modality, bench.name)
    target = torch.from_numpy(labels.astype(np.int64)).to(rows.device)
    metric = (MeanAveragePrecision(n_classes) if bench.multilabel else ZeroShotAccuracy(topk)).to(
        rows.device
    )
    for i in range(0, len(items), chunk):
        metric.update(items[i : i + chunk] @ classes.T, target[i : i + chunk])
    prefix = f"{bench.modality}/{bench.name}"
    if bench.multilabel:
        return {f"{prefix}/mAP": float(metric.compute())}
    return {f"{prefix}/{k}": float(v) for k, v in metric.compute().items()}


def evaluate_method(
    method: Method,
    benchmarks: Benchmarks,
    ks: tuple[int, ...] = (1, 5),
    topk: tuple[int, ...] = (1, 5),
    chunk: int = 1024,
    device: str | torch.device = "cpu",
) -> dict[str, dict[str, float]]:
    """{'retrieval': {...}, 'zeroshot': {...}} of one method on the benchmarks it covers."""
    covered = set(method.modalities)
    shared = {b.modalities for b in benchmarks.retrieval}
    repeated = {p for p in shared if sum(b.modalities == p for b in benchmarks.retrieval) > 1}
    out: dict[str, dict[str, float]] = {"retrieval": {}, "zeroshot": {}}
    for bench in benchmarks.retrieval:
        if not set(bench.modalities) <= covered:
            continue
        rows = _Rows(method, benchmarks.root, torch.device(device))
        for key, value in score_retrieval(rows, bench, ks, chunk).items():
            # Several benchmarks of one pair (AudioCaps, Clotho) are told apart by name.
            direction, k = key.split("/")
            named = f"{direction}/{bench.name}/{k}" if bench.modalities in repeated else key
            out["retrieval"][named] = value
    for bench in benchmarks.zeroshot:
        if {bench.modality, "text"} <= covered:
            rows = _Rows(method, benchmarks.root, torch.device(device))
            out["zeroshot"] |= score_zeroshot(rows, bench, topk, chunk)
    return out


def mean_r1(scores: Mapping[str, float]) -> float | None:
    """Mean R@1 over the retrieval directions a method covers (None when it covers none)."""
    r1 = [v for k, v in scores.items() if k.endswith("/R@1")]
    return float(np.mean(r1)) if r1 else None


# ---------------------------------------------------------------------------- reports


def _by_k(key: str) -> tuple[str, int]:
    """Sort key: R@5 before R@10, top1 before top5."""
    head, _, last = key.rpartition("/")
    digits = "".join(c for c in last if c.isdigit())
    return head + "/" + last.rstrip("0123456789@"), int(digits or 0)


def _columns(benchmarks: Benchmarks, methods: Mapping[str, Mapping]) -> tuple[list, list]:
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


def _label(key: str) -> str:
    parts = key.split("/")
    if "_to_" in parts[0]:
        q, t = parts[0].split("_to_")
        return " ".join([f"{q}{ARROW}{t}", *parts[1:]])
    return " ".join(parts[1:])


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def markdown(results: Mapping, benchmarks: Benchmarks) -> str:
    """results.md: percent tables like the paper's Tables 2 and 3, methods as rows."""
    methods = results["methods"]
    retrieval, zeroshot = _columns(benchmarks, methods)
    note = f"Manifest `{benchmarks.path}`. Percentages; `-`: the method does not cover it. {TIES}"
    lines = [f"# Evaluation on {benchmarks.name}", "", note, ""]

    def table(title: str, keys: list[str], kind: str, extra: str | None = None) -> None:
        header = ["method", *(_label(k) for k in keys)] + ([extra] if extra else [])
        lines.extend([f"## {title}", "", "| " + " | ".join(header) + " |",
                      "|" + "---|" * len(header)])  # fmt: skip
        for name, m in methods.items():
            cells = [_percent(m[kind].get(k)) for k in keys]
            if extra:
                cells.append(_percent(m["summary"]["mean_R@1"]))
            lines.append("| " + " | ".join([f"`{name}`", *cells]) + " |")
        lines.append("")

    if retrieval:
        table("Cross-modal retrieval (Table 2)", retrieval, "retrieval", "mean R@1 (covered)")
    if zeroshot:
        table("Zero-shot classification (Table 3)", zeroshot, "zeroshot")
    return "\n".join(lines)


def _log_wandb(cfg: DictConfig, results: Mapping, benchmarks: Benchmarks) -> None:
    """A W&B Table (methods as rows, percentages) and fractions in the run summary."""
    import wandb

    logger = make_logger(cfg)
    run = logger.experiment
    retrieval, zeroshot = _columns(benchmarks, results["methods"])
    columns = ["method", *retrieval, *zeroshot, "mean_R@1"]
    data = []
    for name, m in results["methods"].items():
        values = [m["retrieval"].get(k) for k in retrieval] + [
            m["zeroshot"].get(k) for k in zeroshot
        ]
        data.append(
            [name, *(None if v is None else 100 * v for v in values + [m["summary"]["mean_R@1"]])]
        )
        for kind in ("retrieval", "zeroshot", "summary"):
            for key, value in m[kind].items():
                run.summary[f"evaluate/{name}/{kind}/{key}"] = value
    run.log({"evaluate/results": wandb.Table(columns=columns, data=data)})
    run.finish()


def _print_table(results: Mapping, benchmarks: Benchmarks) -> None:
    """The results on the console (rich), transposed to fit: one row per metric, one column per
    method."""
    from rich.console import Console
    from rich.table import Table

    methods = results["methods"]
    retrieval, zeroshot = _columns(benchmarks, methods)
    table = Table(title=f"evaluate: {benchmarks.name} (%)")
    table.add_column("metric")
    for name in methods:
        table.add_column(name, justify="right")
    for kind, keys in (("retrieval", retrieval), ("zeroshot", zeroshot)):
        for key in keys:
            table.add_row(_label(key), *(_percent(m[kind].get(key)) for m in methods.values()))
    table.add_row(
        "mean R@1 (covered)", *(_percent(m["summary"]["mean_R@1"]) for m in methods.values())
    )
    Console().print(table)


def run(cfg: DictConfig) -> float | None:
    """Score every method of `evaluate.methods` on the manifest; write results.json/.md.

    Returns the first method's mean R@1 over the directions it covers (for sweepers).
    """
    ev = cfg.evaluate
    if not ev.methods:
        raise ValueError(
            "evaluate.methods is empty; e.g. evaluate.methods=[raw:clap,omni:base/routed]"
        )
    methods = [make_method(spec, cfg) for spec in ev.methods]
    names = [m.name for m in methods]
    if len(set(names)) < len(names):
        raise ValueError(f"evaluate.methods: names must be unique, got {names}")
    root = ensure_data(cfg, dict.fromkeys(s for m in methods for s in m.spaces))
    benchmarks = load_benchmarks(manifest_path(cfg, root))
    device = ev.device if ev.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    ks, topk = tuple(int(k) for k in ev.ks), tuple(int(k) for k in ev.topk)
    results: dict = dict(benchmarks=str(benchmarks.path), root=str(benchmarks.root), methods={})
    for method in methods:
        log.info("evaluate: %s on %s", method.name, benchmarks.path)
        scores = evaluate_method(method, benchmarks, ks, topk, int(ev.chunk), device)
        if not scores["retrieval"] and not scores["zeroshot"]:
            log.warning("evaluate: %s (modalities %s) covers no benchmark of %s", method.name,
                        list(method.modalities), benchmarks.path)  # fmt: skip
        # Metrics compute in float32: 6 decimals keep every digit that means anything.
        scores = {kind: {k: round(v, 6) for k, v in s.items()} for kind, s in scores.items()}
        r1 = [v for k, v in scores["retrieval"].items() if k.endswith("/R@1")]
        mean = mean_r1(scores["retrieval"])
        summary = {"mean_R@1": None if mean is None else round(mean, 6), "directions": len(r1)}
        results["methods"][method.name] = dict(modalities=list(method.modalities), **scores,
                                               summary=summary)  # fmt: skip
    if not any(m["retrieval"] or m["zeroshot"] for m in results["methods"].values()):
        raise ValueError(
            f"no method in {list(ev.methods)} covers any benchmark of {benchmarks.path}"
        )
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
    _print_table(results, benchmarks)
    log.info("evaluate: wrote %s and %s", out / "results.json", out / "results.md")
    if cfg.get("logger") and "Wandb" in str(cfg.logger.get("_target_", "")):
        _log_wandb(cfg, results, benchmarks)
    return results["methods"][methods[0].name]["summary"]["mean_R@1"]
