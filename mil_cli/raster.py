"""Patch values on a grid of cells: the one rasteriser behind the heatmap's regions and the
refined maps (overlapping patches averaged, as the heatmap paints them)."""

from __future__ import annotations

import numpy as np


def cell_means(coords: np.ndarray, step: int, size: int, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The patch values on the grid of `step`-px cells, each cell the mean of the patches
    covering it (as the heatmap paints overlapping patches; NaN where none does), and the
    cells' level-0 origin."""
    origin = coords.min(axis=0).astype(float)
    cells = np.round((coords - origin) / step).astype(int)
    span = max(1, int(round(size / step)))  # cells a patch covers per side
    shape = (cells[:, 1].max() + span, cells[:, 0].max() + span)
    total, count = np.zeros(shape), np.zeros(shape)
    for dy in range(span):
        for dx in range(span):
            np.add.at(total, (cells[:, 1] + dy, cells[:, 0] + dx), values)
            np.add.at(count, (cells[:, 1] + dy, cells[:, 0] + dx), 1)
    with np.errstate(invalid="ignore"):
        return total / count, origin
