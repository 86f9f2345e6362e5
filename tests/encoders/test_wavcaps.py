"""WavCaps HTSAT-BERT: the release's key names and shapes, strict loading, and its preprocessing.

Reference values below come from the WavCaps repo's own code (retrieval/models, settings/
inference.yaml as the OmniBind release ships it), run once outside this suite: ASE(config) with
a BertConfig() text model, its state-dict listing, plus BERT's position_ids buffer, which the
transformers 4.30 the release pins keeps in the state dict (so its strict load needs it in the
checkpoints). On full-size random weights saved in the release's format, our encoder matched
that ASE's encode_audio and encode_text exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import compose_config
from omegaconf import OmegaConf

from encoders import build_encoder
from encoders.readers import LoadSettings, RawDataError
from encoders.wavcaps import (
    CLIP_SAMPLES,
    POSITION_IDS,
    WavCapsASE,
    WavCapsProcessor,
    checkpoint_layout,
    ensure_tiny_text_model,
)

A, T = "audio_encoder.audio_enc.", "text_encoder.text_encoder."
# HTSAT-BERT-PT.pt's ckpt['model']: every key outside the HTSAT and BERT blocks, with its shape.
OUTSIDE_BLOCKS = {
    "temp": (),
    f"{A}audio_feats_extractor.mel_trans.stft.conv_real.weight": (513, 1, 1024),
    f"{A}audio_feats_extractor.mel_trans.stft.conv_imag.weight": (513, 1, 1024),
    f"{A}audio_feats_extractor.log_trans.melW": (513, 64),
    f"{A}bn0.weight": (64,),
    f"{A}bn0.bias": (64,),
    f"{A}bn0.running_mean": (64,),
    f"{A}bn0.running_var": (64,),
    f"{A}bn0.num_batches_tracked": (),
    f"{A}patch_embed.proj.weight": (96, 1, 4, 4),
    f"{A}patch_embed.proj.bias": (96,),
    f"{A}patch_embed.norm.weight": (96,),
    f"{A}patch_embed.norm.bias": (96,),
    f"{A}layers.0.downsample.reduction.weight": (192, 384),
    f"{A}layers.0.downsample.norm.weight": (384,),
    f"{A}layers.0.downsample.norm.bias": (384,),
    f"{A}layers.1.downsample.reduction.weight": (384, 768),
    f"{A}layers.1.downsample.norm.weight": (768,),
    f"{A}layers.1.downsample.norm.bias": (768,),
    f"{A}layers.2.downsample.reduction.weight": (768, 1536),
    f"{A}layers.2.downsample.norm.weight": (1536,),
    f"{A}layers.2.downsample.norm.bias": (1536,),
    f"{A}norm.weight": (768,),
    f"{A}norm.bias": (768,),
    f"{A}tscam_conv.weight": (527, 768, 2, 3),
    f"{A}tscam_conv.bias": (527,),
    f"{A}head.weight": (527, 527),
    f"{A}head.bias": (527,),
    f"{T}embeddings.word_embeddings.weight": (30522, 768),
    f"{T}embeddings.position_embeddings.weight": (512, 768),
    f"{T}embeddings.token_type_embeddings.weight": (2, 768),
    f"{T}embeddings.LayerNorm.weight": (768,),
    f"{T}embeddings.LayerNorm.bias": (768,),
    POSITION_IDS: (1, 512),
    "audio_proj.0.weight": (1024, 768),
    "audio_proj.0.bias": (1024,),
    "audio_proj.2.weight": (1024, 1024),
    "audio_proj.2.bias": (1024,),
    "text_proj.0.weight": (1024, 768),
    "text_proj.0.bias": (1024,),
    "text_proj.2.weight": (1024, 1024),
    "text_proj.2.bias": (1024,),
}
HTSAT_BLOCK_0 = {  # layers.0.blocks.0.*
    "norm1.weight": (96,), "norm1.bias": (96,),
    "attn.relative_position_bias_table": (225, 4), "attn.relative_position_index": (64, 64),
    "attn.qkv.weight": (288, 96), "attn.qkv.bias": (288,),
    "attn.proj.weight": (96, 96), "attn.proj.bias": (96,),
    "norm2.weight": (96,), "norm2.bias": (96,),
    "mlp.fc1.weight": (384, 96), "mlp.fc1.bias": (384,),
    "mlp.fc2.weight": (96, 384), "mlp.fc2.bias": (96,),
}  # fmt: skip
# Shifted-window (odd) blocks keep their attention mask; stage 3 (8x8 tokens: one window) has none.
ATTN_MASKS = {"layers.0.blocks.1": (64, 64, 64), "layers.1.blocks.1": (16, 64, 64),
              "layers.2.blocks.1": (4, 64, 64), "layers.2.blocks.3": (4, 64, 64),
              "layers.2.blocks.5": (4, 64, 64)}  # fmt: skip
BERT_LAYER_0 = {  # encoder.layer.0.*
    "attention.self.query.weight": (768, 768), "attention.self.query.bias": (768,),
    "attention.self.key.weight": (768, 768), "attention.self.key.bias": (768,),
    "attention.self.value.weight": (768, 768), "attention.self.value.bias": (768,),
    "attention.output.dense.weight": (768, 768), "attention.output.dense.bias": (768,),
    "attention.output.LayerNorm.weight": (768,), "attention.output.LayerNorm.bias": (768,),
    "intermediate.dense.weight": (3072, 768), "intermediate.dense.bias": (3072,),
    "output.dense.weight": (768, 3072), "output.dense.bias": (768,),
    "output.LayerNorm.weight": (768,), "output.LayerNorm.bias": (768,),
}  # fmt: skip
HTSAT_BLOCKS = [2, 2, 6, 2]
BERT_LAYERS = 12
CHECKPOINT_KEYS = 407
PARAMETERS = 143_890_904  # ASE.parameters(), the frozen STFT / mel weights and temp included


def test_full_size_keys_and_shapes_are_the_releases() -> None:
    from transformers import BertConfig

    with torch.device("meta"):
        model = WavCapsASE(BertConfig())  # BertConfig's defaults are bert-base-uncased's
    layout = checkpoint_layout(model)
    assert {k: layout.get(k) for k in OUTSIDE_BLOCKS} == OUTSIDE_BLOCKS
    block_0 = {k.removeprefix(f"{A}layers.0.blocks.0."): v for k, v in layout.items()
               if k.startswith(f"{A}layers.0.blocks.0.")}  # fmt: skip
    assert block_0 == HTSAT_BLOCK_0
    masks = {k.removeprefix(A).removesuffix(".attn_mask"): v for k, v in layout.items()
             if k.endswith("attn_mask")}  # fmt: skip
    assert masks == ATTN_MASKS
    bert_0 = {k.removeprefix(f"{T}encoder.layer.0."): v for k, v in layout.items()
              if k.startswith(f"{T}encoder.layer.0.")}  # fmt: skip
    assert bert_0 == BERT_LAYER_0
    blocks = [len({k.split(".")[5] for k in layout if k.startswith(f"{A}layers.{i}.blocks.")})
              for i in range(4)]  # fmt: skip
    assert blocks == HTSAT_BLOCKS
    layers = {k.split(".")[4] for k in layout if k.startswith(f"{T}encoder.layer.")}
    assert len(layers) == BERT_LAYERS
    assert len(layout) == CHECKPOINT_KEYS
    assert sum(p.numel() for p in model.parameters()) == PARAMETERS


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    data_dir = tmp_path_factory.mktemp("wavcaps")
    cfg = compose_config(["space=tiny_wavcaps", f"paths.data_dir={data_dir}"])
    enc_cfg, dims = OmegaConf.to_container(cfg.space.encoder, resolve=True), dict(cfg.space.dims)
    return build_encoder(enc_cfg, dims), enc_cfg, dims


def _release_checkpoint(encoder, path: Path, **changes) -> Path:
    """The encoder's weights as the release stores them: ckpt['model'], with position_ids."""
    state = dict(encoder.model.state_dict())
    positions = encoder.model.text_encoder["text_encoder"].config.max_position_embeddings
    state[POSITION_IDS] = torch.arange(positions)[None]
    for key, value in changes.items():
        if value is None:
            state.pop(key)
        else:
            state[key] = value
    torch.save({"model": state, "optimizer": {}, "config": {"embed_size": 64}, "epoch": 3}, path)
    return path


