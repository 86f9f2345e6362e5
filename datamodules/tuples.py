"""Pseudo item tuples: the columnar table that the pair stage writes and bind/route read.

A table is an `.npz` with one row per tuple:
    <modality>      int64 row into that modality's pool cache, -1 where the tuple has no item of
                    it; one column per modality the run covers (any subset of MODALITIES)
    start           int8 index into MODALITIES: the modality the tuple started from (always present)
    provenance      int8 index into PROVENANCES: the text's provenance, -1 if unknown or no text
    conf_<modality> optional float32 in [0, 1]: confidence of the tuple's item of that modality
                    (1 for the start item, 0 where missing); absent means all ones
    meta            a JSON string: the pool dataset name and where the tuples came from; a pair
                    stage table also records its plan: `paths` {start: {target: [start, ...,
                    target]}} and `routes` {<m>_<m>: space}, i.e. which space retrieved each hop
                    (the same for every tuple of a start; `link_retrievers` reads it)
"""

from __future__ import annotations

import io
import itertools
import json
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from datamodules.artifacts import CacheError, atomic_write
from encoders.modalities import MODALITIES, PAIRS, PROVENANCES

REQUIRED = ("start", "provenance")
COLUMNS = (*MODALITIES, *REQUIRED)  # every column a table may hold besides conf_<m> and meta


def _check(path: Path, table: Mapping[str, np.ndarray]) -> list[str]:
    """Validate a table's columns; returns its modalities. Errors name the file and column."""
    missing = [c for c in REQUIRED if c not in table]
    modalities = [m for m in MODALITIES if m in table]
    if missing or not modalities:
        raise CacheError(
            f"{path}: tuple table lacks columns {missing or 'of any modality'} "
            f"(expected start, provenance and some of {list(MODALITIES)})"
        )
    unknown = sorted(set(table) - {*COLUMNS, *(f"conf_{m}" for m in modalities), "meta"})
    if unknown:
        raise CacheError(f"{path}: tuple table has unknown columns {unknown}")
    n = len(table["start"])
    for c in table:
        if c != "meta" and len(table[c]) != n:
            raise CacheError(f"{path}: column {c!r} has {len(table[c])} rows, expected {n}")
    if not n:
        return modalities
    start = np.asarray(table["start"])
    if start.min() < 0 or start.max() >= len(MODALITIES):
        raise CacheError(f"{path}: column 'start' out of range [0, {len(MODALITIES)})")
    prov = np.asarray(table["provenance"])
    if prov.min() < -1 or prov.max() >= len(PROVENANCES):
        raise CacheError(f"{path}: column 'provenance' out of range [-1, {len(PROVENANCES)})")
    for m in modalities:
        if np.asarray(table[m]).min() < -1:
            raise CacheError(f"{path}: column {m!r} has rows below -1 (-1 marks a missing item)")
        conf = table.get(f"conf_{m}")
        if conf is not None and not (np.all(conf >= 0) and np.all(conf <= 1)):
            raise CacheError(f"{path}: column 'conf_{m}' has values outside [0, 1]")
    for i, m in enumerate(MODALITIES):
        rows = start == i
        if rows.any() and (m not in table or np.asarray(table[m])[rows].min() < 0):
            raise CacheError(f"{path}: tuples started from {m} lack their {m} item")
    return modalities


def save_tuples(path: str | os.PathLike, table: dict[str, np.ndarray], pool: str, **meta) -> None:
    """Write a tuple table atomically; `pool` names the dataset whose caches the rows index."""
    path = Path(path)
    modalities = _check(path, table)
    arrays = {m: np.asarray(table[m], np.int64) for m in modalities}
    arrays.update({c: np.asarray(table[c], np.int8) for c in REQUIRED})
    arrays.update({c: np.asarray(v, np.float32) for c, v in table.items() if c.startswith("conf_")})
    arrays["meta"] = np.array(json.dumps(dict(pool=pool, **meta)))

    def write(f):
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        f.write(buf.getvalue())

    atomic_write(path, write)


