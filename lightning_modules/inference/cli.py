"""The search CLI: `index` a dataset's rows into an omni gallery, `search` it.

    python -m lightning_modules.inference index --model M --root R --dataset D --modality X --out G
    python -m lightning_modules.inference search --model M --root R --gallery G --query D:X:ROW[@W]

Like train.py, it reads Hugging Face files (Hub ids, tokenizers) from disk only unless
HF_HUB_OFFLINE=0 (lightning_modules/runtime/config.py); a missing one is named at once.
"""

from __future__ import annotations

# First, before huggingface_hub: it sets the offline default (see there).
import lightning_modules.runtime.config  # noqa: F401

# isort: split
import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from datamodules.artifacts import CacheError
from datamodules.cache import EmbeddingCache, cache_dir
from datamodules.jobs import ITEMS
from encoders.modalities import MODALITIES, check_modality
from lightning_modules.inference.api import OmniBind, compose
from lightning_modules.inference.gallery import Gallery, build_gallery
from lightning_modules.omni.model import WEIGHTINGS


def parse_query(spec: str) -> tuple[str, str, int, float]:
    """`DATASET:MODALITY:ROW[@WEIGHT]` -> (dataset, modality, row, weight)."""
    body, _, weight = spec.partition("@")
    parts = body.split(":")
    try:
        dataset, modality, row = parts
        return dataset, check_modality(modality, spec), int(row), float(weight or 1.0)
    except ValueError as e:
        raise ValueError(
            f"--query {spec!r}: expected DATASET:MODALITY:ROW[@WEIGHT], e.g. "
            f"test_audio_text:audio:3 or test_audio_text:text:3@0.5 ({e})"
        ) from e


def _items(directory: str | Path | None) -> dict | None:
    """The item list (keys, sources, classes) that extract wrote beside a cache, if any."""
    path = Path(directory) / ITEMS if directory else None
    return json.loads(path.read_text()) if path and path.is_file() else None


def _fields(cache: EmbeddingCache, row: int, items: dict | None = None) -> dict[str, Any]:
    """A row's item (its file or text, else its key) and class name where `items` names them,
    then its id and 1-D extras (labels, items, ...)."""
    fields, i = {}, cache.ids[row].item()
    if items is not None and 0 <= i < len(items["keys"]):
        fields["item"] = items["sources"][i] or items["keys"][i]
        labels = cache.extra("labels") if cache.has("labels") else None
        if items.get("classes") and labels is not None and labels.ndim == 1:
            fields["class"] = items["classes"][int(labels[row])]
    fields["id"] = i
    for key in cache.manifest.get("extras", []):
        value = cache.extra(key)
        if value.ndim == 1:
            fields[key] = value[row].item()
    return fields


def _describe(fields: Mapping[str, Any]) -> str:
    """`<item> (<class>) id=.. <extra>=..`: what a user knows the row by comes first."""
    head = [str(fields["item"])] if "item" in fields else []
    head += [f"({fields['class']})"] if "class" in fields else []
    rest = [f"{k}={v}" for k, v in fields.items() if k not in ("item", "class")]
    return " ".join(head + rest)


def _search(args: argparse.Namespace, bind: OmniBind) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    gallery = Gallery(args.gallery, backend=args.backend, device=args.device)
    queries, weights, described = {}, {}, []
    for m in [*MODALITIES, "video"]:  # raw items, through the encoders of the model's spaces
        for item in getattr(args, m) or []:
            queries[f"{m}:{item}"] = bind.embed(**{m: [item]})[m]
            weights[f"{m}:{item}"] = 1.0
            described.append({})
            console.print(f"query {m}: {item}")
    for i, spec in enumerate(args.query or []):
        dataset, modality, row, weight = parse_query(spec)
        key = f"{i}:{spec}"
        queries[key] = bind.embed_rows(args.root, dataset, modality, [row])
        weights[key] = weight
        cache = EmbeddingCache(cache_dir(args.root, dataset, bind.needed(modality)[0], modality))
        described.append(_fields(cache, row, _items(cache.directory)))
        console.print(f"query {spec} (weight {weight}): {_describe(described[-1])}")
    scores, rows = gallery.search(compose(queries, weights), args.k)
    table = Table(title=f"top {len(rows[0])} of {len(gallery)} in {args.gallery}")
    for column in ("rank", "row", "score", "gallery item", "same as a query"):
        table.add_column(column, justify="right" if column in ("rank", "row", "score") else "left")
    items = _items(gallery.cache.manifest.get("source"))
    for rank, (score, row) in enumerate(zip(scores[0], rows[0], strict=True), 1):
        hit = _fields(gallery.cache, int(row), items)
        # What it shares with some query row: its item, class, concept labels, paired items.
        same = [k for k, v in hit.items() if k != "id" and any(q.get(k) == v for q in described)]
        table.add_row(str(rank), str(row), f"{score:.4f}", _describe(hit), ", ".join(same))
    console.print(table)


def main(argv: Sequence[str] | None = None) -> int:
    """`index` a dataset's rows into an omni gallery cache, or `search` one with cached rows."""
    parser = argparse.ArgumentParser(
        prog="python -m lightning_modules.inference", description=main.__doc__
    )
    sub = parser.add_subparsers(dest="command", required=True)
    index = sub.add_parser("index", help="embed (dataset, modality) into an omni gallery cache")
    find = sub.add_parser("search", help="search a gallery with cached rows (composable)")
    for p in (index, find):
        p.add_argument(
            "--model", required=True, help="omni export dir (route, convert), save_pretrained dir"
        )
        p.add_argument("--root", required=True, help="data root of the per-space caches")
        p.add_argument("--weighting", default="routed", choices=WEIGHTINGS)
        p.add_argument("--device", default="cpu", help="cpu | cuda[:i] | auto")
    index.add_argument("--dataset", required=True)
    index.add_argument("--modality", required=True, choices=MODALITIES)
    index.add_argument("--out", required=True, help="the gallery cache dir to write")
    index.add_argument("--dtype", default="float16", choices=("float16", "float32"))
    index.add_argument("--overwrite", action="store_true", help="rebuild even if current")
    find.add_argument("--gallery", required=True, help="a gallery cache dir (from `index`)")
    find.add_argument(
        "--query",
        action="append",
        help="a cached row, DATASET:MODALITY:ROW[@WEIGHT]; repeat to compose a weighted query",
    )
    for m, example in (("text", "a caption"), ("image", "an image file"), ("audio", "a wav"),
                       ("point", "a .ply/.npy point cloud"),
                       ("video", "a frame folder, .npy clip or video file")):  # fmt: skip
        find.add_argument(f"--{m}", action="append", help=f"a raw query: {example}; repeatable")
    find.add_argument("--k", type=int, default=10)
    find.add_argument("--backend", default="torch", choices=("torch", "faiss"))
    args = parser.parse_args(argv)
    try:
        bind = OmniBind.from_pretrained(args.model, weighting=args.weighting, device=args.device)
        if args.command == "index":
            gallery = build_gallery(bind, args.root, args.dataset, args.modality, args.out,
                                    dtype=args.dtype, overwrite=args.overwrite)  # fmt: skip
            print(f"gallery {args.out}: {len(gallery)} {args.modality} rows of {args.dataset}")
        elif not (args.query or any(getattr(args, m) for m in [*MODALITIES, "video"])):
            raise ValueError("search needs a query: --query DATASET:MODALITY:ROW or a raw item "
                             "(--text, --image, --audio, --point, --video)")  # fmt: skip
        else:
            _search(args, bind)
    except (CacheError, ValueError, IndexError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


