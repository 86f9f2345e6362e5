"""The extract stage, driven through train.py's config: caches, resume, bad input, DDP, ZeRO-3."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import REPO, compose_config
from omegaconf import OmegaConf

from datamodules.artifacts import CacheError
from datamodules.cache import EmbeddingCache, cache_dir
from datamodules.extraction import RawDataModule, RawDataset
from datamodules.items import Items, RawDataError, list_items
from datamodules.jobs import ExtractJob
from datamodules.synthetic.demo_raw import CLASSES, COUNTS, ensure_demo_raw, write_ply
from encoders import build_encoder
from encoders.base import Processor
from encoders.modalities import PROVENANCES
from encoders.openclip import OpenClipEncoder
from encoders.readers import (
    LoadSettings,
    fit_length,
    load_audio,
    load_frames,
    load_points,
    read_ply,
)
from lightning_modules.stages.extract import ExtractModule, read_errors, run

POOL = {m: n * len(CLASSES) for m, n in COUNTS["pool"].items()}  # items per pool modality
POOL["text"] = POOL["image"] + POOL["audio"] + POOL["point"]  # a caption per pool item
BASE = ("stage=extract", "space=tiny_clip", "data=demo_raw", "trainer=cpu", "logger=none",
        "extract.num_workers=0")  # fmt: skip


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo raw files, generated once per module (read-only)."""
    return ensure_demo_raw(tmp_path_factory.mktemp("demo") / "raw")


def extract_cfg(tmp_path: Path, demo: Path, *overrides: str):
    return compose_config(
        [*BASE, f"paths.output_dir={tmp_path}", f"data.source={demo}", *overrides]
    )


def open_cache(cfg, dataset: str, modality: str) -> EmbeddingCache:
    return EmbeddingCache(cache_dir(cfg.data.root, dataset, cfg.space.name, modality), verify=True)


def encoder_of(cfg):
    return build_encoder(
        OmegaConf.to_container(cfg.space.encoder, resolve=True), dict(cfg.space.dims)
    )


def test_extract_tiny_clip_fills_every_cache(tmp_path: Path, demo: Path) -> None:
    cfg = extract_cfg(tmp_path, demo, "extract.num_workers=2", "extract.batch_size=7")
    from train import train

    train(cfg)
    encoder = encoder_of(cfg)
    image, text, video = (open_cache(cfg, "pool", "image"), open_cache(cfg, "pool", "text"),
                          open_cache(cfg, "video", "image"))  # fmt: skip
    assert (image.count, text.count, video.count) == (POOL["image"], POOL["text"], 12)
    assert image.manifest["errors"] == 0 and image.manifest["dtype"] == "float16"
    np.testing.assert_array_equal(image.ids, np.arange(POOL["image"]))
    # The cached rows are the encoder's embeddings of the same files (float16 in the cache).
    items = list_items("image", {"source": demo / "pool" / "images"})
    expected = encoder.encode({"image": items.sources})["image"]
    np.testing.assert_allclose(image.load(), expected.numpy(), atol=2e-3)
    np.testing.assert_allclose(np.linalg.norm(text.load(), axis=1), 1.0, atol=2e-3)
    records = [json.loads(line) for line in (demo / "pool/captions.jsonl").read_text().splitlines()]
    assert text.extra("provenance").tolist() == [
        PROVENANCES.index(r["provenance"]) for r in records
    ]
    assert text.has("labels") and not image.has("labels")
    # Video: 4 frames per clip (frame folders, .npy and .mp4) through the image side, averaged.
    vids = list_items("image", {"source": demo / "videos", "frames": 4})
    assert {Path(s).suffix for s in vids.sources} == {"", ".npy", ".mp4"}
    prepare = encoder.processor.item
    frames = torch.stack(
        [torch.stack([prepare("image", f) for f in load_frames(s, 4)]) for s in vids.sources]
    )
    with torch.no_grad():
        np.testing.assert_allclose(video.load(), encoder.embed_video(frames).numpy(), atol=2e-3)
    assert json.loads((image.directory / "items.json").read_text())["keys"] == items.keys
    # Captions of several per item (COCO / MSR-VTT style): `item` is the row of the item shown.
    for dataset, n_captions in (("test", 5), ("video", 3)):
        items_cache, captions = open_cache(cfg, dataset, "image"), open_cache(cfg, dataset, "text")
        keys = json.loads((items_cache.directory / "items.json").read_text())["keys"]
        shown = [keys[i] for i in captions.extra("item")]
        assert captions.count == n_captions * items_cache.count
        caption_keys = json.loads((captions.directory / "items.json").read_text())["keys"]
        assert all(c.rsplit("/", 1)[0] == k for c, k in zip(caption_keys, shown, strict=True))
    # Zero-shot prompts: classes x templates, class-major, with the class index as `label`.
    prompts = open_cache(cfg, "demo_image_cls_prompts", "text")
    assert prompts.count == 2 * len(CLASSES)
    assert prompts.extra("label").tolist() == np.repeat(np.arange(len(CLASSES)), 2).tolist()
    expected = encoder.encode({"text": [f"a drawing of a {CLASSES[0]}."]})["text"]
    np.testing.assert_allclose(prompts.load()[1], expected[0].numpy(), atol=2e-3)
    manifest = json.loads((Path(cfg.data.root) / "benchmarks.json").read_text())
    assert manifest["root"] == "." and manifest["zeroshot"][0]["classes"] == CLASSES


