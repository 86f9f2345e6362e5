"""Route stage: learn per-input weights over the bound spaces (paper §3.2, Eq. 3-7).

`python train.py stage=route variant=base`. The projectors are frozen, so each bound space's
projections of the cached rows are computed once into "projected caches" and training reads
them like any other cache: only the routers train.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import lightning as L
import matplotlib
import numpy as np
import torch
from omegaconf import DictConfig
from rich.progress import track
from torchmetrics import MeanMetric

from datamodules.artifacts import file_sha256
from datamodules.cache import CacheError, CacheWriter, EmbeddingCache, cache_dir, read_manifest
from datamodules.tuples import link_retrievers, load_tuples
from encoders.modalities import MODALITIES, PAIRS, PROVENANCES
from lightning_modules.evaluation.metrics import compute_directions, direction_metrics
from lightning_modules.omni.losses import (
    alignment_loss,
    decoupling_loss,
    info_nce,
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
from lightning_modules.stages.bind import EXPORT_WEIGHTS, load_bound_space

matplotlib.use("Agg")
log = logging.getLogger(__name__)
PROJECTED = "@omni"  # suffix of a projected cache's space name
# route.align: `all` is the paper's L_align; `leave_retriever_out` computes each pair term of a
# tuple without the groups of the spaces that retrieved that link (pseudo tuples reward them).
ALIGN_MODES = ("all", "leave_retriever_out")


def variant_layout(cfg: DictConfig) -> dict:
    """Groups, predictors, dims and specialties of the variant, from the space configs."""
    names = list(cfg.variant.spaces)
    anchor = cfg.anchor
    others = [p for ps in cfg.variant.predictors.values() for p in ps if p not in names]
    spaces = {**cfg.variant.spaces, **space_configs(dict.fromkeys(others))}
    groups = {}
    for m in MODALITIES:
        g = [s for s in names if m in spaces[s].dims]
        if cfg.variant.include_anchor and m in anchor.dims:
            g.append(anchor.name)
        if g:
            groups[m] = g
    predictors, predictor_dims = {}, {}
    for m in groups:
        preds = list(cfg.variant.predictors.get(m, []))
        if not preds:
            raise ValueError(
                f"variant {cfg.variant.name!r}: no predictors for {m!r} (variant.predictors.{m})"
            )
        for p in preds:
            if m not in spaces[p].dims:
                raise ValueError(f"variant {cfg.variant.name!r}: predictor {p!r} has no {m} side")
        predictors[m] = preds
        predictor_dims[m] = sum(int(spaces[p].dims[m]) for p in preds)
    specialty = {s: spaces[s].text_specialty for s in names} | {anchor.name: anchor.text_specialty}
    specialty |= {s: p for s, p in (cfg.route.get("specialty") or {}).items() if s in specialty}
    return dict(
        spaces=spaces,
        groups=groups,
        predictors=predictors,
        predictor_dims=predictor_dims,
        specialty=specialty,
        anchor=anchor.name,
    )


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


@torch.no_grad()
def ensure_projected(
    root: Path,
    proj_root: Path,
    bound: dict,
    bound_dir: Path,
    dataset: str,
    modality: str,
    dtype: str = "float16",
) -> None:
    """Write each bound space's projections of (dataset, modality) unless they are current."""
    for name, (mixture, _) in bound.items():
        src = cache_dir(root, dataset, name, modality)
        if not src.exists():
            continue
        source = EmbeddingCache(src)
        weights = file_sha256(bound_dir / name / EXPORT_WEIGHTS)[:16]
        fp = f"{weights}-{source.fingerprint}"
        out = cache_dir(proj_root, dataset, name + PROJECTED, modality)
        manifest = read_manifest(out) if out.exists() else None
        if manifest is not None and manifest.get("fingerprint") == fp:
            continue
        writer = CacheWriter(
            out,
            space=name + PROJECTED,
            modality=modality,
            dim=mixture.out_dim,
            dtype=dtype,
            fingerprint=fp,
            overwrite=True,
        )
        for start, chunk in source.iter_chunks(65536):
            z = mixture(torch.from_numpy(chunk)).numpy()
            extras = {
                k: source.extra(k)[start : start + len(z)]
                for k in source.manifest.get("extras", [])
            }
            writer.append(z, source.ids[start : start + len(z)], **extras)
        writer.close(dataset=dataset, source=str(src))


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


