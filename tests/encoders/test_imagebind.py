"""ImageBind: the release's key names and shapes, strict loading, and the release's preprocessing.

Reference values below come from the release's own code, run once outside this suite:
imagebind_model.imagebind_huge() built on the meta device (its state-dict listing), its
SimpleTokenizer (token ids), pytorchvideo's ConstantClipsPerVideoSampler through data.py's
get_clip_timepoints (clip bounds) and torchaudio.compliance.kaldi.fbank with data.py's arguments
(filterbank values). On tiny random weights our encoder matched the release's model and data.py
bit for bit (audio, image and text).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import compose_config
from omegaconf import OmegaConf
from PIL import Image

from encoders import build_encoder
from encoders.imagebind import (
    RELEASE_MODALITIES,
    ImageBindModel,
    ImageBindSize,
    audio_clips,
    clip_bounds,
    expected_keys,
    kaldi_fbank,
    mel_banks,
    resolve_size,
)
from encoders.readers import RawDataError

# imagebind_huge's state dict: every key outside the trunks' blocks, with its shape.
HUGE_OUTSIDE_BLOCKS = {
    "modality_preprocessors.vision.cls_token": (1, 1, 1280),
    "modality_preprocessors.vision.rgbt_stem.proj.1.weight": (1280, 3, 2, 14, 14),
    "modality_preprocessors.vision.pos_embedding_helper.pos_embed": (1, 257, 1280),
    "modality_preprocessors.text.pos_embed": (1, 77, 1024),
    "modality_preprocessors.text.mask": (77, 77),
    "modality_preprocessors.text.token_embedding.weight": (49408, 1024),
    "modality_preprocessors.audio.cls_token": (1, 1, 768),
    "modality_preprocessors.audio.rgbt_stem.proj.weight": (768, 1, 16, 16),
    "modality_preprocessors.audio.rgbt_stem.norm_layer.weight": (768,),
    "modality_preprocessors.audio.rgbt_stem.norm_layer.bias": (768,),
    "modality_preprocessors.audio.pos_embedding_helper.pos_embed": (1, 229, 768),
    "modality_preprocessors.depth.cls_token": (1, 1, 384),
    "modality_preprocessors.depth.depth_stem.proj.weight": (384, 1, 16, 16),
    "modality_preprocessors.depth.depth_stem.norm_layer.weight": (384,),
    "modality_preprocessors.depth.depth_stem.norm_layer.bias": (384,),
    "modality_preprocessors.depth.pos_embedding_helper.pos_embed": (1, 197, 384),
    "modality_preprocessors.thermal.cls_token": (1, 1, 768),
    "modality_preprocessors.thermal.rgbt_stem.proj.weight": (768, 1, 16, 16),
    "modality_preprocessors.thermal.rgbt_stem.norm_layer.weight": (768,),
    "modality_preprocessors.thermal.rgbt_stem.norm_layer.bias": (768,),
    "modality_preprocessors.thermal.pos_embedding_helper.pos_embed": (1, 197, 768),
    "modality_preprocessors.imu.pos_embed": (1, 251, 512),
    "modality_preprocessors.imu.cls_token": (1, 1, 512),
    "modality_preprocessors.imu.imu_stem.proj.weight": (512, 48),
    "modality_preprocessors.imu.imu_stem.norm_layer.weight": (512,),
    "modality_preprocessors.imu.imu_stem.norm_layer.bias": (512,),
    "modality_trunks.vision.pre_transformer_layer.0.weight": (1280,),
    "modality_trunks.vision.pre_transformer_layer.0.bias": (1280,),
    "modality_heads.vision.0.weight": (1280,),
    "modality_heads.vision.0.bias": (1280,),
    "modality_heads.vision.2.weight": (1024, 1280),
    "modality_heads.text.proj.0.weight": (1024,),
    "modality_heads.text.proj.0.bias": (1024,),
    "modality_heads.text.proj.1.weight": (1024, 1024),
    "modality_heads.audio.0.weight": (768,),
    "modality_heads.audio.0.bias": (768,),
    "modality_heads.audio.2.weight": (1024, 768),
    "modality_heads.depth.0.weight": (384,),
    "modality_heads.depth.0.bias": (384,),
    "modality_heads.depth.2.weight": (1024, 384),
    "modality_heads.thermal.0.weight": (768,),
    "modality_heads.thermal.0.bias": (768,),
    "modality_heads.thermal.2.weight": (1024, 768),
    "modality_heads.imu.0.weight": (512,),
    "modality_heads.imu.0.bias": (512,),
    "modality_heads.imu.3.weight": (1024, 512),
    "modality_postprocessors.text.1.log_logit_scale": (),
    "modality_postprocessors.audio.1.log_logit_scale": (),
    "modality_postprocessors.depth.1.log_logit_scale": (),
    "modality_postprocessors.thermal.1.log_logit_scale": (),
    "modality_postprocessors.imu.1.log_logit_scale": (),
}  # fmt: skip
# Each trunk: (width, blocks, has bias_k/bias_v); block 0's keys at width w follow.
HUGE_TRUNKS = {
    "vision": (1280, 32, False),
    "text": (1024, 24, False),
    "audio": (768, 12, True),
    "depth": (384, 12, True),
    "thermal": (768, 12, True),
    "imu": (512, 6, True),
}
BLOCK_KEYS = {  # key -> shape, in units of the width w
    "attn.in_proj_weight": (3, 1), "attn.in_proj_bias": (3,), "attn.bias_k": ("1", "1", 1),
    "attn.bias_v": ("1", "1", 1), "attn.out_proj.weight": (1, 1), "attn.out_proj.bias": (1,),
    "norm_1.weight": (1,), "norm_1.bias": (1,), "mlp.fc1.weight": (4, 1), "mlp.fc1.bias": (4,),
    "mlp.fc2.weight": (1, 4), "mlp.fc2.bias": (1,), "norm_2.weight": (1,), "norm_2.bias": (1,),
}  # fmt: skip
HUGE_KEYS, HUGE_ELEMENTS = 1311, 1_200_786_990


@pytest.fixture(scope="module")
def tiny():
    cfg = compose_config(["space=tiny_imagebind"]).space
    enc_cfg = OmegaConf.to_container(cfg.encoder, resolve=True)
    return build_encoder(enc_cfg, dict(cfg.dims)), enc_cfg, dict(cfg.dims)


@pytest.fixture(scope="module")
def tiny_checkpoint(tiny, tmp_path_factory: pytest.TempPathFactory):
    """A tiny six-modality model and its state dict saved as the release's (flat) file."""
    _, enc_cfg, _ = tiny
    torch.manual_seed(11)
    model = ImageBindModel(resolve_size(enc_cfg["size"]), RELEASE_MODALITIES).eval()
    path = tmp_path_factory.mktemp("ib") / "imagebind_tiny.pth"
    torch.save(model.state_dict(), path)
    return model, path


