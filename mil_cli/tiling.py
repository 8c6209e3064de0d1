"""Place a grid of patches inside the tissue, at a target resolution, and store it."""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from itertools import repeat
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from skimage import segmentation

from mil_cli import stores
from mil_cli.console import progress_bar, warn
from mil_cli.errors import InputError, MilcliError
from mil_cli.reports import StageReport
from mil_cli.slides import (Slide, find_slides, group_into_blocks, no_slides_found, open_slide, safe_file_stem,
                            slide_id_from_path)
from mil_cli.config import QCThresholds
from mil_cli.quality import QC_MEASURES, failures, measure_patches
from mil_cli.tissue import find_tissue


@dataclass(frozen=True)
class TilingOptions:
    patch_size: int = 256          # px at the target resolution
    stride: int | None = None      # px at the target resolution; None = patch_size
    target_mpp: float = 0.5        # µm/px of the patches (0.5 = 20x)
    mpp_override: float | None = None  # use instead of the file's mpp
    min_tissue: float = 0.25       # fraction of a patch that must be tissue
    thumbnail_size: int = 1024     # longer side of the stored thumbnail and mask
    keep_pen: bool = False         # True: pen ink is not looked for (it may then pass as tissue)
    qc: QCThresholds | None = None  # read every kept patch and drop blurred, empty or dark ones

    def __post_init__(self) -> None:
        if self.patch_size < 8:
            raise MilcliError(f"--patch-size {self.patch_size}: must be at least 8 px")
        if self.stride is not None and self.stride < 1:
            raise MilcliError(f"--stride {self.stride}: must be at least 1 px")
        if not 0.0 <= self.min_tissue <= 1.0:
            raise MilcliError(f"--min-tissue {self.min_tissue}: must be a fraction between 0 and 1")
        if self.target_mpp <= 0 or (self.mpp_override is not None and self.mpp_override <= 0):
            raise MilcliError("--target-mpp and --mpp must be positive")


@dataclass
class TiledSlide:
    """Everything the tile store keeps about one slide."""

    coords: np.ndarray        # (N, 2) int64 level-0 top-left (x, y)
    thumbnail: np.ndarray     # (h, w, 3) uint8
    mask: np.ndarray          # (h, w) bool, tissue without pen ink
    ink: np.ndarray           # (h, w) bool, pen ink found on the thumbnail
    attrs: dict
    quality: dict[str, np.ndarray] = field(default_factory=dict)  # --qc: measure -> (N,) per kept patch
    dropped: dict[str, np.ndarray] = field(default_factory=dict)  # --qc: reason -> (k, 2) coords left out


MAX_INK_SHARE = 0.1  # a patch with more of its area under pen ink than this is left out


def grid_in_tissue(mask: np.ndarray, downsample: float, width: int, height: int,
                   patch_level0: int, stride_level0: int, min_tissue: float,
                   ink: np.ndarray | None = None) -> np.ndarray:
    """Top-left level-0 corners of whole patches whose tissue fraction is >= `min_tissue`
    (and, given the ink mask, whose ink share is <= MAX_INK_SHARE: a patch half on a marker
    stroke can still be a quarter tissue).

    Fractions are measured on the mask grid with summed-area tables, so the cost is one
    pass over each mask plus O(1) per candidate patch.
    """
    if patch_level0 > width or patch_level0 > height:
        return np.zeros((0, 2), dtype=np.int64)
    xs = np.arange(0, width - patch_level0 + 1, stride_level0, dtype=np.int64)
    ys = np.arange(0, height - patch_level0 + 1, stride_level0, dtype=np.int64)
    gx, gy = np.meshgrid(xs, ys)
    gx, gy = gx.ravel(), gy.ravel()

    c0 = np.clip(np.floor(gx / downsample).astype(np.int64), 0, mask.shape[1] - 1)
    r0 = np.clip(np.floor(gy / downsample).astype(np.int64), 0, mask.shape[0] - 1)
    c1 = np.clip(np.ceil((gx + patch_level0) / downsample).astype(np.int64), c0 + 1, mask.shape[1])
    r1 = np.clip(np.ceil((gy + patch_level0) / downsample).astype(np.int64), r0 + 1, mask.shape[0])

    def share(of: np.ndarray) -> np.ndarray:
        table = np.zeros((of.shape[0] + 1, of.shape[1] + 1), dtype=np.int64)
        table[1:, 1:] = of.astype(np.int64).cumsum(0).cumsum(1)
        inside = table[r1, c1] - table[r0, c1] - table[r1, c0] + table[r0, c0]
        return inside / ((r1 - r0) * (c1 - c0))

    keep = share(mask) >= max(min_tissue, 1e-9)
    if ink is not None and ink.any():
        keep &= share(ink) <= MAX_INK_SHARE
    return np.stack([gx[keep], gy[keep]], axis=1)


