"""Patch values on a grid of cells: the one rasteriser behind the heatmap's regions and the
refined maps (overlapping patches averaged, as the heatmap paints them), and which cells of
such a grid lie on the slide's tissue."""

from __future__ import annotations

import numpy as np

from mil_cli.stores import SlideImages


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


def on_tissue(images: SlideImages, origin: np.ndarray, pixel: float, shape: tuple[int, int]) -> np.ndarray:
    """Which pixels of a level-0 grid (origin, pixel size, shape) have their centre on the
    thumbnail's tissue mask."""
    rows = ((origin[1] + (np.arange(shape[0]) + 0.5) * pixel) / images.downsample).astype(int)
    cols = ((origin[0] + (np.arange(shape[1]) + 0.5) * pixel) / images.downsample).astype(int)
    mask = images.tissue_mask
    return mask[np.clip(rows, 0, mask.shape[0] - 1)][:, np.clip(cols, 0, mask.shape[1] - 1)]