def test_full_size_keys_are_the_releases() -> None:
    listing = expected_keys(ImageBindSize())  # built on the meta device: no memory
    assert len(listing) == HUGE_KEYS
    assert sum(int(np.prod(s)) for s in listing.values()) == HUGE_ELEMENTS
    outside = {k: s for k, s in listing.items() if ".blocks." not in k}
    assert outside == HUGE_OUTSIDE_BLOCKS
    for m, (w, blocks, bias_kv) in HUGE_TRUNKS.items():
        prefix = f"modality_trunks.{m}.blocks."
        assert {
            int(k[len(prefix) :].split(".")[0]) for k in listing if k.startswith(prefix)
        } == set(range(blocks))
        want = {prefix + "0." + k: tuple(int(u) if isinstance(u, str) else u * w for u in shape)
                for k, shape in BLOCK_KEYS.items() if bias_kv or "bias_" not in k}  # fmt: skip
        assert {k: s for k, s in listing.items() if k.startswith(prefix + "0.")} == want


def test_tiny_checkpoint_round_trip(tiny, tiny_checkpoint) -> None:
    encoder, enc_cfg, dims = tiny
    model, path = tiny_checkpoint
    loaded = build_encoder({**enc_cfg, "seed": 123, "checkpoint": str(path)}, dims)
    state = model.state_dict()
    for k, v in loaded.model.state_dict().items():  # only the three towers were kept
        torch.testing.assert_close(v, state[k], rtol=0, atol=0)
    assert {k.split(".")[1] for k in loaded.model.state_dict()} == {"vision", "text", "audio"}
    assert set(loaded.pretrained_state_dict()) == set(loaded.state_dict())
    p = loaded.processor
    images = [Image.new("RGB", (300, 200), (200, 30, 30)), Image.new("RGB", (64, 90), (0, 90, 9))]
    waves = [np.sin(np.arange(n) / 7.0).astype(np.float32) for n in (16000, 70000)]
    texts = ["a dog", "a red car"]
    ours = loaded.encode({"image": images, "audio": waves, "text": texts})
    with torch.no_grad():
        ref = {"image": model("vision", torch.stack([p.item("image", i) for i in images])),
               "audio": model("audio", torch.stack([p.item("audio", w) for w in waves])),
               "text": model("text", p.batch("text", texts))}  # fmt: skip
    for m, r in ref.items():
        torch.testing.assert_close(ours[m], torch.nn.functional.normalize(r, dim=-1))
    # Another seed without a checkpoint embeds differently: the weights came from the file.
    assert not torch.allclose(encoder.encode({"text": texts})["text"], ours["text"])


