"""Pen ink kept out of the tissue at tiling: copies of both real test slides with marker strokes
drawn across tissue and glass, and the clean originals, which must lose no tissue."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image, ImageDraw

from conftest import TEST_DATA
from mil_cli.slides import open_slide
from mil_cli.tiling import TilingOptions, tile_slide

# marker inks as they transmit light (a stroke filters what lies under it): blue, green, black, red
INKS = {"blue": (35, 70, 180), "green": (40, 150, 95), "black": (45, 45, 55), "red": (180, 35, 45)}
SLIDES = {"CMU-1-Small-Region.svs": TilingOptions(patch_size=128),  # 0.5 µm/px: 1.1 x 1.5 mm of tissue
          "TCGA-CR-7395-01A-01-TS1.svs": TilingOptions(patch_size=128)}
STROKE_PX = {"CMU-1-Small-Region.svs": 250, "TCGA-CR-7395-01A-01-TS1.svs": 150}  # a fine marker line, 0.1-0.3 mm
INKY = 0.25  # a patch more than this much covered by ink is an inked patch


def level0(name: str) -> tuple[np.ndarray, float | None]:
    with open_slide(TEST_DATA / name) as slide:
        width, height = slide.dimensions
        return slide.read_region((0, 0), 0, (width, height))[..., :3], slide.mpp


def write_tiff(path: Path, image: np.ndarray, mpp: float | None) -> Path:
    resolution = {"resolution": (1e4 / mpp, 1e4 / mpp), "resolutionunit": "CENTIMETER"} if mpp else {}
    tifffile.imwrite(path, image, photometric="rgb", tile=(256, 256), compression="zlib", **resolution)
    return path


def strokes(shape: tuple[int, int], inks: tuple[str, ...], width: int, seed: int) -> dict[str, np.ndarray]:
    """One wavy marker stroke per ink, each crossing the whole image (tissue and glass)."""
    rng = np.random.default_rng(seed)
    h, w = shape
    masks = {}
    for i, ink in enumerate(inks):
        canvas = Image.new("L", (w, h), 0)
        y0 = h * (i + 1) / (len(inks) + 1)
        xs = np.linspace(0, w, 12)
        ys = y0 + rng.normal(0, h * 0.05, len(xs))
        ImageDraw.Draw(canvas).line(list(zip(xs.tolist(), ys.tolist())), fill=255, width=width,
                                    joint="curve")
        masks[ink] = np.array(canvas) > 0
    return masks


def inked(image: np.ndarray, masks: dict[str, np.ndarray], opacity: float = 0.85) -> np.ndarray:
    out = image.astype(np.float32)
    for ink, mask in masks.items():
        transmit = 1 - opacity + opacity * np.array(INKS[ink], dtype=np.float32) / 255
        out[mask] *= transmit
    return out.round().astype(np.uint8)


def ink_share(coords: np.ndarray, size: int, ink: np.ndarray) -> np.ndarray:
    return np.array([ink[y:y + size, x:x + size].mean() for x, y in coords])


@pytest.mark.parametrize("inks", [("blue", "black"), ("green", "red")])
@pytest.mark.parametrize("name", sorted(SLIDES))
def test_pen_strokes_are_kept_out_and_clean_tissue_is_not(name: str, inks: tuple[str, ...], tmp_path: Path) -> None:
    image, mpp = level0(name)
    masks = strokes(image.shape[:2], inks, STROKE_PX[name], seed=len(name))
    ink = np.any(list(masks.values()), axis=0)
    options = SLIDES[name]
    clean = write_tiff(tmp_path / "clean.tif", image, mpp)
    pen = write_tiff(tmp_path / "pen.tif", inked(image, masks), mpp)

    tiled = tile_slide(pen, options)
    size = int(tiled.attrs["patch_size_level0"])
    share = ink_share(tiled.coords, size, ink)
    assert (share > INKY).mean() <= 0.02, f"{(share > INKY).sum()} of {len(share)} kept patches are inked"
    assert tiled.ink.any() and tiled.attrs["ink_fraction"] > 0

    ignoring = tile_slide(pen, TilingOptions(**{**options.__dict__, "keep_pen": True}))
    assert (ink_share(ignoring.coords, size, ink) > INKY).mean() > 0.05  # without the filter ink passes as tissue

    on_clean = {tuple(c) for c in tile_slide(clean, options).coords}
    reference = {tuple(c) for c in tile_slide(clean, TilingOptions(**{**options.__dict__, "keep_pen": True})).coords}
    assert len(on_clean & reference) / len(reference) >= 0.98  # no real tissue taken for ink
    # tissue a patch's width or more away from every stroke stays (nearer, the stroke's rim is widened into it)
    away = {c for c in reference if not ink[max(0, c[1] - size):c[1] + 2 * size, max(0, c[0] - size):c[0] + 2 * size].any()}
    kept = {tuple(c) for c in tiled.coords}
    assert len(away) > 10 and len(away & kept) / len(away) >= 0.95
