"""stage=convert: random state dicts in the official release's exact layout, converted strictly,
then compared with a plain reimplementation of the release's combination rule."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import compose_config

from datamodules.artifacts import CacheError
from lightning_modules.inference import OmniBind
from lightning_modules.omni.export import load_omni
from lightning_modules.stages.convert import convert_state_dict, load_checkpoint
from train import train

HIDDEN = 32  # the release's projectors are 2048 wide; the converter reads the width
OUT = 1536  # EVA-CLIP-18B
# The release's omni_utils.get_config, per variant: its encoder names in projector order, their
# dims, and its router input indices (Full's are broken in the release: it takes Large's).
RELEASE = {
    "base": dict(
        A=["WAVCAPS_PT", "WAVCAPS_FT_aud", "WAVCAPS_FT_clo"], V=["EVA_E14p"], P=["UNI3D_L"],
        dims=dict(AT=[1024] * 3, VT=[1024], PVT=[1024]),
        A_pred=0, V_pred=0, P_pred=0, T_pred=[0, 3, 4], eva18b=False,
    ),
    "large": dict(
        A=["CLAP_G", "CLAP_M", "WAVCAPS_PT", "WAVCAPS_FT_aud", "WAVCAPS_FT_clo"],
        V=["DFN_H14", "EVA_E14p", "SigLip_384", "SigLip_400M_384"],
        P=["UNI3D_L", "UNI3D_M", "UNI3D_S"],
        dims=dict(AT=[512, 512, 1024, 1024, 1024], VT=[1024, 1024, 1024, 1152], PVT=[1024] * 3),
        A_pred=2, V_pred=3, P_pred=0, T_pred=[2, 8, 9], eva18b=False,
    ),
}  # fmt: skip
RELEASE["full"] = dict(RELEASE["large"], eva18b=True)
# The release's encoders under our conf/space names.
OURS = {
    "WAVCAPS_PT": "wavcaps", "WAVCAPS_FT_aud": "wavcaps_audiocaps",
    "WAVCAPS_FT_clo": "wavcaps_clotho", "CLAP_G": "clap", "CLAP_M": "clap_music",
    "DFN_H14": "dfn5b", "EVA_E14p": "eva02_e", "SigLip_384": "siglip_large",
    "SigLip_400M_384": "siglip", "UNI3D_M": "uni3d_mnet", "UNI3D_S": "uni3d",
    "IB": "imagebind", "EVA_18B": "eva_clip_18b",
}  # fmt: skip


def ours(name: str, variant: str) -> str:
    if name == "UNI3D_L":
        return "uni3d" if variant == "base" else "uni3d_lvis"
    return OURS[name]


# ---------------------------------------------------------------------------- the release's layout


def _mlp(state: dict, prefix: str, dims: list[int], g: torch.Generator) -> None:
    """Random Linear/BN/ReLU/Linear/BN(/Tanh/Linear) weights under `prefix` (BN in eval: stats)."""
    layer = 0
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
        # Inputs are unit vectors, later layers see O(1) activations: keep every layer O(1), so
        # outputs depend on the input (not only on BN's shift) and router scores spread.
        scale = 1.0 if i == 0 else (3.0 if i == 2 else 1.0) / a**0.5
        state[f"{prefix}.{layer}.weight"] = scale * torch.randn(b, a, generator=g)
        state[f"{prefix}.{layer}.bias"] = 0.1 * torch.randn(b, generator=g)
        if i < len(dims) - 2 or prefix.endswith("mlps"):  # a BatchNorm follows
            bn = f"{prefix}.{layer + 1}"
            state[f"{bn}.weight"] = 0.5 + torch.rand(b, generator=g)
            state[f"{bn}.bias"] = 0.1 * torch.randn(b, generator=g)
            state[f"{bn}.running_mean"] = 0.1 * torch.randn(b, generator=g)
            state[f"{bn}.running_var"] = 0.5 + torch.rand(b, generator=g)
            state[f"{bn}.num_batches_tracked"] = torch.tensor(1000)
        layer += 3


def official_state_dict(variant: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random state dict with exactly the keys and shapes of the release's checkpoint."""
    r, g = RELEASE[variant], torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    in_dims = r["dims"]["AT"] + r["dims"]["VT"] + r["dims"]["PVT"]
    for i in range(7 * len(in_dims)):
        _mlp(state, f"projs.{i}.Head2.mlps", [in_dims[i // 7], HIDDEN, OUT], g)
    for i in range(7):
        _mlp(state, f"ib_projs.{i}.Head2.mlps", [1024, HIDDEN, OUT], g)
    n_a, n_v, n_p = len(r["A"]), len(r["V"]), len(r["P"])
    groups = dict(A=n_a + 1, V=n_v + 1 + (0 if r["eva18b"] else n_p), P=n_p, T=n_a + n_v + n_p + 1)
    preds = _inputs_dims(r)
    for x in "AVPT":
        _mlp(state, f"{x}_enc_router.router", [preds[x], 512, 100, groups[x]], g)
    return state


def _inputs_dims(r: dict) -> dict[str, int]:
    d = r["dims"]
    t = d["AT"] + d["VT"] + d["PVT"]
    v = d["VT"] + d["PVT"]
    return dict(A=d["AT"][r["A_pred"]], V=v[r["V_pred"]], P=d["PVT"][r["P_pred"]],
                T=sum(t[i] for i in r["T_pred"]))  # fmt: skip


# ---------------------------------------------------------------------------- the release's rule


def head(state: dict, prefix: str, x: torch.Tensor) -> torch.Tensor:
    """One release projector: Linear, BN, ReLU, Linear, BN (eval), L2-normalise."""
    p = f"{prefix}.Head2.mlps"
    for layer in (0, 3):
        x = F.linear(x, state[f"{p}.{layer}.weight"], state[f"{p}.{layer}.bias"])
        b = f"{p}.{layer + 1}"
        x = F.batch_norm(x, state[f"{b}.running_mean"], state[f"{b}.running_var"],
                         state[f"{b}.weight"], state[f"{b}.bias"], False, 0.0, 1e-5)  # fmt: skip
        x = F.relu(x) if layer == 0 else x
    return F.normalize(x, dim=-1)


def router(state: dict, name: str, x: torch.Tensor) -> torch.Tensor:
    p = f"{name}.router"
    for layer, act in ((0, F.relu), (3, torch.tanh)):
        x = F.linear(x, state[f"{p}.{layer}.weight"], state[f"{p}.{layer}.bias"])
        b = f"{p}.{layer + 1}"
        x = F.batch_norm(x, state[f"{b}.running_mean"], state[f"{b}.running_var"],
                         state[f"{b}.weight"], state[f"{b}.bias"], False, 0.0, 1e-5)  # fmt: skip
        x = act(x)
    return torch.sigmoid(F.linear(x, state[f"{p}.6.weight"], state[f"{p}.6.bias"]))


def mean7(state: dict, first: int, x: torch.Tensor, prefix: str = "projs") -> torch.Tensor:
    """The mean of 7 consecutive normalised projections, not re-normalised."""
    return torch.stack([head(state, f"{prefix}.{first + e}", x) for e in range(7)]).mean(0)


def release(state: dict, variant: str, x: list[torch.Tensor], modality: str) -> torch.Tensor:
    """The release's proj_<modality> on its input list x (its config['A'|'V'|'P'|'T'] order),
    with its bugs fixed: Full's audio reads x, 3D reads its own projectors, Full's predictors
    are Large's."""
    r = RELEASE[variant]
    n_a, n_v, n_p = len(r["A"]), len(r["V"]), len(r["P"])
    full = r["eva18b"]

    def ib_group(ib: torch.Tensor, eva: torch.Tensor | None) -> torch.Tensor:
        mean = mean7(state, 0, ib, "ib_projs")
        return F.normalize(0.1 * mean + 0.9 * eva if full else mean, dim=-1)

    if modality == "audio":
        groups = [mean7(state, 7 * j, x[j]) for j in range(n_a)] + [
            mean7(state, 0, x[-1], "ib_projs")
        ]
        w = torch.softmax(router(state, "A_enc_router", x[r["A_pred"]]), -1)
    elif modality == "image":
        n = n_v if full else n_v + n_p
        groups = [mean7(state, 7 * (n_a + j), x[j]) for j in range(n)]
        groups.append(ib_group(x[-2], x[-1]) if full else ib_group(x[-1], None))
        w = torch.softmax(router(state, "V_enc_router", x[r["V_pred"]]), -1)
    elif modality == "point":
        groups = [mean7(state, 7 * (n_a + n_v + j), x[j]) for j in range(n_p)]
        w = torch.softmax(router(state, "P_enc_router", x[r["P_pred"]]), -1)
    else:
        groups = [mean7(state, 7 * j, x[j]) for j in range(n_a + n_v + n_p)]
        groups.append(ib_group(x[-2], x[-1]) if full else ib_group(x[-1], None))
        pred = torch.cat([x[i] for i in r["T_pred"]], 1)
        w = torch.softmax(10 * router(state, "T_enc_router", pred), -1)
    return F.normalize((torch.stack(groups, 1) * w.unsqueeze(-1)).sum(1), dim=-1)


def random_inputs(variant: str, n: int = 6, seed: int = 1) -> tuple[dict, dict]:
    """(the release's input lists per modality, the same embeddings as {space: {modality: x}}).

    Uni3D's image and text are EVA02-E's, as in the release; the per-space dict leaves them out.
    """
    r, g = RELEASE[variant], torch.Generator().manual_seed(seed)
    unit = lambda d: F.normalize(torch.randn(n, d, generator=g), dim=-1)  # noqa: E731
    emb: dict[str, dict[str, torch.Tensor]] = {}
    d = r["dims"]
    for name, dim in zip(r["A"], d["AT"], strict=True):
        emb[name] = {"audio": unit(dim), "text": unit(dim)}
    for name, dim in zip(r["V"], d["VT"], strict=True):
        emb[name] = {"image": unit(dim), "text": unit(dim)}
    for name in r["P"]:
        emb[name] = {"point": unit(1024)}
    emb["IB"] = {m: unit(1024) for m in ("audio", "image", "text")}
    if r["eva18b"]:
        emb["EVA_18B"] = {"image": unit(OUT), "text": unit(OUT)}
    eva = emb["EVA_E14p"]
    tail = ["IB", "EVA_18B"] if r["eva18b"] else ["IB"]
    lists = {
        "audio": [emb[a]["audio"] for a in r["A"]] + [emb["IB"]["audio"]],
        "image": [emb[v]["image"] for v in r["V"]] + [eva["image"]] * len(r["P"])
        + [emb[t]["image"] for t in tail],
        "point": [emb[p]["point"] for p in r["P"]],
        "text": [emb[a]["text"] for a in r["A"] + r["V"]] + [eva["text"]] * len(r["P"])
        + [emb[t]["text"] for t in tail],
    }  # fmt: skip
    return lists, {ours(k, variant): v for k, v in emb.items()}


# ---------------------------------------------------------------------------- tests


@pytest.mark.parametrize("variant", ["base", "large", "full"])
def test_parity_with_the_release_rule(variant: str) -> None:
    state = official_state_dict(variant)
    model = convert_state_dict(state, variant)
    counts = {m: len(g) for m, g in model.layout.groups.items()}
    assert (
        counts
        == {
            "base": dict(point=1, audio=4, image=3, text=6),
            "large": dict(point=3, audio=6, image=8, text=13),
            "full": dict(point=3, audio=6, image=5, text=13),
        }[variant]
    )
    assert sum(len(b["experts"]) for b in model.layout.spaces.values()) - 7 == (
        35 if variant == "base" else 84
    )
    lists, per_space = random_inputs(variant)
    got = OmniBind(model).embed_spaces(per_space)
    uniform = OmniBind(model, weighting="average").embed_spaces(per_space)
    assert set(got) == {"point", "audio", "image", "text"}  # 3D and (Full) audio both work
    for m in got:
        want = release(state, variant, lists[m], m)
        assert torch.allclose(got[m], want, atol=1e-5), (variant, m, (got[m] - want).abs().max())
        if len(model.layout.groups[m]) > 1:  # the routers matter: uniform weights differ
            assert (uniform[m] - want).norm(dim=1).max() > 0.05, m


def _only(modality: str, emb: dict) -> dict:
    return {s: {modality: e[modality]} for s, e in emb.items() if modality in e}


def test_uni3d_image_and_text_default_to_eva02() -> None:
    bind = OmniBind(convert_state_dict(official_state_dict("base"), "base"))
    assert bind.model.layout.shares == {"uni3d": {"image": "eva02_e", "text": "eva02_e"}}
    _, per_space = random_inputs("base")
    explicit = dict(per_space, uni3d={**per_space["uni3d"], **per_space["eva02_e"]})
    for m in ("image", "text"):
        shared = bind.embed_spaces(_only(m, per_space))[m]
        assert torch.equal(shared, bind.embed_spaces(_only(m, explicit))[m])
        # An explicit Uni3D embedding is used when given.
        other = dict(per_space, uni3d={m: -per_space["eva02_e"][m]})
        assert not torch.allclose(shared, bind.embed_spaces(_only(m, other))[m])


def test_full_blend_is_the_fixed_point_nine_eva18b() -> None:
    model = convert_state_dict(official_state_dict("full"), "full")
    (blend,) = model.layout.blends.items()
    assert blend == ("eva_clip_18b+imagebind", {"eva_clip_18b": 0.9, "imagebind": 0.1})
    assert model.layout.groups["image"][-1] == blend[0]
    assert "eva_clip_18b" in model.needed_spaces("image")
    assert "eva_clip_18b+imagebind" not in model.needed_spaces("text")


def test_stage_through_train_py(tmp_path: Path) -> None:
    ckpt = tmp_path / "omnibind_base.pt"
    torch.save(official_state_dict("base"), ckpt)
    cfg = compose_config([
        "stage=convert", "variant=base", f"convert.checkpoint={ckpt}",
        f"paths.output_dir={tmp_path}", "logger=none",
    ])  # fmt: skip
    train(cfg)
    out = tmp_path / "omni" / "base" / "official"
    assert Path(cfg.convert.export_dir) == out
    meta = json.loads((out / "omni.json").read_text())
    assert meta["checkpoint"] == str(ckpt.resolve()) and meta["variant"] == "base"
    model = load_omni(out)
    direct = convert_state_dict(official_state_dict("base"), "base")
    for k, v in direct.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k


def _error(state: dict, variant: str = "base") -> str:
    with pytest.raises(CacheError) as e:
        convert_state_dict(state, variant, where="ckpt.pt")
    return str(e.value)


def test_strict_unexpected_missing_and_shape() -> None:
    base = official_state_dict("base")
    extra = dict(base, **{"projs.0.Head1.mlps.0.weight": torch.zeros(2)})
    assert "'projs.0.Head1.mlps.0.weight'" in _error(extra)
    missing = dict(base)
    del missing["ib_projs.3.Head2.mlps.4.running_var"]
    assert "ib_projs.3.Head2.mlps.4.running_var" in _error(missing)
    shaped = dict(base, **{"T_enc_router.router.0.weight": torch.zeros(512, 3000)})
    msg = _error(shaped)
    assert "'T_enc_router.router.0.weight'" in msg and "(512, 3000)" in msg and "3072" in msg
    wide = dict(base, **{"projs.7.Head2.mlps.0.weight": torch.zeros(HIDDEN + 1, 1024)})
    assert "projs.7.Head2.mlps.0.weight" in _error(wide)


def test_another_variants_checkpoint_is_refused() -> None:
    msg = _error(official_state_dict("large"), "base")
    assert "unexpected keys" in msg and "projs.35" in msg


def test_num_batches_tracked_may_be_absent() -> None:
    state = {k: v for k, v in official_state_dict("base").items() if "num_batches" not in k}
    model = convert_state_dict(state, "base")
    assert torch.equal(
        model.projectors["wavcaps"].experts[0].mlp[1].running_var,
        state["projs.0.Head2.mlps.1.running_var"],
    )


def test_bad_checkpoint_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        load_checkpoint(tmp_path / "nowhere.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CacheError, match="junk.pt"):
        load_checkpoint(junk)
    listed = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], listed)
    with pytest.raises(CacheError, match="state dict"):
        load_checkpoint(listed)
    cfg = compose_config(["stage=convert", f"paths.output_dir={tmp_path}"])
    with pytest.raises(ValueError, match="convert.checkpoint is not set"):
        train(cfg)
