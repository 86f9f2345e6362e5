"""EVA-CLIP-18B: the release's names and shapes at full size, strict loading of its folder format,
the transformers backend, the ZeRO-3 build, and the tiny open_clip EVA02 smoke space."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, compose_config
from omegaconf import OmegaConf
from PIL import Image

from encoders import build_encoder
from encoders.eva_clip import PRESETS, EvaClip18BEncoder, EvaClipModel, hf_config

# BAAI/EVA-CLIP-18B's pytorch_model.bin.index.json: 1051 keys over 8 fp32 shards, total_size
# 73,301,928,960 bytes = 18,325,482,240 parameters. Names and shapes from its modeling_evaclip.py
# and config.json (vision 5120 x 48, MLP 25600, RMSNorm; text 1280 x 32; projections to 1536).
NON_BLOCK = {
    "text_model.embeddings.token_embedding.weight": (49408, 1280),
    "text_model.embeddings.position_embedding.weight": (77, 1280),
    "text_model.final_layer_norm.weight": (1280,),
    "text_model.final_layer_norm.bias": (1280,),
    "text_projection.weight": (1536, 1280),
    "vision_model.embeddings.class_embedding": (5120,),
    "vision_model.embeddings.patch_embedding.weight": (5120, 3, 14, 14),
    "vision_model.embeddings.patch_embedding.bias": (5120,),
    "vision_model.embeddings.position_embedding.weight": (257, 5120),
    "vision_model.post_layernorm.weight": (5120,),
    "visual_projection.weight": (1536, 5120),
}
VISION_BLOCK_0 = {  # no q/k/v biases, RMSNorm weights only
    "self_attn.q_proj.weight": (5120, 5120),
    "self_attn.k_proj.weight": (5120, 5120),
    "self_attn.v_proj.weight": (5120, 5120),
    "self_attn.out_proj.weight": (5120, 5120),
    "self_attn.out_proj.bias": (5120,),
    "layer_norm1.weight": (5120,),
    "layer_norm2.weight": (5120,),
    "mlp.fc1.weight": (25600, 5120),
    "mlp.fc1.bias": (25600,),
    "mlp.fc2.weight": (5120, 25600),
    "mlp.fc2.bias": (5120,),
}
TEXT_BLOCK_0 = {
    **{f"self_attn.{p}_proj.weight": (1280, 1280) for p in ("q", "k", "v", "out")},
    **{f"self_attn.{p}_proj.bias": (1280,) for p in ("q", "k", "v", "out")},
    **{f"layer_norm{i}.{p}": (1280,) for i in (1, 2) for p in ("weight", "bias")},
    "mlp.fc1.weight": (5120, 1280),
    "mlp.fc1.bias": (5120,),
    "mlp.fc2.weight": (1280, 5120),
    "mlp.fc2.bias": (1280,),
}
BLOCKS = {"vision_model": (48, VISION_BLOCK_0), "text_model": (32, TEXT_BLOCK_0)}
TOTAL = 18_325_482_240
INDEX_BYTES = 73_301_928_960  # fp32


def test_full_size_meta_build_lists_the_release_names_and_shapes() -> None:
    with torch.device("meta"):
        model = EvaClipModel(PRESETS["18B"])
    state = model.state_dict()
    assert all(t.is_meta for t in state.values())  # built without allocating its 73 GB
    expected = dict(NON_BLOCK)
    for tower, (count, block) in BLOCKS.items():
        for i in range(count):
            expected.update({f"{tower}.encoder.layers.{i}.{k}": v for k, v in block.items()})
    assert len(state) == len(expected) == 1051
    assert {k: tuple(v.shape) for k, v in state.items()} == expected
    assert sum(v.numel() for v in state.values()) == TOTAL == INDEX_BYTES // 4
    assert not list(model.buffers())  # no position_ids buffers, no logit_scale: as the index


def save_release_format(model: torch.nn.Module, folder: Path, shards: int = 2) -> None:
    """The release's folder layout: config.json, pytorch_model-0000k-of-0000n.bin shards listed by
    pytorch_model.bin.index.json, and the CLIP tokenizer's vocab.json and merges.txt."""
    from encoders.eva_clip import clip_bpe_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    keys = list(model.state_dict())
    weight_map = {}
    for k in range(shards):
        name = f"pytorch_model-{k + 1:05d}-of-{shards:05d}.bin"
        part = {key: model.state_dict()[key].clone() for key in keys[k::shards]}
        torch.save(part, folder / name)
        weight_map.update(dict.fromkeys(part, name))
    size = sum(v.numel() * v.element_size() for v in model.state_dict().values())
    index = {"metadata": {"total_size": size}, "weight_map": weight_map}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    (folder / "config.json").write_text(json.dumps(hf_config(model.cfg)))
    from open_clip.tokenizer import default_bpe

    (folder / "vocab.json").write_text(json.dumps(clip_bpe_tokenizer().get_vocab()))
    merges = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tokenizer_config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77}
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    encoder = EvaClip18BEncoder({"image": 32, "text": 32}, size="tiny", seed=0)
    folder = tmp_path_factory.mktemp("eva") / "EVA-CLIP-tiny"
    save_release_format(encoder.model, folder)
    return encoder, folder


