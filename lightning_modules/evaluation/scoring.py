"""Scoring one method on a manifest's benchmarks: retrieval R@K and zero-shot top-K / mAP.

Metrics (lightning_modules/evaluation/metrics.py) follow CLIP_benchmark: R@K counts a query as a
hit when any positive is in the top K (text->X: each caption is a query with its one item;
X->text: one query per item, a hit is any of its captions); zero-shot class embeddings are the
re-normalised mean of the L2-normalised template embeddings. Ties are broken deterministically
(see TIES).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from datamodules.artifacts import CacheError
from datamodules.cache import EmbeddingCache, cache_dir
from lightning_modules.evaluation.benchmarks import (
    MAPPING_SUFFIXES,
    Benchmarks,
    Retrieval,
    ZeroShot,
    cached_modality,
    covered,
    zeroshot_prompts,
)
from lightning_modules.evaluation.methods import Method, open_cache
from lightning_modules.evaluation.metrics import (
    MeanAveragePrecision,
    RetrievalRecall,
    ZeroShotAccuracy,
)

# Written by the extract stage beside a cache: its item list (keys, classes), its failed items.
ITEMS_JSON, ERRORS_JSON = "items.json", "errors.json"
log = logging.getLogger(__name__)
TIES = (
    "Ties: among equal scores the lower gallery row (retrieval) or class index (zero-shot) "
    "ranks first; AP treats equal scores as one threshold."
)


class Rows:
    """Per-method memo of embeddings and of the cache whose extras (ids, labels) describe them.

    Modalities here are benchmark modalities: a `video` reads the dataset's `image` cache.
    """

    def __init__(self, method: Method, root: Path, device: torch.device) -> None:
        self.method, self.root, self.device = method, root, device
        self.memo: dict[tuple[str, str], torch.Tensor] = {}

    def cache(self, dataset: str, modality: str) -> EmbeddingCache:
        """The first cache of (dataset, modality) among the method's spaces."""
        modality = cached_modality(modality)
        for space in self.method.spaces:
            if cache_dir(self.root, dataset, space, modality).is_dir():
                return open_cache(self.root, dataset, space, modality)
        dirs = [str(cache_dir(self.root, dataset, s, modality)) for s in self.method.spaces]
        raise CacheError(
            f"method {self.method.name!r}: no cache of {dataset}/{modality}; looked in {dirs}"
        )

    def embed(self, dataset: str, modality: str, benchmark: str) -> torch.Tensor:
        """The method's L2-normalised embeddings (n, d) of the dataset's rows, on the device."""
        key = (dataset, cached_modality(modality))
        if key not in self.memo:
            count = self.cache(dataset, modality).count
            if count == 0:
                raise ValueError(f"benchmark {benchmark!r}: {dataset}/{key[1]} is empty (0 rows)")
            emb = self.method.embed(self.root, dataset, key[1])
            if emb.ndim != 2 or len(emb) != count:
                raise CacheError(f"method {self.method.name!r} embedded {dataset}/{key[1]} as "
                                 f"{tuple(emb.shape)}, but its cache has {count} rows")  # fmt: skip
            # Methods normalise already; once more costs little and keeps every score a cosine.
            self.memo[key] = F.normalize(emb.float(), dim=-1).to(self.device)
        return self.memo[key]


def _mapping_file(path: Path) -> np.ndarray:
    if path.suffix == ".npy":
        return np.load(path, allow_pickle=False)
    try:
        return np.asarray(json.loads(path.read_text()))
    except json.JSONDecodeError as e:
        raise CacheError(f"{path}: not valid JSON ({e})") from e


def item_ids(rows: Rows, bench: Retrieval, modality: str) -> tuple[torch.Tensor, EmbeddingCache]:
    """(n,) int64 item id of each row of the modality's cache (several captions share one)."""
    cache = rows.cache(bench.datasets[modality], modality)
    key = bench.items.get(modality) or next((k for k in ("item", "items") if cache.has(k)), "ids")
    where = f"{cache.directory}: `{key}`"
    if key.endswith(MAPPING_SUFFIXES):
        items, where = _mapping_file(Path(key)), f"benchmark {bench.name!r}: mapping file {key}"
        if items.ndim == 1 and len(items) != cache.count:
            raise CacheError(f"{where} has {len(items)} item ids, but {cache.directory} has "
                             f"{cache.count} rows")  # fmt: skip
    else:
        items = cache.extra(key)
    if items.ndim != 1 or not (len(items) == 0 or np.issubdtype(items.dtype, np.integer)):
        raise CacheError(f"{where} must be integer item ids (n,), got {items.dtype} "
                         f"{items.shape}")  # fmt: skip
    return torch.from_numpy(items.astype(np.int64)), cache


