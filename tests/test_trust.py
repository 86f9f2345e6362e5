"""What a new user meets first: stages run alone, shared names read from artifacts, the offline
default of every entry point, and errors that say what to do (issue 24)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, compose_config
from PIL import Image

from datamodules.artifacts import CacheError, file_sha256
from datamodules.cache import CacheWriter, EmbeddingCache, cache_dir
from datamodules.items import RawDataError, list_items
from datamodules.synthetic.demo_raw import ensure_demo_raw
from datamodules.tuples import load_tuples, save_tuples
from lightning_modules.inference.cli import main
from lightning_modules.omni.export import BOUND_WEIGHTS, load_bound_space, load_omni, save_omni
from lightning_modules.omni.layout import OmniLayout
from lightning_modules.omni.model import OmniModel
from lightning_modules.stages.extract import run as extract
from train import train

QUICK_BIND = ("bind.epochs=1", "bind.hidden_dim=64", "bind.batch_size=256")


# ------------------------------------------------------------------------ a stage run alone


def test_bind_alone_makes_the_missing_tuple_table_first(
    small_world: Path, compose_cfg, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """`python train.py stage=bind space=clap` in a new output dir: pair, then bind."""
    cfg = compose_cfg("stage=bind", "space=clap", *QUICK_BIND)
    with caplog.at_level(logging.INFO):
        train(cfg)
    table = tmp_path / "pairs" / "tuples.npz"
    said = [r.getMessage() for r in caplog.records if "running the pair stage first" in r.message]
    assert said == [f"{table}: no tuple table yet; running the pair stage first "
                    "(upstream=false: don't)"]  # fmt: skip
    meta = load_bound_space(tmp_path / "bound" / "clap")[1]
    assert meta["pairs"] == "pseudo" and meta["tuples_sha256"] == file_sha256(table)
    # Made by the pipeline's own pair step: stamped, so stage=pipeline finds it fresh.
    stamp = json.loads((table.parent / "pipeline_config.json").read_text())
    assert stamp["stage"] == "pair" and stamp["output"] == file_sha256(table)


def test_upstream_false_names_the_missing_table_and_its_command(
    small_world: Path, compose_cfg, tmp_path: Path
) -> None:
    cfg = compose_cfg("stage=bind", "space=clap", "upstream=false", *QUICK_BIND)
    with pytest.raises(CacheError) as error:
        train(cfg)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"{tmp_path / 'pairs' / 'tuples.npz'}: no such tuple table")
    assert f"python train.py stage=pair paths.output_dir={tmp_path}" in message
    assert not (tmp_path / "pairs").exists()


def test_pipeline_redoes_bind_and_route_when_their_data_or_callbacks_change(
    small_world: Path, compose_cfg, tmp_path: Path
) -> None:
    """Bind and route declare the config sections they depend on (their DEPENDS), datamodule,
    callbacks and trainer included: the pipeline no longer skips them as fresh after such a
    change, and still skips them after none."""
    args = ("stage=pipeline", "variant=small", "~variant.spaces.imagebind", "~variant.spaces.uni3d",
            "~pipeline.routes.fixed", "bind.pairs=oracle", "route.pairs=oracle", *QUICK_BIND[:3],
            "route.epochs=1", "route.batch_size=256")  # fmt: skip
    bound = tmp_path / "bound" / "clap" / "projectors.safetensors"
    routed = tmp_path / "omni" / "small" / "routed" / "omni.safetensors"
    made = lambda: (bound.stat().st_mtime_ns, routed.stat().st_mtime_ns)  # noqa: E731
    train(compose_cfg(*args))
    first = made()
    train(compose_cfg(*args))
    assert made() == first  # nothing changed: both skipped
    for change in ("datamodule.val_share=0.1", "callbacks.early_stopping.patience=7"):
        before = made()
        train(compose_cfg(*args, change))
        assert all(a != b for a, b in zip(made(), before, strict=True)), change


# ------------------------------------------------------------------------ no hidden coupling


def test_route_reads_the_pool_name_from_the_tuple_table(
    small_world: Path, compose_cfg, tmp_path: Path
) -> None:
    """A tuple table over a pool dataset named `unpaired` binds and routes."""
    root = tmp_path / "data" / "world"  # the shared world's caches, its pool also as `unpaired`
    root.mkdir(parents=True)
    for entry in small_world.iterdir():
        (root / entry.name).symlink_to(entry)
    (root / "unpaired").symlink_to(small_world / "pool")
    table, meta = load_tuples(small_world / "tuples" / "oracle.npz")
    tuples = tmp_path / "unpaired.npz"
    save_tuples(tuples, table, **{**meta, "pool": "unpaired"})
    one_space = ("variant=small", "~variant.spaces.imagebind", "~variant.spaces.uni3d")
    common = (f"paths.data_dir={tmp_path / 'data'}", f"bind.pairs={tuples}", *one_space)
    train(compose_cfg("stage=bind", "space=clap", *QUICK_BIND, *common, shared_data=False))
    train(compose_cfg("stage=route", "route.epochs=1", "route.batch_size=256", *common,
                      shared_data=False))  # fmt: skip
    model = load_omni(tmp_path / "omni" / "small" / "routed")
    assert model.layout.groups == {"audio": ["clap"], "text": ["clap"]}
    assert model.layout.record["tuples_sha256"] == file_sha256(tuples)
    digest = file_sha256(tmp_path / "bound" / "clap" / BOUND_WEIGHTS)[:16]
    assert (tmp_path / "projected" / digest / "unpaired" / "clap@omni" / "audio").is_dir()
    assert not (tmp_path / "projected" / digest / "pool").exists()


def test_raw_data_with_a_pool_named_unpaired_runs_end_to_end(tmp_path: Path) -> None:
    """experiment=demo_raw with its pool dataset renamed `unpaired`: the whole pipeline
    (extract, pair, bind, route, evaluate) reads the name from the config and the tuple table."""
    source = "${data.source}/pool"
    pool = (f"{{image: {{source: '{source}/images'}}, audio: {{source: '{source}/audio'}}, "
            f"point: {{source: '{source}/points'}}, text: {{source: '{source}/captions.jsonl'}}}}")
    cfg = compose_config(["experiment=demo_raw", f"paths.output_dir={tmp_path}", "logger=none",
                          "trainer=cpu", "extract.num_workers=0", "~data.datasets.pool",
                          f"+data.datasets.unpaired={pool}", "pair.dataset=unpaired"])  # fmt: skip
    # The demo's precomputed spaces dump under their dataset's name, as a user's would.
    dumps = ensure_demo_raw(Path(cfg.data.source), seed=cfg.data.seed) / "dumps"
    (dumps / "unpaired").symlink_to(dumps / "pool")
    train(cfg)
    assert load_tuples(tmp_path / "pairs" / "tuples.npz")[1]["pool"] == "unpaired"
    assert not (tmp_path / "data" / "demo_raw" / "pool").exists()
    results = json.loads((Path(cfg.run_dir) / "results.json").read_text())
    assert results["methods"]["routed"]["retrieval"]


# ------------------------------------------------------------------------ offline by default


def test_search_cli_without_network_fails_at_once_naming_the_missing_files(tmp_path: Path) -> None:
    """HF_HUB_OFFLINE unset: the CLI looks on disk only, and says what is missing and why."""
    # text_model_dir null: its tokenizer is roberta-base's, from the Hub (not on disk here).
    encoder = {"_target_": "encoders.clap.ClapEncoder", "amodel": "HTSAT-tiny", "checkpoint": None,
               "text_model_dir": None}  # fmt: skip
    meta = dict(
        variant="tiny", kind="routed", anchor="anchor",
        groups={"audio": ["clap"], "text": ["clap", "anchor"]},
        predictors={"audio": ["clap"], "text": ["clap"]},
        predictor_dims={"audio": 512, "text": 512}, scales={"audio": 1.0, "text": 10.0},
        spaces={"clap": dict(space="clap", anchor="anchor", dims={"audio": 512, "text": 512},
                             out_dim=16, hidden_dim=8, experts=["mix"], renormalize=False)},
        encoders={"clap": {"encoder": encoder, "dims": {"audio": 512, "text": 512}}},
    )  # fmt: skip
    export = save_omni(OmniModel(OmniLayout.from_dict(meta)), tmp_path / "omni")
    gallery = tmp_path / "gallery"
    writer = CacheWriter(gallery, space="omni", modality="audio", dim=16, dtype="float32")
    writer.append(np.eye(4, 16, dtype=np.float32), np.arange(4))
    writer.close(dataset="d")
    drop = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "WANDB_SERVICE")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env |= {"HF_HOME": str(tmp_path / "hf"), "PYTHONPATH": str(REPO), "WANDB_MODE": "offline"}
    cmd = [sys.executable, "-m", "lightning_modules.inference", "search", "--model", str(export),
           "--root", str(tmp_path), "--gallery", str(gallery), "--text", "a dog barks"]  # fmt: skip
    start = time.monotonic()
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=30)
    assert time.monotonic() - start < 30
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    error = done.stderr.strip().splitlines()[-1]
    assert error.startswith("error: the encoder of space 'clap': 'roberta-base'"), error
    assert "is not on disk and HF_HUB_OFFLINE=1" in error and "HF_HUB_OFFLINE=0" in error


# ------------------------------------------------------------------------ errors to act on


def test_blank_captions_are_refused_as_empty_ones(tmp_path: Path) -> None:
    spec = {"provenance": "image"}
    for rows, blank in (([{"text": "a dog"}, {"text": ""}], 1),
                        ([{"text": "a dog"}, {"text": "  \t"}], 1),
                        (["a dog", " ", "a cat"], 1)):  # fmt: skip
        source = tmp_path / "captions.json"
        source.write_text(json.dumps(rows))
        with pytest.raises(RawDataError, match=rf"\(row {blank}\): record has no text or caption"):
            list_items("text", {**spec, "source": str(source)}, "data.datasets.pool.text")
    source.write_text(json.dumps([{"text": "a dog"}, {"text": " a cat "}]))
    assert list_items("text", {**spec, "source": str(source)}).sources == ["a dog", " a cat "]


def test_a_failed_extraction_that_wrote_nothing_blocks_no_rerun(tmp_path: Path) -> None:
    """The encoder fails to build after the caches were prepared; the corrected rerun runs."""
    images = tmp_path / "images"
    images.mkdir()
    for i in range(2):
        Image.fromarray(np.full((8, 8, 3), 60 * i, np.uint8)).save(images / f"item_{i}.png")
    base = ["stage=extract", "space=tiny_clip", "data=demo_raw", "trainer=cpu", "logger=none",
            "extract.num_workers=0", f"paths.output_dir={tmp_path}", "data.generate=null",
            "data.benchmarks=[]", f"+data.datasets.few={{image: {{source: '{images}'}}}}",
            "extract.datasets=[few]"]  # fmt: skip
    bad = compose_config([*base, f"space.encoder.pretrained={tmp_path / 'no_such.pt'}"])
    cache = cache_dir(bad.data.root, "few", "tiny_clip", "image")
    with pytest.raises(Exception, match="no_such.pt"):
        extract(bad)
    assert not cache.exists()
    assert extract(compose_config(base)) == 2


def test_changed_items_are_extracted_again_and_a_moved_folder_is_not(tmp_path: Path) -> None:
    """Items added: the cache is stale and re-extracted, without extract.overwrite. The raw
    folder moved (paths relative to it, sizes and times kept): the caches stay valid."""
    images = tmp_path / "raw_a" / "images"
    images.mkdir(parents=True)
    for i in range(2):
        Image.fromarray(np.full((8, 8, 3), 60 * i, np.uint8)).save(images / f"item_{i}.png")

    def run(source: Path) -> int:
        return extract(compose_config([
            "stage=extract", "space=tiny_clip", "data=demo_raw", "trainer=cpu", "logger=none",
            "extract.num_workers=0", f"paths.output_dir={tmp_path}", "data.generate=null",
            "data.benchmarks=[]", f"+data.datasets.few={{image: {{source: '{source}'}}}}",
            "extract.datasets=[few]"]))  # fmt: skip

    assert run(images) == 2
    Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(images / "item_2.png")
    assert run(images) == 3  # stale: extracted again
    cache = cache_dir(tmp_path / "data" / "demo_raw", "few", "tiny_clip", "image")
    assert EmbeddingCache(cache).count == 3
    made = (cache / "manifest.json").stat().st_mtime_ns
    (tmp_path / "raw_a").rename(tmp_path / "raw_b")
    assert run(tmp_path / "raw_b" / "images") == 0  # already extracted
    assert (cache / "manifest.json").stat().st_mtime_ns == made


def test_pipeline_extracts_only_the_datasets_named_per_space(monkeypatch, tmp_path) -> None:
    """pipeline.extract_datasets limits one space's extraction (e.g. a pair-only space to the
    pool); the others fill every dataset, and a space the pipeline never extracts is refused."""
    from lightning_modules.stages import pipeline

    seen = {}
    monkeypatch.setattr(pipeline.extract, "run",
                        lambda c: seen.setdefault(c.space.name, c.extract.datasets))  # fmt: skip
    base = ["experiment=demo_raw", f"paths.output_dir={tmp_path}"]
    cfg = compose_config([*base, "pipeline.extract_datasets={demo_points: [pool]}"])
    pipeline._extract(cfg)
    assert seen.pop("demo_points") == ["pool"] and seen and set(seen.values()) == {None}
    with pytest.raises(ValueError, match=r"pipeline.extract_datasets names \['clap'\]"):
        pipeline._extract(compose_config([*base, "pipeline.extract_datasets={clap: [pool]}"]))


def test_search_names_each_hit_s_file_and_class(tmp_path: Path, capsys) -> None:
    """A gallery of an extracted cache: hits print as their source file and class name."""
    meta = dict(
        variant="tiny", kind="routed", anchor="anchor", groups={"image": ["sp"]},
        predictors={"image": ["sp"]}, predictor_dims={"image": 8}, scales={"image": 1.0},
        spaces={"sp": dict(space="sp", anchor="anchor", dims={"image": 8}, out_dim=16,
                           hidden_dim=8, experts=["mix"], renormalize=False)},
    )  # fmt: skip
    torch.manual_seed(0)
    export = save_omni(OmniModel(OmniLayout.from_dict(meta)).eval(), tmp_path / "omni")
    source = cache_dir(tmp_path, "shelf", "sp", "image")
    writer = CacheWriter(source, space="sp", modality="image", dim=8)
    ids = np.array([0, 2, 3])  # item 1 failed to extract: rows are not ids
    x = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)
    writer.append(x / np.linalg.norm(x, axis=1, keepdims=True), ids, labels=np.array([1, 0, 1]))
    writer.close(dataset="shelf")
    files = [f"/photos/{name}.png" for name in ("cup_a", "bad", "ball_b", "cup_c")]
    items = dict(keys=["a", "b", "c", "d"], sources=files, classes=["ball", "cup"])
    (source / "items.json").write_text(json.dumps(items))
    common = ["--model", str(export), "--root", str(tmp_path)]
    gallery = str(tmp_path / "gallery")
    assert main(["index", *common, "--dataset", "shelf", "--modality", "image",
                 "--out", gallery]) == 0  # fmt: skip
    capsys.readouterr()
    assert main(["search", *common, "--gallery", gallery, "--query", "shelf:image:2"]) == 0
    printed = capsys.readouterr().out
    assert "query shelf:image:2 (weight 1.0): /photos/cup_c.png (cup) id=3 labels=1" in printed
    for name, label in (("cup_a", "cup"), ("ball_b", "ball"), ("cup_c", "cup")):
        assert f"/photos/{name}.png ({label})" in printed
    assert "/photos/bad.png" not in printed
