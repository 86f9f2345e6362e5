"""Retrieval and zero-shot metrics as torchmetrics `Metric`s, correct across processes.

Semantics follow LAION's CLIP_benchmark.
- Retrieval R@K: a query is a hit at K when at least one of its positive gallery rows is among the
  top K. Ties: among equal scores the lower gallery index ranks first.
- Zero-shot top-K: an item is a hit when its class is among the K best-scoring classes. Ties:
  among equal scores the lower class index ranks first.
- mAP (multi-label): the mean over all classes of average precision; a class with no positives
  counts as 0. AP groups equal scores into one threshold (as sklearn), so it never depends on the
  order of the items.
"""

from __future__ import annotations

import torch
from torchmetrics import Metric
from torchmetrics.classification import MultilabelAveragePrecision


def recall_at_k(
    query: torch.Tensor,
    gallery: torch.Tensor,
    query_items: torch.Tensor,
    gallery_items: torch.Tensor,
    ks: tuple[int, ...] = (1, 5),
    chunk: int = 1024,
) -> dict[int, torch.Tensor]:
    """Fraction of queries with a positive in the top K, for each K.

    query (q, d), gallery (g, d); query_items (q,) and gallery_items (g,) are item ids: a gallery
    row is positive for a query when their ids match (several positives per query are allowed).
    Scores are computed in chunks of queries, so memory stays at chunk x g. Ties: among equal
    scores the lower gallery index ranks first.
    """
    hits = {k: torch.zeros((), dtype=torch.long, device=query.device) for k in ks}
    positives, valid = _positive_rows(query_items, gallery_items)
    index = torch.arange(len(gallery), device=query.device)
    gallery_t = gallery.float().T
    kmax = min(max(ks), len(gallery))
    # One score buffer for every chunk: a fresh chunk x g tensor each time costs page faults.
    buffer = torch.empty(
        min(chunk, len(query)), len(gallery), device=query.device, dtype=torch.float32
    )
    for i in range(0, len(query), chunk):
        block = query[i : i + chunk].float()
        scores = torch.matmul(block, gallery_t, out=buffer[: len(block)])  # (c, g)
        rows, ok = positives[i : i + chunk], valid[i : i + chunk]
        # The positives' scores are read from the same matrix, so equal scores compare equal.
        pos = scores.gather(1, rows).masked_fill(~ok, float("-inf"))
        best, at = pos.max(1, keepdim=True)  # the first of equal maxima: rows ascend per query
        first = rows.gather(1, at)
        # rank = #(scores > best) + #(scores == best at a lower gallery index). Only rank < kmax
        # matters, so the K best scores decide it (a top-k is ~4x cheaper than a full pass)...
        top = scores.topk(kmax, dim=1).values
        above, equal = (top > best).sum(1), (top == best).sum(1)
        rank = above.clone()
        # ...except where another row ties with the best positive, or might beyond the top K.
        tied = ((above < kmax) & ((equal > 1) | (above + equal >= kmax))).nonzero().squeeze(1)
        if len(tied):
            before = (scores[tied] == best[tied]) & (index[None, :] < first[tied])
            rank[tied] += before.sum(1)
        for k in ks:
            hits[k] += (rank < k).sum()
    return {k: hits[k].float() / max(len(query), 1) for k in ks}


def _positive_rows(
    query_items: torch.Tensor, gallery_items: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gallery rows of each query's item, ascending: rows (q, p) padded with row 0, valid (q, p).

    p is the largest number of gallery rows one item has (captions per item).
    """
    order = torch.argsort(gallery_items, stable=True)
    items, counts = torch.unique_consecutive(gallery_items[order], return_counts=True)
    where = torch.searchsorted(items, query_items).clamp(max=max(len(items) - 1, 0))
    found = (items[where] == query_items) if len(items) else torch.zeros_like(query_items).bool()
    if not found.all():
        missing = query_items[~found]
        raise ValueError(
            f"{len(missing)} of {len(query_items)} queries have no positive in the gallery "
            f"(item ids {missing[:5].tolist()}...); does the caption/item mapping match it?"
        )
    n = counts[where]
    offsets = torch.arange(int(n.max()) if len(n) else 0, device=query_items.device)
    valid = offsets[None, :] < n[:, None]
    starts = (torch.cumsum(counts, 0) - counts)[where]
    slot = (starts[:, None] + offsets[None, :]).clamp(max=max(len(order) - 1, 0))
    return order[slot].masked_fill(~valid, 0), valid


class RetrievalRecall(Metric):
    """R@K of one retrieval direction, accumulated over batches and synced across processes.

    update(query, query_ids, query_items, gallery, gallery_items, gallery_ids=None): query rows
    are identified by `query_ids` and duplicates (e.g. from DDP padding) count once; gallery rows
    are deduplicated by `gallery_ids`, which default to the item ids (one gallery row per item).
    Pass gallery_ids for a gallery with several rows per item (X->text with several captions per
    item). Ties: the deduplicated gallery is sorted by gallery id, and among equal scores the
    lower id ranks first.
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, ks: tuple[int, ...] = (1, 5), chunk: int = 1024, **kwargs) -> None:
        super().__init__(**kwargs)
        self.ks, self.chunk = tuple(ks), int(chunk)
        names = ("query", "query_ids", "query_items", "gallery", "gallery_items", "gallery_ids")
        for name in names:
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(
        self,
        query: torch.Tensor,
        query_ids: torch.Tensor,
        query_items: torch.Tensor,
        gallery: torch.Tensor,
        gallery_items: torch.Tensor,
        gallery_ids: torch.Tensor | None = None,
    ) -> None:
        """query (q, d) with ids and items (q,); gallery (g, d) with items and ids (g,)."""
        self.query.append(query.detach().float())
        self.query_ids.append(query_ids.detach())
        self.query_items.append(query_items.detach())
        self.gallery.append(gallery.detach().float())
        self.gallery_items.append(gallery_items.detach())
        self.gallery_ids.append((gallery_items if gallery_ids is None else gallery_ids).detach())

    @staticmethod
    def _cat(x) -> torch.Tensor:
        return torch.cat(x) if isinstance(x, list) else x

    def compute(self) -> dict[str, torch.Tensor]:
        query, qids = self._cat(self.query), self._cat(self.query_ids)
        qitems = self._cat(self.query_items)
        gallery, gitems = self._cat(self.gallery), self._cat(self.gallery_items)
        _, qfirst = _unique_first(qids)
        _, gfirst = _unique_first(self._cat(self.gallery_ids))
        query, qitems, gallery, gitems = (
            query[qfirst],
            qitems[qfirst],
            gallery[gfirst],
            gitems[gfirst],
        )
        out = recall_at_k(query, gallery, qitems, gitems, self.ks, self.chunk)
        return {f"R@{k}": v for k, v in out.items()}


