"""Approximate pair search (lightning_modules/pairing/ann.py): recall, fallback, the schema's
choices, and the pair stage's table and summary with pair.search=ivf|hnsw."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from conftest import PAIR_STAGE, brute_topk, compose_config, pair_summary

from datamodules.cache import EmbeddingCache, cache_dir
from datamodules.tuples import load_tuples
from encoders.modalities import MODALITIES
from lightning_modules.pairing.ann import Ann, search_direction
from lightning_modules.pairing.search import search
from lightning_modules.runtime.schema import ConfigError, validate
from train import train


def _clustered(n: int, d: int, seed: int, clusters: int = 100) -> np.ndarray:
    """(n, d) unit rows around `clusters` shared centres (the same for every seed)."""
    centres = np.random.default_rng(0).standard_normal((clusters, d)).astype(np.float32)
    r = np.random.default_rng(seed)
    x = centres[r.integers(0, clusters, n)] + 0.7 * r.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _ann(**settings) -> Ann:
    """The pair stage's search settings (conf/config.yaml) with these changed."""
    return Ann.from_config({**compose_config([]).pair, **settings})


@pytest.mark.parametrize(
    "ann",
    [_ann(search="ivf", nlist=64, nprobe=8), _ann(search="hnsw", hnsw_m=16, ef_search=64)],
    ids=["ivf", "hnsw"],
)
def test_recall_at_1_is_high_on_a_clustered_pool(ann: Ann) -> None:
    q, g = _clustered(1500, 32, seed=1), _clustered(4000, 32, seed=2)
    got = search_direction(q, g, 3, ann, seed=0)
    want_s, want_i = brute_topk(q, g, 3)
    recall = (got.rows[:, 0] == want_i[:, 0]).mean()
    assert recall > 0.95
    # The report's recall is that of its seeded sample, checked against exact search.
    assert got.report["index"] == ann.search and got.report["fallback"] is None
    assert got.report["recall_queries"] == 1000 and got.report["recall_at_1"] > 0.95
    assert abs(got.report["recall_at_1"] - recall) < 0.03
    assert got.report["settings"] == ann.settings() and got.report["build_seconds"] > 0
    # search.py's shape: best first, scores the rows' exact inner products, valid rows.
    assert got.rows.dtype == np.int64 and got.scores.dtype == np.float32
    assert got.rows.shape == got.scores.shape == (1500, 3) and (got.rows >= 0).all()
    assert (np.diff(got.scores, axis=1) <= 0).all()
    exact = np.einsum("nd,nkd->nk", q.astype(np.float64), g[got.rows].astype(np.float64))
    np.testing.assert_allclose(got.scores, exact, atol=1e-5)
    assert (got.scores[:, 0] <= want_s[:, 0] + 1e-5).all()  # never better than exact


def test_queries_the_index_cannot_fill_are_searched_exactly() -> None:
    # One probed cell of ~60 rows cannot give a top-100: those queries are searched exactly.
    q, g = _clustered(200, 16, seed=3), _clustered(4000, 16, seed=4)
    got = search_direction(q, g, 100, _ann(search="ivf", nlist=64, nprobe=1), seed=0)
    assert got.report["exact_rows"] > 0 and (got.rows >= 0).all()
    assert np.isfinite(got.scores).all() and (np.diff(got.scores, axis=1) <= 0).all()


def test_a_pool_too_small_for_the_index_is_searched_exactly() -> None:
    q, g = _clustered(300, 16, seed=5), _clustered(2000, 16, seed=6)
    exact = search(q, g, 2)["a_to_b"]
    small = {
        _ann(search="ivf", nlist=1024, nprobe=8): "2000 gallery rows < 39 x pair.nlist=1024",
        _ann(search="hnsw", ef_search=2000): "2000 gallery rows <= pair.ef_search=2000",
    }
    for ann, why in small.items():
        got = search_direction(q, g, 2, ann)
        assert got.report["index"] == "exact" and why in got.report["fallback"]
        assert got.report["recall_at_1"] is None
        np.testing.assert_array_equal(got.rows, exact[1])


def test_unknown_search_fails_the_config_check_listing_the_choices() -> None:
    with pytest.raises(ConfigError, match=r"pair.search: got 'annoy': .*'exact', 'ivf' or 'hnsw'"):
        validate(compose_config(["pair.search=annoy"]), strict=True)
    with pytest.raises(ConfigError, match=r"pair.nprobe: got 0: .*greater than or equal to 1"):
        validate(compose_config(["pair.nprobe=0"]), strict=True)
    with pytest.raises(ValueError, match="pair.nprobe=64 exceeds pair.nlist=32"):
        _ann(search="ivf", nlist=32, nprobe=64)


