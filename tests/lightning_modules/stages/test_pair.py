"""The pair stage: routes, chaining, the tuple table, cleaning rules and the summary."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import PAIR_STAGE, brute_topk, compose_config, gauss_rows, pair_summary

from datamodules.artifacts import CacheError
from datamodules.cache import CacheWriter, EmbeddingCache, cache_dir, rows_digest
from datamodules.tuples import load_tuples, save_tuples, weights_of
from encoders.modalities import MODALITIES, PROVENANCES
from lightning_modules.pairing.clean import Clean, apply_cells, reuse_keep, soft_conf
from lightning_modules.pairing.plan import (
    Hop,
    build_tuples,
    check_route_spaces,
    dedupe,
    parse_routes,
    plan_paths,
)
from lightning_modules.pairing.stats import summarize
from lightning_modules.runtime.config import to_plain
from lightning_modules.stages.pair import SUMMARY
from train import train

# The shared small world has clap, not wavcaps, as its audio-text space. The stage tests check
# each cleaning rule alone, so the provenance rule (on by default) is off unless a test sets it.


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


def test_unchained_pairs_take_the_shortest_path_over_routes() -> None:
    # point-audio has no route: point->image->audio and point->text->audio tie; image is first.
    assert plan_paths(["audio"], ROUTES, {})["audio"]["point"] == ["audio", "image", "point"]
    routes = {p: s for p, s in ROUTES.items() if p != ("audio", "image")}
    plan = plan_paths(["audio"], routes, {})["audio"]
    assert plan["point"] == ["audio", "text", "point"] and plan["image"] == [
        "audio",
        "text",
        "image",
    ]
    # CLAP bound to a CLIP anchor: audio and image meet through text, no chain configured.
    clip = {("audio", "text"): "clap", ("image", "text"): "clip"}
    plan = plan_paths(["image"], clip, {"audio_point": ["image"]}, ["audio", "image", "text"])
    assert plan == {"image": {"audio": ["image", "text", "audio"], "text": ["image", "text"]}}
    # A configured chain wins over a shorter one, even through more modalities.
    assert plan_paths(["point"], ROUTES, {"point_audio": ["text"]})["point"]["audio"] == [
        "point", "text", "audio"]  # fmt: skip


def test_plan_names_the_missing_route() -> None:
    with pytest.raises(ValueError, match="no route for point-audio"):
        plan_paths(["audio"], {("audio", "text"): "clap"}, {}, ["point", "audio", "text"])
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
    # Labels on some pools only (a user's `labels: dirs` on two): agreement over those pools,
    # and the overall figure over the tuples whose start is labelled (not the audio start's).
    part = summarize(table, {m: labels[m] for m in ("point", "image")})
    assert part["concept_agreement"] == {"point": 1.0} and part["concept_agreement_overall"] == 1
    assert part["target_agreement"]["point"] == {"image": 1.0}
    assert summarize(table, None) == {"tuples": 3, "counts": s["counts"],
                                      "items": dict.fromkeys(MODALITIES, 3)}  # fmt: skip


# ---------------------------------------------------------------------------- the stage


def _pool(root: Path, space: str, m: str) -> EmbeddingCache:
    return EmbeddingCache(cache_dir(root, "pool", space, m))


def test_stage_writes_tuples_and_a_correct_summary(compose_cfg, small_world: Path) -> None:
    cfg = compose_cfg(*PAIR_STAGE)
    train(cfg)
    table, meta = load_tuples(cfg.pair.output)
    summary = json.loads((Path(cfg.pair.output).parent / SUMMARY).read_text())
    n = 2000
    assert meta["pool"] == "pool" and meta["routes"]["audio_text"] == "clap"
    # The pools' items in order, for readers to check the table against (test_embeddings.py)
    space = {m: "uni3d" if m == "point" else "imagebind" for m in MODALITIES}
    assert meta["pool_rows"] == {m: rows_digest(_pool(small_world, s, m).ids)
                                 for m, s in space.items()}  # fmt: skip
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
    cfg = compose_cfg(*PAIR_STAGE, "pair.chunk=300", "pair.gallery_chunk=700")
    train(cfg)
    table, _ = load_tuples(cfg.pair.output)

    def top1(space: str, x: str, y: str, rows: np.ndarray) -> np.ndarray:
        q = _pool(small_world, space, x).load()[rows]
        return brute_topk(q, _pool(small_world, space, y).load(), 1)[1][:, 0]

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
    torch_cfg = compose_cfg(*PAIR_STAGE, "pair.topk=2")
    train(torch_cfg)
    table, _ = load_tuples(torch_cfg.pair.output)
    assert len(table["start"]) == 2 * 4 * 2000
    faiss_cfg = compose_cfg(*PAIR_STAGE, "pair.topk=2", "pair.backend=faiss",
                            "pair.output=${paths.output_dir}/faiss/tuples.npz")  # fmt: skip
    train(faiss_cfg)
    for c, v in load_tuples(faiss_cfg.pair.output)[0].items():
        np.testing.assert_array_equal(v, table[c], err_msg=c)
    cfg = compose_cfg(*PAIR_STAGE, "pair.topk=2", "pair.dedupe=true")
    train(cfg)
    deduped, meta = load_tuples(cfg.pair.output)
    items = np.stack([deduped[m] for m in MODALITIES], 1)
    assert len(np.unique(items, axis=0)) == len(items) < len(table["start"])
    summary = json.loads((Path(cfg.pair.output).parent / SUMMARY).read_text())
    assert summary["duplicates_removed"] == len(table["start"]) - len(items)
    assert sum(summary["counts"].values()) == len(items) and meta["dedupe"] is True


def test_stage_names_a_pair_without_route(compose_cfg, small_world: Path) -> None:
    with pytest.raises(ValueError, match="no route for point-audio"):
        train(compose_cfg(*PAIR_STAGE, "pair.modalities=[point,audio]"))
    with pytest.raises(ValueError, match=r"point_text=clap.*does not embed \['point'\]"):
        train(compose_cfg(*PAIR_STAGE, "pair.routes.point_text=clap"))


def _files_world(
    root: Path, sizes: dict[str, int], odd_ids: bool = False, without: tuple = ()
) -> None:
    """Pools of the PAIR_STAGE routes' spaces (less `without`) as an extract stage writes them."""
    dims = {"clap": 512, "imagebind": 1024, "uni3d": 1024, "eva_clip_18b": 1536}
    spaces = {"clap": ("audio", "text"), "imagebind": ("audio", "image"),
              "uni3d": ("point", "image", "text"), "eva_clip_18b": ("image", "text")}  # fmt: skip
    for space, modalities in spaces.items():
        if space in without:
            continue
        for m in modalities:
            n = sizes[m]
            writer = CacheWriter(cache_dir(root, "pool", space, m), space=space, modality=m,
                                 dim=dims[space])  # fmt: skip
            if n:
                ids = np.arange(n) + (1 if odd_ids and space == "uni3d" else 0)
                extras = {"provenance": np.zeros(n, np.int8)} if m == "text" else {}
                writer.append(gauss_rows(n, dims[space], seed=n), ids, **extras)
            writer.close()