def test_release_checkpoint_round_trip(tiny, tmp_path: Path) -> None:
    encoder, enc_cfg, dims = tiny
    ckpt = _release_checkpoint(encoder, tmp_path / "HTSAT-BERT-PT.pt")
    loaded = build_encoder({**enc_cfg, "seed": 7, "checkpoint": str(ckpt)}, dims)
    other = build_encoder({**enc_cfg, "seed": 7}, dims)
    wave = torch.from_numpy(np.random.default_rng(0).uniform(-0.5, 0.5, (2, CLIP_SAMPLES)))
    raw = {"audio": list(wave.float().numpy()), "text": ["a dog barks", "rain on a tin roof"]}
    expected, got = encoder.encode(raw), loaded.encode(raw)
    for m in ("audio", "text"):
        torch.testing.assert_close(got[m], expected[m])
        assert not torch.allclose(other.encode(raw)[m], expected[m])  # the seed alone differs
    # ZeRO-3 loading: the same weights, keyed as the encoder module.
    assert set(loaded.pretrained_state_dict()) == set(loaded.state_dict())


def test_bad_checkpoints_are_refused(tiny, tmp_path: Path) -> None:
    encoder, enc_cfg, dims = tiny

    def build(name: str, **changes):
        ckpt = _release_checkpoint(encoder, tmp_path / name, **changes)
        return build_encoder({**enc_cfg, "checkpoint": str(ckpt)}, dims)

    with pytest.raises(ValueError, match=r"missing.pt: checkpoint lacks 'temp' \(shape \(\)\)"):
        build("missing.pt", temp=None)
    with pytest.raises(ValueError, match="extra.pt: checkpoint has unexpected key 'logit_scale'"):
        build("extra.pt", logit_scale=torch.ones(()))
    with pytest.raises(ValueError, match=r"reshaped.pt: key 'audio_proj.0.bias' has shape "
                                         r"\(63,\), the model expects \(64,\)"):  # fmt: skip
        build("reshaped.pt", **{"audio_proj.0.bias": torch.zeros(63)})
    with pytest.raises(ValueError, match="positions.pt: .*position_ids' is not 0, 1, 2"):
        build("positions.pt", **{POSITION_IDS: torch.zeros(1, 64, dtype=torch.long)})
    # Saved with transformers >= 4.31, BERT's position_ids are gone: nothing else is missing.
    build("no_positions.pt", **{POSITION_IDS: None})
    torch.save({"state_dict": encoder.model.state_dict()}, tmp_path / "lightning.pt")
    with pytest.raises(ValueError, match="lightning.pt: expected .* under 'model'"):
        build_encoder({**enc_cfg, "checkpoint": str(tmp_path / "lightning.pt")}, dims)
    with pytest.raises(FileNotFoundError, match="encoder.checkpoint .*nowhere.pt: no such file"):
        build_encoder({**enc_cfg, "checkpoint": str(tmp_path / "nowhere.pt")}, dims)