def check_pool_rows(
    path: str | os.PathLike, table: Mapping[str, np.ndarray], sizes: Mapping[str, int]
) -> None:
    """Refuse a table whose rows fall outside a pool: sizes {modality: pool row count}."""
    for m, count in sizes.items():
        if m not in table or not len(table[m]):
            continue
        top = int(np.max(table[m]))
        if top >= count:
            raise CacheError(
                f"{path}: column {m!r} indexes row {top}, but the {m} pool holds {count} rows "
                f"(tuples from another pool?)"
            )


def load_tuples(
    path: str | os.PathLike, pool_sizes: Mapping[str, int] | None = None
) -> tuple[dict[str, np.ndarray], dict]:
    """Read a tuple table; returns (columns, meta). Fails naming the file and the problem.

    pool_sizes {modality: rows}, when given, refuses rows outside a pool (`check_pool_rows`).
    """
    path = Path(path)
    if not path.exists():
        raise CacheError(
            f"{path}: no such tuple table (run the pair stage, or use bind.pairs=oracle)"
        )
    try:
        with np.load(path) as z:
            data = {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise CacheError(f"{path}: unreadable tuple table ({e})") from e
    if "meta" not in data:
        raise CacheError(f"{path}: tuple table lacks columns ['meta']")
    meta = json.loads(str(data.pop("meta")))
    _check(path, data)
    if pool_sizes is not None:
        check_pool_rows(path, data, pool_sizes)
    return data, meta


def modalities_of(table: Mapping[str, np.ndarray]) -> list[str]:
    """The modalities a table has columns for, in MODALITIES order."""
    return [m for m in MODALITIES if m in table]


def weights_of(table: Mapping[str, np.ndarray], m: str) -> np.ndarray:
    """(n,) float32 weight of each tuple's item of m: conf_m (1 if absent), 0 where missing."""
    present = np.asarray(table[m]) >= 0
    conf = table.get(f"conf_{m}")
    conf = np.ones(len(present), np.float32) if conf is None else np.asarray(conf, np.float32)
    return np.where(present, conf, np.float32(0))


def link_retrievers(path: str | os.PathLike, meta: Mapping) -> dict[str, dict[str, list[str]]]:
    """{start: {"<a>_<b>": [space, ...]}}: the spaces that retrieved the link between a and b.

    A tuple's items form a tree rooted at its start item, one hop per edge (the pair stage's plan
    in `meta`: `paths` and `routes`). The link between two items is the tree path between them,
    and each hop on it was retrieved by the space `routes` names for that pair of modalities.
    """
    paths, routes = meta.get("paths"), meta.get("routes")
    if not paths or not routes:
        raise CacheError(
            f"{path}: the tuple table records no retrieval plan (meta paths and routes), so the "
            "space behind each hop is unknown; it was not made by the pair stage (oracle tuples "
            "have no retrievers). Use route.align=all, or pseudo tuples (python train.py "
            "stage=pair)"
        )
    out: dict[str, dict[str, list[str]]] = {}
    for start, targets in paths.items():
        hops: dict[str, tuple[str, str]] = {}  # item -> (its parent, the space that retrieved it)
        for chain in targets.values():
            for x, y in itertools.pairwise(chain):
                a, b = sorted((x, y), key=MODALITIES.index)
                hops[y] = (x, routes[f"{a}_{b}"])

        present = {start, *hops}
        out[start] = {
            f"{a}_{b}": sorted({hops[m][1] for m in _up(a, start, hops) ^ _up(b, start, hops)})
            for a, b in PAIRS
            if a in present and b in present
        }
    return out


def _up(m: str, start: str, hops: Mapping[str, tuple[str, str]]) -> set[str]:
    """The items between m and the start item of a tuple's tree (m included, the start not)."""
    seen = set()
    while m != start:
        seen.add(m)
        m = hops[m][0]
    return seen