def images(n: int = 3) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (40 + 9 * i, 70, 3), dtype=np.uint8))
            for i in range(n)]  # fmt: skip


CAPTIONS = ["a dog", "two cats asleep on a red sofa", "galaxies"]


def test_tiny_round_trip_through_the_release_folder_format(tiny, tmp_path: Path) -> None:
    encoder, folder = tiny
    ours = encoder.encode({"image": images(), "text": CAPTIONS})
    assert ours["image"].shape == (3, 32) and ours["text"].shape == (3, 32)
    torch.testing.assert_close(ours["image"].norm(dim=1), torch.ones(3))
    loaded = build_encoder({"_target_": "encoders.eva_clip.EvaClip18BEncoder",
                            "checkpoint": str(folder), "size": "tiny", "seed": 123},
                           {"image": 32, "text": 32})  # fmt: skip
    again = loaded.encode({"image": images(), "text": CAPTIONS})
    torch.testing.assert_close(again["image"], ours["image"])
    torch.testing.assert_close(again["text"], ours["text"])
    # The same weights as one safetensors file (a converted folder) load alike.
    from safetensors.torch import save_file

    single = tmp_path / "single"
    single.mkdir()
    save_file(encoder.model.state_dict(), str(single / "model.safetensors"))
    other = EvaClip18BEncoder({"image": 32}, checkpoint=str(single), size="tiny", seed=5)
    torch.testing.assert_close(other.encode({"image": images()})["image"], ours["image"])
    # The folder's tokenizer is CLIP's: the release's ids, cut at 42 tokens with end of text kept.
    ids = loaded.processor.batch("text", ["word " * 100, "a dog"])["input_ids"]
    assert ids.shape == (2, 42) and ids[0, 0] == 49406 and ids[0, -1] == 49407
    assert ids[1, :4].tolist() == [49406, 320, 1929, 49407]