def _skipped(cache: EmbeddingCache) -> torch.Tensor:
    """Ids of the items whose extraction failed (the extract stage's errors.json), maybe none."""
    path = cache.directory / ERRORS_JSON
    ids = [int(e["id"]) for e in json.loads(path.read_text())] if path.is_file() else []
    return torch.tensor(ids, dtype=torch.int64)


def score_retrieval(rows: Rows, bench: Retrieval, ks: tuple[int, ...], chunk: int) -> dict:
    """R@K both ways on one paired set: {'<query>_to_<target>/R@K': fraction}."""
    a, b = bench.modalities
    emb = {m: rows.embed(bench.datasets[m], m, bench.name) for m in (a, b)}
    items, caches = {}, {}
    for m in (a, b):
        items[m], caches[m] = item_ids(rows, bench, m)
    for m, other in ((a, b), (b, a)):
        orphan = ~torch.isin(items[m], items[other])
        if not orphan.any():
            continue
        # Captions of items that extraction skipped (listed in errors.json) drop out of the set;
        # any other caption without its item means the mapping is wrong.
        if not torch.isin(items[m][orphan], _skipped(caches[other])).all():
            raise CacheError(
                f"benchmark {bench.name!r}: {int(orphan.sum())} of {len(items[m])} {m} rows in "
                f"{caches[m].directory} have item ids with no {other} row in "
                f"{caches[other].directory} (e.g. {items[m][orphan][:5].tolist()}): the "
                "caption/item mapping does not match its cache"
            )
        log.warning("benchmark %r: %d of %d %s rows belong to %s items that extraction skipped "
                    "(%s); they are left out", bench.name, int(orphan.sum()), len(items[m]), m,
                    other, caches[other].directory / ERRORS_JSON)  # fmt: skip
        emb[m], items[m] = emb[m][~orphan.to(emb[m].device)], items[m][~orphan]
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


def prompt_labels(rows: Rows, bench: ZeroShot) -> tuple[np.ndarray, int]:
    """The class index (n,) of each prompt row and the number of classes, checked."""
    cache = rows.cache(bench.prompts, "text")
    key = "label" if cache.has("label") else "labels"
    labels = cache.extra(key)
    where = f"benchmark {bench.name!r}: prompt cache {cache.directory}"
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise CacheError(f"{where}: `{key}` must be class indices (n,)")
    if len(labels) == 0:
        raise ValueError(f"{where} is empty")
    if bench.classes is not None and bench.templates is not None:
        # Extracted from this manifest's classes x templates, class-major: anything else is stale.
        texts, expected, _ = zeroshot_prompts(bench.classes, bench.templates)
        recorded = cache.manifest.get("prompts")
        if not np.array_equal(labels, expected) or recorded not in (None, texts):
            raise CacheError(
                f"{where} holds {len(labels)} prompts that are not the manifest's "
                f"{len(bench.classes)} classes x {len(bench.templates)} templates (class-major); "
                "extract them again (stage=extract with overwrite=true)"
            )
    n_classes = len(bench.classes) if bench.classes else int(labels.max()) + 1
    missing = np.setdiff1d(np.arange(n_classes), labels)
    outside = labels[(labels < 0) | (labels >= n_classes)]
    if len(missing) or len(outside):
        raise CacheError(
            f"{where}: prompt labels do not cover classes 0..{n_classes - 1} exactly (no prompt "
            f"for {missing[:10].tolist()}, out of range {np.unique(outside)[:10].tolist()})"
        )
    return labels, n_classes


def _in_manifest_order(labels: np.ndarray, cache: EmbeddingCache, bench: ZeroShot) -> np.ndarray:
    """Labels re-indexed into the manifest's `classes` when the extract stage recorded the item
    list's own class names (items.json `classes`: label i is its i-th name, sorted)."""
    listing = cache.directory / ITEMS_JSON
    names = json.loads(listing.read_text()).get("classes") if listing.is_file() else None
    if not bench.classes or not names or names == bench.classes:
        return labels
    unknown = sorted(set(names) - set(bench.classes))
    if unknown:
        raise CacheError(f"benchmark {bench.name!r}: {listing} names classes {unknown[:10]} that "
                         "the manifest's `classes` lacks")  # fmt: skip
    index = np.array([bench.classes.index(n) for n in names], np.int64)
    if labels.ndim == 2 and labels.shape[1] == len(names):  # multi-hot: move the columns
        out = np.zeros((len(labels), len(bench.classes)), labels.dtype)
        out[:, index] = labels
        return out
    if labels.ndim == 1 and ((labels >= 0) & (labels < len(names))).all():
        return index[labels]
    return labels  # malformed: the checks below name the problem


