"""The synthetic world: its layout, determinism, refusals, and the properties it must have."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from datamodules.cache import CacheError, EmbeddingCache, cache_dir, sha256_file
from datamodules.tuples import load_tuples
from datamodules.world import ensure_world
from encoders.modalities import MODALITIES, PAIRS, PROVENANCES
from lightning_modules.common import space_configs
from lightning_modules.metrics import recall_at_k

# Small enough that a world of its own costs a test about a second.
TINY = ("data.pool_size={point:300,audio:300,image:300,text:300}", "data.oracle_tuples=300")


def _cache(root: Path, dataset: str, space: str, modality: str) -> EmbeddingCache:
    return EmbeddingCache(cache_dir(root, dataset, space, modality))


def _any(root: Path, dataset: str, modality: str) -> EmbeddingCache:
    """The cache of `modality` in `dataset` of the first space (by name) that has one."""
    space = min(p.name for p in (root / dataset).iterdir() if (p / modality).is_dir())
    return _cache(root, dataset, space, modality)


def _digests(root: Path, spaces: tuple[str, ...]) -> dict[str, str]:
    """{relative path: sha256} of every shard file of these spaces under root."""
    files = [p for s in spaces for p in root.glob(f"*/{s}/*/*.npy")]
    return {str(p.relative_to(root)): sha256_file(p) for p in sorted(files)}


def _r1(root: Path, dataset: str, space: str, query: str, gallery: str) -> float:
    """R@1 of query->gallery on a paired set, both sides embedded by `space`."""
    q = torch.from_numpy(_cache(root, dataset, space, query).load())
    g = torch.from_numpy(_cache(root, dataset, space, gallery).load())
    items = torch.arange(len(q))
    return float(recall_at_k(q, g, items, items, ks=(1,))[1])


def _centroid_accuracy(root: Path, space: str, reference: str, target: str) -> tuple:
    """Nearest-concept accuracy of `target` pool rows against `reference` concept centroids.

    Returns (correct (n,) bool, target cache), so callers can split by provenance or view.
    """
    ref, tgt = _cache(root, "pool", space, reference), _cache(root, "pool", space, target)
    labels = ref.extra("labels")
    centroids = np.zeros((labels.max() + 1, ref.dim), np.float32)
    np.add.at(centroids, labels, ref.load())
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True) + 1e-9
    return (tgt.load() @ centroids.T).argmax(1) == tgt.extra("labels"), tgt


# ---------------------------------------------------------------------------- layout


def test_layout(small_world: Path) -> None:
    root = small_world
    clap = space_configs(["clap"])["clap"]
    pool = _cache(root, "pool", "clap", "audio")
    assert (pool.count, pool.dim, pool.space, pool.modality) == (2000, 512, "clap", "audio")
    assert pool.dim == clap.dims.audio and pool.normalized
    np.testing.assert_allclose(np.linalg.norm(pool.load(), axis=1), 1, atol=2e-3)
    assert set(_cache(root, "pool", "uni3d", "image").manifest["extras"]) == {"labels", "view"}
    prov = _cache(root, "pool", "uni3d", "text").extra("provenance")
    assert set(np.unique(prov)) == set(range(len(PROVENANCES)))
    # Every space's caches of one (dataset, modality) hold the same items in the same order.
    for dataset in ("pool", "test_image_text"):
        ids = [_cache(root, dataset, s, "text").ids for s in ("clap", "imagebind", "eva_clip_18b")]
        assert all(np.array_equal(ids[0], i) for i in ids[1:])
    # Paired sets: row i of a and row i of b are one item.
    for split in ("val", "test"):
        for a, b in PAIRS:
            ca, cb = _any(root, f"{split}_{a}_{b}", a), _any(root, f"{split}_{a}_{b}", b)
            assert ca.count == cb.count == (60 if split == "val" else 100) * 5
            np.testing.assert_array_equal(ca.extra("items"), cb.extra("items"))
            np.testing.assert_array_equal(ca.extra("labels"), cb.extra("labels"))
    zs_text = _cache(root, "zs_audio", "clap", "text")
    assert zs_text.count == 20 * 2 and set(zs_text.manifest["extras"]) == {"labels", "template"}
    multi = _cache(root, "zs_audio_multilabel", "clap", "audio").extra("labels")
    assert multi.shape == (60, 20) and multi.dtype == np.uint8 and (multi.sum(1) == 2).all()
    bench = json.loads((root / "benchmarks_test.json").read_text())
    assert {r["dataset"] for r in bench["retrieval"]} == {f"test_{a}_{b}" for a, b in PAIRS}
    assert {z["dataset"] for z in bench["zeroshot"]} >= {"zs_point", "zs_audio", "zs_image"}


def test_oracle_tuples_share_a_concept(small_world: Path) -> None:
    table, meta = load_tuples(small_world / "tuples" / "oracle.npz")
    assert meta["pool"] == "pool" and len(table["start"]) == 2000
    concepts = [_any(small_world, "pool", m).extra("labels")[table[m]] for m in MODALITIES]
    assert all(np.array_equal(concepts[0], c) for c in concepts[1:])
    prov = _cache(small_world, "pool", "imagebind", "text").extra("provenance")
    np.testing.assert_array_equal(table["provenance"], prov[table["text"]])
    assert np.bincount(table["start"], minlength=4).min() == 500  # every start modality, evenly


# ---------------------------------------------------------------------------- determinism


def test_same_seed_writes_same_bytes(small_world: Path, compose_cfg) -> None:
    # A second root with fewer spaces: same seed, same bytes, and other spaces change nothing.
    cfg = compose_cfg(shared_data=False)
    names = ("clap",)
    root = ensure_world(cfg.data, space_configs(names))
    assert root != small_world
    ours, theirs = _digests(root, names), _digests(small_world, names)
    assert len(ours) > 50 and ours == theirs
    for path in root.glob("*/*/*/manifest.json"):
        mine = json.loads(path.read_text())
        shared = json.loads((small_world / path.relative_to(root)).read_text())
        mine.pop("created"), shared.pop("created")  # the only field that may differ
        assert mine == shared, path
    mine, _ = load_tuples(root / "tuples" / "oracle.npz")
    shared, _ = load_tuples(small_world / "tuples" / "oracle.npz")
    assert all(np.array_equal(mine[k], shared[k]) for k in mine)


def test_second_call_writes_nothing(small_world: Path, world_cfg) -> None:
    files = list(small_world.glob("*/*/*/*.npy"))
    before = {p: p.stat().st_mtime_ns for p in files}
    ensure_world(world_cfg.data, space_configs(["clap", "uni3d"]))
    assert {p: p.stat().st_mtime_ns for p in files} == before


def test_changed_config_is_refused_unless_overwrite(compose_cfg) -> None:
    spaces = space_configs(["clap"])
    cfg = compose_cfg(*TINY, shared_data=False)
    root = ensure_world(cfg.data, spaces)
    before = _digests(root, ("clap",))
    changed = compose_cfg(*TINY, "data.seed=1", shared_data=False)
    with pytest.raises(CacheError, match="different world or space configuration") as e:
        ensure_world(changed.data, spaces)
    assert str(root) in str(e.value) and "data.overwrite=true" in str(e.value)
    assert _digests(root, ("clap",)) == before  # the refusal touched nothing

    again = compose_cfg(*TINY, "data.seed=1", "data.overwrite=true", shared_data=False)
    ensure_world(again.data, spaces)
    after = _digests(root, ("clap",))
    assert after.keys() == before.keys()
    assert all(after[k] != before[k] for k in after if k.endswith(".emb.npy"))
    ensure_world(changed.data, spaces)  # now consistent with the regenerated caches


def test_space_without_world_block(compose_cfg) -> None:
    cfg = compose_cfg(*TINY, shared_data=False)
    space = dict(space_configs(["clap"])["clap"])
    space.pop("world")
    with pytest.raises(ValueError, match="space 'mine' has no `world` block"):
        ensure_world(cfg.data, {"mine": space})
    with pytest.raises(ValueError, match=r"unknown space 'nosuch'; conf/space has \[.*'clap'"):
        space_configs(["nosuch"])


# ---------------------------------------------------------------------------- properties


def test_experts_retrieve_better_on_their_pair(small_world: Path) -> None:
    root = small_world
    # Audio-text: the CLAP specialist far above the generalist ImageBind.
    clap, imagebind = (
        _r1(root, "test_audio_text", s, "audio", "text") for s in ("clap", "imagebind")
    )
    assert clap > 0.8 and clap > imagebind + 0.4, (clap, imagebind)
    # Image(photo)-text: the anchor and ImageBind above the 3D specialist, whose images are renders.
    anchor, ib, uni3d = (
        _r1(root, "test_image_text", s, "image", "text")
        for s in ("eva_clip_18b", "imagebind", "uni3d")
    )
    assert anchor > ib > uni3d + 0.4, (anchor, ib, uni3d)
    # 3D: Uni3D aligns points with text and with (rendered) images.
    assert _r1(root, "test_point_text", "uni3d", "point", "text") > 0.8
    assert _r1(root, "test_point_image", "uni3d", "point", "image") > 0.8
    # Chance is 1/500; a space without expertise on a pair still carries some signal.
    assert 0.02 < imagebind < 0.5


@pytest.mark.parametrize(
    ("space", "reference", "specialty", "other"),
    [
        ("clap", "audio", "audio", "image"),
        ("uni3d", "point", "point", "audio"),
        ("eva_clip_18b", "image", "image", "audio"),
    ],
)
def test_text_provenance_matters(
    small_world: Path, space: str, reference: str, specialty: str, other: str
) -> None:
    correct, texts = _centroid_accuracy(small_world, space, reference, "text")
    prov = texts.extra("provenance")
    acc = {p: correct[prov == PROVENANCES.index(p)].mean() for p in (specialty, other)}
    assert acc[specialty] > 0.9 and acc[specialty] > acc[other] + 0.4, acc


def test_image_view_matters(small_world: Path) -> None:
    # Uni3D's image side is trained on renders; the anchor on photos.
    for space, better, worse in (("uni3d", 1, 0), ("eva_clip_18b", 0, 1)):
        correct, images = _centroid_accuracy(small_world, space, "text", "image")
        view = images.extra("view")
        assert correct[view == better].mean() > correct[view == worse].mean(), space
    correct, images = _centroid_accuracy(small_world, "uni3d", "text", "image")
    view = images.extra("view")
    assert correct[view == 1].mean() > correct[view == 0].mean() + 0.3
