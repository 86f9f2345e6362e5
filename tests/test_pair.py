"""The pair stage: routes, chaining, the tuple table, cleaning rules and the summary."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from test_search import _brute, _gauss

from datamodules.cache import CacheError, CacheWriter, EmbeddingCache, cache_dir
from datamodules.tuples import load_tuples
from encoders.modalities import MODALITIES
from lightning_modules.pair import (
    SUMMARY,
    build_tuples,
    check_route_spaces,
    dedupe,
    parse_routes,
    plan_paths,
    summarize,
)
from train import train

# The shared small world has clap, not wavcaps, as its audio-text space.
PAIR = ("stage=pair", "pair.routes.audio_text=clap", "pair.progress=false")


# ---------------------------------------------------------------------------- plan and tuples

ROUTES = parse_routes({"text_audio": "wavcaps", "image_text": "eva", "audio_image": "ib",
                       "point_image": "uni3d", "point_text": "uni3d"})  # fmt: skip


def test_routes_and_chains_plan_every_pair() -> None:
    assert ROUTES[("audio", "text")] == "wavcaps"  # either order names the pair
    plan = plan_paths(MODALITIES, ROUTES, {"audio_point": ["image"]})
    assert plan["audio"]["point"] == ["audio", "image", "point"]
    assert plan["point"]["audio"] == ["point", "image", "audio"]  # a chain serves both ways
    assert plan["text"]["audio"] == ["text", "audio"]
    longer = plan_paths(["point"], ROUTES, {"point_audio": ["text"]})
    assert longer["point"]["audio"] == ["point", "text", "audio"]


def test_plan_names_the_missing_route() -> None:
    with pytest.raises(ValueError, match="no route for point-audio"):
        plan_paths(["audio"], ROUTES, {})
    routes = {p: s for p, s in ROUTES.items() if p != ("point", "image")}
    with pytest.raises(ValueError, match=r"hops image->point.*no space linking image and point"):
        plan_paths(["audio"], routes, {"audio_point": "image"})
    with pytest.raises(ValueError, match="pair.routes.audio_sound"):
        parse_routes({"audio_sound": "clap"})


def test_route_spaces_must_embed_both_modalities_in_one_dim() -> None:
    routes = {("audio", "text"): "odd"}
    with pytest.raises(ValueError, match=r"audio_text=odd.*audio in 512 dims but text in 1024"):
        check_route_spaces(routes, {"odd": {"dims": {"audio": 512, "text": 1024}}})
    with pytest.raises(ValueError, match=r"does not embed \['audio'\]"):
        check_route_spaces(routes, {"odd": {"dims": {"image": 8, "text": 8}}})


def test_build_tuples_follows_chains_and_ranks() -> None:
    rng = np.random.default_rng(0)
    sizes = {"point": 5, "audio": 6, "image": 7, "text": 8}
    plan = plan_paths(["audio", "image"], ROUTES, {"audio_point": ["image"]})
    nearest = {(x, y): rng.integers(0, sizes[y], (sizes[x], 2)) for x in sizes for y in sizes}
    scored = {d: (rng.random(r.shape).astype(np.float32), r) for d, r in nearest.items()}
    table, hops, cells = build_tuples(plan, scored, sizes)
    assert len(table["start"]) == 2 * (6 + 7)
    audio = table["start"] == MODALITIES.index("audio")
    a = table["audio"][audio]
    rank = np.tile([0, 1], 6)
    np.testing.assert_array_equal(a, np.repeat(np.arange(6), 2))
    np.testing.assert_array_equal(table["image"][audio], nearest[("audio", "image")][a, rank])
    # The chained hop takes the top-1 of the image that the tuple itself holds.
    np.testing.assert_array_equal(
        table["point"][audio], nearest[("image", "point")][table["image"][audio], 0]
    )
    # Each item knows its hops: audio->image is shared by the image and the chained point.
    assert cells[("audio", "point")] == [("audio", "image"), ("audio", "image", "point")]
    hop = hops[("audio", "image", "point")]
    assert hop.name == "image->point" and hop.rows == slice(0, 12)
    np.testing.assert_array_equal(hop.query, table["image"][audio])
    np.testing.assert_array_equal(hop.score, scored[("image", "point")][0][hop.query, 0])
    first = hops[("audio", "image")]
    np.testing.assert_array_equal(first.score, scored[("audio", "image")][0][a, rank])


def test_dedupe_keeps_first_rows_in_order() -> None:
    table = {m: np.array([1, 2, 1, 1, 2]) for m in MODALITIES}
    table["text"] = np.array([0, 0, 0, 5, 0])
    table["start"] = np.arange(5, dtype=np.int8) % 4
    out = dedupe(table)
    np.testing.assert_array_equal(out["text"], [0, 0, 5])
    np.testing.assert_array_equal(out["start"], [0, 1, 3])


def test_summarize_counts_agreement_and_chance() -> None:
    labels = {"point": np.array([0, 1]), "audio": np.array([0, 0, 1, 1]),
              "image": np.array([1, 0]), "text": np.array([0, 1])}  # fmt: skip
    table = {"point": np.array([0, 1, 0]), "audio": np.array([0, 2, 1]),
             "image": np.array([1, 0, 0]), "text": np.array([0, 0, 0]),
             "start": np.array([0, 0, 1], np.int8)}  # fmt: skip
    s = summarize(table, labels)
    assert s["counts"] == {"point": 2, "audio": 1, "image": 0, "text": 0}
    assert s["concept_agreement"] == {"point": 0.5, "audio": 0.0}
    assert s["target_agreement"]["audio"] == {"point": 1.0, "image": 0.0, "text": 1.0}
    assert s["chance_agreement"]["point"] == pytest.approx(0.5**3)  # every pool is half/half
    assert summarize(table, None) == {"tuples": 3, "counts": s["counts"],
                                      "items": dict.fromkeys(MODALITIES, 3)}  # fmt: skip


# ---------------------------------------------------------------------------- the stage


def _pool(root: Path, space: str, m: str) -> EmbeddingCache:
    return EmbeddingCache(cache_dir(root, "pool", space, m))


def test_stage_writes_tuples_and_a_correct_summary(compose_cfg, small_world: Path) -> None:
    cfg = compose_cfg(*PAIR)
    train(cfg)
    table, meta = load_tuples(cfg.pair.output)
    summary = json.loads((Path(cfg.pair.output).parent / SUMMARY).read_text())
    n = 2000
    assert meta["pool"] == "pool" and meta["routes"]["audio_text"] == "clap"
    assert summary["counts"] == dict.fromkeys(MODALITIES, n) and summary["tuples"] == 4 * n
    labels = {m: _pool(small_world, "uni3d" if m == "point" else "imagebind", m).extra("labels")
              for m in MODALITIES}  # fmt: skip
    concept = {m: labels[m][table[m]] for m in MODALITIES}
    for i, s in enumerate(MODALITIES):
        rows = table["start"] == i
        np.testing.assert_array_equal(table[s][rows], np.arange(n))  # every pool item starts one
        agree = np.all([concept[t][rows] == concept[s][rows] for t in MODALITIES], axis=0).mean()
        assert summary["concept_agreement"][s] == pytest.approx(agree)
        share = {t: np.bincount(labels[t], minlength=200) / n for t in MODALITIES}
        chance = np.prod([share[t][concept[s][rows]] for t in MODALITIES if t != s], 0).mean()
        assert summary["chance_agreement"][s] == pytest.approx(chance)
        # Retrieval beats chance by orders of magnitude on this world.
        assert summary["concept_agreement"][s] > 100 * chance
    text = _pool(small_world, "clap", "text")
    np.testing.assert_array_equal(table["provenance"], text.extra("provenance")[table["text"]])


def test_stage_retrieves_exact_top1_and_chains(compose_cfg, small_world: Path) -> None:
    cfg = compose_cfg(*PAIR, "pair.chunk=300", "pair.gallery_chunk=700")
    train(cfg)
    table, _ = load_tuples(cfg.pair.output)

    def top1(space: str, x: str, y: str, rows: np.ndarray) -> np.ndarray:
        q = _pool(small_world, space, x).load()[rows]
        return _brute(q, _pool(small_world, space, y).load(), 1)[1][:, 0]

    audio = table["start"] == MODALITIES.index("audio")
    a, img = table["audio"][audio], table["image"][audio]
    np.testing.assert_array_equal(img, top1("imagebind", "audio", "image", a))
    np.testing.assert_array_equal(table["text"][audio], top1("clap", "audio", "text", a))
    # audio -> image -> point: the point is the image's top-1 in uni3d.
    np.testing.assert_array_equal(table["point"][audio], top1("uni3d", "image", "point", img))
    point = table["start"] == MODALITIES.index("point")
    p_img = table["image"][point]
    np.testing.assert_array_equal(table["audio"][point], top1("imagebind", "image", "audio", p_img))


def test_stage_faiss_topk_and_dedupe(compose_cfg, small_world: Path) -> None:
    torch_cfg = compose_cfg(*PAIR, "pair.topk=2")
    train(torch_cfg)
    table, _ = load_tuples(torch_cfg.pair.output)
    assert len(table["start"]) == 2 * 4 * 2000
    faiss_cfg = compose_cfg(*PAIR, "pair.topk=2", "pair.backend=faiss",
                            "pair.output=${paths.output_dir}/faiss/tuples.npz")  # fmt: skip
    train(faiss_cfg)
    for c, v in load_tuples(faiss_cfg.pair.output)[0].items():
        np.testing.assert_array_equal(v, table[c], err_msg=c)
    cfg = compose_cfg(*PAIR, "pair.topk=2", "pair.dedupe=true")
    train(cfg)
    deduped, meta = load_tuples(cfg.pair.output)
    items = np.stack([deduped[m] for m in MODALITIES], 1)
    assert len(np.unique(items, axis=0)) == len(items) < len(table["start"])
    summary = json.loads((Path(cfg.pair.output).parent / SUMMARY).read_text())
    assert summary["duplicates_removed"] == len(table["start"]) - len(items)
    assert sum(summary["counts"].values()) == len(items) and meta["dedupe"] is True


def test_stage_names_a_pair_without_route(compose_cfg, small_world: Path) -> None:
    with pytest.raises(ValueError, match="no route for point-audio"):
        train(compose_cfg(*PAIR, "~pair.chain.audio_point"))
    with pytest.raises(ValueError, match=r"point_text=clap.*does not embed \['point'\]"):
        train(compose_cfg(*PAIR, "pair.routes.point_text=clap"))


def _files_world(root: Path, sizes: dict[str, int], odd_ids: bool = False) -> None:
    """Pools of the PAIR routes' spaces as an extract stage would write them (no world)."""
    dims = {"clap": 512, "imagebind": 1024, "uni3d": 1024, "eva_clip_18b": 1536}
    spaces = {"clap": ("audio", "text"), "imagebind": ("audio", "image"),
              "uni3d": ("point", "image", "text"), "eva_clip_18b": ("image", "text")}  # fmt: skip
    for space, modalities in spaces.items():
        for m in modalities:
            n = sizes[m]
            writer = CacheWriter(cache_dir(root, "pool", space, m), space=space, modality=m,
                                 dim=dims[space])  # fmt: skip
            if n:
                ids = np.arange(n) + (1 if odd_ids and space == "uni3d" else 0)
                extras = {"provenance": np.zeros(n, np.int8)} if m == "text" else {}
                writer.append(_gauss(n, dims[space], seed=n), ids, **extras)
            writer.close()


