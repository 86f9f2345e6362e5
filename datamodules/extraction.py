"""Raw items -> encoder batches for the extract stage: the dataset, sampler and DataModule.

`RawDataModule` gives one predict DataLoader per cache with chunks left (datamodules/jobs.py),
sharded by rank; item lists are in datamodules/items.py, file readers in encoders/readers.py.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from datamodules.items import RawDataError
from datamodules.jobs import ExtractJob
from encoders.base import Processor, pad_frames
from encoders.readers import LoadSettings, load_audio_track, load_frames, load_raw

log = logging.getLogger(__name__)


class Sample(NamedTuple):
    index: int
    pad: bool  # not a real row: a sampler pad, or a failed item standing in with fallback data
    data: Any
    error: str | None


class RawDataset(Dataset):
    """Loads and prepares one item per index; a failed item either raises (on_error=raise) or
    comes back flagged, with a loadable item's data standing in so that batches keep their shape.
    A video of a job with `audio_weight` is (frames, its prepared audio track or None).
    """

    def __init__(
        self, job: ExtractJob, processor: Processor, settings: LoadSettings, on_error: str = "skip"
    ) -> None:
        if on_error not in ("skip", "raise"):
            raise ValueError(f"extract.on_error is {on_error!r}; expected skip or raise")
        self.job, self.processor, self.settings, self.on_error = job, processor, settings, on_error
        self._fallback: Any = None

    def __len__(self) -> int:
        return len(self.job.items)

    def load(self, index: int) -> Any:
        """Item `index` prepared for the encoder (raises on an unreadable file)."""
        m, s, p = self.job.modality, self.settings, self.processor
        source = self.job.items.sources[index]
        if self.job.frames:
            frames = load_frames(source, self.job.frames, self.job.stride, s.frame_size)
            frames = torch.stack([p.item(m, f) for f in frames])
            if self.job.audio_weight is None:
                return frames
            wave = load_audio_track(source, p.sample_rate, p.clip_samples, s.clip, s.pad)
            return frames, None if wave is None else p.item("audio", wave)
        return p.item(m, load_raw(m, source, p, s, index))

    def fallback(self) -> Any:
        """The data of the first loadable item (stands in for failed items)."""
        if self._fallback is None:
            for i in range(len(self)):
                try:
                    self._fallback = self.load(i)
                    break
                except Exception:  # noqa: BLE001 - any unreadable item is skipped here
                    continue
            else:
                raise RawDataError(f"{self.job.name}: no item could be loaded")
        return self._fallback

    def __getitem__(self, key: tuple[int, bool]) -> Sample:
        index, pad = key
        try:
            return Sample(index, pad, self.load(index), None)
        except Exception as e:  # noqa: BLE001 - decoders raise many types; all mean "unreadable"
            source = self.job.items.sources[index]
            where = source if self.job.modality != "text" else f"text item {index}"
            message = f"{type(e).__name__}: {e}"
            if self.on_error == "raise":
                raise RawDataError(
                    f"{where}: unreadable {self.job.modality} ({message}); set "
                    "extract.on_error=skip to skip and list such items"
                ) from e
            # A sampler pad that fails is a duplicate of a real item: not an error of its own.
            return Sample(index, True, self.fallback(), None if pad else message)


class ChunkBatchSampler(Sampler[list[tuple[int, bool]]]):
    """Batches of (index, pad) that never cross a chunk; pads up to `n_batches` so every rank
    runs the same number of forward passes (ZeRO-3 gathers weights collectively)."""

    def __init__(
        self, chunks: Sequence[range], batch_size: int, n_batches: int, pad_index: int
    ) -> None:
        self.chunks, self.batch_size = list(chunks), batch_size
        self.n_batches, self.pad_index = n_batches, pad_index
        self.num_items = sum(len(c) for c in self.chunks)

    @staticmethod
    def count(chunks: Sequence[range], batch_size: int) -> int:
        return sum(math.ceil(len(c) / batch_size) for c in chunks)

    def __iter__(self) -> Iterator[list[tuple[int, bool]]]:
        n = 0
        for chunk in self.chunks:
            for start in range(0, len(chunk), self.batch_size):
                yield [(i, False) for i in chunk[start : start + self.batch_size]]
                n += 1
        for _ in range(self.n_batches - n):
            yield [(self.pad_index, True)]

    def __len__(self) -> int:
        return self.n_batches


class Collate:
    """Samples -> {ids (B,), pad (B,), inputs (the processor's batch), errors [(id, msg)]};
    video: inputs (B, T, 3, H, W) zero-padded to the longest clip, and `mask` (B, T); with an
    `audio_weight`, `audio` (the audio batch of the clips with a track) and `has_audio` (B,)."""

    def __init__(
        self, processor: Processor, modality: str, video: bool, audio_weight: float | None = None
    ) -> None:
        self.processor, self.modality, self.video = processor, modality, video
        self.audio_weight = audio_weight

    def __call__(self, samples: Sequence[Sample]) -> dict:
        data, mask, audio, has_audio = [s.data for s in samples], None, None, None
        if self.video and self.audio_weight is not None:
            data, tracks = zip(*data, strict=True)
            has_audio = torch.tensor([t is not None for t in tracks], dtype=torch.bool)
            if has_audio.any():
                audio = self.processor.batch("audio", [t for t in tracks if t is not None])
        inputs = pad_frames(data) if self.video else self.processor.batch(self.modality, data)
        if self.video:
            inputs, mask = inputs
        return dict(
            ids=torch.tensor([s.index for s in samples], dtype=torch.long),
            pad=torch.tensor([s.pad for s in samples], dtype=torch.bool),
            inputs=inputs,
            mask=mask,
            errors=[(s.index, s.error) for s in samples if s.error is not None],
            modality=self.modality,
            video=self.video,
            audio=audio,
            has_audio=has_audio,
            audio_weight=self.audio_weight,
        )


def _rank(trainer) -> tuple[int, int, Callable[[], None]]:
    if trainer is None:
        return 0, 1, lambda: None
    return trainer.global_rank, trainer.world_size, trainer.strategy.barrier


class RawDataModule(L.LightningDataModule):
    """One predict DataLoader per cache with chunks left to extract, sharded by rank.

    `setup` prepares the cache directories on rank 0, then every rank reads which chunks are
    done and takes every world_size-th pending chunk.
    """

    def __init__(
        self,
        jobs: Sequence[ExtractJob],
        processor: Processor,
        settings: LoadSettings,
        batch_size: int = 64,
        num_workers: int = 0,
        on_error: str = "skip",
        overwrite: bool = False,
    ) -> None:
        super().__init__()
        self.jobs, self.processor, self.settings = list(jobs), processor, settings
        self.batch_size, self.num_workers = int(batch_size), int(num_workers)
        self.on_error, self.overwrite = on_error, overwrite
        self.active: list[ExtractJob] = []  # not complete: finalize these at the end
        self.loaders: list[tuple[ExtractJob, ChunkBatchSampler]] = []
        self.finished = False

    def setup(self, stage: str | None = None) -> None:
        rank, world, barrier = _rank(getattr(self, "trainer", None))
        if rank == 0:
            for job in self.jobs:
                if not job.prepare(self.overwrite):
                    log.info("%s is already extracted (%s)", job.name, job.directory)
        barrier()
        self.active = [job for job in self.jobs if not job.is_complete()]
        self.loaders = []
        for job in self.active:
            pending = [job.chunk(c) for c in job.pending_chunks()]
            if not pending:
                continue
            mine = pending[rank::world]
            n_batches = max(ChunkBatchSampler.count(pending[r::world], self.batch_size)
                            for r in range(world))  # fmt: skip
            sampler = ChunkBatchSampler(mine, self.batch_size, n_batches, pending[0].start)
            self.loaders.append((job, sampler))
        barrier()  # nobody writes a chunk before every rank has read what is pending

    def predict_dataloader(self) -> list[DataLoader]:
        return [
            DataLoader(
                RawDataset(job, self.processor, self.settings, self.on_error),
                batch_sampler=sampler,
                collate_fn=Collate(
                    self.processor, job.modality, bool(job.frames), job.audio_weight
                ),  # fmt: skip
                num_workers=self.num_workers,
                pin_memory=torch.cuda.is_available(),
            )
            for job, sampler in self.loaders
        ]

    def finish(self, trainer=None) -> list[dict]:
        """After every rank has written its chunks: rank 0 writes each cache's manifest."""
        rank, _, barrier = _rank(trainer)
        barrier()
        manifests = []
        if rank == 0 and not self.finished:
            manifests = [job.finalize() for job in self.active]
        self.finished = True
        return manifests
