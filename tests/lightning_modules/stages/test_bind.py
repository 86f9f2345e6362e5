"""The bind stage: its loss, projectors, training step, the real entry point, export and errors."""

from __future__ import annotations

import csv
import json
import math
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import configured

from datamodules.artifacts import CacheError
from datamodules.embeddings import EmbeddingDataModule
from datamodules.tuples import load_tuples
from lightning_modules.omni.export import BOUND_META as EXPORT_META
from lightning_modules.omni.export import BOUND_WEIGHTS as EXPORT_WEIGHTS
from lightning_modules.omni.export import load_bound_space
from lightning_modules.omni.layers import Projector, ProjectorMixture
from lightning_modules.omni.losses import info_nce
from lightning_modules.stages.bind import (
    BindModule,
    expert_starts,
    export_bound_space,
    retrieval_sides,
)
from train import train

# 2 epochs of 15 steps: enough to bind, a few seconds on one core.
# Bind on the world's ground-truth tuples: these tests are about binding, not pairing.
BIND = ("stage=bind", "space=clap", "bind.pairs=oracle", "bind.hidden_dim=256", "bind.epochs=2",
        "bind.batch_size=128")  # fmt: skip
FREEBIND_ALL = ["mix", "A", "T", "V", "AT", "AV", "TV"]


def _unit(*shape: int, seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def _small_module(**kw) -> BindModule:
    """A BindModule of an audio-text space (dim 8) bound to an image-text anchor (dim 6)."""
    small = dict(space="src", anchor="anc", dims={"audio": 8, "text": 8},
                 anchor_dims={"image": 6, "text": 6}, experts="freebind",
                 hidden_dim=16)  # fmt: skip
    return BindModule(**configured("bind", **{**small, **kw}))


def _batch(start: torch.Tensor) -> dict:
    n = len(start)
    return {
        "emb": {
            "src": {"audio": _unit(n, 8, seed=1), "text": _unit(n, 8, seed=2)},
            "anc": {"image": _unit(n, 6, seed=3), "text": _unit(n, 6, seed=4)},
        },
        "start": start,
        "index": torch.arange(n),
    }


def _step(model: BindModule, batch: dict) -> torch.Tensor:
    with warnings.catch_warnings():  # self.log() outside a Trainer warns and does nothing
        warnings.simplefilter("ignore")
        return model.training_step(batch, 0)


# ---------------------------------------------------------------------------- loss and modules


def test_info_nce_matches_the_formula() -> None:
    a, b, t = _unit(6, 5, seed=0).double(), _unit(6, 5, seed=1).double(), 0.07
    s = (a @ b.T / t).tolist()  # plain floats: pytest.approx takes numbers, not tensors
    a_to_b = -sum(s[i][i] - math.log(sum(math.exp(s[i][j]) for j in range(6))) for i in range(6))
    b_to_a = -sum(s[i][i] - math.log(sum(math.exp(s[j][i]) for j in range(6))) for i in range(6))
    expected = 0.5 * (a_to_b + b_to_a) / 6
    assert info_nce(a, b, t).item() == pytest.approx(expected, rel=1e-10)
    # Aligned pairs at a low temperature cost almost nothing; shuffled ones a lot.
    assert info_nce(a, a, 0.01) < 1e-3 < 1 < info_nce(a, a.roll(1, 0), 0.01)


def test_projector_shapes_normalisation_and_layout() -> None:
    proj = Projector(12, out_dim=6, hidden_dim=16)
    out = proj(torch.randn(5, 12))
    assert out.shape == (5, 6)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(5))
    # The official release's key layout, so its checkpoints load key for key.
    assert {k.rsplit(".", 1)[0] for k in proj.state_dict()} == {"mlp.0", "mlp.1", "mlp.3", "mlp.4"}
    assert proj.eval()(torch.randn(1, 12)).shape == (1, 6)  # eval mode serves single rows

    x = torch.randn(7, 12)
    mix = ProjectorMixture(12, 6, 16, n_experts=3)
    mean = mix(x)
    torch.testing.assert_close(mean, torch.stack([e(x) for e in mix.experts]).mean(0))
    assert (mean.norm(dim=1) < 1).all()  # OmniBind: the mean is not re-normalised
    mix.renormalize = True
    torch.testing.assert_close(mix(x).norm(dim=1), torch.ones(7))


