"""Extract stage: run a space's frozen encoder over raw items and fill the embedding cache.

`python train.py stage=extract space=tiny_clip data=demo_raw`

One cache per (dataset, space, modality) under `data.root`. Extraction is Lightning `predict`
with `CacheShardWriter`, a prediction writer that writes each chunk of `extract.shard_size` items
as one shard as soon as its last batch is embedded. A rerun skips finished chunks (resume after a
crash) and complete caches; under DDP each rank writes its own chunks and rank 0 writes the
manifest at the end. `trainer=deepspeed_infer` shards a huge encoder (EVA-CLIP-18B) with ZeRO-3:
the model is built inside `configure_model`, already partitioned, and rank 0 streams the weights
in module by module. A space with `encoders.precomputed.PrecomputedEncoder` is imported from its
dumps.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter, TQDMProgressBar
from omegaconf import DictConfig

from datamodules.artifacts import CacheError
from datamodules.cache import read_manifest
from datamodules.extraction import RawDataModule
from datamodules.jobs import SIDECAR, ExtractJob
from datamodules.synthetic.demo_raw import ensure_demo_raw
from encoders import build_encoder, build_processor, encoder_class
from encoders.base import Encoder
from encoders.precomputed import SUFFIXES, DumpError
from encoders.readers import LoadSettings
from encoders.video import join_audio
from lightning_modules.runtime.config import hub_files, to_plain
from lightning_modules.runtime.training import make_trainer
from lightning_modules.stages.extract_plan import plan, write_manifests

log = logging.getLogger(__name__)
UNIT_TOLERANCE = 1e-2  # |norm - 1| allowed after the encoder's own precision (bf16 included)


class ExtractModule(L.LightningModule):
    """Wraps a frozen encoder for `predict`: a batch of one modality -> unit embeddings."""

    def __init__(
        self,
        encoder_cfg: Mapping,
        dims: Mapping[str, int],
        encoder: Encoder | None = None,
        space: str | None = None,
    ) -> None:
        super().__init__()
        self.encoder_cfg, self.dims = dict(encoder_cfg), dict(dims)
        self.encoder, self.space = encoder, space

    def configure_model(self) -> None:
        """Build the encoder here, so that under ZeRO-3 it is created already partitioned."""
        if self.encoder is not None:
            return
        zero3 = bool(getattr(self.trainer.strategy, "zero_stage_3", False))
        cfg = dict(self.encoder_cfg)
        if zero3 and "precision" in cfg:
            cfg["precision"] = "fp32"  # DeepSpeed's bf16 config casts the partitions itself
        try:
            with hub_files(f"encoder {cfg.get('_target_')}"):
                self.encoder = build_encoder(cfg, self.dims, load_weights=not zero3)
        except (FileNotFoundError, ValueError) as e:  # a checkpoint's error names key and file
            if not self.space:
                raise
            raise type(e)(f"space {self.space!r}: {e}") from e
        if zero3:
            state = self.encoder.pretrained_state_dict() if self.trainer.is_global_zero else None
            load_gathered(self.encoder, state)

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> dict:
        inputs, modality = batch["inputs"], batch["modality"]
        if batch["video"]:
            emb = self.encoder.embed_video(inputs, batch["mask"], batch["audio"],
                                           batch["has_audio"], batch["audio_weight"])  # fmt: skip
        else:
            emb = self.encoder({modality: inputs})[modality]
        return {"emb": emb, "ids": batch["ids"], "pad": batch["pad"],
                "has_audio": batch["has_audio"]}  # fmt: skip


def load_gathered(module: torch.nn.Module, state: Mapping[str, torch.Tensor] | None) -> None:
    """Load a full state dict (given on rank 0 only) into a ZeRO-3 partitioned module.

    Each module's own parameters are gathered, overwritten on rank 0 and re-partitioned (what
    Lightning does to restore ZeRO-3 checkpoints); buffers, which ZeRO-3 does not partition, are
    broadcast from rank 0. Keys must match exactly.
    """
    import deepspeed
    import torch.distributed as dist

    if state is not None:
        expected = set(module.state_dict().keys())
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        if missing or unexpected:
            raise CacheError(f"pretrained weights do not fit the encoder: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")  # fmt: skip
    distributed = dist.is_available() and dist.is_initialized()

    def load(mod: torch.nn.Module, prefix: str) -> None:
        params = list(mod.named_parameters(recurse=False))
        with deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=0):
            if state is not None:
                with torch.no_grad():
                    for name, p in params:
                        p.copy_(state[prefix + name].to(p.dtype))
        with torch.no_grad():
            for name, buf in mod.named_buffers(recurse=False):
                if state is not None and prefix + name in state:
                    buf.copy_(state[prefix + name].to(buf.dtype))
                if distributed:
                    dist.broadcast(buf, src=0)
        for name, child in mod.named_children():
            load(child, f"{prefix}{name}.")

    load(module, "")


class CacheShardWriter(BasePredictionWriter):
    """Collects each chunk's embeddings (and failed items) and writes it as one shard."""

    def __init__(self) -> None:
        super().__init__(write_interval="batch")
        self.open: dict[tuple[int, int], dict[str, list]] = {}

    def write_on_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        prediction: dict,
        batch_indices: Any,
        batch: dict,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        job, _ = trainer.datamodule.loaders[dataloader_idx]
        keep = ~prediction["pad"].cpu()
        ids = prediction["ids"].cpu()[keep].numpy()
        emb = prediction["emb"].detach().float().cpu()[keep]
        norms = emb.norm(dim=1)
        bad = ((norms - 1).abs() > UNIT_TOLERANCE) | ~torch.isfinite(norms)
        if bad.any():
            i = int(bad.nonzero()[0])
            raise CacheError(
                f"{job.name}: the encoder returned an embedding of norm {float(norms[i]):.4g} "
                f"for item {job.items.sources[ids[i]]} (expected L2-normalised)"
            )
        real = [*ids.tolist(), *(i for i, _ in batch["errors"])]
        if not real:
            return  # a batch that only pads this rank's share
        c = real[0] // job.shard_size  # ChunkBatchSampler's batches never cross a chunk
        buf = self.open.setdefault((dataloader_idx, c),
                                   {"ids": [], "emb": [], "errors": [], "audio": []})  # fmt: skip
        buf["ids"].extend(ids.tolist())
        buf["emb"].append(emb.numpy())
        buf["errors"].extend(batch["errors"])
        if prediction.get("has_audio") is not None:  # a video with its audio track joined
            buf["audio"].append(prediction["has_audio"].cpu()[keep].numpy())
        if len(buf["ids"]) + len(buf["errors"]) == len(job.chunk(c)):
            extras = None
            if job.audio_weight is not None:
                tracks = np.concatenate(buf["audio"]) if buf["audio"] else np.zeros(0, bool)
                extras = {"audio_track": tracks.astype(np.int8)}
            job.write_chunk(c, np.concatenate(buf["emb"]), np.asarray(buf["ids"], np.int64),
                            buf["errors"], extras)  # fmt: skip
            del self.open[(dataloader_idx, c)]

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.open:
            names = [f"{trainer.datamodule.loaders[i][0].name} chunk {c}" for i, c in self.open]
            raise CacheError(f"predict ended with unfinished chunks: {names[:5]}")
        trainer.datamodule.finish(trainer)


