"""Uni3D's point encoder (github baaivision/Uni3D, models/point_encoder.py): point clouds only.

    encoder: {_target_: encoders.uni3d.Uni3DEncoder, checkpoint: /path/to/uni3d-g/lvis/model.pt}

The defaults are Uni3D-g as released (scripts/inference.sh, and OmniBind's uni3d_config): the
blocks of timm's `eva_giant_patch14_560` (1408 wide, 40 deep), 512 patches of 64 points from
10,000-point clouds, a mini-PointNet patch embedding 512 wide, 1024-d output (EVA02-E-14-plus's
space). Other sizes name another timm EVA (`model`) or override its dims; the tiny smoke space
`tiny_uni3d` does. Inputs are (batch, npoints, 6) clouds: xyz centred in the unit sphere, rgb in
[0, 1] (encoders/readers.py prepares files and arrays; Uni3DProcessor says how many points).

Grouping runs in plain torch (no pointnet2 / knn_cuda ops): farthest-point sampling follows
pointnet2_ops' `furthest_point_sample` (it starts at point 0 and never picks a point within
sqrt(1e-3) of the origin) and kNN the release's `knn_point` (squared distances as a matmul,
top-k). Patch dropout is off, as in the release's evaluation (`--patch-dropout 0`).

Checkpoints: the release's DeepSpeed `model.pt`, whose `ckpt['module']` is the state dict of its
`Uni3D` module: `logit_scale` and `point_encoder.*` (a leading `module.` is stripped, as the
release's main.py does). It is loaded strictly into the same module layout, so every key is
consumed. Two groups are held but never run, as in the release: `logit_scale` (the contrastive
temperature of training) and the timm model's image-side `point_encoder.visual.{cls_token,
pos_embed, patch_embed.*, head.*}` (Uni3D feeds point tokens straight to the blocks).
`checkpoint: null` means random weights drawn from `seed`.

Uni3D's image and text towers are EVA02-E-14-plus's (space eva02_e): a space's dims may list
image and text (uni3d's do), but this encoder embeds only points and says so for the others.
"""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from encoders.base import Encoder, Processor, seeded
from encoders.readers import MISSING_RGB, RawDataError

SHARED = ("image", "text")  # Uni3D's other modalities: EVA02-E-14-plus's towers
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
FPS_ORIGIN_SKIP = 1e-3  # pointnet2_ops skips points with |p|^2 <= this when sampling centres
FPS_START = 1e10  # its initial distance to the (empty) set of centres


@dataclass(frozen=True)
class Uni3DConfig:
    """The encoder block's keys (the release's argument names in comments)."""

    checkpoint: str | None = None  # the release's model.pt (None: random weights from `seed`)
    model: str = "eva_giant_patch14_560"  # timm EVA whose blocks run the tokens (--pc-model)
    trans_dim: int | None = None  # its width (--pc-feat-dim); None: the timm model's own
    depth: int | None = None  # None: the timm model's block count
    heads: int | None = None  # None: the timm model's attention heads
    mlp_ratio: float | None = None  # None: the timm model's
    img_size: int | None = None  # sizes only timm's unused image pos_embed; None: the model's
    encoder_dim: int = 512  # patch embedding width (--pc-encoder-dim)
    embed_dim: int = 1024  # output dim (--embed-dim): the space's point dim
    num_group: int = 512  # patches per cloud (--num-group)
    group_size: int = 64  # points per patch (--group-size)
    npoints: int = 10000  # points per cloud (--npoints)
    missing_rgb: str = "default"  # a cloud without colour: rgb 0.4 (default) or refuse (raise)
    precision: str = "fp32"  # weights' dtype: fp32, fp16 or bf16 (grouping stays float32)
    seed: int = 0  # random weights when checkpoint is None

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(
                f"encoder.precision is {self.precision!r}; expected {list(PRECISIONS)}"
            )
        if self.missing_rgb not in MISSING_RGB:
            raise ValueError(f"encoder.missing_rgb is {self.missing_rgb!r}; expected {MISSING_RGB}")
        if self.npoints < max(self.num_group, self.group_size):
            raise ValueError(
                f"encoder.npoints={self.npoints} is below num_group={self.num_group} or "
                f"group_size={self.group_size}: the grouping needs at least that many points"
            )


