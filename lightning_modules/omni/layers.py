"""The trainable parts: projectors (bind) and routers (route).

Module layouts follow the official OmniBind release, so its checkpoints map key for key:
`mlp.{0,1,3,4}` are Linear, BatchNorm1d, (ReLU), Linear, BatchNorm1d.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Projector(nn.Module):
    """Linear(in, hidden) -> BN -> ReLU -> Linear(hidden, out) -> BN -> L2-normalise."""

    def __init__(self, in_dim: int, out_dim: int = 1536, hidden_dim: int = 2048) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden_dim),
            nn.BatchNorm1d(hidden_dim),
            nn.ReLU(),
            nn.Linear(hidden_dim, out_dim),
            nn.BatchNorm1d(out_dim),
        )
        for layer in (self.mlp[0], self.mlp[3]):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (batch, in_dim) -> (batch, out_dim), L2-normalised."""
        return F.normalize(self.mlp(x), dim=-1)


class ProjectorMixture(nn.Module):
    """The experts of one source space; all of the space's modalities share them."""

    def __init__(
        self, in_dim: int, out_dim: int, hidden_dim: int, n_experts: int, renormalize: bool = False
    ) -> None:
        super().__init__()
        self.experts = nn.ModuleList(
            Projector(in_dim, out_dim, hidden_dim) for _ in range(n_experts)
        )
        self.renormalize = renormalize

    @property
    def out_dim(self) -> int:
        return self.experts[0].mlp[3].out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (batch, in_dim) -> the mean of the experts' normalised outputs (batch, out_dim).

        OmniBind leaves the mean unnormalised; FreeBind (renormalize=True) normalises it again.
        """
        mean = torch.stack([e(x) for e in self.experts]).mean(0)
        return F.normalize(mean, dim=-1) if self.renormalize else mean


class Router(nn.Module):
    """Linear(in, 512), BN, ReLU, Linear(512, 100), BN, Tanh, Linear(100, G).

    It returns logits; OmniModel applies the sigmoid (and L_dec takes the logits, which keeps the
    BCE safe under autocast). The last layer starts at zero, so an untrained router gives every
    group the same weight: routing starts from uniform averaging, the baseline it must beat
    (the release initialises it Xavier-uniform too, which starts from random weights).
    """

    def __init__(self, in_dim: int, n_groups: int, hidden: tuple[int, int] = (512, 100)) -> None:
        super().__init__()
        h1, h2 = hidden
        self.router = nn.Sequential(
            nn.Linear(in_dim, h1), nn.BatchNorm1d(h1), nn.ReLU(),
            nn.Linear(h1, h2), nn.BatchNorm1d(h2), nn.Tanh(),
            nn.Linear(h2, n_groups),
        )  # fmt: skip
        for layer in self.router:  # Xavier-uniform, as the release initialises its routers
            if isinstance(layer, nn.Linear):
                nn.init.xavier_uniform_(layer.weight)
                nn.init.zeros_(layer.bias)
        nn.init.zeros_(self.router[-1].weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (batch, in_dim) -> logits (batch, n_groups)."""
        return self.router(x)


class FixedWeights(nn.Module):
    """Input-independent group logits with the router's parametrisation: sigmoid(theta)."""

    def __init__(self, in_dim: int, n_groups: int) -> None:
        super().__init__()
        self.theta = nn.Parameter(torch.zeros(n_groups))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (batch, in_dim), only its batch size is used -> logits (batch, n_groups)."""
        return self.theta.expand(len(x), -1)