def test_stage_on_extracted_pools_and_its_errors(compose_cfg, tmp_path: Path) -> None:
    root = tmp_path / "extracted"
    files = (*PAIR_STAGE, "data.kind=files", f"data.root={root}", "pair.min_tuples=1")
    sizes = dict(point=9, audio=10, image=11, text=12)
    _files_world(root, sizes)
    train(compose_cfg(*files))
    table, _ = load_tuples(tmp_path / "pairs" / "tuples.npz")
    summary = json.loads((tmp_path / "pairs" / SUMMARY).read_text())
    assert len(table["start"]) == sum(sizes.values()) and "concept_agreement" not in summary
    with pytest.raises(ValueError, match=r"pair.topk=10 exceeds the point pool \(9 items\)"):
        train(compose_cfg(*files, "pair.topk=10"))

    _files_world(tmp_path / "odd", sizes, odd_ids=True)
    with pytest.raises(
        CacheError,
        match=r"the image pool differs between spaces .* Re-extract "
        r"both .*stage=extract space=\w+ extract.overwrite=true",
    ):
        train(compose_cfg(*PAIR_STAGE, "data.kind=files", f"data.root={tmp_path / 'odd'}"))
    _files_world(tmp_path / "empty", {**sizes, "point": 0})
    with pytest.raises(CacheError, match=r"uni3d/point: the point pool is empty"):
        train(compose_cfg(*PAIR_STAGE, "data.kind=files", f"data.root={tmp_path / 'empty'}"))


# ---------------------------------------------------------------------------- any subset


