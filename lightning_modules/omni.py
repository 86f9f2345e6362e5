"""The omni model: frozen projectors of every bound space plus one router per modality."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from datamodules.artifacts import atomic_write, atomic_write_json, sha256_file, verify_file
from datamodules.cache import CacheError, EmbeddingCache, cache_dir
from encoders.modalities import MODALITIES, PROVENANCES
from lightning_modules.models import ProjectorMixture, Router

EXPORT_WEIGHTS, EXPORT_META = "omni.safetensors", "omni.json"
WEIGHTINGS = ("routed", "average")


class FixedWeights(nn.Module):
    """Input-independent group logits with the router's parametrisation: sigmoid(theta)."""

    def __init__(self, in_dim: int, n_groups: int) -> None:
        super().__init__()
        self.theta = nn.Parameter(torch.zeros(n_groups))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (batch, in_dim), only its batch size is used -> logits (batch, n_groups)."""
        return self.theta.expand(len(x), -1)


def make_routers(kind: str, in_dims: dict[str, int], groups: dict[str, list[str]]) -> nn.ModuleDict:
    """One router per modality: `routed` (input-dependent MLP) or `fixed` (learned constants)."""
    if kind not in ("routed", "fixed"):
        raise ValueError(f"route.kind is {kind!r}; expected 'routed' or 'fixed'")
    cls = Router if kind == "routed" else FixedWeights
    return nn.ModuleDict({m: cls(in_dims[m], len(g)) for m, g in groups.items()})


def specialty_labels(provenance: torch.Tensor, specialties: list[str]) -> torch.Tensor:
    """L_dec targets (batch, groups): 1 where the text's provenance is the group's specialty."""
    spec = torch.tensor([PROVENANCES.index(s) if s in PROVENANCES else -1 for s in specialties],
                        device=provenance.device)  # fmt: skip
    return (provenance[:, None] == spec[None, :]).float()


def combine(groups: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """normalize(sum_g w_g * P_g): groups (batch, G, dim), weights (batch, G) -> (batch, dim)."""
    return F.normalize((groups * weights.unsqueeze(-1)).sum(1), dim=-1)


def leave_out(weights: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
    """Weights (batch, G) without the groups `drop` (batch, G) marks, renormalised over the
    rest; a row that would lose every group keeps its weights."""
    kept = weights * ~drop
    total = kept.sum(1, keepdim=True)
    return torch.where(total > 0, kept / total.clamp_min(torch.finfo(kept.dtype).tiny), weights)


class RouterOutput(NamedTuple):
    """What `OmniModel.forward(..., with_router=True)` returns beside the embeddings."""

    embeddings: dict[str, torch.Tensor]  # {modality: (batch, omni_dim)}, L2-normalised
    weights: dict[str, torch.Tensor]  # {modality: (batch, groups)}, rows sum to 1
    logits: dict[str, torch.Tensor]  # {modality: (batch, groups)}, the routers' pre-sigmoid output


class OmniModel(nn.Module):
    """Frozen projectors of every bound space plus one router per modality (paper Eq. 3-4).

    `forward({space: {modality: (batch, dim_space)}}) -> {modality: (batch, omni_dim)}`, as
    ImageBind's model does. It is the one place the routing arithmetic is written: the route stage
    trains it, and evaluate, inference and convert use it.

    meta: groups {modality: [space, ...]}, predictors {modality: [space, ...]}, scales {modality},
    anchor (its group needs no projector), spaces {space: bound-space metadata}, and optionally
    blends {group: {space: weight}}: a group that is normalize(sum_s weight_s * P_s), like the
    official Full's fixed normalize(0.9 EVA-18B + 0.1 ImageBind) (lightning_modules/convert.py).
    """

    def __init__(self, meta: dict, kind: str = "routed") -> None:
        super().__init__()
        self.meta = meta
        routers = make_routers(kind, meta["predictor_dims"], meta["groups"])
        # The projectors' weights are always loaded afterwards (bound spaces, an export): their
        # init must not move the global RNG, so a seed gives the same routers as before.
        with torch.random.fork_rng(devices=[]):
            self.projectors = nn.ModuleDict({
                name: ProjectorMixture(next(iter(b["dims"].values())), b["out_dim"],
                                       b["hidden_dim"], len(b["experts"]), b["renormalize"])
                for name, b in meta["spaces"].items()
            })  # fmt: skip
        self.projectors.requires_grad_(False)
        self.routers = routers

    def train(self, mode: bool = True) -> OmniModel:
        """Only the routers train: the frozen projectors' BatchNorm stays in eval mode."""
        super().train(mode)
        self.projectors.eval()
        return self

    @classmethod
    def load(cls, directory: str | Path) -> OmniModel:
        """Load an export strictly: every key consumed, every shape checked."""
        directory = Path(directory)
        meta_path = directory / EXPORT_META
        if not meta_path.exists():
            raise CacheError(f"{directory}: no omni export here ({EXPORT_META} missing)")
        meta = json.loads(meta_path.read_text())
        if "sha256" in meta:  # exports written before digests were recorded have none
            verify_file(
                directory / EXPORT_WEIGHTS,
                meta["sha256"],
                recorded_in=meta_path,
                repair="rerun the stage that wrote it (stage=route or stage=convert)",
            )
        model = cls(meta, meta.get("kind", "routed"))
        try:
            model.load_state_dict(load_file(str(directory / EXPORT_WEIGHTS)), strict=True)
        except (RuntimeError, OSError) as e:
            raise CacheError(
                f"{directory / EXPORT_WEIGHTS}: does not match {EXPORT_META} ({e})"
            ) from e
        return model.eval()

    def save(self, directory: str | Path) -> Path:
        """Weights (safetensors) then metadata (JSON), each written atomically."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        tmp = directory / f".{EXPORT_WEIGHTS}.partial"
        save_file(tensors, str(tmp))
        atomic_write(directory / EXPORT_WEIGHTS, lambda f: f.write(tmp.read_bytes()))
        tmp.unlink()
        digest = sha256_file(directory / EXPORT_WEIGHTS)  # replaces a loaded export's, if any
        atomic_write_json(directory / EXPORT_META, {**self.meta, "sha256": digest})
        return directory

    def group(self, name: str, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """A group's embedding (batch, omni_dim): the anchor, a space's expert mean, or a blend."""
        blend = self.meta.get("blends", {}).get(name)
        if blend is not None:
            return F.normalize(sum(w * self.group(s, inputs) for s, w in blend.items()), dim=-1)
        x = inputs[name].float()
        return x if name == self.meta["anchor"] else self.projectors[name](x)

    def project(self, modality: str, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """inputs {space: (batch, dim_space)} -> projected groups (batch, groups, omni_dim)."""
        return torch.stack([self.group(g, inputs) for g in self.meta["groups"][modality]], 1)

    def forward(
        self,
        inputs: Mapping[str, Mapping[str, torch.Tensor]],
        weighting: str = "routed",
        projected: Mapping[str, torch.Tensor] | None = None,
        with_router: bool = False,
    ) -> dict[str, torch.Tensor] | RouterOutput:
        """{space: {modality: (batch, dim)}} -> {modality: (batch, omni_dim)}, L2-normalised.

        omni_m = normalize(sum_g w_g * P_g), w = softmax(scale_m * sigmoid(router_m(x))), x the
        concatenated predictor spaces' embeddings (Eq. 3-4); `average` gives uniform w. Every
        modality with groups that some input (or `projected`) carries is embedded.
        projected: {modality: (batch, groups, omni_dim)} group embeddings computed beforehand (the
        route stage caches them, since the projectors are frozen); inputs then need only the
        predictor spaces. with_router: also return the weights and the routers' logits.
        """
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting is {weighting!r}; expected one of {WEIGHTINGS}")
        projected = projected or {}
        offered = {m for per in inputs.values() for m in per} | set(projected)
        out = RouterOutput({}, {}, {})
        for m in [m for m in MODALITIES if m in offered and m in self.meta["groups"]]:
            per_space = {s: x[m] for s, x in inputs.items() if m in x}
            groups = projected[m] if m in projected else self.project(m, per_space)
            if weighting == "average":
                n = len(self.meta["groups"][m])
                weights = groups.new_full((len(groups), n), 1.0 / n, dtype=torch.float32)
            else:
                x = torch.cat([per_space[p].float() for p in self.meta["predictors"][m]], 1)
                out.logits[m] = self.routers[m](x)
                scale = self.meta["scales"][m]
                weights = torch.softmax(scale * torch.sigmoid(out.logits[m]), -1)
            out.weights[m] = weights
            out.embeddings[m] = combine(groups, weights)
        return out if with_router else out.embeddings

    @torch.no_grad()
    def embed_spaces(
        self, modality: str, inputs: dict[str, torch.Tensor], weighting: str = "routed"
    ) -> torch.Tensor:
        """Omni embeddings (batch, omni_dim) from per-space embeddings of one modality."""
        return self({s: {modality: x} for s, x in inputs.items()}, weighting)[modality]

    def needed_spaces(self, modality: str) -> list[str]:
        """Spaces whose caches `embed` reads for this modality (groups, blend parts, predictors)."""
        blends = self.meta.get("blends", {})
        groups = [s for g in self.meta["groups"][modality] for s in blends.get(g, [g])]
        return list(dict.fromkeys(groups + self.meta["predictors"][modality]))

    @torch.no_grad()
    def embed(
        self,
        root: str | Path,
        dataset: str,
        modality: str,
        weighting: str = "routed",
        chunk: int = 8192,
    ) -> torch.Tensor:
        """Omni embeddings (n, omni_dim) of a cached dataset, computed in chunks."""
        if modality not in self.meta["groups"]:
            raise ValueError(
                f"the omni model has no groups for {modality!r}; it has {list(self.meta['groups'])}"
            )
        caches = {
            s: EmbeddingCache(cache_dir(root, dataset, s, modality))
            for s in self.needed_spaces(modality)
        }
        n = {c.count for c in caches.values()}
        if len(n) != 1:
            raise CacheError(
                f"{Path(root) / dataset}: caches of {modality} disagree on row count {n}"
            )
        loaded = {s: torch.from_numpy(c.load()) for s, c in caches.items()}
        parts = [
            self.embed_spaces(modality, {s: x[i : i + chunk] for s, x in loaded.items()}, weighting)
            for i in range(0, n.pop(), chunk)
        ]
        return torch.cat(parts)


def modalities_of(meta: dict) -> list[str]:
    """The modalities an omni model embeds, in MODALITIES order."""
    return [m for m in MODALITIES if m in meta["groups"]]
