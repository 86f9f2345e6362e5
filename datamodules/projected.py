"""Projected caches: each bound space's frozen projections of cached rows, written once.

The route stage trains only routers over frozen projectors, so every (dataset, modality) row's
projection into the omni space is computed once into `<space>@omni` caches, and the route
datamodule reads them like any other cache. Each bound space's caches live under a root named by
the digest of its weights, so routes over different bound spaces never overwrite each other.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from datamodules.cache import CacheWriter, EmbeddingCache, cache_dir, read_manifest

PROJECTED = "@omni"  # suffix of a projected cache's space name


def projected_space(space: str) -> str:
    """The space name of `space`'s projected caches."""
    return space + PROJECTED


def projected_roots(
    proj_root: Path, projectors: Mapping[str, tuple[torch.nn.Module, str]]
) -> dict[str, Path]:
    """{`<space>@omni`: the root of its projected caches}, one per bound space's weight digest."""
    return {projected_space(name): Path(proj_root) / d for name, (_, d) in projectors.items()}


@torch.no_grad()
def ensure_projected(
    root: Path,
    proj_root: Path,
    projectors: Mapping[str, tuple[torch.nn.Module, str]],
    dataset: str,
    modality: str,
    dtype: str = "float16",
) -> None:
    """Write each bound space's projections of (dataset, modality) unless they are current.

    projectors: {space: (its projector mixture, the digest of its weights)}; a projected cache
    is current when it was made from these weights and this source cache.
    """
    roots = projected_roots(proj_root, projectors)
    for name, (mixture, weights) in projectors.items():
        src = cache_dir(root, dataset, name, modality)
        if not src.exists():
            continue
        source = EmbeddingCache(src)
        fp = f"{weights}-{source.fingerprint}"
        out = cache_dir(roots[projected_space(name)], dataset, projected_space(name), modality)
        manifest = read_manifest(out) if out.exists() else None
        if manifest is not None and manifest.get("fingerprint") == fp:
            continue
        writer = CacheWriter(
            out,
            space=projected_space(name),
            modality=modality,
            dim=mixture.out_dim,
            dtype=dtype,
            fingerprint=fp,
            overwrite=True,
        )
        for start, chunk in source.iter_chunks(65536):
            z = mixture(torch.from_numpy(chunk)).numpy()
            extras = {
                k: source.extra(k)[start : start + len(z)]
                for k in source.manifest.get("extras", [])
            }
            writer.append(z, source.ids[start : start + len(z)], **extras)
        writer.close(dataset=dataset, source=str(src))
