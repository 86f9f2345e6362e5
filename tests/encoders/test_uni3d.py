"""Uni3D's point encoder: the release's checkpoint layout loads strictly (and nothing else does),
Uni3D-g's full-size layout has the official names and shapes, grouping follows the release's
CUDA ops, and the tiny encoder embeds raw clouds of every format."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import compose_config
from omegaconf import OmegaConf

from datamodules.cache import EmbeddingCache, cache_dir
from datamodules.items import list_items
from datamodules.synthetic.demo_raw import ensure_demo_raw, write_ply
from encoders import build_encoder, build_processor
from encoders.readers import LoadSettings, RawDataError, load_points
from encoders.uni3d import Uni3DEncoder, farthest_points, group, knn

W, E = 1408, 1024  # Uni3D-g: eva_giant_patch14_560's width, EVA02-E-14-plus's dim
# ckpt['module'] of the release's Uni3D-g (models/uni3d.py Uni3D, models/point_encoder.py
# PointcloudEncoder and Encoder, timm==0.9 eva_giant_patch14_560 with its 1000-class head and
# image-side parameters) with the release's arguments (scripts/inference.sh: --pc-feat-dim 1408
# --pc-encoder-dim 512 --embed-dim 1024), every key outside the transformer blocks:
OFFICIAL_G = {
    "logit_scale": (),
    "point_encoder.cls_token": (1, 1, W),
    "point_encoder.cls_pos": (1, 1, W),
    "point_encoder.encoder.first_conv.0.weight": (128, 6, 1),
    "point_encoder.encoder.first_conv.0.bias": (128,),
    "point_encoder.encoder.first_conv.1.weight": (128,),
    "point_encoder.encoder.first_conv.1.bias": (128,),
    "point_encoder.encoder.first_conv.1.running_mean": (128,),
    "point_encoder.encoder.first_conv.1.running_var": (128,),
    "point_encoder.encoder.first_conv.1.num_batches_tracked": (),
    "point_encoder.encoder.first_conv.3.weight": (256, 128, 1),
    "point_encoder.encoder.first_conv.3.bias": (256,),
    "point_encoder.encoder.second_conv.0.weight": (512, 512, 1),
    "point_encoder.encoder.second_conv.0.bias": (512,),
    "point_encoder.encoder.second_conv.1.weight": (512,),
    "point_encoder.encoder.second_conv.1.bias": (512,),
    "point_encoder.encoder.second_conv.1.running_mean": (512,),
    "point_encoder.encoder.second_conv.1.running_var": (512,),
    "point_encoder.encoder.second_conv.1.num_batches_tracked": (),
    "point_encoder.encoder.second_conv.3.weight": (512, 512, 1),
    "point_encoder.encoder.second_conv.3.bias": (512,),
    "point_encoder.encoder2trans.weight": (W, 512),
    "point_encoder.encoder2trans.bias": (W,),
    "point_encoder.trans2embed.weight": (E, W),
    "point_encoder.trans2embed.bias": (E,),
    "point_encoder.pos_embed.0.weight": (128, 3),
    "point_encoder.pos_embed.0.bias": (128,),
    "point_encoder.pos_embed.2.weight": (W, 128),
    "point_encoder.pos_embed.2.bias": (W,),
    "point_encoder.visual.cls_token": (1, 1, W),
    "point_encoder.visual.pos_embed": (1, 1 + 40 * 40, W),  # 560 / 14 = 40 patches a side
    "point_encoder.visual.patch_embed.proj.weight": (W, 3, 14, 14),
    "point_encoder.visual.patch_embed.proj.bias": (W,),
    "point_encoder.visual.fc_norm.weight": (W,),
    "point_encoder.visual.fc_norm.bias": (W,),
    "point_encoder.visual.head.weight": (1000, W),
    "point_encoder.visual.head.bias": (1000,),
}
# ...and each of its 40 blocks' keys (EVA-01: fused qkv with q and v biases, GELU MLP 6144 wide).
OFFICIAL_G_BLOCK = {
    "norm1.weight": (W,),
    "norm1.bias": (W,),
    "attn.q_bias": (W,),
    "attn.v_bias": (W,),
    "attn.qkv.weight": (3 * W, W),
    "attn.proj.weight": (W, W),
    "attn.proj.bias": (W,),
    "norm2.weight": (W,),
    "norm2.bias": (W,),
    "mlp.fc1.weight": (6144, W),
    "mlp.fc1.bias": (6144,),
    "mlp.fc2.weight": (W, 6144),
    "mlp.fc2.bias": (W,),
}
OFFICIAL_G_DEPTH = 40
# timm's eva_giant_patch14_560 (head included) 1,014,447,464 + Uni3D's point side 2,910,593.
OFFICIAL_G_PARAMS = 1_017_358_057


@pytest.fixture(scope="module")
def tiny():
    """The tiny Uni3D point tower: the point part of space tiny_uni3d (encoders/composite.py)."""
    cfg = compose_config(["space=tiny_uni3d"])
    enc_cfg = OmegaConf.to_container(cfg.space.encoder, resolve=True)["parts"][0]["encoder"]
    dims = {"point": int(cfg.space.dims.point)}
    return build_encoder(enc_cfg, dims), enc_cfg, dims


@pytest.fixture(scope="module")
def clouds(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """20 clouds, 4 in each format: .ply ascii and binary, .npy array, release .npy dict, .npz;
    sizes from 200 to 600 points (the tiny encoder takes 256), half without colour."""
    d = tmp_path_factory.mktemp("clouds")
    rng = np.random.default_rng(0)
    paths = []
    for i in range(20):
        n = 200 + 20 * i
        xyz = rng.standard_normal((n, 3)) * rng.uniform(0.5, 2, 3) + rng.uniform(-1, 1, 3)
        pts = np.concatenate([xyz, rng.integers(0, 256, (n, 3))], 1) if i % 2 else xyz
        kind = i % 5
        p = d / f"c{i}.{'ply' if kind < 2 else 'npz' if kind == 4 else 'npy'}"
        if kind < 2:
            write_ply(p, pts.astype(np.float32), binary=kind == 1)
        elif kind == 2:
            np.save(p, pts)
        elif kind == 3:
            np.save(p, {"xyz": xyz.astype(np.float16), "rgb": pts[:, 3:] / 255} if i % 2
                    else {"xyz": xyz.astype(np.float16)})  # fmt: skip
        else:
            np.savez(p, xyz=xyz, **({"rgb": pts[:, 3:]} if i % 2 else {}))
        paths.append(str(p))
    return paths


def test_release_checkpoint_round_trip(tiny, clouds, tmp_path: Path) -> None:
    encoder, cfg, dims = tiny
    state = encoder.model.state_dict()
    assert {k.split(".")[0] for k in state} == {"logit_scale", "point_encoder"}
    expected = encoder.encode({"point": clouds[:6]})["point"]
    # The release's DeepSpeed model.pt: {'module': Uni3D's state dict} beside training state.
    ckpt = tmp_path / "model.pt"
    torch.save({"module": state, "global_steps": 10, "ds_version": "0.10.0", "epoch": 3,
                "param_shapes": [{k: v.shape for k, v in state.items()}]}, ckpt)  # fmt: skip
    loaded = build_encoder({**cfg, "seed": 7, "checkpoint": str(ckpt)}, dims)
    torch.testing.assert_close(loaded.encode({"point": clouds[:6]})["point"], expected)
    other = build_encoder({**cfg, "seed": 7}, dims)  # another random model: the test can fail
    assert not torch.allclose(other.encode({"point": clouds[:6]})["point"], expected)
    assert set(loaded.pretrained_state_dict()) == set(loaded.state_dict())  # ZeRO-3 loading
    assert loaded.model.point_encoder.visual.blocks[0].attn.k_bias.abs().sum() == 0
    # float16 weights under a 'module.' prefix (as saved from a DDP-wrapped model) load too.
    half = {f"module.{k}": v.half() if v.is_floating_point() else v for k, v in state.items()}
    torch.save({"module": half}, tmp_path / "half.pt")
    loaded = build_encoder({**cfg, "checkpoint": str(tmp_path / "half.pt")}, dims)
    for k, v in loaded.model.state_dict().items():
        torch.testing.assert_close(v, state[k].half().to(v.dtype) if v.is_floating_point() else v)


def test_checkpoints_that_do_not_fit_are_refused(tiny, tmp_path: Path) -> None:
    encoder, cfg, dims = tiny
    state = encoder.model.state_dict()
    bad = {
        "missing": {k: v for k, v in state.items() if k != "logit_scale"},
        "extra": {**state, "point_encoder.visual.rope.freq": torch.zeros(4)},
        "reshaped": {**state, "point_encoder.trans2embed.weight": torch.zeros(64, 16)},
    }
    messages = {
        "missing": "missing key 'logit_scale'",
        "extra": "unexpected key 'point_encoder.visual.rope.freq'",
        "reshaped": r"'point_encoder.trans2embed.weight' has shape \(64, 16\) in the checkpoint, "
        r"\(64, 32\) in the model",
    }
    for name, sd in bad.items():
        torch.save({"module": sd}, tmp_path / f"{name}.pt")
        with pytest.raises(ValueError, match=rf"{name}.pt: does not fit Uni3D: .*{messages[name]}"):
            build_encoder({**cfg, "checkpoint": str(tmp_path / f"{name}.pt")}, dims)
    torch.save({"state_dict": state}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match=r"other.pt: expected the release's \{'module'"):
        build_encoder({**cfg, "checkpoint": str(tmp_path / "other.pt")}, dims)
    with pytest.raises(FileNotFoundError, match="encoder.checkpoint .*nope.pt: no such file"):
        build_encoder({**cfg, "checkpoint": str(tmp_path / "nope.pt")}, dims)


def test_full_size_uni3d_g_has_the_official_layout() -> None:
    with torch.device("meta"):  # no memory: names and shapes only
        encoder = Uni3DEncoder({"point": 1024, "image": 1024, "text": 1024})  # the defaults
    shapes = {k: tuple(v.shape) for k, v in encoder.model.state_dict().items()}
    blocks = "point_encoder.visual.blocks."
    assert {k: s for k, s in shapes.items() if not k.startswith(blocks)} == OFFICIAL_G
    for i in range(OFFICIAL_G_DEPTH):
        block = {k.removeprefix(f"{blocks}{i}."): s for k, s in shapes.items()
                 if k.startswith(f"{blocks}{i}.")}  # fmt: skip
        assert block == OFFICIAL_G_BLOCK, f"block {i}"
    assert len(shapes) == len(OFFICIAL_G) + OFFICIAL_G_DEPTH * len(OFFICIAL_G_BLOCK)
    assert sum(p.numel() for p in encoder.parameters()) == OFFICIAL_G_PARAMS
    processor = build_processor({"_target_": "encoders.uni3d.Uni3DEncoder"}, {"point": 1024})
    assert (processor.num_points, processor.min_points) == (10000, 512)  # 512 patches of 64


def _reference_fps(xyz: np.ndarray, count: int) -> list[int]:
    """pointnet2_ops' furthest_point_sampling_kernel, one cloud, written as a plain loop."""
    temp, picked = np.full(len(xyz), 1e10), [0]
    for _ in range(1, count):
        best, besti = -1.0, 0
        for k, p in enumerate(xyz):
            if (p * p).sum() <= 1e-3:
                continue
            temp[k] = min(((p - xyz[picked[-1]]) ** 2).sum(), temp[k])
            if temp[k] > best:
                best, besti = temp[k], k
        picked.append(besti)
    return picked


