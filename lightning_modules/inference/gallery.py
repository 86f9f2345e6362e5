"""Galleries: omni embedding caches of a dataset's rows, searched exactly by inner product."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from datamodules import artifacts
from datamodules.artifacts import CacheError
from datamodules.cache import CacheWriter, EmbeddingCache, cache_dir
from lightning_modules.pairing.search import pool_rows, search

if TYPE_CHECKING:
    from lightning_modules.inference import OmniBind


class Gallery:
    """An omni embedding cache, searched exactly by inner product (torch blocks or faiss)."""

    def __init__(
        self, directory: str | Path, backend: str = "torch", device: str | torch.device = "cpu"
    ) -> None:
        self.cache = EmbeddingCache(directory)
        self.backend, self.device = backend, device

    def __len__(self) -> int:
        return self.cache.count

    def search(self, queries: torch.Tensor, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """queries (q, dim) -> (scores (q, k), gallery rows (q, k)), best first."""
        queries = torch.atleast_2d(queries).float().cpu()
        if queries.shape[1] != self.cache.dim:
            raise ValueError(
                f"queries have dim {queries.shape[1]}; gallery {self.cache.directory} has "
                f"{self.cache.dim}"
            )
        k = min(k, len(self))
        out = search(queries, pool_rows(self.cache), k, backend=self.backend, device=self.device)
        return out["a_to_b"]


def build_gallery(
    bind: OmniBind,
    root: str | Path,
    dataset: str,
    modality: str,
    out: str | Path,
    *,
    dtype: str = "float16",
    chunk: int = 8192,
    overwrite: bool = False,
) -> Gallery:
    """Embed every row of (dataset, modality) into an omni cache at `out`, unless it is current.

    Ids and per-row extras (labels, ...) are copied from the first space's cache.
    """
    caches = [EmbeddingCache(cache_dir(root, dataset, s, modality)) for s in bind.needed(modality)]
    first = caches[0]
    fingerprint = artifacts.fingerprint([bind.fingerprint(), *(c.fingerprint for c in caches)])
    out = Path(out)
    if not overwrite and out.is_dir():
        try:
            existing = EmbeddingCache(out)
            if existing.fingerprint == fingerprint and existing.count == first.count:
                return Gallery(out)
        except CacheError:
            pass  # incomplete or foreign: rewritten below
    writer = CacheWriter(out, space="omni", modality=modality, dim=bind.dim, dtype=dtype,
                         fingerprint=fingerprint, overwrite=True)  # fmt: skip
    extras = {k: first.extra(k) for k in first.manifest.get("extras", [])}
    for start in range(0, first.count, chunk):
        stop = min(start + chunk, first.count)
        z = bind.embed_rows(root, dataset, modality, slice(start, stop))
        writer.append(z.cpu().numpy(), first.ids[start:stop],
                      **{k: v[start:stop] for k, v in extras.items()})  # fmt: skip
    # source: the cache whose ids and item list (items.json, from extract) name the rows.
    writer.close(dataset=dataset, root=str(root), weighting=bind.weighting,
                 source=str(first.directory))  # fmt: skip
    return Gallery(out)