def test_raw_audio_files_and_captions_are_embedded_as_the_release_does(tiny, tmp_path) -> None:
    """The release: librosa.load(path, sr=32000, mono=True), zero-padded or cut to 10 s."""
    import librosa

    encoder, _, _ = tiny
    rng = np.random.default_rng(1)
    short, long = tmp_path / "short.wav", tmp_path / "long.flac"
    t = np.arange(3 * 32000) / 32000
    tones = np.stack([0.3 * np.sin(2 * np.pi * 440 * t), 0.2 * np.sin(2 * np.pi * 1250 * t)], 1)
    sf.write(short, tones.astype(np.float32), 32000)  # stereo, band-limited (see 16k.wav)
    sf.write(long, rng.uniform(-0.4, 0.4, (12 * 32000, 1)).astype(np.float32), 32000)
    captions = ["A man speaks, then a door slams.", "birds chirp"]
    out = encoder.encode({"audio": [short, long], "text": captions}, LoadSettings(pad="zero"))
    assert out["audio"].shape == (2, 64) and out["text"].shape == (2, 64)
    torch.testing.assert_close(out["audio"].norm(dim=1), torch.ones(2))
    torch.testing.assert_close(out["text"].norm(dim=1), torch.ones(2))
    waves = [librosa.load(p, sr=32000, mono=True)[0] for p in (short, long)]
    waves = np.stack([np.pad(w, (0, max(CLIP_SAMPLES - len(w), 0)))[:CLIP_SAMPLES] for w in waves])
    with torch.no_grad():
        release = encoder({"audio": torch.from_numpy(waves)})["audio"]
    torch.testing.assert_close(out["audio"], release, atol=1e-5, rtol=1e-4)
    # Another rate is resampled to 32 kHz; repeat padding (the readers' default) is not the
    # release's zero padding.
    sf.write(tmp_path / "16k.wav", librosa.resample(waves[0][: 3 * 32000], orig_sr=32000,
                                                    target_sr=16000), 16000)  # fmt: skip
    resampled = encoder.encode({"audio": [tmp_path / "16k.wav"]}, LoadSettings(pad="zero"))
    assert float(resampled["audio"][0] @ out["audio"][0]) > 0.99
    repeated = encoder.encode({"audio": [short]})["audio"]
    assert not torch.allclose(repeated[0], out["audio"][0], atol=1e-3)