def test_grouping_follows_the_release() -> None:
    rng = np.random.default_rng(3)
    xyz = rng.uniform(-1, 1, (2, 300, 3)).astype(np.float32)
    xyz[:, 5:40] *= 0.01  # a cluster at the origin, which the CUDA kernel never samples
    rgb = rng.uniform(0, 1, (2, 300, 3)).astype(np.float32)
    t = torch.from_numpy(xyz)
    idx = farthest_points(t, 24)
    for b in range(2):
        assert idx[b].tolist() == _reference_fps(xyz[b].astype(np.float64), 24)
    assert not set(idx.flatten().tolist()) & set(range(5, 40))
    centres = t[torch.arange(2)[:, None], idx]
    near = knn(t, centres, 8)
    dist = ((xyz[:, None] - centres.numpy()[:, :, None]) ** 2).sum(-1)  # (2, 24, 300)
    expected = np.sort(np.argsort(dist, -1)[..., :8], -1)
    np.testing.assert_array_equal(np.sort(near.numpy(), -1), expected)
    got_centres, patches = group(t, torch.from_numpy(rgb), 24, 8)
    torch.testing.assert_close(got_centres, centres)
    assert patches.shape == (2, 24, 8, 6)
    b, g, j = 1, 5, 3  # a patch point: xyz relative to its centre, then its own rgb
    i = near[b, g, j]
    torch.testing.assert_close(patches[b, g, j, :3], t[b, i] - centres[b, g])
    torch.testing.assert_close(patches[b, g, j, 3:], torch.from_numpy(rgb)[b, i])