def test_expert_subsets() -> None:
    # FreeBind's seven subsets by starting modality, for every space (the release: 7 per space).
    assert expert_starts("freebind") == {
        "mix": [0, 1, 2, 3], "A": [1], "T": [3], "V": [2], "AT": [1, 3], "AV": [1, 2], "TV": [3, 2],
    }  # fmt: skip
    assert list(expert_starts("freebind")) == FREEBIND_ALL
    assert expert_starts(["mix", "TV"]) == {"mix": [0, 1, 2, 3], "TV": [3, 2]}
    with pytest.raises(ValueError, match=r"'AX' has unknown letters \['X'\]"):
        expert_starts(["AX"])
    assert retrieval_sides(["audio", "text"], ["image", "text"]) == [
        ("audio", "image"),
        ("audio", "text"),
        ("image", "text"),
    ]


def test_every_expert_receives_gradients() -> None:
    model = _small_module()
    loss = _step(model, _batch(torch.arange(16) % 4))  # every starting modality, 4 rows each
    loss.backward()
    assert torch.isfinite(loss)
    for name, expert in zip(model.starts, model.mixture.experts, strict=True):
        for key, p in expert.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, f"expert {name}: {key}"

    # An expert whose starting modalities are absent from the batch is left alone.
    model.zero_grad(set_to_none=True)
    _step(model, _batch(torch.ones(16, dtype=torch.long))).backward()  # audio starts only
    got = {
        n: e.mlp[0].weight.grad is not None
        for n, e in zip(model.starts, model.mixture.experts, strict=True)
    }
    want = {"mix": True, "A": True, "T": False, "V": False, "AT": True, "AV": True, "TV": False}
    assert got == want


def test_loss_of_one_expert_is_the_weighted_info_nce() -> None:
    experts = ["mix"]
    weights = {"audio_image": 0.0, "text_text": 3.0}  # the others default to 1
    model = _small_module(experts=experts, loss_weights=weights)
    batch = _batch(torch.arange(8) % 4)
    loss = _step(model, batch)
    src, anc, expert = batch["emb"]["src"], batch["emb"]["anc"], model.mixture.experts[0]
    za, zt = expert(src["audio"]), expert(src["text"])
    terms = info_nce(za, anc["text"]) + info_nce(zt, anc["image"]) + 3 * info_nce(zt, anc["text"])
    torch.testing.assert_close(loss, terms / 5)


# ---------------------------------------------------------------------------- export


def test_export_round_trip(tmp_path: Path) -> None:
    model = _small_module()
    _step(model, _batch(torch.arange(16) % 4))  # moves the BatchNorm running statistics
    model.eval()
    out = export_bound_space(model, tmp_path / "bound", note="unit")
    mixture, meta = load_bound_space(out)
    x = torch.randn(9, 8)
    torch.testing.assert_close(mixture(x), model.mixture(x), rtol=0, atol=0)
    assert not mixture.training
    assert meta["space"] == "src" and meta["anchor"] == "anc" and meta["note"] == "unit"
    assert meta["out_dim"] == 6 and meta["experts"] == FREEBIND_ALL