def _unique_first(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted unique values of x and, for each, the index of its first occurrence."""
    values, inverse = torch.unique(x, sorted=True, return_inverse=True)
    first = torch.full((len(values),), len(x), dtype=torch.long, device=x.device)
    first.scatter_reduce_(0, inverse, torch.arange(len(x), device=x.device), reduce="amin")
    return values, first


def topk_hits(
    scores: torch.Tensor, target: torch.Tensor, ks: tuple[int, ...] = (1, 5)
) -> dict[int, torch.Tensor]:
    """Number of rows whose target class is in the top K, per K.

    scores (n, classes), target (n,) class indices. Ties: the lower class index ranks first.
    """
    n_classes = scores.shape[1]
    bad = (target < 0) | (target >= n_classes)
    if bad.any():
        raise ValueError(
            f"{int(bad.sum())} labels are outside [0, {n_classes}) (e.g. "
            f"{target[bad][:5].tolist()}); the benchmark has {n_classes} classes"
        )
    own = scores.gather(1, target[:, None])
    classes = torch.arange(n_classes, device=scores.device)
    rank = (scores > own).sum(1) + ((scores == own) & (classes[None, :] < target[:, None])).sum(1)
    return {k: (rank < k).sum() for k in ks}


class ZeroShotAccuracy(Metric):
    """Top-K accuracy of zero-shot classification; update(scores (n, classes), target (n,))."""

    full_state_update = False
    higher_is_better = True

    def __init__(self, ks: tuple[int, ...] = (1, 5), **kwargs) -> None:
        super().__init__(**kwargs)
        self.ks = tuple(ks)
        zeros = torch.zeros(len(self.ks), dtype=torch.long)
        self.add_state("hits", default=zeros, dist_reduce_fx="sum")
        self.add_state("total", default=torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, scores: torch.Tensor, target: torch.Tensor) -> None:
        hits = topk_hits(scores.detach().float(), target.detach().long(), self.ks)
        self.hits += torch.stack([hits[k] for k in self.ks])
        self.total += len(target)

    def compute(self) -> dict[str, torch.Tensor]:
        if self.total == 0:
            raise ValueError("zero-shot accuracy of no items: the benchmark is empty")
        return {f"top{k}": h.float() / self.total for k, h in zip(self.ks, self.hits, strict=True)}


class MeanAveragePrecision(MultilabelAveragePrecision):
    """mAP over all classes; update(scores (n, classes), target (n, classes) multi-hot).

    torchmetrics stores the scores and computes each class's AP with sklearn's semantics. Scores
    pass through a sigmoid here, always, because torchmetrics applies one only to the updates
    that leave [0, 1], which would mix scales across chunks (cosine scores lie in [-1, 1]).
    """

    def __init__(self, num_classes: int, **kwargs) -> None:
        super().__init__(num_labels=num_classes, average=None, thresholds=None, **kwargs)

    def update(self, scores: torch.Tensor, target: torch.Tensor) -> None:  # type: ignore[override]
        if scores.shape != target.shape or scores.shape[1] != self.num_labels:
            raise ValueError(
                f"mAP: scores {tuple(scores.shape)} and multi-hot targets {tuple(target.shape)} "
                f"must both be (n, {self.num_labels})"
            )
        super().update(torch.sigmoid(scores.detach().float()), target.detach().long())

    def compute(self) -> torch.Tensor:  # type: ignore[override]
        per_class = super().compute()
        return torch.nan_to_num(per_class, nan=0.0).clamp(min=0.0).mean()


def direction_metrics(pairs: list[tuple[str, str]]) -> torch.nn.ModuleDict:
    """A RetrievalRecall per direction `<q>_to_<t>`, both ways of every modality pair."""
    return torch.nn.ModuleDict(
        {f"{q}_to_{t}": RetrievalRecall() for a, b in pairs for q, t in ((a, b), (b, a))}
    )


def compute_directions(metrics: torch.nn.ModuleDict, prefix: str = "val") -> dict:
    """{`<prefix>/<direction>/R@K`: value, `<prefix>/mean_R@1`: mean}; resets the metrics."""
    out, r1 = {}, []
    for direction, metric in metrics.items():
        values = metric.compute()
        out |= {f"{prefix}/{direction}/{k}": v for k, v in values.items()}
        r1.append(values["R@1"])
        metric.reset()
    if r1:
        out[f"{prefix}/mean_R@1"] = torch.stack(r1).mean()
    return out
