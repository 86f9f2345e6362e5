"""The evaluate stage: the real entry point on the world, each kind of method, hand-made
benchmarks with known answers, and the errors that bad benchmarks must raise."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import configured
from omegaconf import OmegaConf

from datamodules.artifacts import CacheError
from datamodules.cache import CacheWriter, EmbeddingCache, cache_dir
from lightning_modules.evaluation.benchmarks import load_benchmarks, prompt_sets, zeroshot_prompts
from lightning_modules.evaluation.methods import make_method
from lightning_modules.evaluation.metrics import recall_at_k
from lightning_modules.evaluation.reports import compact_summary
from lightning_modules.evaluation.scoring import evaluate_method
from lightning_modules.omni.export import load_bound_space, save_omni
from lightning_modules.omni.layout import OmniLayout
from lightning_modules.omni.model import OmniModel
from lightning_modules.runtime.config import space_configs
from lightning_modules.stages.bind import BindModule, export_bound_space
from train import train

DIM = 512  # clap's dim: the hand-made benchmarks are "clap" caches


def _load(root: Path, dataset: str, space: str, modality: str) -> torch.Tensor:
    cache = EmbeddingCache(cache_dir(root, dataset, space, modality))
    return F.normalize(torch.from_numpy(cache.load()), dim=-1)


def _stable_recall(query, gallery, query_items, gallery_items, k: int) -> float:
    """Full score matrix, stable sort: among equal scores the lower gallery row ranks first."""
    order = torch.sort(-(query @ gallery.T), dim=1, stable=True).indices
    return float((gallery_items[order][:, :k] == query_items[:, None]).any(1).float().mean())


def _zeroshot_top1(root: Path, dataset: str, space: str, modality: str) -> float:
    """Top-1 against class embeddings: re-normalised means of the normalised prompts."""
    prompts = _load(root, dataset, space, "text")
    plabels = EmbeddingCache(cache_dir(root, dataset, space, "text")).extra("labels")
    means = [prompts[plabels == c].mean(0) for c in range(plabels.max() + 1)]
    classes = F.normalize(torch.stack(means), dim=-1)
    items = _load(root, dataset, space, modality)
    labels = EmbeddingCache(cache_dir(root, dataset, space, modality)).extra("labels")
    return float(((items @ classes.T).argmax(1).numpy() == labels).mean())


# ---------------------------------------------------------------------------- the world


def test_stage_on_world(small_world: Path, compose_cfg, capsys) -> None:
    cfg = compose_cfg("stage=evaluate", "evaluate.methods=[raw:clap,'expert3d=raw:uni3d']")
    returned = train(cfg)
    # The console gets the compact summary (<= 100 columns) and where the full tables are.
    console = capsys.readouterr().out
    summary = console[console.index("evaluate: world-test (%)") :].splitlines()
    assert summary[2].split()[:2] == ["raw:clap", "2"] and summary[3].startswith("expert3d")
    assert max(map(len, summary)) <= 100 and "results.md" in summary[4]
    out = Path(cfg.evaluate.output_dir)
    results = json.loads((out / "results.json").read_text())
    assert list(results["methods"]) == ["raw:clap", "expert3d"]  # a spec or a given name
    clap, uni3d = results["methods"]["raw:clap"], results["methods"]["expert3d"]
    assert set(clap["retrieval"]) == {
        f"{d}/R@{k}" for d in ("audio_to_text", "text_to_audio") for k in (1, 5)
    }
    assert set(clap["zeroshot"]) == {
        "audio/world_audio/top1",
        "audio/world_audio/top5",
        "audio/world_audio_multilabel/mAP",
    }
    pairs = ("point_to_image", "image_to_point", "point_to_text", "text_to_point")
    assert {k.split("/")[0] for k in uni3d["retrieval"]} == {
        *pairs,
        "image_to_text",
        "text_to_image",
    }
    assert set(uni3d["zeroshot"]) == {
        f"{m}/world_{m}/top{k}" for m in ("point", "image") for k in (1, 5)
    }
    # The numbers are the metric on the caches themselves.
    audio = _load(small_world, "test_audio_text", "clap", "audio")
    text = _load(small_world, "test_audio_text", "clap", "text")
    items = torch.arange(len(audio))
    direct = recall_at_k(text, audio, items, items, ks=(1, 5))
    assert clap["retrieval"]["text_to_audio/R@1"] == pytest.approx(float(direct[1]), abs=1e-6)
    assert clap["retrieval"]["text_to_audio/R@5"] == pytest.approx(float(direct[5]), abs=1e-6)
    # Zero-shot: the class embedding is the re-normalised mean of normalised prompts.
    assert clap["zeroshot"]["audio/world_audio/top1"] == pytest.approx(
        _zeroshot_top1(small_world, "zs_audio", "clap", "audio"), abs=1e-6
    )
    top1 = _zeroshot_top1(small_world, "zs_image", "uni3d", "image")
    assert uni3d["zeroshot"]["image/world_image/top1"] == pytest.approx(top1, abs=1e-6)
    assert 0.2 < top1 < 0.9  # a 3D expert on photos: the check is not trivially 0 or 1
    assert returned == pytest.approx(clap["summary"]["mean_R@1"], abs=1e-6)
    assert clap["summary"] == {"mean_R@1": pytest.approx(np.mean([
        clap["retrieval"]["audio_to_text/R@1"], clap["retrieval"]["text_to_audio/R@1"]]), abs=1e-6),
        "directions": 2}  # fmt: skip
    md = (out / "results.md").read_text()
    assert "| `raw:clap` |" in md and "| `expert3d` |" in md
    assert f"{100 * clap['retrieval']['audio_to_text/R@1']:.2f}" in md
    assert "text→audio R@1" in md and "world_audio_multilabel mAP" in md


def _random_bound(cfg, space: str, dims: dict[str, int]) -> Path:
    """A bound-space export with random (untrained) projectors, as stage=bind writes it."""
    torch.manual_seed(0)
    anchor = {"image": 1536, "text": 1536}
    small = dict(space=space, anchor="eva_clip_18b", dims=dims, anchor_dims=anchor,
                 experts=["mix"], hidden_dim=16)  # fmt: skip
    model = BindModule(**configured("bind", **small))
    return export_bound_space(model.eval(), Path(cfg.evaluate.bound_dir) / space)


def test_bound_method_projects_its_own_modalities(small_world: Path, compose_cfg) -> None:
    cfg = compose_cfg("stage=evaluate")
    _random_bound(cfg, "clap", {"audio": 512, "text": 512})
    method = make_method("bound:clap", cfg.evaluate.bound_dir, cfg.evaluate.omni_dir)
    assert method.modalities == ("audio", "text") and method.spaces == ["clap"]
    emb = method.embed(small_world, "test_audio_text", "audio")
    mixture, _ = load_bound_space(Path(cfg.evaluate.bound_dir) / "clap")
    raw = torch.from_numpy(
        EmbeddingCache(cache_dir(small_world, "test_audio_text", "clap", "audio")).load()
    )
    with torch.no_grad():
        assert torch.allclose(emb, F.normalize(mixture(raw), dim=-1), atol=1e-5)
    assert emb.shape[1] == 1536
    scores = evaluate_method(method, load_benchmarks(small_world / "benchmarks_test.json"))
    assert {k.split("/")[0] for k in scores["retrieval"]} == {"audio_to_text", "text_to_audio"}
    with pytest.raises(CacheError, match="stage=bind space=uni3d"):
        make_method("bound:uni3d", cfg.evaluate.bound_dir, cfg.evaluate.omni_dir)


def test_omni_method_is_one_line_of_dispatch(small_world: Path, compose_cfg) -> None:
    cfg = compose_cfg("stage=evaluate")
    _tiny_omni(cfg)
    bench = load_benchmarks(small_world / "benchmarks_test.json")
    for spec in ("omni:tiny", "omni:tiny:average"):
        method = make_method(spec, cfg.evaluate.bound_dir, cfg.evaluate.omni_dir)
        assert method.modalities == ("audio", "image", "text")
        assert set(method.spaces) == {"clap", "imagebind", "eva_clip_18b"}
        scores = evaluate_method(method, bench)
        directions = {k.split("/")[0] for k in scores["retrieval"]}
        assert directions == {
            f"{a}_to_{b}"
            for a in ("audio", "image", "text")
            for b in ("audio", "image", "text")
            if a != b
        }
        assert "image/world_image/top1" in scores["zeroshot"]
    dirs = (cfg.evaluate.bound_dir, cfg.evaluate.omni_dir)
    assert make_method("avg=omni:tiny:average", *dirs).name == "avg"
    with pytest.raises(ValueError, match="weighting 'mean'"):
        make_method("omni:tiny:mean", cfg.evaluate.bound_dir, cfg.evaluate.omni_dir)
    with pytest.raises(ValueError, match="kind in"):
        make_method("proj:clap", cfg.evaluate.bound_dir, cfg.evaluate.omni_dir)


@pytest.mark.slow
def test_stage_logs_a_wandb_table(small_world: Path, compose_cfg) -> None:
    cfg = compose_cfg("stage=evaluate", "evaluate.methods=[raw:clap]", "logger=wandb")
    train(cfg)
    tables = list(Path(cfg.run_dir).glob("wandb/offline-run-*/files/media/table/evaluate/*.json"))
    assert len(tables) == 1, "no W&B table was logged"
    table = json.loads(tables[0].read_text())
    results = json.loads((Path(cfg.evaluate.output_dir) / "results.json").read_text())
    r1 = results["methods"]["raw:clap"]["retrieval"]["audio_to_text/R@1"]
    assert table["columns"][:2] == ["method", "audio_to_text/R@1"]
    assert table["data"][0][:2] == ["raw:clap", pytest.approx(100 * r1)]
    # An offline run keeps its summary inside the binary run file.
    run_file = next(Path(cfg.run_dir).glob("wandb/offline-run-*/*.wandb")).read_bytes()
    assert b"evaluate/raw:clap/retrieval/audio_to_text/R@1" in run_file


# ---------------------------------------------------------------------------- hand-made benchmarks


def _write(root: Path, dataset: str, modality: str, emb: np.ndarray, ids: np.ndarray | None = None,
           space: str = "clap", dim: int = DIM, **extras: np.ndarray) -> None:  # fmt: skip
    ids = np.arange(len(emb)) if ids is None else ids
    directory = cache_dir(root, dataset, space, modality)
    writer = CacheWriter(
        directory, space=space, modality=modality, dim=dim, dtype="float32", overwrite=True
    )
    if len(emb):
        writer.append(emb.astype(np.float32), ids, **extras)
    writer.close()


def _manifest(root: Path, spec: dict, name: str = "bench.json") -> Path:
    path = root / name
    path.write_text(json.dumps({"root": ".", **spec}))
    return path


@pytest.fixture
def handmade(tmp_path: Path) -> Path:
    """Audio items with 3 captions each (ids 100..), a zero-shot set and a multi-label set."""
    rng = np.random.default_rng(0)
    n, caps, classes = 20, 3, 3
    audio = rng.standard_normal((n, DIM))
    text = np.repeat(audio, caps, 0) + 12 * rng.standard_normal((n * caps, DIM))
    _write(tmp_path, "caps", "audio", audio, ids=100 + np.arange(n))
    _write(tmp_path, "caps", "text", text, items=100 + np.repeat(np.arange(n), caps))
    centers = rng.standard_normal((classes, DIM))
    labels = np.arange(30) % classes
    _write(
        tmp_path,
        "zs",
        "audio",
        centers[labels] + 1.5 * rng.standard_normal((30, DIM)),
        labels=labels,
    )
    prompt_labels = np.repeat(np.arange(classes), 2)
    _write(
        tmp_path,
        "zs",
        "text",
        centers[prompt_labels] + 0.5 * rng.standard_normal((6, DIM)),
        labels=prompt_labels,
    )
    multi = np.zeros((30, classes), np.uint8)
    multi[np.arange(30), labels] = 1
    multi[np.arange(0, 30, 4), (labels[::4] + 1) % classes] = 1
    _write(
        tmp_path,
        "zs_ml",
        "audio",
        centers.T.dot(multi.T).T + rng.standard_normal((30, DIM)),
        labels=multi,
    )
    _write(tmp_path, "zs_ml", "text", centers[prompt_labels], labels=prompt_labels)
    return tmp_path


SPEC = dict(
    retrieval=[dict(name="caps", dataset="caps", modalities=["audio", "text"])],
    # `classes` with their templates: the prompt cache must be exactly classes x templates.
    zeroshot=[dict(name="zs", dataset="zs", modality="audio", prompts="zs",
                   classes=["dog", "rain", "bell"], templates=["a {}.", "the {}."]),
              dict(name="zs_ml", dataset="zs_ml", modality="audio", multilabel=True)],
)  # fmt: skip


def test_multi_caption_benchmark_matches_a_full_sort(handmade: Path, compose_cfg) -> None:
    method, bench = (
        make_method("raw:clap"),
        load_benchmarks(_manifest(handmade, SPEC)),
    )
    scores = evaluate_method(method, bench, ks=(1, 5), chunk=7)
    audio, text = _load(handmade, "caps", "clap", "audio"), _load(handmade, "caps", "clap", "text")
    a_items = torch.arange(100, 120)
    t_items = torch.from_numpy(
        EmbeddingCache(cache_dir(handmade, "caps", "clap", "text")).extra("items")
    )
    for k in (1, 5):
        # audio->text: one query per item, a hit is any of its 3 captions; text->audio: per caption.
        a2t = _stable_recall(audio, text, a_items, t_items, k)
        t2a = _stable_recall(text, audio, t_items, a_items, k)
        assert scores["retrieval"][f"audio_to_text/R@{k}"] == pytest.approx(a2t, abs=1e-6)
        assert scores["retrieval"][f"text_to_audio/R@{k}"] == pytest.approx(t2a, abs=1e-6)
    assert 0 < scores["retrieval"]["text_to_audio/R@1"] < 1
    # A caption gallery deduplicated by item (first caption only) scores differently: the data
    # tells the two semantics apart.
    first = torch.arange(0, 60, 3)
    deduped = [_stable_recall(audio, text[first], a_items, t_items[first], k) for k in (1, 5)]
    assert deduped != [scores["retrieval"][f"audio_to_text/R@{k}"] for k in (1, 5)]
    # 3 classes: a top-5 would hold every class, 100% for any model, so it is not reported.
    assert set(scores["zeroshot"]) == {"audio/zs/top1", "audio/zs_ml/mAP"}
    assert 0 < scores["zeroshot"]["audio/zs_ml/mAP"] <= 1


def test_yaml_manifest_and_repeated_pairs(handmade: Path, compose_cfg) -> None:
    spec = dict(
        retrieval=[
            *SPEC["retrieval"],
            dict(name="caps2", dataset="caps", modalities=["text", "audio"]),
        ]
    )
    spec["retrieval"][1]["modalities"] = ["audio", "text"]
    path = handmade / "bench.yaml"
    OmegaConf.save(OmegaConf.create({"root": ".", **spec}), path)
    scores = evaluate_method(make_method("raw:clap"), load_benchmarks(path))
    # Two benchmarks of one pair are told apart by name instead of overwriting each other.
    assert (
        "audio_to_text/caps/R@1" in scores["retrieval"]
        and "audio_to_text/caps2/R@1" in scores["retrieval"]
    )


def test_stage_with_a_manifest_path(handmade: Path, small_world: Path, compose_cfg) -> None:
    cfg = compose_cfg("stage=evaluate", "evaluate.methods=[raw:clap]")
    # A real-benchmark entry naming classes only: the stage fills in evaluate.templates.audio.
    _write_esc(handmade, {"clap": DIM}, list(cfg.evaluate.templates.audio))
    spec = dict(SPEC, zeroshot=[*SPEC["zeroshot"], ESC])
    cfg = compose_cfg("stage=evaluate", "evaluate.methods=[raw:clap]",
                      f"evaluate.benchmarks={_manifest(handmade, spec)}")  # fmt: skip
    train(cfg)
    results = json.loads((Path(cfg.evaluate.output_dir) / "results.json").read_text())
    assert set(results["methods"]["raw:clap"]["zeroshot"]) == {
        "audio/zs/top1",
        "audio/zs_ml/mAP",
        "audio/esc/top1",
    }


def test_zeroshot_prompts() -> None:
    texts, labels, template = zeroshot_prompts(["dog", "rain"], ["a {}.", "the sound of {}"])
    assert texts == ["a dog.", "the sound of dog", "a rain.", "the sound of rain"]
    assert labels.tolist() == [0, 0, 1, 1] and template.tolist() == [0, 1, 0, 1]
    with pytest.raises(ValueError, match="needs a|need a"):
        zeroshot_prompts(["dog"], ["no placeholder"])


# ---------------------------------------------------------------------------- bad input


def _score(root: Path, compose_cfg, spec: dict) -> dict:
    return evaluate_method(make_method("raw:clap"), load_benchmarks(_manifest(root, spec)))


def test_labels_out_of_range(handmade: Path, compose_cfg) -> None:
    _write(handmade, "zs_bad", "audio", np.ones((4, DIM)), labels=np.array([0, 1, 2, 3]))
    _write(handmade, "zs_bad", "text", np.ones((3, DIM)), labels=np.array([0, 1, 2]))
    spec = dict(zeroshot=[dict(name="bad", dataset="zs_bad", modality="audio")])
    with pytest.raises(CacheError, match=r"'bad'.*zs_bad.*outside \[0, 3\) \(e\.g\. \[3\]\)"):
        _score(handmade, compose_cfg, spec)
    spec["zeroshot"][0]["multilabel"] = True
    with pytest.raises(CacheError, match=r"multi-label needs \(n, 3\)"):
        _score(handmade, compose_cfg, spec)


def test_prompts_must_cover_every_class(handmade: Path, compose_cfg) -> None:
    _write(handmade, "zs_gap", "audio", np.ones((4, DIM)), labels=np.array([0, 1, 2, 0]))
    _write(handmade, "zs_gap", "text", np.ones((4, DIM)), labels=np.array([0, 0, 2, 2]))
    spec = dict(zeroshot=[dict(name="gap", dataset="zs_gap", modality="audio")])
    with pytest.raises(CacheError, match=r"no prompt for \[1\]"):
        _score(handmade, compose_cfg, spec)


def test_item_labels_follow_the_manifest_class_order(handmade: Path, compose_cfg) -> None:
    # Extract indexes string labels by their sorted names and records them in items.json;
    # the manifest lists dog, rain, bell: the same items must score the same.
    before = _score(handmade, compose_cfg, SPEC)["zeroshot"]
    labels = np.arange(30) % 3  # in manifest order, as the fixture wrote them
    names = sorted(SPEC["zeroshot"][0]["classes"])  # bell, dog, rain
    sorted_labels = np.array([names.index(SPEC["zeroshot"][0]["classes"][c]) for c in labels])
    audio = EmbeddingCache(cache_dir(handmade, "zs", "clap", "audio")).load()
    _write(handmade, "zs_sorted", "audio", audio, labels=sorted_labels)
    listing = cache_dir(handmade, "zs_sorted", "clap", "audio") / "items.json"
    listing.write_text(json.dumps({"keys": [], "classes": names}))
    spec = dict(zeroshot=[dict(SPEC["zeroshot"][0], name="zs2", dataset="zs_sorted")])
    after = _score(handmade, compose_cfg, spec)["zeroshot"]
    assert after["audio/zs2/top1"] == before["audio/zs/top1"]
    listing.unlink()  # without the names, the sorted indices are read as manifest indices
    assert _score(handmade, compose_cfg, spec)["zeroshot"]["audio/zs2/top1"] < 0.5
    listing.write_text(json.dumps({"keys": [], "classes": [*names[:2], "cat"]}))
    with pytest.raises(CacheError, match=r"items.json names classes \['cat'\]"):
        _score(handmade, compose_cfg, spec)


def test_stale_prompt_cache_is_refused(handmade: Path, compose_cfg) -> None:
    # The cache holds 3 classes x 2 templates; the manifest now names a fourth class.
    entry = dict(name="zs", dataset="zs", modality="audio", prompts="zs",
                 classes=["a", "b", "c", "d"], templates=["a {}.", "the {}."])  # fmt: skip
    spec = dict(zeroshot=[entry])
    with pytest.raises(CacheError, match=r"not the manifest's 4 classes x 2 templates.*extract"):
        _score(handmade, compose_cfg, spec)
    # Same labels, other texts (templates edited since extraction): the recorded prompts differ.
    spec["zeroshot"][0]["classes"] = ["dog", "rain", "bell"]
    assert _score(handmade, compose_cfg, spec)["zeroshot"]  # no texts recorded: labels suffice
    writer = CacheWriter(cache_dir(handmade, "zs", "clap", "text"), space="clap", modality="text",
                         dim=DIM, dtype="float32", overwrite=True)  # fmt: skip
    writer.append(np.ones((6, DIM), np.float32), np.arange(6), label=np.repeat(np.arange(3), 2))
    writer.close(prompts=["a dog.", "an old dog.", "a rain.", "an old rain.", "a bell.", "x"])
    with pytest.raises(CacheError, match=r"not the manifest's 3 classes x 2 templates"):
        _score(handmade, compose_cfg, spec)
    writer = CacheWriter(cache_dir(handmade, "zs", "clap", "text"), space="clap", modality="text",
                         dim=DIM, dtype="float32", overwrite=True)  # fmt: skip
    writer.append(np.ones((6, DIM), np.float32), np.arange(6), label=np.repeat(np.arange(3), 2))
    writer.close(prompts=prompt_sets(load_benchmarks(_manifest(handmade, spec)))["zs"][0])
    assert set(_score(handmade, compose_cfg, spec)["zeroshot"]) >= {"audio/zs/top1"}


def test_caption_mapping_that_does_not_match(handmade: Path, compose_cfg) -> None:
    items = 100 + np.repeat(np.arange(20), 3)
    items[5] = 999
    _write(handmade, "caps_bad", "audio", np.ones((20, DIM)), ids=100 + np.arange(20))
    _write(handmade, "caps_bad", "text", np.ones((60, DIM)), items=items)
    spec = dict(retrieval=[dict(name="bad", dataset="caps_bad", modalities=["audio", "text"])])
    with pytest.raises(
        CacheError, match=r"'bad': 1 of 60 text rows in .*caps_bad.*\[999\].*mapping"
    ):
        _score(handmade, compose_cfg, spec)
    spec["retrieval"][0]["items"] = {"text": "captions"}  # an extra the cache does not have
    with pytest.raises(CacheError, match="has no 'captions' array"):
        _score(handmade, compose_cfg, spec)


def test_empty_benchmarks(handmade: Path, compose_cfg) -> None:
    with pytest.raises(ValueError, match="bench.json: the manifest is empty"):
        _score(handmade, compose_cfg, dict(retrieval=[], zeroshot=[]))
    _write(handmade, "nothing", "audio", np.zeros((0, DIM)))
    _write(handmade, "nothing", "text", np.zeros((0, DIM)))
    spec = dict(retrieval=[dict(name="void", dataset="nothing", modalities=["audio", "text"])])
    with pytest.raises(ValueError, match=r"'void': nothing/audio is empty \(0 rows\)"):
        _score(handmade, compose_cfg, spec)


def test_manifest_typos_are_named(handmade: Path, compose_cfg) -> None:
    spec = dict(retrieval=[dict(name="caps", dataset="caps", modalities=["audio", "txt"])])
    with pytest.raises(ValueError, match=r"unknown modality 'txt' in .*retrieval\[0\]"):
        _score(handmade, compose_cfg, spec)
    spec = dict(zeroshot=[dict(name="zs", dataset="zs", modality="audio", multi_label=True)])
    with pytest.raises(ValueError, match=r"zeroshot\[0\] has unknown keys \['multi_label'\]"):
        _score(handmade, compose_cfg, spec)
    with pytest.raises(FileNotFoundError, match="nowhere.json"):
        load_benchmarks(handmade / "nowhere.json")


# ---------------------------------------------------------------------------- real benchmarks

ESC = dict(name="esc", dataset="esc", modality="audio", classes=["dog", "rain", "bell"])


def _write_esc(root: Path, dims: dict[str, int], templates: list[str], seed: int = 0) -> None:
    """Per space: 12 audio items (4 per class) and the `esc_prompts` cache that extract writes
    for ESC's 3 classes x these templates: class-major rows with a `label` extra."""
    rng = np.random.default_rng(seed)
    texts, label, _ = zeroshot_prompts(ESC["classes"], templates)
    labels = np.arange(12) % 3
    for space, dim in dims.items():
        centers = rng.standard_normal((3, dim))
        if "audio" in space_configs([space])[space].dims:
            items = centers[labels] + 10 * rng.standard_normal((12, dim))
            _write(root, "esc", "audio", items, space=space, dim=dim, labels=labels)
        prompts = centers[label] + 0.8 * rng.standard_normal((len(texts), dim))
        _write(root, "esc_prompts", "text", prompts, space=space, dim=dim, label=label)


