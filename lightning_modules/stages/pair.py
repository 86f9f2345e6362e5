"""Pair stage: pseudo item tuples retrieved from unpaired pools, then cleaned per pair term.

`python train.py stage=pair` (paper §3.1). Each modality of `pair.starts` in turn is the starting
point; every other modality's item is the exact maximum-inner-product top-1 of the starting item
in the space that `pair.routes` names for that pair. A pair with no route is chained through the
modalities that `pair.chain` names (audio -> image -> point), else along the shortest path over
the routes: each hop takes the top-1 of the previous item. A run covers `pair.modalities` (auto:
those the routes link whose pools exist), so audio, image and text pair without 3D, or image and
text alone; tuples hold -1 for the rest.

Cleaning (`pair.clean`) acts per pair term, not per tuple: a rule that distrusts a hop drops the
item it retrieved, and every item chained through it, to -1 (missing); `soft` weighs items by
confidence (`conf_<m>` columns). A tuple is kept while it still holds two items. In order:
csls (hubness-corrected search), mutual, cross_space, provenance, max_reuse, then soft weights.

Output: a tuple table (`datamodules/tuples.py`) and `pairs_summary.json` beside it, with the kept
fraction and the fine and coarse concept agreement per start, target and hop after each rule.
This file wires config to the pieces: the plan and the raw tuple table (`pair_plan.py`), exact
search (`search.py`), the cleaning rules (`pair_clean.py`) and the statistics (`pair_stats.py`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
from omegaconf import DictConfig
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from datamodules.artifacts import CacheError, atomic_write_json
from datamodules.cache import EmbeddingCache, cache_dir, cache_is_complete, rows_digest
from datamodules.tuples import save_tuples
from encoders.modalities import MODALITIES, PROVENANCES, check_modality, resolve_device
from lightning_modules.pairing.ann import Ann
from lightning_modules.pairing.ann import csls_bias as ann_csls_bias
from lightning_modules.pairing.ann import search_pass as ann_search_pass
from lightning_modules.pairing.ann import search_steps as ann_steps
from lightning_modules.pairing.clean import (
    Clean,
    apply_cells,
    cross_keep,
    hop_alive,
    mutual_keep,
    provenance_keep,
    reuse_keep,
    soft_weights,
)
from lightning_modules.pairing.plan import (
    Tuples,
    build_tuples,
    check_route_spaces,
    dedupe,
    pair_key,
    paired,
    parse_routes,
    plan_paths,
)
from lightning_modules.pairing.search import (
    Array,
    csls_bias,
    pick_backend,
    pool_rows,
    search,
    search_steps,
)
from lightning_modules.pairing.stats import flat_metrics, rule_stats, summarize
from lightning_modules.runtime import lineage
from lightning_modules.runtime.config import ensure_data, space_configs, to_plain
from lightning_modules.runtime.training import make_logger

log = logging.getLogger(__name__)
# The config sections the tuple table depends on (with the pool caches it reads, on raw data):
# `stage=pipeline` pairs again when one changes.
DEPENDS = ("data", "anchor", "seed", "pair")
SUMMARY = "pairs_summary.json"
Labels = Mapping[str, np.ndarray] | None  # {modality: (pool,) or (pool, L) concept labels}


@dataclass
class Pools:
    """What a run pairs: its modalities, the routes its plan hops and their open pool caches."""

    root: Path  # the data root
    modalities: list[str]
    routes: dict[tuple[str, str], str]  # {(a, b): space} of the pairs the plan hops
    skipped: dict[str, str]  # {route: why pair.modalities=auto left it out}
    plan: dict[str, dict[str, list[str]]]  # {start: {target: [start, ..., target]}}
    cross: dict[tuple[str, str], str | None]  # each route's second space (the cross_space rule)
    caches: dict[tuple[str, str], EmbeddingCache]  # {(space, modality): pool}
    sizes: dict[str, int]  # {modality: pool rows}


class SearchPass(NamedTuple):
    """One exact search of a route's two pools in one space, serving both its directions."""

    space: str
    a: str
    b: str
    want: dict[tuple[str, str], int]  # {direction (query, gallery): top-k}
    csls: bool  # hubness-corrected (pair.clean.csls)
    second: bool  # the cross_space rule's top-k in a second space, not the route's own