# Small graphs keep the stage tests fast; the defaults are measured in bench/pair_scale.py.
HNSW = ("pair.search=hnsw", "pair.hnsw_m=16", "pair.ef_search=64", "pair.ef_construction=40")


def _pool_rows(root, space: str, m: str) -> np.ndarray:
    return EmbeddingCache(cache_dir(root, "pool", space, m)).load()


def test_stage_hnsw_writes_a_table_and_a_summary_with_recall(compose_cfg, small_world) -> None:
    cfg = compose_cfg(*PAIR_STAGE, *HNSW, "pair.recall_queries=500", "pair.modalities=[image,text]")
    train(cfg)
    table, meta = load_tuples(cfg.pair.output)
    summary = pair_summary(cfg)
    assert summary["tuples"] == 2 * 2000 and meta["routes"] == {"image_text": "eva_clip_18b"}
    index = summary["search_index"]
    assert index["search"] == "hnsw" and index["fallbacks"] == {}
    assert index["settings"] == {"M": 16, "efSearch": 64, "efConstruction": 40}
    assert index["min_recall_at_1"] > 0.9 and index["build_seconds"] > 0
    assert [(e["query"], e["gallery"]) for e in summary["search"]] == [
        ("image", "text"),
        ("text", "image"),
    ]
    for entry in summary["search"]:
        assert entry["index"] == "hnsw" and entry["recall_queries"] == 500
        assert entry["search_seconds"] > 0 and entry["recall_at_1"] > 0.9
    # The tuples of exact search, but for the few queries whose top-1 the graph missed.
    img, txt = (_pool_rows(small_world, "eva_clip_18b", m) for m in ("image", "text"))
    image = table["start"] == MODALITIES.index("image")
    np.testing.assert_array_equal(table["image"][image], np.arange(2000))
    exact = search(img, txt, 1)["a_to_b"][1][:, 0]
    assert (table["text"][image] == exact).mean() > 0.95


def test_stage_falls_back_to_exact_and_records_it(compose_cfg, small_world, caplog) -> None:
    cfg = compose_cfg(*PAIR_STAGE, "pair.search=ivf", "pair.modalities=[image,text]")
    with caplog.at_level(logging.WARNING, logger="lightning_modules.stages.pair"):
        train(cfg)
    index = pair_summary(cfg)["search_index"]
    why = "2000 gallery rows < 39 x pair.nlist=1024 (39936)"
    assert set(index["fallbacks"]) == {"eva_clip_18b:image->text", "eva_clip_18b:text->image"}
    assert all(why in v for v in index["fallbacks"].values()) and index["min_recall_at_1"] is None
    assert all(e["index"] == "exact" for e in pair_summary(cfg)["search"])
    assert "exact search instead of pair.search=ivf" in caplog.text
    # With cells the pool can train, the same run is approximate and measures its recall.
    cfg = compose_cfg(*PAIR_STAGE, "pair.search=ivf", "pair.modalities=[image,text]",
                      "pair.nlist=32", "pair.nprobe=8",
                      "pair.output=${paths.output_dir}/ivf/tuples.npz")  # fmt: skip
    train(cfg)
    index = pair_summary(cfg)["search_index"]
    assert index["fallbacks"] == {} and index["min_recall_at_1"] > 0.9


def test_stage_cleaning_rules_run_on_approximate_neighbours(compose_cfg, small_world) -> None:
    rules = ("pair.clean.csls=5", "pair.clean.mutual=true", "pair.clean.max_reuse=3",
             "pair.clean.soft=true", "pair.topk=2", "pair.modalities=[audio,image]")  # fmt: skip
    approx = compose_cfg(*PAIR_STAGE, *rules, *HNSW)
    train(approx)
    exact = compose_cfg(*PAIR_STAGE, *rules, "pair.output=${paths.output_dir}/exact/tuples.npz")
    train(exact)
    got, want = load_tuples(approx.pair.output)[0], load_tuples(exact.pair.output)[0]
    summary, reference = pair_summary(approx), pair_summary(exact)
    assert [r["rule"] for r in summary["rules"]] == ["csls", "mutual", "max_reuse"]
    roles = sorted(e["role"] for e in summary["search"])
    assert roles == ["csls_penalty"] * 2 + ["route"] * 2
    assert all(e["recall_at_1"] > 0.9 for e in summary["search"])
    # Rules and weights act on the approximate top-k as on the exact one: nearly the same
    # tuples kept by each rule, with the same agreement, and the same columns.
    for rule, ref in zip(summary["rules"], reference["rules"], strict=True):
        assert rule["tuples"] == pytest.approx(ref["tuples"], rel=0.05), rule["rule"]
        for hop, stats in rule["hops"].items():
            assert stats["fine"] == pytest.approx(ref["hops"][hop]["fine"], abs=0.03), hop
    assert set(got) == set(want) and {"conf_audio", "conf_image"} <= set(got)
