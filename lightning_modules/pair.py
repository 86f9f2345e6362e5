"""Pair stage: pseudo item tuples (point, audio, image, text) retrieved from unpaired pools.

`python train.py stage=pair` (paper §3.1). Each modality in turn is the starting point; every
other modality's item is the exact maximum-inner-product top-1 of the starting item in the space
that `pair.routes` names for that pair. A pair with no route is chained through the modalities
that `pair.chain` names (audio -> image -> point): each hop takes the top-1 of the previous item.

Search is exact and blocked: a (chunk, gallery_chunk) float32 score block is the only large
temporary, whatever the pool sizes. Ties are broken deterministically: of equal scores, the lower
gallery row wins (also inside a top-k list), on both backends.

Output: a tuple table (`datamodules/tuples.py`) and `pairs_summary.json` beside it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from datamodules.cache import CacheError, EmbeddingCache, atomic_write_json, cache_dir
from datamodules.tuples import save_tuples
from encoders.modalities import MODALITIES, PROVENANCES, check_modality, resolve_device
from lightning_modules.common import ensure_data, space_configs, to_plain
from lightning_modules.search import pool_rows, search, search_steps

log = logging.getLogger(__name__)
Array = np.ndarray | torch.Tensor
Advance = Callable[[int], None]
SUMMARY = "pairs_summary.json"

# ---------------------------------------------------------------------------- the plan


def _pair_key(key: str, where: str) -> tuple[str, str]:
    """('audio', 'text') from 'audio_text' or 'text_audio', in MODALITIES order."""
    parts = str(key).split("_")
    if len(parts) != 2 or parts[0] == parts[1]:
        raise ValueError(f"{where}.{key}: expected <modality>_<modality>, e.g. audio_text")
    a, b = (check_modality(p, f"{where}.{key}") for p in parts)
    return (a, b) if MODALITIES.index(a) < MODALITIES.index(b) else (b, a)


def parse_routes(routes: Mapping[str, str]) -> dict[tuple[str, str], str]:
    """{(a, b) in MODALITIES order: space} from pair.routes."""
    out: dict[tuple[str, str], str] = {}
    for key, space in routes.items():
        pair = _pair_key(key, "pair.routes")
        if pair in out and out[pair] != space:
            raise ValueError(
                f"pair.routes names two spaces for {pair[0]}-{pair[1]}: {out[pair]}, {space}"
            )
        out[pair] = str(space)
    return out


def plan_paths(
    starts: Sequence[str],
    routes: Mapping[tuple[str, str], str],
    chain: Mapping[str, str | Sequence[str]],
) -> dict[str, dict[str, list[str]]]:
    """{start: {target: [start, *intermediates, target]}}: a direct route, else the chain.

    A chain `a_b: [m]` serves both directions (b -> m -> a reversed); every hop needs a route.
    """
    chains: dict[tuple[str, str], list[str]] = {}
    for key, via in (chain or {}).items():
        pair = _pair_key(key, "pair.chain")
        via = [via] if isinstance(via, str) else list(via)
        a, b = str(key).split("_")
        for m in via:
            check_modality(m, f"pair.chain.{key}")
        path = [a, *via, b]
        if len(set(path)) != len(path):
            raise ValueError(f"pair.chain.{key}={via}: a chain visits each modality once")
        chains[pair] = path if (a, b) == pair else path[::-1]
    plan: dict[str, dict[str, list[str]]] = {}
    for s in starts:
        check_modality(s, "pair.starts")
        plan[s] = {}
        for t in MODALITIES:
            if t == s:
                continue
            pair = _pair_key(f"{s}_{t}", "pair")
            if pair in routes:
                plan[s][t] = [s, t]
                continue
            if pair not in chains:
                raise ValueError(
                    f"no route for {pair[0]}-{pair[1]}: pair.routes has no {pair[0]}_{pair[1]} "
                    f"space and pair.chain does not chain it (routes: "
                    f"{ {f'{a}_{b}': v for (a, b), v in routes.items()} })"
                )
            path = chains[pair] if chains[pair][0] == s else chains[pair][::-1]
            for x, y in zip(path, path[1:], strict=False):
                if _pair_key(f"{x}_{y}", "pair") not in routes:
                    raise ValueError(
                        f"pair.chain.{pair[0]}_{pair[1]} hops {x}->{y}, but pair.routes has no "
                        f"space linking {x} and {y}"
                    )
            plan[s][t] = path
    return plan


def check_route_spaces(
    routes: Mapping[tuple[str, str], str], spaces: Mapping[str, Mapping]
) -> None:
    """Each route's space must embed both of its modalities, in one shared dim."""
    for (a, b), name in routes.items():
        dims = dict(spaces[name]["dims"])
        missing = [m for m in (a, b) if m not in dims]
        if missing:
            raise ValueError(
                f"pair.routes.{a}_{b}={name}: space {name} does not embed {missing} (dims: {dims})"
            )
        if dims[a] != dims[b]:
            raise ValueError(
                f"pair.routes.{a}_{b}={name}: space {name} embeds {a} in {dims[a]} dims but {b} in "
                f"{dims[b]}; a route needs both modalities in one space of one dim"
            )


