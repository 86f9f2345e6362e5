"""Route stage: learn per-input weights over the bound spaces (paper §3.2, Eq. 3-7).

`python train.py stage=route variant=base`. The projectors are frozen, so each bound space's
projections of the cached rows are computed once into "projected caches" and training reads
them like any other cache: only the routers train.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig
from rich.progress import track

from datamodules.artifacts import CacheError, file_sha256
from datamodules.projected import ensure_projected, projected_roots, projected_space
from datamodules.tuples import link_retrievers, load_tuples
from encoders.modalities import MODALITIES, PAIRS
from lightning_modules.evaluation.plots import weight_heatmap
from lightning_modules.omni.export import BOUND_WEIGHTS, load_bound_space, save_omni
from lightning_modules.omni.layout import OmniLayout, variant_groups
from lightning_modules.omni.losses import (
    alignment_loss,
    decoupling_loss,
    pair_alignment_loss,
)
from lightning_modules.omni.model import (
    OmniModel,
    RouterOutput,
    combine,
    leave_out,
    specialty_labels,
)
from lightning_modules.runtime import lineage
from lightning_modules.runtime.config import (
    ensure_data,
    ensure_tuples,
    space_configs,
    to_plain,
    tuples_record,
    validation_record,
)
from lightning_modules.runtime.training import StartCompetes, fit_best
from lightning_modules.stages.validation import RetrievalValidation

log = logging.getLogger(__name__)
# The config sections a route's export depends on: `stage=pipeline` reroutes when one changes.
DEPENDS = ("data", "anchor", "seed", "variant", "route", "model.route", "loss", "datamodule",
           "callbacks", "trainer")  # fmt: skip
# route.align: `all` is the paper's L_align; `leave_retriever_out` computes each pair term of a
# tuple without the groups of the spaces that retrieved that link (pseudo tuples reward them).
ALIGN_MODES = ("all", "leave_retriever_out")


def load_bound(cfg: DictConfig, names: list[str]) -> dict[str, tuple]:
    """Each space's bound projectors; a missing one names the command that binds it."""
    out = {}
    for name in names:
        directory = Path(cfg.route.bound_dir) / name
        try:
            out[name] = load_bound_space(directory)
        except CacheError as e:
            raise CacheError(
                f"space {name!r} of variant {cfg.variant.name!r} was never bound ({e}); bind it:"
                f" python train.py stage=bind space={name} paths.output_dir={cfg.paths.output_dir}"
            ) from e
    return out


def leave_out_masks(
    links: dict[str, dict[str, list[str]]], groups: dict[str, list[str]]
) -> dict[tuple[str, str], torch.Tensor]:
    """{(a, b): (starts, groups of a + groups of b) bool}: per start modality, the groups of the
    spaces that retrieved the link between a and b (links: datamodules.tuples.link_retrievers)."""
    masks = {}
    for a, b in PAIRS:
        if a not in groups or b not in groups:
            continue
        mask = torch.zeros(len(MODALITIES), len(groups[a]) + len(groups[b]), dtype=torch.bool)
        for s, start in enumerate(MODALITIES):
            spaces = set(links.get(start, {}).get(f"{a}_{b}", []))
            mask[s] = torch.tensor([g in spaces for g in [*groups[a], *groups[b]]])
        masks[(a, b)] = mask
    return masks


