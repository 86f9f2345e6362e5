"""Figures: the router-weight heatmap the route stage logs.

Drawn on matplotlib's object API (a `Figure` with its own Agg canvas), so importing this module
selects no global backend.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure

from encoders.modalities import MODALITIES, PROVENANCES


def weight_heatmap(
    mean_weights: dict[str, torch.Tensor], groups: dict[str, list[str]], path: Path
) -> Path:
    """PNG heatmap: rows are modalities and text provenances, columns are groups (spaces).

    The weights are the last validation epoch's (the per-epoch values are logged as router/*),
    which need not be the epoch of the exported, best checkpoint.
    """
    rows = [k for k in [*MODALITIES[:3], *(f"text/{p}" for p in PROVENANCES)] if k in mean_weights]
    columns = list(dict.fromkeys(g for m in groups for g in groups[m]))
    grid = np.full((len(rows), len(columns)), np.nan)
    for i, key in enumerate(rows):
        for g, w in zip(groups[key.split("/")[0]], mean_weights[key].tolist(), strict=True):
            grid[i, columns.index(g)] = w
    fig = Figure(figsize=(1.1 * len(columns) + 2, 0.5 * len(rows) + 1.5))
    ax = fig.subplots()
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
    return path
