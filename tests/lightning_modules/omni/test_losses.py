"""Losses: the formulas, row weights, autocast safety, and global negatives across 2 processes."""

from __future__ import annotations

import math
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from lightning_modules.omni.losses import alignment_loss, decoupling_loss, info_nce

MODALITIES = ("audio", "image", "point", "text")


def _unit(n: int, dim: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)), dim=-1)


def _weighted_reference(a: torch.Tensor, b: torch.Tensor, t: float, w: list[float]) -> float:
    """Eq. 2 with row weights, in plain floats: rows of weight 0 are dropped entirely."""
    keep = [i for i, x in enumerate(w) if x > 0]
    s = (a @ b.T / t).tolist()
    total = 0.0
    for i in keep:
        row = math.log(sum(math.exp(s[i][j]) for j in keep))
        col = math.log(sum(math.exp(s[j][i]) for j in keep))
        total += w[i] * 0.5 * ((row - s[i][i]) + (col - s[i][i]))
    return total / sum(w[i] for i in keep)


def test_info_nce_with_weights_matches_the_formula() -> None:
    a, b, t = _unit(7, 5, 0).double(), _unit(7, 5, 1).double(), 0.07
    w = [1.0, 0.5, 0.0, 2.0, 0.25, 0.0, 1.0]
    got = info_nce(a, b, t, torch.tensor(w)).item()
    assert got == pytest.approx(_weighted_reference(a, b, t, w), rel=1e-10)  # float64 stays


def test_info_nce_unit_weights_equal_no_weights() -> None:
    a, b = _unit(9, 8, 2), _unit(9, 8, 3)
    torch.testing.assert_close(info_nce(a, b, 0.05, torch.ones(9)), info_nce(a, b, 0.05))


def test_zero_weight_row_is_neither_query_nor_negative() -> None:
    a, b = _unit(6, 8, 4).requires_grad_(), _unit(6, 8, 5)
    w = torch.tensor([1.0, 0.3, 0.0, 2.0, 1.0, 0.7])
    loss = info_nce(a, b, 0.05, w)
    keep = w > 0
    dropped = info_nce(a[keep], b[keep], 0.05, w[keep])
    torch.testing.assert_close(loss, dropped)
    # and it differs from treating the row as a negative with weight 0 only as a query
    loss.backward()
    assert a.grad[2].abs().max() == 0 and a.grad[0].abs().max() > 0
    scaled = info_nce(a.detach(), b, 0.05, w.clamp(min=1e-6))
    assert abs(scaled.item() - loss.item()) > 1e-4


def test_all_zero_weights_give_zero_with_a_graph() -> None:
    a = _unit(4, 3, 6).requires_grad_()
    loss = info_nce(a, _unit(4, 3, 7), 0.05, torch.zeros(4))
    assert loss.item() == 0 and loss.requires_grad and loss.dtype == torch.float32
    loss.backward()
    assert a.grad.abs().max() == 0


def test_info_nce_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match=r"a \(4, 3\) and b \(5, 3\)"):
        info_nce(_unit(4, 3, 0), _unit(5, 3, 0))
    with pytest.raises(ValueError, match=r"weights \(3,\), expected \(4,\)"):
        info_nce(_unit(4, 3, 0), _unit(4, 3, 1), weights=torch.ones(3))


def test_alignment_loss_weights_pairs_by_product_and_skips_empty_pairs() -> None:
    emb = {m: _unit(8, 6, i) for i, m in enumerate(MODALITIES)}
    w = {m: torch.ones(8) for m in MODALITIES}
    w["point"] = torch.zeros(8)  # no tuple has a point: its 3 pairs leave the mean
    w["audio"] = torch.tensor([1, 1, 0, 1, 0.5, 1, 1, 0.2])
    pairs = [("audio", "image"), ("audio", "text"), ("image", "text")]
    direct = sum(info_nce(emb[a], emb[b], 0.05, w[a] * w[b]) for a, b in pairs) / 3
    torch.testing.assert_close(alignment_loss(emb, 0.05, w), direct)
    ones = {m: torch.ones(8) for m in MODALITIES}
    torch.testing.assert_close(alignment_loss(emb, 0.05, ones), alignment_loss(emb, 0.05))
    with pytest.raises(ValueError, match=r"weights lack modalities \['text'\]"):
        alignment_loss(emb, 0.05, {m: w[m] for m in MODALITIES[:3]})


def test_decoupling_loss_sums_groups_and_averages_rows() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5], [-3.0, 0.0, 4.0]])
    labels = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    p = torch.sigmoid(logits.double())
    direct = -(labels * p.log() + (1 - labels) * (1 - p).log()).sum(1).mean()
    assert decoupling_loss(logits, labels).item() == pytest.approx(direct.item(), rel=1e-6)
    # Saturated logits stay finite (the probability form gives log(0) = -inf here).
    assert torch.isfinite(decoupling_loss(torch.tensor([[200.0, -200.0]]), torch.eye(2)[1:]))
    with pytest.raises(ValueError, match=r"logits \(2, 3\) and labels \(2, 2\)"):
        decoupling_loss(logits, labels[:, :2])