class ItemsProgressBar(TQDMProgressBar):
    """Lightning's progress bar, counting items (and items/s) instead of batches."""

    def init_predict_tqdm(self):
        bar = super().init_predict_tqdm()
        bar.unit = "item"
        return bar

    def on_predict_batch_start(
        self, trainer, pl_module, batch, batch_idx, dataloader_idx=0
    ) -> None:
        if not self.has_dataloader_changed(dataloader_idx):
            return
        job, sampler = trainer.datamodule.loaders[dataloader_idx]
        self.items_done = 0
        bar = self.predict_progress_bar
        bar.reset(total=sampler.num_items)
        bar.set_description(f"extract {job.name}")

    def on_predict_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ) -> None:
        self.items_done += int((~batch["pad"]).sum()) + len(batch["errors"])
        bar = self.predict_progress_bar
        if not bar.disable:
            bar.n = self.items_done
            bar.refresh()


def import_precomputed(cfg: DictConfig, jobs: list[ExtractJob]) -> list[dict]:
    """Precomputed spaces: copy the dumped rows of every item into the cache, in item order."""
    encoder_cfg, dims = to_plain(cfg.space.encoder), dict(cfg.space.dims)
    manifests = []
    for job in jobs:
        if not job.prepare(cfg.extract.overwrite):
            log.info("%s is already imported (%s)", job.name, job.directory)
            continue
        keys = {job.modality: job.items.keys}
        if job.audio_weight is not None:  # the videos' audio tracks: <dataset>/audio.* rows
            keys["audio"] = job.items.keys
        encoder = build_encoder(encoder_cfg, dims, dataset=job.dataset, keys=keys)
        emb_all, found = encoder.table(job.modality)
        tracks = audio_track_dump(encoder, job)
        for c in job.pending_chunks():
            ids, errors = [], []
            for i in job.chunk(c):
                row = found.get(job.items.keys[i])
                if row is None:
                    errors.append((i, "missing from the precomputed dump"))
                elif not np.isfinite(emb_all[row]).all() or not np.linalg.norm(emb_all[row]):
                    errors.append((i, "the dumped embedding is zero, NaN or inf"))
                else:
                    ids.append(i)
            if errors and cfg.extract.on_error == "raise":
                i, msg = errors[0]
                raise DumpError(f"{encoder.path / job.dataset}: item {job.items.keys[i]!r} {msg} "
                                f"({len(errors)} such items in chunk {c}); set "
                                "extract.on_error=skip to skip and list them")  # fmt: skip
            keys = [job.items.keys[i] for i in ids]
            emb = encoder({job.modality: keys})[job.modality] if ids else None
            extras = None
            if tracks is not None:
                has = torch.tensor([k in tracks for k in keys], dtype=torch.bool)
                if has.any():
                    audio = encoder({"audio": [k for k in keys if k in tracks]})["audio"]
                    emb[has] = join_audio(emb[has], audio, job.audio_weight)
                extras = {"audio_track": has.numpy().astype(np.int8)}
            emb = emb.numpy() if emb is not None else None
            job.write_chunk(c, emb, np.asarray(ids, np.int64), errors, extras)
        manifests.append(job.finalize())
    return manifests


