"""Retrieval and zero-shot metrics against torchmetrics, sklearn and a naive full sort."""

from __future__ import annotations

import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from sklearn.metrics import average_precision_score, top_k_accuracy_score
from torchmetrics.functional.classification import multiclass_accuracy
from torchmetrics.retrieval import RetrievalHitRate

from lightning_modules.evaluation.metrics import (
    MeanAveragePrecision,
    RetrievalRecall,
    ZeroShotAccuracy,
    recall_at_k,
    topk_hits,
)


def naive_recall(query, gallery, query_items, gallery_items, k: int) -> float:
    """The whole score matrix, stably sorted: among equal scores the lower gallery index first."""
    order = torch.sort(-(query @ gallery.T), dim=1, stable=True).indices
    positive = gallery_items[order] == query_items[:, None]
    return float(positive[:, :k].any(1).float().mean())


def multi_caption(n_items: int = 30, captions: int = 3, dim: int = 8, seed: int = 0):
    """Items (n, d) and their captions (n * captions, d), each caption near its item."""
    g = torch.Generator().manual_seed(seed)
    items = torch.randn(n_items, dim, generator=g)
    text = items.repeat_interleave(captions, 0) + 1.5 * torch.randn(
        n_items * captions, dim, generator=g
    )
    return items, torch.arange(n_items), text, torch.arange(n_items).repeat_interleave(captions)


# ---------------------------------------------------------------------------- retrieval


def test_recall_matches_torchmetrics_hit_rate() -> None:
    """CLIP_benchmark's R@K is torchmetrics' hit rate: any positive in the top K."""
    items, item_ids, text, text_items = multi_caption()
    for query, qi, gallery, gi in (
        (text, text_items, items, item_ids),
        (items, item_ids, text, text_items),
    ):
        ours = recall_at_k(query, gallery, qi, gi, ks=(1, 5, 10), chunk=7)
        scores = query @ gallery.T
        target = qi[:, None] == gi[None, :]
        indexes = torch.arange(len(query)).repeat_interleave(len(gallery))
        for k in (1, 5, 10):
            ref = RetrievalHitRate(top_k=k)(scores.flatten(), target.flatten(), indexes=indexes)
            assert float(ours[k]) == pytest.approx(float(ref), abs=1e-6)
            assert 0 < float(ours[k]) < 1  # the data is hard enough that the check means something


def test_ties_rank_lower_gallery_index_first() -> None:
    gallery = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # rows 0 and 1 are identical
    query = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    out = recall_at_k(query, gallery, torch.tensor([0, 1]), torch.arange(3), ks=(1, 2))
    assert float(out[1]) == 0.5  # query 0's positive (row 0) wins the tie, query 1's loses it
    assert float(out[2]) == 1.0


def test_many_ties_match_a_stable_full_sort() -> None:
    """Coarse integer embeddings tie everywhere; every tie must resolve as the stable sort does."""
    g = torch.Generator().manual_seed(1)
    query = torch.randint(-1, 2, (200, 3), generator=g).float()
    gallery = torch.randint(-1, 2, (150, 3), generator=g).float()
    qi, gi = torch.randint(0, 50, (200,), generator=g), torch.randint(0, 50, (150,), generator=g)
    gi[:50] = torch.arange(50)  # every query item has a positive
    out = recall_at_k(query, gallery, qi, gi, ks=(1, 3, 5, 20, 500), chunk=16)
    for k in (1, 3, 5, 20, 500):  # 500 > gallery size: every query is a hit
        assert float(out[k]) == pytest.approx(naive_recall(query, gallery, qi, gi, k), abs=1e-6)


def test_chunking_does_not_change_results() -> None:
    items, item_ids, text, text_items = multi_caption(60, 2)
    full = recall_at_k(text, items, text_items, item_ids, ks=(1, 5), chunk=10_000)
    for chunk in (1, 7, 64):
        assert recall_at_k(text, items, text_items, item_ids, ks=(1, 5), chunk=chunk) == full