def tile_slide(path: Path, options: TilingOptions) -> TiledSlide:
    """Tissue mask and patch grid for one slide. InputError when it has no usable tissue."""
    with open_slide(path) as slide:
        return _tile_open_slide(slide, options)


def _tile_open_slide(slide: Slide, options: TilingOptions) -> TiledSlide:
    width, height = slide.dimensions
    mpp = options.mpp_override or slide.mpp
    if mpp is None:
        warnings.warn(f"{slide.path}: no resolution (mpp) in the file; tiling at native "
                      f"resolution (pass --mpp to set it)", stacklevel=2)
        scale = 1.0
    else:
        scale = options.target_mpp / mpp
    patch_level0 = max(1, round(options.patch_size * scale))
    stride_level0 = max(1, round((options.stride or options.patch_size) * scale))

    thumbnail = slide.thumbnail(options.thumbnail_size)
    downsample = width / thumbnail.shape[1]
    found = find_tissue(thumbnail, mpp * downsample if mpp else None, exclude_ink=not options.keep_pen)
    mask = found.tissue
    if not mask.any():
        raise InputError(slide.path, "no tissue found (blank or background-only image)")
    coords = grid_in_tissue(mask, downsample, width, height, patch_level0, stride_level0,
                            options.min_tissue, found.ink)
    if len(coords) == 0:
        raise InputError(slide.path, f"tissue found, but no {patch_level0}-px patch holds "
                                     f"{options.min_tissue:.0%} tissue (try a smaller --patch-size "
                                     f"or --min-tissue)")
    attrs = {
        "source_path": str(slide.path.resolve()),
        "reader": slide.reader,
        "width": width,
        "height": height,
        "patch_size": options.patch_size,
        "patch_size_level0": patch_level0,
        "stride_level0": stride_level0,
        "target_mpp": options.target_mpp if mpp else math.nan,
        "min_tissue": options.min_tissue,
        "tissue_fraction": float(mask.mean()),
        "ink_fraction": float(found.ink.mean()),
    }
    if mpp is not None:
        attrs["mpp"] = mpp
    tiled = TiledSlide(coords=coords, thumbnail=thumbnail, mask=mask, ink=found.ink,
                       attrs=attrs | {"thumbnail_downsample": downsample})
    if options.qc is not None:
        apply_qc(slide, tiled, options.patch_size, options.qc)
    return tiled


QC_BLOCK = 1024  # level-0 px: patches whose top-left falls in one such square are read together


def apply_qc(slide: Slide, tiled: TiledSlide, patch_size: int, thresholds: QCThresholds) -> None:
    """Measure every patch at its target resolution (quality.py); keep the passing ones."""
    size_level0 = int(tiled.attrs["patch_size_level0"])
    measures = {name: np.zeros(len(tiled.coords), dtype=np.float32) for name in QC_MEASURES}
    for rows in group_into_blocks(tiled.coords, max(QC_BLOCK, size_level0)):
        patches = slide.read_patches_unscaled(tiled.coords[rows], size_level0, patch_size)
        for name, values in measure_patches(patches).items():
            measures[name][rows] = values
    failed = failures(measures, thresholds)
    keep = ~np.any(list(failed.values()), axis=0)
    if not keep.any():
        raise InputError(slide.path, f"every patch failed --qc ({_counts(failed)})")
    tiled.dropped = {reason: tiled.coords[mask] for reason, mask in failed.items() if mask.any()}
    tiled.coords = tiled.coords[keep]
    tiled.quality = {name: values[keep] for name, values in measures.items()}
    tiled.attrs["qc_dropped"] = json.dumps({reason: int(mask.sum()) for reason, mask in failed.items()})
    tiled.attrs["qc_thresholds"] = json.dumps(asdict(thresholds))


def _counts(failed: dict[str, np.ndarray]) -> str:
    return ", ".join(f"{reason} {int(mask.sum())}" for reason, mask in failed.items() if mask.any())


