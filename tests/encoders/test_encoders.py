"""Encoders: each matches its library's own reference path, and the shared interface holds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import compose_config
from omegaconf import OmegaConf

from datamodules.items import list_items
from datamodules.synthetic.demo_raw import ensure_demo_raw
from encoders import build_encoder, build_processor
from encoders.precomputed import DumpError, PrecomputedEncoder, load_dump, match_rows
from encoders.readers import LoadSettings, load_audio, load_frames, load_image
from encoders.video import frame_indices


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_demo_raw(tmp_path_factory.mktemp("demo") / "raw")


def space(name: str, *overrides: str):
    cfg = compose_config([f"space={name}", *overrides])
    return OmegaConf.to_container(cfg.space.encoder, resolve=True), dict(cfg.space.dims)


@pytest.fixture(scope="module")
def tiny_clip():
    enc_cfg, dims = space("tiny_clip")
    return build_encoder(enc_cfg, dims), enc_cfg


def test_open_clip_encoder_matches_open_clip_reference(tiny_clip, demo: Path) -> None:
    import open_clip

    encoder, enc_cfg = tiny_clip
    paths = list_items("image", {"source": demo / "pool" / "images"}).sources[:8]
    images = [load_image(p) for p in paths]
    texts = ["a cat", "a rocket on its launch pad", "galaxies"]
    ours = encoder.encode({"image": images, "text": texts})
    # open_clip's own path: same architecture and seed, its own transforms and tokenizer.
    torch.manual_seed(enc_cfg["seed"])
    model, _, preprocess = open_clip.create_model_and_transforms(
        enc_cfg["model"], pretrained=None, **enc_cfg["model_cfg"]
    )
    model.eval()
    tok = open_clip.get_tokenizer(enc_cfg["model"], context_length=32)
    with torch.no_grad():
        ref_img = model.encode_image(torch.stack([preprocess(i) for i in images]), normalize=True)
        ref_txt = model.encode_text(tok(texts), normalize=True)
    assert ours["image"].shape == (len(images), 64)
    torch.testing.assert_close(ours["image"], ref_img, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ours["text"], ref_txt, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ours["image"].norm(dim=1), torch.ones(len(images)))


def test_open_clip_local_checkpoint_and_dim_check(tiny_clip, tmp_path: Path) -> None:
    encoder, enc_cfg = tiny_clip
    ckpt = tmp_path / "tiny.pt"
    torch.save(
        {"state_dict": {f"module.{k}": v for k, v in encoder.model.state_dict().items()}}, ckpt
    )
    other = build_encoder(
        {**enc_cfg, "seed": 123, "pretrained": str(ckpt)}, {"image": 64, "text": 64}
    )
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(other({"image": x})["image"], encoder({"image": x})["image"])
    # An open_clip folder (how EVA-CLIP-18B is given): its config, preprocessing and weights.
    from safetensors.torch import save_file

    from encoders.openclip import model_config

    folder = tmp_path / "tiny-open_clip"
    folder.mkdir()
    config = model_config(enc_cfg["model"], enc_cfg["model_cfg"])
    preprocess = {"mean": [0.5] * 3, "std": [0.5] * 3}
    (folder / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": config, "preprocess_cfg": preprocess})
    )
    save_file(encoder.model.state_dict(), str(folder / "open_clip_model.safetensors"))
    target = "encoders.openclip.OpenClipEncoder"
    local = build_encoder({"_target_": target, "model": f"local-dir:{folder}"}, {"image": 64})
    torch.testing.assert_close(local({"image": x})["image"], encoder({"image": x})["image"])
    assert list(local.processor.transform.transforms[-1].mean) == [0.5, 0.5, 0.5]
    assert set(local.pretrained_state_dict()) == set(local.state_dict())
    with pytest.raises(ValueError, match="embed_dim 64"):
        build_encoder(enc_cfg, {"image": 512})
    with pytest.raises(ValueError, match="not \\['audio'\\]"):
        build_encoder(enc_cfg, {"audio": 64})
    # A misspelt key: Python names it, through Hydra's instantiate for the encoder.
    with pytest.raises(TypeError, match="unexpected keyword argument 'pretrainde'"):
        build_processor({**enc_cfg, "pretrainde": "x"}, {"image": 64})
    with pytest.raises(TypeError, match="OpenClipEncoder.__init__.* 'pretrainde'"):
        build_encoder({**enc_cfg, "pretrainde": "x"}, {"image": 64})
    with pytest.raises(ValueError, match="no `encoder:` block with a `_target_`"):
        build_processor(None, {"image": 64})
    with pytest.raises(ValueError, match="no `encoder:` block"):
        build_encoder({"model": "ViT-B-32"}, {"image": 64})  # the old `kind:`-style block
    with pytest.raises(ValueError, match="not an encoders.base.Encoder subclass"):
        build_encoder({"_target_": "torch.nn.Linear"}, {"image": 64})
    with pytest.raises(ValueError, match="does not embed 'audio'"):
        encoder({"audio": torch.zeros(1, 10)})


def test_encode_takes_raw_files(tiny_clip, demo: Path, tmp_path: Path) -> None:
    """encode({modality: raw items}): image paths or PIL images, captions, video frame folders,
    .npy clips and .mp4 files, each as the DataLoader path prepares them."""
    encoder, _ = tiny_clip
    paths = list_items("image", {"source": demo / "pool" / "images"}).sources[:3]
    by_path = encoder.encode({"image": paths, "text": ["a red ball"]})
    by_pil = encoder.encode({"image": [load_image(p) for p in paths]})["image"]
    torch.testing.assert_close(by_path["image"], by_pil)
    assert by_path["text"].shape == (1, 64)
    clips = list_items("image", {"source": demo / "videos", "frames": 4}).sources[:3]
    video = encoder.encode({"video": clips}, LoadSettings(frames=4))["video"]
    frames = [load_frames(c, 4) for c in clips]  # folder, .npy, .mp4
    prepared = torch.stack([torch.stack([encoder.processor.item("image", f) for f in fs])
                            for fs in frames])  # fmt: skip
    with torch.no_grad():
        torch.testing.assert_close(video, encoder.embed_video(prepared), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(encoder.encode({"video": frames})["video"], video)


def test_video_is_the_renormalised_mean_of_its_frames(tiny_clip) -> None:
    encoder, _ = tiny_clip
    frames = torch.randn(2, 3, 3, 64, 64)
    video = encoder.embed_video(frames)
    per_frame = encoder({"image": frames.flatten(0, 1)})["image"].view(2, 3, -1)
    expected = torch.nn.functional.normalize(per_frame.mean(1), dim=-1)
    torch.testing.assert_close(video, expected)
    assert not torch.allclose(video[0], per_frame[0, 0])  # frames differ, so the mean matters
    assert frame_indices(8, 4).tolist() == [1, 3, 5, 7]
    assert frame_indices(2, 4).tolist() == [0, 0, 1, 1]
    assert frame_indices(10, 4, stride=3).tolist() == [0, 3, 6, 9]
    assert frame_indices(10, 3, stride=3).tolist() == [0, 3, 6]  # at most `frames`
    assert frame_indices(4, 8, stride=2).tolist() == [0, 2]  # a short clip gives fewer
    # A zero-padded shorter clip: its padded frames are left out of the mean.
    mask = torch.tensor([[True, True, True], [True, False, False]])
    masked = encoder.embed_video(frames, mask)
    torch.testing.assert_close(masked[0], video[0], atol=1e-6, rtol=1e-5)  # all real: the same
    torch.testing.assert_close(masked[1], per_frame[1, 0])  # one real frame: that frame


def test_clap_processor_refuses_a_tokenizer_that_does_not_fit(tmp_path: Path) -> None:
    from encoders.clap import ClapProcessor, ensure_tiny_text_model

    d = ensure_tiny_text_model(tmp_path / "text")
    config = json.loads((d / "config.json").read_text())
    assert config["hidden_size"] == 768  # CLAP's text projection expects 768
    processor = ClapProcessor("HTSAT-tiny", text_model_dir=str(d))
    assert (processor.sample_rate, processor.clip_samples) == (48000, 480000)
    tokens = processor.batch("text", ["a dog barks", "rain"])
    assert tokens["input_ids"].shape == (2, 77)
    config["vocab_size"] = 50265
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="261 tokens, but its text model expects 50265"):
        ClapProcessor("HTSAT-tiny", text_model_dir=str(d))
    with pytest.raises(ValueError, match="no audio model 'HTSAT-huge'"):
        ClapProcessor("HTSAT-huge", text_model_dir=str(d))


@pytest.fixture(scope="module")
def tiny_clap(tmp_path_factory: pytest.TempPathFactory):
    enc_cfg, dims = space("tiny_clap", f"paths.data_dir={tmp_path_factory.mktemp('clap')}")
    return build_encoder(enc_cfg, dims), enc_cfg, dims


def test_clap_encoder_matches_laion_clap_reference(tiny_clap, demo: Path) -> None:
    from laion_clap.training.data import get_audio_features

    encoder, _, _ = tiny_clap
    model = encoder.model
    sources = list_items("audio", {"source": demo / "pool" / "audio"}).sources
    waves = [load_audio(p, 48000, 480000) for p in sources[:2]]
    texts = ["a bell rings", "white noise"]
    ours = encoder.encode({"audio": waves, "text": texts})
    # A wav path is read, resampled to 48 kHz and fitted, as the extract stage does.
    torch.testing.assert_close(encoder.encode({"audio": sources[:2]})["audio"], ours["audio"])
    # laion_clap's own per-item path (CLAP_Module.get_audio_embedding_from_data and
    # get_text_embedding), on the same model.
    feats = []
    for w in waves:
        q = torch.from_numpy((np.clip(w, -1, 1) * 32767.0).astype(np.int16) / 32767.0).float()
        cfg = encoder.processor.audio_cfg
        feats.append(get_audio_features({}, q, 480000, "rand_trunc", "repeatpad", cfg))
    with torch.no_grad():
        ref_audio = model.get_audio_embedding(feats)
        tok = encoder.processor.tokenizer(texts, padding="max_length", truncation=True,
                                          max_length=77, return_tensors="pt")  # fmt: skip
        ref_text = model.get_text_embedding(dict(tok))
    torch.testing.assert_close(ours["audio"], ref_audio, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ours["text"], ref_text, atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_clap_checkpoint_loads_strictly(tiny_clap, tmp_path: Path) -> None:
    encoder, enc_cfg, dims = tiny_clap
    model, texts = encoder.model, ["a bell rings", "white noise"]
    # A released-style checkpoint ({'state_dict': {'module.*'}}, with RoBERTa's position_ids)
    # loads strictly into a differently seeded model and reproduces the embeddings.
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    state["module.text_branch.embeddings.position_ids"] = torch.arange(80)[None]
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "clap.pt")
    loaded = build_encoder({**enc_cfg, "seed": 7, "checkpoint": str(tmp_path / "clap.pt")}, dims)
    expected = encoder.encode({"text": texts})["text"]
    torch.testing.assert_close(loaded.encode({"text": texts})["text"], expected)
    state.pop("module.logit_scale_a")
    torch.save(state, tmp_path / "broken.pt")
    with pytest.raises(ValueError, match="broken.pt: does not fit"):
        build_encoder({**enc_cfg, "checkpoint": str(tmp_path / "broken.pt")}, dims)


def test_precomputed_dumps_in_every_format(tmp_path: Path) -> None:
    keys = ["a/x", "a/y", "b/z"]
    emb = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    d = tmp_path / "pool"
    d.mkdir()
    np.save(d / "point.npy", emb[::-1])  # rows in another order than the items
    (d / "point.ids.txt").write_text("b/z\na/y\na/x\n")
    torch.save({"embeddings": torch.from_numpy(emb), "ids": [0, 1, 2]}, d / "image.pt")
    from safetensors.numpy import save_file

    save_file({"embeddings": emb[[2, 0]]}, str(d / "text.safetensors"))
    (d / "text.ids.json").write_text(json.dumps(["z", "x"]))  # stems
    enc = PrecomputedEncoder({"point": 4, "image": 4, "text": 4}, str(tmp_path), "pool",
                             {m: keys for m in ("point", "image", "text")})  # fmt: skip
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    out = enc({"point": keys, "image": keys})
    np.testing.assert_allclose(out["point"].numpy(), unit, rtol=1e-5)
    np.testing.assert_allclose(out["image"].numpy(), unit, rtol=1e-5)
    assert enc.table("text")[1] == {"a/x": 1, "b/z": 0}  # a/y is not in this dump
    with pytest.raises(DumpError, match="lacks items \\['a/y'\\]"):
        enc({"text": ["a/y"]})
    # Raw search passes the file itself: a path ending in an item key is that item.
    paths = ["/data/raw/a/x.ply", "/elsewhere/b/z.npy", "b/z"]
    np.testing.assert_allclose(enc.encode({"point": paths})["point"].numpy(), unit[[0, 2, 2]],
                               rtol=1e-5)  # fmt: skip
    with pytest.raises(DumpError, match="dim 4, the space says 8"):
        PrecomputedEncoder({"point": 8}, str(tmp_path), "pool", {"point": keys}).table("point")
    with pytest.raises(DumpError, match="no audio"):
        PrecomputedEncoder({"audio": 4}, str(tmp_path), "pool", {"audio": keys}).table("audio")
    (d / "point.ids.txt").write_text("b/z\nb/z\na/x\n")
    with pytest.raises(DumpError, match="not unique"):
        load_dump(d / "point.npy", "point")
    with pytest.raises(DumpError, match="outside the item list"):
        match_rows([0, 5], keys, "dump")