def _tamper_meta(directory: Path, **changes) -> None:
    path = directory / EXPORT_META
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize(
    ("tamper", "match"),
    [
        (lambda d: _tamper_meta(d, hidden_dim=32), f"{EXPORT_WEIGHTS}: does not match"),
        (lambda d: _tamper_meta(d, experts=["mix"]), f"{EXPORT_WEIGHTS}: does not match"),
        (lambda d: _tamper_meta(d, sha256="0" * 64), f"{EXPORT_WEIGHTS}: sha256 does not match"),
        (lambda d: (d / EXPORT_META).write_text("{"), f"{EXPORT_META}: not a valid bound-space"),
        (lambda d: _tamper_meta(d, dims={}), f"{EXPORT_META}: not a valid bound-space"),
        (lambda d: (d / EXPORT_META).unlink(), f"{EXPORT_META} missing"),
        (lambda d: (d / EXPORT_WEIGHTS).unlink(), f"{EXPORT_WEIGHTS}: does not match"),
        (lambda d: _flip_byte(d / EXPORT_WEIGHTS, -1), f"{EXPORT_WEIGHTS}: sha256 does not match"),
    ],
    ids=["hidden_dim", "experts", "sha256", "bad_json", "no_dims", "no_meta", "no_weights", "flip"],
)
def test_tampered_export_fails(tmp_path: Path, tamper, match: str) -> None:
    directory = export_bound_space(_small_module(), tmp_path / "bound")
    tamper(directory)
    with pytest.raises(CacheError, match=match):
        load_bound_space(directory)


def test_export_without_hash_still_checks_the_header(tmp_path: Path) -> None:
    # A bound space from before hashes were recorded: a garbled header still fails clearly.
    directory = export_bound_space(_small_module(), tmp_path / "bound")
    meta = json.loads((directory / EXPORT_META).read_text())
    meta.pop("sha256")
    (directory / EXPORT_META).write_text(json.dumps(meta))
    _flip_byte(directory / EXPORT_WEIGHTS, 3)
    with pytest.raises(CacheError, match=EXPORT_WEIGHTS):
        load_bound_space(directory)


