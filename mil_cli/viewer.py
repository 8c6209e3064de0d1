"""A zoomable viewer per explained slide (explain/<slide>/viewer.html), fully offline.

The slide's own pixels as a Deep Zoom pyramid (JPEG tiles, only where the thumbnail's tissue
mask has tissue, down from the tiling resolution or as much of it as the size budget allows),
the heatmap and evidence maps as RGBA overlays, the regions' outlines, and the per-patch values
a click shows. OpenSeadragon (vendored from npm, BSD-3-Clause: viewer_assets/) draws it.
Everything the page reads is inline or an <img>, so it opens from file:// in a copied folder
(browsers refuse fetch/XHR there)."""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from html import escape
from pathlib import Path

import numpy as np
from PIL import Image

from mil_cli.config import VIEWER_BUDGET_MB
from mil_cli.render import PNG, colour_steps, colour_table
from mil_cli.slides import Slide
from mil_cli.stores import SlideImages

ASSETS = Path(__file__).parent / "viewer_assets"
ASSETS_DIR = "_viewer"            # beside the slides' folders in explain's output
TILE = 256                        # Deep Zoom tile side (no overlap)
JPEG_QUALITY = 80
TILE_BYTES = 20_000               # a JPEG tile of H&E at quality 80, for the budget (sample_data: 12-20 kB)


@dataclass(frozen=True)
class Overlay:
    """A map drawn over the slide: `grid` (thumbnail cells, NaN transparent) in `colour_map`."""
    name: str
    label: str
    grid: np.ndarray
    colour_map: str
    limits: tuple[float, float]
    visible: bool


@dataclass(frozen=True)
class Pyramid:
    """The Deep Zoom pyramid: its full-resolution size, `scale` pyramid px per level-0 px."""
    width: int
    height: int
    scale: float

    @property
    def max_level(self) -> int:
        return max(0, math.ceil(math.log2(max(self.width, self.height))))

    def level_size(self, level: int) -> tuple[int, int]:
        factor = 2 ** (self.max_level - level)
        return math.ceil(self.width / factor), math.ceil(self.height / factor)


def plan_pyramid(width0: int, height0: int, tiling_scale: float, images: SlideImages, budget_mb: float) -> Pyramid:
    """The finest pyramid, at most the tiling resolution (`tiling_scale` px per level-0 px),
    whose tissue tiles fit `budget_mb` by TILE_BYTES each; each halving of the resolution
    quarters the tiles."""
    scale = tiling_scale
    tissue_share = max(float(images.tissue_mask.mean()), 1e-3)
    while True:
        pyramid = Pyramid(max(1, round(width0 * scale)), max(1, round(height0 * scale)), scale)
        tiles = math.ceil(pyramid.width / TILE) * math.ceil(pyramid.height / TILE) * tissue_share * 4 / 3
        if tiles * TILE_BYTES <= budget_mb * 1e6 or max(pyramid.width, pyramid.height) <= TILE:
            return pyramid
        scale /= 2


IN_MEMORY_PIXELS = 64_000_000  # a pyramid this small is read once and halved in memory (3 bytes a pixel)