# ---------------------------------------------------------------------------- tuples


def build_tuples(
    plan: Mapping[str, Mapping[str, list[str]]],
    nearest: Mapping[tuple[str, str], np.ndarray],
    sizes: Mapping[str, int],
) -> dict[str, np.ndarray]:
    """Columns point/audio/image/text (int64 pool rows) and start (int8) of every tuple.

    nearest[(x, y)]: (n_x, k_xy) pool rows of y nearest to each pool row of x. Rows run by start
    modality (MODALITIES order), then starting pool row, then rank r < topk: the r-th tuple takes
    the rank-r item of every modality retrieved directly from the start; later chain hops take
    the top-1 of the item before them.
    """
    k = max(nearest[(s, path[1])].shape[1] for s, paths in plan.items() for path in paths.values())
    columns: dict[str, list[np.ndarray]] = {m: [] for m in (*MODALITIES, "start")}
    for s in MODALITIES:
        if s not in plan:
            continue
        n = sizes[s]
        rank = np.tile(np.arange(k), n)
        rows = {s: np.repeat(np.arange(n, dtype=np.int64), k)}
        for t, path in plan[s].items():
            cur = nearest[(s, path[1])][rows[s], rank]
            for x, y in zip(path[1:], path[2:], strict=False):
                cur = nearest[(x, y)][cur, 0]
            rows[t] = cur
        for m in MODALITIES:
            columns[m].append(rows[m])
        columns["start"].append(np.full(n * k, MODALITIES.index(s), np.int8))
    return {c: np.concatenate(v) for c, v in columns.items()}