def test_tiny_encoder_embeds_raw_clouds(tiny, clouds, tmp_path: Path) -> None:
    encoder, _, dims = tiny
    out = encoder.encode({"point": clouds})["point"]
    assert out.shape == (20, dims["point"]) and out.dtype == torch.float32
    torch.testing.assert_close(out.norm(dim=1), torch.ones(20))
    torch.testing.assert_close(encoder.encode({"point": clouds})["point"], out)  # seeded draws
    assert torch.pdist(out).min() > 0  # distinct clouds (random weights: close, not equal)
    # An array is prepared as its file is; a 256-point cloud is embedded as stored.
    pts = load_points(clouds[2], None)
    np.testing.assert_allclose(pts[:, :3].mean(0), 0, atol=1e-5)
    np.save(tmp_path / "exact.npy", pts[:256])
    by_file = encoder.encode({"point": [str(tmp_path / "exact.npy")]})["point"]
    by_array = encoder.encode({"point": [pts[:256]]})["point"]
    torch.testing.assert_close(by_file, by_array)
    direct = encoder(
        {"point": torch.from_numpy(load_points(str(tmp_path / "exact.npy"), 256))[None]}
    )
    torch.testing.assert_close(by_file, direct["point"])


def test_bad_inputs_get_clear_errors(tiny, tmp_path: Path) -> None:
    encoder, cfg, dims = tiny
    np.save(tmp_path / "nan.npy", np.full((300, 3), np.nan))
    np.save(tmp_path / "few.npy", np.random.default_rng(0).standard_normal((15, 3)))
    np.save(tmp_path / "grey.npy", np.random.default_rng(0).standard_normal((300, 3)))
    with pytest.raises(RawDataError, match="nan.npy: point cloud holds NaN or inf"):
        encoder.encode({"point": [str(tmp_path / "nan.npy")]})
    # 16 patches of 16 points need 16 points; from there, clouds are filled to npoints (256).
    with pytest.raises(RawDataError, match="few.npy: point cloud has 15 points, fewer than the 16"):
        encoder.encode({"point": [str(tmp_path / "few.npy")]})
    strict = build_encoder({**cfg, "missing_rgb": "raise"}, dims)
    with pytest.raises(RawDataError, match="grey.npy: point cloud has no colour"):
        strict.encode({"point": [str(tmp_path / "grey.npy")]})
    with pytest.raises(ValueError, match="its image tower is EVA02-E-14-plus's: embed image with"):
        encoder.encode({"image": [np.zeros((8, 8, 3), np.uint8)]})
    with pytest.raises(ValueError, match=r"clouds \(batch, n >= 16, 6\) .*got \(2, 256, 3\)"):
        encoder({"point": torch.zeros(2, 256, 3)})
    with pytest.raises(ValueError, match="embed_dim is 64, but the space's point dim is 1024"):
        build_encoder(cfg, {"point": 1024})
    with pytest.raises(ValueError, match="Uni3D embeds point"):
        build_encoder(cfg, {"audio": 64})
    with pytest.raises(ValueError, match="npoints=8 is below num_group=16"):
        build_encoder({**cfg, "npoints": 8}, dims)
    with pytest.raises(TypeError, match="unexpected keyword argument 'chekpoint'"):
        build_encoder({**cfg, "chekpoint": "x"}, dims)
    with pytest.raises(ValueError, match="encoder.model 'nosuch_model': not a timm model"):
        build_encoder({**cfg, "model": "nosuch_model"}, dims)


