"""Evaluation methods: what turns cached rows into L2-normalised embeddings of one shared space.

    raw:<space>                  the space's own cache; only the pairs the space covers
    bound:<space or dir>         a bound space (stage=bind export) applied to the space's cache
    omni:<dir>[:routed|average]  an omni model (stage=route export); dirs are relative to
                                 evaluate.bound_dir / evaluate.omni_dir unless absolute
A method is named by its spec (`raw:clap`), or by a name given as `<name>=<spec>`
(`routed=omni:base/routed`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from datamodules.artifacts import CacheError
from datamodules.cache import EmbeddingCache, cache_dir
from encoders.modalities import MODALITIES
from lightning_modules.omni.export import load_bound_space, load_omni
from lightning_modules.omni.model import WEIGHTINGS, OmniModel
from lightning_modules.runtime.config import space_configs


class Method(Protocol):
    """Anything that embeds cached rows into one shared space."""

    name: str
    spaces: list[str]  # the spaces whose caches it reads (the world writes them)
    modalities: tuple[str, ...]  # cache modalities (a video is cached as `image`)

    def embed(self, root: Path, dataset: str, modality: str) -> torch.Tensor:
        """L2-normalised embeddings (n, d) of every row of (dataset, modality), in row order."""
        ...


def open_cache(
    root: Path, dataset: str, space: str, modality: str, dim: int | None = None
) -> EmbeddingCache:
    """The cache of (dataset, space, modality) under root, its dim checked when given."""
    return EmbeddingCache(cache_dir(root, dataset, space, modality), expect_dim=dim)


class RawSpace:
    """A space's own embeddings (native, not projected)."""

    def __init__(
        self, name: str, space: str, bound_dir: Path, omni_dir: Path, known: Mapping | None = None
    ) -> None:
        self.name, self.spaces = name, [space]
        # The run's own space configs first (a variant may compose a space under a new name).
        config = (known or {}).get(space) or space_configs([space])[space]
        self.dims = dict(config["dims"])
        self.modalities = tuple(m for m in MODALITIES if m in self.dims)

    def embed(self, root: Path, dataset: str, modality: str) -> torch.Tensor:
        """The cache's rows, L2-normalised (n, dim of the space)."""
        cache = open_cache(root, dataset, self.spaces[0], modality, self.dims[modality])
        return F.normalize(torch.from_numpy(cache.load()), dim=-1)


class BoundSpace:
    """A bound space's projectors applied to its source space's cache (projected, anchor dim)."""

    def __init__(self, name: str, where: str, bound_dir: Path, omni_dir: Path) -> None:
        directory = Path(bound_dir) / where  # an absolute `where` replaces bound_dir
        try:
            self.mixture, meta = load_bound_space(directory)
        except CacheError as e:
            raise CacheError(f"method {name!r}: {e}; bind it with: python train.py stage=bind "
                             f"space={Path(where).name}") from e  # fmt: skip
        self.name, self.spaces, self.dims = name, [meta["space"]], dict(meta["dims"])
        self.modalities = tuple(m for m in MODALITIES if m in self.dims)
        self.tuples = {k: meta[k] for k in ("pairs", "tuples_sha256") if k in meta}

    @torch.no_grad()
    def embed(self, root: Path, dataset: str, modality: str) -> torch.Tensor:
        """Projected rows (n, anchor dim), L2-normalised, in chunks of 8192 rows."""
        cache = open_cache(root, dataset, self.spaces[0], modality, self.dims[modality])
        # Copies: the chunks are read-only memory maps, which torch warns about.
        chunks = (torch.from_numpy(np.array(x)) for _, x in cache.iter_chunks(8192))
        parts = [F.normalize(self.mixture(x), dim=-1) for x in chunks]
        if parts:
            return torch.cat(parts)
        return torch.zeros(0, self.mixture.experts[0].mlp[3].out_features)


class OmniExport:
    """The route stage's omni model, with its routers or with uniform group weights (`average`)."""

    def __init__(self, name: str, spec: str, bound_dir: Path, omni_dir: Path) -> None:
        where, _, weighting = spec.partition(":")
        self.weighting = weighting or "routed"
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"method {name!r}: weighting {self.weighting!r} is not routed or "
                             "average")  # fmt: skip
        directory = Path(omni_dir) / where
        try:
            self.model = load_omni(directory)
        except CacheError as e:
            raise CacheError(f"method {name!r}: {e}; train it with stage=route") from e
        self.name, self.modalities = name, tuple(self.model.layout.modalities)
        record = self.model.layout.record
        self.tuples = {k: record[k] for k in ("pairs", "tuples_sha256") if k in record}
        self.spaces = list(
            dict.fromkeys(s for m in self.modalities for s in self.model.needed_spaces(m))
        )

    def embed(self, root: Path, dataset: str, modality: str) -> torch.Tensor:
        """Omni embeddings (n, omni dim) through the modality's router and groups."""
        return embed_cached(self.model, root, dataset, modality, weighting=self.weighting)


@torch.no_grad()
def embed_cached(
    model: OmniModel,
    root: str | Path,
    dataset: str,
    modality: str,
    weighting: str = "routed",
    chunk: int = 8192,
) -> torch.Tensor:
    """Omni embeddings (n, omni_dim) of a cached dataset, computed in chunks."""
    groups = model.layout.groups
    if modality not in groups:
        raise ValueError(f"the omni model has no groups for {modality!r}; it has {list(groups)}")
    caches = {
        s: EmbeddingCache(cache_dir(root, dataset, s, modality))
        for s in model.needed_spaces(modality)
    }
    n = {c.count for c in caches.values()}
    if len(n) != 1:
        raise CacheError(f"{Path(root) / dataset}: caches of {modality} disagree on row count {n}")
    loaded = {s: torch.from_numpy(c.load()) for s, c in caches.items()}
    parts = [
        model.embed_spaces(modality, {s: x[i : i + chunk] for s, x in loaded.items()}, weighting)
        for i in range(0, n.pop(), chunk)
    ]
    return torch.cat(parts)


# One line per kind of method: spec `<kind>:<argument>`.
METHODS: dict[str, Callable[[str, str, Path, Path], Method]] = {
    "raw": RawSpace,
    "bound": BoundSpace,
    "omni": OmniExport,
}


def parse_method(spec: str) -> tuple[str, str, str]:
    """`[<name>=]<kind>:<argument>` -> (name, kind, argument); the name defaults to the spec."""
    spec = str(spec)
    name, sep, rest = spec.partition("=")
    if not sep or ":" in name:  # no name given: the spec names itself
        name, rest = spec, spec
    kind, _, argument = rest.partition(":")
    if kind not in METHODS or not argument or not name:
        raise ValueError(
            f"evaluate.methods: {spec!r} is not [<name>=]<kind>:<argument> with kind in "
            f"{list(METHODS)}"
        )
    return name, kind, argument


def make_method(
    spec: str,
    bound_dir: str | Path = ".",
    omni_dir: str | Path = ".",
    spaces: Mapping | None = None,
) -> Method:
    """The method of `[<name>=]<kind>:<argument>`: `raw:clap`, `avg=omni:base/routed:average`.

    spaces: the run's space configs by name (what `raw:` reads a space's dims from)."""
    name, kind, argument = parse_method(spec)
    if kind == "raw":
        return RawSpace(name, argument, Path(bound_dir), Path(omni_dir), spaces)
    return METHODS[kind](name, argument, Path(bound_dir), Path(omni_dir))
