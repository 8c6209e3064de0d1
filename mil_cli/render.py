"""explain's images drawn with Pillow: a map over the thumbnail with its colour bar and title,
and patch montages with captions. Why not matplotlib: one figure per image cost ~0.35 s, most
of explain's time; composing the pixels directly costs a few ms and looks the same."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from matplotlib import colormaps, font_manager
from PIL import Image, ImageDraw, ImageFont

BACKGROUND = (255, 255, 255)
TEXT = (34, 34, 34)
MARGIN = 8
BAR_HEIGHT = 12
MIN_WIDTH = 360  # a map narrower than this still gets a legible title and colour bar
MIN_PICTURE_WIDTH = 512  # without a width, a smaller thumbnail (a small crop) is enlarged to this, pixels as blocks
TYPE_WIDTH = 600  # text is sized for an image this wide; wider ones scale it up (the report shows them at ~580 px)
PNG = {"compress_level": 1}  # zlib's fastest: PNGs ~20 % larger, written several times faster


@lru_cache(maxsize=8)
def font(size: int) -> ImageFont.FreeTypeFont:
    """DejaVu Sans, which matplotlib ships (so no system font is needed)."""
    return ImageFont.truetype(font_manager.findfont("DejaVu Sans"), size)


@lru_cache(maxsize=16)
def colour_table(colour_map: str, n: int = 256) -> np.ndarray:
    """(n, 4) uint8 RGBA: `colour_map` sampled at n evenly spaced values (a lookup table is
    several times faster than calling the colour map on every cell)."""
    return colormaps[colour_map](np.linspace(0, 1, n), bytes=True)


def colour_steps(grid: np.ndarray, limits: tuple[float, float], n: int = 256) -> np.ndarray:
    """Each cell's step 0..n-1 between `limits` (NaN cells: 0), for `colour_table(…, n)`."""
    low, high = limits
    values = np.clip((np.nan_to_num(grid, nan=low) - low) / ((high - low) or 1.0), 0, 1)
    return np.round(values * (n - 1)).astype(np.intp)


def text_lines(draw: ImageDraw.ImageDraw, xy: tuple[int, int], text: str, size: int, width: int) -> int:
    """`text` wrapped to `width` px at `xy`; returns the height used."""
    face, lines, line = font(size), [], ""
    for word in text.split(" "):
        trial = f"{line} {word}".strip()
        if line and draw.textlength(trial, font=face) > width:
            lines.append(line)
            line = word
        else:
            line = trial
    lines.append(line)
    step = int(size * 1.3)
    for i, line in enumerate(lines):
        draw.text((xy[0], xy[1] + i * step), line, fill=TEXT, font=face)
    return step * len(lines)


def map_image(thumbnail: np.ndarray, grid: np.ndarray, colour_map: str, limits: tuple[float, float], alpha: float,
              width: int | None, title: str, label: str, outlines: list | None = None,
              downsample: float = 1.0, outline_colour: str = "#00e5ff") -> Image.Image:
    """`grid` (one cell per thumbnail pixel, NaN transparent) blended over the thumbnail at
    `alpha`, `width` px wide (default: the thumbnail's, at least MIN_PICTURE_WIDTH), `outlines`
    (polygons of rings in level-0 px) drawn on top, the title above and a labelled colour bar
    below."""
    colours = colour_table(colour_map)[colour_steps(grid, limits), :3].astype(np.uint16)
    weight = round(alpha * 256)
    blended = (thumbnail[..., :3].astype(np.uint16) * (256 - weight) + colours * weight) >> 8
    blended = np.where(np.isfinite(grid)[..., None], blended, thumbnail[..., :3]).astype(np.uint8)
    picture = Image.fromarray(blended)
    scale = (width or max(picture.width, MIN_PICTURE_WIDTH)) / picture.width
    if scale != 1:
        size = (max(1, round(picture.width * scale)), max(1, round(picture.height * scale)))
        picture = picture.resize(size, Image.NEAREST if scale > 1 else Image.BILINEAR)
    draw = ImageDraw.Draw(picture)
    for rings in outlines or []:
        for ring in rings:
            points = [(x / downsample * scale, y / downsample * scale) for x, y in ring]
            draw.line(points + points[:1], fill=outline_colour, width=2)

    canvas_width = max(picture.width + 2 * MARGIN, MIN_WIDTH)
    unit = max(1.0, canvas_width / TYPE_WIDTH)  # text and bar grow with the image: legible where it is shown smaller
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    title_size = round(13 * unit)
    title_height = text_lines(probe, (0, 0), title, title_size, canvas_width - 2 * MARGIN)
    bar_top = MARGIN + title_height + MARGIN + picture.height + MARGIN
    canvas = Image.new("RGB", (canvas_width, bar_top + round((BAR_HEIGHT + 40) * unit)), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    text_lines(draw, (MARGIN, MARGIN), title, title_size, canvas_width - 2 * MARGIN)
    canvas.paste(picture, (MARGIN, MARGIN + title_height + MARGIN))
    draw_colour_bar(draw, canvas, (MARGIN, bar_top), min(canvas_width - 2 * MARGIN, round(420 * unit)), colour_map,
                    limits, label, unit)
    return canvas


def draw_colour_bar(draw: ImageDraw.ImageDraw, canvas: Image.Image, origin: tuple[int, int], length: int,
                    colour_map: str, limits: tuple[float, float], label: str, unit: float = 1.0) -> None:
    """A horizontal colour bar with five ticks and `label` beneath, sized by `unit`."""
    height = round(BAR_HEIGHT * unit)
    ramp = colour_table(colour_map, length)[:, :3]
    canvas.paste(Image.fromarray(np.repeat(ramp[None], height, axis=0)), origin)
    x0, y0 = origin
    draw.rectangle((x0, y0, x0 + length - 1, y0 + height - 1), outline=TEXT)
    face = font(round(11 * unit))
    for fraction in np.linspace(0, 1, 5):
        value = limits[0] + fraction * (limits[1] - limits[0])
        text = f"{value:.3g}"
        x = x0 + fraction * (length - 1)
        draw.line((x, y0 + height, x, y0 + height + 3 * unit), fill=TEXT)
        shift = draw.textlength(text, font=face) * fraction  # first tick left-aligned, last right-aligned
        draw.text((x - shift, y0 + height + 4 * unit), text, fill=TEXT, font=face)
    draw.text((x0, y0 + height + 19 * unit), label, fill=TEXT, font=face)


def montage(rows: list[list[tuple[np.ndarray, str]]], title: str, tile: int = 160) -> Image.Image:
    """Rows of (patch image, caption) cells, each patch shown `tile` px wide, captions under
    them, `title` on top."""
    columns = max(len(row) for row in rows)
    caption_height, title_height = 34, 24
    cell = tile + 2 * MARGIN
    canvas = Image.new("RGB", (max(columns * cell + MARGIN, MIN_WIDTH), title_height
                               + len(rows) * (tile + caption_height + MARGIN) + MARGIN), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    draw.text((MARGIN, 6), title, fill=TEXT, font=font(13))
    face = font(11)
    for r, row in enumerate(rows):
        top = title_height + r * (tile + caption_height + MARGIN)
        for c, (pixels, caption) in enumerate(row):
            left = MARGIN + c * cell
            canvas.paste(Image.fromarray(pixels).resize((tile, tile), Image.BILINEAR), (left, top))
            for i, line in enumerate(caption.split("\n")):
                draw.text((left, top + tile + 2 + 14 * i), line, fill=TEXT, font=face)
    return canvas
