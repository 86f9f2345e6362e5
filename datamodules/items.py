"""Item lists: which raw items a (dataset, modality) source holds, their keys, labels, provenance.

A raw data config (`conf/data/demo_raw.yaml`) lists datasets, and per dataset one source per
modality:
    image, audio, point   a folder (searched recursively), or a list: .txt (one path per line),
                          .csv / .json / .jsonl records with `path` (and optional `label`, `id`);
                          list paths are relative to the list's folder
    image with `frames`   video: sub-folders of frame images, (T, H, W, 3) .npy arrays, or video
                          files (.mp4 etc., decoded with PyAV); see encoders/readers.py
    text                  .txt (one caption per line), .csv / .json / .jsonl records with `text`,
                          a `provenance` (point | audio | image), and optional `label`, `id`,
                          `item`. Provenance is required: per row, or for the whole source with
                          `provenance: <modality>` (`unknown` when it is not known).
                          `items: <modality>` makes it a caption list of that modality's items
                          (several captions per item, COCO / MSR-VTT style): each row's `item`
                          names an item's key, written as the `item` extra (that item's row).
An item's id is its row in that list (sorted paths for folders); its key is its path relative to
the source without suffix, or a record's `id`. Extras: `labels` (`labels: dirs` takes the class
from the parent folder), for text `provenance` and, for caption lists, `item`.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from encoders.modalities import PROVENANCES, check_modality
from encoders.readers import EXTENSIONS, VIDEO_EXTENSIONS, RawDataError

PROVENANCE_ALIASES = {"3d": "point", "sound": "audio", **{p: p for p in PROVENANCES}}
UNKNOWN = "unknown"  # a source's provenance that is not known: written as -1


@dataclass
class Items:
    """The items of one (dataset, modality): row i has id i."""

    modality: str
    keys: list[str]
    sources: list[str]  # file paths, or the texts themselves
    extras: dict[str, np.ndarray] = field(default_factory=dict)
    classes: list[str] | None = None  # label names, when labels were given as names
    refs: list[str] | None = None  # a caption list: each row's item key (see link_captions)
    root: str | None = None  # the folder file sources are listed under (None: sources are texts)

    def __len__(self) -> int:
        return len(self.keys)

    def digest(self) -> str:
        """A hash of the keys, sources and extras, for cache fingerprints. A file enters by its
        path relative to `root`, size and modification time: moving the folder keeps it."""
        h = hashlib.sha256()
        for key, source in zip(self.keys, self.sources, strict=True):
            if self.root is not None:
                path = Path(source)
                stat = path.stat() if path.exists() else None
                size, mtime = (stat.st_size, stat.st_mtime_ns) if stat else (-1, -1)
                source = f"{Path(os.path.relpath(path, self.root)).as_posix()}\0{size}\0{mtime}"
            h.update(f"{key}\0{source}\0".encode())
        for name, arr in sorted(self.extras.items()):
            h.update(name.encode() + np.ascontiguousarray(arr).tobytes())
        return h.hexdigest()[:16]


def read_records(path: Path) -> list[Any]:
    """Rows of a .txt / .csv / .json / .jsonl list: strings or dicts."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise RawDataError(f"{path}: unreadable list ({e})") from e
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return [line.strip() for line in text.splitlines() if line.strip()]
    if suffix == ".csv":
        return list(csv.DictReader(io.StringIO(text)))
    if suffix == ".json":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise RawDataError(f"{path}: not valid JSON ({e})") from e
        if not isinstance(rows, list):
            raise RawDataError(f"{path}: expected a JSON list of records or strings")
        return rows
    if suffix == ".jsonl":
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise RawDataError(f"{path}:{n}: not valid JSON ({e})") from e
        return rows
    raise RawDataError(f"{path}: a list must be .txt, .csv, .json or .jsonl")


def _field(row: Any, names: Sequence[str], where: str, required: bool = True) -> Any:
    """A record's first given field of `names`; a blank one (empty or only whitespace) is not
    given. A string row is its own text or path."""
    if isinstance(row, str):
        row = {names[0]: row} if names[0] in ("text", "path") else {}
    if not isinstance(row, Mapping):
        raise RawDataError(f"{where}: expected a record (object) or a string, got {row!r}")
    for name in names:
        value = row.get(name)
        if value is not None and not (isinstance(value, str) and not value.strip()):
            return value
    if required:
        raise RawDataError(f"{where}: record has no {' or '.join(names)} field (or it is blank)")
    return None


def _labels(values: list[Any], where: str) -> tuple[np.ndarray | None, list[str] | None]:
    """Per-row labels as int64 (class names become indices into their sorted set)."""
    given = [v for v in values if v not in (None, "")]
    if not given:
        return None, None
    if len(given) != len(values):
        raise RawDataError(f"{where}: some rows have a label and some do not")
    try:
        return np.array([int(v) for v in values], np.int64), None
    except (TypeError, ValueError):
        classes = sorted({str(v) for v in values})
        index = {c: i for i, c in enumerate(classes)}
        return np.array([index[str(v)] for v in values], np.int64), classes