def test_resume_skips_finished_shards(tmp_path: Path, demo: Path, monkeypatch) -> None:
    cfg = extract_cfg(tmp_path, demo, "extract.shard_size=3", "extract.batch_size=2",
                      "extract.datasets=[pool]")  # fmt: skip
    run(cfg)
    d = cache_dir(cfg.data.root, "pool", "tiny_clip", "image")
    first = open_cache(cfg, "pool", "image").load()
    assert len(list(d.glob("shard_*.emb.npy"))) == POOL["image"] // 3  # in chunks of 3
    # A crash after chunks 0 and 2 were written: no manifest, chunk 1's shard incomplete.
    (d / "manifest.json").unlink()
    (d / "shard_000001_00000.emb.npy").unlink()
    (cache_dir(cfg.data.root, "pool", "tiny_clip", "text") / "manifest.json").unlink()
    seen: list[int] = []
    original = OpenClipEncoder.embed

    def spy(self, modality, batch):
        seen.append(len(batch))
        return original(self, modality, batch)

    monkeypatch.setattr(OpenClipEncoder, "embed", spy)
    run(cfg)
    assert sum(seen) == 3  # only chunk 1's three images were embedded again
    # Same batches (2, 1) as the first run and the same seed: bit-identical rows.
    np.testing.assert_array_equal(open_cache(cfg, "pool", "image").load(), first)
    seen.clear()
    assert run(cfg) == 0 and seen == []  # complete: nothing is built or embedded
    # Another configuration is refused over a finished cache unless overwrite is set.
    other = extract_cfg(tmp_path, demo, "extract.shard_size=4", "extract.datasets=[pool]")
    with pytest.raises(CacheError, match="different configuration"):
        run(other)
    run(extract_cfg(tmp_path, demo, "extract.shard_size=4", "extract.datasets=[pool]",
                    "extract.overwrite=true"))  # fmt: skip
    assert len(list(d.glob("shard_*.emb.npy"))) == POOL["image"] // 4
    # Batches of 64 here, of 2 before: another BLAS path may round differently (one float16 ulp
    # on an AMD EPYC), so compare within float16 rounding (ulp 2**-11 near 1) rather than bits.
    np.testing.assert_allclose(open_cache(cfg, "pool", "image").load(), first, atol=2e-3, rtol=0)