@dataclass
class Found:
    """What the exact search found, and how."""

    nearest: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]]  # per route direction: top-k
    second: dict[tuple[str, str], np.ndarray]  # per direction: (queries, cross_k) second-space rows
    report: list[dict]  # one summary entry per direction searched
    seconds: float
    backend: str
    device: str


class Cleaned(NamedTuple):
    """The table to write, and what finishing it reports."""

    table: dict[str, np.ndarray]
    duplicates_removed: int
    soft_top_conf: dict[str, float]  # soft: mean weight of each start item's rank-0 tuple


def run(cfg: DictConfig) -> float | None:
    """Build, clean and summarise the pseudo tuple table; returns the mean concept agreement."""
    pc = cfg.pair
    clean = Clean.from_config(pc.clean)
    min_tuples = int(pc.get("min_tuples", 1))
    ann = Ann.from_config(pc)
    pools = _open_pools(cfg, clean)
    passes = _search_passes(pools, clean, int(pc.topk))
    found = _search(pools, passes, clean, pc, ann, int(cfg.seed))
    tuples = build_tuples(pools.plan, found.nearest, pools.sizes, pools.modalities)
    labels, coarse = _concept_labels(pools.caches)
    text_prov = _text_provenance(pools)

    stages = []  # each rule narrows the hops' keep masks in place: measure the tuples after each
    for rule, keep in _clean_hops(clean, tuples, found, pools, text_prov):
        stages.append(_measure_rule(rule, tuples, keep, labels, coarse, min_tuples))
    cleaned = _finish_table(tuples, keep, clean, found, pc, text_prov, min_tuples)

    summary = _write_outputs(pc, pools, clean, ann, found, cleaned, stages, labels, coarse)
    lineage.log_pair(_log_metrics(cfg, stages), Path(pc.output), summary)  # table and Artifact
    if labels is None:
        return None
    for key in ("concept_agreement", "chance_agreement"):  # per start modality
        log.info("pair: %s per start: %s", key.replace("_", " "),
                 ", ".join(f"{m} {v:.4f}" for m, v in summary[key].items()))  # fmt: skip
    return float(np.mean(list(summary["concept_agreement"].values())))


# ---------------------------------------------------------------------------- the plan


def _open_pools(cfg: DictConfig, clean: Clean) -> Pools:
    """The run's modalities, plan and second spaces, and the pool caches of every space read."""
    pc = cfg.pair
    routes = parse_routes(pc.routes)
    option = to_plain(pc.get("modalities", "auto"))
    # An explicit list narrows the routes before any space is read; auto looks at the pools.
    _, routes, _ = _run_modalities(option, routes, None, pc.dataset)
    explicit_cross = [str(v) for v in clean.cross_spaces.values()] if clean.cross else []
    spaces = space_configs(dict.fromkeys([*routes.values(), *explicit_cross]))
    check_route_spaces(routes, spaces)
    root = ensure_data(cfg, spaces)
    modalities, routes, skipped = _run_modalities(option, routes, root, pc.dataset)
    for route, why in skipped.items():
        log.warning("pair: route %s left out: %s", route, why)
    starts = _run_starts(pc.starts, modalities)
    plan = plan_paths(starts, routes, to_plain(pc.chain) if pc.chain else {}, modalities)
    used = {pair_key(f"{x}_{y}", "pair") for paths in plan.values() for p in paths.values()
            for x, y in zip(p, p[1:], strict=False)}  # fmt: skip
    routes = {pair: space for pair, space in routes.items() if pair in used}
    cross = _cross_spaces(clean, routes, spaces, root, pc.dataset) if clean.cross else {}
    if cross:
        spaces = {**spaces, **space_configs(s for s in set(cross.values()) - set(spaces) if s)}
        for pair, space in cross.items():
            if space is not None:
                check_route_spaces({pair: space}, spaces)
    needs = [(s, m) for pair, s in (*routes.items(), *cross.items()) if s for m in pair]
    caches = _open_caches(root, pc.dataset, needs, spaces)
    sizes = {m: c.count for (_, m), c in caches.items()}
    return Pools(root, modalities, routes, skipped, plan, cross, caches, sizes)


