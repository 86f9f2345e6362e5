"""The synthetic world: its layout, determinism, refusals, and the properties it must have."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from datamodules.artifacts import CacheError, sha256_file
from datamodules.cache import EmbeddingCache, cache_dir
from datamodules.synthetic.world import V2_KEYS, World, ensure_world, fingerprint
from datamodules.tuples import load_tuples
from encoders.modalities import MODALITIES, PAIRS, PROVENANCES
from lightning_modules.evaluation.metrics import recall_at_k
from lightning_modules.runtime.config import space_configs

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


# ---------------------------------------------------------------- the realistic world (v2)

V2_SPACES = ("clap", "imagebind", "uni3d", "eva02_e")


@pytest.fixture(scope="module")
def v2_world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    """A small data=world_v2 world of its own: (root, data config)."""
    from conftest import SMALL_WORLD, compose_config

    out = tmp_path_factory.mktemp("v2")
    cfg = compose_config([*SMALL_WORLD, "data=world_v2", f"paths.output_dir={out}"])
    return ensure_world(cfg.data, space_configs(V2_SPACES)), cfg.data


def test_v1_fingerprints_ignore_unset_v2_keys(world_cfg) -> None:
    # data=world's caches keep the fingerprints (and bytes) they had before v2 existed.
    data = OmegaConf.to_container(world_cfg.data, resolve=True)
    assert all(data[k] in (None, False) for k in V2_KEYS)
    v1 = {k: v for k, v in data.items() if k not in V2_KEYS}
    assert fingerprint(data) == fingerprint(v1)
    assert fingerprint({**data, "hierarchy": {"coarse": 5, "r": 0.5}}) != fingerprint(v1)


def test_v2_coarse_labels(v2_world) -> None:
    root, data = v2_world
    n_coarse = data.hierarchy.coarse
    for dataset, m in (("pool", "text"), ("pool", "audio"), ("test_image_text", "image")):
        cache = _any(root, dataset, m)
        labels, coarse = cache.extra("labels"), cache.extra("coarse")
        # Each split cycles through the categories: concept k of a split is category k % n_coarse.
        first = {"pool": 0, "test_image_text": data.n_concepts + data.n_val_concepts}[dataset]
        np.testing.assert_array_equal(coarse, (labels - first) % n_coarse)


def test_v2_wrong_top1_is_usually_a_neighbour(v2_world) -> None:
    root, data = v2_world
    for space in ("eva02_e", "imagebind"):
        q = _cache(root, "test_image_text", space, "text")
        g = _cache(root, "test_image_text", space, "image")
        top = (q.load().astype(np.float32) @ g.load().astype(np.float32).T).argmax(1)
        coarse = g.extra("coarse")
        wrong = top != np.arange(len(top))
        same = (coarse[top] == q.extra("coarse"))[wrong].mean()
        # Chance of a same-category gallery row is ~1/50 (here 1/n_coarse = 0.02).
        assert wrong.sum() > 20 and same > 0.3, (space, int(wrong.sum()), same)


@pytest.mark.parametrize("sharing", [0.0, 0.5])
def test_v2_aspects_derive_from_the_common_code(world_cfg, sharing: float) -> None:
    data = OmegaConf.merge(world_cfg.data, {"aspect_sharing": sharing})
    z = World(data, {}).latents(np.arange(data.n_concepts))
    common, sound = z[:, :16], z[:, 16:32]
    # Share of the sound block's variance that a linear map of the common block explains.
    coef, *_ = np.linalg.lstsq(common, sound, rcond=None)
    explained = 1 - ((sound - common @ coef) ** 2).sum() / (sound**2).sum()
    assert abs(explained - sharing) < 0.15, (sharing, explained)  # 200 draws of a 16x16 map


def test_v2_pools_are_long_tailed_and_differ_by_modality(v2_world) -> None:
    root, data = v2_world
    labels = {m: _any(root, "pool", m).extra("labels") for m in MODALITIES}
    for m in MODALITIES:
        covered = len(np.unique(labels[m]))
        assert covered <= round(data.pool_coverage[m].share * data.n_concepts), m
    assert len(np.unique(labels["audio"])) < 0.6 * len(np.unique(labels["image"]))
    top = {m: np.bincount(labels[m]).max() / len(labels[m]) for m in MODALITIES}
    assert top["audio"] > 3 * top["image"], top  # Zipf 1 vs a balanced ImageNet-like pool
    multi = _any(root, "pool", "audio").extra("multilabels")
    np.testing.assert_array_equal(multi[:, 0], labels["audio"])
    n = (multi >= 0).sum(1)
    assert 1.4 < n.mean() < 2.1 and (n == 3).any(), n.mean()
    text = _any(root, "pool", "text")
    prov = np.bincount(text.extra("provenance"), minlength=3) / text.count
    assert prov[PROVENANCES.index("image")] > 0.6 and prov[PROVENANCES.index("audio")] < 0.1
    assert 0.1 < text.extra("vague").mean() < 0.3
    # Oracle tuples: every modality of a tuple from one concept, which all four pools cover.
    table, _ = load_tuples(root / "tuples" / "oracle.npz")
    concepts = [labels[m][table[m]] for m in MODALITIES]
    assert all(np.array_equal(concepts[0], c) for c in concepts[1:])


def test_v2_uni3d_image_and_text_are_eva02_e(v2_world) -> None:
    root, _ = v2_world
    for dataset, m in (("pool", "image"), ("pool", "text"), ("test_image_text", "text")):
        ours, theirs = _cache(root, dataset, "uni3d", m), _cache(root, dataset, "eva02_e", m)
        np.testing.assert_array_equal(ours.load(), theirs.load())
    # Its points are its own, in EVA02-E's space: they retrieve EVA02-E's texts of the same item.
    assert _r1(root, "test_point_text", "uni3d", "point", "text") > 0.1  # chance: 1/500
    assert not np.array_equal(
        _cache(root, "pool", "uni3d", "point").load()[:5],
        _cache(root, "pool", "uni3d", "text").load()[:5],
    )


def test_v2_same_seed_writes_same_bytes(v2_world, compose_cfg) -> None:
    root, _ = v2_world
    cfg = compose_cfg("data=world_v2", shared_data=False)
    names = ("uni3d",)  # with its tower's (eva02_e's) draws
    again = ensure_world(cfg.data, space_configs(names))
    ours, theirs = _digests(again, names), _digests(root, names)
    assert len(ours) > 50 and ours == theirs


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.hierarchy={coarse:5,r:1.5}", r"data.hierarchy=.*expected coarse >= 1 and 0 <= r"),
        ("data.hierarchy=null", "data.vague_captions needs data.hierarchy"),
        ("data.pool_coverage.audio.share=0", r"data.pool_coverage.audio=.*expected 0 < share"),
        ("data.aspect_sharing=2", r"data.aspect_sharing=2.*expected a value in \[0, 1\]"),
    ],
)
def test_v2_bad_settings_are_refused(compose_cfg, override: str, message: str) -> None:
    cfg = compose_cfg(*TINY, "data=world_v2", override, shared_data=False)
    with pytest.raises(ValueError, match=message):
        ensure_world(cfg.data, space_configs(["clap"]))


def test_v2_tower_must_exist(compose_cfg) -> None:
    cfg = compose_cfg(*TINY, "data=world_v2", shared_data=False)
    space = OmegaConf.to_container(space_configs(["uni3d"])["uni3d"])
    space["world"]["v2"]["tower"] = "nosuch"
    with pytest.raises(ValueError, match="space 'mine': world.v2.tower='nosuch' names no space"):
        ensure_world(cfg.data, {"mine": space})
    space["world"].pop("v2")
    with pytest.raises(ValueError, match=r"space 'mine': data.calibrated=true needs a `world.v2`"):
        ensure_world(cfg.data, {"mine": space})


def test_v2_video_text_sets(v2_world) -> None:
    root, data = v2_world
    n = data.n_test_concepts * data.per_concept
    video, text = (_cache(root, "test_video_text", "eva02_e", m) for m in ("image", "text"))
    assert video.count == text.count == n and video.normalized
    np.testing.assert_allclose(
        np.linalg.norm(video.load().astype(np.float32), axis=1), 1, atol=2e-3
    )
    np.testing.assert_array_equal(video.extra("items"), text.extra("items"))
    # Frame-averaged videos still retrieve their captions far above chance (1/500).
    assert _r1(root, "test_video_text", "eva02_e", "text", "image") > 0.1
    bench = json.loads((root / "benchmarks_test.json").read_text())
    rows = {r["name"]: r for r in bench["retrieval"]}
    assert rows["world_video_text"]["modalities"] == ["video", "text"]
    assert rows["world_video_text"]["dataset"] == "test_video_text"


def test_shared_noise_makes_errors_common_to_the_spaces(world_cfg) -> None:
    """data.shared_noise mixes one common draw into every space's encoder noise: two encodings
    with independent own draws but the same common draw agree more as its share grows; at 0 the
    common generator is never drawn from (the world's bytes stay as they were)."""
    spaces = space_configs(["clap"])
    agreement = {}
    for c in (0.0, 0.9):
        data = OmegaConf.merge(world_cfg.data, {"shared_noise": c})
        world = World(data, spaces)
        views = np.array(["audio"] * 50)
        x = world.observe(world.instances(np.arange(50), np.random.default_rng(0)), views,
                          np.random.default_rng(1))  # fmt: skip
        shared = [np.random.default_rng(7), np.random.default_rng(7)]
        a, b = (world.encode("clap", "audio", x, views, np.random.default_rng(s), shared=shared[i])
                for i, s in enumerate((2, 3)))  # fmt: skip
        agreement[c] = float((a * b).sum(1).mean())
        if c == 0.0:
            assert shared[0].random() == np.random.default_rng(7).random()  # never drawn
    assert agreement[0.9] > agreement[0.0] + 0.05, agreement
    with pytest.raises(ValueError, match=r"data.shared_noise=1.0: expected a value in \[0, 1\)"):
        World(OmegaConf.merge(world_cfg.data, {"shared_noise": 1.0}), spaces).encode(
            "clap", "audio", x, views, np.random.default_rng(0), shared=np.random.default_rng(0)
        )
    data = OmegaConf.to_container(world_cfg.data, resolve=True)
    assert fingerprint({**data, "shared_noise": 0.0}) == fingerprint(data)
