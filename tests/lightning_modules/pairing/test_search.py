"""Exact blocked top-k search (lightning_modules/pairing/search.py): ties, directions, shards,
biases."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import brute_topk, gauss_rows

from lightning_modules.pairing.search import (
    ShardRows,
    csls_bias,
    pick_backend,
    search,
    take_rows,
)


def _ties(n: int, d: int, seed: int) -> np.ndarray:
    """(n, d) float32 rows of -1/0/1: many equal scores, all computed exactly in float32."""
    return np.random.default_rng(seed).integers(-1, 2, (n, d)).astype(np.float32)


# ---------------------------------------------------------------------------- exact search


@pytest.mark.parametrize("backend", ["torch", "faiss", "auto"])
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("blocks", [(7, 5), (1000, 1000), (1, 64)])
def test_search_matches_brute_force_with_ties(backend: str, k: int, blocks: tuple) -> None:
    q, g = _ties(90, 3, seed=0), _ties(130, 3, seed=1)
    want_s, want_i = brute_topk(q, g, k)
    # The data really has more gallery rows at the k-th best score than fit in the top-k.
    scores = q @ g.T
    assert ((scores >= want_s[:, -1:]).sum(1) > k).mean() > 0.5
    got = search(q, g, k, backend=backend, chunk=blocks[0], gallery_chunk=blocks[1])["a_to_b"]
    np.testing.assert_array_equal(got[1], want_i)
    np.testing.assert_array_equal(got[0], want_s.astype(np.float32))


def test_auto_backend_picks_the_kernel_by_direction_mode(caplog: pytest.LogCaptureFixture) -> None:
    # Both directions at once (one pass serves both): ours. One direction on the CPU: the kernel
    # a timed probe found faster at these block sizes, said in the log and kept for the process.
    assert pick_backend("auto", True, True, "cpu", 64, 256, 512) == "torch"
    with caplog.at_level("INFO", logger="lightning_modules.pairing.search"):
        one = pick_backend("auto", True, False, "cpu", 64, 256, 512)
    assert one in ("torch", "faiss") and f"uses {one} (probe torch" in caplog.text
    assert pick_backend("auto", False, True, "cpu", 64, 256, 512) == one
    assert pick_backend("torch", True, False, "cpu") == "torch"
    with pytest.raises(ValueError, match=r"pair.backend='blas'; expected one of \['auto'"):
        pick_backend("blas", True, False, "cpu")


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_search_both_directions_on_random_data(backend: str) -> None:
    a, b = gauss_rows(300, 32, seed=2), gauss_rows(450, 32, seed=3)
    got = search(a, b, 4, a_to_b=True, b_to_a=True, backend=backend, chunk=64, gallery_chunk=100)
    for key, (q, g) in (("a_to_b", (a, b)), ("b_to_a", (b, a))):
        want_s, want_i = brute_topk(q, g, 4)
        np.testing.assert_array_equal(got[key][1], want_i)
        np.testing.assert_allclose(got[key][0], want_s, atol=1e-5)


def test_search_reads_float16_shards_block_by_block() -> None:
    parts = [gauss_rows(n, 16, seed=n).astype(np.float16) for n in (50, 1, 77)]
    rows = ShardRows(parts)
    whole = np.concatenate(parts)
    assert rows.shape == whole.shape
    for sl in (slice(0, 10), slice(45, 52), slice(50, 51), slice(40, 500), slice(0, 128)):
        np.testing.assert_array_equal(rows[sl], whole[sl])
    q = gauss_rows(40, 16, seed=9)
    got = search(q, rows, 2, chunk=16, gallery_chunk=30)["a_to_b"][1]
    np.testing.assert_array_equal(got, brute_topk(q, whole.astype(np.float32), 2)[1])


@pytest.mark.parametrize(
    "q, g, k, match",
    [
        (np.zeros((0, 4), np.float32), gauss_rows(5, 4, 0), 1, "empty input"),
        (gauss_rows(5, 4, 0), np.zeros((0, 4), np.float32), 1, "empty input"),
        (gauss_rows(5, 4, 0), gauss_rows(5, 3, 0), 1, "dim 4, gallery 3"),
        (gauss_rows(5, 4, 0), gauss_rows(2, 4, 0), 3, "topk=3"),
    ],
)
def test_search_refuses_bad_input(q: np.ndarray, g: np.ndarray, k: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        search(q, g, k)


def test_take_rows_reads_any_rows_of_shards() -> None:
    parts = [gauss_rows(n, 8, seed=n).astype(np.float16) for n in (5, 1, 9)]
    whole = np.concatenate(parts).astype(np.float32)
    index = np.array([14, 0, 5, 4, 6, 5, 13])
    np.testing.assert_array_equal(take_rows(ShardRows(parts), index, chunk=2), whole[index])
    np.testing.assert_array_equal(take_rows(whole, index), whole[index])


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_search_adds_row_and_column_biases(backend: str) -> None:
    a, b = gauss_rows(60, 16, seed=4), gauss_rows(80, 16, seed=5)
    a_bias = np.random.default_rng(6).uniform(-0.5, 0, 60).astype(np.float32)
    b_bias = np.random.default_rng(7).uniform(-0.5, 0, 80).astype(np.float32)
    got = search(a, b, 3, a_to_b=True, b_to_a=True, backend=backend, chunk=16, gallery_chunk=32,
                 a_bias=a_bias, b_bias=b_bias)  # fmt: skip
    biased = a.astype(np.float64) @ b.astype(np.float64).T + a_bias[:, None] + b_bias[None, :]
    for key, s in (("a_to_b", biased), ("b_to_a", biased.T)):
        rows = np.argsort(-s, axis=1, kind="stable")[:, :3]
        np.testing.assert_array_equal(got[key][1], rows)
        # float32 sums in another order than float64: a few ulps.
        np.testing.assert_allclose(got[key][0], np.take_along_axis(s, rows, 1), atol=1e-5)
    # Without a bias the ranking really differs: the test would notice a bias left out.
    plain = search(a, b, 3, a_to_b=True, b_to_a=True, backend=backend)
    assert not np.array_equal(plain["b_to_a"][1], got["b_to_a"][1])
    with pytest.raises(ValueError, match=r"b_bias has shape \(3,\); expected \(80,\)"):
        search(a, b, 1, b_bias=np.zeros(3))


def test_csls_bias_is_minus_half_the_mean_top_k_score() -> None:
    a, b = gauss_rows(30, 8, seed=8), gauss_rows(40, 8, seed=9)
    a_bias, b_bias = csls_bias(a, b, k=5)
    s = a.astype(np.float64) @ b.astype(np.float64).T
    np.testing.assert_allclose(a_bias, -np.sort(s, 1)[:, -5:].mean(1) / 2, atol=1e-6)
    np.testing.assert_allclose(b_bias, -np.sort(s.T, 1)[:, -5:].mean(1) / 2, atol=1e-6)
