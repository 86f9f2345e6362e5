"""Retrieval validation shared by the bind and route modules.

Each validation dataloader is one paired set (a, b); every epoch logs R@K of both directions,
their mean (`val/mean_R@1`, what checkpoints, early stopping and StartCompetes monitor) and the
InfoNCE loss of the pairs, with CLIP_benchmark's semantics (evaluation/metrics.py).
"""

from __future__ import annotations

import lightning as L
import torch
from torchmetrics import MeanMetric

from lightning_modules.evaluation.metrics import compute_directions, direction_metrics
from lightning_modules.omni.losses import info_nce


class RetrievalValidation(L.LightningModule):
    """A LightningModule whose validation is paired retrieval over `val_pairs`."""

    def setup_validation(self, pairs: list[tuple[str, str]]) -> None:
        """The (a, b) pair of each validation dataloader, in dataloader order."""
        self.val_pairs = pairs
        self.recall = direction_metrics(pairs)
        self.val_loss = MeanMetric()

    def score_pair(self, batch: dict, ea: torch.Tensor, eb: torch.Tensor, a: str, b: str) -> None:
        """Accumulate one batch of the (a, b) set: embeddings ea, eb of its rows."""
        ids = batch["index"]
        self.recall[f"{a}_to_{b}"].update(ea, ids, ids, eb, ids)
        self.recall[f"{b}_to_{a}"].update(eb, ids, ids, ea, ids)
        self.val_loss.update(info_nce(ea, eb, self.hparams.temperature), weight=len(ids))

    def on_validation_epoch_end(self) -> None:
        scores = compute_directions(self.recall)
        if "val/mean_R@1" in scores:
            self.log("val/mean_R@1", scores.pop("val/mean_R@1"), prog_bar=True)
        self.log_dict(scores)
        self.log("val/loss", self.val_loss.compute())
        self.val_loss.reset()