def _run_starts(option: Sequence[str], modalities: Sequence[str]) -> list[str]:
    """The starts of `pair.starts` among the run's modalities; a warning names any left out."""
    starts = [check_modality(s, "pair.starts") for s in option]
    if not starts:
        raise ValueError("pair.starts is empty; name at least one starting modality")
    if [s for s in starts if s not in modalities]:
        log.warning("pair: starts %s left out: the run covers %s",
                    [s for s in starts if s not in modalities], modalities)  # fmt: skip
    starts = [s for s in starts if s in modalities]
    if not starts:
        raise ValueError(f"pair.starts={list(option)}: none is among the run's {modalities}")
    return starts


def _open_caches(
    root: Path, dataset: str, needs: Sequence[tuple[str, str]], spaces: Mapping[str, Mapping]
) -> dict[tuple[str, str], EmbeddingCache]:
    """{(space, modality): cache} for each need; pools of one modality must match."""
    caches: dict[tuple[str, str], EmbeddingCache] = {}
    for name, m in dict.fromkeys(needs):
        cache = EmbeddingCache(cache_dir(root, dataset, name, m),
                               expect_dim=int(spaces[name]["dims"][m]),
                               expect_space=name, expect_modality=m)  # fmt: skip
        if cache.count == 0:
            raise CacheError(f"{cache.directory}: the {m} pool is empty; pairing needs items")
        caches[(name, m)] = cache
    for m in MODALITIES:
        same = [c for (_, mm), c in caches.items() if mm == m]
        for c in same[1:]:
            c0 = same[0]
            if c.count != c0.count or not np.array_equal(c.ids, c0.ids):
                raise CacheError(
                    f"{c.directory} and {c0.directory}: the {m} pool differs between spaces "
                    f"({c.count} vs {c0.count} rows, or other ids); a tuple row must name one item."
                    f" Re-extract both over the same files: python train.py stage=extract "
                    f"space={c0.space} extract.overwrite=true, then the same with "
                    f"space={c.space}"
                )
    return caches


def _run_modalities(
    option, routes: dict[tuple[str, str], str], root: Path | None, dataset: str
) -> tuple[list[str], dict[tuple[str, str], str], dict[str, str]]:
    """(modalities, routes among them, {route: why skipped}) for `pair.modalities`.

    auto: every modality a route links whose pools exist under the data root (root None: all);
    a list: exactly those (their pools must exist).
    """
    skipped = {}
    if option in (None, "auto"):
        for (a, b), space in routes.items():
            absent = [m for m in (a, b) if root is not None
                      and not cache_is_complete(cache_dir(root, dataset, space, m))]  # fmt: skip
            if absent:
                skipped[f"{a}_{b}"] = f"{space} has no {dataset!r} cache of {absent}"
        kept = {p: s for p, s in routes.items() if f"{p[0]}_{p[1]}" not in skipped}
        modalities = [m for m in MODALITIES if any(m in p for p in kept)]
    else:
        wanted = [check_modality(m, "pair.modalities") for m in option]
        modalities = [m for m in MODALITIES if m in wanted]
        kept = {p: s for p, s in routes.items() if set(p) <= set(modalities)}
    if len(modalities) < 2:
        raise ValueError(
            f"pair covers modalities {modalities}; pairing needs two (pair.modalities={option}, "
            f"routes { ({f'{a}_{b}': s for (a, b), s in routes.items()}) }, skipped {skipped})"
        )
    return modalities, kept, skipped


def _cross_spaces(
    clean: Clean,
    routes: Mapping[tuple[str, str], str],
    spaces: Mapping[str, Mapping],
    root: Path,
    dataset: str,
) -> dict[tuple[str, str], str | None]:
    """The second space of each route pair: pair.clean.cross_spaces, else another route space
    (first by name) that embeds both modalities in one dim and has their pools; None if none."""
    explicit = {pair_key(k, "pair.clean.cross_spaces"): str(v)
                for k, v in clean.cross_spaces.items()}  # fmt: skip
    out: dict[tuple[str, str], str | None] = {}
    for pair, space in routes.items():
        if pair in explicit:
            if explicit[pair] == space:
                raise ValueError(
                    f"pair.clean.cross_spaces.{pair[0]}_{pair[1]}={space} is the route's own "
                    f"space; the agreement check needs a second one"
                )
            out[pair] = explicit[pair]
            continue
        out[pair] = None
        for other in sorted(set(routes.values()) - {space}):
            dims = spaces[other]["dims"]
            if (
                all(m in dims for m in pair)
                and dims[pair[0]] == dims[pair[1]]
                and all(cache_is_complete(cache_dir(root, dataset, other, m)) for m in pair)
            ):
                out[pair] = other
                break
    return out