def test_bad_checkpoints_are_refused(tiny, tiny_checkpoint, tmp_path: Path) -> None:
    _, enc_cfg, dims = tiny
    state = tiny_checkpoint[0].state_dict()

    def build(s, name: str):
        torch.save(s, tmp_path / name)
        return build_encoder({**enc_cfg, "checkpoint": str(tmp_path / name)}, dims)

    key = "modality_trunks.depth.blocks.0.attn.bias_k"  # an unused modality is checked too
    with pytest.raises(ValueError, match=f"missing.pth: missing key '{key}'"):
        build({k: v for k, v in state.items() if k != key}, "missing.pth")
    with pytest.raises(ValueError, match="extra.pth: unexpected key 'modality_heads.vision.9.w'"):
        build({**state, "modality_heads.vision.9.w": torch.zeros(1)}, "extra.pth")
    key = "modality_heads.text.proj.1.weight"
    with pytest.raises(
        ValueError,
        match=rf"reshaped.pth: key '{key}' has shape \(32, 16\), but "
        rf"ImageBind at encoder.size expects \(32, 32\)",
    ):
        build({**state, key: torch.zeros(32, 16)}, "reshaped.pth")
    with pytest.raises(ValueError, match="wrapped.pth: expected the release's flat state dict"):
        build({"model": state}, "wrapped.pth")
    with pytest.raises(FileNotFoundError, match="encoder.checkpoint .*nowhere.pth: no such file"):
        build_encoder({**enc_cfg, "checkpoint": str(tmp_path / "nowhere.pth")}, dims)
    # A huge config does not take the tiny file: the first reshaped key is named.
    with pytest.raises(ValueError, match="'modality_preprocessors.vision.cls_token' has shape"):
        build_encoder({**enc_cfg, "size": "huge", "checkpoint": str(tmp_path / "extra.pth")},
                      {"image": 1024})  # fmt: skip