def _expected_top1(method, root: Path) -> float:
    """Top-1 by hand: per class the mean of the normalised prompts, re-normalised."""
    prompts = F.normalize(method.embed(root, "esc_prompts", "text").float(), dim=-1)
    label = torch.from_numpy(EmbeddingCache(cache_dir(root, "esc_prompts", method.spaces[0],
                                                      "text")).extra("label"))  # fmt: skip
    classes = F.normalize(torch.stack([prompts[label == c].mean(0) for c in range(3)]), dim=-1)
    items = F.normalize(method.embed(root, "esc", "audio").float(), dim=-1)
    return float(((items @ classes.T).argmax(1) == torch.arange(12) % 3).float().mean())


def test_real_zeroshot_for_raw_bound_and_omni(tmp_path: Path, compose_cfg) -> None:
    cfg = compose_cfg("stage=evaluate")
    templates = list(cfg.evaluate.templates.audio)
    _write_esc(tmp_path, {"clap": 512, "imagebind": 1024, "eva_clip_18b": 1536}, templates)
    path = _manifest(tmp_path, dict(zeroshot=[ESC]))
    with pytest.raises(ValueError, match=r"bench.json: zeroshot\[0\] \(esc\) names classes but "
                       r"no templates.*evaluate.templates.audio"):  # fmt: skip
        load_benchmarks(path)
    bench = load_benchmarks(path, OmegaConf.to_container(cfg.evaluate.templates))
    assert bench.zeroshot[0].prompts == "esc_prompts" and bench.zeroshot[0].templates == templates
    # What extract embeds: class-major texts with the class index.
    texts, label = prompt_sets(bench)["esc_prompts"]
    assert texts[: len(templates) + 1] == [t.format("dog") for t in templates] + [
        templates[0].format("rain")
    ]
    assert label.tolist() == np.repeat([0, 1, 2], len(templates)).tolist()
    other = dict(ESC, name="esc2", prompts="esc_prompts", classes=["cat"])
    with pytest.raises(ValueError, match="share the prompt dataset 'esc_prompts'"):
        prompt_sets(load_benchmarks(_manifest(tmp_path, dict(zeroshot=[ESC, other])), {
            "audio": templates}))  # fmt: skip
    _tiny_omni(cfg)
    dirs = (cfg.evaluate.bound_dir, cfg.evaluate.omni_dir)
    for spec in ("raw:clap", "bound:clap", "omni:tiny"):
        method = make_method(spec, *dirs)
        scores = evaluate_method(method, bench)["zeroshot"]
        assert set(scores) == {"audio/esc/top1"}, spec  # 3 classes: no top-5
        assert scores["audio/esc/top1"] == pytest.approx(_expected_top1(method, tmp_path), abs=1e-6)
    raw = evaluate_method(make_method("raw:clap"), bench)["zeroshot"]["audio/esc/top1"]
    assert 0 < raw < 1  # the hand check tells hits from misses