def _flip_byte(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


# ---------------------------------------------------------------------------- the real entry point


def _validate(model: BindModule, datamodule: EmbeddingDataModule) -> dict[str, float]:
    trainer = L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    return trainer.validate(model, datamodule, verbose=False)[0]


def test_binding_beats_the_untrained_projector(small_world: Path, compose_cfg) -> None:
    cfg = compose_cfg(*BIND, "logger=csv")
    best = train(cfg)

    run_dir = Path(cfg.run_dir)
    with open(run_dir / "csv" / "metrics.csv") as f:
        logged = [float(r["val/mean_R@1"]) for r in csv.DictReader(f) if r.get("val/mean_R@1")]
    assert len(logged) == 2 and best == pytest.approx(max(logged))
    assert {p.name for p in (run_dir / "checkpoints").iterdir()} >= {"best.ckpt", "last.ckpt"}

    trained = BindModule.load_from_checkpoint(run_dir / "checkpoints" / "best.ckpt")
    hp = dict(trained.hparams)
    needs = [("clap", m) for m in hp["dims"]] + [("eva_clip_18b", m) for m in hp["anchor_dims"]]
    tuples = small_world / "tuples" / "oracle.npz"
    dm = EmbeddingDataModule(small_world, tuples, needs, {}, trained.val_pairs,
                             **configured("datamodule", batch_size=512))  # fmt: skip
    L.seed_everything(0)
    before, after = _validate(BindModule(**hp), dm), _validate(trained, dm)
    assert after["val/mean_R@1"] == pytest.approx(best, abs=1e-6)
    assert best > before["val/mean_R@1"] + 0.1, (best, before)
    # The untrained projector keeps CLAP's own audio-text alignment but links audio to the
    # anchor's images only by chance (1/300); binding creates that link.
    assert before["val/audio_to_image/R@1"] < 0.05 < 0.2 < after["val/audio_to_image/R@1"]

    # The export is the best checkpoint's projectors.
    mixture, meta = load_bound_space(cfg.bind.export_dir)
    x = torch.randn(4, 512)
    torch.testing.assert_close(mixture(x), trained.mixture.eval()(x), rtol=0, atol=0)
    assert meta["space"] == "clap" and meta["best_val_mean_R1"] == pytest.approx(best)


def test_a_space_sharing_no_modality_with_the_anchor_binds_through_its_tuples(
    small_world: Path, compose_cfg
) -> None:
    """clap with audio only, the anchor with image and text: the tuples' partners link them."""
    cfg = compose_cfg(*BIND, "bind.epochs=1", "~space.dims.text")
    assert 0.0 < train(cfg) <= 1.0
    meta = json.loads((Path(cfg.bind.export_dir) / "bound.json").read_text())
    assert meta["dims"] == {"audio": 512}
    with pytest.raises(ValueError, match="space 'eva_clip_18b' is the anchor"):
        train(compose_cfg(*BIND[:1], "space=eva_clip_18b"))


def test_missing_caches_name_the_space(small_world: Path, compose_cfg, tmp_path: Path) -> None:
    empty = tmp_path / "extracted"
    empty.mkdir()
    cfg = compose_cfg(
        *BIND,
        "data.kind=extracted",
        f"data.root={empty}",
        f"bind.pairs={small_world / 'tuples' / 'oracle.npz'}",
    )
    with pytest.raises(CacheError, match="no such cache directory") as e:
        train(cfg)
    assert str(empty / "pool" / "clap") in str(e.value)


@pytest.mark.parametrize("data", ["synthetic", "extracted"])
def test_config_dim_disagreeing_with_the_cache(small_world: Path, compose_cfg, data: str) -> None:
    dims = ("space.dims.audio=256", "space.dims.text=256")
    extracted = (
        "data.kind=extracted",
        f"data.root={small_world}",
        f"bind.pairs={small_world / 'tuples' / 'oracle.npz'}",
    )
    cfg = compose_cfg(*BIND, *dims, *(extracted if data == "extracted" else ()))
    with pytest.raises(CacheError, match="dim is 512, expected 256") as e:
        train(cfg)
    assert str(small_world / "pool" / "clap" / "audio") in str(e.value)


def test_without_paired_sets_it_validates_on_held_out_tuples(small_world: Path, compose_cfg,
                                                             caplog) -> None:  # fmt: skip
    """Real data has no paired val sets: a held-out share of the tuples validates instead."""
    cfg = compose_cfg(*BIND, "bind.epochs=1", "+datamodule.val_prefix=nosuch",
                      "datamodule.val_share=0.1")  # fmt: skip
    score = train(cfg)
    assert 0.0 < score <= 1.0
    meta = json.loads((Path(cfg.bind.export_dir) / "bound.json").read_text())
    assert meta["validation"] == "pseudo"
    assert set(meta["pseudo_validated"]) == {"audio_image", "audio_text", "image_text"}
    assert "pseudo-validated" in caplog.text

    dm = EmbeddingDataModule(small_world, small_world / "tuples" / "oracle.npz",
                             [("clap", "audio"), ("clap", "text")], {}, [("audio", "text")],
                             val_prefix="nosuch", **configured("datamodule", val_share=0.1,
                                                               seed=3, batch_size=512))  # fmt: skip
    dm.setup()
    held = dm.val_sets[0]
    table, _ = load_tuples(small_world / "tuples" / "oracle.npz")
    out = dm._held_out(len(table["start"]))
    keep = np.ones(len(table["start"]), bool)
    keep[out] = False
    # The held-out tuples validate (pairs are their own items) and are out of the training set.
    assert len(out) == 200 and len(held) == 200 and len(dm.train_set) == 1800
    assert torch.equal(held.rows["audio"], torch.from_numpy(table["audio"][out]))
    assert torch.equal(held.rows["text"], torch.from_numpy(table["text"][out]))
    assert torch.equal(dm.train_set.rows["audio"], torch.from_numpy(table["audio"][keep]))


def test_bind_steps_under_bf16_mixed_on_cpu(small_world: Path, compose_cfg) -> None:
    cfg = compose_cfg(*BIND, "trainer.precision=bf16-mixed", "++trainer.fast_dev_run=2")
    score = train(cfg)
    assert math.isfinite(score)
    mixture, _ = load_bound_space(cfg.bind.export_dir)
    assert all(torch.isfinite(p).all() for p in mixture.parameters())
