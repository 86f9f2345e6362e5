"""The pair stage's plan: routes, each start's path to each target, and the tuples they give.

`pair.routes` names the space linking a pair of modalities; a pair with no route is chained
through `pair.chain`, else along the shortest path over the routes. `build_tuples` turns the
exact top-k of every hop (lightning_modules/pairing/search.py) into the tuple table before cleaning,
keeping each hop (`Hop`) so the cleaning rules (lightning_modules/pairing/clean.py) can act on it.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from datamodules.tuples import modalities_of
from encoders.modalities import MODALITIES, check_modality

# {(x, y): (scores (n_x, k) float32, pool rows of y (n_x, k))}: each x item's nearest y items.
Nearest = Mapping[tuple[str, str], tuple[np.ndarray, np.ndarray]]


# ---------------------------------------------------------------------------- the plan


def pair_key(key: str, where: str) -> tuple[str, str]:
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
        pair = pair_key(key, "pair.routes")
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
            if all(pair_key(f"{x}_{y}", "pair") in routes for x, y in itertools.pairwise(path)):
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
        pair = pair_key(key, "pair.chain")
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
            pair = pair_key(f"{s}_{t}", "pair")
            if pair in routes:
                plan[s][t] = [s, t]
                continue
            if pair in chains and set(chains[pair]) <= set(modalities):
                path = chains[pair] if chains[pair][0] == s else chains[pair][::-1]
                for x, y in itertools.pairwise(path):
                    if pair_key(f"{x}_{y}", "pair") not in routes:
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


class Tuples(NamedTuple):
    """The tuple table before cleaning, its hops, and the hops each (start, target) item took."""

    table: dict[str, np.ndarray]  # one column per modality (-1: missing) and start
    hops: dict[tuple[str, ...], Hop]  # {path prefix from the start to the hop's target: Hop}
    cells: dict[tuple[str, str], list[tuple[str, ...]]]  # {(start, target): its hops' prefixes}


def build_tuples(
    plan: Mapping[str, Mapping[str, list[str]]],
    nearest: Nearest,
    sizes: Mapping[str, int],
    modalities: Sequence[str] = MODALITIES,
) -> Tuples:
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
    return Tuples({c: np.concatenate(v) for c, v in columns.items()}, hops, cells)


def dedupe(table: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Drop rows whose items (one per modality column, -1 included) repeat an earlier row."""
    items = np.stack([table[m] for m in modalities_of(table)], 1)
    _, first = np.unique(items, axis=0, return_index=True)
    keep = np.sort(first)
    return {c: v[keep] for c, v in table.items()}


def present_items(table: Mapping[str, np.ndarray]) -> np.ndarray:
    """(n,) how many items each tuple holds."""
    return np.sum([table[m] >= 0 for m in modalities_of(table)], axis=0)


def paired(table: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The rows that still hold two items or more (a lone item pairs with nothing)."""
    keep = present_items(table) >= 2
    return {c: v[keep] for c, v in table.items()}