def test_extract_stage_embeds_the_demo_clouds(tiny, tmp_path: Path) -> None:
    """stage=extract space=tiny_uni3d on the raw demo's .npy and .ply clouds (DataLoader
    workers prepare them): the cached rows are Encoder.encode's embeddings of the same files."""
    from lightning_modules.stages.extract import run

    demo = ensure_demo_raw(tmp_path / "raw")
    cfg = compose_config(["stage=extract", "space=tiny_uni3d", "data=demo_raw", "trainer=cpu",
                          "logger=none", f"paths.output_dir={tmp_path}", f"data.source={demo}",
                          "extract.datasets=[pool]", "extract.modalities=[point]",
                          "extract.num_workers=1", "extract.batch_size=5"])  # fmt: skip
    run(cfg)
    cache = EmbeddingCache(cache_dir(cfg.data.root, "pool", "tiny_uni3d", "point"), verify=True)
    items = list_items("point", {"source": demo / "pool" / "points"})
    assert {Path(p).suffix for p in items.sources} == {".npy", ".ply"}
    assert cache.count == len(items.keys) and cache.manifest["errors"] == 0
    encoder = tiny[0]
    expected = encoder.encode({"point": items.sources}, LoadSettings(seed=int(cfg.data.seed)))
    np.testing.assert_allclose(cache.load(), expected["point"].numpy(), atol=2e-3)