def dedupe(table: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Drop rows whose (point, audio, image, text) repeats an earlier row; keeps the order."""
    items = np.stack([table[m] for m in MODALITIES], 1)
    _, first = np.unique(items, axis=0, return_index=True)
    keep = np.sort(first)
    return {c: v[keep] for c, v in table.items()}


def summarize(table: Mapping[str, np.ndarray], labels: Mapping[str, np.ndarray] | None) -> dict:
    """Counts per starting modality and, given pool labels, how often tuples share a concept.

    concept_agreement[s]: fraction of tuples started from s whose items all carry the starting
    item's concept. chance_agreement[s]: the same if the other items were drawn uniformly at
    random from their pools (the product of each pool's share of that concept).
    target_agreement[s][t]: fraction whose t item carries the starting item's concept.
    """
    starts = table["start"]
    out: dict = {
        "tuples": int(len(starts)),
        "counts": {m: int((starts == i).sum()) for i, m in enumerate(MODALITIES)},
    }
    if labels is None:
        return out
    concept = {m: labels[m][table[m]] for m in MODALITIES}
    n_concepts = 1 + max(int(v.max()) for v in labels.values())
    share = {m: np.bincount(labels[m], minlength=n_concepts) / len(labels[m]) for m in MODALITIES}
    agree, chance, target = {}, {}, {}
    for i, s in enumerate(MODALITIES):
        rows = starts == i
        if not rows.any():
            continue
        own = concept[s][rows]
        same = {t: concept[t][rows] == own for t in MODALITIES if t != s}
        agree[s] = float(np.logical_and.reduce(list(same.values())).mean())
        target[s] = {t: float(v.mean()) for t, v in same.items()}
        chance[s] = float(np.prod([share[t][own] for t in MODALITIES if t != s], axis=0).mean())
    everything = np.logical_and.reduce([concept[m] == concept[MODALITIES[0]] for m in MODALITIES])
    out.update(
        concept_agreement=agree,
        chance_agreement=chance,
        target_agreement=target,
        concept_agreement_overall=float(everything.mean()),
    )
    return out


# ---------------------------------------------------------------------------- the stage


def _open_pools(
    root: Path, dataset: str, routes: Mapping[tuple[str, str], str], spaces: Mapping[str, Mapping]
) -> dict[tuple[str, str], EmbeddingCache]:
    """{(space, modality): cache} for every route side; pools of one modality must match."""
    caches: dict[tuple[str, str], EmbeddingCache] = {}
    for pair, name in routes.items():
        for m in pair:
            if (name, m) in caches:
                continue
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
                    f"({c.count} vs {c0.count} rows, or other ids); a tuple row must name one item"
                )
    return caches


def run(cfg: DictConfig) -> float | None:
    """Build the pseudo tuple table and its summary; returns the mean concept agreement."""
    pc = cfg.pair
    routes = parse_routes(pc.routes)
    starts = list(pc.starts)
    if not starts:
        raise ValueError("pair.starts is empty; name at least one starting modality")
    plan = plan_paths(starts, routes, to_plain(pc.chain) if pc.chain else {})
    used = {_pair_key(f"{x}_{y}", "pair") for paths in plan.values() for p in paths.values()
            for x, y in zip(p, p[1:], strict=False)}  # fmt: skip
    routes = {pair: space for pair, space in routes.items() if pair in used}
    spaces = space_configs(dict.fromkeys(routes.values()))
    check_route_spaces(routes, spaces)
    root = ensure_data(cfg, spaces)
    caches = _open_pools(root, pc.dataset, routes, spaces)
    sizes = {m: c.count for m in MODALITIES for (_, mm), c in caches.items() if mm == m}

    # Which directed hops are needed, and with how many ranks: first hops from a start need topk.
    k = int(pc.topk)
    if k < 1:
        raise ValueError(f"pair.topk={k}; expected an integer >= 1")
    hops: dict[tuple[str, str], int] = {}
    for paths in plan.values():
        for path in paths.values():
            for h, (x, y) in enumerate(zip(path, path[1:], strict=False)):
                hops[(x, y)] = max(hops.get((x, y), 1), k if h == 0 else 1)
    for (_, y), kk in hops.items():
        if kk > sizes[y]:
            raise ValueError(f"pair.topk={kk} exceeds the {y} pool ({sizes[y]} items)")
    passes = []
    for (a, b), name in routes.items():
        want = {d: hops[d] for d in ((a, b), (b, a)) if d in hops}
        passes.append((a, b, name, want))
    device = resolve_device(pc.device)
    chunk, gchunk, backend = int(pc.chunk), int(pc.gallery_chunk), str(pc.backend)
    total = sum(search_steps(sizes[a], sizes[b], (a, b) in w, (b, a) in w, backend, chunk, gchunk)
                for a, b, _, w in passes)  # fmt: skip

    nearest: dict[tuple[str, str], np.ndarray] = {}
    report = []
    t0 = time.perf_counter()
    columns = [
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
    ]
    with Progress(*columns, disable=not pc.progress) as bar:
        task = bar.add_task("pair: exact top-k search", total=total)
        for a, b, name, want in passes:
            bar.update(task, description=f"pair: {a}-{b} in {name}")
            ta = time.perf_counter()
            res = search(
                pool_rows(caches[(name, a)]),
                pool_rows(caches[(name, b)]),
                max(want.values()),
                a_to_b=(a, b) in want,
                b_to_a=(b, a) in want,
                backend=backend,
                chunk=chunk,
                gallery_chunk=gchunk,
                device=device,
                advance=lambda n: bar.advance(task, n),
            )
            for key, (x, y) in (("a_to_b", (a, b)), ("b_to_a", (b, a))):
                if key in res:
                    scores, rows = res[key]
                    nearest[(x, y)] = rows[:, : want[(x, y)]]
                    report.append(dict(space=name, query=x, gallery=y, queries=len(rows),
                                       gallery_rows=sizes[y], topk=want[(x, y)],
                                       mean_top1_score=float(scores[:, 0].mean())))  # fmt: skip
            log.info("pair: %s-%s in %s: %.1f s", a, b, name, time.perf_counter() - ta)
    seconds = time.perf_counter() - t0

    table = build_tuples(plan, nearest, sizes)
    before = len(table["start"])
    if pc.dedupe:
        table = dedupe(table)
    text_cache = next(c for (_, m), c in caches.items() if m == "text")
    if not text_cache.has("provenance"):
        raise CacheError(f"{text_cache.directory}: the text pool has no 'provenance' array "
                         f"(index into {list(PROVENANCES)}); the tuple table needs it")  # fmt: skip
    table["provenance"] = text_cache.extra("provenance")[table["text"]]
    labels = None
    if all(c.has("labels") for c in caches.values()):
        labels = {m: c.extra("labels") for (_, m), c in caches.items()}
    output = Path(pc.output)
    meta = dict(source="pair", routes={f"{a}_{b}": s for (a, b), s in routes.items()},
                paths=plan, topk=k, dedupe=bool(pc.dedupe))  # fmt: skip
    save_tuples(output, table, pool=pc.dataset, **meta)
    summary = dict(
        output=str(output),
        root=str(root),
        pool=pc.dataset,
        pool_sizes=sizes,
        **meta,
        backend=backend,
        device=str(device),
        **summarize(table, labels),
        duplicates_removed=before - len(table["start"]),
        search=report,
        search_seconds=round(seconds, 3),
    )
    atomic_write_json(output.with_name(SUMMARY), summary)
    log.info("pair: %d tuples -> %s", len(table["start"]), output)
    if labels is not None:
        log.info("pair: concept agreement %s (chance %s)",
                 {m: round(v, 3) for m, v in summary["concept_agreement"].items()},
                 {m: round(v, 4) for m, v in summary["chance_agreement"].items()})  # fmt: skip
        return float(np.mean(list(summary["concept_agreement"].values())))
    return None