def _tiny_omni(cfg) -> None:
    """A routed omni model over random bound clap and imagebind with the eva_clip_18b anchor."""
    spaces = {}
    for name, dims in (
        ("clap", {"audio": 512, "text": 512}),
        ("imagebind", dict.fromkeys(("audio", "image", "text"), 1024)),
    ):
        spaces[name] = json.loads((_random_bound(cfg, name, dims) / "bound.json").read_text())
    groups = {"audio": ["clap", "imagebind"], "image": ["imagebind", "eva_clip_18b"],
              "text": ["clap", "imagebind", "eva_clip_18b"]}  # fmt: skip
    predictors = {"audio": ["clap"], "image": ["imagebind"], "text": ["clap", "imagebind"]}
    meta = dict(kind="routed", anchor="eva_clip_18b", groups=groups, predictors=predictors,
                predictor_dims={"audio": 512, "image": 1024, "text": 1536},
                scales={"audio": 1.0, "image": 1.0, "text": 10.0}, spaces=spaces)  # fmt: skip
    torch.manual_seed(0)
    save_omni(OmniModel(OmniLayout.from_dict(meta)).eval(), Path(cfg.evaluate.omni_dir) / "tiny")


# Two videos (ids 7, 9) and four captions, two per video, as unit vectors on axes e0, e1, e2:
# v7 = e0, v9 = e1; captions of 7: e0 and (0.6, 0.8); captions of 9: (0, 0.6, 0.8), (0.9, .436).
S = float(np.sqrt(1 - 0.81))
VIDEOS = np.array([[1.0, 0, 0], [0, 1, 0]])
CAPTIONS = np.array([[1.0, 0, 0], [0.6, 0.8, 0], [0, 0.6, 0.8], [0.9, S, 0]])
CAPTION_ITEMS = np.array([7, 7, 9, 9])


