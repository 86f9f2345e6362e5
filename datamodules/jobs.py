"""One cache being extracted: `ExtractJob` prepares its folder, writes chunks, finalises it.

Extraction writes a cache in chunks of `shard_size` items; chunk c becomes shard
`shard_<c:06d>_00000`, whoever writes it, so the row order never depends on the number of ranks
and a finished chunk is skipped on resume.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from datamodules.artifacts import CacheError, atomic_write_json
from datamodules.cache import MANIFEST, CacheWriter, finalize, read_manifest
from datamodules.items import Items

log = logging.getLogger(__name__)

SIDECAR, ITEMS, ERRORS = "extract.json", "items.json", "errors.json"
SHARD = re.compile(r"^shard_(\d{6})_\d{5}\.emb\.npy$")


@dataclass
class ExtractJob:
    """The extraction of one (dataset, space, modality) cache, in chunks of `shard_size` items."""

    dataset: str
    modality: str
    items: Items
    directory: Path
    space: str
    dim: int
    fingerprint: str
    shard_size: int = 4096
    dtype: str = "float16"
    frames: int | None = None  # video: at most this many frames per item, averaged
    stride: int | None = None  # video: every stride-th frame (None: spread evenly)
    audio_weight: float | None = None  # video: the audio track joins with this weight
    meta: dict = field(default_factory=dict)  # recorded in the manifest (encoder, source)
    # The configuration's own part of `fingerprint` (which also covers the inputs: items, dumps).
    # A cache of this configuration whose inputs changed is stale, and is extracted again.
    config: str = ""

    @property
    def name(self) -> str:
        return f"{self.dataset}/{self.space}/{self.modality}"

    @property
    def n_chunks(self) -> int:
        return math.ceil(len(self.items) / self.shard_size)

    def chunk(self, c: int) -> range:
        return range(c * self.shard_size, min((c + 1) * self.shard_size, len(self.items)))

    def is_complete(self) -> bool:
        manifest = read_manifest(self.directory) if self.directory.exists() else None
        return manifest is not None and manifest.get("fingerprint") == self.fingerprint

    def prepare(self, overwrite: bool = False) -> bool:
        """Get the directory ready (run once, on rank 0); False when the cache is complete.

        A complete cache with this fingerprint is kept. One of this configuration made from
        other inputs (items added, a dump updated) is stale and starts over. One with another
        configuration, or an interrupted one, is refused unless `overwrite`.
        """
        d = self.directory
        if self.is_complete() and not overwrite:
            return False
        if d.exists() and self._stale(d):
            log.info("%s: its inputs changed since it was extracted (items or dump): extracting "
                     "it again", d)  # fmt: skip
            overwrite = True
        if overwrite and d.exists():
            shutil.rmtree(d)
        manifest = read_manifest(d) if d.exists() else None
        if manifest is not None:
            raise CacheError(
                f"{d}: an existing cache was extracted with a different configuration "
                f"(fingerprint {manifest.get('fingerprint')!r}, now {self.fingerprint!r}); pass "
                "extract.overwrite=true to replace it"
            )
        sidecar = d / SIDECAR
        if sidecar.exists():
            started = json.loads(sidecar.read_text()).get("fingerprint")
            if started != self.fingerprint:
                raise CacheError(
                    f"{d}: holds an interrupted extraction with another configuration "
                    f"(fingerprint {started!r}, now {self.fingerprint!r}); pass "
                    "extract.overwrite=true to discard it"
                )
        elif d.exists() and any(d.glob("*.npy")):
            raise CacheError(f"{d}: holds shards of unknown origin; pass extract.overwrite=true")
        d.mkdir(parents=True, exist_ok=True)
        atomic_write_json(sidecar, dict(
            fingerprint=self.fingerprint, config=self.config, dataset=self.dataset,
            space=self.space, modality=self.modality, items=len(self.items),
            shard_size=self.shard_size,
            started=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        ))  # fmt: skip
        atomic_write_json(d / ITEMS, dict(keys=self.items.keys, sources=self.items.sources,
                                          classes=self.items.classes))  # fmt: skip
        return True

    def _stale(self, d: Path) -> bool:
        """This configuration's cache (or interrupted extraction) of inputs that changed since."""
        record = read_manifest(d)
        if record is None and (d / SIDECAR).exists():
            record = json.loads((d / SIDECAR).read_text())
        return (bool(self.config) and record is not None and record.get("config") == self.config
                and record.get("fingerprint") != self.fingerprint)  # fmt: skip

    def done_chunks(self) -> set[int]:
        """Chunks whose shard is written (complete shards only: `.emb.npy` is renamed last)."""
        if not self.directory.exists():
            return set()
        return {int(m.group(1)) for p in self.directory.iterdir() if (m := SHARD.match(p.name))}

    def pending_chunks(self) -> list[int]:
        done = self.done_chunks()
        return [c for c in range(self.n_chunks) if c not in done]

    def write_chunk(
        self,
        c: int,
        emb: np.ndarray,
        ids: np.ndarray,
        errors: Sequence[tuple[int, str]] = (),
        extras: dict[str, np.ndarray] | None = None,
    ) -> None:
        """Write chunk c: its embeddings (rows, dim) with ids, and its failed items' errors;
        `extras` are per-row columns beside the item list's (a video's `audio_track` flag)."""
        errors_path = self.directory / "errors" / f"chunk_{c:06d}.json"
        if errors:
            atomic_write_json(errors_path, [
                dict(id=int(i), key=self.items.keys[i], source=self.items.sources[i], error=msg)
                for i, msg in sorted(errors)
            ])  # fmt: skip
        else:
            errors_path.unlink(missing_ok=True)
        if len(ids) == 0:
            return  # every item failed: no shard, the errors file says why
        writer = CacheWriter(
            self.directory, space=self.space, modality=self.modality, dim=self.dim,
            dtype=self.dtype, fingerprint=self.fingerprint, resume=True,
            shard_prefix=f"shard_{c:06d}_",
        )  # fmt: skip
        columns = {k: v[ids] for k, v in self.items.extras.items()} | (extras or {})
        writer.append(emb, ids.astype(np.int64), **columns)

    def finalize(self) -> dict:
        """Check every chunk is accounted for, merge the errors, and write the manifest."""
        done = self.done_chunks()
        errors: list[dict] = []
        for path in sorted((self.directory / "errors").glob("chunk_*.json")):
            errors.extend(json.loads(path.read_text()))
        failed = {}
        for e in errors:
            failed.setdefault(e["id"] // self.shard_size, []).append(e)
        missing = [c for c in range(self.n_chunks)
                   if c not in done and len(failed.get(c, ())) != len(self.chunk(c))]  # fmt: skip
        if missing:
            raise CacheError(f"{self.directory}: chunks {missing[:10]} were not extracted")
        if errors:
            atomic_write_json(self.directory / ERRORS, sorted(errors, key=lambda e: e["id"]))
        else:
            (self.directory / ERRORS).unlink(missing_ok=True)
        manifest = finalize(
            self.directory, space=self.space, modality=self.modality, dim=self.dim,
            dtype=self.dtype, normalized=True, fingerprint=self.fingerprint, config=self.config,
            dataset=self.dataset, items=len(self.items), errors=len(errors), **self.meta,
        )  # fmt: skip
        if manifest["count"] + len(errors) != len(self.items):
            (self.directory / MANIFEST).unlink()
            raise CacheError(
                f"{self.directory}: {manifest['count']} rows + {len(errors)} errors != "
                f"{len(self.items)} items; extract it again with extract.overwrite=true"
            )
        if errors:
            log.warning("%s: %d of %d items failed and were skipped; see %s", self.name,
                        len(errors), len(self.items), self.directory / ERRORS)  # fmt: skip
        if self.audio_weight is not None:
            tracks = sum(int(np.load(self.directory / f"{s['name']}.audio_track.npy").sum())
                         for s in manifest["shards"])  # fmt: skip
            log.info("%s: %d of %d clips have no audio track and are embedded from their frames "
                     "only (the `audio_track` extra marks the rows it joined)", self.name,
                     manifest["count"] - tracks, manifest["count"])  # fmt: skip
        return manifest