def _provenance(values: list[Any], default: str | None, where: str) -> np.ndarray:
    """Per-row provenance as int8 indices into PROVENANCES (-1: unknown); required per row."""
    out = np.empty(len(values), np.int8)
    for i, v in enumerate(values):
        v = default if v in (None, "") else v
        if v is None:
            raise RawDataError(
                f"{where}: row {i} has no provenance; give each caption a `provenance` field "
                f"({' | '.join(PROVENANCES)}), or set `provenance:` for the whole source in the "
                f"data config ({UNKNOWN!r} when it is not known)"
            )
        if str(v).lower() == UNKNOWN:
            out[i] = -1
            continue
        name = PROVENANCE_ALIASES.get(str(v).lower())
        if name is None:
            raise RawDataError(
                f"{where}: row {i} has provenance {v!r}; expected one of {list(PROVENANCES)} "
                f"or {UNKNOWN!r} (or set `provenance:` for the whole source)"
            )
        out[i] = PROVENANCES.index(name)
    return out


def _file_key(path: str) -> str:
    return str(Path(path).with_suffix("")).replace("\\", "/")


def _list_folder(root: Path, exts: Sequence[str], video: bool) -> list[Path]:
    if video:  # frame folders and video/array files directly under root
        return sorted(p for p in root.iterdir()
                      if p.is_dir() or p.suffix.lower() in VIDEO_EXTENSIONS)  # fmt: skip
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in exts)


def check_unique(keys: Sequence[str], source: Path | str, where: str) -> None:
    """Refuse an item list whose ids repeat, naming the first repeated id and its rows."""
    rows: dict[str, list[int]] = defaultdict(list)
    for i, k in enumerate(keys):
        rows[k].append(i)
    dup = next((k for k in keys if len(rows[k]) > 1), None)
    if dup is not None:
        raise RawDataError(
            f"{where}: source {source} has duplicate item key {dup!r} (rows {rows[dup][:5]}); "
            "item ids must be unique"
        )


def _text(source: Path, spec: Mapping, where: str) -> tuple[list, list, dict, list]:
    if source.is_dir():
        raise RawDataError(f"{where}: a text source is a .txt/.csv/.json/.jsonl file, not a folder")
    rows = read_records(source)
    sources, keys, provs, labels, items = [], [], [], [], []
    for i, row in enumerate(rows):
        at = f"{source} (row {i})"
        sources.append(str(_field(row, ("text", "caption"), at)))
        rid = _field(row, ("id",), at, required=False)
        keys.append(str(rid) if rid is not None else str(i))
        provs.append(_field(row, ("provenance",), at, required=False))
        labels.append(_field(row, ("label",), at, required=False))
        items.append(_field(row, ("item",), at, required=bool(spec.get("items"))))
    extras = {"provenance": _provenance(provs, spec.get("provenance"), f"{where}: {source}")}
    return sources, keys, extras, [labels, items]


def list_items(modality: str, spec: Mapping, where: str = "") -> Items:
    """The items of one modality source (see the module docstring for the accepted forms).

    A caption list (`items: <modality>`) keeps its rows' item keys in `Items.refs`;
    `link_captions` turns them into the `item` extra: rows of that modality's item list.
    """
    check_modality(modality, where)
    if "source" not in spec or spec["source"] in (None, ""):
        raise RawDataError(f"{where}: no `source` (a folder or a list file)")
    source = Path(str(spec["source"]))
    if not source.exists():
        kind = "file" if source.suffix else "folder"
        raise RawDataError(f"{where}: source {kind} {source} does not exist")
    video = bool(spec.get("frames"))
    if video and modality != "image":
        raise RawDataError(f"{where}: `frames` (video) applies to the image modality only")
    labels_from = spec.get("labels")
    if labels_from not in (None, "dirs"):
        raise RawDataError(f"{where}: labels is {labels_from!r}; expected dirs (or leave it out)")
    if spec.get("items") and modality != "text":
        raise RawDataError(f"{where}: `items` (a caption list) applies to the text modality only")
    item_refs, root = None, None
    if modality == "text":
        sources, keys, extras, (labels, item_refs) = _text(source, spec, where)
    else:
        if source.is_dir():
            paths = _list_folder(source, EXTENSIONS[modality], video)
            rel = [p.relative_to(source).as_posix() for p in paths]
            labels = [Path(r).parent.name if labels_from == "dirs" else None for r in rel]
            keys = [_file_key(r) for r in rel]
        else:
            rows = read_records(source)
            rel, labels, keys = [], [], []
            for i, row in enumerate(rows):
                at = f"{source} (row {i})"
                rel.append(str(_field(row, ("path", "file"), at)))
                labels.append(_field(row, ("label",), at, required=False))
                rid = _field(row, ("id",), at, required=False)
                keys.append(str(rid) if rid is not None else _file_key(rel[-1]))
            paths = [source.parent / r for r in rel]
        sources = [str(p) for p in paths]
        extras = {}
        root = str(source if source.is_dir() else source.parent)
    if not keys:
        raise RawDataError(f"{where}: source {source} holds no {modality} items")
    check_unique(keys, source, where)
    label_arr, classes = _labels(labels, str(source))
    if label_arr is not None:
        extras["labels"] = label_arr
    refs = [str(r) for r in item_refs] if item_refs is not None and spec.get("items") else None
    return Items(modality, keys, sources, extras, classes, refs, root)


def link_captions(captions: Items, items: Items, source: str, where: str) -> None:
    """Set a caption list's `item` extra (n,) int64: each caption's row in `items`."""
    rows = {k: i for i, k in enumerate(items.keys)}
    refs = captions.refs or []
    missing = [(i, r) for i, r in enumerate(refs) if r not in rows]
    if missing:
        i, r = missing[0]
        raise RawDataError(
            f"{where}: {source} row {i} names item {r!r}, which is not an item of "
            f"{items.modality} ({len(missing)} such rows; keys look like {items.keys[:3]})"
        )
    captions.extras["item"] = np.array([rows[r] for r in refs], np.int64)