def bad_image_set(root: Path, demo: Path) -> Path:
    """Three good images, a truncated PNG, an empty file and a text file named .jpg."""
    src = root / "images"
    src.mkdir(parents=True)
    for name in ("ball_00.png", "ball_02.png", "box_00.png"):
        shutil.copy(demo / "pool" / "images" / name, src / name)
    data = (demo / "pool" / "images" / "ball_01.jpg").read_bytes()
    (src / "broken.jpg").write_bytes(data[: len(data) // 3])
    (src / "empty.png").write_bytes(b"")
    (src / "notes.jpg").write_text("not an image")
    return src


def test_bad_images_are_skipped_and_listed_or_stop_the_run(tmp_path: Path, demo: Path) -> None:
    src = bad_image_set(tmp_path / "raw", demo)
    data = [f"+data.datasets.bad={{image: {{source: '{src}'}}}}", "extract.datasets=[bad]",
            "extract.batch_size=2"]  # fmt: skip
    cfg = extract_cfg(tmp_path, demo, *data)
    run(cfg)
    cache = open_cache(cfg, "bad", "image")
    keys = list_items("image", {"source": src}).keys  # sorted: ball_00 ball_02 box_00 broken ...
    good = [i for i, k in enumerate(keys) if k in ("ball_00", "ball_02", "box_00")]
    assert cache.ids.tolist() == good
    errors = read_errors(cache.directory)
    assert [e["key"] for e in errors] == ["broken", "empty", "notes"]
    assert all(e["error"] and e["source"].startswith(str(src)) for e in errors)
    assert cache.manifest["errors"] == 3
    assert (
        np.isfinite(cache.load()).all()
        and np.abs(np.linalg.norm(cache.load(), axis=1) - 1).max() < 2e-3
    )
    strict = extract_cfg(tmp_path / "strict", demo, *data, "extract.on_error=raise",
                         "extract.num_workers=1")  # fmt: skip
    with pytest.raises(RawDataError, match="broken.jpg: unreadable image"):
        run(strict)


def test_bad_data_config_stops_before_any_cache_is_touched(tmp_path: Path, demo: Path) -> None:
    """A missing folder, repeated ids, captions without provenance, a manifest naming classes
    with no templates: each stops the run naming the file, and a finished cache is kept."""
    src = tmp_path / "few"
    src.mkdir()
    for name in ("ball_00.png", "box_00.png"):
        shutil.copy(demo / "pool" / "images" / name, src / name)
    good = [f"+data.datasets.few={{image: {{source: '{src}'}}}}", "extract.datasets=[few]",
            "data.benchmarks=[]"]  # fmt: skip
    run(extract_cfg(tmp_path, demo, *good))
    cache = cache_dir(extract_cfg(tmp_path, demo, *good).data.root, "few", "tiny_clip", "image")
    before = {p.name: p.read_bytes() for p in cache.iterdir() if p.is_file()}
    (tmp_path / "dup.csv").write_text("path,id\nfew/ball_00.png,a\nfew/box_00.png,a\n")
    (tmp_path / "caps.jsonl").write_text('{"text": "a ball"}\n')
    manifest = tmp_path / "bench.json"
    entry = {"name": "z", "dataset": "few", "modality": "video", "classes": ["ball", "box"]}
    manifest.write_text(json.dumps({"zeroshot": [entry]}))
    bad = {
        "source folder .*nope does not exist": f"{{image: {{source: '{tmp_path / 'nope'}'}}}}",
        "dup.csv has duplicate item key 'a'": f"{{image: {{source: '{tmp_path / 'dup.csv'}'}}}}",
        "caps.jsonl: row 0 has no provenance": f"{{text: {{source: '{tmp_path / 'caps.jsonl'}'}}}}",
    }
    for message, spec in bad.items():
        cfg = extract_cfg(tmp_path, demo, *good, f"+data.datasets.bad={spec}",
                          "extract.datasets=[few,bad]", "extract.overwrite=true")  # fmt: skip
        with pytest.raises(RawDataError, match=f"data.datasets.bad.*{message}"):
            run(cfg)
    # No default templates for video: the manifest's entry names classes and nothing to fill.
    cfg = extract_cfg(tmp_path, demo, *good[:2], f"data.benchmarks=[{manifest}]",
                      "extract.overwrite=true")  # fmt: skip
    with pytest.raises(ValueError, match=f"{manifest}: zeroshot.0. .z. names classes but no temp"):
        run(cfg)
    # Entries without templates take evaluate.templates.<modality>.
    manifest.write_text(json.dumps({"zeroshot": [{**entry, "modality": "image"}]}))
    assert {p.name: p.read_bytes() for p in cache.iterdir() if p.is_file()} == before
    run(extract_cfg(tmp_path, demo, *good[:2], f"data.benchmarks=[{manifest}]",
                    "evaluate.templates.image=['a {}.']"))  # fmt: skip
    prompts = open_cache(extract_cfg(tmp_path, demo, *good), "z_prompts", "text")
    assert prompts.count == 2 and prompts.extra("label").tolist() == [0, 1]


def test_videos_sampling_odd_frames_and_unreadable_clips(tmp_path: Path, demo: Path) -> None:
    from PIL import Image

    clips = tmp_path / "clips"
    odd = clips / "odd"
    odd.mkdir(parents=True)
    for t in range(6):  # frame 4 is larger than its siblings
        Image.new("RGB", (40, 40) if t != 4 else (48, 40), (40 * t, 0, 0)).save(odd / f"{t}.png")
    (clips / "empty").mkdir()
    (clips / "broken.mp4").write_bytes(b"not a video")
    resized = load_frames(str(odd), 3, stride=2)  # frames 0, 2, 4
    assert [f.size for f in resized] == [(40, 40)] * 3
    assert resized[2].getpixel((5, 5))[0] == 160  # frame 4, resized
    with pytest.raises(RawDataError, match="frame 4 is 48x40"):
        load_frames(str(odd), 3, stride=2, frame_size="raise")
    assert len(load_frames(str(odd), 8, stride=4)) == 2  # a short clip gives fewer frames
    data = [f"+data.datasets.clips={{image: {{source: '{clips}', frames: 3, stride: 2}}}}",
            "extract.datasets=[clips]", "data.benchmarks=[]"]  # fmt: skip
    cfg = extract_cfg(tmp_path, demo, *data)
    run(cfg)
    cache = open_cache(cfg, "clips", "image")
    keys = list_items("image", {"source": clips, "frames": 3}).keys  # broken empty odd
    assert cache.ids.tolist() == [keys.index("odd")]
    assert [e["key"] for e in read_errors(cache.directory)] == ["broken", "empty"]
    encoder = encoder_of(cfg)
    expected = encoder.encode({"video": [odd]}, LoadSettings(frames=3, stride=2))["video"]
    np.testing.assert_allclose(cache.load(), expected.numpy(), atol=2e-3)
    strict = extract_cfg(tmp_path / "strict", demo, *data, "extract.on_error=raise")
    with pytest.raises(RawDataError, match="broken.mp4: unreadable image .*undecodable video"):
        run(strict)


def test_unreadable_audio_and_points_are_reported_with_their_file(tmp_path: Path) -> None:
    import soundfile as sf

    (tmp_path / "a").mkdir()
    sf.write(tmp_path / "a" / "ok.wav", np.zeros(800, np.float32), 8000)
    (tmp_path / "a" / "bad.wav").write_bytes(b"RIFF0000WAVEjunk")
    (tmp_path / "p").mkdir()
    np.save(tmp_path / "p" / "ok.npy", np.random.default_rng(0).standard_normal((50, 3)))
    np.save(tmp_path / "p" / "flat.npy", np.zeros((5, 4)))
    (tmp_path / "p" / "bad.ply").write_text(
        "ply\nformat ascii 1.0\nelement vertex 3\nproperty float x\n"
    )
    for modality, folder, n_bad in (("audio", "a", 1), ("point", "p", 2)):
        items = list_items(modality, {"source": tmp_path / folder})
        job = ExtractJob("d", modality, items, tmp_path / "c", "s", 4, "fp")
        settings = LoadSettings(num_points=16)
        skip = RawDataset(job, Processor(), settings, "skip")
        samples = [skip[(i, False)] for i in range(len(items))]
        failed = [s for s in samples if s.error]
        assert len(failed) == n_bad and all(s.pad for s in failed)  # flagged, never a zero row
        assert all(not s.pad and s.error is None for s in samples if s not in failed)
        bad = next(i for i, k in enumerate(items.keys) if k != "ok")
        with pytest.raises(RawDataError, match=rf"{items.sources[bad]}: unreadable {modality}"):
            RawDataset(job, Processor(), settings, "raise")[(bad, False)]


def test_item_lists_in_every_form(tmp_path: Path) -> None:
    (tmp_path / "imgs" / "cat").mkdir(parents=True)
    (tmp_path / "imgs" / "dog").mkdir()
    for p in ("cat/b.png", "cat/a.png", "dog/c.jpg", "dog/readme.txt"):
        (tmp_path / "imgs" / p).write_bytes(b"")
    items = list_items("image", {"source": tmp_path / "imgs", "labels": "dirs"})
    assert items.keys == ["cat/a", "cat/b", "dog/c"]
    assert items.extras["labels"].tolist() == [0, 0, 1] and items.classes == ["cat", "dog"]
    (tmp_path / "list.csv").write_text("path,label\nimgs/dog/c.jpg,3\nimgs/cat/a.png,1\n")
    items = list_items("image", {"source": tmp_path / "list.csv"})
    assert items.sources == [str(tmp_path / "imgs/dog/c.jpg"), str(tmp_path / "imgs/cat/a.png")]
    assert items.extras["labels"].tolist() == [3, 1]
    (tmp_path / "caps.txt").write_text("a dog\n\na cat\n")
    items = list_items("text", {"source": tmp_path / "caps.txt", "provenance": "3d"})
    assert items.sources == ["a dog", "a cat"] and items.keys == ["0", "1"]
    assert items.extras["provenance"].tolist() == [PROVENANCES.index("point")] * 2
    (tmp_path / "caps.csv").write_text("id,text,provenance\nx,a dog,audio\ny,a cat,image\n")
    items = list_items("text", {"source": tmp_path / "caps.csv"})
    assert items.keys == ["x", "y"] and items.extras["provenance"].tolist() == [1, 2]
    (tmp_path / "caps.json").write_text(json.dumps(["a dog", {"text": "a cat"}]))
    unknown = list_items("text", {"source": tmp_path / "caps.json", "provenance": "unknown"})
    assert unknown.extras["provenance"].tolist() == [-1, -1]  # the tuple contract's "unknown"
    bad = {"caps.jsonl": '{"text": "a", "provenance": "video"}\n', "nocap.jsonl": '{"id": 1}\n',
           "dup.csv": "id,text,provenance\n1,a,image\n1,b,image\n", "broken.json": "[1,",
           "noprov.jsonl": '{"text": "a", "provenance": "image"}\n{"text": "b"}\n'}  # fmt: skip
    messages = ["provenance 'video'", "no text or caption field",
                "duplicate item key '1' \\(rows \\[0, 1\\]\\)", "not valid JSON",
                "noprov.jsonl: row 1 has no provenance"]  # fmt: skip
    for (name, content), message in zip(bad.items(), messages, strict=True):
        (tmp_path / name).write_text(content)
        with pytest.raises(RawDataError, match=message):
            list_items("text", {"source": tmp_path / name}, "data.datasets.x.text")
    # A caption file with no provenance at all (neither per row nor for the source) is refused.
    with pytest.raises(RawDataError, match="caps.json: row 0 has no provenance"):
        list_items("text", {"source": tmp_path / "caps.json"})
    # An item list whose ids repeat: records with explicit ids.
    (tmp_path / "dup.jsonl").write_text('{"path": "imgs/cat/a.png", "id": "x"}\n'
                                        '{"path": "imgs/cat/b.png", "id": "x"}\n')  # fmt: skip
    with pytest.raises(RawDataError, match="data.datasets.x.image: .*duplicate item key 'x'"):
        list_items("image", {"source": tmp_path / "dup.jsonl"}, "data.datasets.x.image")
    with pytest.raises(RawDataError, match="data.datasets.x.audio: source folder .*nope does not"):
        list_items("audio", {"source": tmp_path / "nope"}, "data.datasets.x.audio")


def test_audio_is_resampled_and_fitted(tmp_path: Path) -> None:
    import soundfile as sf

    t = np.arange(16000) / 16000
    sf.write(tmp_path / "tone.wav", np.stack([np.sin(2 * np.pi * 440 * t)] * 2, 1), 16000)
    wave = load_audio(str(tmp_path / "tone.wav"), 48000)
    assert wave.shape == (48000,) and wave.dtype == np.float32
    spectrum = np.abs(np.fft.rfft(wave))
    assert abs(np.argmax(spectrum) * 48000 / len(wave) - 440) < 2  # still 440 Hz at 48 kHz
    assert load_audio(str(tmp_path / "tone.wav"), 48000, 100000).shape == (100000,)
    x = np.arange(1, 5, dtype=np.float32)
    assert fit_length(x, 10).tolist() == [1, 2, 3, 4, 1, 2, 3, 4, 0, 0]
    assert fit_length(x, 6, pad="zero").tolist() == [1, 2, 3, 4, 0, 0]
    assert fit_length(x, 2, clip="center").tolist() == [2, 3]
    assert fit_length(x, 2).tolist() == [1, 2]


def test_point_clouds_from_npy_and_ply(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    pts = np.concatenate([rng.uniform(-2, 5, (40, 3)), rng.integers(0, 256, (40, 3))], 1).astype(
        np.float32
    )
    write_ply(tmp_path / "a.ply", pts, binary=False)
    write_ply(tmp_path / "b.ply", pts, binary=True)
    write_ply(tmp_path / "c.ply", pts[:, :3], binary=True)
    np.testing.assert_allclose(read_ply(str(tmp_path / "a.ply")), pts, atol=1e-5)
    np.testing.assert_allclose(read_ply(str(tmp_path / "b.ply")), pts)
    assert read_ply(str(tmp_path / "c.ply")).shape == (40, 3)
    np.save(tmp_path / "d.npy", pts)
    full = load_points(str(tmp_path / "d.npy"), num_points=None)
    np.testing.assert_allclose(full[:, :3].mean(0), 0, atol=1e-5)
    assert np.linalg.norm(full[:, :3], axis=1).max() == pytest.approx(1.0)
    np.testing.assert_allclose(full[:, 3:], pts[:, 3:] / 255, atol=1e-6)
    np.testing.assert_allclose(load_points(str(tmp_path / "b.ply"), None), full, atol=1e-6)
    assert (load_points(str(tmp_path / "c.ply"), None)[:, 3:] == 0.4).all()
    sampled = load_points(str(tmp_path / "d.npy"), num_points=100, seed=3)
    assert sampled.shape == (100, 6)
    np.testing.assert_array_equal(sampled, load_points(str(tmp_path / "d.npy"), 100, seed=3))


def test_precomputed_space_is_imported_row_aligned(tmp_path: Path, demo: Path) -> None:
    keys = list_items("point", {"source": demo / "pool" / "points"}).keys
    dump = tmp_path / "uni3d_dump" / "pool"
    dump.mkdir(parents=True)
    emb = np.random.default_rng(1).standard_normal((len(keys), 1024)).astype(np.float32)
    order = np.arange(1, len(keys))[::-1]  # reversed, and the first item is missing
    np.save(dump / "point.npy", emb[order])
    (dump / "point.ids.json").write_text(json.dumps([keys[i] for i in order]))
    cfg = extract_cfg(tmp_path, demo, "space=demo_uni3d", f"space.encoder.path={dump.parent}",
                      "extract.modalities=[point]", "extract.datasets=[pool]")  # fmt: skip
    assert run(cfg) == len(keys) - 1
    cache = open_cache(cfg, "pool", "point")
    assert cache.ids.tolist() == list(range(1, len(keys)))
    unit = emb[1:] / np.linalg.norm(emb[1:], axis=1, keepdims=True)
    np.testing.assert_allclose(cache.load(), unit, atol=2e-3)
    assert [e["key"] for e in read_errors(cache.directory)] == [keys[0]]
    strict = extract_cfg(tmp_path / "s", demo, "space=demo_uni3d",
                         f"space.encoder.path={dump.parent}",
                         "extract.modalities=[point]", "extract.on_error=raise",
                         "extract.datasets=[pool]")  # fmt: skip
    with pytest.raises(ValueError, match=f"'{keys[0]}' missing from the precomputed dump"):
        run(strict)


def test_an_updated_dump_is_imported_again(tmp_path: Path, demo: Path) -> None:
    """The dump's files enter the cache's fingerprint: rewritten, the cache is stale."""
    keys = list_items("point", {"source": demo / "pool" / "points"}).keys
    dump = tmp_path / "uni3d_dump" / "pool"
    dump.mkdir(parents=True)
    cfg = extract_cfg(tmp_path, demo, "space=demo_uni3d", f"space.encoder.path={dump.parent}",
                      "extract.modalities=[point]", "extract.datasets=[pool]")  # fmt: skip
    for seed in (1, 2):
        emb = np.random.default_rng(seed).standard_normal((len(keys), 1024)).astype(np.float32)
        np.save(dump / "point.npy", emb)
        (dump / "point.ids.json").write_text(json.dumps(keys))
        os.utime(dump / "point.npy", ns=(seed * 10**9, seed * 10**9))  # a later write
        assert run(cfg) == len(keys)
        unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
        np.testing.assert_allclose(open_cache(cfg, "pool", "point").load(), unit, atol=2e-3)
    assert run(cfg) == 0  # unchanged: already imported


def test_synthetic_data_has_nothing_to_extract(tmp_path: Path) -> None:
    cfg = compose_config(["stage=extract", "space=tiny_clip", f"paths.output_dir={tmp_path}"])
    with pytest.raises(ValueError, match="reads raw items"):
        run(cfg)
    cfg = compose_config([*BASE, f"paths.output_dir={tmp_path}", "extract.datasets=[nope]"])
    with pytest.raises(ValueError, match="extract.datasets names \\['nope'\\]"):
        run(cfg)


def test_deepspeed_infer_composes_and_reaches_the_strategy(tmp_path: Path, demo: Path) -> None:
    cfg = extract_cfg(tmp_path, demo, "trainer=deepspeed_infer", "space=eva_clip_18b")
    assert cfg.trainer.strategy.stage == 3 and cfg.trainer.precision == "bf16-true"
    assert cfg.space.encoder._target_ == "encoders.eva_clip.EvaClip18BEncoder"
    assert cfg.space.dims.image == 1536
    cfg = extract_cfg(tmp_path, demo, "trainer=deepspeed_infer", "trainer.accelerator=cpu")
    # On a CPU, Lightning builds the DeepSpeed ZeRO-3 strategy and then refuses to run it.
    with pytest.raises(RuntimeError, match="DeepSpeed strategy is only supported on CUDA GPUs"):
        run(cfg)


def test_zero3_model_path_builds_empty_then_streams_weights(tmp_path: Path, demo: Path) -> None:
    """configure_model under ZeRO-3: architecture only, then rank 0's weights, module by module
    (on CPU the gathers are no-ops, so this checks the key mapping and the strictness)."""
    cfg = extract_cfg(tmp_path, demo)
    reference = encoder_of(cfg)
    ckpt = tmp_path / "weights.pt"
    torch.save(reference.model.state_dict(), ckpt)
    enc_cfg = {
        **OmegaConf.to_container(cfg.space.encoder, resolve=True),
        "pretrained": str(ckpt),
        "seed": 9,
    }

    class Strategy:
        zero_stage_3 = True

    class Trainer:
        strategy, is_global_zero = Strategy(), True

    module = ExtractModule(enc_cfg, dict(cfg.space.dims))
    module._trainer = Trainer()
    module.configure_model()
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(
        module.encoder({"image": x})["image"], reference({"image": x})["image"]
    )
    from lightning_modules.stages.extract import load_gathered

    state = {f"model.{k}": v for k, v in reference.model.state_dict().items()}
    state.pop("model.logit_scale")
    with pytest.raises(CacheError, match="missing \\['model.logit_scale'\\]"):
        load_gathered(module.encoder, state)


def test_ranks_share_the_chunks_with_equal_batch_counts(tmp_path: Path) -> None:
    items = Items("text", [str(i) for i in range(10)], ["a caption"] * 10)
    job = ExtractJob("d", "text", items, tmp_path / "c", "s", 4, "fp", shard_size=3)
    batches = []
    for rank in range(2):  # chunks [0-2] [3-5] [6-8] [9]: rank 0 takes 0 and 2, rank 1 1 and 3
        trainer = SimpleNamespace(global_rank=rank, world_size=2,
                                  strategy=SimpleNamespace(barrier=lambda *a: None))  # fmt: skip
        dm = RawDataModule([job], Processor(), LoadSettings(), batch_size=2)
        dm.trainer = trainer
        dm.setup("predict")
        batches.append(list(dm.loaders[0][1]))
    assert [len(b) for b in batches] == [4, 4]  # [0,1] [2] [6,7] [8] | [3,4] [5] [9] + 1 pad
    assert batches[1][-1] == [(0, True)]
    real = sorted(i for rank in batches for batch in rank for i, pad in batch if not pad)
    assert real == list(range(10))
    assert all(len({i // 3 for i, _ in batch}) == 1 for rank in batches for batch in rank)


@pytest.mark.slow
def test_ddp_two_cpu_ranks_match_one_process(tmp_path: Path, demo: Path) -> None:
    """Two gloo ranks each write their own chunks; rank 0 merges them into one manifest."""
    args = [f"paths.output_dir={tmp_path}", f"data.source={demo}", "extract.shard_size=3",
            "extract.datasets=[pool]", "logger=none", "extract.num_workers=0"]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    two_ranks = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"]
    cmd = [sys.executable, str(REPO / "train.py"), *BASE[:3], *two_ranks, *args]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Starting with 2 processes" in done.stdout + done.stderr
    ddp = compose_config([*BASE, *args])
    single = compose_config([*BASE, *args, f"paths.output_dir={tmp_path / 'single'}"])
    run(single)
    for m in ("image", "text"):
        a, b = open_cache(ddp, "pool", m), open_cache(single, "pool", m)
        np.testing.assert_array_equal(a.ids, b.ids)
        np.testing.assert_allclose(a.load(), b.load(), atol=1e-3)
        assert len(a.manifest["shards"]) == -(-a.count // 3)


@pytest.mark.slow
def test_tiny_clap_extracts_the_demo_audio_and_text(tmp_path: Path, demo: Path) -> None:
    cfg = extract_cfg(tmp_path, demo, "space=tiny_clap", "extract.datasets=[pool]")
    run(cfg)
    audio, text = open_cache(cfg, "pool", "audio"), open_cache(cfg, "pool", "text")
    assert (audio.count, audio.dim, text.count) == (POOL["audio"], 512, POOL["text"])
    encoder = encoder_of(cfg)
    waves = [
        load_audio(s, 48000, 480000)
        for s in list_items("audio", {"source": demo / "pool" / "audio"}).sources
    ]
    np.testing.assert_allclose(
        audio.load(), encoder.encode({"audio": waves})["audio"].numpy(), atol=2e-3
    )


def test_missing_or_wrong_checkpoint_names_the_space_key_and_file(
    tmp_path: Path, demo: Path
) -> None:
    """A real space whose checkpoint is absent, or of another family, stops the extraction with
    the space, the config key and the file (and the first mismatched key); nothing is written."""
    cfg = extract_cfg(tmp_path, demo, "space=imagebind", "extract.datasets=[test]",
                      "extract.modalities=[image]")  # fmt: skip
    with pytest.raises(FileNotFoundError,
                       match=r"space 'imagebind': encoder.checkpoint /path/to/imagebind_huge.pth"):
        run(cfg)  # fmt: skip
    wrong = tmp_path / "clip.pt"
    torch.save({"visual.proj": torch.zeros(4, 4)}, wrong)
    cfg = extract_cfg(tmp_path, demo, "space=imagebind", "extract.datasets=[test]",
                      "extract.modalities=[image]",
                      f"space.encoder.checkpoint={wrong}")  # fmt: skip
    with pytest.raises(ValueError, match=rf"space 'imagebind': .*{wrong}.*modality_"):
        run(cfg)
    assert not (Path(cfg.data.root) / "test" / "imagebind" / "image").exists()