def test_encode_embeds_raw_files(tiny, tmp_path: Path) -> None:
    encoder, _, _ = tiny
    t = np.arange(int(3.7 * 44100)) / 44100
    wave = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    sf.write(tmp_path / "tone.wav", np.stack([wave, wave], 1), 44100, subtype="PCM_16")  # stereo
    wave16 = np.sin(np.arange(20000) / 5.0).astype(np.float32) * 0.5
    sf.write(tmp_path / "short.wav", wave16, 16000, subtype="FLOAT")
    Image.new("RGB", (500, 260), (10, 200, 90)).save(tmp_path / "a.png")
    Image.new("RGB", (120, 160), (90, 10, 200)).save(tmp_path / "b.jpg")
    out = encoder.encode({"audio": [str(tmp_path / "tone.wav"), str(tmp_path / "short.wav")],
                          "image": [str(tmp_path / "a.png"), str(tmp_path / "b.jpg")],
                          "text": ["a tone", "a green field", "noise"]})  # fmt: skip
    for m, n in (("audio", 2), ("image", 2), ("text", 3)):
        assert out[m].shape == (n, 32)
        torch.testing.assert_close(out[m].norm(dim=1), torch.ones(n))
    # A 16 kHz waveform given as an array is what its file gives.
    as_array = encoder.encode({"audio": [wave16]})["audio"]
    torch.testing.assert_close(as_array, out["audio"][1:])
    pil = encoder.encode({"image": [Image.open(tmp_path / "a.png")]})["image"]
    torch.testing.assert_close(pil, out["image"][:1])


def test_bad_inputs_and_configs_get_clear_errors(tiny) -> None:
    encoder, enc_cfg, dims = tiny
    with pytest.raises(RawDataError, match="399 samples at 16 kHz; ImageBind needs at least 400"):
        encoder.encode({"audio": [np.zeros(399, np.float32)]})
    with pytest.raises(
        RawDataError, match="ImageBind takes PIL images or image paths, got ndarray"
    ):
        encoder.encode({"image": [np.zeros((8, 8, 3))]})
    with pytest.raises(ValueError, match=r"image batches are \(batch, \*\(3, 224, 224\)\)"):
        encoder({"image": torch.zeros(1, 3, 64, 64)})
    with pytest.raises(ValueError, match="does not embed 'point'"):
        encoder({"point": torch.zeros(1, 10, 6)})
    with pytest.raises(
        ValueError, match="embeds \\('audio', 'image', 'text'\\), not \\['point'\\]"
    ):
        build_encoder(enc_cfg, {"point": 32})
    with pytest.raises(ValueError, match="out_embed_dim 32, but the space's dims say"):
        build_encoder(enc_cfg, {"image": 1024})
    with pytest.raises(ValueError, match="unknown dims \\['vision_width'\\]"):
        build_encoder({**enc_cfg, "size": {"vision_width": 8}}, dims)
    with pytest.raises(ValueError, match="expected 'huge' or a mapping"):
        build_encoder({**enc_cfg, "size": "base"}, dims)
    with pytest.raises(ValueError, match="text_embed_dim 30 is not a multiple of text_num_heads 4"):
        build_encoder({**enc_cfg, "size": {**enc_cfg["size"], "text_embed_dim": 30,
                                           "text_num_heads": 4}}, dims)  # fmt: skip


def _signal(n: int) -> np.ndarray:
    t = np.arange(n, dtype=np.float64) / 16000
    w = 0.5 * np.sin(2 * np.pi * 440 * t) + 0.25 * np.sin(2 * np.pi * 1500 * t * t)
    return (w + 0.05 * np.sin(2 * np.pi * 7100 * t) + 0.01).astype(np.float32)


