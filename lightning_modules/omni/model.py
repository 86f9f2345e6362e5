"""The omni model: frozen projectors of every bound space plus one router per modality."""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from encoders.modalities import MODALITIES, PROVENANCES
from lightning_modules.omni.layers import FixedWeights, ProjectorMixture, Router
from lightning_modules.omni.layout import OmniLayout

WEIGHTINGS = ("routed", "average")


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

    Its architecture is an OmniLayout (omni/layout.py); omni/export.py saves and loads it.
    """

    def __init__(self, layout: OmniLayout) -> None:
        super().__init__()
        self.layout = layout
        routers = make_routers(layout.kind, layout.predictor_dims, layout.groups)
        # The projectors' weights are always loaded afterwards (bound spaces, an export): their
        # init must not move the global RNG, so a seed gives the same routers as before.
        with torch.random.fork_rng(devices=[]):
            self.projectors = nn.ModuleDict({
                name: ProjectorMixture(next(iter(b["dims"].values())), b["out_dim"],
                                       b["hidden_dim"], len(b["experts"]), b["renormalize"])
                for name, b in layout.spaces.items()
            })  # fmt: skip
        self.projectors.requires_grad_(False)
        self.routers = routers

    def train(self, mode: bool = True) -> OmniModel:
        """Only the routers train: the frozen projectors' BatchNorm stays in eval mode."""
        super().train(mode)
        self.projectors.eval()
        return self

    def group(self, name: str, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """A group's embedding (batch, omni_dim): the anchor, a space's expert mean, or a blend."""
        blend = self.layout.blends.get(name)
        if blend is not None:
            return F.normalize(sum(w * self.group(s, inputs) for s, w in blend.items()), dim=-1)
        x = inputs[name].float()
        return x if name == self.layout.anchor else self.projectors[name](x)

    def project(self, modality: str, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """inputs {space: (batch, dim_space)} -> projected groups (batch, groups, omni_dim)."""
        return torch.stack([self.group(g, inputs) for g in self.layout.groups[modality]], 1)

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
        for m in [m for m in MODALITIES if m in offered and m in self.layout.groups]:
            per_space = {s: x[m] for s, x in inputs.items() if m in x}
            groups = projected[m] if m in projected else self.project(m, per_space)
            if weighting == "average":
                n = len(self.layout.groups[m])
                weights = groups.new_full((len(groups), n), 1.0 / n, dtype=torch.float32)
            else:
                x = torch.cat([per_space[p].float() for p in self.layout.predictors[m]], 1)
                out.logits[m] = self.routers[m](x)
                scale = self.layout.scales[m]
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
        blends = self.layout.blends
        groups = [s for g in self.layout.groups[modality] for s in blends.get(g, [g])]
        return list(dict.fromkeys(groups + self.layout.predictors[modality]))

