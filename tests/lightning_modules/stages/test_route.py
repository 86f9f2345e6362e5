"""Route stage, omni model and the pipeline: router math, L_dec, end-to-end runs, the claims."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import configured
from safetensors.torch import load_file

from datamodules.artifacts import CacheError, file_sha256
from datamodules.projected import PROJECTED
from encoders.modalities import DIRECTIONS, MODALITIES, PROVENANCES
from lightning_modules.omni.export import load_omni
from lightning_modules.omni.layers import Router
from lightning_modules.omni.layout import OmniLayout
from lightning_modules.omni.losses import alignment_loss, decoupling_loss, info_nce
from lightning_modules.omni.model import FixedWeights, OmniModel, specialty_labels
from lightning_modules.stages.route import RouteModule
from train import train

REPO = Path(__file__).resolve().parents[3]
# The small variant's spaces (clap, imagebind, uni3d) are the small world's.
SMALL_VARIANT = ("variant=small",)


def test_router_shapes_and_layout() -> None:
    router = Router(48, 5)
    out = router(torch.randn(16, 48))
    assert out.shape == (16, 5)  # logits: OmniModel applies the sigmoid
    assert [type(router.router[i]).__name__ for i in (0, 1, 3, 4, 6)] == [
        "Linear", "BatchNorm1d", "Linear", "BatchNorm1d", "Linear",
    ]  # fmt: skip


def _route(layout: dict, **kw) -> RouteModule:
    """A RouteModule with conf/model/route.yaml's values, where every router trains unless
    `train` says otherwise."""
    return RouteModule(**configured("route", **{"layout": layout, "train": None, **kw}))


def _meta(groups: dict, dim: int = 24, kind: str = "routed") -> dict:
    spaces = {
        g: dict(dims={m: 12 for m in groups}, out_dim=dim, hidden_dim=16, experts=["mix"],
                renormalize=False)
        for gs in groups.values() for g in gs
    }  # fmt: skip
    return dict(
        kind=kind,
        anchor="anchor",
        groups=groups,
        predictors={m: ["pred"] for m in groups},
        predictor_dims={m: 12 for m in groups},
        scales={m: 1.0 for m in groups} | {"text": 10.0},
        specialty={"a": "audio", "b": "image", "c": "point", "d": "image"},
        spaces=spaces,
    )


def _route_batch(groups: dict, n: int = 32, dim: int = 24) -> dict:
    emb = {g + PROJECTED: {m: F.normalize(torch.randn(n, dim), dim=-1) for m in groups}
           for g in {g for gs in groups.values() for g in gs}}  # fmt: skip
    emb["pred"] = {m: torch.randn(n, 12) for m in groups}
    return {"emb": emb, "provenance": torch.randint(0, 3, (n,)), "start": torch.zeros(n)}


GROUPS = {"audio": ["a", "b"], "image": ["b", "c", "d"], "text": ["a", "b", "c", "d"]}


def test_route_weights_sum_to_one_and_embeddings_are_normalised() -> None:
    model = _route(_meta(GROUPS)).eval()
    batch = _route_batch(GROUPS)
    out = model(batch["emb"])
    for m, gs in GROUPS.items():
        assert out.weights[m].shape == (32, len(gs))
        torch.testing.assert_close(out.weights[m].sum(1), torch.ones(32))
        torch.testing.assert_close(out.embeddings[m].norm(dim=1), torch.ones(32))
    # Text uses softmax(10 * sigmoid): sharper than the others' softmax(sigmoid).
    sig = torch.sigmoid(out.logits["text"])
    torch.testing.assert_close(out.weights["text"], torch.softmax(10 * sig, -1))
    torch.testing.assert_close(
        out.weights["audio"], torch.softmax(torch.sigmoid(out.logits["audio"]), -1)
    )


def test_precomputed_projections_equal_projecting_in_forward() -> None:
    """The route stage's cached projections and OmniModel's own projectors give one result."""
    torch.manual_seed(0)
    model = OmniModel(OmniLayout.from_dict(_meta(GROUPS))).eval()
    raw = {g: {m: torch.randn(8, 12) for m in GROUPS} for g in "abcd"} | {
        "pred": {m: torch.randn(8, 12) for m in GROUPS}
    }
    with torch.no_grad():
        direct = model(raw)
        projected = {m: torch.stack([model.projectors[g](raw[g][m]) for g in gs], 1)
                     for m, gs in GROUPS.items()}  # fmt: skip
        cached = model({"pred": raw["pred"]}, projected=projected)
    for m in GROUPS:
        assert torch.equal(direct[m], cached[m])


def test_projectors_stay_frozen_in_train_mode() -> None:
    model = _route(_meta(GROUPS)).train()
    assert not any(p.requires_grad for p in model.model.projectors.parameters())
    assert not any(m.training for m in model.model.projectors.modules())
    assert all(p.requires_grad for p in model.model.routers.parameters())
    params = {id(p) for g in model.configure_optimizers().param_groups for p in g["params"]}
    assert params == {id(p) for p in model.model.routers.parameters()}
    assert model.configure_optimizers().param_groups[0]["lr"] == 1e-3
    fixed = _route(_meta(GROUPS, kind="fixed"))  # the same step: validation gave 10x no edge
    assert fixed.configure_optimizers().param_groups[0]["lr"] == 1e-3


def test_fixed_weights_do_not_depend_on_the_input() -> None:
    fixed = FixedWeights(12, 3)
    with torch.no_grad():
        fixed.theta.copy_(torch.tensor([0.5, -1.0, 2.0]))
    a, b = fixed(torch.randn(4, 12)), fixed(torch.randn(4, 12))
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a[0], torch.tensor([0.5, -1.0, 2.0]))


def test_decoupling_loss_matches_the_formula() -> None:
    provenance = torch.tensor([0, 1, 2, 1])  # point, audio, image, audio captions
    specialties = ["audio", "image", "point", "image"]
    labels = specialty_labels(provenance, specialties)
    expected = torch.tensor(
        [[0, 0, 1, 0], [1, 0, 0, 0], [0, 1, 0, 1], [1, 0, 0, 0]], dtype=torch.float32
    )
    assert PROVENANCES == ("point", "audio", "image")
    torch.testing.assert_close(labels, expected)
    logits = torch.randn(4, 4) * 3  # the router's pre-sigmoid outputs
    p = torch.sigmoid(logits)
    # Eq. 6: summed over the groups, averaged over the batch
    direct = -(labels * p.log() + (1 - labels) * (1 - p).log()).sum(1).mean()
    torch.testing.assert_close(decoupling_loss(logits, labels), direct)


def test_alignment_loss_is_the_mean_over_all_pairs() -> None:
    emb = {m: F.normalize(torch.randn(8, 16), dim=-1) for m in ("point", "audio", "image", "text")}
    names = sorted(emb)
    pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1 :]]
    assert len(pairs) == 6
    direct = sum(info_nce(emb[a], emb[b], 0.05) for a, b in pairs) / 6
    torch.testing.assert_close(alignment_loss(emb, 0.05), direct)


def _results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())["methods"]


def _mean_r1(method: dict, text_only: bool = False) -> float:
    r1 = [v for k, v in method["retrieval"].items()
          if k.endswith("/R@1") and (not text_only or "text" in k)]  # fmt: skip
    return sum(r1) / len(r1)


def test_pipeline_end_to_end_on_a_small_world(small_world: Path, compose_cfg, tmp_path: Path,
                                              caplog) -> None:  # fmt: skip
    # On pseudo tuples from the pair stage; no oracle row (experiment=full's).
    overrides = [*SMALL_VARIANT, "bind.epochs=1", "bind.hidden_dim=64", "bind.batch_size=256",
                 "route.epochs=2", "route.batch_size=256", "pipeline.oracle=false"]  # fmt: skip
    # routed_l0 (experiment=full's) added, to check below that each route starts from the seed.
    cfg = compose_cfg("stage=pipeline", *overrides,
                      "+pipeline.routes.routed_l0={loss.lambda_dec:0.0}")  # fmt: skip
    score = train(cfg)
    methods = _results(Path(cfg.run_dir))
    assert {"average", "routed", "fixed", "routed_l0"} <= set(methods)
    assert {"bound:clap", "bound:imagebind", "bound:uni3d"} <= set(methods)
    for name in ("average", "routed", "fixed"):
        keys = methods[name]["retrieval"]
        assert {f"{q}_to_{t}/R@{k}" for q, t in DIRECTIONS for k in (1, 5)} <= set(keys)
        assert all(0.0 <= v <= 1.0 for v in keys.values())
    assert score == pytest.approx(methods["routed"]["summary"]["mean_R@1"])
    assert (tmp_path / "runs" / "route-small-routed" / "router_weights.png").stat().st_size > 0
    model = load_omni(tmp_path / "omni" / "small" / "routed")
    assert model.layout.groups["text"] == ["clap", "imagebind", "uni3d"]

    assert methods["routed"]["tuples"]["pairs"] == "pseudo"

    # Every pipeline stage starts from the seed: routed_l0, trained after routed and fixed, equals
    # the same route run on its own (same process, shapes and seed: bitwise).
    alone = tmp_path / "omni" / "alone"
    train(compose_cfg("stage=route", *overrides, "loss.lambda_dec=0", "run_name=route-alone",
                      f"route.export_dir={alone}"))  # fmt: skip
    piped = load_file(tmp_path / "omni" / "small" / "routed_l0" / "omni.safetensors")
    assert piped.keys() == load_file(alone / "omni.safetensors").keys()
    assert all(torch.equal(piped[k], v) for k, v in load_file(alone / "omni.safetensors").items())

    # A rerun skips every finished stage; a changed route setting reruns only the routes (from
    # here on only `routed`, to keep the test short).
    overrides += ["~pipeline.routes.fixed"]
    export = tmp_path / "omni" / "small" / "routed" / "omni.safetensors"
    bound = tmp_path / "bound" / "clap" / "projectors.safetensors"
    before = (export.stat().st_mtime_ns, bound.stat().st_mtime_ns)
    train(compose_cfg("stage=pipeline", *overrides))
    assert (export.stat().st_mtime_ns, bound.stat().st_mtime_ns) == before
    train(compose_cfg("stage=pipeline", *overrides, "route.lr=0.002"))
    assert export.stat().st_mtime_ns != before[0]
    assert bound.stat().st_mtime_ns == before[1]
    # The routes read the spaces' configs (L_dec's labels): editing one reruns them, not clap's.
    routed = export.stat().st_mtime_ns
    specialty = "variant.spaces.imagebind.text_specialty=audio"
    train(compose_cfg("stage=pipeline", *overrides, "route.lr=0.002", specialty))
    assert export.stat().st_mtime_ns != routed
    assert bound.stat().st_mtime_ns == before[1]
    assert load_omni(export.parent).layout.specialty["imagebind"] == "audio"


def test_route_names_the_bind_command_for_an_unbound_space(small_world: Path, compose_cfg) -> None:
    cfg = compose_cfg("stage=route", *SMALL_VARIANT)
    with pytest.raises(CacheError, match=r"never bound.*stage=bind space=clap"):
        train(cfg)


@pytest.mark.slow
def test_default_command_runs_the_method_on_pseudo_tuples(tmp_path: Path) -> None:
    """`python train.py` (the README's quick main job) end to end on the default world.

    It trains `routed` and `fixed` on the pair stage's pseudo tuples and says so; the other
    recipes and the oracle row are experiment=full's. The paper's claims are measured over seeds
    with confidence intervals by bench/claims.py, not asserted from one run here.
    """
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}  # see test_ops._env
    env |= {"HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    cmd = [sys.executable, str(REPO / "train.py"), f"paths.output_dir={tmp_path}",
           "trainer.enable_progress_bar=false"]  # fmt: skip
    # The whole quick main job: minutes alone, far more on a shared machine.
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=2700)
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "runs" / "pipeline-base"
    methods = _results(run)
    assert {"average", "fixed", "routed"} <= set(methods)
    assert not {"routed_paper", "routed_l0", "routed_oracle"} & set(methods)
    assert methods["routed"]["tuples"]["pairs"] == "pseudo"
    table = tmp_path / "pairs" / "tuples.npz"
    assert methods["routed"]["tuples"]["tuples_sha256"] == file_sha256(table)
    assert "Trained on **pseudo** tuples" in (run / "results.md").read_text()
    # Far above chance (1 in 1,000 test items) for every trained method.
    assert all(_mean_r1(methods[m]) > 0.2 for m in ("average", "fixed", "routed"))


def test_route_steps_under_bf16_mixed_on_cpu() -> None:
    """trainer.precision=bf16-mixed: L_align and L_dec run under autocast (issue: BCE on
    probabilities is refused by CUDA autocast; the logits form is not)."""
    import lightning as L
    from torch.utils.data import DataLoader

    torch.manual_seed(0)
    model = _route(_meta(GROUPS))
    before = {k: v.clone() for k, v in model.model.routers.state_dict().items()}
    trainer = L.Trainer(accelerator="cpu", precision="bf16-mixed", fast_dev_run=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False)  # fmt: skip
    trainer.fit(model, DataLoader([_route_batch(GROUPS)] * 2, batch_size=None))
    after = model.model.routers.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before if k.endswith("weight"))
    assert all(torch.isfinite(v).all() for v in after.values() if v.is_floating_point())


def test_routers_start_uniform_and_held_routers_stay_uniform() -> None:
    """Zero last layer: every router starts at uniform weights; route.train=[text] trains only
    the text router, so audio and image weights stay exactly uniform through training."""
    import lightning as L
    from torch.utils.data import DataLoader

    torch.manual_seed(0)
    model = _route(_meta(GROUPS), train=["text"])
    batch = _route_batch(GROUPS)
    with torch.no_grad():
        start = model.eval()(batch["emb"])
    for m, gs in GROUPS.items():
        torch.testing.assert_close(start.weights[m], torch.full((32, len(gs)), 1 / len(gs)))
    params = {id(p) for g in model.configure_optimizers().param_groups for p in g["params"]}
    assert params == {id(p) for p in model.model.routers["text"].parameters()}
    trainer = L.Trainer(accelerator="cpu", max_steps=5, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(model.train(), DataLoader([batch] * 5, batch_size=None))
    with torch.no_grad():
        after = model.eval()(batch["emb"])
    for m in ("audio", "image"):
        assert torch.equal(after.weights[m], start.weights[m])
    assert not torch.allclose(after.weights["text"], start.weights["text"])
    with pytest.raises(ValueError, match=r"route.train=\['video'\]"):
        _route(_meta(GROUPS), train=["video"])


def test_link_retrievers_follow_each_start_s_tree() -> None:
    """The spaces on the tree path between two items of a tuple, per start modality."""
    from datamodules.tuples import link_retrievers
    from lightning_modules.pairing.plan import parse_routes, plan_paths

    routes = parse_routes({"audio_text": "wav", "image_text": "anchor", "audio_image": "ib",
                           "point_image": "u3d", "point_text": "u3d"})  # fmt: skip
    plan = plan_paths(["audio", "text"], routes, {"audio_point": ["image"]})
    meta = {"paths": plan, "routes": {f"{a}_{b}": s for (a, b), s in routes.items()}}
    links = link_retrievers("t.npz", meta)
    # Text start: text->audio (wav), text->image (anchor), text->point (u3d).
    assert links["text"]["audio_text"] == ["wav"]
    assert links["text"]["audio_image"] == ["anchor", "wav"]  # via the caption
    # Audio start: audio->image (ib), then image->point (u3d): point-image is one hop.
    assert links["audio"]["point_image"] == ["u3d"]
    assert links["audio"]["point_audio"] == ["ib", "u3d"]
    with pytest.raises(CacheError, match=r"t.npz: the tuple table records no retrieval plan"):
        link_retrievers("t.npz", {"source": "oracle"})


def test_leave_retriever_out_drops_the_retrievers_groups_per_pair_term() -> None:
    """Each pair term sees the weights without its link's retrievers, renormalised; a row that
    would lose every group keeps them; with no retrievers it equals the paper's L_align."""
    from lightning_modules.omni.model import combine, leave_out

    w = torch.tensor([[0.2, 0.3, 0.5], [0.5, 0.5, 0.0]])
    drop = torch.tensor([[True, False, False], [True, True, False]])
    torch.testing.assert_close(leave_out(w, drop), torch.tensor([[0, 0.375, 0.625], [0.5, 0.5, 0]]))
    groups = {"audio": ["a", "b"], "text": ["a", "b", "c", "d"]}
    links = {"text": {"audio_text": ["a"]}}  # text-started tuples: audio retrieved by `a`
    torch.manual_seed(0)
    model = _route(
        _meta(groups), align_mode="leave_retriever_out", links=links, gather=False
    )
    batch = _route_batch(groups)
    batch["start"] = torch.tensor(
        [MODALITIES.index("text")] * 16 + [MODALITIES.index("audio")] * 16
    )
    out = model(batch["emb"])
    projected = model.projections(batch["emb"])
    text_rows = batch["start"] == MODALITIES.index("text")
    drops = {m: torch.tensor([g == "a" for g in groups[m]]).expand(32, -1) & text_rows[:, None]
             for m in groups}  # fmt: skip
    e = {m: combine(projected[m], leave_out(out.weights[m], drops[m])) for m in groups}
    expected = info_nce(e["audio"], e["text"], 0.03)
    torch.testing.assert_close(model.alignment(out, projected, batch), expected)
    plain = _route(_meta(groups), align_mode="leave_retriever_out", links={"text": {}},
                        gather=False)  # fmt: skip
    plain.load_state_dict(model.state_dict())
    torch.testing.assert_close(plain.alignment(out, projected, batch),
                               alignment_loss(out.embeddings, 0.03))  # fmt: skip


def test_routing_learns_and_no_export_validates_below_its_start(
    small_world: Path, compose_cfg, tmp_path: Path
) -> None:
    """On the first world with oracle tuples, expertise depends on the input (text provenance,
    image sub-type), so a router that learns must beat uniform averaging on test mean R@1.

    The margin is 2 points of mean R@1 (DESIGN.md's first world at full size: routed 85.2 vs
    average 79.5); float ties that differ between CPUs move single queries, far less than that.
    `frozen` (lr 0) exports its uniform start: the same check fails for it, as it would for a
    broken router. `wrecked` (lr 50) validates below its start every epoch, so it exports the
    start: its test scores are average's.
    """
    paper = "route.train:null,route.scales.text:10.0,route.specialty:{}"  # every router learns
    routes = (f"+pipeline.routes={{routed:{{{paper}}},frozen:{{route.lr:0.0}},"
              f"wrecked:{{{paper},route.lr:50.0}}}}")  # fmt: skip
    cfg = compose_cfg("stage=pipeline", *SMALL_VARIANT, "bind.pairs=oracle", "bind.epochs=2",
                      "bind.hidden_dim=64", "bind.batch_size=256", "route.epochs=3",
                      "route.batch_size=256", "~pipeline.routes", routes)  # fmt: skip
    train(cfg)
    methods = _results(Path(cfg.run_dir))
    mean = {
        m: methods[m]["summary"]["mean_R@1"] for m in ("average", "routed", "frozen", "wrecked")
    }
    assert mean["routed"] - mean["average"] > 0.02, mean
    assert mean["frozen"] == mean["average"], mean  # the test above would fail for it
    assert mean["wrecked"] == mean["average"], mean
    for name in ("routed", "frozen", "wrecked"):
        meta = load_omni(tmp_path / "omni" / "small" / name).layout.to_dict()
        assert meta["best_val_mean_R1"] >= meta["start_val_mean_R1"], (name, meta)


def test_route_checkpoints_hold_the_routers_and_the_bound_spaces_digests(tmp_path: Path) -> None:
    """With `bound` directories, checkpoints drop the frozen projectors (read back from the
    bound spaces, whose digests they record) and reload to the same model; a rebound space is
    refused by name."""
    import lightning as L
    from torch.utils.data import DataLoader

    from lightning_modules.omni.export import BOUND_WEIGHTS, save_bound_space
    from lightning_modules.omni.layers import ProjectorMixture

    meta = _meta(GROUPS)

    def bind(name: str) -> str:
        s = meta["spaces"][name]
        mixture = ProjectorMixture(12, s["out_dim"], s["hidden_dim"], len(s["experts"]))
        return str(save_bound_space(mixture, tmp_path / "bound" / name, {"space": name, **s}))

    torch.manual_seed(0)
    bound = {name: bind(name) for name in meta["spaces"]}
    model = _route(meta, bound=bound)
    full = _route(meta)  # no bound directories: the whole state is kept
    for module in (model, full):
        trainer = L.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_progress_bar=False,
                            enable_checkpointing=False, enable_model_summary=False,
                            default_root_dir=tmp_path)  # fmt: skip
        trainer.fit(module.train(), DataLoader([_route_batch(GROUPS)] * 3, batch_size=None))
        trainer.save_checkpoint(tmp_path / f"{id(module)}.ckpt")
    ckpt = torch.load(tmp_path / f"{id(model)}.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["state_dict"] and not any(
        k.startswith("model.projectors.") for k in ckpt["state_dict"]
    )
    assert {k for k in ckpt["state_dict"] if k.startswith("model.routers.")} == {
        f"model.{k}" for k in model.model.state_dict() if k.startswith("routers.")
    }
    assert ckpt["bound_sha256"] == {
        n: file_sha256(Path(d) / BOUND_WEIGHTS) for n, d in bound.items()
    }
    whole = torch.load(tmp_path / f"{id(full)}.ckpt", map_location="cpu", weights_only=False)
    assert any(k.startswith("model.projectors.") for k in whole["state_dict"])

    again = RouteModule.load_from_checkpoint(tmp_path / f"{id(model)}.ckpt", map_location="cpu")
    state = model.state_dict()
    assert again.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in again.state_dict().items())

    bind("b")  # rebound: new weights, and a new digest in its record
    with pytest.raises(CacheError, match=r"bound/b/projectors.safetensors: the bound space 'b'"):
        RouteModule.load_from_checkpoint(tmp_path / f"{id(model)}.ckpt", map_location="cpu")