def audio_track_dump(encoder, job: ExtractJob) -> dict[str, int] | None:
    """Precomputed videos with `audio_track` on: {video key: row} of the dump's `audio` table of
    the video dataset (their audio tracks' embeddings); empty when there is no such dump."""
    if job.audio_weight is None:
        return None
    folder = encoder.path / job.dataset
    if not any((folder / f"audio{suffix}").exists() for suffix in SUFFIXES):
        log.warning("%s: video.audio_track is on, but %s holds no audio{%s} dump of the clips' "
                    "audio tracks; every clip is embedded from its frames only", job.name,
                    folder, ",".join(SUFFIXES))  # fmt: skip
        return {}
    return encoder.table("audio")[1]


def run(cfg: DictConfig) -> int:
    """Extract every cache the data config and the space have in common; returns rows written."""
    data = cfg.data
    if data.get("kind") != "raw":
        raise ValueError(
            f"stage=extract reads raw items, but data={data.get('name')!r} is "
            f"{data.get('kind')!r}; use a raw data config such as data=demo_raw (the synthetic "
            "world writes its caches itself)"
        )
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # DataLoader workers fork
    if data.get("generate") == "demo":
        ensure_demo_raw(data.source, seed=data.seed)
    jobs = plan(cfg)  # reads and checks every item list before any cache is touched
    for path in write_manifests(cfg):
        log.info("benchmark manifest for the evaluate stage: %s", path)
    if not cfg.extract.overwrite and all(job.is_complete() for job in jobs):
        log.info("every cache of %s for %s is already extracted", cfg.space.name, data.name)
        return 0
    if encoder_class(cfg.space.get("encoder")).precomputed:
        with discard_if_empty(jobs):
            manifests = import_precomputed(cfg, jobs)
        return sum(m["count"] for m in manifests)
    encoder_cfg, dims = to_plain(cfg.space.encoder), dict(cfg.space.dims)
    settings = LoadSettings(**to_plain(data.get("load", {})), seed=int(data.seed))
    with hub_files(f"space {cfg.space.name!r}"):  # its tokenizer and image processor
        processor = build_processor(encoder_cfg, dims)
    dm = RawDataModule(
        jobs, processor, settings, batch_size=cfg.extract.batch_size,
        num_workers=cfg.extract.num_workers, on_error=cfg.extract.on_error,
        overwrite=cfg.extract.overwrite,
    )  # fmt: skip
    bar = [ItemsProgressBar()] if cfg.trainer.get("enable_progress_bar", True) else []
    trainer = make_trainer(cfg, 1, [CacheShardWriter(), *bar], logger=False)
    with discard_if_empty(jobs, trainer), warnings.catch_warnings():
        # Lightning cannot see that ChunkBatchSampler yields every index; it does.
        warnings.filterwarnings("ignore", message=".*custom batch sampler.*")
        module = ExtractModule(encoder_cfg, dims, space=cfg.space.name)
        trainer.predict(module, datamodule=dm, return_predictions=False)
    if not dm.finished:  # nothing was left to embed, so no predict hook ran
        dm.finish(trainer)
    if trainer.is_global_zero:
        for job in dm.active:
            log.info("extracted %s -> %s", job.name, job.directory)
    return sum(len(job.items) for job in dm.active)


@contextlib.contextmanager
def discard_if_empty(jobs: list[ExtractJob], trainer: L.Trainer | None = None) -> Iterator[None]:
    """On a failure, remove each cache directory this configuration started but wrote no shard
    into: its marker would refuse the corrected rerun as an interrupted extraction of another
    configuration, though there is nothing to resume."""
    try:
        yield
    except BaseException:
        if trainer is None or trainer.is_global_zero:
            for job in jobs:
                sidecar = job.directory / SIDECAR
                if not sidecar.exists() or job.done_chunks() or read_manifest(job.directory):
                    continue
                if json.loads(sidecar.read_text()).get("fingerprint") == job.fingerprint:
                    shutil.rmtree(job.directory)
        raise


def read_errors(directory: str | Path) -> list[dict]:
    """The items an extraction skipped, with their reasons (empty when none failed)."""
    path = Path(directory) / "errors.json"
    return json.loads(path.read_text()) if path.exists() else []
