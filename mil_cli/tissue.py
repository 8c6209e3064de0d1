"""Find tissue, and pen ink, on a slide thumbnail.

H&E tissue is coloured while glass is white or grey, so saturation separates them. The
threshold is Otsu's on the saturation of the thumbnail, floored so that a blank image finds
nothing instead of splitting its noise in two. Otsu splits whatever it is given in two: on
an image with no glass at all (a crop from inside the tissue, as image-level cohorts are) it
would split pale stroma from dense nuclei and call the stroma background. So its split is
kept only where the paler class is glass (median saturation at most GLASS_MAX_SATURATION:
glass measures 0.00-0.02 on the test slides and sample data, the paler class of glass-free
crops from inside their tissue 0.19-0.35; the margin leaves room for tinted glass: a yellowish
(235, 228, 210) is 0.11); otherwise everything above the floor is tissue. Near-black pixels
(scanner borders, folds) are never tissue. Object and hole sizes are physical (µm²) when the
resolution is known.

Pen ink (the marks pathologists draw on the glass) is saturated too, so it would pass as
tissue; it is found first and kept out. The rules work in CIELAB (D65), by hue angle
h = atan2(b*, a*) and chroma C = hypot(a*, b*), where the two stains occupy a narrow band:
eosin's pink at h -20..+15 degrees, haematoxylin's violet at -65..-25 (measured on both real
test slides: 98 % of their coloured tissue pixels lie within -80..+5, and the few bluer ones are greyish, chroma under 34). Ink
is found by hysteresis, as edges are in Canny's detector: pixels that are certainly ink seed
it, and it grows over the connected pixels that may be ink (ink over dense tissue takes on
the stain's colour and darkness, so only the stroke's continuity tells it apart):
             certainly ink                          may be ink
  blue:  -160 < h < -65 and C > 30           -160 < h < -55 and C > 20, or
                                             -160 < h < -45, C > 30 and L* < 30 (over eosin)
  green: h > 95 or h < -160, C > 15          h > 90 or h < -150, C > 8
  red:   15 < h < 70, C > 45, L* < 60        10 < h < 70, C > 35, L* < 65
  black: L* < 35 and C < 10                  L* < 35 and C < 15, or L* < 25 and C < 25
(no H&E stain is green or cyan; the blue seed is bluer and more vivid than any haematoxylin;
eosin is pinker than red ink, h < 15; dark tissue keeps its stain's colour, C > 11).
Seeds count only in regions of at least INK_MIN_AREA_UM2 (single pixels of stain meet the
rules here and there; a marker stroke is 0.3-1 mm wide), and the ink found is widened by
INK_MARGIN_UM to take the stroke's faint rim.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from skimage import color, filters, measure, morphology, transform

MIN_SATURATION = 0.05   # below this nothing is stained, whatever Otsu says
GLASS_MAX_SATURATION = 0.15  # Otsu's paler class is glass only when its median is at most this
MAX_DARK_VALUE = 0.15   # HSV value under which a pixel is a black border, not tissue
MIN_TISSUE_AREA_UM2 = 20_000.0   # about 140 x 140 µm: smaller specks are dust or debris
MAX_HOLE_AREA_UM2 = 10_000.0     # gaps smaller than this inside tissue are filled
FALLBACK_PIXEL_UM = 8.0          # assumed thumbnail pixel size when the slide has no mpp
WORKING_PIXEL_UM = 4.0           # finer thumbnails are shrunk to about this before analysis
INK_MIN_AREA_UM2 = 20_000.0      # about 140 x 140 µm: smaller ink-coloured specks are stain
INK_MARGIN_UM = 24.0             # ink regions are widened by this much


@dataclass
class TissueMasks:
    tissue: np.ndarray   # (h, w) bool, on the thumbnail's grid, pen ink excluded
    ink: np.ndarray      # (h, w) bool, pen ink found (all False when not looked for)


def find_tissue(rgb: np.ndarray, thumbnail_um_per_px: float | None, exclude_ink: bool = True) -> TissueMasks:
    """Tissue and pen-ink masks on the thumbnail's grid."""
    def both(image: np.ndarray, pixel_um: float | None) -> np.ndarray:
        ink = ink_mask(image, pixel_um) if exclude_ink else np.zeros(image.shape[:2], dtype=bool)
        return np.stack([_tissue_mask(image, pixel_um, ink), ink])

    tissue, ink = _at_working_resolution(both, rgb, thumbnail_um_per_px)
    return TissueMasks(tissue=tissue, ink=ink)