def _pad(x: np.ndarray, dim: int = 1024) -> np.ndarray:
    return np.pad(x, ((0, 0), (0, dim - x.shape[1])))


def test_multi_caption_video_retrieval_known_answer(tmp_path: Path) -> None:
    # text->video, each caption a query with its one video: captions 0 and 2 rank their video
    # first, 1 and 3 the other one -> R@1 = 1/2, R@2 = 1. video->text, a hit is any caption:
    # v7's best caption is its own (1.0) -> hit; v9's best is caption 1 (0.8, of v7), then its
    # own caption 2 (0.6) -> R@1 = 1/2, R@2 = 1.
    _write(tmp_path, "msrvtt", "image", _pad(VIDEOS), ids=np.array([7, 9]), space="imagebind",
           dim=1024)  # a video is cached as its frames' image embedding  # fmt: skip
    _write(tmp_path, "msrvtt", "text", _pad(CAPTIONS), space="imagebind", dim=1024,
           item=CAPTION_ITEMS)  # fmt: skip
    np.save(tmp_path / "msrvtt_items.npy", CAPTION_ITEMS)
    expected = {"text_to_video/R@1": 0.5, "text_to_video/R@2": 1.0,
                "video_to_text/R@1": 0.5, "video_to_text/R@2": 1.0}  # fmt: skip
    method = make_method("raw:imagebind")
    for items in ({}, {"text": "item"}, {"text": "msrvtt_items.npy"}):  # default, extra, file
        entry = dict(name="msrvtt", dataset="msrvtt", modalities=["video", "text"], items=items)
        bench = load_benchmarks(_manifest(tmp_path, dict(retrieval=[entry])))
        assert evaluate_method(method, bench, ks=(1, 2))["retrieval"] == expected, items
    np.save(tmp_path / "short.npy", CAPTION_ITEMS[:3])
    entry["items"] = {"text": "short.npy"}
    with pytest.raises(CacheError, match=r"short.npy has 3 item ids, but .*msrvtt.* has 4 rows"):
        evaluate_method(method, load_benchmarks(_manifest(tmp_path, dict(retrieval=[entry]))))
    entry["items"] = {"text": "missing.npy"}
    with pytest.raises(FileNotFoundError, match=r"items.text` mapping file .*missing.npy"):
        load_benchmarks(_manifest(tmp_path, dict(retrieval=[entry])))
    # clap embeds no images, so it cannot score video.
    assert evaluate_method(make_method("raw:clap"), bench)["retrieval"] == {}