def _item_labels(rows: Rows, bench: ZeroShot, n_classes: int) -> np.ndarray:
    cache = rows.cache(bench.dataset, bench.modality)
    labels = _in_manifest_order(cache.extra(bench.labels), cache, bench)
    where = f"benchmark {bench.name!r}: {cache.directory} `{bench.labels}`"
    if bench.multilabel:
        if labels.ndim != 2 or labels.shape[1] != n_classes:
            raise CacheError(
                f"{where} has shape {labels.shape}; multi-label needs (n, {n_classes})"
            )
        if not np.isin(labels, (0, 1)).all():
            raise CacheError(f"{where} must be multi-hot (0/1)")
        return labels
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise CacheError(f"{where} must be class indices (n,), got {labels.dtype} {labels.shape}")
    bad = (labels < 0) | (labels >= n_classes)
    if bad.any():
        raise CacheError(f"{where}: {int(bad.sum())} labels are outside [0, {n_classes}) "
                         f"(e.g. {np.unique(labels[bad])[:5].tolist()})")  # fmt: skip
    return labels


def score_zeroshot(rows: Rows, bench: ZeroShot, topk: tuple[int, ...], chunk: int) -> dict:
    """Top-K accuracy, or mAP for a multi-label set: {'<modality>/<name>/top1': fraction, ...}.

    A top-K with K >= the benchmark's classes is 100% whatever the model, so it is left out
    (top-1 is always reported)."""
    plabels, n_classes = prompt_labels(rows, bench)
    topk = tuple(k for k in topk if k == 1 or k < n_classes)
    labels = _item_labels(rows, bench, n_classes)
    prompts = rows.embed(bench.prompts, "text", bench.name)
    classes = class_embeddings(prompts, torch.from_numpy(plabels.astype(np.int64)), n_classes)
    items = rows.embed(bench.dataset, bench.modality, bench.name)
    target = torch.from_numpy(labels.astype(np.int64)).to(rows.device)
    metric = MeanAveragePrecision(n_classes) if bench.multilabel else ZeroShotAccuracy(topk)
    metric = metric.to(rows.device)
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
    advance: Callable[[str], None] | None = None,
) -> dict[str, dict[str, float]]:
    """{'retrieval': {...}, 'zeroshot': {...}} of one method on the benchmarks it covers.

    advance(benchmark name), if given, is called once per benchmark, scored or not (progress).
    """
    advance = advance or (lambda name: None)
    can = covered(method.modalities)
    pairs = [b.modalities for b in benchmarks.retrieval]
    repeated = {p for p in pairs if pairs.count(p) > 1}
    out: dict[str, dict[str, float]] = {"retrieval": {}, "zeroshot": {}}
    for bench in benchmarks.retrieval:
        if not set(bench.modalities) <= can:
            advance(bench.name)
            continue
        rows = Rows(method, benchmarks.root, torch.device(device))
        for key, value in score_retrieval(rows, bench, ks, chunk).items():
            # Several benchmarks of one pair (AudioCaps, Clotho) are told apart by name.
            direction, k = key.split("/")
            named = f"{direction}/{bench.name}/{k}" if bench.modalities in repeated else key
            out["retrieval"][named] = value
        advance(bench.name)
    for bench in benchmarks.zeroshot:
        if {bench.modality, "text"} <= can:
            rows = Rows(method, benchmarks.root, torch.device(device))
            out["zeroshot"] |= score_zeroshot(rows, bench, topk, chunk)
        advance(bench.name)
    return out


def mean_r1(scores: Mapping[str, float], modality: str | None = None) -> float | None:
    """Mean R@1 over the retrieval directions scored (those involving `modality` if given)."""
    r1 = [v for k, v in scores.items() if k.endswith("/R@1")]
    if modality is not None:
        r1 = [v for k, v in scores.items()
              if k.endswith("/R@1") and modality in k.split("/")[0].split("_to_")]  # fmt: skip
    return float(np.mean(r1)) if r1 else None