def write_tiles(slide: Slide, pyramid: Pyramid, images: SlideImages, folder: Path) -> list[str]:
    """Every level's JPEG tiles that touch tissue into folder/<level>/<col>_<row>.jpg; returns
    their "level/col_row" names. A small pyramid is read from the slide once and each level
    made by halving the one above (a slide without pyramid levels would otherwise be decoded
    whole once per level); a large one is read level by level, one strip per row of tiles
    (each read pays the reader's fixed cost and decodes whole slide tiles)."""
    whole = None
    if pyramid.width * pyramid.height <= IN_MEMORY_PIXELS:
        whole = Image.fromarray(slide.read_area(0, 0, pyramid.width / pyramid.scale, pyramid.height / pyramid.scale,
                                                (pyramid.width, pyramid.height)))
    written = []
    for level in range(pyramid.max_level, -1, -1):
        width, height = pyramid.level_size(level)
        if whole is not None and whole.size != (width, height):
            whole = whole.resize((width, height), Image.BILINEAR, reducing_gap=2.0)
        to_level0 = 2 ** (pyramid.max_level - level) / pyramid.scale  # level-0 px per px of this level
        (folder / str(level)).mkdir(parents=True, exist_ok=True)
        for row in range(math.ceil(height / TILE)):
            h = min(TILE, height - row * TILE)
            y0 = row * TILE * to_level0
            rows = mask_span(y0, y0 + h * to_level0, images.downsample)
            columns = [col for col in range(math.ceil(width / TILE))
                       if images.tissue_mask[rows, mask_span(col * TILE * to_level0, min((col + 1) * TILE, width)
                                                             * to_level0, images.downsample)].any()]
            if not columns:
                continue
            left, right = columns[0] * TILE, min((columns[-1] + 1) * TILE, width)
            strip = (whole.crop((left, row * TILE, right, row * TILE + h)) if whole is not None else Image.fromarray(
                slide.read_area(left * to_level0, y0, (right - left) * to_level0, h * to_level0, (right - left, h))))
            for col in columns:
                tile = strip.crop((col * TILE - left, 0, min((col + 1) * TILE, width) - left, h))
                tile.save(folder / str(level) / f"{col}_{row}.jpg", quality=JPEG_QUALITY)
                written.append(f"{level}/{col}_{row}")
    return written


def mask_span(start: float, end: float, downsample: float) -> slice:
    """The thumbnail cells under level-0 px [start, end), at least one."""
    first = int(start / downsample)
    return slice(first, max(first + 1, math.ceil(end / downsample)))


def overlay_png(overlay: Overlay, path: Path) -> None:
    """The map in its colours, one pixel per thumbnail cell, as a palette PNG (index 0
    transparent where NaN, 1-255 the colour map): a quarter of the bytes of RGBA to encode."""
    steps = colour_steps(overlay.grid, overlay.limits, 255)
    indices = np.where(np.isfinite(overlay.grid), 1 + steps, 0).astype(np.uint8)
    palette = colour_table(overlay.colour_map, 255)[:, :3]
    image = Image.fromarray(indices, "P")
    image.putpalette(np.concatenate([[[0, 0, 0]], palette]).astype(np.uint8).ravel().tolist())
    image.save(path, transparency=0, **PNG)


def legend_gradient(overlay: Overlay) -> str:
    stops = ", ".join("#%02x%02x%02x" % tuple(rgba[:3]) for rgba in colour_table(overlay.colour_map, 9))
    return f"linear-gradient(to right, {stops})"


def copy_assets(out: Path) -> Path:
    """OpenSeadragon, its licence, button images and viewer.js into out/_viewer (once)."""
    target = out / ASSETS_DIR
    copied = target / "viewer.js"
    if not copied.exists() or copied.read_bytes() != (ASSETS / "viewer.js").read_bytes():
        shutil.copytree(ASSETS, target, dirs_exist_ok=True)
    return target


@dataclass(frozen=True)
class PatchTable:
    """What a click on a patch shows: level-0 top-left corners, their side, attention, its
    percentile rank and further named columns (contributions, class probabilities)."""
    coords: np.ndarray
    size: int
    attention: np.ndarray
    rank: np.ndarray
    columns: dict[str, np.ndarray]

    def to_json(self) -> dict:
        return {"x": self.coords[:, 0].tolist(), "y": self.coords[:, 1].tolist(), "size": self.size,
                "attention": _floats(self.attention), "rank": _floats(self.rank),
                "columns": {name: _floats(values) for name, values in self.columns.items()}}


def _floats(values: np.ndarray) -> list[float]:
    return [float(f"{v:.5g}") for v in np.asarray(values, dtype=float)]