def test_query_without_positive_is_an_error() -> None:
    with pytest.raises(ValueError, match="no positive in the gallery"):
        recall_at_k(torch.randn(3, 4), torch.randn(2, 4), torch.tensor([0, 1, 7]), torch.arange(2))


def test_multi_caption_gallery_needs_gallery_ids() -> None:
    """item -> text with several captions per item: the Metric must keep every caption row."""
    items, item_ids, text, text_items = multi_caption()
    expected = recall_at_k(items, text, item_ids, text_items, ks=(1, 5))
    metric = RetrievalRecall()
    metric.update(items, item_ids, item_ids, text, text_items, gallery_ids=torch.arange(len(text)))
    out = metric.compute()
    assert float(out["R@1"]) == pytest.approx(float(expected[1]))
    assert float(out["R@1"]) == pytest.approx(naive_recall(items, text, item_ids, text_items, 1))
    # Without gallery ids the gallery is deduplicated by item (one row per item, as in training).
    single = RetrievalRecall()
    single.update(items, item_ids, item_ids, text, text_items)
    first = torch.arange(0, len(text), 3)
    assert float(single.compute()["R@1"]) == pytest.approx(
        float(recall_at_k(items, text[first], item_ids, item_ids, ks=(1,))[1])
    )


def test_retrieval_metric_merges_states_like_ddp() -> None:
    """Two ranks' states (one padded with a duplicate row) give the single-process result."""
    items, item_ids, text, text_items = multi_caption(40, 1, seed=3)
    whole = RetrievalRecall()
    whole.update(text, text_items, text_items, items, item_ids)
    rank0, rank1 = RetrievalRecall(), RetrievalRecall()
    rank0.update(text[:25], text_items[:25], text_items[:25], items[:25], item_ids[:25])
    pad = torch.cat([torch.arange(25, 40), torch.tensor([0])])  # DistributedSampler-style padding
    rank1.update(text[pad], text_items[pad], text_items[pad], items[pad], item_ids[pad])
    rank0.merge_state(rank1)
    assert {k: float(v) for k, v in rank0.compute().items()} == {
        k: float(v) for k, v in whole.compute().items()
    }


# ---------------------------------------------------------------------------- zero-shot


def test_topk_matches_sklearn_and_torchmetrics() -> None:
    g = torch.Generator().manual_seed(0)
    scores, target = torch.randn(300, 12, generator=g), torch.randint(0, 12, (300,), generator=g)
    metric = ZeroShotAccuracy(ks=(1, 5))
    for i in range(0, 300, 64):
        metric.update(scores[i : i + 64], target[i : i + 64])
    out = metric.compute()
    for k in (1, 5):
        sk = top_k_accuracy_score(target.numpy(), scores.numpy(), k=k, labels=np.arange(12))
        tm = multiclass_accuracy(scores, target, num_classes=12, top_k=k, average="micro")
        assert float(out[f"top{k}"]) == pytest.approx(sk, abs=1e-6)
        assert float(out[f"top{k}"]) == pytest.approx(float(tm), abs=1e-6)
        assert 0 < sk < 1


def test_topk_ties_rank_lower_class_first() -> None:
    scores = torch.zeros(10, 10)  # every class ties
    hits = topk_hits(scores, torch.arange(10), ks=(1, 5))
    assert int(hits[1]) == 1 and int(hits[5]) == 5  # class c ranks c-th


def test_topk_rejects_labels_out_of_range() -> None:
    with pytest.raises(ValueError, match=r"outside \[0, 4\)"):
        topk_hits(torch.randn(3, 4), torch.tensor([0, 4, 1]))


def _sklearn_map(target: np.ndarray, scores: np.ndarray) -> float:
    aps = [average_precision_score(target[:, c], scores[:, c]) if target[:, c].any() else 0.0
           for c in range(target.shape[1])]  # fmt: skip
    return float(np.mean(aps))