def test_every_loss_is_float32_and_exact_under_bf16_autocast() -> None:
    a, b = _unit(16, 32, 8).bfloat16(), _unit(16, 32, 9).bfloat16()
    w = torch.rand(16, generator=torch.Generator().manual_seed(0)).bfloat16()
    emb = {"audio": a, "text": b, "image": _unit(16, 32, 10).bfloat16()}
    weights = {m: w for m in emb}
    logits, labels = torch.randn(16, 3).bfloat16() * 3, (torch.rand(16, 3) > 0.5).float()
    calls = {
        "info_nce": lambda **k: info_nce(**k["nce"], temperature=0.03),
        "info_nce_w": lambda **k: info_nce(**k["nce"], temperature=0.03, weights=k["w"]),
        "alignment": lambda **k: alignment_loss(k["emb"], 0.03, k["weights"]),
        "decoupling": lambda **k: decoupling_loss(k["logits"], labels),
    }

    def args(cast) -> dict:
        return dict(
            nce=dict(a=cast(a), b=cast(b)),
            w=cast(w),
            emb={m: cast(e) for m, e in emb.items()},
            weights={m: cast(x) for m, x in weights.items()},
            logits=cast(logits),
        )

    for name, call in calls.items():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = call(**args(lambda x: x))
        want = call(**args(lambda x: x.float()))  # the same bf16 values, float32 math
        assert got.dtype == torch.float32 and torch.isfinite(got), name
        # bf16 logits would be ~1e-2 off at temperature 0.03; float32 ones agree to rounding.
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=name)


# ----------------------------------------------------------- global negatives across 2 processes

SIZES = (3, 5)  # rows per rank: unequal, as a bind expert's subset of a batch can be
DIM, IN = 6, 10


def _problem() -> tuple[torch.nn.Linear, torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    """A model and the concatenated batch: inputs x, targets y (B, DIM), weights, per-modality."""
    torch.manual_seed(0)
    model = torch.nn.Linear(IN, DIM)
    n = sum(SIZES)
    x, y = torch.randn(n, IN), F.normalize(torch.randn(n, DIM), dim=-1)
    w = torch.rand(n) + 0.5
    w[1] = 0.0  # a zero-weight row on rank 0
    extra = {"text": F.normalize(torch.randn(n, DIM), dim=-1), "conf": torch.rand(n)}
    return model, x, y, w, extra


def _losses(model: torch.nn.Module, x, y, w, extra, gather: bool) -> torch.Tensor:
    z = F.normalize(model(x), dim=-1)
    emb = {"audio": z, "image": y, "text": extra["text"]}
    weights = {"audio": w, "image": torch.ones_like(w), "text": extra["conf"]}
    return info_nce(z, y, 0.1, w, gather=gather) + alignment_loss(emb, 0.1, weights, gather)


def _rank_main(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=len(SIZES))
    try:
        model, x, y, w, extra = _problem()
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        lo = sum(SIZES[:rank])
        rows = slice(lo, lo + SIZES[rank])
        local = {k: v[rows] for k, v in extra.items()}
        loss = _losses(ddp, x[rows], y[rows], w[rows], local, gather=True)
        loss.backward()  # DDP averages the parameter gradients over the 2 ranks
        grads = {k: p.grad for k, p in model.named_parameters()}
        torch.save({"loss": loss.detach(), "grads": grads}, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_gathered_loss_and_gradients_equal_one_process_on_the_whole_batch(tmp_path: Path) -> None:
    model, x, y, w, extra = _problem()
    loss = _losses(model, x, y, w, extra, gather=True)  # no process group: gather is a no-op
    loss.backward()
    mp.spawn(_rank_main, args=(_free_port(), str(tmp_path)), nprocs=len(SIZES), join=True)
    for rank in range(len(SIZES)):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        # float32 sums in another order (padding, all_to_all): equal to rounding, not bitwise.
        torch.testing.assert_close(got["loss"], loss.detach(), rtol=1e-5, atol=1e-6)
        for name, p in model.named_parameters():
            torch.testing.assert_close(got["grads"][name], p.grad, rtol=1e-5, atol=1e-6)
    # The check can fail: local negatives (gather=False on each rank) give another loss.
    local = _losses(model, x[: SIZES[0]], y[: SIZES[0]], w[: SIZES[0]],
                    {k: v[: SIZES[0]] for k, v in extra.items()}, gather=False)  # fmt: skip
    assert abs(local.item() - loss.item()) > 1e-3