def default_tiling_workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def _tile_one(path: Path, options: TilingOptions) -> tuple[TiledSlide | None, str | None, list[str]]:
    """Tile one slide in a worker: (result, failure reason, warning messages). Any failure is
    this slide's alone, so unexpected errors are reported with it rather than ending the run."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tiled, reason = None, None
        try:
            tiled = tile_slide(path, options)
        except InputError as exc:
            reason = exc.reason
        except Exception as exc:  # a decoder bug or hostile file must not stop the other slides
            reason = f"unexpected {type(exc).__name__}: {exc}"
    return tiled, reason, [str(w.message) for w in caught]


def write_preview(path: Path, tiled: TiledSlide) -> None:
    """Thumbnail with the tissue outline (green), the patch grid (blue), pen ink left out
    (hatched magenta) and patches dropped by --qc (red)."""
    pixels = tiled.thumbnail.copy()
    yy, xx = np.nonzero(tiled.ink)
    hatch = (yy + xx) % 6 < 2
    pixels[yy[hatch], xx[hatch]] = (230, 0, 230)
    pixels[segmentation.find_boundaries(tiled.ink, mode="inner")] = (230, 0, 230)
    pixels[segmentation.find_boundaries(tiled.mask, mode="inner")] = (0, 170, 0)
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    ds = tiled.attrs["thumbnail_downsample"]
    size = tiled.attrs["patch_size_level0"] / ds
    for x, y in tiled.coords / ds:
        draw.rectangle((x, y, x + size, y + size), outline=(30, 80, 220))
    for coords in tiled.dropped.values():  # left out by --qc
        for x, y in coords / ds:
            draw.rectangle((x, y, x + size, y + size), outline=(230, 30, 30))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def tile_slides(inputs: list[Path], out: Path, options: TilingOptions, overwrite: bool = False,
                workers: int = 1, previews: Path | None = None) -> StageReport:
    """Tile every slide under `inputs` into the tile store `out` (`workers` slides at a time),
    resuming unless `overwrite`; with `previews`, write a preview PNG per slide there."""
    start = time.perf_counter()
    paths = find_slides(inputs)
    report = StageReport()
    with stores.StoreWriter(out, stores.TILES_FORMAT, {}, overwrite) as writer:
        _tile_into(writer, paths, inputs, options, workers, previews, report)
    report.seconds = time.perf_counter() - start
    return report


def _tile_into(writer: stores.StoreWriter, paths: list[Path], inputs: list[Path], options: TilingOptions,
               workers: int, previews: Path | None, report: StageReport) -> None:
    finished = writer.completed()
    if not paths:
        report.failed[", ".join(map(str, inputs))] = no_slides_found()
    seen: dict[str, Path] = {}
    todo: list[tuple[str, Path]] = []
    for path in paths:
        slide_id = slide_id_from_path(path)
        if slide_id in seen:
            report.failed[str(path)] = f"same slide id '{slide_id}' as {seen[slide_id]}"
        elif slide_id in finished:
            report.skipped.append(slide_id)
        else:
            todo.append((slide_id, path))
        seen.setdefault(slide_id, path)

    pool = ProcessPoolExecutor(workers) if workers > 1 and len(todo) > 1 else None
    with progress_bar() as bar, pool or contextlib.nullcontext():
        task = bar.add_task("tiling", total=len(todo))
        jobs = [path for _, path in todo]
        results = (pool.map if pool else map)(_tile_one, jobs, repeat(options))
        for (slide_id, path), (tiled, reason, messages) in zip(todo, results):
            bar.advance(task)
            for message in messages:
                warn(message)
            if tiled is None:
                report.failed[str(path)] = reason or "failed"
                continue
            if previews is not None:
                write_preview(previews / f"{safe_file_stem(slide_id)}.png", tiled)
            if tiled.dropped:
                warn(f"{slide_id}: --qc left out {sum(len(c) for c in tiled.dropped.values())} of "
                     f"{len(tiled.coords) + sum(len(c) for c in tiled.dropped.values())} patches "
                     f"({', '.join(f'{reason} {len(c)}' for reason, c in tiled.dropped.items())})")
                for reason, coords in tiled.dropped.items():
                    report.counts[f"qc_{reason}"] = report.counts.get(f"qc_{reason}", 0) + len(coords)
            attrs = tiled.attrs | {"options": json.dumps(asdict(options))}
            downsample = attrs.pop("thumbnail_downsample")
            writer.write_slide(slide_id, attrs,
                               {"coords": tiled.coords, "thumbnail": tiled.thumbnail, "tissue_mask": tiled.mask,
                                "ink_mask": tiled.ink, **{f"qc_{name}": v for name, v in tiled.quality.items()}},
                               {name: {"downsample": downsample} for name in ("thumbnail", "tissue_mask", "ink_mask")})
            report.done.append(slide_id)
