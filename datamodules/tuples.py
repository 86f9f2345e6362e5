"""Pseudo item tuples: the columnar table that the pair stage writes and bind/route read.

A table is an `.npz` with one row per tuple:
    point, audio, image, text   int64 row indices into each modality's pool cache
    start                       int8 index into MODALITIES: the modality the tuple started from
    provenance                  int8 index into PROVENANCES: the text's provenance
    meta                        a JSON string: the pool dataset name and where the tuples came from
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np

from datamodules.cache import CacheError, atomic_write
from encoders.modalities import MODALITIES, PROVENANCES

COLUMNS = (*MODALITIES, "start", "provenance")


def save_tuples(path: str | os.PathLike, table: dict[str, np.ndarray], pool: str, **meta) -> None:
    """Write a tuple table atomically; `pool` names the dataset whose caches the rows index."""
    missing = [c for c in COLUMNS if c not in table]
    if missing:
        raise CacheError(f"{path}: tuple table lacks columns {missing}")
    n = len(table["start"])
    arrays = {}
    for c in COLUMNS:
        if len(table[c]) != n:
            raise CacheError(f"{path}: column {c!r} has {len(table[c])} rows, expected {n}")
        arrays[c] = np.asarray(table[c], np.int8 if c in ("start", "provenance") else np.int64)
    arrays["meta"] = np.array(json.dumps(dict(pool=pool, **meta)))

    def write(f):
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        f.write(buf.getvalue())

    atomic_write(Path(path), write)


def load_tuples(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict]:
    """Read a tuple table; returns (columns, meta). Fails naming the file and the problem."""
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
    missing = [c for c in (*COLUMNS, "meta") if c not in data]
    if missing:
        raise CacheError(f"{path}: tuple table lacks columns {missing}")
    meta = json.loads(str(data.pop("meta")))
    n = len(data["start"])
    for c in COLUMNS:
        if len(data[c]) != n:
            raise CacheError(f"{path}: column {c!r} has {len(data[c])} rows, expected {n}")
    if n and (data["start"].min() < 0 or data["start"].max() >= len(MODALITIES)):
        raise CacheError(f"{path}: column 'start' out of range [0, {len(MODALITIES)})")
    if n and (data["provenance"].min() < 0 or data["provenance"].max() >= len(PROVENANCES)):
        raise CacheError(f"{path}: column 'provenance' out of range [0, {len(PROVENANCES)})")
    return data, meta