def _not_point(modality: str) -> ValueError:
    return ValueError(
        f"Uni3D embeds points only; its {modality} tower is EVA02-E-14-plus's: embed {modality} "
        "with space eva02_e (an OmniBind export's `shares` says so)"
    )


def farthest_points(xyz: torch.Tensor, count: int) -> torch.Tensor:
    """(batch, n, 3) -> (batch, count) indices of centres, as pointnet2_ops picks them: point 0
    first, then each time the point farthest from those picked (the first maximum on a tie)."""
    batch, n, _ = xyz.shape
    rows = torch.arange(batch, device=xyz.device)
    # The kernel never considers a point this close to the origin (only point 0 may be one).
    eligible = (xyz * xyz).sum(-1) > FPS_ORIGIN_SKIP
    dist = torch.full((batch, n), FPS_START, dtype=xyz.dtype, device=xyz.device)
    index = torch.zeros(batch, count, dtype=torch.long, device=xyz.device)
    last = index[:, 0]
    for j in range(1, count):
        step = xyz - xyz[rows, last].unsqueeze(1)
        dist = torch.minimum(dist, (step * step).sum(-1))
        last = torch.where(eligible, dist, -1.0).argmax(-1)
        index[:, j] = last
    return index


def knn(xyz: torch.Tensor, centres: torch.Tensor, k: int) -> torch.Tensor:
    """(batch, n, 3), (batch, g, 3) -> (batch, g, k) indices of each centre's k nearest points
    (unordered: the patch embedding max-pools over them)."""
    sq = -2 * centres @ xyz.transpose(1, 2)
    sq = sq + (centres**2).sum(-1, keepdim=True) + (xyz**2).sum(-1).unsqueeze(1)
    return sq.topk(k, dim=-1, largest=False, sorted=False).indices