def test_stage_pairs_a_subset_of_modalities(compose_cfg, small_world: Path) -> None:
    # No 3D: the point routes are gone, so point is neither a start nor a column.
    cfg = compose_cfg(*PAIR_STAGE, "~pair.routes.point_image", "~pair.routes.point_text")
    train(cfg)
    table, meta = load_tuples(cfg.pair.output)
    assert meta["modalities"] == ["audio", "image", "text"] and "point" not in table
    assert len(table["start"]) == 3 * 2000 and (table["start"] != 0).all()
    audio = table["start"] == MODALITIES.index("audio")
    np.testing.assert_array_equal(  # still the exact top-1 in the route's space
        table["image"][audio],
        brute_topk(_pool(small_world, "imagebind", "audio").load(),
               _pool(small_world, "imagebind", "image").load(), 1)[1][:, 0],
    )  # fmt: skip
    # Image and text alone: only the anchor's route is searched.
    cfg = compose_cfg(*PAIR_STAGE, "pair.modalities=[image,text]")
    train(cfg)
    table, meta = load_tuples(cfg.pair.output)
    summary = json.loads((Path(cfg.pair.output).parent / SUMMARY).read_text())
    assert sorted(table) == ["image", "provenance", "start", "text"]
    assert meta["routes"] == {"image_text": "eva_clip_18b"} and summary["tuples"] == 4000
    assert [r["space"] for r in summary["search"]] == ["eva_clip_18b", "eva_clip_18b"]


def test_stage_auto_leaves_out_routes_without_pools(compose_cfg, tmp_path: Path) -> None:
    # A CLAP-to-CLIP user: no uni3d pools, the default routes and starts unchanged.
    root = tmp_path / "extracted"
    _files_world(root, dict(point=9, audio=10, image=11, text=12), without=("uni3d",))
    cfg = compose_cfg(*PAIR_STAGE, "data.kind=files", f"data.root={root}", "pair.min_tuples=1")
    train(cfg)
    table, meta = load_tuples(cfg.pair.output)
    summary = json.loads((Path(cfg.pair.output).parent / SUMMARY).read_text())
    assert meta["modalities"] == ["audio", "image", "text"] and "point" not in table
    assert set(summary["routes_skipped"]) == {"point_image", "point_text"}
    assert summary["counts"] == {"point": 0, "audio": 10, "image": 11, "text": 12}
    # An explicit list is a promise: a missing pool is an error, not a silent skip.
    with pytest.raises(CacheError, match="uni3d/point"):
        train(compose_cfg(*PAIR_STAGE, "data.kind=files", f"data.root={root}",
                          "pair.modalities=[point,image]"))  # fmt: skip


# ---------------------------------------------------------------------------- cleaning units


def test_clean_config_names_wrong_keys_and_values() -> None:
    config = to_plain(compose_config([]).pair.clean)  # conf/config.yaml declares every rule
    assert Clean.from_config(config).provenance and not Clean.from_config(config).cross
    assert Clean.from_config({**config, "cross_threshold": 0.5}).cross
    for change, expected in [
        ({"mutal": True}, "pair.clean.mutal: Unexpected keyword argument"),
        ({"csls": -1}, "pair.clean.csls: Input should be greater than or equal to 0"),
        ({"mutual": "yes"}, "pair.clean.mutual: Input should be a valid boolean"),
        ({"provenance_targets": {"video": ["image"]}}, "pair.clean.provenance_targets.video"),
    ]:
        with pytest.raises(ValueError, match=re.escape(expected)):
            Clean.from_config({**config, **change})
    # A rule the config leaves out is an error, not a silent code default.
    with pytest.raises(ValueError, match=r"pair.clean.soft: Field required"):
        Clean.from_config({k: v for k, v in config.items() if k != "soft"})


def _hop(item, score, query=None) -> Hop:
    item = np.asarray(item)
    query = np.arange(len(item)) if query is None else np.asarray(query)
    return Hop(("audio", "image"), slice(0, len(item)), query, item, np.asarray(score, np.float32))


def test_reuse_keeps_the_best_scored_hops_of_each_item() -> None:
    hop = _hop([5, 5, 5, 2, 5, 2], [0.1, 0.9, 0.5, 0.3, 0.9, 0.3])
    alive = np.array([True, True, True, True, True, True])
    # Item 5: rows 1 and 4 tie at 0.9 -> the cap of 1 keeps the lower row; item 2 likewise.
    np.testing.assert_array_equal(reuse_keep(hop, alive, 1), [0, 1, 0, 1, 0, 0])
    np.testing.assert_array_equal(reuse_keep(hop, alive, 2), [0, 1, 0, 1, 1, 1])
    # Dropped hops do not use up the cap.
    alive[1] = False
    np.testing.assert_array_equal(reuse_keep(hop, alive, 1), [0, 0, 0, 1, 1, 0])


