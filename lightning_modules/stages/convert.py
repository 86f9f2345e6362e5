"""Convert stage: an official OmniBind checkpoint (projectors + routers) as our omni export.

`python train.py stage=convert variant=base|large|full convert.checkpoint=FILE` reads the
release's state dict and writes `omni.json` + `omni.safetensors` (lightning_modules/omni/model.py)
to `convert.export_dir`, which `omni.export.load_omni`, the evaluate stage
(`omni:<variant>/official`) and `lightning_modules/inference/api.py` read like a route-stage
export.

The release's layout (DESIGN.md, "Facts from the official inference release", checked against
its `omni_model/router.py` and `omni_utils.py`):
- `projs.{i}.Head2.mlps.{0,1,3,4}.*`: 7 consecutive projectors per source space, the audio-text
  spaces first, then image-text, then 3D-image-text; `ib_projs.{i}.Head2.mlps.*`: ImageBind's 7.
  They map key for key onto `projectors.<space>.experts.<j>.mlp.{0,1,3,4}.*`.
- `{A,V,P,T}_enc_router.router.{0,1,3,4,6}.*` map onto `routers.{audio,image,point,text}.router.*`;
  the router's output g weighs group g below. Text weights are softmax(10 * router).
- Groups per modality, in router order (Base / Large / Full counts 4/6/6 audio, 3/8/5 image,
  6/13/13 text, 1/3/3 point): audio = audio-text spaces + ImageBind; image = image-text spaces +
  3D spaces (Base, Large) + the ImageBind group; text = all source spaces + the ImageBind group;
  point = the 3D spaces. In Full the ImageBind group of image and text is the fixed blend
  normalize(0.9 EVA-18B + 0.1 mean(ImageBind)) and image has no 3D groups.

Readings chosen where the release is ambiguous or broken (each keeps parity meaningful):
- The release's Base/Large image and text ImageBind group is normalize(mean of the 7 ImageBind
  projections); its audio group and every other space's group is the plain mean (OmniBind does
  not re-normalise). We reproduce both: the former is a one-part blend {imagebind: 1.0}.
- Uni3D's image and text sides are EVA02-E-14-plus: meta `shares` says so, and
  `inference.OmniBind` feeds EVA02-E embeddings to Uni3D's projectors when no Uni3D image or
  text embedding is given.
- Full's router inputs are Large's (DESIGN.md; the release's Full predictor indices point at
  1024-dim spaces while its routers take 1152 and 3200 inputs, which cannot run).
- The release's Uni3D instances are L (Objaverse-LVIS), M (ModelNet40), S (ScanObjectNN). Base's
  only one (L) is our `uni3d`, the Base variant's 3D space; in Large and Full, L is `uni3d_lvis`
  (the point router's input in both), M is `uni3d_mnet`, and S takes our remaining `uni3d`.
- The projector width is read from the checkpoint's first projector (2048 in the release) and
  every other must match it; BatchNorm's `num_batches_tracked` (unused at inference) may be absent.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from omegaconf import DictConfig

from datamodules.artifacts import CacheError, sha256_file
from lightning_modules.omni.export import save_omni
from lightning_modules.omni.layout import OmniLayout
from lightning_modules.omni.model import OmniModel
from lightning_modules.runtime.config import group_config, space_configs, to_plain

log = logging.getLogger(__name__)

# The release's source spaces in projector order, named as our conf/space files.
SOURCES = {
    "base": dict(
        audio_text=["wavcaps", "wavcaps_audiocaps", "wavcaps_clotho"],
        image_text=["eva02_e"],
        point_image_text=["uni3d"],
    ),
    "large": dict(
        audio_text=["clap", "clap_music", "wavcaps", "wavcaps_audiocaps", "wavcaps_clotho"],
        image_text=["dfn5b", "eva02_e", "siglip_large", "siglip"],
        point_image_text=["uni3d_lvis", "uni3d_mnet", "uni3d"],
    ),
}
SOURCES["full"] = SOURCES["large"]
IMAGEBIND, UNI3D_SIDES = "imagebind", "eva02_e"  # Uni3D's image and text encoder
EXPERTS = 7
SCALES = {"point": 1.0, "audio": 1.0, "image": 1.0, "text": 10.0}  # the release's (routed_paper)
FULL_BLEND = {"anchor": 0.9, IMAGEBIND: 0.1}
ROUTERS = {"A": "audio", "V": "image", "P": "point", "T": "text"}
OPTIONAL = "num_batches_tracked"  # BatchNorm's step counter: unused in eval mode


def official_layout(variant: str, anchor: str) -> dict:
    """Groups, blends, predictors and projector indices of the release's `variant`."""
    if variant not in SOURCES:
        raise ValueError(
            f"variant {variant!r} has no official OmniBind release; expected {list(SOURCES)}"
        )
    src = SOURCES[variant]
    at, vt, pvt = src["audio_text"], src["image_text"], src["point_image_text"]
    ordered = at + vt + pvt
    if variant == "full":
        ib_group = f"{anchor}+{IMAGEBIND}"
        blends = {ib_group: {anchor if k == "anchor" else k: w for k, w in FULL_BLEND.items()}}
        image = vt + [ib_group]
    else:
        ib_group = f"{IMAGEBIND}:normalized"
        blends = {ib_group: {IMAGEBIND: 1.0}}
        image = vt + pvt + [ib_group]
    groups = dict(point=list(pvt), audio=at + [IMAGEBIND], image=image, text=ordered + [ib_group])
    projs = {s: [f"projs.{EXPERTS * j + e}" for e in range(EXPERTS)] for j, s in enumerate(ordered)}
    projs[IMAGEBIND] = [f"ib_projs.{e}" for e in range(EXPERTS)]
    return dict(
        groups=groups,
        blends=blends,
        predictors=to_plain(group_config("variant", variant).predictors),  # conf/variant's
        projs=projs,
        shares={s: {"image": UNI3D_SIDES, "text": UNI3D_SIDES} for s in pvt},
    )