def tissue_mask(rgb: np.ndarray, thumbnail_um_per_px: float | None) -> np.ndarray:
    """Boolean tissue mask on the thumbnail's grid, pen ink excluded."""
    return find_tissue(rgb, thumbnail_um_per_px).tissue


def _at_working_resolution(analyse: Callable[[np.ndarray, float | None], np.ndarray], rgb: np.ndarray,
                           pixel_um: float | None) -> np.ndarray:
    """`analyse` on the thumbnail shrunk to about WORKING_PIXEL_UM, its masks brought back to
    the thumbnail's grid."""
    factor = int(WORKING_PIXEL_UM // pixel_um) if pixel_um else 1
    if factor <= 1:
        return analyse(rgb, pixel_um)
    small = transform.downscale_local_mean(rgb, (factor, factor, 1)).astype(np.uint8)
    masks = analyse(small, pixel_um * factor)
    full = masks.repeat(factor, axis=-2).repeat(factor, axis=-1)
    return full[..., : rgb.shape[0], : rgb.shape[1]]


def ink_mask(rgb: np.ndarray, pixel_um: float | None) -> np.ndarray:
    """Pen ink by the rules in the module docstring."""
    lab = color.rgb2lab(rgb)
    lightness, a, b = lab[..., 0], lab[..., 1], lab[..., 2]
    chroma = np.hypot(a, b)
    hue = np.degrees(np.arctan2(b, a))
    certain = (((hue > -160) & (hue < -65) & (chroma > 30))
               | (((hue > 95) | (hue < -160)) & (chroma > 15))
               | ((hue > 15) & (hue < 70) & (chroma > 45) & (lightness < 60))
               | ((lightness < 35) & (chroma < 10)))
    possible = (((hue > -160) & (hue < -55) & (chroma > 20))
                | ((hue > -160) & (hue < -45) & (chroma > 30) & (lightness < 30))
                | (((hue > 90) | (hue < -150)) & (chroma > 8))
                | ((hue > 10) & (hue < 70) & (chroma > 35) & (lightness < 65))
                | ((lightness < 35) & (chroma < 15)) | ((lightness < 25) & (chroma < 25)))
    pixel_um = pixel_um or FALLBACK_PIXEL_UM
    seeds = morphology.remove_small_objects(certain, max_size=max(1, round(INK_MIN_AREA_UM2 / pixel_um**2)))
    regions = measure.label(possible | seeds)
    ink = np.isin(regions, np.unique(regions[seeds]))
    ink &= regions > 0
    return morphology.dilation(ink, morphology.disk(max(1, round(INK_MARGIN_UM / pixel_um))))


def _tissue_mask(rgb: np.ndarray, pixel_um: float | None, ink: np.ndarray) -> np.ndarray:
    hsv = color.rgb2hsv(rgb)
    saturation = filters.median(hsv[..., 1], morphology.footprint_rectangle((5, 5)))
    candidate = (hsv[..., 2] > MAX_DARK_VALUE) & ~ink  # ink is saturated too: out before Otsu sees it
    values = saturation[candidate]
    if values.size == 0:
        return np.zeros(rgb.shape[:2], dtype=bool)
    threshold = MIN_SATURATION
    if np.ptp(values) > 0:
        otsu = float(filters.threshold_otsu(values))
        if np.median(values[values <= otsu]) <= GLASS_MAX_SATURATION:
            threshold = max(threshold, otsu)
    mask = (saturation > threshold) & candidate

    pixel_um = pixel_um or FALLBACK_PIXEL_UM
    pixel_area = pixel_um**2
    closing_radius = max(1, round(16.0 / pixel_um))
    mask = morphology.closing(mask, morphology.disk(closing_radius))
    mask = morphology.remove_small_holes(mask, max_size=max(1, round(MAX_HOLE_AREA_UM2 / pixel_area)))
    mask = morphology.remove_small_objects(mask, max_size=max(1, round(MIN_TISSUE_AREA_UM2 / pixel_area)))
    return mask & ~ink
