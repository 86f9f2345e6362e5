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
Exact search itself lives in `lightning_modules/search.py`.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
from omegaconf import DictConfig
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from datamodules.cache import (
    CacheError,
    EmbeddingCache,
    atomic_write_json,
    cache_dir,
    cache_is_complete,
)
from datamodules.tuples import modalities_of, save_tuples
from encoders.modalities import MODALITIES, PROVENANCES, check_modality, resolve_device
from lightning_modules import lineage
from lightning_modules.config import ensure_data, space_configs, to_plain
from lightning_modules.search import csls_bias, pool_rows, search, search_steps, take_rows
from lightning_modules.training import make_logger

log = logging.getLogger(__name__)
SUMMARY = "pairs_summary.json"
Nearest = Mapping[tuple[str, str], tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class Clean:
    """The cleaning rules of `pair.clean` (conf/config.yaml documents each); all off by default."""

    csls: int = 0
    mutual: bool = False
    cross_k: int = 0
    cross_threshold: float | None = None
    cross_spaces: dict = field(default_factory=dict)
    provenance: bool = False
    provenance_targets: dict = field(
        default_factory=lambda: {
            "point": ["point", "image"],
            "audio": ["audio"],
            "image": ["image"],
        }
    )
    max_reuse: int = 0
    soft: bool = False
    soft_temperature: float = 0.05

    @classmethod
    def from_config(cls, cfg: Mapping | None) -> Clean:
        """Validate `pair.clean`, naming a wrong key or value."""
        cfg = dict(to_plain(cfg) or {})
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(cfg) - set(names))
        if unknown:
            raise ValueError(f"pair.clean has unknown keys {unknown}; expected some of {names}")
        out = cls(**cfg)
        for key in ("csls", "cross_k", "max_reuse"):
            value = getattr(out, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"pair.clean.{key}={value!r}; expected an integer >= 0 (0: off)")
        for key in ("mutual", "provenance", "soft"):
            if not isinstance(getattr(out, key), bool):
                raise ValueError(f"pair.clean.{key}={getattr(out, key)!r}; expected true or false")
        if out.soft_temperature <= 0:
            raise ValueError(f"pair.clean.soft_temperature={out.soft_temperature}; expected > 0")
        for p, targets in out.provenance_targets.items():
            if p not in PROVENANCES:
                raise ValueError(
                    f"pair.clean.provenance_targets.{p}: unknown provenance; expected one of "
                    f"{list(PROVENANCES)}"
                )
            for m in targets:
                check_modality(m, f"pair.clean.provenance_targets.{p}")
        return out

    @property
    def cross(self) -> bool:
        """Whether the cross-space agreement rule is on."""
        return self.cross_k > 0 or self.cross_threshold is not None


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


def shortest_path(
    s: str, t: str, routes: Mapping[tuple[str, str], str], modalities: Sequence[str]
) -> list[str] | None:
    """The fewest-hop path s -> ... -> t over routed pairs among `modalities`, or None.

    Of equally short paths the one whose intermediates come first in MODALITIES order wins.
    """
    between = [m for m in MODALITIES if m in modalities and m not in (s, t)]
    for n in range(len(between) + 1):
        for via in itertools.permutations(between, n):
            path = [s, *via, t]
            if all(_pair_key(f"{x}_{y}", "pair") in routes for x, y in itertools.pairwise(path)):
                return path
    return None


