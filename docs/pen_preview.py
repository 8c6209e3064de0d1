"""Remake docs/pen_preview.png, the README's picture of pen-ink exclusion: the CMU-1 test slide
with a blue and a black marker stroke drawn across it (as tests/test_pen.py draws them),
tiled with the defaults, previewed.

    python docs/pen_preview.py
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from test_pen import SLIDES, STROKE_PX, inked, level0, strokes, write_tiff  # noqa: E402

from mil_cli.tiling import tile_slide, write_preview  # noqa: E402

NAME = "CMU-1-Small-Region.svs"

with tempfile.TemporaryDirectory() as folder:
    image, mpp = level0(NAME)
    pen = write_tiff(Path(folder) / "pen.tif", inked(image, strokes(image.shape[:2], ("blue", "black"),
                                                                     STROKE_PX[NAME], seed=len(NAME))), mpp)
    write_preview(Path(folder) / "preview.png", tile_slide(pen, SLIDES[NAME]))
    preview = Image.open(Path(folder) / "preview.png")
    preview.thumbnail((480, 480))
    preview.convert("RGB").quantize(96).save(ROOT / "docs" / "pen_preview.png", optimize=True)