def test_soft_conf_is_a_softmax_over_each_start_items_ranks() -> None:
    scores = np.array([[0.9, 0.9], [0.8, 0.2]], np.float32)
    nearest = {("audio", "image"): (scores, np.array([[0, 1], [1, 0]]))}
    hop = _hop([0, 1, 1, 0], [0.9, 0.9, 0.8, 0.2], query=[0, 0, 1, 1])
    conf = soft_conf(hop, nearest, k=2, temperature=0.1)
    np.testing.assert_allclose(conf[:2], [0.5, 0.5])
    np.testing.assert_allclose(conf[2:], [1 / (1 + np.exp(-6)), 1 / (1 + np.exp(6))], rtol=1e-5)


def test_a_dropped_hop_drops_the_items_chained_through_it() -> None:
    sizes = {"point": 3, "audio": 4, "image": 3, "text": 3}
    plan = plan_paths(["audio"], ROUTES, {"audio_point": ["image"]})
    rows = {(x, y): np.arange(sizes[x])[:, None] % sizes[y] for x in sizes for y in sizes}
    nearest = {d: (np.ones(r.shape, np.float32), r) for d, r in rows.items()}
    table, hops, cells = build_tuples(plan, nearest, sizes)
    keep = {p: np.ones(4, bool) for p in hops}
    keep[("audio", "image")][1] = False  # audio 1's image is distrusted ...
    keep[("audio", "image", "point")][2] = False  # ... and audio 2's image's point
    keep[("audio", "text")][3] = False
    out = apply_cells(table, cells, keep, hops)
    np.testing.assert_array_equal(out["image"], [0, -1, 2, 0])
    np.testing.assert_array_equal(out["point"], [0, -1, -1, 0])  # through image 1, and its own
    np.testing.assert_array_equal(out["text"], [0, 1, 2, -1])
    np.testing.assert_array_equal(table["image"], [0, 1, 2, 0])  # the input is left as it was


def test_summarize_ignores_missing_items() -> None:
    labels = {m: np.array([0, 1, 0]) for m in ("audio", "image", "text")}
    coarse = {m: np.array([0, 0, 0]) for m in labels}
    table = {"audio": np.array([0, 1, 2]), "image": np.array([2, -1, 1]),
             "text": np.array([1, 1, -1]), "start": np.full(3, 1, np.int8)}  # fmt: skip
    s = summarize(table, labels, coarse)
    assert s["items"] == {"audio": 3, "image": 2, "text": 2}
    # Row 0: image agrees, text not; row 1: text agrees; row 2: image does not.
    assert s["target_agreement"]["audio"] == {"image": 0.5, "text": 0.5}
    assert s["concept_agreement"]["audio"] == pytest.approx(1 / 3)
    assert s["coarse"]["concept_agreement"]["audio"] == 1.0
    # Multi-label audio (-1 pads): audio 1 also carries concept 0, so its row now agrees in
    # full, and audio 2 (concepts 0 and 1) agrees with image 1 (concept 1).
    multi = {**labels, "audio": np.array([[0, -1], [1, 0], [0, 1]])}
    s = summarize(table, multi)
    assert s["target_agreement"]["audio"] == {"image": 1.0, "text": 0.5}
    assert s["concept_agreement"]["audio"] == pytest.approx(2 / 3)
    assert s["concept_agreement_overall"] == pytest.approx(2 / 3)


# ---------------------------------------------------------------------------- tuple tables


