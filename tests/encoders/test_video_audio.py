"""A video's audio track (a space's `video.audio_track`): join, readers, extraction, world."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn.functional as F
from conftest import compose_config
from omegaconf import OmegaConf
from torch import nn

from datamodules.artifacts import sha256_file
from datamodules.cache import EmbeddingCache, cache_dir
from datamodules.extraction import RawDataModule
from datamodules.items import list_items
from datamodules.jobs import ExtractJob
from datamodules.synthetic.demo_raw import ensure_demo_raw
from datamodules.synthetic.world import World, _video, ensure_world
from encoders.base import Encoder, Processor
from encoders.readers import LoadSettings, load_audio_track, load_frames
from encoders.video import audio_track_weight, encode_video, join_audio
from lightning_modules.runtime.config import space_configs
from lightning_modules.runtime.schema import validate
from lightning_modules.stages.extract import CacheShardWriter, ExtractModule, run
from lightning_modules.stages.extract_plan import plan

RATE, SAMPLES = 8000, 800  # the synthetic encoder's audio: 0.1 s at 8 kHz


class AVProcessor(Processor):
    """Frames -> (3, 4, 4) tensors; waveforms stay (800,) tensors."""

    sample_rate, clip_samples = RATE, SAMPLES

    def item(self, modality: str, raw):
        if modality == "image":
            pixels = np.asarray(raw.convert("RGB").resize((4, 4)), np.float32) / 255
            return torch.from_numpy(pixels).permute(2, 0, 1)
        return torch.as_tensor(np.asarray(raw, np.float32))


class AVEncoder(Encoder):
    """A seeded random linear audio-visual encoder (image and audio into one 8-d space)."""

    def __init__(self) -> None:
        super().__init__({"image": 8, "audio": 8}, AVProcessor())
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.image, self.audio = nn.Linear(48, 8), nn.Linear(SAMPLES, 8)

    def embed(self, modality: str, batch: torch.Tensor) -> torch.Tensor:
        return self.image(batch.flatten(1)) if modality == "image" else self.audio(batch)


def write_mp4(path: Path, audio: bool) -> None:
    """A 4-frame 16x16 MPEG-4 clip, with a 1 s 440 Hz AAC track when `audio` (PyAV)."""
    import av
    from PIL import Image

    with av.open(str(path), "w") as out:
        video = out.add_stream("mpeg4", rate=4)
        video.width, video.height, video.pix_fmt = 16, 16, "yuv420p"
        sound = out.add_stream("aac", rate=RATE, layout="mono") if audio else None
        for t in range(4):
            frame = Image.new("RGB", (16, 16), (60 * t, 30, 200 - 40 * t))
            out.mux(video.encode(av.VideoFrame.from_image(frame)))
        out.mux(video.encode())
        if sound is not None:
            wave = np.sin(np.arange(RATE) * 2 * np.pi * 440 / RATE).astype(np.float32)[None]
            chunk = av.AudioFrame.from_ndarray(wave, format="fltp", layout="mono")
            chunk.sample_rate = RATE
            out.mux(sound.encode(chunk))
            out.mux(sound.encode())


@pytest.fixture
def clips(tmp_path: Path) -> Path:
    """Five clips: a frame folder and a .npy with sidecar tracks (.wav at 16 kHz, .flac), an
    .mp4 with an audio stream, and an .mp4 and a .npy without any track."""
    from PIL import Image

    root, rng = tmp_path / "clips", np.random.default_rng(0)
    (root / "a_folder").mkdir(parents=True)
    for t in range(3):
        pixels = rng.integers(0, 255, (8, 8, 3), np.uint8)
        Image.fromarray(pixels).save(root / "a_folder" / f"{t}.png")
    sf.write(root / "a_folder.wav", rng.standard_normal(1600).astype(np.float32) * 0.1, 16000)
    np.save(root / "b_array.npy", rng.integers(0, 255, (3, 8, 8, 3), np.uint8))
    sf.write(root / "b_array.flac", rng.standard_normal(800).astype(np.float32) * 0.1, RATE)
    write_mp4(root / "c_stream.mp4", audio=True)
    write_mp4(root / "d_silent.mp4", audio=False)
    np.save(root / "e_silent.npy", rng.integers(0, 255, (3, 8, 8, 3), np.uint8))
    return root


def test_the_track_joins_as_the_documented_formula() -> None:
    enc = AVEncoder().freeze()
    frames, audio = torch.rand(3, 2, 3, 4, 4), torch.randn(2, SAMPLES)
    has = torch.tensor([True, False, True])
    alone = enc.embed_video(frames)
    for w in (0.5, 0.25):
        joined = enc.embed_video(frames, None, audio, has, w)
        a = enc({"audio": audio})["audio"]
        expected = F.normalize((1 - w) * alone[[0, 2]] + w * a, dim=-1)  # encoders/video.py
        torch.testing.assert_close(joined[[0, 2]], expected)
        torch.testing.assert_close(joined[1], alone[1])  # no track: its frames only
        assert (joined[[0, 2]] - alone[[0, 2]]).norm(dim=1).min() > 0.05
    # w = 0.5 is the mean of the two unit vectors, re-normalised.
    mean = F.normalize((alone[:1] + enc({"audio": audio[:1]})["audio"]) / 2, dim=-1)
    torch.testing.assert_close(join_audio(alone[:1], enc({"audio": audio[:1]})["audio"], 0.5), mean)
    assert torch.equal(encode_video(enc, frames, None, audio, has, None), alone)  # off: frames


def test_readers_find_sidecars_and_streams(clips: Path) -> None:
    track = load_audio_track(str(clips / "a_folder"), RATE, SAMPLES)  # 16 kHz, resampled
    assert track.shape == (SAMPLES,) and track.dtype == np.float32
    assert load_audio_track(str(clips / "b_array.npy"), RATE, SAMPLES).shape == (SAMPLES,)
    stream = load_audio_track(str(clips / "c_stream.mp4"), RATE)
    assert abs(len(stream) - RATE) < 2048  # 1 s, give or take the encoder's priming
    for silent in ("d_silent.mp4", "e_silent.npy"):
        assert load_audio_track(str(clips / silent), RATE, SAMPLES) is None


def test_extraction_joins_tracks_and_clips_without_one_fall_back(clips: Path, caplog) -> None:
    enc = AVEncoder().freeze()
    items = list_items("image", {"source": str(clips), "frames": 2}, "clips")
    assert items.keys == ["a_folder", "b_array", "c_stream", "d_silent", "e_silent"]
    job = ExtractJob("clips", "image", items, clips.parent / "cache", "av", 8, "fp", 2,
                     "float32", frames=2, audio_weight=0.5)  # fmt: skip
    dm = RawDataModule([job], enc.processor, LoadSettings(), batch_size=3)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[CacheShardWriter()])  # fmt: skip
    with caplog.at_level(logging.INFO, logger="datamodules.jobs"):
        trainer.predict(ExtractModule({}, enc.dims, encoder=enc), datamodule=dm,
                        return_predictions=False)  # fmt: skip
    assert "2 of 5 clips have no audio track" in caplog.text
    cache = EmbeddingCache(job.directory, verify=True)
    assert cache.extra("audio_track").tolist() == [1, 1, 1, 0, 0]
    emb = torch.from_numpy(cache.load())
    with torch.no_grad():
        for row, key in enumerate(items.keys):
            source = str(clips / Path(items.sources[row]).name)
            frames = load_frames(source, 2)
            alone = enc.encode({"video": [frames]})["video"][0]
            track = load_audio_track(source, RATE, SAMPLES)
            if track is None:
                torch.testing.assert_close(emb[row], alone)
                continue
            joined = join_audio(alone, enc({"audio": torch.from_numpy(track)[None]})["audio"][0],
                                0.5)  # fmt: skip
            torch.testing.assert_close(emb[row], joined, atol=1e-5, rtol=1e-5)
            assert (emb[row] - alone).norm() > 0.05, key


def test_a_space_without_audio_refuses_the_option(tmp_path: Path) -> None:
    space = {"dims": {"image": 64, "text": 64}, "video": {"audio_track": True}}
    with pytest.raises(ValueError, match=r"space 'tiny_clip': video.audio_track=true .* embeds "
                                         r"\['image', 'text'\]"):  # fmt: skip
        audio_track_weight("tiny_clip", space)
    assert audio_track_weight("tiny_clip", {**space, "video": {"audio_track": False}}) is None
    cfg = compose_config(["stage=extract", "space=tiny_clip", "data=demo_raw", "trainer=cpu",
                          "logger=none", f"paths.output_dir={tmp_path}",
                          "+space.video={audio_track:true,audio_weight:0.5}"])  # fmt: skip
    validate(cfg)  # the block is declared (lightning_modules/runtime/schema.py)
    with pytest.raises(ValueError, match=r"space 'tiny_clip': video.audio_track=true"):
        plan(cfg)
    world = compose_config(["data=world", f"paths.output_dir={tmp_path}"]).data
    with pytest.raises(ValueError, match=r"space 'tiny_clip': video.audio_track=true"):
        World(world, {"tiny_clip": cfg.space})


def test_precomputed_imagebind_joins_its_dumped_tracks(tmp_path: Path) -> None:
    demo = ensure_demo_raw(tmp_path / "raw")
    keys = list_items("image", {"source": demo / "videos", "frames": 4}).keys
    dump, rng = tmp_path / "dump" / "video", np.random.default_rng(0)
    dump.mkdir(parents=True)
    image = rng.standard_normal((len(keys), 1024)).astype(np.float32)
    audio = rng.standard_normal((len(keys), 1024)).astype(np.float32)
    heard = keys[::2]  # every other clip has a track
    np.save(dump / "image.npy", image)
    (dump / "image.ids.json").write_text(json.dumps(keys))
    np.save(dump / "audio.npy", audio[::2])
    (dump / "audio.ids.json").write_text(json.dumps(heard))
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    dumped = f"{{_target_:encoders.precomputed.PrecomputedEncoder,path:{dump.parent}}}"
    base = ["stage=extract", "space=imagebind", "data=demo_raw", "~space.encoder",
            f"+space.encoder={dumped}", "trainer=cpu", "logger=none",  # ImageBind's own dumps
            f"data.source={demo}", "extract.dtype=float32",
            "extract.datasets=[video]", "extract.modalities=[image]",
            "data.benchmarks=[]"]  # fmt: skip
    off = compose_config([*base, f"paths.output_dir={tmp_path / 'off'}"])
    run(off)
    frames = EmbeddingCache(cache_dir(off.data.root, "video", "imagebind", "image"))
    np.testing.assert_allclose(frames.load(), unit(image), atol=1e-6)
    assert "audio_track" not in frames.manifest["extras"]
    on = compose_config([*base, f"paths.output_dir={tmp_path / 'on'}",
                         "+space.video={audio_track:true,audio_weight:0.5}"])  # fmt: skip
    run(on)
    joined = EmbeddingCache(cache_dir(on.data.root, "video", "imagebind", "image"))
    flags = joined.extra("audio_track")
    assert flags.tolist() == [int(k in heard) for k in keys]
    assert joined.manifest["audio_track"] == 0.5
    expected = unit(image)
    expected[::2] = unit(0.5 * unit(image)[::2] + 0.5 * unit(audio[::2]))
    np.testing.assert_allclose(joined.load(), expected, atol=1e-5)
    assert joined.manifest["fingerprint"] != frames.manifest["fingerprint"]


def test_world_default_is_unchanged_and_the_option_touches_only_video(tmp_path: Path) -> None:
    tiny = ["data=world_v2", "data.pool_size={point:200,audio:200,image:200,text:200}",
            "data.oracle_tuples=200", "data.n_concepts=100", "data.n_val_concepts=20",
            "data.n_test_concepts=40", "data.zeroshot={classes:10,per_class:2,templates:2,"
            "multilabel_items:20}"]  # fmt: skip
    spaces = space_configs(["imagebind"])
    plain = OmegaConf.to_container(spaces["imagebind"], resolve=True)
    on_space = {**plain, "video": {"audio_track": True, "audio_weight": 0.5}}
    off_space = {**plain, "video": {"audio_track": False, "audio_weight": 0.5}}
    roots = {}
    for name, space in (("off", spaces["imagebind"]), ("on", on_space)):
        cfg = compose_config([*tiny, f"paths.output_dir={tmp_path / name}"])
        roots[name] = ensure_world(cfg.data, {"imagebind": space})
    digests = {
        name: {str(p.relative_to(root)): sha256_file(p) for p in sorted(root.rglob("*.npy"))}
        for name, root in roots.items()
    }
    # Off is a space config without the key: the same settings, so the same fingerprints and
    # bytes (a cache's bytes follow from the data config and these settings alone).
    off = World(cfg.data, {"imagebind": off_space}).spaces["imagebind"]
    assert off == World(cfg.data, spaces).spaces["imagebind"] and "audio_track" not in off
    assert "audio_track" in World(cfg.data, {"imagebind": on_space}).spaces["imagebind"]
    # On: only the video image caches change; the others keep their bytes.
    changed = {k for k in digests["on"] if digests["on"].get(k) != digests["off"].get(k)}
    assert changed and all("_video_text/imagebind/image/" in k for k in changed)
    for split in ("val", "test"):
        off, on = (EmbeddingCache(cache_dir(roots[n], f"{split}_video_text", "imagebind", "image"))
                   for n in ("off", "on"))  # fmt: skip
        flags = on.extra("audio_track").astype(bool)
        sounding = World(cfg.data, spaces).sounding(off.extra("labels"))
        np.testing.assert_array_equal(flags, sounding)
        assert 0 < flags.mean() < 1  # world_v2: half the concepts make a sound
        np.testing.assert_array_equal(on.load()[~flags], off.load()[~flags])  # no track: frames
        assert (np.abs(on.load()[flags] - off.load()[flags]).sum(1) > 1e-2).all()
    # The track is the instance heard: its rows are the sounding videos, one per row.
    obs = _video(World(cfg.data, {"imagebind": on_space}), "test")["image"]["track"]
    assert len(obs["x"]) == len(obs["rows"]) == int(flags.sum())