class RouteModule(L.LightningModule):
    """Trains the routers of an OmniModel over its frozen projectors: L_align + lambda * L_dec.

    Batches carry each group's projection precomputed (`<space>@omni` caches, the anchor's own
    embeddings) and the predictor spaces' embeddings; `OmniModel.forward` does the routing.
    """

    def __init__(
        self,
        meta: dict,
        kind: str = "routed",
        temperature: float = 0.03,
        align: float = 1.0,
        lambda_dec: float = 3.0,
        lr: float = 1e-3,
        fixed_lr: float = 1e-2,
        weight_decay: float = 0.0,
        gather: bool = True,
        train: list[str] | None = None,
        align_mode: str = "all",
        links: dict | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = OmniModel(meta, kind)
        groups = meta["groups"]
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
        self.val_pairs = [(a, b) for a, b in PAIRS if a in groups and b in groups]
        self.recall = direction_metrics(self.val_pairs)
        self.val_loss = MeanMetric()
        self._weights: dict[str, list[torch.Tensor]] = {}

    def projections(self, emb: dict) -> dict[str, torch.Tensor]:
        """The groups' projections {modality: (batch, groups, omni_dim)} a batch carries."""
        meta = self.model.meta
        projected = {}
        for m, groups in meta["groups"].items():
            keys = [g if g == meta["anchor"] else g + PROJECTED for g in groups]
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
        n = len(self.model.meta["groups"][pair[0]])
        rows = mask[start]
        return {pair[0]: rows[:, :n], pair[1]: rows[:, n:]}

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        hp, meta = self.hparams, self.model.meta
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
        if hp.lambda_dec and hp.kind == "routed" and "text" in out.logits and keep.any():
            specialty = [meta["specialty"][g] for g in meta["groups"]["text"]]
            labels = specialty_labels(batch["provenance"][keep], specialty)
            dec = decoupling_loss(out.logits["text"][keep], labels)
            self.log("train/loss_dec", dec, on_step=False, on_epoch=True)
            loss = loss + hp.lambda_dec * dec
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True)
        return loss

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        a, b = self.val_pairs[dataloader_idx]
        out = self(batch["emb"])
        ea, eb = out.embeddings[a], out.embeddings[b]
        ids = batch["index"]
        self.recall[f"{a}_to_{b}"].update(ea, ids, ids, eb, ids)
        self.recall[f"{b}_to_{a}"].update(eb, ids, ids, ea, ids)
        self.val_loss.update(info_nce(ea, eb, self.hparams.temperature), weight=len(ids))
        # Router weights per modality, and for text per provenance (a caption names its partner).
        for m, partner in ((a, b), (b, a)):
            key = f"text/{partner}" if m == "text" else m
            self._weights.setdefault(key, []).append(out.weights[m].detach().float().mean(0))

    def on_validation_epoch_end(self) -> None:
        scores = compute_directions(self.recall)
        if "val/mean_R@1" in scores:
            self.log("val/mean_R@1", scores.pop("val/mean_R@1"), prog_bar=True)
        self.log_dict(scores)
        self.log("val/loss", self.val_loss.compute())
        self.val_loss.reset()
        self.mean_weights = {k: torch.stack(v).mean(0).cpu() for k, v in self._weights.items()}
        self._weights = {}
        for key, w in self.mean_weights.items():
            m = key.split("/")[0]
            for g, value in zip(self.model.meta["groups"][m], w.tolist(), strict=True):
                self.log(f"router/{key}/{g}", value)

    def configure_optimizers(self):
        hp = self.hparams
        lr = hp.lr if hp.kind == "routed" else hp.fixed_lr  # fixed: a few constants, larger steps
        params = [p for p in self.model.routers.parameters() if p.requires_grad]
        return torch.optim.Adam(params, lr=lr, weight_decay=hp.weight_decay)