def group(
    xyz: torch.Tensor, rgb: torch.Tensor, num_group: int, group_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clouds (batch, n, 3) xyz and rgb -> centres (batch, g, 3) and patches (batch, g, k, 6):
    each patch's xyz relative to its centre, then its rgb."""
    rows = torch.arange(len(xyz), device=xyz.device)
    centres = xyz[rows[:, None], farthest_points(xyz, num_group)]
    near = knn(xyz, centres, group_size)
    patches = xyz[rows[:, None, None], near] - centres.unsqueeze(2)
    return centres, torch.cat([patches, rgb[rows[:, None, None], near]], -1)


class PatchEmbed(nn.Module):
    """The release's mini-PointNet: a patch (k, 6) -> one (encoder_dim,) token (its `Encoder`)."""

    def __init__(self, encoder_dim: int) -> None:
        super().__init__()
        self.encoder_dim = encoder_dim
        self.first_conv = nn.Sequential(
            nn.Conv1d(6, 128, 1), nn.BatchNorm1d(128), nn.ReLU(inplace=True), nn.Conv1d(128, 256, 1)
        )
        self.second_conv = nn.Sequential(
            nn.Conv1d(512, 512, 1),
            nn.BatchNorm1d(512),
            nn.ReLU(inplace=True),
            nn.Conv1d(512, encoder_dim, 1),
        )

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        """(batch, g, k, 6) -> (batch, g, encoder_dim): per point features max-pooled, twice."""
        batch, g, k, _ = patches.shape
        x = self.first_conv(patches.reshape(batch * g, k, 6).transpose(1, 2))  # (bg, 256, k)
        x = torch.cat([x.amax(2, keepdim=True).expand(-1, -1, k), x], 1)
        return self.second_conv(x).amax(2).reshape(batch, g, self.encoder_dim)


class PointEncoder(nn.Module):
    """The release's PointcloudEncoder: patch tokens and a cls token through a timm EVA's
    blocks; the cls output, normed, is projected to embed_dim."""

    def __init__(self, visual: nn.Module, cfg: Uni3DConfig) -> None:
        super().__init__()
        width = int(visual.embed_dim)
        self.num_group, self.group_size = cfg.num_group, cfg.group_size
        self.encoder = PatchEmbed(cfg.encoder_dim)
        self.encoder2trans = nn.Linear(cfg.encoder_dim, width)
        self.trans2embed = nn.Linear(width, cfg.embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.cls_pos = nn.Parameter(torch.randn(1, 1, width))
        self.pos_embed = nn.Sequential(nn.Linear(3, 128), nn.GELU(), nn.Linear(128, width))
        self.visual = visual

    def forward(self, xyz: torch.Tensor, rgb: torch.Tensor) -> torch.Tensor:
        """(batch, n, 3) xyz and rgb, float32 -> (batch, embed_dim)."""
        centres, patches = group(xyz, rgb, self.num_group, self.group_size)
        dtype = self.cls_token.dtype
        tokens = self.encoder2trans(self.encoder(patches.to(dtype)))
        n = len(tokens)
        x = torch.cat([self.cls_token.expand(n, -1, -1), tokens], 1)
        x = x + torch.cat([self.cls_pos.expand(n, -1, -1), self.pos_embed(centres.to(dtype))], 1)
        x = self.visual.pos_drop(x)
        for block in self.visual.blocks:
            x = block(x)
        return self.trans2embed(self.visual.fc_norm(self.visual.norm(x[:, 0])))


class Uni3D(nn.Module):
    """The release's Uni3D module (what `ckpt['module']` holds): the point encoder and the
    training temperature `logit_scale`, which embedding never reads."""

    def __init__(self, cfg: Uni3DConfig) -> None:
        super().__init__()
        self.min_points = max(cfg.num_group, cfg.group_size)
        self.logit_scale = nn.Parameter(torch.ones([]) * np.log(1 / 0.07))
        self.point_encoder = PointEncoder(build_visual(cfg), cfg)

    def forward(self, clouds: torch.Tensor) -> torch.Tensor:
        """(batch, n, 6) xyz + rgb -> (batch, embed_dim), not normalised."""
        if clouds.ndim != 3 or clouds.shape[2] != 6 or clouds.shape[1] < self.min_points:
            raise ValueError(
                f"Uni3D takes clouds (batch, n >= {self.min_points}, 6) of xyz + rgb, got "
                f"{tuple(clouds.shape)}"
            )
        clouds = clouds.float()  # grouping in float32 whatever the weights' precision
        return self.point_encoder(clouds[..., :3].contiguous(), clouds[..., 3:].contiguous())


def build_visual(cfg: Uni3DConfig) -> nn.Module:
    """The timm EVA whose blocks Uni3D runs, as the release creates it (1000-class head and all)."""
    import timm

    overrides = dict(embed_dim=cfg.trans_dim, depth=cfg.depth, num_heads=cfg.heads,
                     mlp_ratio=cfg.mlp_ratio, img_size=cfg.img_size)  # fmt: skip
    try:
        visual = timm.create_model(
            cfg.model, pretrained=False, **{k: v for k, v in overrides.items() if v is not None}
        )
    except RuntimeError as e:
        raise ValueError(f"encoder.model {cfg.model!r}: not a timm model ({e})") from e
    missing = [a for a in ("embed_dim", "pos_drop", "blocks", "norm", "fc_norm")
               if not hasattr(visual, a)]  # fmt: skip
    if missing:
        raise ValueError(f"encoder.model {cfg.model!r} is not a timm EVA: it lacks {missing}")
    return visual


class Uni3DProcessor(Processor):
    """Clouds as readers.load_raw prepares them, npoints each: (npoints, 6) in, stacked out."""

    def __init__(self, cfg: Uni3DConfig) -> None:
        self.num_points = cfg.npoints  # load_raw samples every cloud to this
        self.min_points = max(cfg.num_group, cfg.group_size)  # and refuses clouds below this
        self.missing_rgb = cfg.missing_rgb

    def item(self, modality: str, raw: Any) -> torch.Tensor:
        if modality != "point":
            raise _not_point(modality)
        cloud = torch.as_tensor(raw, dtype=torch.float32)
        if tuple(cloud.shape) != (self.num_points, 6):
            raise RawDataError(
                f"a prepared cloud has shape {tuple(cloud.shape)}, expected ({self.num_points}, "
                "6); read clouds with encoders.readers.load_raw"
            )
        return cloud

    def batch(self, modality: str, items: Sequence[Any]) -> torch.Tensor:
        return torch.stack(list(items))


def load_uni3d_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The release's checkpoint as the state dict of its Uni3D module (`ckpt['module']`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"encoder.checkpoint {path}: no such file (expected the release's Uni3D model.pt, "
            "e.g. BAAI/Uni3D modelzoo/uni3d-g/lvis/model.pt)"
        )
    try:
        # Memory-mapped (2 GB less at peak for Uni3D-g) unless the file predates the zip format.
        zipped = zipfile.is_zipfile(path)
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=zipped)
    except pickle.UnpicklingError as e:
        raise ValueError(
            f"{path}: holds objects torch.load(weights_only=True) refuses ({e}); if you trust "
            "the file, re-save its weights alone: torch.save({'module': ckpt['module']}, path)"
        ) from e
    except Exception as e:  # noqa: BLE001 - a corrupt file raises many types
        raise ValueError(f"{path}: not a loadable Uni3D checkpoint ({e})") from e
    state = ckpt.get("module") if isinstance(ckpt, dict) else None
    if not isinstance(state, Mapping) or not state:
        keys = sorted(ckpt)[:8] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"{path}: expected the release's {{'module': state dict}}, got {keys}")
    return {k.removeprefix("module."): v for k, v in state.items()}