def plan_paths(
    starts: Sequence[str],
    routes: Mapping[tuple[str, str], str],
    chain: Mapping[str, str | Sequence[str]],
    modalities: Sequence[str] = MODALITIES,
) -> dict[str, dict[str, list[str]]]:
    """{start: {target: [start, *intermediates, target]}}: a direct route, else a chain.

    Targets are the other `modalities` of the run. A chain `a_b: [m]` of pair.chain serves both
    directions (b -> m -> a reversed); every hop needs a route. A pair with neither, or whose
    chain passes a modality outside the run, takes the shortest path over the routes.
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
        for t in modalities:
            if t == s:
                continue
            pair = _pair_key(f"{s}_{t}", "pair")
            if pair in routes:
                plan[s][t] = [s, t]
                continue
            if pair in chains and set(chains[pair]) <= set(modalities):
                path = chains[pair] if chains[pair][0] == s else chains[pair][::-1]
                for x, y in itertools.pairwise(path):
                    if _pair_key(f"{x}_{y}", "pair") not in routes:
                        raise ValueError(
                            f"pair.chain.{pair[0]}_{pair[1]} hops {x}->{y}, but pair.routes has "
                            f"no space linking {x} and {y}"
                        )
                plan[s][t] = path
                continue
            path = shortest_path(s, t, routes, modalities)
            if path is None:
                raise ValueError(
                    f"no route for {pair[0]}-{pair[1]}: pair.routes has no {pair[0]}_{pair[1]} "
                    f"space and no chain of routes links them (routes: "
                    f"{ {f'{a}_{b}': v for (a, b), v in routes.items()} }); add one, or leave "
                    f"one out with pair.modalities"
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


@dataclass
class Hop:
    """One retrieval hop of the tuples of one start: items of path[-2] -> items of path[-1]."""

    path: tuple[str, ...]  # the modalities from the start to this hop's target
    rows: slice  # the table rows of this start
    query: np.ndarray  # (rows,) pool rows of path[-2]
    item: np.ndarray  # (rows,) pool rows of path[-1] that the hop retrieved
    score: np.ndarray  # (rows,) float32 search score of (query, item)

    @property
    def name(self) -> str:
        """'x->y'."""
        return f"{self.path[-2]}->{self.path[-1]}"


def build_tuples(
    plan: Mapping[str, Mapping[str, list[str]]],
    nearest: Nearest,
    sizes: Mapping[str, int],
    modalities: Sequence[str] = MODALITIES,
) -> tuple[dict[str, np.ndarray], dict[tuple[str, ...], Hop], dict[tuple[str, str], list]]:
    """The tuple table, its hops and each (start, target) item's hops, before cleaning.

    nearest[(x, y)]: (scores (n_x, k_xy), rows (n_x, k_xy)) of the pool rows of y nearest to each
    pool row of x. Table rows run by start modality (MODALITIES order), then starting pool row,
    then rank r < topk: the r-th tuple takes the rank-r item of every modality retrieved directly
    from the start; later chain hops take the top-1 of the item before them. Columns: one per
    modality (int64, -1 where the start's plan has no path to it) and start (int8).
    Returns (table, hops {path prefix: Hop}, cells {(start, target): [path prefixes of its hops]}).
    """
    k = max(
        nearest[(s, path[1])][1].shape[1] for s, paths in plan.items() for path in paths.values()
    )
    columns: dict[str, list[np.ndarray]] = {m: [] for m in (*modalities, "start")}
    hops: dict[tuple[str, ...], Hop] = {}
    cells: dict[tuple[str, str], list[tuple[str, ...]]] = {}
    offset = 0
    for s in MODALITIES:
        if s not in plan:
            continue
        n = sizes[s] * k
        rows = slice(offset, offset + n)
        rank = np.tile(np.arange(k), sizes[s])
        items = {s: np.repeat(np.arange(sizes[s], dtype=np.int64), k)}
        for t, path in plan[s].items():
            cur, prefixes = items[s], []
            for h, (x, y) in enumerate(zip(path, path[1:], strict=False)):
                prefix = tuple(path[: h + 2])
                if prefix not in hops:
                    r = rank if h == 0 else 0
                    scores, found = nearest[(x, y)]
                    hops[prefix] = Hop(prefix, rows, cur, found[cur, r], scores[cur, r])
                cur = hops[prefix].item
                prefixes.append(prefix)
            items[t], cells[(s, t)] = cur, prefixes
        for m in modalities:
            columns[m].append(items.get(m, np.full(n, -1, np.int64)))
        columns["start"].append(np.full(n, MODALITIES.index(s), np.int8))
        offset += n
    return {c: np.concatenate(v) for c, v in columns.items()}, hops, cells


def dedupe(table: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Drop rows whose items (one per modality column, -1 included) repeat an earlier row."""
    items = np.stack([table[m] for m in modalities_of(table)], 1)
    _, first = np.unique(items, axis=0, return_index=True)
    keep = np.sort(first)
    return {c: v[keep] for c, v in table.items()}


def present_items(table: Mapping[str, np.ndarray]) -> np.ndarray:
    """(n,) how many items each tuple holds."""
    return np.sum([table[m] >= 0 for m in modalities_of(table)], axis=0)


# ---------------------------------------------------------------------------- cleaning


def mutual_keep(hop: Hop, nearest: Nearest) -> np.ndarray:
    """(rows,) bool: the hop's item retrieves its query back as top-1 (cycle-consistent)."""
    back = nearest[(hop.path[-1], hop.path[-2])][1][:, 0]
    return back[hop.item] == hop.query


def pair_similarity(
    x: np.ndarray, y: np.ndarray, rows_x: np.ndarray, rows_y: np.ndarray, chunk: int = 65536
) -> np.ndarray:
    """(n,) float32 inner products x[rows_x[i]] . y[rows_y[i]], read chunk by chunk."""
    out = np.empty(len(rows_x), np.float32)
    for i in range(0, len(rows_x), chunk):
        a, b = take_rows(x, rows_x[i : i + chunk]), take_rows(y, rows_y[i : i + chunk])
        out[i : i + chunk] = np.einsum("nd,nd->n", a, b)
    return out


def reuse_keep(hop: Hop, alive: np.ndarray, cap: int) -> np.ndarray:
    """(rows,) bool: of alive hops retrieving one item, the `cap` best scored (ties: lower row)."""
    idx = np.flatnonzero(alive)
    order = idx[np.lexsort((idx, -hop.score[idx], hop.item[idx]))]  # by item, best score first
    items = hop.item[order]
    new = np.r_[True, items[1:] != items[:-1]]
    group_start = np.maximum.accumulate(np.where(new, np.arange(len(order)), 0))
    keep = np.zeros(len(alive), bool)
    keep[order[np.arange(len(order)) - group_start < cap]] = True
    return keep


def soft_conf(hop: Hop, nearest: Nearest, k: int, temperature: float) -> np.ndarray:
    """(rows,) float32 weight of a first hop's rank-r item: softmax of its start's top-k scores."""
    scores = nearest[hop.path[:2]][0][hop.query][:, :k] / temperature  # (rows, k) per start item
    weights = np.exp(scores - scores.max(1, keepdims=True))
    weights /= weights.sum(1, keepdims=True)
    rank = np.tile(np.arange(k), len(hop.query) // k)
    return weights[np.arange(len(rank)), rank].astype(np.float32)


def apply_cells(
    table: Mapping[str, np.ndarray],
    cells: Mapping[tuple[str, str], list],
    hop_keep: Mapping[tuple, np.ndarray],
    hops: Mapping[tuple, Hop],
) -> dict[str, np.ndarray]:
    """A copy of the table where each item with a distrusted hop on its path is -1."""
    out = {c: v.copy() for c, v in table.items()}
    for (_, t), prefixes in cells.items():
        keep = np.logical_and.reduce([hop_keep[p] for p in prefixes])
        out[t][hops[prefixes[0]].rows][~keep] = -1
    return out


# ---------------------------------------------------------------------------- summary


def _concepts(labels: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """(n, L) concepts of pool rows from (pool,) labels or (pool, L) multi-labels (-1 pads).

    A missing item (row -1) has no concept (all -1).
    """
    labels = labels if labels.ndim == 2 else labels[:, None]
    out = labels[np.maximum(rows, 0)]
    out[rows < 0] = -1
    return out


def _overlap(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(n,) bool: the (n, La) and (n, Lb) concept rows name a common concept."""
    return ((a[:, :, None] == b[:, None, :]) & (a[:, :, None] >= 0)).any((1, 2))


def _agreement(table: Mapping[str, np.ndarray], labels: Mapping[str, np.ndarray]) -> dict:
    """Fine (or coarse) concept agreement of a table's tuples with their start item, per start.

    concept_agreement[s]: fraction of tuples started from s whose present items all share a
    concept with the starting item (multi-label items: any of their labels). chance_agreement[s]:
    the same for main labels if the other present items were drawn uniformly from their pools.
    target_agreement[s][t]: fraction of those holding a t item whose t item shares one.
    concept_agreement_overall: the fraction over all tuples.
    """
    mods = [m for m in modalities_of(table) if m in labels]
    main = {m: labels[m] if labels[m].ndim == 1 else labels[m][:, 0] for m in mods}
    n_concepts = 1 + max(int(main[m].max()) for m in mods)
    share = {m: np.bincount(main[m], minlength=n_concepts) / len(main[m]) for m in mods}
    starts = table["start"]
    agree, chance, target = {}, {}, {}
    whole = np.zeros(len(starts), bool)
    for i, s in enumerate(MODALITIES):
        rows = starts == i
        if s not in mods or not rows.any():
            continue
        own = _concepts(labels[s], table[s][rows])
        others = [t for t in mods if t != s]
        has = {t: table[t][rows] >= 0 for t in others}
        same = {t: _overlap(_concepts(labels[t], table[t][rows]), own) for t in others}
        whole[rows] = np.logical_and.reduce([same[t] | ~has[t] for t in others])
        agree[s] = float(whole[rows].mean())
        target[s] = {t: float(same[t][has[t]].mean()) if has[t].any() else None for t in others}
        own_main = main[s][table[s][rows]]
        p = np.prod([np.where(has[t], share[t][own_main], 1.0) for t in others], axis=0)
        chance[s] = float(p.mean())
    return dict(
        concept_agreement=agree,
        chance_agreement=chance,
        target_agreement=target,
        concept_agreement_overall=float(whole.mean()) if len(whole) else None,
    )


def summarize(
    table: Mapping[str, np.ndarray],
    labels: Mapping[str, np.ndarray] | None,
    coarse: Mapping[str, np.ndarray] | None = None,
) -> dict:
    """Counts per starting modality and, given pool labels, how often tuples share a concept.

    The keys of `_agreement` for the fine labels, and under `coarse` for the coarse ones.
    """
    starts = table["start"]
    out: dict = {
        "tuples": int(len(starts)),
        "counts": {m: int((starts == i).sum()) for i, m in enumerate(MODALITIES)},
        "items": {m: int((table[m] >= 0).sum()) for m in modalities_of(table)},
    }
    if labels is None:
        return out
    out.update(_agreement(table, labels))
    if coarse is not None:
        out["coarse"] = _agreement(table, coarse)
    return out


def hop_stats(
    hops: Mapping[tuple, Hop],
    keep: Mapping[tuple, np.ndarray],
    labels: Mapping[str, np.ndarray] | None,
    coarse: Mapping[str, np.ndarray] | None,
) -> dict[str, dict]:
    """Per hop 'x->y' over all starts: count, kept fraction, fine and coarse agreement kept."""
    grouped: dict[str, list[tuple]] = {}
    for prefix, hop in hops.items():
        grouped.setdefault(hop.name, []).append(prefix)
    out = {}
    for name, prefixes in grouped.items():
        x, y = name.split("->")
        kept = np.concatenate([keep[p] for p in prefixes])
        entry: dict = {"hops": int(len(kept)), "kept_fraction": float(kept.mean())}
        for key, lab in (("fine", labels), ("coarse", coarse)):
            if lab is None or not kept.any():
                continue
            q = np.concatenate([hops[p].query for p in prefixes])[kept]
            it = np.concatenate([hops[p].item for p in prefixes])[kept]
            entry[key] = float(_overlap(_concepts(lab[x], q), _concepts(lab[y], it)).mean())
        out[name] = entry
    return out


def rule_stats(
    rule: str,
    table: Mapping[str, np.ndarray],
    before: int,
    hops: Mapping[tuple, Hop],
    keep: Mapping[tuple, np.ndarray],
    labels: Mapping[str, np.ndarray] | None,
    coarse: Mapping[str, np.ndarray] | None,
) -> dict:
    """One rule's entry in the summary: tuples kept, items per start and agreement."""
    s = summarize(table, labels, coarse)
    out = dict(rule=rule, tuples=s["tuples"], kept_fraction=s["tuples"] / max(before, 1),
               counts=s["counts"], items=s["items"])  # fmt: skip
    if labels is not None:
        out["fine"] = {k: s[k] for k in ("concept_agreement", "target_agreement")}
        out["fine"]["overall"] = s["concept_agreement_overall"]
    if coarse is not None:
        c = s["coarse"]
        out["coarse"] = {k: c[k] for k in ("concept_agreement", "target_agreement")}
        out["coarse"]["overall"] = c["concept_agreement_overall"]
    out["hops"] = hop_stats(hops, keep, labels, coarse)
    return out


def flat_metrics(entry: Mapping, prefix: str) -> dict[str, float]:
    """{'prefix/a/b': number} of every number in a nested summary entry (for a logger)."""
    out = {}
    for key, value in entry.items():
        name = f"{prefix}/{key}".replace("->", "_to_")
        if isinstance(value, Mapping):
            out.update(flat_metrics(value, name))
        elif isinstance(value, int | float) and not isinstance(value, bool):
            out[name] = float(value)
    return out


# ---------------------------------------------------------------------------- the stage


def _open_pools(
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
                    f"({c.count} vs {c0.count} rows, or other ids); a tuple row must name one item"
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
    explicit = {_pair_key(k, "pair.clean.cross_spaces"): str(v)
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


def run(cfg: DictConfig) -> float | None:
    """Build, clean and summarise the pseudo tuple table; returns the mean concept agreement."""
    pc = cfg.pair
    clean = Clean.from_config(pc.get("clean"))
    min_tuples = int(pc.get("min_tuples", 1))
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
    starts = [check_modality(s, "pair.starts") for s in pc.starts]
    if not starts:
        raise ValueError("pair.starts is empty; name at least one starting modality")
    if [s for s in starts if s not in modalities]:
        log.warning("pair: starts %s left out: the run covers %s",
                    [s for s in starts if s not in modalities], modalities)  # fmt: skip
    starts = [s for s in starts if s in modalities]
    if not starts:
        raise ValueError(f"pair.starts={list(pc.starts)}: none is among the run's {modalities}")
    plan = plan_paths(starts, routes, to_plain(pc.chain) if pc.chain else {}, modalities)
    used = {_pair_key(f"{x}_{y}", "pair") for paths in plan.values() for p in paths.values()
            for x, y in zip(p, p[1:], strict=False)}  # fmt: skip
    routes = {pair: space for pair, space in routes.items() if pair in used}
    cross = _cross_spaces(clean, routes, spaces, root, pc.dataset) if clean.cross else {}
    if cross:
        spaces = {**spaces, **space_configs(s for s in set(cross.values()) - set(spaces) if s)}
        for pair, space in cross.items():
            if space is not None:
                check_route_spaces({pair: space}, spaces)
    needs = [(s, m) for pair, s in (*routes.items(), *cross.items()) if s for m in pair]
    caches = _open_pools(root, pc.dataset, needs, spaces)
    sizes = {m: c.count for (_, m), c in caches.items()}

    # Which directed hops are needed, and with how many ranks: first hops from a start need topk.
    k = int(pc.topk)
    if k < 1:
        raise ValueError(f"pair.topk={k}; expected an integer >= 1")
    hops_k: dict[tuple[str, str], int] = {}
    for paths in plan.values():
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
    # Search passes: (space, a, b, {direction: k}, CSLS?, second space?); one pass serves both
    # directions of a route; a second space's pass gives the cross-space top-k.
    passes = []
    for (a, b), name in routes.items():
        want = {d: hops_k[d] for d in ((a, b), (b, a)) if d in hops_k}
        passes.append((name, a, b, want, clean.csls > 0, False))
        if cross.get((a, b)) and clean.cross_k:
            passes.append((cross[(a, b)], a, b, dict.fromkeys(want, clean.cross_k), False, True))
    device = resolve_device(pc.device)
    chunk, gchunk, backend = int(pc.chunk), int(pc.gallery_chunk), str(pc.backend)
    kw = dict(backend=backend, chunk=chunk, gallery_chunk=gchunk, device=device)
    total = sum(search_steps(sizes[a], sizes[b], (a, b) in w, (b, a) in w, backend, chunk, gchunk)
                + (csls and search_steps(sizes[a], sizes[b], True, True, backend, chunk, gchunk))
                for _, a, b, w, csls, _ in passes)  # fmt: skip

    nearest: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = {}
    second: dict[tuple[str, str], np.ndarray] = {}  # cross_k rows in the second space
    report = []
    t0 = time.perf_counter()
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeRemainingColumn()]  # fmt: skip
    with Progress(*columns, disable=not pc.progress) as bar:
        task = bar.add_task("pair: exact top-k search", total=total)
        advance = lambda n: bar.advance(task, n)  # noqa: E731
        for name, a, b, want, csls, is_second in passes:
            bar.update(task, description=f"pair: {a}-{b} in {name}")
            ta = time.perf_counter()
            xa, xb = pool_rows(caches[(name, a)]), pool_rows(caches[(name, b)])
            bias = {}
            if csls:
                if clean.csls > min(sizes[a], sizes[b]):
                    raise ValueError(f"pair.clean.csls={clean.csls} exceeds the {a} or {b} pool")
                a_bias, b_bias = csls_bias(xa, xb, clean.csls, advance=advance, **kw)
                bias = dict(a_bias=a_bias, b_bias=b_bias)
            res = search(xa, xb, max(want.values()), a_to_b=(a, b) in want,
                         b_to_a=(b, a) in want, advance=advance, **bias, **kw)  # fmt: skip
            for key, (x, y) in (("a_to_b", (a, b)), ("b_to_a", (b, a))):
                if key not in res:
                    continue
                scores, rows = res[key][0][:, : want[(x, y)]], res[key][1][:, : want[(x, y)]]
                if is_second:
                    second[(x, y)] = rows
                else:
                    nearest[(x, y)] = (scores, rows)
                report.append(dict(space=name, query=x, gallery=y, queries=len(rows),
                                   gallery_rows=sizes[y], topk=want[(x, y)], csls=bool(csls),
                                   role="cross_space" if is_second else "route",
                                   mean_top1_score=float(scores[:, 0].mean())))  # fmt: skip
            log.info("pair: %s-%s in %s: %.1f s", a, b, name, time.perf_counter() - ta)
    seconds = time.perf_counter() - t0

    table, hops, cells = build_tuples(plan, nearest, sizes, modalities)
    raw_n = len(table["start"])
    labels = coarse = None
    if all(c.has("labels") for c in caches.values()):
        # Multi-label items (world v2 audio) agree with an item sharing any of their labels.
        labels = {m: c.extra("multilabels") if c.has("multilabels") else c.extra("labels")
                  for (_, m), c in caches.items()}  # fmt: skip
    if labels is not None and all(c.has("coarse") for c in caches.values()):
        coarse = {m: c.extra("coarse") for (_, m), c in caches.items()}
    text_prov = None
    if "text" in modalities:
        text_cache = next(c for (_, m), c in caches.items() if m == "text")
        if not text_cache.has("provenance"):
            raise CacheError(
                f"{text_cache.directory}: the text pool has no 'provenance' array "
                f"(index into {list(PROVENANCES)}); the tuple table needs it"
            )
        text_prov = text_cache.extra("provenance")

    # Cleaning: each rule narrows the per-hop keep masks; an item needs every hop on its path.
    hop_keep = {p: np.ones(len(h.item), bool) for p, h in hops.items()}
    stages = []

    def alive(prefix: tuple) -> np.ndarray:
        return np.logical_and.reduce([hop_keep[prefix[: i + 1]] for i in range(1, len(prefix))])

    def measure(rule: str) -> None:
        cleaned = apply_cells(table, cells, hop_keep, hops)
        cleaned = {c: v[present_items(cleaned) >= 2] for c, v in cleaned.items()}
        entry = rule_stats(rule, cleaned, raw_n, hops, {p: alive(p) for p in hops}, labels, coarse)
        stages.append(entry)
        log.info("pair: %s keeps %d of %d tuples", rule, entry["tuples"], raw_n)
        if entry["tuples"] < min_tuples:
            raise ValueError(
                f"pair: rule {rule!r} keeps {entry['tuples']} tuples of {raw_n}, fewer than "
                f"pair.min_tuples={min_tuples}; loosen the rule or lower pair.min_tuples"
            )

    measure("csls" if clean.csls else "none")
    if clean.mutual:
        for p, hop in hops.items():
            hop_keep[p] &= mutual_keep(hop, nearest)
        measure("mutual")
    if clean.cross:
        for p, hop in hops.items():
            x, y = p[-2:]
            space = cross.get(_pair_key(f"{x}_{y}", "pair"))
            if space is None:  # no second space embeds both: the hop stays as it is
                continue
            ok = np.zeros(len(hop.item), bool)
            if clean.cross_k:
                ok |= (second[(x, y)][hop.query] == hop.item[:, None]).any(1)
            if clean.cross_threshold is not None:
                xs, ys = pool_rows(caches[(space, x)]), pool_rows(caches[(space, y)])
                ok |= pair_similarity(xs, ys, hop.query, hop.item) >= clean.cross_threshold
            hop_keep[p] &= ok
        measure("cross_space")
    if clean.provenance and text_prov is not None:
        # A text-started hop to m is kept when the caption's provenance may describe m.
        allowed = {m: [PROVENANCES.index(p) for p, ts in clean.provenance_targets.items()
                       if m in ts] for m in modalities}  # fmt: skip
        for p, hop in hops.items():
            if p[0] == "text":
                prov = text_prov[table["text"][hop.rows]]
                hop_keep[p] &= (prov < 0) | np.isin(prov, allowed[p[-1]])
        measure("provenance")
    if clean.max_reuse:
        for p, hop in hops.items():
            hop_keep[p] &= reuse_keep(hop, alive(p), clean.max_reuse)
        measure("max_reuse")

    final = apply_cells(table, cells, hop_keep, hops)
    top_conf = {}  # mean weight of the rank-0 tuple of each start item, per start and target
    if clean.soft:
        if k == 1:
            log.warning("pair.clean.soft with pair.topk=1: every weight is 1")
        for (s, t), prefixes in cells.items():
            conf = final.setdefault(f"conf_{t}", np.ones(raw_n, np.float32))
            first = soft_conf(hops[prefixes[0]], nearest, k, clean.soft_temperature)
            conf[hops[prefixes[0]].rows] = first
            top_conf[f"{s}->{t}"] = float(first[::k].mean())
        for m in modalities:
            final.setdefault(f"conf_{m}", np.ones(raw_n, np.float32))
            final[f"conf_{m}"][final[m] < 0] = 0
    final = {c: v[present_items(final) >= 2] for c, v in final.items()}
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

    output = Path(pc.output)
    meta = dict(source="pair", modalities=modalities,
                routes={f"{a}_{b}": s for (a, b), s in routes.items()}, paths=plan, topk=k,
                dedupe=bool(pc.dedupe), clean=to_plain(vars(clean)))  # fmt: skip
    save_tuples(output, final, pool=pc.dataset, **meta)
    summary = dict(
        output=str(output),
        root=str(root),
        pool=pc.dataset,
        pool_sizes=sizes,
        **meta,
        routes_skipped=skipped,
        cross_spaces={f"{a}_{b}": s for (a, b), s in cross.items()},
        backend=backend,
        device=str(device),
        **summarize(final, labels, coarse),
        duplicates_removed=before - len(final["start"]),
        rules=stages,
        search=report,
        search_seconds=round(seconds, 3),
    )
    if clean.soft:
        summary["soft_top_conf"] = top_conf
    atomic_write_json(output.with_name(SUMMARY), summary)
    log.info("pair: %d tuples -> %s", len(final["start"]), output)
    lineage.log_pair(_log_metrics(cfg, stages), output, summary)  # its table and Artifact
    if labels is not None:
        log.info("pair: concept agreement %s (chance %s)",
                 {m: round(v, 3) for m, v in summary["concept_agreement"].items()},
                 {m: round(v, 4) for m, v in summary["chance_agreement"].items()})  # fmt: skip
        return float(np.mean(list(summary["concept_agreement"].values())))
    return None


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