def test_map_matches_sklearn_with_empty_class_and_ties() -> None:
    rng = np.random.default_rng(0)
    target = (rng.random((200, 6)) < 0.3).astype(np.int64)
    target[:, 5] = 0  # a class with no positives counts as 0
    scores = np.round(rng.standard_normal((200, 6)) * 0.3 + target * 0.4, 1)  # coarse: many ties
    scores[:100] = np.clip(scores[:100], 0, 1)
    metric = MeanAveragePrecision(6)
    # The first chunk lies in [0, 1] and the second does not: both must be on one scale.
    metric.update(torch.from_numpy(scores[:100]).float(), torch.from_numpy(target[:100]))
    metric.update(torch.from_numpy(scores[100:]).float(), torch.from_numpy(target[100:]))
    expected = _sklearn_map(target, scores.astype(np.float32))
    assert float(metric.compute()) == pytest.approx(expected, abs=1e-6)
    assert expected < _sklearn_map(target[:, :5], scores[:, :5])  # the empty class did count


def test_map_rejects_wrong_shape() -> None:
    with pytest.raises(ValueError, match=r"\(n, 4\)"):
        MeanAveragePrecision(4).update(torch.randn(5, 3), torch.zeros(5, 3, dtype=torch.long))


def test_zeroshot_metrics_merge_states_like_ddp() -> None:
    g = torch.Generator().manual_seed(2)
    scores, target = torch.randn(100, 7, generator=g), torch.randint(0, 7, (100,), generator=g)
    multi = (torch.rand(100, 7, generator=g) < 0.3).long()
    for make, t in (
        (lambda: ZeroShotAccuracy((1, 3)), target),
        (lambda: MeanAveragePrecision(7), multi),
    ):
        whole, rank0, rank1 = make(), make(), make()
        whole.update(scores, t)
        rank0.update(scores[:60], t[:60])
        rank1.update(scores[60:], t[60:])
        rank0.merge_state(rank1)
        a, b = rank0.compute(), whole.compute()
        a, b = (a, b) if isinstance(a, dict) else ({"v": a}, {"v": b})
        assert {k: float(v) for k, v in a.items()} == pytest.approx(
            {k: float(v) for k, v in b.items()}
        )


# ---------------------------------------------------------------------------- real processes


def _gloo_worker(rank: int, port: int, results: dict) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                         world_size=2)  # fmt: skip
    items, item_ids, text, text_items = multi_caption(40, 3, seed=5)
    g = torch.Generator().manual_seed(5)
    scores, target = torch.randn(90, 7, generator=g), torch.randint(0, 7, (90,), generator=g)
    multi = (torch.rand(90, 7, generator=g) < 0.3).long()
    rows = slice(0, 50) if rank == 0 else slice(50, 120)  # uneven shards
    caps = torch.arange(len(text))[rows]
    recall = RetrievalRecall()
    # item -> text: each rank holds some captions and all items (the gallery is synced and deduped).
    recall.update(items, item_ids, item_ids, text[caps], text_items[caps], gallery_ids=caps)
    rows = slice(0, 40) if rank == 0 else slice(40, 90)
    acc, ap = ZeroShotAccuracy((1, 3)), MeanAveragePrecision(7)
    acc.update(scores[rows], target[rows])
    ap.update(scores[rows], multi[rows])
    out = {f"recall/{k}": float(v) for k, v in recall.compute().items()}
    out |= {f"acc/{k}": float(v) for k, v in acc.compute().items()} | {"mAP": float(ap.compute())}
    results[rank] = out
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_metrics_sync_across_two_gloo_processes() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_gloo_worker, args=(port, results), nprocs=2, join=True)
    items, item_ids, text, text_items = multi_caption(40, 3, seed=5)
    g = torch.Generator().manual_seed(5)
    scores, target = torch.randn(90, 7, generator=g), torch.randint(0, 7, (90,), generator=g)
    multi = (torch.rand(90, 7, generator=g) < 0.3).long()
    expected = {
        f"recall/R@{k}": float(v) for k, v in recall_at_k(items, text, item_ids, text_items).items()
    }
    acc = ZeroShotAccuracy((1, 3))
    acc.update(scores, target)
    expected |= {f"acc/{k}": float(v) for k, v in acc.compute().items()}
    expected["mAP"] = _sklearn_map(multi.numpy(), scores.numpy())
    for rank in (0, 1):
        assert results[rank] == pytest.approx(expected, abs=1e-6)