def test_captions_are_tokenised_as_wavcaps_does(tiny) -> None:
    encoder, _, _ = tiny
    p = encoder.processor
    assert (p.sample_rate, p.clip_samples) == (32000, 320000)
    tokens = p.batch("text", ["A DOG barks", "a dog barks loudly"])  # padded to the longest
    lengths = tokens["attention_mask"].sum(1).tolist()
    assert tokens["input_ids"].shape == (2, lengths[1]) and lengths[0] < lengths[1]
    n = lengths[0] - 1  # lower-cased alike, up to the first caption's [SEP]
    torch.testing.assert_close(tokens["input_ids"][0, :n], tokens["input_ids"][1, :n])
    assert p.batch("text", ["x" * 100])["input_ids"].shape == (1, 30)  # max_length 30
    # Padding does not move an embedding (the attention mask hides it).
    with torch.no_grad():
        alone = encoder({"text": p.batch("text", ["a dog barks"])})["text"]
        padded = encoder({"text": tokens})["text"][:1]
    torch.testing.assert_close(alone, padded, atol=1e-5, rtol=1e-4)


def test_bad_inputs_and_configs_get_clear_errors(tiny, tmp_path: Path) -> None:
    encoder, enc_cfg, dims = tiny
    with pytest.raises(ValueError, match=r"\(batch, 320000\) waveforms .* got \(1, 1000\)"):
        encoder({"audio": torch.zeros(1, 1000)})
    with pytest.raises(ValueError, match="of 320000 samples .* got shape \\(5,\\)"):
        encoder.processor.item("audio", np.zeros(5, np.float32))
    with pytest.raises(RawDataError, match="must be mono"):
        encoder.encode({"audio": [np.zeros((2, 100), np.float32)]})
    with pytest.raises(ValueError, match="does not embed 'image'"):
        encoder({"image": torch.zeros(1, 3, 8, 8)})
    with pytest.raises(ValueError, match="embeds to 64, the space says \\{'audio': 1024\\}"):
        build_encoder(enc_cfg, {"audio": 1024})
    with pytest.raises(ValueError, match="not \\['point'\\]"):
        build_encoder(enc_cfg, {"point": 64})
    with pytest.raises(FileNotFoundError, match="text_model_dir .*: no config.json"):
        build_encoder(
            {**enc_cfg, "tiny": False, "text_model_dir": str(tmp_path)},
            {"audio": 1024, "text": 1024},
        )
    d = ensure_tiny_text_model(tmp_path / "bert")
    config = json.loads((d / "config.json").read_text())
    config["vocab_size"] = 30522
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="tokens, but its text model expects 30522"):
        WavCapsProcessor(str(d))