def check_state(model: nn.Module, state: Mapping[str, torch.Tensor], where: str) -> None:
    """Refuse a state dict that does not fit `model` key for key, shape for shape."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in expected if k not in state]
    extra = [k for k in state if k not in expected]
    reshaped = [k for k in expected if k in state and tuple(state[k].shape) != expected[k]]
    for kind, keys in (("missing key", missing), ("unexpected key", extra)):
        if keys:
            more = f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""
            raise ValueError(f"{where}: does not fit Uni3D: {kind} {keys[0]!r}{more}")
    if reshaped:
        k = reshaped[0]
        raise ValueError(
            f"{where}: does not fit Uni3D: key {k!r} has shape {tuple(state[k].shape)} in the "
            f"checkpoint, {expected[k]} in the model (check encoder.model and its dims)"
        )


class Uni3DEncoder(Encoder):
    """Uni3D's point encoder: clouds (batch, npoints, 6) in, (batch, embed_dim) out."""

    @classmethod
    def build_processor(cls, **config: Any) -> Uni3DProcessor:
        """The processor of this encoder config (Uni3DConfig's keys), without the model."""
        return Uni3DProcessor(Uni3DConfig(**config))

    def __init__(self, dims: Mapping[str, int], load_weights: bool = True, **config: Any) -> None:
        cfg = Uni3DConfig(**config)
        unknown = sorted(set(dims) - {"point", *SHARED})
        if "point" not in dims or unknown:
            raise ValueError(
                f"Uni3D embeds point (its image and text are EVA02-E-14-plus's); the space's "
                f"dims are {dict(dims)}"
            )
        if dims["point"] != cfg.embed_dim:
            raise ValueError(
                f"Uni3D's encoder.embed_dim is {cfg.embed_dim}, but the space's point dim is "
                f"{dims['point']}"
            )
        super().__init__(dims, Uni3DProcessor(cfg))
        self.config = cfg
        dtype = PRECISIONS[cfg.precision]
        if cfg.checkpoint and load_weights:
            state = load_uni3d_checkpoint(cfg.checkpoint)
            with torch.device("meta"):  # the weights come from the checkpoint: no random init
                self.model = Uni3D(cfg)
            check_state(self.model, state, str(cfg.checkpoint))
            # The released files hold float16 weights (2.03 GB for Uni3D-g's 1.02 billion):
            # cast them once to the configured precision.
            state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
            self.model.load_state_dict(state, strict=True, assign=True)
            self._materialize_buffers()
        else:
            with seeded(cfg.seed):
                self.model = Uni3D(cfg)
            self.model.to(dtype)
        self.freeze()

    def _materialize_buffers(self) -> None:
        """After loading onto meta-built modules: timm EVA's zero key bias, which state dicts
        do not hold (a non-persistent buffer), is made real; nothing else may stay on meta."""
        for module in self.model.modules():
            if getattr(module, "k_bias", None) is not None and module.k_bias.is_meta:
                module.k_bias = torch.zeros_like(module.q_bias)
        left = [n for n, t in [*self.model.named_parameters(), *self.model.named_buffers()]
                if t.is_meta]  # fmt: skip
        if left:
            raise RuntimeError(f"Uni3D: {left[:3]} are not in the checkpoint and have no value")

    def embed(self, modality: str, batch: Any) -> torch.Tensor:
        if modality != "point":
            raise _not_point(modality)
        return self.model(batch)

    def pretrained_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The checkpoint's weights keyed as in this module (for ZeRO-3 loading)."""
        if not self.config.checkpoint:
            return None
        return {f"model.{k}": v for k, v in load_uni3d_checkpoint(self.config.checkpoint).items()}