def test_stage_on_extracted_pools_and_its_errors(compose_cfg, tmp_path: Path) -> None:
    root = tmp_path / "extracted"
    files = (*PAIR, "data.kind=files", f"data.root={root}", "pair.min_tuples=1")
    sizes = dict(point=9, audio=10, image=11, text=12)
    _files_world(root, sizes)
    train(compose_cfg(*files))
    table, _ = load_tuples(tmp_path / "pairs" / "tuples.npz")
    summary = json.loads((tmp_path / "pairs" / SUMMARY).read_text())
    assert len(table["start"]) == sum(sizes.values()) and "concept_agreement" not in summary
    with pytest.raises(ValueError, match=r"pair.topk=10 exceeds the point pool \(9 items\)"):
        train(compose_cfg(*files, "pair.topk=10"))

    _files_world(tmp_path / "odd", sizes, odd_ids=True)
    with pytest.raises(CacheError, match=r"the image pool differs between spaces"):
        train(compose_cfg(*PAIR, "data.kind=files", f"data.root={tmp_path / 'odd'}"))
    _files_world(tmp_path / "empty", {**sizes, "point": 0})
    with pytest.raises(CacheError, match=r"uni3d/point: the point pool is empty"):
        train(compose_cfg(*PAIR, "data.kind=files", f"data.root={tmp_path / 'empty'}"))