def test_captions_of_skipped_videos_drop_out(tmp_path: Path) -> None:
    # Video 9 had no readable frames: extract skipped it and listed it in errors.json.
    _write(tmp_path, "msrvtt", "image", _pad(VIDEOS[:1]), ids=np.array([7]), space="imagebind",
           dim=1024)  # fmt: skip
    _write(tmp_path, "msrvtt", "text", _pad(CAPTIONS), space="imagebind", dim=1024,
           item=CAPTION_ITEMS)  # fmt: skip
    entry = dict(name="msrvtt", dataset="msrvtt", modalities=["video", "text"])
    bench = load_benchmarks(_manifest(tmp_path, dict(retrieval=[entry])))
    with pytest.raises(CacheError, match=r"2 of 4 text rows .* no video row"):
        evaluate_method(make_method("raw:imagebind"), bench)
    errors = cache_dir(tmp_path, "msrvtt", "imagebind", "image") / "errors.json"
    errors.write_text(json.dumps([{"id": 9, "error": "no readable frames"}]))
    scores = evaluate_method(make_method("raw:imagebind"), bench, ks=(1,))["retrieval"]
    # Left: v7 and its captions 0 and 1; one video in the gallery, so every query hits.
    assert scores == {"video_to_text/R@1": 1.0, "text_to_video/R@1": 1.0}