def write_viewer(folder: Path, slide: Slide, tiling_scale: float, images: SlideImages,
                 overlays: list[Overlay], regions: list, patches: PatchTable, title: str,
                 budget_mb: float = VIEWER_BUDGET_MB) -> Pyramid:
    """folder/viewer.html with its tiles and overlay images under folder/viewer/ (the shared
    assets go to folder/../_viewer: copy_assets, once). Returns the pyramid written."""
    files = folder / "viewer"
    if files.exists():
        shutil.rmtree(files)  # a rerun's pyramid may have other levels
    width0, height0 = slide.dimensions
    pyramid = plan_pyramid(width0, height0, tiling_scale, images, budget_mb)
    tiles = write_tiles(slide, pyramid, images, files / "tiles")
    thumb_width = images.tissue_mask.shape[1] * images.downsample
    for overlay in overlays:
        overlay_png(overlay, files / f"{overlay.name}.png")
    data = {
        "title": title, "folder": "viewer/", "assets": f"../{ASSETS_DIR}/", "width0": width0, "height0": height0,
        "pyramid": {"width": pyramid.width, "height": pyramid.height, "tileSize": TILE, "maxLevel": pyramid.max_level,
                    "mppScale": pyramid.scale},
        "tiles": tiles, "regions": regions, "patches": patches.to_json(),
        "overlays": [{"name": o.name, "file": f"{o.name}.png", "width0": thumb_width, "visible": o.visible,
                      "limits": list(o.limits)}
                     for o in overlays],
    }
    (folder / "viewer.html").write_text(_page(data, overlays, pyramid, tiling_scale), encoding="utf-8")
    return pyramid


STYLE = """
body { margin: 0; font-family: system-ui, sans-serif; font-size: 13px; display: flex; height: 100vh; }
#osd { flex: 1; background: #fff; }
#side { width: 300px; padding: 8px 12px; overflow-y: auto; border-left: 1px solid #ddd; }
.legend { height: 10px; margin: 2px 0 0 22px; }
.limits { display: flex; justify-content: space-between; margin-left: 22px; color: #555; font-size: 11px; }
.region { fill: none; stroke: #00e5ff; stroke-width: 2px; vector-effect: non-scaling-stroke; }
#selected-patch { outline: 2px solid #39ff14; }
#patch-info div { margin: 2px 0; }
h1 { font-size: 14px; margin: 4px 0 8px; }
"""


def _page(data: dict, overlays: list[Overlay], pyramid: Pyramid, tiling_scale: float) -> str:
    controls = "".join(
        f'<div><label><input type="checkbox" id="overlay-{o.name}"{" checked" if o.visible else ""}> '
        f'{escape(o.label)}</label><div class="legend" style="background: {legend_gradient(o)}"></div>'
        f'<div class="limits"><span>{o.limits[0]:.3g}</span><span>{o.limits[1]:.3g}</span></div></div>'
        for o in overlays)
    payload = json.dumps(data, separators=(",", ":")).replace("</", "<\\/")  # no "</script>" inside
    resolution = ("the tiling resolution" if pyramid.scale >= tiling_scale * 0.999 else
                  f"1/{round(tiling_scale / pyramid.scale)} of the tiling resolution (the size budget)")
    return f"""<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{escape(data["title"])}</title>
<style>{STYLE}</style></head><body><div id="osd"></div><div id="side">
<h1>{escape(data["title"])}</h1>
<p>Zoom in down to {resolution}. Click a patch for its values.</p>
<div><label>overlay opacity <input type="range" id="opacity" min="0" max="100" value="55"></label></div>
{controls}
<div><label><input type="checkbox" id="show-regions" checked> regions (regions.geojson)</label></div>
<h2 style="font-size: 13px">Patch</h2><div id="patch-info">none selected</div>
<p style="color: #777; font-size: 11px">Drawn with OpenSeadragon (BSD-3-Clause, {ASSETS_DIR}/openseadragon-LICENSE.txt).</p>
</div>
<script>window.MILCLI = {payload};</script>
<script src="../{ASSETS_DIR}/openseadragon.min.js"></script>
<script src="../{ASSETS_DIR}/viewer.js"></script>
</body></html>
"""