def weight_heatmap(
    mean_weights: dict[str, torch.Tensor], groups: dict[str, list[str]], path: Path
) -> Path:
    """PNG heatmap: rows are modalities and text provenances, columns are groups (spaces).

    The weights are the last validation epoch's (the per-epoch values are logged as router/*),
    which need not be the epoch of the exported, best checkpoint.
    """
    import matplotlib.pyplot as plt

    rows = [k for k in [*MODALITIES[:3], *(f"text/{p}" for p in PROVENANCES)] if k in mean_weights]
    columns = list(dict.fromkeys(g for m in groups for g in groups[m]))
    grid = np.full((len(rows), len(columns)), np.nan)
    for i, key in enumerate(rows):
        for g, w in zip(groups[key.split("/")[0]], mean_weights[key].tolist(), strict=True):
            grid[i, columns.index(g)] = w
    fig, ax = plt.subplots(figsize=(1.1 * len(columns) + 2, 0.5 * len(rows) + 1.5))
    im = ax.imshow(grid, cmap="viridis", vmin=0, vmax=1)
    ax.set_xticks(range(len(columns)), columns, rotation=45, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    for (i, j), v in np.ndenumerate(grid):
        if not np.isnan(v):
            ax.text(
                j,
                i,
                f"{v:.2f}",
                ha="center",
                va="center",
                color="w" if v < 0.5 else "k",
                fontsize=8,
            )
    fig.colorbar(im, ax=ax, label="mean router weight")
    ax.set_title("router weights on the validation sets, last epoch")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run(cfg: DictConfig) -> float:
    """Train the routers of `cfg.variant` and export the omni model; returns best mean R@1."""
    layout = variant_layout(cfg)
    groups, anchor = layout["groups"], layout["anchor"]
    sources = [s for s in cfg.variant.spaces]
    bound = load_bound(cfg, sources)
    root = ensure_data(cfg, [*layout["spaces"], anchor])
    proj_root = Path(cfg.paths.output_dir) / "projected"
    tuples = ensure_tuples(cfg, cfg.route.pairs, root)
    tuples_meta = load_tuples(tuples)[1]
    val_pairs = [(a, b) for a, b in PAIRS if a in groups and b in groups]
    pool = tuples_meta["pool"]  # the dataset whose rows the table indexes (its pair.dataset)
    jobs = [(d, m) for d in [pool, *(f"val_{a}_{b}" for a, b in val_pairs)] for m in groups]
    hide = not cfg.trainer.get("enable_progress_bar", True)
    for dataset, m in track(jobs, "route: projecting the bound spaces", disable=hide):
        ensure_projected(
            root, proj_root, bound, Path(cfg.route.bound_dir), dataset, m, cfg.data.dtype
        )
    needs = {(s + PROJECTED if s != anchor else s, m) for m, gs in groups.items() for s in gs}
    needs |= {(p, m) for m, ps in layout["predictors"].items() for p in ps}
    roots = {s + PROJECTED: proj_root for s in sources}
    datamodule = hydra.utils.instantiate(cfg.datamodule)(
        root, tuples, needs, {}, val_pairs, batch_size=cfg.route.batch_size, roots=roots
    )
    meta = dict(
        variant=cfg.variant.name,
        kind=cfg.route.kind,
        anchor=anchor,
        groups=groups,
        predictors=layout["predictors"],
        predictor_dims=layout["predictor_dims"],
        scales={m: float(to_plain(cfg.route.scales).get(m, 1.0)) for m in groups},
        specialty=layout["specialty"],
        spaces={name: b[1] for name, b in bound.items()},
        lambda_dec=cfg.loss.lambda_dec,
        **tuples_record(cfg, cfg.route.pairs, root),
        # How to embed raw items for each space it reads (OmniBind builds them on demand).
        encoders={
            name: {"encoder": to_plain(space.encoder), "dims": to_plain(space.dims)}
            for name, space in {**layout["spaces"], anchor: cfg.anchor}.items()
            if space.get("encoder") is not None
        },
    )
    links = None
    if cfg.route.align == "leave_retriever_out":
        links = link_retrievers(tuples, tuples_meta)
    # meta holds plain records (its encoder configs are data here, not objects to build).
    model: RouteModule = hydra.utils.instantiate(
        cfg.model.route, meta=meta, links=links, _recursive_=False
    )
    for name, (mixture, _) in bound.items():
        model.model.projectors[name].load_state_dict(mixture.state_dict())
    trainer, best, score = fit_best(cfg, model, datamodule, cfg.route.epochs, start_competes=True)
    if trainer.is_global_zero:
        omni = best.model
        start = next(c for c in trainer.callbacks if isinstance(c, StartCompetes))
        omni.meta = {**omni.meta, "best_val_mean_R1": score, "start_val_mean_R1": start.score,
                     **validation_record(datamodule)}  # fmt: skip
        omni.save(cfg.route.export_dir)
        png = weight_heatmap(
            getattr(model, "mean_weights", {}), groups, Path(cfg.run_dir) / "router_weights.png"
        )
        logger = trainer.logger
        if logger is not None and hasattr(logger, "log_image"):
            logger.log_image(key="router_weights", images=[str(png)])
        log.info("omni model (%s) exported to %s", cfg.route.kind, cfg.route.export_dir)
        lineage.log_route(logger, cfg, root)  # W&B: tuples and bound spaces in, omni model out
    return score