class RouteModule(RetrievalValidation):
    """Trains the routers of an OmniModel over its frozen projectors: L_align + lambda * L_dec.

    Batches carry each group's projection precomputed (`<space>@omni` caches, the anchor's own
    embeddings) and the predictor spaces' embeddings; `OmniModel.forward` does the routing.
    """

    def __init__(
        self,
        layout: dict,
        temperature: float,
        align: float,
        lambda_dec: float,
        optimizer: dict,
        gather: bool,
        train: list[str] | None,
        align_mode: str,
        links: dict | None = None,
        bound: dict[str, str] | None = None,
    ) -> None:
        """Values from conf/model/route.yaml (declared once there); the stage adds the layout,
        the tuples' `links` (leave_retriever_out) and the `bound` space directories."""
        super().__init__()
        self.save_hyperparameters()
        self.model = OmniModel(OmniLayout.from_dict(layout))
        # bound: {space: its bound-space directory}. The frozen projectors are read from there,
        # and checkpoints then hold only what trains plus the bound weights' digests.
        self.bound_sha256 = {}
        for name, directory in (bound or {}).items():
            mixture, _ = load_bound_space(directory)
            self.model.projectors[name].load_state_dict(mixture.state_dict())
            self.bound_sha256[name] = file_sha256(Path(directory) / BOUND_WEIGHTS)
        groups = self.model.layout.groups
        trained = list(groups) if train is None else list(train)
        unknown = sorted(set(trained) - set(groups))
        if unknown or not trained:
            raise ValueError(
                f"route.train={trained}: expected a non-empty list of the routed modalities "
                f"{list(groups)} (null: all)"
            )
        for m in set(groups) - set(trained):  # held at their start: uniform weights
            self.model.routers[m].requires_grad_(False)
        if align_mode not in ALIGN_MODES:
            raise ValueError(f"route.align is {align_mode!r}; expected one of {ALIGN_MODES}")
        if align_mode == "leave_retriever_out":
            if not links:
                raise ValueError("route.align=leave_retriever_out needs the tuples' `links`")
            for (a, b), mask in leave_out_masks(links, groups).items():  # follow the device
                self.register_buffer(f"leave_out_{a}_{b}", mask, persistent=False)
        self.setup_validation([(a, b) for a, b in PAIRS if a in groups and b in groups])
        self._weights: dict[str, list[torch.Tensor]] = {}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Checkpoints keep the routers; the frozen projectors are named by their digests."""
        if not self.bound_sha256 or "state_dict" not in checkpoint:  # DeepSpeed saves its own
            return
        checkpoint["bound_sha256"] = self.bound_sha256
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith("model.projectors.")]:
            del state[key]

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Refill the projectors from the bound spaces read in __init__, if they are the same."""
        saved = checkpoint.get("bound_sha256")
        if saved is None or "state_dict" not in checkpoint:
            return
        for name, digest in saved.items():
            if self.bound_sha256.get(name) != digest:
                where = Path(self.hparams.bound[name]) / BOUND_WEIGHTS
                raise CacheError(
                    f"{where}: the bound space {name!r} changed since this route checkpoint was "
                    f"written (sha256 {digest[:16]}, now {self.bound_sha256.get(name, '?')[:16]});"
                    " rerun the route stage without resume"
                )
        state = checkpoint["state_dict"]
        for key, value in self.state_dict().items():
            if key.startswith("model.projectors."):
                state.setdefault(key, value)

    def projections(self, emb: dict) -> dict[str, torch.Tensor]:
        """The groups' projections {modality: (batch, groups, omni_dim)} a batch carries."""
        layout = self.model.layout
        projected = {}
        for m, groups in layout.groups.items():
            keys = [g if g == layout.anchor else projected_space(g) for g in groups]
            if all(m in emb.get(k, {}) for k in keys):
                projected[m] = torch.stack([emb[k][m] for k in keys], 1)
        return projected

    def forward(self, emb: dict, projected: dict | None = None) -> RouterOutput:
        """A batch's omni embeddings, weights and router logits for every modality it carries."""
        projected = self.projections(emb) if projected is None else projected
        return self.model(emb, projected=projected, with_router=True)

    def alignment(self, out: RouterOutput, projected: dict, batch: dict) -> torch.Tensor:
        """L_align (Eq. 5), or with each link's retrievers left out of its pair term."""
        hp = self.hparams
        weights = batch.get("weight")  # 0 where a tuple has no item of a modality
        if hp.align_mode == "all":
            return alignment_loss(out.embeddings, hp.temperature, weights, hp.gather)
        names = sorted(out.embeddings)
        terms = {}
        for i, a in enumerate(names):
            for b in names[i + 1 :]:
                pair = tuple(sorted((a, b), key=MODALITIES.index))
                masks = self._leave_out_mask(pair, batch["start"])
                terms[(a, b)] = tuple(
                    combine(projected[m], leave_out(out.weights[m], masks[m])) for m in (a, b)
                )
        return pair_alignment_loss(terms, hp.temperature, weights, hp.gather)

    def _leave_out_mask(self, pair: tuple[str, str], start: torch.Tensor) -> dict:
        """{modality: (batch, groups) bool}: the groups to leave out of each row's pair term."""
        mask = getattr(self, f"leave_out_{pair[0]}_{pair[1]}")  # (starts, groups of a and b)
        n = len(self.model.layout.groups[pair[0]])
        rows = mask[start]
        return {pair[0]: rows[:, :n], pair[1]: rows[:, n:]}

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        hp, layout = self.hparams, self.model.layout
        projected = self.projections(batch["emb"])
        out = self(batch["emb"], projected)
        weights = batch.get("weight")
        loss = hp.align * self.alignment(out, projected, batch)
        self.log("train/loss_align", loss, on_step=False, on_epoch=True)
        # L_dec labels the routers' input-dependent choice: fixed weights have none to decouple.
        # Only texts with a known provenance (and present in the tuple) have labels.
        keep = batch["provenance"] >= 0
        if weights is not None and "text" in weights:
            keep &= weights["text"] > 0
        routed = layout.kind == "routed"
        if hp.lambda_dec and routed and "text" in out.logits and keep.any():
            specialty = [layout.specialty[g] for g in layout.groups["text"]]
            labels = specialty_labels(batch["provenance"][keep], specialty)
            dec = decoupling_loss(out.logits["text"][keep], labels)
            self.log("train/loss_dec", dec, on_step=False, on_epoch=True)
            loss = loss + hp.lambda_dec * dec
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True)
        return loss

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        a, b = self.val_pairs[dataloader_idx]
        out = self(batch["emb"])
        self.score_pair(batch, out.embeddings[a], out.embeddings[b], a, b)
        # Router weights per modality, and for text per provenance (a caption names its partner).
        for m, partner in ((a, b), (b, a)):
            key = f"text/{partner}" if m == "text" else m
            self._weights.setdefault(key, []).append(out.weights[m].detach().float().mean(0))

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        self.mean_weights = {k: torch.stack(v).mean(0).cpu() for k, v in self._weights.items()}
        self._weights = {}
        for key, w in self.mean_weights.items():
            m = key.split("/")[0]
            for g, value in zip(self.model.layout.groups[m], w.tolist(), strict=True):
                self.log(f"router/{key}/{g}", value)

    def configure_optimizers(self):
        """`optimizer` (a `_partial_` config) over the routers (or fixed weights) that train."""
        params = [p for p in self.model.routers.parameters() if p.requires_grad]
        return hydra.utils.instantiate(self.hparams.optimizer)(params)