def test_video_goes_through_the_image_router(small_world: Path, tmp_path: Path,
                                             compose_cfg) -> None:  # fmt: skip
    cfg = compose_cfg("stage=evaluate")
    _tiny_omni(cfg)
    # The world's image-text set read as video rows: an omni model embeds them as images.
    entries = [dict(name=m, dataset="test_image_text", modalities=[m, "text"])
               for m in ("image", "video")]  # fmt: skip
    path = _manifest(tmp_path, dict(root=str(small_world), retrieval=entries))
    scores = evaluate_method(make_method("omni:tiny", *(cfg.evaluate.bound_dir,
                                                         cfg.evaluate.omni_dir)),
                             load_benchmarks(path))["retrieval"]  # fmt: skip
    for k in (1, 5):
        assert scores[f"text_to_video/R@{k}"] == scores[f"text_to_image/R@{k}"]
        assert scores[f"video_to_text/R@{k}"] == scores[f"image_to_text/R@{k}"]
    assert 0 < scores["text_to_video/R@1"] < 1


def test_stage_shows_video_rows(tmp_path: Path, small_world: Path, compose_cfg) -> None:
    _write(tmp_path, "msrvtt", "image", _pad(VIDEOS), ids=np.array([7, 9]), space="imagebind",
           dim=1024)  # fmt: skip
    _write(tmp_path, "msrvtt", "text", _pad(CAPTIONS), space="imagebind", dim=1024,
           item=CAPTION_ITEMS)  # fmt: skip
    entry = dict(name="msrvtt", dataset="msrvtt", modalities=["text", "video"])
    path = _manifest(tmp_path, dict(name="msrvtt-style", retrieval=[entry]))
    cfg = compose_cfg("stage=evaluate", "evaluate.methods=[raw:imagebind,raw:clap]",
                      f"evaluate.benchmarks={path}")  # fmt: skip
    train(cfg)
    out = Path(cfg.evaluate.output_dir)
    results = json.loads((out / "results.json").read_text())
    assert results["methods"]["raw:imagebind"]["retrieval"]["text_to_video/R@1"] == 0.5
    md = (out / "results.md").read_text()
    assert "text→video R@1 | text→video R@5 | video→text R@1" in md
    assert "| `raw:imagebind` | 50.00 | 100.00 | 50.00 | 100.00 | 50.00 |" in md


