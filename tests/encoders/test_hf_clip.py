"""HFClipEncoder: a local transformers folder (SigLIP), embedded as transformers does, strictly."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, compose_config
from PIL import Image

from encoders import build_encoder, build_processor
from encoders.hf_clip import output_dims

TARGET = "encoders.hf_clip.HFClipEncoder"
TEXT = {"max_length": 16, "padding": "max_length"}  # the tiny model's 16 positions, padded full
CAPTIONS = ["a dog", "two cats asleep on a red sofa", "galaxies"]


def images(n: int = 3) -> list[Image.Image]:
    rng = np.random.default_rng(1)
    return [Image.fromarray(rng.integers(0, 255, (30 + 11 * i, 50, 3), dtype=np.uint8))
            for i in range(n)]  # fmt: skip


def tiny_siglip(folder: Path, seed: int = 0) -> Path:
    """A tiny random SiglipModel written by save_pretrained, with a SigLIP image processor (32 px)
    and a CLIP BPE tokenizer (SigLIP's own needs sentencepiece; any tokenizer serves the test)."""
    from transformers import SiglipConfig, SiglipImageProcessorPil, SiglipModel

    from encoders.eva_clip import clip_bpe_tokenizer

    layers = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2)
    config = SiglipConfig(
        text_config=dict(vocab_size=49408, max_position_embeddings=16, **layers),
        vision_config=dict(image_size=32, patch_size=8, **layers),
    )
    torch.manual_seed(seed)
    SiglipModel(config).save_pretrained(folder)
    SiglipImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(folder)
    clip_bpe_tokenizer(16).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def siglip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_siglip(tmp_path_factory.mktemp("siglip") / "tiny-siglip")


def cfg(folder: Path, **extra) -> dict:
    return {"_target_": TARGET, "checkpoint": str(folder), **TEXT, **extra}


def test_embeds_as_transformers_does(siglip: Path, tmp_path: Path) -> None:
    from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

    encoder = build_encoder(cfg(siglip), {"image": 32, "text": 32})
    ours = encoder.encode({"image": images(), "text": CAPTIONS})
    # transformers' own path, as the release embeds SigLIP: AutoModel, processor, tokenizer.
    model = AutoModel.from_pretrained(siglip).eval()
    pixels = AutoImageProcessor.from_pretrained(siglip, backend="pil")(
        images=images(), return_tensors="pt"
    )["pixel_values"]
    ids = AutoTokenizer.from_pretrained(siglip)(
        CAPTIONS, padding="max_length", max_length=16, truncation=True, return_tensors="pt"
    )["input_ids"]
    with torch.no_grad():
        ref_image = model.get_image_features(pixel_values=pixels).pooler_output
        ref_text = model.get_text_features(input_ids=ids).pooler_output
    norm = torch.nn.functional.normalize
    torch.testing.assert_close(ours["image"], norm(ref_image, dim=-1))
    torch.testing.assert_close(ours["text"], norm(ref_text, dim=-1))
    assert ours["image"].shape == (3, 32)
    # The same weights saved as shards with an index load alike, and pretrained_state_dict()
    # (what ZeRO-3 streams in) covers exactly the module's keys.
    sharded = tmp_path / "sharded"
    shutil.copytree(siglip, sharded)
    (sharded / "model.safetensors").unlink()
    model.save_pretrained(sharded, max_shard_size="1MB")
    assert (sharded / "model.safetensors.index.json").is_file()
    again = build_encoder(cfg(sharded), {"image": 32, "text": 32})
    torch.testing.assert_close(again.encode({"image": images()})["image"], ours["image"])
    state = again.pretrained_state_dict()
    assert set(state) == set(again.state_dict())
    torch.testing.assert_close(state["model.logit_bias"], again.model.logit_bias.detach())


def test_text_settings_are_config_keys(siglip: Path) -> None:
    processor = build_processor(cfg(siglip), {"text": 32})
    assert list(processor.batch("text", CAPTIONS)) == ["input_ids"]  # SigLIP trained unmasked
    assert processor.batch("text", CAPTIONS)["input_ids"].shape == (3, 16)
    masked = build_processor(cfg(siglip, attention_mask=True, padding="longest"), {"text": 32})
    tokens = masked.batch("text", CAPTIONS)
    assert set(tokens) == {"input_ids", "attention_mask"} and tokens["input_ids"].shape[1] < 16
    with pytest.raises(ValueError, match="encoder.max_length 40: the text model has 16"):
        build_processor(cfg(siglip, max_length=40), {"text": 32})