# ---------------------------------------------------------------------------- search


def _search_passes(pools: Pools, clean: Clean, k: int) -> list[SearchPass]:
    """The exact searches the plan needs, each hop with as many ranks as it uses.

    A first hop from a start takes the top-k (pair.topk), a later hop the top-1; mutual also needs
    each hop's reverse top-1, and cross_k the top-k of each route direction in its second space.
    """
    if k < 1:
        raise ValueError(f"pair.topk={k}; expected an integer >= 1")
    sizes = pools.sizes
    hops_k: dict[tuple[str, str], int] = {}
    for paths in pools.plan.values():
        for path in paths.values():
            for h, (x, y) in enumerate(zip(path, path[1:], strict=False)):
                hops_k[(x, y)] = max(hops_k.get((x, y), 1), k if h == 0 else 1)
                if clean.mutual:  # the reverse top-1 tells whether a hop is mutual
                    hops_k.setdefault((y, x), 1)
    for (_, y), kk in hops_k.items():
        if kk > sizes[y]:
            raise ValueError(f"pair.topk={kk} exceeds the {y} pool ({sizes[y]} items)")
    if clean.cross_k and clean.cross_k > min(sizes.values()):
        raise ValueError(f"pair.clean.cross_k={clean.cross_k} exceeds a pool ({sizes})")
    passes = []
    for (a, b), name in pools.routes.items():
        want = {d: hops_k[d] for d in ((a, b), (b, a)) if d in hops_k}
        passes.append(SearchPass(name, a, b, want, clean.csls > 0, False))
        if pools.cross.get((a, b)) and clean.cross_k:
            second = dict.fromkeys(want, clean.cross_k)
            passes.append(SearchPass(pools.cross[(a, b)], a, b, second, False, True))
    return passes


def _search(
    pools: Pools, passes: Sequence[SearchPass], clean: Clean, pc: DictConfig, ann: Ann, seed: int
) -> Found:
    """Run the passes: exact (pair.backend, pair.device, blocks of pair.chunk x
    pair.gallery_chunk), or by the approximate index of pair.search (ann.py)."""
    sizes, caches = pools.sizes, pools.caches
    device = resolve_device(pc.device)
    chunk, gchunk, backend = int(pc.chunk), int(pc.gallery_chunk), str(pc.backend)
    kw = dict(backend=backend, chunk=chunk, gallery_chunk=gchunk, device=device)

    def steps(name: str, a: str, b: str, directions: Mapping[str, int]) -> int:
        if ann.approximate:
            return ann_steps(sizes[a], sizes[b], directions, chunk)
        a_to_b, b_to_a, dim = "a_to_b" in directions, "b_to_a" in directions, caches[(name, a)].dim
        return search_steps(sizes[a], sizes[b], a_to_b, b_to_a, backend, chunk, gchunk, device, dim)

    both = {"a_to_b": 1, "b_to_a": 1}
    total = sum(steps(n, a, b, _directions(a, b, w)) + (csls and steps(n, a, b, both))
                for n, a, b, w, csls, _ in passes)  # fmt: skip

    nearest: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = {}
    second: dict[tuple[str, str], np.ndarray] = {}  # cross_k rows in the second space
    report = []
    t0 = time.perf_counter()
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeRemainingColumn()]  # fmt: skip
    what = "exact" if not ann.approximate else ann.search
    with Progress(*columns, disable=not pc.progress) as bar:
        task = bar.add_task(f"pair: {what} top-k search", total=total)
        advance = lambda n: bar.advance(task, n)  # noqa: E731
        for name, a, b, want, csls, is_second in passes:
            bar.update(task, description=f"pair: {a}-{b} in {name}")
            ta = time.perf_counter()
            xa, xb = pool_rows(caches[(name, a)]), pool_rows(caches[(name, b)])
            if csls and clean.csls > min(sizes[a], sizes[b]):
                raise ValueError(f"pair.clean.csls={clean.csls} exceeds the {a} or {b} pool")
            if ann.approximate:
                akw = dict(chunk=chunk, seed=seed, exact=kw, advance=advance)
                res, how = _approximate_pass(xa, xb, _directions(a, b, want), csls and clean.csls,
                                             ann, akw)  # fmt: skip
                for key, entry in how.pop("csls", {}).items():  # the penalties' own searches
                    x, y = (a, b) if key == "a_to_b" else (b, a)
                    report.append(dict(space=name, query=x, gallery=y, queries=sizes[x],
                                       gallery_rows=sizes[y], topk=clean.csls, csls=False,
                                       role="csls_penalty", **entry))  # fmt: skip
            else:
                bias = {}
                if csls:
                    a_bias, b_bias = csls_bias(xa, xb, clean.csls, advance=advance, **kw)
                    bias = dict(a_bias=a_bias, b_bias=b_bias)
                res = search(xa, xb, max(want.values()), a_to_b=(a, b) in want,
                             b_to_a=(b, a) in want, advance=advance, **bias, **kw)  # fmt: skip
                how = {}
            for key, (x, y) in (("a_to_b", (a, b)), ("b_to_a", (b, a))):
                if key not in res:
                    continue
                scores, rows = res[key][0][:, : want[(x, y)]], res[key][1][:, : want[(x, y)]]
                if is_second:
                    second[(x, y)] = rows
                else:
                    nearest[(x, y)] = (scores, rows)
                entry = dict(space=name, query=x, gallery=y, queries=len(rows),
                             gallery_rows=sizes[y], topk=want[(x, y)], csls=bool(csls),
                             role="cross_space" if is_second else "route",
                             mean_top1_score=float(scores[:, 0].mean()))  # fmt: skip
                kernel = pick_backend(backend, "a_to_b" in res, "b_to_a" in res, device,
                                      xa.shape[1], chunk, gchunk)  # fmt: skip
                report.append({**entry, **how.get(key, dict(index="exact", kernel=kernel))})
                _log_index(report[-1], ann)
            log.info("pair: %s-%s in %s: %.1f s", a, b, name, time.perf_counter() - ta)
    seconds = time.perf_counter() - t0
    return Found(nearest, second, report, seconds, backend, str(device))


