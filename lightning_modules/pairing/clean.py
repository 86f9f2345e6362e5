"""The cleaning rules of the pair stage (`pair.clean`): which hops of the tuple table to trust.

Cleaning acts per pair term, not per tuple: each rule narrows a (rows,) keep mask per hop
(`pair_plan.Hop`), and `apply_cells` sets every item whose path passes a distrusted hop to -1
(missing). The stage applies them in order (csls in the search itself, then mutual, cross_space,
provenance, max_reuse) and measures the tuples left after each; `soft` then weighs the items.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Annotated, Literal

import numpy as np
from pydantic import (
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
)
from pydantic.dataclasses import dataclass

from datamodules.tuples import modalities_of
from encoders.modalities import MODALITIES, PROVENANCES
from lightning_modules.pairing.plan import Hop, Nearest
from lightning_modules.pairing.search import ShardRows, take_rows
from lightning_modules.runtime.config import to_plain

NonNegative = Annotated[StrictInt, Field(ge=0)]  # 0: the rule is off


@dataclass(frozen=True, config=ConfigDict(extra="forbid"))
class Clean:
    """The cleaning rules of `pair.clean`; conf/config.yaml declares and documents each value."""

    csls: NonNegative
    mutual: StrictBool
    cross_k: NonNegative
    cross_threshold: StrictFloat | None
    cross_spaces: dict[StrictStr, StrictStr]
    provenance: StrictBool
    provenance_targets: dict[Literal[PROVENANCES], list[Literal[MODALITIES]]]
    max_reuse: NonNegative
    soft: StrictBool
    soft_temperature: Annotated[StrictFloat, Field(gt=0)]

    @classmethod
    def from_config(cls, cfg: Mapping) -> Clean:
        """`pair.clean` as a Clean; a wrong, missing or unknown key raises naming it."""
        try:
            return cls(**to_plain(cfg))
        except ValidationError as e:
            problems = [f"pair.clean.{'.'.join(map(str, err['loc']))}: {err['msg']}"
                        for err in e.errors()]  # fmt: skip
            raise ValueError("; ".join(problems)) from None

    def provenance_codes(self, m: str) -> list[int]:
        """The provenance indices whose captions may describe an item of m (provenance_targets)."""
        return [PROVENANCES.index(p) for p, ts in self.provenance_targets.items() if m in ts]

    @property
    def cross(self) -> bool:
        """Whether the cross-space agreement rule is on."""
        return self.cross_k > 0 or self.cross_threshold is not None


def hop_alive(keep: Mapping[tuple, np.ndarray], prefix: tuple) -> np.ndarray:
    """(rows,) bool: every hop on the path from the start to prefix[-1] is kept."""
    return np.logical_and.reduce([keep[prefix[: i + 1]] for i in range(1, len(prefix))])


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


def cross_keep(
    hop: Hop,
    second_topk: np.ndarray | None,
    second_pools: tuple[np.ndarray | ShardRows, np.ndarray | ShardRows],
    threshold: float | None,
) -> np.ndarray:
    """(rows,) bool: a second space agrees with the hop's item.

    It agrees when the item is among its query's top-k there (second_topk: (query pool rows,
    cross_k) item rows, None: off) or when their inner product there, read from second_pools
    (the query's and the item's pool rows in that space), is >= threshold (None: off).
    """
    ok = np.zeros(len(hop.item), bool)
    if second_topk is not None:
        ok |= (second_topk[hop.query] == hop.item[:, None]).any(1)
    if threshold is not None:
        xs, ys = second_pools
        ok |= pair_similarity(xs, ys, hop.query, hop.item) >= threshold
    return ok


def provenance_keep(provenance: np.ndarray, allowed: Sequence[int]) -> np.ndarray:
    """(rows,) bool: the caption's provenance is unknown (-1) or one that may describe the item."""
    return (provenance < 0) | np.isin(provenance, allowed)


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


def soft_weights(
    table: Mapping[str, np.ndarray],
    cells: Mapping[tuple[str, str], list],
    hops: Mapping[tuple, Hop],
    nearest: Nearest,
    k: int,
    temperature: float,
) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """conf_<m> columns (rows,) float32 of a cleaned table, and each 'start->target' mean weight.

    An item retrieved from the start weighs `soft_conf` of its first hop, any other present item 1
    and a missing item 0; the mean is over the rank-0 tuples of each start item.
    """
    n = len(table["start"])
    conf: dict[str, np.ndarray] = {}
    top_conf: dict[str, float] = {}
    for (s, t), prefixes in cells.items():
        first = soft_conf(hops[prefixes[0]], nearest, k, temperature)
        conf.setdefault(f"conf_{t}", np.ones(n, np.float32))[hops[prefixes[0]].rows] = first
        top_conf[f"{s}->{t}"] = float(first[::k].mean())
    for m in modalities_of(table):
        conf.setdefault(f"conf_{m}", np.ones(n, np.float32))[table[m] < 0] = 0
    return conf, top_conf