def variant_layout(cfg: DictConfig, bound: dict[str, tuple]) -> OmniLayout:
    """The variant's omni layout: its spaces' configs, the bound spaces and the route settings."""
    names, anchor = list(cfg.variant.spaces), cfg.anchor
    others = [p for ps in cfg.variant.predictors.values() for p in ps if p not in names]
    spaces = {**cfg.variant.spaces, **space_configs(dict.fromkeys(others))}
    dims = {s: to_plain(c.dims) for s, c in {**spaces, anchor.name: anchor}.items()}
    groups, predictors, predictor_dims = variant_groups(
        cfg.variant.name, names, dims, anchor.name, cfg.variant.include_anchor,
        to_plain(cfg.variant.predictors),
    )  # fmt: skip
    specialty = {s: spaces[s].text_specialty for s in names} | {anchor.name: anchor.text_specialty}
    specialty |= {s: p for s, p in (cfg.route.get("specialty") or {}).items() if s in specialty}
    return OmniLayout(
        anchor=anchor.name,
        groups=groups,
        predictors=predictors,
        predictor_dims=predictor_dims,
        scales={m: float(to_plain(cfg.route.scales).get(m, 1.0)) for m in groups},
        spaces={name: b[1] for name, b in bound.items()},
        kind=cfg.route.kind,
        variant=cfg.variant.name,
        specialty=specialty,
        # How to embed raw items for each space it reads (OmniBind builds them on demand).
        encoders={
            name: {"encoder": to_plain(space.encoder), "dims": to_plain(space.dims)}
            for name, space in {**spaces, anchor.name: anchor}.items()
            if space.get("encoder") is not None
        },
    )