def _approximate_pass(
    xa: Array, xb: Array, directions: Mapping[str, int], csls: int, ann: Ann, akw: Mapping
) -> tuple[dict, dict]:
    """({direction: (scores, rows)}, {direction: report}) of one pass by ann.py's index; with
    csls > 0 the search is hubness-corrected by penalties from approximate top-csls searches,
    whose reports come under "csls" ({direction: report})."""
    bias, how = {}, {}
    if csls:
        a_bias, b_bias, penalty = ann_csls_bias(xa, xb, csls, ann, **akw)
        bias = dict(a_bias=a_bias, b_bias=b_bias)
        how["csls"] = {key: d.report for key, d in penalty.items()}
    found = ann_search_pass(xa, xb, directions, ann, **bias, **akw)
    how.update({key: d.report for key, d in found.items()})
    return {key: (d.scores, d.rows) for key, d in found.items()}, how


def _log_index(entry: Mapping, ann: Ann) -> None:
    """One line per approximate direction: its recall@1, or that it fell back to exact."""
    where = f"pair: {entry['query']}->{entry['gallery']} in {entry['space']}"
    if entry.get("fallback"):
        log.warning("%s: exact search instead of pair.search=%s: %s", where, ann.search,
                    entry["fallback"])  # fmt: skip
    elif ann.approximate:
        log.info("%s: %s recall@1 %.4f on %d queries (build %.1f s, search %.1f s)", where,
                 ann.search, entry["recall_at_1"], entry["recall_queries"],
                 entry["build_seconds"], entry["search_seconds"])  # fmt: skip


def _directions(a: str, b: str, want: Mapping[tuple[str, str], int]) -> dict[str, int]:
    """{"a_to_b": k, "b_to_a": k} of the directions of a route pass that want names."""
    return {key: want[d] for key, d in (("a_to_b", (a, b)), ("b_to_a", (b, a))) if d in want}


