"""Losses of the paper, as small pure functions: float32 math, safe under CUDA and CPU autocast.

Global negatives (gather=True) follow open_clip's ClipLoss with `gather_with_grad`: every rank
gathers every rank's rows (with gradients) and returns the loss of the WHOLE global batch. The
backward of `torch.distributed.nn.functional.all_gather` sums the W ranks' identical gradients into
each rank's own rows (W x the one-process gradient), and DDP divides the summed parameter
gradients by W, so a step equals one process on the concatenated batch
(tests/lightning_modules/omni/test_losses.py).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.distributed as dist
import torch.nn.functional as F


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _zero_like_graph(*tensors: torch.Tensor) -> torch.Tensor:
    """A float32 0 that depends on `tensors`, so that DDP sees every parameter used."""
    return sum(t.float().sum() for t in tensors) * 0.0


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Every rank's rows of x (n_r, ...) concatenated in rank order, with gradients to own rows.

    Ranks may hold different row counts (a bind expert's subset of the batch): rows are padded to
    the largest count before the all_gather and the padding is cut away afterwards.
    """
    if not _distributed():
        return x
    import torch.distributed.nn.functional as dist_nn

    world = dist.get_world_size()
    n = torch.tensor([len(x)], device=x.device)
    counts = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(counts, n)
    counts = [int(c) for c in counts]
    pad = max(counts) - len(x)
    if pad:
        x = torch.cat([x, x.new_zeros((pad, *x.shape[1:]))])
    parts = dist_nn.all_gather(x)
    return torch.cat([p[:c] for p, c in zip(parts, counts, strict=True)])


def info_nce(
    a: torch.Tensor,
    b: torch.Tensor,
    temperature: float = 0.03,
    weights: torch.Tensor | None = None,
    gather: bool = False,
) -> torch.Tensor:
    """Symmetric InfoNCE (Eq. 2) between L2-normalised a, b (B, dim); 0-dim, float32 or wider.

    Row i of `a` and row i of `b` are the positive pair; every other row is a negative.
    weights (B,) >= 0: row i's two terms are weighted by weights[i] (weighted mean over rows with
    weight > 0); rows of weight 0 are neither queries nor negatives. gather=True contrasts against
    every rank's rows when torch.distributed is initialised (see the module docstring).
    """
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"info_nce: a {tuple(a.shape)} and b {tuple(b.shape)} must be (B, dim)")
    if weights is not None and weights.shape != a.shape[:1]:
        raise ValueError(f"info_nce: weights {tuple(weights.shape)}, expected ({len(a)},)")
    if gather:
        a, b = gather_rows(a), gather_rows(b)
        weights = None if weights is None else gather_rows(weights.detach())
    # Under autocast a matmul would run in bf16/fp16: logits / 0.03 then lose ~2 digits.
    with torch.autocast(a.device.type, enabled=False):
        if weights is not None:
            weights = weights.to(a.device, torch.promote_types(a.dtype, torch.float32))
            keep = weights > 0
            if not bool(keep.all()):
                if not bool(keep.any()):
                    return _zero_like_graph(a, b)
                a, b, weights = a[keep], b[keep], weights[keep]
        dtype = torch.promote_types(a.dtype, torch.float32)  # float64 stays float64
        logits = a.to(dtype) @ b.to(dtype).T / temperature  # (n, n)
        target = torch.arange(len(logits), device=logits.device)
        if weights is None:
            return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
        per_row = F.cross_entropy(logits, target, reduction="none") + F.cross_entropy(
            logits.T, target, reduction="none"
        )
        return 0.5 * (weights * per_row).sum() / weights.sum()


def alignment_loss(
    embeddings: Mapping[str, torch.Tensor],
    temperature: float = 0.03,
    weights: Mapping[str, torch.Tensor] | None = None,
    gather: bool = False,
) -> torch.Tensor:
    """L_align (Eq. 5): InfoNCE averaged over every pair of modalities in `embeddings`.

    embeddings: {modality: (B, dim)} L2-normalised. weights: {modality: (B,)} confidences, 0 where
    the tuple has no item of that modality; pair (a, b) weighs row i by weights[a][i] *
    weights[b][i], and a pair whose weights sum to 0 over the (global, if gather) batch is left
    out of the mean.
    """
    names = sorted(embeddings)
    pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1 :]]
    if not pairs:
        raise ValueError(f"alignment_loss: needs 2 or more modalities, got {names}")
    if weights is not None:
        missing = [m for m in names if m not in weights]
        if missing:
            raise ValueError(
                f"alignment_loss: weights lack modalities {missing}; got {sorted(weights)}"
            )
    if gather:  # once per modality, not once per pair; then every rank sees the same batch
        embeddings = {m: gather_rows(embeddings[m]) for m in names}
        if weights is not None:
            weights = {m: gather_rows(weights[m].detach()) for m in names}
    terms = {(a, b): (embeddings[a], embeddings[b]) for a, b in pairs}
    return pair_alignment_loss(terms, temperature, weights)


def pair_alignment_loss(
    terms: Mapping[tuple[str, str], tuple[torch.Tensor, torch.Tensor]],
    temperature: float = 0.03,
    weights: Mapping[str, torch.Tensor] | None = None,
    gather: bool = False,
) -> torch.Tensor:
    """L_align from each pair's own embeddings: the mean of InfoNCE(e_a, e_b) over the pairs.

    terms: {(a, b): (e_a (B, dim), e_b (B, dim))}, L2-normalised; a modality may be embedded
    differently for each pair it is in (leave-retriever-out alignment). weights as in
    `alignment_loss`; a pair whose weights sum to 0 over the batch is left out of the mean.
    """
    if gather:
        terms = {p: (gather_rows(ea), gather_rows(eb)) for p, (ea, eb) in terms.items()}
        if weights is not None:
            weights = {m: gather_rows(w.detach()) for m, w in weights.items()}
    if weights is None:
        losses = [info_nce(ea, eb, temperature) for ea, eb in terms.values()]
        return torch.stack(losses).mean()
    losses = []
    for (a, b), (ea, eb) in terms.items():
        w = weights[a].float() * weights[b].float()
        if bool((w > 0).any()):
            losses.append(info_nce(ea, eb, temperature, w))
    if not losses:
        return _zero_like_graph(*(e for pair in terms.values() for e in pair))
    return torch.stack(losses).mean()


def decoupling_loss(router_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """L_dec (Eq. 6): BCE of the text router's PRE-sigmoid outputs (B, M) against labels (B, M).

    Summed over the M groups (Eq. 6's sum) and averaged over the batch; float32. labels[i, g] = 1
    when text i's provenance is the modality that group g's text encoder specialises in. The
    logits form is what CUDA autocast accepts (it refuses binary_cross_entropy on probabilities)
    and stays finite where a sigmoid would saturate to 0 or 1.
    """
    if router_logits.shape != labels.shape or router_logits.ndim != 2:
        raise ValueError(
            f"decoupling_loss: logits {tuple(router_logits.shape)} and labels "
            f"{tuple(labels.shape)} must both be (B, M)"
        )
    with torch.autocast(router_logits.device.type, enabled=False):
        bce = F.binary_cross_entropy_with_logits(
            router_logits.float(), labels.float(), reduction="none"
        )
        return bce.sum(1).mean()