def _corrupt(folder: Path, out: Path, change) -> Path:
    import shutil

    shutil.copytree(folder, out)
    name = "pytorch_model-00001-of-00002.bin"
    part = torch.load(out / name, weights_only=True)
    change(part)
    torch.save(part, out / name)
    index = json.loads((out / "pytorch_model.bin.index.json").read_text())
    index["weight_map"] = {k: name for k in part} | {
        k: v for k, v in index["weight_map"].items() if v != name
    }
    (out / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    return out


def test_strict_loading_names_the_key_and_file(tiny, tmp_path: Path) -> None:
    _, folder = tiny
    key = "vision_model.encoder.layers.0.mlp.fc1.weight"
    shard = "pytorch_model-00001-of-00002.bin"
    part = torch.load(folder / shard, weights_only=True)
    first = next(iter(part))

    def load(path: Path) -> None:
        EvaClip18BEncoder({"image": 32}, checkpoint=str(path), size="tiny")

    missing = _corrupt(folder, tmp_path / "missing", lambda p: p.pop(first))
    with pytest.raises(ValueError, match=f"missing key '{first}'"):
        load(missing)
    extra = _corrupt(folder, tmp_path / "extra", lambda p: p.update(bogus=torch.zeros(2)))
    with pytest.raises(ValueError, match=f"{shard}: does not fit .* unexpected key 'bogus'"):
        load(extra)

    def reshape(p: dict) -> None:
        p[key] = torch.zeros(7, 64)

    shaped = _corrupt(folder, tmp_path / "reshaped", reshape)
    with pytest.raises(ValueError, match=f"'{key}' has shape \\(7, 64\\) in the checkpoint, "
                                         "\\(160, 64\\) in the model"):  # fmt: skip
        load(shaped)
    # A config.json that describes another architecture is refused before any weight is read;
    # its norm epsilons, which no weight shape shows, are taken from it.
    config = json.loads((folder / "config.json").read_text())
    config["vision_config"]["num_attention_heads"] = 4
    (shaped / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        ValueError, match="vision_config.num_attention_heads is 4, but encoder.size"
    ):
        load(shaped)
    config["vision_config"].update(num_attention_heads=2, layer_norm_eps=1e-5)
    config["text_config"].update(layer_norm_eps=1e-6, hidden_act="quick_gelu")
    refined = _corrupt(folder, tmp_path / "eps", lambda p: None)
    (refined / "config.json").write_text(json.dumps(config))
    model = EvaClip18BEncoder({"image": 32}, checkpoint=str(refined), size="tiny").model
    assert model.vision_model.post_layernorm.eps == 1e-5  # the preset's are 1e-6 and 1e-5
    assert model.text_model.encoder.layers[0].layer_norm1.eps == 1e-6
    assert model.cfg.text.act == "quick_gelu" and model.cfg.vision.act == "gelu"
    config["vision_config"]["hidden_act"] = "relu"
    (refined / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="vision_config.hidden_act 'relu'"):
        load(refined)
    with pytest.raises(FileNotFoundError, match="encoder.checkpoint .*nope: no such folder"):
        load(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no weights; expected one of"):
        load(empty)


def test_bad_inputs_and_configs_get_clear_errors(tiny) -> None:
    encoder, _ = tiny
    with pytest.raises(ValueError, match="images of shape \\(batch, 3, 56, 56\\)"):
        encoder({"image": torch.zeros(1, 3, 224, 224)})
    with pytest.raises(ValueError, match="token ids of shape \\(batch, <= 77\\)"):
        encoder({"text": {"input_ids": torch.ones(1, 80, dtype=torch.long)}})
    with pytest.raises(ValueError, match="does not embed 'audio'"):
        encoder({"audio": torch.zeros(1, 10)})
    with pytest.raises(ValueError, match="embed_dim 1536, but the space says \\{'image': 1024\\}"):
        EvaClip18BEncoder({"image": 1024}, size="18B", load_weights=False)
    with pytest.raises(ValueError, match="encoder.size 'huge'"):
        EvaClip18BEncoder({"image": 32}, size="huge")
    with pytest.raises(ValueError, match="encoder.backend 'jax'"):
        EvaClip18BEncoder({"image": 32}, size="tiny", backend="jax")
    with pytest.raises(ValueError, match="backend transformers loads encoder.checkpoint"):
        EvaClip18BEncoder({"image": 32}, size="tiny", backend="transformers")
    with pytest.raises(ValueError, match="not \\['audio'\\]"):
        EvaClip18BEncoder({"audio": 32}, size="tiny")


def test_every_parameter_owner_runs_its_forward(tiny) -> None:
    """ZeRO-3 gathers a module's own parameters only in that module's forward: embedding must
    call every module that owns one, never read a child's weight from outside."""
    encoder, _ = tiny
    owners = {name for name, m in encoder.model.named_modules()
              if next(m.parameters(recurse=False), None) is not None}  # fmt: skip
    ran: set[str] = set()
    handles = [m.register_forward_pre_hook(lambda mod, args, n=name: ran.add(n))
               for name, m in encoder.model.named_modules()]  # fmt: skip
    try:
        encoder.encode({"image": images(1), "text": CAPTIONS[:1]})
    finally:
        for h in handles:
            h.remove()
    assert owners and owners <= ran, sorted(owners - ran)


def test_zero3_path_builds_empty_then_loads_the_folder(tiny) -> None:
    """configure_model under ZeRO-3 (on CPU its gathers are no-ops): load_weights=False, then rank
    0's pretrained_state_dict() streamed in, strictly keyed."""
    from lightning_modules.stages.extract import ExtractModule

    encoder, folder = tiny
    enc_cfg = {"_target_": "encoders.eva_clip.EvaClip18BEncoder", "checkpoint": str(folder),
               "size": "tiny", "precision": "bf16", "seed": 9}  # fmt: skip

    class Trainer:
        strategy, is_global_zero = type("S", (), {"zero_stage_3": True})(), True

    module = ExtractModule(enc_cfg, {"image": 32, "text": 32})
    module._trainer = Trainer()
    module.configure_model()  # fp32 under ZeRO-3: DeepSpeed's bf16 config casts the partitions
    x = torch.randn(2, 3, 56, 56)
    torch.testing.assert_close(
        module.encoder({"image": x})["image"], encoder({"image": x})["image"]
    )
    state = module.encoder.pretrained_state_dict()
    assert set(state) == set(module.encoder.state_dict())


ZERO_INIT = """
import os, sys, torch, deepspeed, torch.distributed as dist
sys.path.insert(0, {repo!r})
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29517", RANK="0", WORLD_SIZE="1",
                  LOCAL_RANK="0")
from encoders.eva_clip import EvaClip18BEncoder
from lightning_modules.stages.extract import load_gathered
dist.init_process_group("gloo")
dims, kwargs = {{"image": 32, "text": 32}}, dict(checkpoint={folder!r}, size="tiny")
# As trainer=deepspeed_infer runs it: bf16 partitions, the encoder built with precision fp32.
config = {{"zero_optimization": {{"stage": 3, "stage3_param_persistence_threshold": 0}},
          "train_batch_size": 1, "bf16": {{"enabled": True}}}}
with deepspeed.zero.Init(config_dict_or_path=config):
    enc = EvaClip18BEncoder(dims, load_weights=False, **kwargs)
assert all(p.numel() == 0 and hasattr(p, "ds_shape") for p in enc.parameters())  # partitioned
assert {{p.dtype for p in enc.parameters()}} == {{torch.bfloat16}}
load_gathered(enc, enc.pretrained_state_dict())
engine, *_ = deepspeed.initialize(model=enc, config=config)
engine.eval()
x = torch.randn(2, 3, 56, 56)
ids = {{"input_ids": torch.tensor([[49406, 320, 1929, 49407], [49406, 320, 49407, 49407]])}}
with torch.no_grad():
    got = engine({{"image": x, "text": ids}})
    want = EvaClip18BEncoder(dims, precision="bf16", **kwargs)({{"image": x, "text": ids}})
assert all(p.numel() == 0 for p in enc.parameters())  # still partitioned after the forward
for m in dims:
    torch.testing.assert_close(got[m], want[m])
print("ZERO3 OK")
"""


@pytest.mark.slow
def test_builds_inside_deepspeed_zero_init(tiny, tmp_path: Path) -> None:
    """deepspeed.zero.Init on a CPU (gloo, one rank): built partitioned from config alone, the
    folder's tensors gathered in, then a ZeRO-3 engine's forward equals a plain load's."""
    pytest.importorskip("deepspeed")
    _, folder = tiny
    script = tmp_path / "zero3.py"
    script.write_text(ZERO_INIT.format(repo=str(REPO), folder=str(folder)))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu"}
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env,
                         timeout=300, cwd=tmp_path)  # fmt: skip
    assert "ZERO3 OK" in out.stdout, out.stdout[-2000:] + out.stderr[-4000:]


# A stand-in for the release folder's remote code (configuration_/modeling_evaclip.py): written
# here independently of EvaClipModel, in the release's style (explicit scaled attention, additive
# causal mask), reading the same parameter names, so the transformers backend is exercised and
# the two implementations are checked against each other.
REMOTE_CONFIG = """
from transformers import PretrainedConfig


class TinyEvaConfig(PretrainedConfig):
    model_type = "tiny_evaclip"

    def __init__(self, vision_config=None, text_config=None, projection_dim=32, **kwargs):
        self.vision_config, self.text_config = vision_config or {}, text_config or {}
        self.projection_dim = projection_dim
        super().__init__(**kwargs)
"""
REMOTE_MODEL = """
import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from .configuration_tinyeva import TinyEvaConfig


class RMS(nn.Module):
    def __init__(self, w, eps):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(w)), eps

    def forward(self, x):
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)


def norm(c):
    w, eps = c["hidden_size"], c["layer_norm_eps"]
    return RMS(w, eps) if c["use_rms_norm"] else nn.LayerNorm(w, eps=eps)


class Attn(nn.Module):
    def __init__(self, c):
        super().__init__()
        w, b = c["hidden_size"], c["q_bias"]
        self.h = c["num_attention_heads"]
        self.q_proj, self.k_proj = nn.Linear(w, w, bias=b), nn.Linear(w, w, bias=b)
        self.v_proj, self.out_proj = nn.Linear(w, w, bias=b), nn.Linear(w, w)

    def forward(self, x, mask):
        b, n, w = x.shape
        split = lambda y: y.view(b, n, self.h, -1).transpose(1, 2)
        q = split(self.q_proj(x)) * (w // self.h) ** -0.5
        a = (q @ split(self.k_proj(x)).transpose(-1, -2) + mask).softmax(-1)
        return self.out_proj((a @ split(self.v_proj(x))).transpose(1, 2).reshape(b, n, w))


class MLP(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.fc1 = nn.Linear(c["hidden_size"], c["intermediate_size"])
        self.fc2 = nn.Linear(c["intermediate_size"], c["hidden_size"])

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Layer(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.post = c["post_layernorm"]
        self.self_attn, self.layer_norm1 = Attn(c), norm(c)
        self.mlp, self.layer_norm2 = MLP(c), norm(c)

    def forward(self, x, mask):
        if self.post:
            x = x + self.layer_norm1(self.self_attn(x, mask))
            return x + self.layer_norm2(self.mlp(x))
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class Stack(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.layers = nn.ModuleList(Layer(c) for _ in range(c["num_hidden_layers"]))


class VisionEmb(nn.Module):
    def __init__(self, c):
        super().__init__()
        w, p = c["hidden_size"], c["patch_size"]
        self.class_embedding = nn.Parameter(torch.zeros(w))
        self.patch_embedding = nn.Conv2d(3, w, p, stride=p)
        self.position_embedding = nn.Embedding((c["image_size"] // p) ** 2 + 1, w)


class Vision(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.embeddings, self.encoder, self.post_layernorm = VisionEmb(c), Stack(c), norm(c)

    def forward(self, pixels):
        e = self.embeddings
        x = e.patch_embedding(pixels).flatten(2).transpose(1, 2)
        x = torch.cat([e.class_embedding.expand(len(x), 1, -1), x], 1)
        x = x + e.position_embedding.weight
        for layer in self.encoder.layers:
            x = layer(x, 0.0)
        return self.post_layernorm(x[:, 0])


class TextEmb(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.token_embedding = nn.Embedding(c["vocab_size"], c["hidden_size"])
        self.position_embedding = nn.Embedding(c["max_position_embeddings"], c["hidden_size"])


class Text(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.embeddings, self.encoder, self.final_layer_norm = TextEmb(c), Stack(c), norm(c)

    def forward(self, ids):
        n = ids.shape[1]
        x = self.embeddings.token_embedding(ids) + self.embeddings.position_embedding.weight[:n]
        mask = torch.full((n, n), float("-inf")).triu(1)
        for layer in self.encoder.layers:
            x = layer(x, mask)
        x = self.final_layer_norm(x)
        return x[torch.arange(len(x)), ids.argmax(-1)]


class TinyEvaModel(PreTrainedModel):
    config_class = TinyEvaConfig
    base_model_prefix = "tiny_evaclip"

    def __init__(self, config):
        super().__init__(config)
        v, t, d = config.vision_config, config.text_config, config.projection_dim
        self.text_model, self.vision_model = Text(t), Vision(v)
        self.visual_projection = nn.Linear(v["hidden_size"], d, bias=False)
        self.text_projection = nn.Linear(t["hidden_size"], d, bias=False)
        self.post_init()

    def _init_weights(self, module):
        pass

    def encode_image(self, pixel_values):
        return self.visual_projection(self.vision_model(pixel_values))

    def encode_text(self, input_ids):
        return self.text_projection(self.text_model(input_ids))
"""


def test_transformers_backend_loads_the_folder_as_the_release_does(tiny, tmp_path: Path) -> None:
    import shutil

    encoder, folder = tiny
    remote = tmp_path / "EVA-CLIP-remote"
    shutil.copytree(folder, remote)
    (remote / "configuration_tinyeva.py").write_text(textwrap.dedent(REMOTE_CONFIG))
    (remote / "modeling_tinyeva.py").write_text(textwrap.dedent(REMOTE_MODEL))
    config = json.loads((remote / "config.json").read_text())
    config.update(model_type="tiny_evaclip", architectures=["TinyEvaModel"], auto_map={
        "AutoConfig": "configuration_tinyeva.TinyEvaConfig",
        "AutoModel": "modeling_tinyeva.TinyEvaModel",
    })  # fmt: skip
    (remote / "config.json").write_text(json.dumps(config))
    kwargs = dict(checkpoint=str(remote), size="tiny")
    hf = EvaClip18BEncoder({"image": 32, "text": 32}, backend="transformers", **kwargs)
    assert type(hf.model).__name__ == "TinyEvaModel"
    theirs = hf.encode({"image": images(), "text": CAPTIONS})
    ours = encoder.encode({"image": images(), "text": CAPTIONS})
    torch.testing.assert_close(theirs["image"], ours["image"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(theirs["text"], ours["text"], atol=1e-5, rtol=1e-4)
    assert set(hf.pretrained_state_dict()) == set(hf.state_dict())
    # Strict through transformers' loading report, too.
    key = "vision_model.post_layernorm.weight"
    name = json.loads((remote / "pytorch_model.bin.index.json").read_text())["weight_map"][key]
    part = torch.load(remote / name, weights_only=True)
    part[key] = torch.ones(3)
    torch.save(part, remote / name)
    with pytest.raises(
        ValueError,
        match=f"{name}: does not fit transformers TinyEvaModel: key '{key}' has shape \\(3,\\)",
    ):
        EvaClip18BEncoder({"image": 32}, backend="transformers", **kwargs)


def test_tiny_eva02_e_space_builds_offline_and_embeds_fast() -> None:
    """The smoke space: open_clip's EVA02-E-14-plus config, timm's tiny EVA02 vision tower."""
    cfg = compose_config(["space=tiny_eva02_e"])
    real = compose_config(["space=eva02_e"])
    assert OmegaConf.to_container(cfg.space.world) == OmegaConf.to_container(real.space.world)
    assert cfg.space.encoder.model == real.space.encoder.model == "EVA02-E-14-plus"
    encoder = build_encoder(OmegaConf.to_container(cfg.space.encoder), dict(cfg.space.dims))
    trunk = encoder.model.visual.trunk
    assert type(trunk).__module__ == "timm.models.eva" and trunk.embed_dim == 192
    start = time.perf_counter()
    out = encoder.encode({"image": images(1), "text": CAPTIONS[:1]})
    assert time.perf_counter() - start < 1.0
    assert out["image"].shape == out["text"].shape == (1, 64)
    torch.testing.assert_close(out["text"].norm(dim=1), torch.ones(1))
