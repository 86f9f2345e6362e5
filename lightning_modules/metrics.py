"""Retrieval metrics as torchmetrics `Metric`s, correct across processes.

Semantics follow LAION's CLIP_benchmark: a query is a hit at K when at least one of its positive
gallery items is among the top K. Ties are broken deterministically by gallery order: the gallery
is sorted by item id, and among equal scores the lower id ranks first.
"""

from __future__ import annotations

import torch
from torchmetrics import Metric


def recall_at_k(query: torch.Tensor, gallery: torch.Tensor, query_items: torch.Tensor,
                gallery_items: torch.Tensor, ks: tuple[int, ...] = (1, 5),
                chunk: int = 1024) -> dict[int, torch.Tensor]:
    """Fraction of queries with a positive in the top K, for each K.

    query (q, d), gallery (g, d); query_items (q,) and gallery_items (g,) are item ids: a gallery
    row is positive for a query when their ids match. Scores are computed in chunks of queries,
    so memory stays at chunk x g. Ties: among equal scores the lower gallery index ranks first.
    """
    hits = {k: torch.zeros((), dtype=torch.long, device=query.device) for k in ks}
    index = torch.arange(len(gallery), device=query.device)
    for i in range(0, len(query), chunk):
        scores = query[i : i + chunk].float() @ gallery.float().T
        positive = query_items[i : i + chunk, None] == gallery_items[None, :]
        if not positive.any(1).all():
            raise ValueError("a query has no positive in the gallery (caption mapping mismatch?)")
        best = scores.masked_fill(~positive, float("-inf")).max(1, keepdim=True).values
        # The first positive at the best score: the best-ranked positive under index tie-breaking.
        first = (positive & (scores == best)).float().argmax(1, keepdim=True)
        rank = (scores > best).sum(1) + ((scores == best) & (index[None, :] < first)).sum(1)
        for k in ks:
            hits[k] += (rank < k).sum()
    return {k: hits[k].float() / max(len(query), 1) for k in ks}


class RetrievalRecall(Metric):
    """R@K of one retrieval direction, accumulated over batches and synced across processes.

    update(query, query_ids, query_items, gallery, gallery_items): query rows are identified by
    `query_ids` and duplicates (e.g. from DDP padding) count once; gallery rows are deduplicated
    by item id.
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, ks: tuple[int, ...] = (1, 5), **kwargs) -> None:
        super().__init__(**kwargs)
        self.ks = tuple(ks)
        for name in ("query", "query_ids", "query_items", "gallery", "gallery_items"):
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(self, query: torch.Tensor, query_ids: torch.Tensor, query_items: torch.Tensor,
               gallery: torch.Tensor, gallery_items: torch.Tensor) -> None:
        self.query.append(query.detach().float())
        self.query_ids.append(query_ids.detach())
        self.query_items.append(query_items.detach())
        self.gallery.append(gallery.detach().float())
        self.gallery_items.append(gallery_items.detach())

    @staticmethod
    def _cat(x) -> torch.Tensor:
        return torch.cat(x) if isinstance(x, list) else x

    def compute(self) -> dict[str, torch.Tensor]:
        query, qids = self._cat(self.query), self._cat(self.query_ids)
        qitems = self._cat(self.query_items)
        gallery, gitems = self._cat(self.gallery), self._cat(self.gallery_items)
        qids, qfirst = _unique_first(qids)
        gitems, gfirst = _unique_first(gitems)
        out = recall_at_k(query[qfirst], gallery[gfirst], qitems[qfirst], gitems, self.ks)
        return {f"R@{k}": v for k, v in out.items()}


def _unique_first(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted unique values of x and, for each, the index of its first occurrence."""
    values, inverse = torch.unique(x, sorted=True, return_inverse=True)
    first = torch.full((len(values),), len(x), dtype=torch.long, device=x.device)
    first.scatter_reduce_(0, inverse, torch.arange(len(x), device=x.device), reduce="amin")
    return values, first