@functools.cache
def space_dims(names: tuple[str, ...]) -> dict[str, dict[str, int]]:
    """{space: {modality: dim}} from conf/space (Hydra composing is slow, so cached)."""
    return {n: {m: int(d) for m, d in c.dims.items()} for n, c in space_configs(names).items()}


def load_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The release's state dict from a .pt (torch.save) or .safetensors file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"convert.checkpoint {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch and safetensors raise many types on a bad file
        raise CacheError(f"{path}: not a readable torch or safetensors checkpoint ({e})") from e
    if not isinstance(state, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise CacheError(f"{path}: expected a state dict {{key: tensor}}, got {type(state)}")
    return dict(state)


def _shape(state: Mapping[str, torch.Tensor], key: str, where: str) -> tuple[int, ...]:
    if key not in state:
        raise CacheError(f"{where}: missing key {key!r}")
    return tuple(state[key].shape)


def _names(keys: list[str], limit: int = 6) -> str:
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(repr(k) for k in keys[:limit]) + more


def convert_state_dict(
    state: Mapping[str, torch.Tensor],
    variant: str,
    anchor: str = "eva_clip_18b",
    where: str = "checkpoint",
) -> OmniModel:
    """The release's state dict as an OmniModel; every key consumed, every shape checked.

    `where` names the source in errors. Raises CacheError naming the first offending keys.
    """
    layout = official_layout(variant, anchor)
    names = list(layout["projs"])
    dims = space_dims((*names, anchor))
    out_dim = dims[anchor]["image"]
    # One width for all (2048 in the release), read off the first; any other is a shape error.
    hidden = _shape(state, f"{layout['projs'][names[0]][0]}.Head2.mlps.0.weight", where)[0]
    meta_spaces = {}
    for name in names:
        meta_spaces[name] = dict(space=name, anchor=anchor, dims=dict(dims[name]), out_dim=out_dim,
                                 hidden_dim=hidden, experts=layout["projs"][name],
                                 renormalize=False, source="official")  # fmt: skip
    predictor_dims = {m: sum(dims[p][m] for p in ps) for m, ps in layout["predictors"].items()}
    omni = OmniLayout(
        variant=variant,
        kind="routed",
        anchor=anchor,
        groups=layout["groups"],
        blends=layout["blends"],
        shares=layout["shares"],
        predictors=layout["predictors"],
        predictor_dims=predictor_dims,
        scales={m: SCALES[m] for m in layout["groups"]},
        spaces=meta_spaces,
        record={"source": "official OmniBind release"},
    )
    model = OmniModel(omni)
    target = model.state_dict()
    source_of = {k: _official_key(k, layout) for k in target}  # ours -> the release's
    expected = set(source_of.values())
    unexpected = sorted(set(state) - expected)
    missing = sorted(k for k, s in source_of.items() if s not in state and not k.endswith(OPTIONAL))
    if unexpected:
        raise CacheError(
            f"{where}: unexpected keys {_names(unexpected)} for the official {variant} layout "
            f"({len(names) - 1} spaces x {EXPERTS} `projs` + {EXPERTS} `ib_projs` + 4 routers); "
            "is it another variant's checkpoint?"
        )
    if missing:
        raise CacheError(f"{where}: missing keys {[source_of[k] for k in missing][:6]} "
                         f"({len(missing)} in all) for the official {variant} layout")  # fmt: skip
    converted = {}
    for ours, theirs in source_of.items():
        want = target[ours]
        if theirs not in state:  # an absent num_batches_tracked
            converted[ours] = torch.zeros_like(want)
            continue
        got = state[theirs]
        if tuple(got.shape) != tuple(want.shape):
            raise CacheError(
                f"{where}: {theirs!r} has shape {tuple(got.shape)}, expected "
                f"{tuple(want.shape)} (as `{ours}` of the {variant} layout)"
            )
        if got.is_floating_point() != want.is_floating_point():
            raise CacheError(f"{where}: {theirs!r} has dtype {got.dtype}, expected {want.dtype}")
        converted[ours] = got.to(want.dtype)
    model.load_state_dict(converted, strict=True)
    return model.eval()


def _official_key(ours: str, layout: dict) -> str:
    """Our key -> the release's: `projectors.<s>.experts.<j>.mlp.*` -> `projs.<i>.Head2.mlps.*`."""
    match = re.fullmatch(r"projectors\.([^.]+)\.experts\.(\d+)\.mlp\.(.+)", ours)
    if match:
        space, expert, rest = match.groups()
        return f"{layout['projs'][space][int(expert)]}.Head2.mlps.{rest}"
    match = re.fullmatch(r"routers\.([^.]+)\.router\.(.+)", ours)
    if match:
        letter = {m: x for x, m in ROUTERS.items()}[match.group(1)]
        return f"{letter}_enc_router.router.{match.group(2)}"
    raise AssertionError(f"no official counterpart for {ours!r}")  # OmniModel's own layout


def run(cfg: DictConfig) -> None:
    """Convert `convert.checkpoint` for `variant` and export it to `convert.export_dir`."""
    if not cfg.convert.checkpoint:
        raise ValueError(
            "convert.checkpoint is not set; e.g. python train.py stage=convert variant=base "
            "convert.checkpoint=/path/to/omnibind_base.pt"
        )
    path = Path(cfg.convert.checkpoint)
    variant = cfg.variant.name
    layout = official_layout(variant, cfg.anchor.name)
    ours = set(cfg.variant.spaces) | {cfg.anchor.name}
    absent = [s for s in layout["projs"] if s not in ours]
    if absent:
        raise ValueError(f"variant {variant!r}: the official layout needs spaces {absent} that "
                         f"conf/variant/{variant}.yaml does not name")  # fmt: skip
    model = convert_state_dict(load_checkpoint(path), variant, cfg.anchor.name, where=str(path))
    model.layout = model.layout.replace(
        record={"checkpoint": str(path.resolve()), "checkpoint_sha256": sha256_file(path)}
    )
    out = save_omni(model, cfg.convert.export_dir)
    counts = {m: len(g) for m, g in model.layout.groups.items()}
    log.info("official OmniBind-%s (%d tensors) exported to %s; groups per modality %s",
             variant, len(model.state_dict()), out, counts)  # fmt: skip