def test_fbank_matches_torchaudio_kaldi() -> None:
    banks = mel_banks()
    fbank = kaldi_fbank(torch.from_numpy(_signal(32000)), banks)
    assert fbank.shape == (198, 128)  # whole 25 ms frames every 10 ms in 2 s
    # torchaudio.compliance.kaldi.fbank(w[None], htk_compat=True, sample_frequency=16000,
    # use_energy=False, window_type="hanning", num_mel_bins=128, dither=0.0, frame_length=25,
    # frame_shift=10) at these rows and columns, with its mean and std.
    want = [[-0.9172, -8.7931, -13.2021, -15.9424, -15.9424, -6.3836],
            [-10.1435, -9.692, -13.5382, -15.9424, -15.9424, -6.3836],
            [-13.94, -9.7086, -13.2146, -7.0589, -15.9424, -6.3833],
            [-12.0626, -9.4649, -13.3549, -15.9424, -15.9424, -6.402]]  # fmt: skip
    got = fbank[[0, 50, 100, 197]][:, [0, 10, 40, 80, 100, 124]]
    torch.testing.assert_close(got, torch.tensor(want), atol=2e-3, rtol=0)
    assert abs(fbank.mean().item() + 11.0936) < 1e-3 and abs(fbank.std().item() - 6.0577) < 1e-3
    # Silence sits at Kaldi's floor, log(float32 eps).
    silence = kaldi_fbank(torch.zeros(1000), banks)
    torch.testing.assert_close(
        silence, torch.full((4, 128), float(np.log(np.finfo(np.float32).eps)))
    )
    # A tone peaks in the filter whose centre (HTK mel scale, as librosa computes it) is nearest.
    import librosa

    edges = np.linspace(librosa.hz_to_mel(20.0, htk=True), librosa.hz_to_mel(8000.0, htk=True), 130)
    centres = librosa.mel_to_hz(edges[1:-1], htk=True)
    for hz in (250.0, 1000.0, 3000.0):
        tone = torch.from_numpy(np.sin(2 * np.pi * hz * np.arange(8000) / 16000).astype(np.float32))
        assert kaldi_fbank(tone, banks).mean(0).argmax().item() == np.abs(centres - hz).argmin()


def test_audio_clips_and_tokens_are_the_releases(tiny) -> None:
    # The release's clip bounds (ConstantClipsPerVideoSampler(2, 3) via get_clip_timepoints).
    assert clip_bounds(8000) == [(0, 32000)] * 3
    assert clip_bounds(59200) == [(0, 32000), (13600, 45600), (27200, 59200)]
    assert clip_bounds(160003) == [(0, 32000), (64001, 96001), (128002, 160002)]
    clips = audio_clips(_signal(59200), mel_banks())
    assert clips.shape == (3, 1, 128, 204)
    # 198 frames fill 2 s; the 6 padded ones hold (0 - mean) / std of the release's -4.268, 9.138.
    torch.testing.assert_close(clips[..., 198:], torch.full((3, 1, 128, 6), 4.268 / 9.138))
    # The release subtracts each clip's mean in place from the shared waveform, so frames of a
    # later clip that straddle an earlier clip's end see a step (its data.py's values).
    clips = audio_clips(_signal(59200) + np.float32(0.2), mel_banks())
    want = [[0.1016, 0.2335, -1.0744, -0.8113], [-0.1719, 0.0628, -0.4488, -0.4506],
            [-0.073, 0.1415, -1.2776, -1.2776], [0.003, 0.2177, -1.2776, -1.2776]]  # fmt: skip
    torch.testing.assert_close(clips[1, 0, ::32, 113:117], torch.tensor(want), atol=2e-3, rtol=0)
    # The release's SimpleTokenizer's ids: start, BPE, end, zeros; 76 tokens then end at most.
    tokens = tiny[0].processor.batch("text", ["A dog barks.", "naïve café &amp; 東京 2024",
                                              "word " * 90])  # fmt: skip
    assert tokens.shape == (3, 77)
    assert tokens[0, :8].tolist() == [49406, 320, 1929, 1040, 662, 269, 49407, 0]
    assert tokens[1, :12].tolist() == [49406, 1097, 35689, 563, 15304, 261, 48338, 21078, 361,
                                       273, 271, 273]  # fmt: skip
    assert int((tokens[1] > 0).sum()) == 14 and tokens[1, 13] == 49407
    assert tokens[2, 1:76].eq(2653).all() and tokens[2, 76] == 49407
