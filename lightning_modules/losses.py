"""Losses of the paper, as small pure functions."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def info_nce(a: torch.Tensor, b: torch.Tensor, temperature: float = 0.03) -> torch.Tensor:
    """Symmetric InfoNCE (Eq. 2) between L2-normalised a (batch, dim) and b (batch, dim).

    Row i of `a` and row i of `b` are the positive pair; every other row is a negative.
    """
    logits = a @ b.T / temperature
    target = torch.arange(len(a), device=a.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def alignment_loss(embeddings: dict[str, torch.Tensor], temperature: float = 0.03) -> torch.Tensor:
    """L_align (Eq. 5): InfoNCE averaged over every pair of modalities in `embeddings`."""
    names = sorted(embeddings)
    terms = [
        info_nce(embeddings[a], embeddings[b], temperature)
        for i, a in enumerate(names)
        for b in names[i + 1 :]
    ]
    return torch.stack(terms).mean()


def decoupling_loss(router_sigmoid: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """L_dec (Eq. 6): BCE between the text router's sigmoid outputs (batch, groups) and labels.

    labels[i, g] = 1 when text i's provenance is the modality group g's text encoder aligns.
    """
    return F.binary_cross_entropy(router_sigmoid.float(), labels.float())