def _rewrite(folder: Path, out: Path, change) -> Path:
    from safetensors.torch import load_file, save_file

    shutil.copytree(folder, out)
    state = load_file(str(out / "model.safetensors"))
    change(state)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def test_strict_loading_names_the_key_and_file(siglip: Path, tmp_path: Path) -> None:
    dims = {"image": 32, "text": 32}
    gone = "text_model.final_layer_norm.bias"
    missing = _rewrite(siglip, tmp_path / "missing", lambda s: s.pop(gone))
    with pytest.raises(ValueError, match=f"model.safetensors: does not fit .*missing key '{gone}'"):
        build_encoder(cfg(missing), dims)
    extra = _rewrite(siglip, tmp_path / "extra", lambda s: s.update(bogus=torch.zeros(2)))
    with pytest.raises(ValueError, match="unexpected key 'bogus'"):
        build_encoder(cfg(extra), dims)
    key = "text_model.head.weight"
    shaped = _rewrite(siglip, tmp_path / "shaped", lambda s: s.update({key: torch.zeros(32, 8)}))
    with pytest.raises(ValueError, match=f"'{key}' has shape \\(32, 8\\) in the checkpoint, "
                                         "\\(32, 32\\) in the model"):  # fmt: skip
        build_encoder(cfg(shaped), dims)
    # ZeRO-3's path (architecture from config.json, then the folder's tensors) is as strict.
    empty = build_encoder(cfg(shaped), dims, load_weights=False)
    with pytest.raises(ValueError, match=f"shaped/model.safetensors: .*'{key}' has shape"):
        empty.pretrained_state_dict()