def test_tuple_tables_allow_missing_items_and_refuse_bad_rows(tmp_path: Path) -> None:
    path = tmp_path / "t.npz"
    table = {"image": np.array([0, 4, -1]), "text": np.array([1, -1, 2]),
             "start": np.array([2, 2, 3], np.int8), "provenance": np.array([2, -1, 0], np.int8),
             "conf_text": np.array([0.5, 0, 1], np.float32)}  # fmt: skip
    save_tuples(path, table, pool="pool")
    got, meta = load_tuples(path, pool_sizes={"image": 5, "text": 3})
    assert sorted(got) == sorted(table) and meta == {"pool": "pool"}
    np.testing.assert_array_equal(weights_of(got, "text"), [0.5, 0, 1])
    np.testing.assert_array_equal(weights_of(got, "image"), [1, 1, 0])
    match = rf"{path}: column 'image' indexes row 4, but the image pool holds 4 rows"
    with pytest.raises(CacheError, match=match):
        load_tuples(path, pool_sizes={"image": 4})
    for bad, match in [
        ({"start": np.array([2, 3, 3], np.int8)}, "tuples started from text lack their text"),
        ({"conf_text": np.array([2, 0, 1], np.float32)}, "'conf_text' has values outside"),
        ({"image": np.array([0, -2, 1])}, "'image' has rows below -1"),
        ({"conf_audio": np.ones(3, np.float32)}, r"unknown columns \['conf_audio'\]"),
        ({"provenance": np.array([3, 0, 0], np.int8)}, "'provenance' out of range"),
    ]:
        with pytest.raises(CacheError, match=match):
            save_tuples(tmp_path / "bad.npz", {**table, **bad}, pool="pool")


# ---------------------------------------------------------------------------- cleaning stage


def test_stage_mutual_keeps_cycle_consistent_items_and_logs(compose_cfg, small_world: Path) -> None:
    cfg = compose_cfg(*PAIR_STAGE, "pair.clean.mutual=true", "logger=csv")
    train(cfg)
    table, meta = load_tuples(cfg.pair.output)
    summary = pair_summary(cfg)
    assert [r["rule"] for r in summary["rules"]] == ["none", "mutual"]
    before, after = summary["rules"]
    assert before["tuples"] == 8000 and after["tuples"] == summary["tuples"] < 8000
    assert meta["clean"]["mutual"] is True
    # Every kept audio->image item is mutual; every dropped one is not; its chained point goes too.
    a_pool, i_pool = (_pool(small_world, "imagebind", m).load() for m in ("audio", "image"))
    a2i, i2a = brute_topk(a_pool, i_pool, 1)[1][:, 0], brute_topk(i_pool, a_pool, 1)[1][:, 0]
    audio = table["start"] == MODALITIES.index("audio")
    a, img = table["audio"][audio], table["image"][audio]
    mutual = i2a[a2i[a]] == a
    np.testing.assert_array_equal(img >= 0, mutual)
    np.testing.assert_array_equal(img[mutual], a2i[a][mutual])
    assert (table["point"][audio][~mutual] == -1).all()
    assert (table["start"] >= 0).all() and (sum((table[m] >= 0) for m in MODALITIES) >= 2).all()
    # Mutual image->text hops agree more often than all top-1 hops on this world.
    assert after["hops"]["image->text"]["fine"] > before["hops"]["image->text"]["fine"]
    assert 0 < after["hops"]["image->text"]["kept_fraction"] < 1
    metrics = next(Path(cfg.paths.output_dir).rglob("metrics.csv")).read_text().splitlines()[0]
    assert "pair/mutual/kept_fraction" in metrics and "pair/none/hops/image_to_text/fine" in metrics


def test_stage_rule_below_min_tuples_stops_naming_it(compose_cfg, small_world: Path) -> None:
    match = r"rule 'mutual' keeps \d+ tuples of 4000, fewer than pair.min_tuples=3999"
    with pytest.raises(ValueError, match=match):
        train(compose_cfg(*PAIR_STAGE, "pair.modalities=[image,text]", "pair.clean.mutual=true",
                          "pair.min_tuples=3999"))  # fmt: skip


