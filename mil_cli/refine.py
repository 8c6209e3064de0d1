"""explain --refine: the patch-probability map at a finer step where it matters.

A patch map is blocky at patch scale: one value per 256-px patch. --refine tiles the slide's
largest regions again (or, on a slide without one, the neighbourhood of its most convincing
patch) with patches overlapping at a stride of patch / REFINE_STEPS, embeds them with the
feature store's own backbone (its weights and stain normalisation), and scores each with the
model's patch classifier, which judges a patch alone, so the new patches need no bag. Averaged
where they overlap, the scores form a map REFINE_STEPS times finer. Cost: REFINE_STEPS² patches
per patch of refined area, at most MAX_PATCHES per slide, embedded on the explain device."""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from mil_cli.backbones import get_backbone
from mil_cli.embedding import build_embedder, embed_options_of
from mil_cli.errors import InputError
from mil_cli.raster import cell_means, on_tissue, tissue_at
from mil_cli.slides import Slide
from mil_cli.stores import FeatureSource, SlideImages

REFINE_STEPS = 4        # stride = patch / 4
MAX_REGIONS = 3         # the largest regions refined
MAX_PATCHES = 2048      # refined patches per slide at most (the regions' areas are cut to fit)
BATCH = 32
MAX_WIDTH = 768         # refined_<k>.png: px across at most


@dataclass(frozen=True)
class RefinedArea:
    """One refined box: its level-0 bounds, the new patches (top-left corners, side) and their
    class probability, and the map they paint (cells of `stride` px from `origin`, NaN where no
    patch lies)."""
    box: tuple[float, float, float, float]
    coords: np.ndarray
    size: int
    stride: int
    values: np.ndarray
    grid: np.ndarray
    origin: np.ndarray


class PatchScorer:
    """The feature store's backbone (weights, stain) and the model, for patches read anew;
    one at a time across explain's threads (each would use every core anyway)."""

    def __init__(self, source: FeatureSource, device: torch.device) -> None:
        attrs = source.attrs
        self.embedder = build_embedder(get_backbone(str(attrs.get("backbone", ""))), device, embed_options_of(attrs))
        self.lock = threading.Lock()

    def features(self, slide: Slide, coords: np.ndarray, size_level0: int, out_size: int) -> np.ndarray:
        """(n, dim) features of the patches at `coords`, read from `slide` as tiling read them."""
        chunks = []
        with self.lock:
            for start in range(0, len(coords), BATCH):
                pixels = np.stack([slide.read_patch((int(x), int(y)), size_level0, out_size)
                                   for x, y in coords[start:start + BATCH]])
                chunks.append(self.embedder(torch.from_numpy(pixels)).float().cpu().numpy())
        return np.concatenate(chunks)


def refine_boxes(regions: list, coords: np.ndarray, size: int, values: np.ndarray) -> list[tuple[float, ...]]:
    """The bounding boxes of the largest regions (polygons of level-0 rings, largest first),
    grown by half a patch; without regions, the most convincing patch and its neighbours."""
    boxes = []
    for rings in regions[:MAX_REGIONS]:
        outer = np.asarray(rings[0])
        x0, y0 = outer.min(axis=0) - size / 2
        x1, y1 = outer.max(axis=0) + size / 2
        boxes.append((x0, y0, x1, y1))
    if not boxes:
        x, y = coords[int(np.argmax(values))]
        boxes.append((x - size, y - size, x + 2 * size, y + 2 * size))
    return boxes


def stride_grid(box: tuple[float, ...], size: int, stride: int, images: SlideImages, budget: int) -> np.ndarray:
    """Top-left corners on a `stride` grid whose patches' centres lie in `box` and on tissue;
    a box needing more than `budget` patches is cut around its centre to fit (and the grid's
    rounding, which can add a row and a column, cut off)."""
    x0, y0, x1, y1 = box
    side = int(math.sqrt(budget)) * stride
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    x0, x1 = max(x0, cx - side / 2), min(x1, cx + side / 2)
    y0, y1 = max(y0, cy - side / 2), min(y1, cy + side / 2)
    xs = np.arange(math.floor(x0 / stride) * stride, x1, stride)
    ys = np.arange(math.floor(y0 / stride) * stride, y1, stride)
    grid = np.stack(np.meshgrid(xs, ys), axis=-1).reshape(-1, 2) - size // 2  # centres -> corners
    centred = tissue_at(images, grid[:, 0] + size / 2, grid[:, 1] + size / 2)
    return grid[centred & (grid >= 0).all(axis=1)][:budget].astype(np.int64)


def refine(slide: Slide, scorer: PatchScorer, score: Callable[[np.ndarray], np.ndarray], regions: list,
           coords: np.ndarray, size: int, out_size: int, values: np.ndarray, images: SlideImages) -> list[RefinedArea]:
    """The refined areas of one slide; `score` maps (n, dim) features to (n,) values."""
    stride = max(1, size // REFINE_STEPS)
    areas, budget = [], MAX_PATCHES
    for box in refine_boxes(regions, coords, size, values):
        if budget <= 0:
            break
        grid = stride_grid(box, size, stride, images, budget)
        if len(grid) == 0:
            continue
        budget -= len(grid)
        scores = score(scorer.features(slide, grid, size, out_size))
        painted, origin = cell_means(grid, stride, size, scores)
        areas.append(RefinedArea(tuple(map(float, box)), grid, size, stride, scores, painted, origin))
    if not areas:
        raise InputError(slide.path, "no tissue in the areas to refine")
    return areas


def area_picture(slide: Slide, area: RefinedArea, images: SlideImages) -> tuple[np.ndarray, np.ndarray, float]:
    """The slide's pixels over the area (at most MAX_WIDTH px across), the refined map on the
    same pixels (NaN off tissue and where no refined patch lies), and level-0 px per pixel."""
    x0, y0 = area.origin
    height_cells, width_cells = area.grid.shape
    width0, height0 = width_cells * area.stride, height_cells * area.stride
    pixel = max(width0 / MAX_WIDTH, 1.0)
    size = (max(1, round(width0 / pixel)), max(1, round(height0 / pixel)))
    base = slide.read_area(x0, y0, width0, height0, size)
    cols = np.minimum(((np.arange(size[0]) + 0.5) * pixel / area.stride).astype(int), width_cells - 1)
    rows = np.minimum(((np.arange(size[1]) + 0.5) * pixel / area.stride).astype(int), height_cells - 1)
    painted = area.grid[rows][:, cols]
    return base, np.where(on_tissue(images, area.origin, pixel, painted.shape), painted, np.nan), pixel