def test_compact_summary_fits_100_columns() -> None:
    def method(retrieval: dict, zeroshot: dict) -> dict:
        r1 = [v for k, v in retrieval.items() if k.endswith("R@1")]
        mean = sum(r1) / len(r1) if r1 else None
        return dict(retrieval=retrieval, zeroshot=zeroshot, summary={"mean_R@1": mean})

    results = {"methods": {
        "raw:clap": method({"audio_to_text/R@1": 0.2, "text_to_audio/R@1": 0.4,
                            "audio_to_text/R@5": 0.9}, {"audio/esc/top1": 0.5}),
        "omni:" + "x" * 150: method({"audio_to_image/R@1": 0.1, "text_to_audio/R@1": 0.3}, {}),
    }}  # fmt: skip
    lines = compact_summary(results).splitlines()
    assert max(map(len, lines)) <= 100 and len(lines) == 3
    assert lines[0].split() == ["method", "dirs", "mean", "R@1", "text", "R@1", "zero-shot", "top1"]
    assert lines[1].split() == ["raw:clap", "2", "30.00", "30.00", "50.00"]
    assert lines[2].split()[1:] == ["2", "20.00", "30.00", "-"]  # text R@1: text_to_audio only
    assert lines[2].startswith("omni:xxx") and "\u2026" in lines[2]
    results["methods"]["v"] = method({"text_to_video/R@1": 0.25}, {})
    lines = compact_summary(results).splitlines()
    assert "video R@1" in lines[0] and lines[3].split() == ["v", "1", "25.00", "25.00", "25.00",
                                                            "-"]  # fmt: skip