def test_stage_cross_space_agreement(compose_cfg, small_world: Path) -> None:
    cfg = compose_cfg(*PAIR_STAGE, "pair.clean.cross_k=3", "pair.modalities=[audio,image,text]")
    train(cfg)
    table, _ = load_tuples(cfg.pair.output)
    summary = pair_summary(cfg)
    # The first other route space (by name) that embeds both; audio-image has none.
    want = {"audio_text": "imagebind", "image_text": "imagebind", "audio_image": None}
    assert summary["cross_spaces"] == want
    text = table["start"] == MODALITIES.index("text")
    t, img = table["text"][text], table["image"][text]
    pools = {s: [_pool(small_world, s, m).load() for m in ("text", "image")]
             for s in ("imagebind", "eva_clip_18b")}  # fmt: skip
    top3, eva = brute_topk(*pools["imagebind"], 3)[1], brute_topk(*pools["eva_clip_18b"], 1)[1]
    agree = (top3[t] == eva[t, :1]).any(1)
    np.testing.assert_array_equal(img >= 0, agree)
    assert 0 < agree.mean() < 1
    # A similarity threshold in a named second space.
    cfg = compose_cfg(*PAIR_STAGE, "pair.modalities=[image,text]", "pair.clean.cross_threshold=0.3",
                      "+pair.clean.cross_spaces.image_text=uni3d")  # fmt: skip
    train(cfg)
    table, _ = load_tuples(cfg.pair.output)
    assert pair_summary(cfg)["cross_spaces"] == {"image_text": "uni3d"}
    # Image-started rows run over the image pool in order; a row whose text goes is dropped.
    x, y = (_pool(small_world, "uni3d", m).load() for m in ("image", "text"))
    text = brute_topk(*(_pool(small_world, "eva_clip_18b", m).load() for m in ("image", "text")), 1)
    sim = np.einsum("nd,nd->n", x, y[text[1][:, 0]])
    image = table["start"] == MODALITIES.index("image")
    np.testing.assert_array_equal(table["image"][image], np.flatnonzero(sim >= 0.3))
    np.testing.assert_array_equal(table["text"][image], text[1][sim >= 0.3, 0])
    assert 0 < (sim >= 0.3).mean() < 1


def test_stage_csls_is_hubness_corrected_search(compose_cfg, small_world: Path) -> None:
    cfg = compose_cfg(*PAIR_STAGE, "pair.clean.csls=5", "pair.modalities=[audio,image]")
    train(cfg)
    table, _ = load_tuples(cfg.pair.output)
    assert [r["rule"] for r in pair_summary(cfg)["rules"]] == ["csls"]
    a, b = (
        _pool(small_world, "imagebind", m).load().astype(np.float64) for m in ("audio", "image")
    )
    s = a @ b.T
    r_b = np.sort(s, 0)[-5:].mean(0)  # each image's mean score to its 5 nearest audio clips
    want = np.argmax(s - r_b / 2, 1)
    audio = table["start"] == MODALITIES.index("audio")
    # float32 search vs float64 here: near-ties may flip, so compare all but a few rows.
    assert (table["image"][audio] == want).mean() > 0.99
    assert (table["image"][audio] != np.argmax(s, 1)).mean() > 0.05  # CSLS changed the search


def test_stage_soft_provenance_and_reuse(compose_cfg, small_world: Path) -> None:
    cfg = compose_cfg(*PAIR_STAGE, "pair.topk=2", "pair.clean.soft=true",
                      "pair.modalities=[image,text]")
    train(cfg)
    table, _ = load_tuples(cfg.pair.output)
    image = table["start"] == MODALITIES.index("image")
    pair_sum = table["conf_text"][image].reshape(-1, 2).sum(1)  # ranks 0 and 1 of each image
    np.testing.assert_allclose(pair_sum, 1, rtol=1e-5)
    assert (table["conf_image"][image] == 1).all() and 0.5 <= table["conf_text"][image][0] <= 1
    top = pair_summary(cfg)["soft_top_conf"]["image->text"]  # the rank-0 tuples' mean weight
    assert top == pytest.approx(table["conf_text"][image][::2].mean(), rel=1e-5) and top > 0.5

    cfg = compose_cfg(*PAIR_STAGE, "pair.clean.provenance=true", "pair.clean.max_reuse=1")
    train(cfg)
    table, _ = load_tuples(cfg.pair.output)
    summary = pair_summary(cfg)
    assert [r["rule"] for r in summary["rules"]] == ["none", "provenance", "max_reuse"]
    text = table["start"] == MODALITIES.index("text")
    prov = _pool(small_world, "clap", "text").extra("provenance")[table["text"][text]]
    for p, allowed in {"point": ["point", "image"], "audio": ["audio"], "image": ["image"]}.items():
        rows = prov == PROVENANCES.index(p)
        assert rows.any()
        for m in ("point", "audio", "image"):
            present = table[m][text][rows] >= 0
            assert present.any() if m in allowed else not present.any(), (p, m)
    # max_reuse=1: an item is retrieved at most once per start and target.
    for i, s in enumerate(MODALITIES):
        for t in MODALITIES:
            items = table[t][(table["start"] == i) & (table[t] >= 0)]
            if t != s:
                assert len(np.unique(items)) == len(items), (s, t)