def _index_summary(ann: Ann, report: Sequence[Mapping]) -> dict:
    """The summary's `search_index`: the index asked for, its settings, each direction that fell
    back to exact search, and the lowest recall@1 measured."""
    recalls = [r["recall_at_1"] for r in report if r.get("recall_at_1") is not None]
    fallbacks = {f"{r['space']}:{r['query']}->{r['gallery']}": r["fallback"]
                 for r in report if r.get("fallback")}  # fmt: skip
    build = round(sum(r.get("build_seconds", 0.0) for r in report), 3)
    return dict(search=ann.search, settings=ann.settings(), recall_queries=ann.recall_queries,
                fallbacks=fallbacks, min_recall_at_1=min(recalls) if recalls else None,
                build_seconds=build)  # fmt: skip


# ---------------------------------------------------------------------------- cleaning


def _concept_labels(caches: Mapping[tuple[str, str], EmbeddingCache]) -> tuple[Labels, Labels]:
    """{modality: labels} and {modality: coarse labels} of the pools that have them (the
    synthetic worlds' do; extracted pools where `labels: dirs` named classes); each None unless
    at least two modalities have them, as agreement compares a pair."""
    have = {m: c for (_, m), c in caches.items() if c.has("labels")}
    if len(have) < 2:
        return None, None
    # Multi-label items (world v2 audio) agree with an item sharing any of their labels.
    labels = {m: c.extra("multilabels") if c.has("multilabels") else c.extra("labels")
              for m, c in have.items()}  # fmt: skip
    coarse = {m: c.extra("coarse") for m, c in have.items() if c.has("coarse")}
    return labels, coarse if len(coarse) >= 2 else None


def _text_provenance(pools: Pools) -> np.ndarray | None:
    """(text pool,) int8 provenance of each caption (index into PROVENANCES); None without text."""
    if "text" not in pools.modalities:
        return None
    text_cache = next(c for (_, m), c in pools.caches.items() if m == "text")
    if not text_cache.has("provenance"):
        raise CacheError(
            f"{text_cache.directory}: the text pool has no 'provenance' array "
            f"(index into {list(PROVENANCES)}); the tuple table needs it"
        )
    return text_cache.extra("provenance")


def _clean_hops(
    clean: Clean, tuples: Tuples, found: Found, pools: Pools, text_prov: np.ndarray | None
) -> Iterator[tuple[str, dict[tuple, np.ndarray]]]:
    """(rule, {hop prefix: (rows,) keep mask}) after each rule of pair.clean that is on, in order.

    The masks are one dict narrowed in place (max_reuse counts only the hops still alive), so
    read each before asking for the next. The first entry is the table before any rule
    ("none", or "csls" when the search itself was hubness-corrected).
    """
    table, hops, _ = tuples
    keep = {p: np.ones(len(h.item), bool) for p, h in hops.items()}
    yield ("csls" if clean.csls else "none"), keep
    if clean.mutual:
        for p, hop in hops.items():
            keep[p] &= mutual_keep(hop, found.nearest)
        yield "mutual", keep
    if clean.cross:
        for p, hop in hops.items():
            x, y = p[-2:]
            space = pools.cross.get(pair_key(f"{x}_{y}", "pair"))
            if space is None:  # no second space embeds both: the hop stays as it is
                continue
            topk = found.second[(x, y)] if clean.cross_k else None
            rows = pool_rows(pools.caches[(space, x)]), pool_rows(pools.caches[(space, y)])
            keep[p] &= cross_keep(hop, topk, rows, clean.cross_threshold)
        yield "cross_space", keep
    if clean.provenance and text_prov is not None:
        for p, hop in hops.items():  # a text-started hop: does the caption describe its target?
            if p[0] == "text":
                prov = text_prov[table["text"][hop.rows]]
                keep[p] &= provenance_keep(prov, clean.provenance_codes(p[-1]))
        yield "provenance", keep
    if clean.max_reuse:
        for p, hop in hops.items():
            keep[p] &= reuse_keep(hop, hop_alive(keep, p), clean.max_reuse)
        yield "max_reuse", keep


def _measure_rule(
    rule: str,
    tuples: Tuples,
    keep: Mapping[tuple, np.ndarray],
    labels: Labels,
    coarse: Labels,
    min_tuples: int,
) -> dict:
    """The rule's summary entry for the tuples its keep masks leave; stops below min_tuples."""
    table, hops, cells = tuples
    raw_n = len(table["start"])
    cleaned = paired(apply_cells(table, cells, keep, hops))
    alive = {p: hop_alive(keep, p) for p in hops}
    entry = rule_stats(rule, cleaned, raw_n, hops, alive, labels, coarse)
    log.info("pair: %s keeps %d of %d tuples", rule, entry["tuples"], raw_n)
    if entry["tuples"] < min_tuples:
        raise ValueError(
            f"pair: rule {rule!r} keeps {entry['tuples']} tuples of {raw_n}, fewer than "
            f"pair.min_tuples={min_tuples}; loosen the rule or lower pair.min_tuples"
        )
    return entry


