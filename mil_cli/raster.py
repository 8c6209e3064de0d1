"""Patch values on a grid of cells: the one rasteriser behind the heatmap's regions and the
refined maps (overlapping patches averaged, as the heatmap paints them), which cells of
such a grid (or which points) lie on the slide's tissue, and the small box on the patch
grid that holds most of a per-patch mass."""

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


def tissue_at(images: SlideImages, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Whether level-0 points lie on the thumbnail's tissue mask (x and y broadcast together;
    points off the thumbnail take its nearest edge)."""
    mask = images.tissue_mask
    rows = np.clip((y / images.downsample).astype(int), 0, mask.shape[0] - 1)
    cols = np.clip((x / images.downsample).astype(int), 0, mask.shape[1] - 1)
    return mask[rows, cols]


def on_tissue(images: SlideImages, origin: np.ndarray, pixel: float, shape: tuple[int, int]) -> np.ndarray:
    """Which pixels of a level-0 grid (origin, pixel size, shape) have their centre on the
    thumbnail's tissue mask."""
    ys = origin[1] + (np.arange(shape[0]) + 0.5) * pixel
    xs = origin[0] + (np.arange(shape[1]) + 0.5) * pixel
    return tissue_at(images, xs[None, :], ys[:, None])


def mass_box(coords: np.ndarray, step: int, size: int, weights: np.ndarray, mass: float) -> list[int]:
    """A small box (level-0 x0, y0, x1, y1) holding at least `mass` of non-negative per-patch
    `weights` (attention, a prototype's activation): starting from all patches, repeatedly
    drop the outermost grid row or column that carries the least weight while the rest still
    holds `mass`."""
    origin = coords.min(axis=0)
    cells = np.round((coords - origin) / step).astype(int)
    lo, hi = cells.min(axis=0), cells.max(axis=0)
    total = weights.sum()
    while True:
        inside = np.all((cells >= lo) & (cells <= hi), axis=1)
        options = []
        for axis in (0, 1):
            for end, bound in ((lo, lo[axis]), (hi, hi[axis])):
                if lo[axis] == hi[axis]:
                    continue
                edge = inside & (cells[:, axis] == bound)
                options.append((weights[edge].sum(), axis, end is lo))
        if not options:
            break
        lost, axis, from_low = min(options)
        if weights[inside].sum() - lost < mass * total:
            break
        if from_low:
            lo[axis] += 1
        else:
            hi[axis] -= 1
    x0, y0 = origin + lo * step
    x1, y1 = origin + hi * step + size
    return [int(x0), int(y0), int(x1), int(y1)]


def in_box(coords: np.ndarray, size: int, box: list[int]) -> np.ndarray:
    """Which patches have their centre inside a level-0 box (x0, y0, x1, y1)."""
    centre = coords + size / 2
    return (centre[:, 0] >= box[0]) & (centre[:, 0] <= box[2]) & (centre[:, 1] >= box[1]) & (centre[:, 1] <= box[3])