def test_bad_folders_and_inputs_get_clear_errors(siglip: Path, tmp_path: Path) -> None:
    dims = {"image": 32, "text": 32}
    with pytest.raises(FileNotFoundError, match="encoder.checkpoint .*nowhere: no such folder"):
        build_encoder(cfg(tmp_path / "nowhere"), dims)
    bare = tmp_path / "bare"
    shutil.copytree(siglip, bare)
    (bare / "preprocessor_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="encoder.checkpoint .*bare: expected a folder"):
        build_processor(cfg(bare), dims)
    with pytest.raises(FileNotFoundError, match="encoder.tokenizer .*nope: expected a folder"):
        build_processor(cfg(siglip, tokenizer=str(tmp_path / "nope")), dims)
    noweights = tmp_path / "noweights"
    shutil.copytree(siglip, noweights)
    (noweights / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="noweights: no weights; expected one of"):
        build_encoder(cfg(noweights), dims)
    remote = tmp_path / "remote"
    shutil.copytree(siglip, remote)
    config = json.loads((remote / "config.json").read_text())
    config["auto_map"] = {"AutoModel": "modeling_x.X"}
    (remote / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="set encoder.trust_remote_code: true"):
        build_encoder(cfg(remote, trust_remote_code=False), dims)
    with pytest.raises(
        ValueError, match="embeds \\{'image': 32, 'text': 32\\}, but the space says"
    ):
        build_encoder(cfg(siglip), {"image": 1152})
    encoder = build_encoder(cfg(siglip), dims)
    with pytest.raises(ValueError, match="does not embed 'audio'"):
        encoder({"audio": torch.zeros(1, 10)})
    with pytest.raises(ValueError, match="encoder.precision 'fp8'"):
        build_encoder(cfg(siglip, precision="fp8"), dims)
    with pytest.raises(TypeError, match="unexpected keyword argument 'checkpont'"):
        build_encoder({"_target_": TARGET, "checkpont": str(siglip)}, dims)


# The two SigLIP spaces' official transformers configs (google/siglip-so400m-patch14-384,
# google/siglip-large-patch16-384: their config.json), and what SiglipModel builds from them.
OFFICIAL = {
    "siglip": dict(width=1152, mlp=4304, layers=27, patch=14, keys=888, params=877_960_498),
    "siglip_large": dict(width=1024, mlp=4096, layers=24, patch=16, keys=792, params=652_478_466),
}


@pytest.mark.parametrize("space", sorted(OFFICIAL))
def test_full_size_siglip_on_meta_matches_the_space(space: str, tmp_path: Path) -> None:
    from transformers import AutoConfig, AutoModel, SiglipConfig

    o = OFFICIAL[space]
    tower = dict(hidden_size=o["width"], intermediate_size=o["mlp"],
                 num_hidden_layers=o["layers"], num_attention_heads=16)  # fmt: skip
    SiglipConfig(
        text_config=tower, vision_config=dict(image_size=384, patch_size=o["patch"], **tower)
    ).save_pretrained(tmp_path)
    config = AutoConfig.from_pretrained(tmp_path)
    with torch.device("meta"):
        model = AutoModel.from_config(config)
    state = model.state_dict()
    grid = (384 // o["patch"]) ** 2
    assert tuple(state["vision_model.embeddings.position_embedding.weight"].shape) == (
        grid, o["width"])  # fmt: skip
    assert tuple(state["text_model.embeddings.token_embedding.weight"].shape) == (32000, o["width"])
    assert tuple(state["text_model.embeddings.position_embedding.weight"].shape) == (64, o["width"])
    assert f"vision_model.encoder.layers.{o['layers'] - 1}.mlp.fc2.weight" in state
    assert len(state) == o["keys"] and sum(v.numel() for v in state.values()) == o["params"]
    space_cfg = compose_config([f"space={space}"]).space
    assert output_dims(config) == dict(space_cfg.dims)
    assert space_cfg.encoder._target_ == TARGET
    assert space_cfg.encoder.max_length == 64  # SigLIP's text positions, padded to the full 64


ZERO_INIT = """
import os, sys, torch, deepspeed, torch.distributed as dist
sys.path.insert(0, {repo!r})
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29516", RANK="0", WORLD_SIZE="1",
                  LOCAL_RANK="0")
from encoders.hf_clip import HFClipEncoder
from lightning_modules.stages.extract import load_gathered
dist.init_process_group("gloo")
dims, kwargs = {{"image": 32, "text": 32}}, dict(checkpoint={folder!r}, max_length=16)
# As trainer=deepspeed_infer runs it: bf16 partitions, the encoder built with precision fp32.
config = {{"zero_optimization": {{"stage": 3, "stage3_param_persistence_threshold": 0}},
          "train_batch_size": 1, "bf16": {{"enabled": True}}}}
with deepspeed.zero.Init(config_dict_or_path=config):
    enc = HFClipEncoder(dims, load_weights=False, **kwargs)
assert all(p.numel() == 0 and hasattr(p, "ds_shape") for p in enc.parameters())  # partitioned
assert {{p.dtype for p in enc.parameters()}} == {{torch.bfloat16}}
load_gathered(enc, enc.pretrained_state_dict())
engine, *_ = deepspeed.initialize(model=enc, config=config)
engine.eval()
x, ids = torch.randn(2, 3, 32, 32), {{"input_ids": torch.randint(0, 49408, (2, 16))}}
with torch.no_grad():
    got = engine({{"image": x, "text": ids}})
    want = HFClipEncoder(dims, precision="bf16", **kwargs)({{"image": x, "text": ids}})
for m in dims:
    torch.testing.assert_close(got[m], want[m])
print("ZERO3 OK")
"""


@pytest.mark.slow
def test_builds_inside_deepspeed_zero_init(siglip: Path, tmp_path: Path) -> None:
    """deepspeed.zero.Init on a CPU (gloo, one rank): the architecture from config.json alone,
    partitioned, the folder's tensors gathered in, then a ZeRO-3 engine's forward equals a plain
    load's."""
    pytest.importorskip("deepspeed")
    script = tmp_path / "zero3.py"
    script.write_text(ZERO_INIT.format(repo=str(REPO), folder=str(siglip)))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu"}
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env,
                         timeout=300, cwd=tmp_path)  # fmt: skip
    assert "ZERO3 OK" in out.stdout, out.stdout[-2000:] + out.stderr[-4000:]