def _finish_table(
    tuples: Tuples,
    keep: Mapping[tuple, np.ndarray],
    clean: Clean,
    found: Found,
    pc: DictConfig,
    text_prov: np.ndarray | None,
    min_tuples: int,
) -> Cleaned:
    """The table to write: distrusted items -1, soft weights, lone items dropped, pair.dedupe
    applied, and each tuple's caption provenance (-1 without text)."""
    table, hops, cells = tuples
    final = apply_cells(table, cells, keep, hops)
    top_conf = {}
    if clean.soft:
        k = int(pc.topk)
        if k == 1:
            log.warning("pair.clean.soft with pair.topk=1: every weight is 1")
        conf, top_conf = soft_weights(final, cells, hops, found.nearest, k, clean.soft_temperature)
        final.update(conf)
    final = paired(final)
    before = len(final["start"])
    if pc.dedupe:
        final = dedupe(final)
    if len(final["start"]) < min_tuples:
        raise ValueError(f"pair: rule 'dedupe' keeps {len(final['start'])} tuples, fewer than "
                         f"pair.min_tuples={min_tuples}")  # fmt: skip
    if text_prov is not None:
        final["provenance"] = np.where(final["text"] >= 0, text_prov[final["text"]], -1)
    else:
        final["provenance"] = np.full(len(final["start"]), -1, np.int8)
    return Cleaned(final, before - len(final["start"]), top_conf)


# ---------------------------------------------------------------------------- outputs


def _write_outputs(
    pc: DictConfig,
    pools: Pools,
    clean: Clean,
    ann: Ann,
    found: Found,
    cleaned: Cleaned,
    stages: list[dict],
    labels: Labels,
    coarse: Labels,
) -> dict:
    """Write the tuple table and pairs_summary.json beside it; returns the summary."""
    final = cleaned.table
    output = Path(pc.output)
    meta = dict(source="pair", modalities=pools.modalities,
                routes={f"{a}_{b}": s for (a, b), s in pools.routes.items()}, paths=pools.plan,
                topk=int(pc.topk), dedupe=bool(pc.dedupe), clean=to_plain(vars(clean)))  # fmt: skip
    # The items each modality's rows index (one per modality: the spaces' pools are equal);
    # readers refuse the table once the pool changes under it.
    first = {m: c for (_, m), c in reversed(pools.caches.items())}
    pool_rows = {m: rows_digest(c.ids) for m, c in first.items()}
    save_tuples(output, final, pool=pc.dataset, pool_rows=pool_rows, **meta)
    summary = dict(
        output=str(output),
        root=str(pools.root),
        pool=pc.dataset,
        pool_sizes=pools.sizes,
        **meta,
        routes_skipped=pools.skipped,
        cross_spaces={f"{a}_{b}": s for (a, b), s in pools.cross.items()},
        backend=found.backend,
        device=found.device,
        **summarize(final, labels, coarse),
        duplicates_removed=cleaned.duplicates_removed,
        rules=stages,
        search_index=_index_summary(ann, found.report),
        search=found.report,
        search_seconds=round(found.seconds, 3),
    )
    if clean.soft:
        summary["soft_top_conf"] = cleaned.soft_top_conf
    atomic_write_json(output.with_name(SUMMARY), summary)
    log.info("pair: %d tuples -> %s", len(final["start"]), output)
    return summary


def _log_metrics(cfg: DictConfig, stages: Sequence[Mapping]):
    """Each rule's kept fraction and agreement to the configured logger, if any; returns it."""
    logger = make_logger(cfg)
    if not logger:
        return logger
    metrics: dict[str, float] = {}
    for entry in stages:
        metrics.update(flat_metrics({k: v for k, v in entry.items() if k != "rule"},
                                    f"pair/{entry['rule']}"))  # fmt: skip
    logger.log_metrics(metrics, step=0)
    logger.finalize("success")
    return logger
