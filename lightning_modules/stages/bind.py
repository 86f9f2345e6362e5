"""Bind stage: train a mixture of projectors from one source space into the anchor space.

`python train.py stage=bind space=clap` (paper §3.1, Eq. 1-2).
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import lightning as L
import torch
import torch.distributed as dist
from omegaconf import DictConfig

from encoders.modalities import LETTERS, MODALITIES, PAIRS
from lightning_modules.omni.export import save_bound_space
from lightning_modules.omni.layers import ProjectorMixture
from lightning_modules.omni.losses import info_nce
from lightning_modules.runtime import lineage
from lightning_modules.runtime.config import (
    ensure_data,
    ensure_tuples,
    tuples_record,
    validation_record,
)
from lightning_modules.runtime.training import fit_best
from lightning_modules.stages.validation import RetrievalValidation

log = logging.getLogger(__name__)
# The config sections a bind's export depends on: `stage=pipeline` rebinds when one changes.
DEPENDS = ("data", "anchor", "seed", "space", "bind", "model.bind", "loss.temperature",
           "loss.weights", "datamodule", "callbacks", "trainer")  # fmt: skip
FREEBIND_EXPERTS = ("mix", "A", "T", "V", "AT", "AV", "TV")


def expert_starts(experts: str | list[str]) -> dict[str, list[int]]:
    """{expert name: starting-modality indices it trains on}.

    `freebind` is FreeBind's seven subsets, named by the tuples' starting modality (mix, A, T, V,
    AT, AV, TV) for every space, as the release's 7 projectors per space: a subset is defined by
    where a tuple started, not by what the space embeds.
    """
    names = list(FREEBIND_EXPERTS) if experts == "freebind" else list(experts)
    out = {}
    for name in names:
        if name == "mix":
            out[name] = list(range(len(MODALITIES)))
            continue
        bad = [c for c in name if c not in LETTERS]
        if bad:
            raise ValueError(
                f"bind.experts: {name!r} has unknown letters {bad}; use mix or {list(LETTERS)}"
            )
        out[name] = [MODALITIES.index(LETTERS[c]) for c in name]
    if not out:
        raise ValueError("bind.experts is empty")
    return out


def retrieval_sides(space_mods: list[str], anchor_mods: list[str]) -> list[tuple[str, str]]:
    """Modality pairs to validate: each side is embedded by the space if it covers it, else by
    the anchor; pairs that the anchor alone would embed are left out."""
    union = set(space_mods) | set(anchor_mods)
    return [
        (a, b)
        for a, b in PAIRS
        if a in union and b in union and (a in space_mods or b in space_mods)
    ]


class BindModule(RetrievalValidation):
    """Projectors of one space, trained with Eq. 1 against the anchor's embeddings."""

    def __init__(
        self,
        space: str,
        anchor: str,
        dims: dict[str, int],
        anchor_dims: dict[str, int],
        experts: str | list[str],
        hidden_dim: int,
        renormalize: bool,
        temperature: float,
        loss_weights: dict[str, float] | None,
        optimizer: dict,
        scheduler: dict,
        warmup_fraction: float,
        gather: bool,
    ) -> None:
        """Every value comes from conf/model/bind.yaml, where it is declared once."""
        super().__init__()
        self.save_hyperparameters()
        in_dims = set(dims.values())
        if len(in_dims) != 1:
            raise ValueError(
                f"space {space!r}: one projector serves all modalities, but dims differ: {dims}"
            )
        out_dims = set(anchor_dims.values())
        if len(out_dims) != 1:
            raise ValueError(f"anchor {anchor!r}: modalities must share one dim, got {anchor_dims}")
        self.starts = {name: torch.tensor(s) for name, s in expert_starts(experts).items()}
        self.mixture = ProjectorMixture(
            in_dims.pop(), out_dims.pop(), hidden_dim, len(self.starts), renormalize
        )
        self.weights = {
            f"{m}_{n}": float((loss_weights or {}).get(f"{m}_{n}", 1.0))
            for m in dims
            for n in anchor_dims
        }
        self.setup_validation(retrieval_sides(list(dims), list(anchor_dims)))

    def embed(self, emb: dict[str, dict[str, torch.Tensor]], modality: str) -> torch.Tensor:
        """A batch of `modality` in the omni space: projected if the space has it, else anchor."""
        hp = self.hparams
        if modality in hp.dims:
            return self.mixture(emb[hp.space][modality])
        return emb[hp.anchor][modality]

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        hp = self.hparams
        src, anchor = batch["emb"][hp.space], batch["emb"][hp.anchor]
        losses = []
        for expert, (name, starts) in zip(self.mixture.experts, self.starts.items(), strict=True):
            rows = torch.isin(batch["start"], starts.to(batch["start"].device)).nonzero().squeeze(1)
            if self._fewest(len(rows)) < 2:  # BatchNorm needs two rows; the subset is absent
                continue
            total = weight = 0.0
            conf = batch.get("weight")  # per-row confidence of each modality's item, 0 if absent
            for m in hp.dims:
                z = expert(src[m][rows])
                for n in hp.anchor_dims:
                    w = self.weights[f"{m}_{n}"]
                    if w:
                        rows_w = None if conf is None else conf[m][rows] * conf[n][rows]
                        term = info_nce(z, anchor[n][rows], hp.temperature, rows_w, hp.gather)
                        total = total + w * term
                        weight += w
            loss = total / max(weight, 1e-12)
            self.log(f"train/loss_{name}", loss, on_step=False, on_epoch=True)
            losses.append(loss)
        if not losses:
            raise ValueError(
                f"batch {batch_idx}: no expert of {list(self.starts)} has 2 or more rows; "
                f"raise bind.batch_size (now {len(batch['start'])})"
            )
        loss = torch.stack(losses).mean()
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True)
        return loss

    def _fewest(self, count: int) -> int:
        """The smallest count over the ranks: with global negatives every rank must skip an
        expert together, since the gather inside its loss is a collective call."""
        if not (self.hparams.gather and dist.is_available() and dist.is_initialized()):
            return count
        fewest = torch.tensor(count, device=self.device)
        dist.all_reduce(fewest, op=dist.ReduceOp.MIN)
        return int(fewest)

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        a, b = self.val_pairs[dataloader_idx]
        self.score_pair(batch, self.embed(batch["emb"], a), self.embed(batch["emb"], b), a, b)

    def configure_optimizers(self):
        """`optimizer` and the per-step `scheduler` (`_partial_` configs): warm-up over
        `warmup_fraction` of the fit's steps."""
        hp = self.hparams
        opt = hydra.utils.instantiate(hp.optimizer)(self.parameters())
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        sched = hydra.utils.instantiate(hp.scheduler)(
            opt, num_warmup_steps=int(hp.warmup_fraction * total), num_training_steps=total
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def export_bound_space(model: BindModule, directory: str | Path, **extra) -> Path:
    """Export a bind module's projectors with their record (omni/export.py's format)."""
    hp = model.hparams
    record = dict(
        space=hp.space,
        anchor=hp.anchor,
        dims=dict(hp.dims),
        out_dim=model.mixture.out_dim,
        hidden_dim=hp.hidden_dim,
        experts=list(model.starts),
        renormalize=hp.renormalize,
        **extra,
    )
    return save_bound_space(model.mixture, directory, record)


def run(cfg: DictConfig) -> float:
    """Train, checkpoint and export the bound space of `cfg.space`; returns the best mean R@1."""
    space, anchor = cfg.space, cfg.anchor
    if cfg.bind.seed is not None:  # the binds' own seed (bench/claims.py varies only the routes)
        L.seed_everything(cfg.bind.seed, workers=True, verbose=False)
    if space.name == anchor.name:
        raise ValueError(f"space {space.name!r} is the anchor; bind a source space")
    if not space.dims:
        raise ValueError(f"space {space.name!r} declares no modality (space.dims is empty)")
    # A space need not share a modality with the anchor: Eq. 1 pairs its modalities with the
    # anchor's through the tuples (a point-only space binds to image-text via 3D-image tuples).
    # _recursive_=False: the optimizer and scheduler stay configs (plain hyperparameters)
    model: BindModule = hydra.utils.instantiate(cfg.model.bind, _recursive_=False)
    root = ensure_data(cfg, [space.name, anchor.name])
    dims = {(s.name, m): d for s in (space, anchor) for m, d in s.dims.items()}
    datamodule = hydra.utils.instantiate(cfg.datamodule)(
        root,
        ensure_tuples(cfg, cfg.bind.pairs, root),
        needs=list(dims),
        dims=dims,
        val_pairs=model.val_pairs,
        batch_size=cfg.bind.batch_size,
    )
    trainer, best, score = fit_best(cfg, model, datamodule, cfg.bind.epochs)
    if trainer.is_global_zero:
        record = tuples_record(cfg, cfg.bind.pairs, root) | validation_record(datamodule)
        export_bound_space(best, cfg.bind.export_dir, best_val_mean_R1=score, **record)
        log.info("bound space %s exported to %s", space.name, cfg.bind.export_dir)
        lineage.log_bind(trainer.logger, cfg, root)  # W&B: tuples in, bound space out
    return score