def run(cfg: DictConfig) -> float:
    """Train the routers of `cfg.variant` and export the omni model; returns best mean R@1."""
    sources = list(cfg.variant.spaces)
    bound = load_bound(cfg, sources)
    layout = variant_layout(cfg, bound)
    groups, anchor = layout.groups, layout.anchor
    root = ensure_data(cfg, [*sources, *(p for ps in layout.predictors.values() for p in ps),
                             anchor])  # fmt: skip
    proj_root = Path(cfg.paths.output_dir) / "projected"
    tuples = ensure_tuples(cfg, cfg.route.pairs, root)
    tuples_meta = load_tuples(tuples)[1]
    val_pairs = [(a, b) for a, b in PAIRS if a in groups and b in groups]
    pool = tuples_meta["pool"]  # the dataset whose rows the table indexes (its pair.dataset)
    jobs = [(d, m) for d in [pool, *(f"val_{a}_{b}" for a, b in val_pairs)] for m in groups]
    hide = not cfg.trainer.get("enable_progress_bar", True)
    bound_dir = Path(cfg.route.bound_dir)
    projectors = {name: (mixture, file_sha256(bound_dir / name / BOUND_WEIGHTS)[:16])
                  for name, (mixture, _) in bound.items()}  # fmt: skip
    for dataset, m in track(jobs, "route: projecting the bound spaces", disable=hide):
        ensure_projected(root, proj_root, projectors, dataset, m, cfg.data.dtype)
    needs = {(projected_space(s) if s != anchor else s, m) for m, gs in groups.items() for s in gs}
    needs |= {(p, m) for m, ps in layout.predictors.items() for p in ps}
    roots = projected_roots(proj_root, projectors)
    datamodule = hydra.utils.instantiate(cfg.datamodule)(
        root, tuples, needs, {}, val_pairs, batch_size=cfg.route.batch_size, roots=roots
    )
    record = dict(lambda_dec=cfg.loss.lambda_dec, **tuples_record(cfg, cfg.route.pairs, root))
    layout = layout.replace(record=record)
    links = None
    if cfg.route.align == "leave_retriever_out":
        links = link_retrievers(tuples, tuples_meta)
    # The layout is passed as its plain record (its encoder configs are data, not objects).
    model: RouteModule = hydra.utils.instantiate(
        cfg.model.route, layout=layout.to_dict(), links=links, _recursive_=False,
        bound={name: str(bound_dir / name) for name in bound},
    )  # fmt: skip
    trainer, best, score = fit_best(cfg, model, datamodule, cfg.route.epochs, start_competes=True)
    if trainer.is_global_zero:
        omni = best.model
        start = next(c for c in trainer.callbacks if isinstance(c, StartCompetes))
        omni.layout = omni.layout.replace(record={
            "best_val_mean_R1": score, "start_val_mean_R1": start.score,
            **validation_record(datamodule)})  # fmt: skip
        save_omni(omni, cfg.route.export_dir)
        png = weight_heatmap(
            getattr(model, "mean_weights", {}), groups, Path(cfg.run_dir) / "router_weights.png"
        )
        logger = trainer.logger
        if logger is not None and hasattr(logger, "log_image"):
            logger.log_image(key="router_weights", images=[str(png)])
        log.info("omni model (%s) exported to %s", cfg.route.kind, cfg.route.export_dir)
        lineage.log_route(logger, cfg, root)  # W&B: tuples and bound spaces in, omni model out
    return score
