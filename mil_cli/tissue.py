"""Find tissue on a slide thumbnail.

H&E tissue is coloured while glass is white or grey, so saturation separates them. The
threshold is Otsu's on the saturation of the thumbnail, floored so that a blank image finds
nothing instead of splitting its noise in two. Near-black pixels (scanner borders, folds)
are never tissue. Object and hole sizes are physical (µm²) when the resolution is known.
"""

from __future__ import annotations

import numpy as np
from skimage import color, filters, morphology, transform

MIN_SATURATION = 0.05   # below this nothing is stained, whatever Otsu says
MAX_DARK_VALUE = 0.15   # HSV value under which a pixel is a black border, not tissue
MIN_TISSUE_AREA_UM2 = 20_000.0   # about 140 x 140 µm: smaller specks are dust or debris
MAX_HOLE_AREA_UM2 = 10_000.0     # gaps smaller than this inside tissue are filled
FALLBACK_PIXEL_UM = 8.0          # assumed thumbnail pixel size when the slide has no mpp
WORKING_PIXEL_UM = 4.0           # finer thumbnails are shrunk to about this before analysis


def tissue_mask(rgb: np.ndarray, thumbnail_um_per_px: float | None) -> np.ndarray:
    """Boolean tissue mask on the thumbnail's grid."""
    factor = int(WORKING_PIXEL_UM // thumbnail_um_per_px) if thumbnail_um_per_px else 1
    if factor <= 1:
        return _tissue_mask(rgb, thumbnail_um_per_px)
    small = transform.downscale_local_mean(rgb, (factor, factor, 1)).astype(np.uint8)
    mask = _tissue_mask(small, thumbnail_um_per_px * factor)
    full = mask.repeat(factor, axis=0).repeat(factor, axis=1)
    return full[: rgb.shape[0], : rgb.shape[1]]


def _tissue_mask(rgb: np.ndarray, pixel_um: float | None) -> np.ndarray:
    hsv = color.rgb2hsv(rgb)
    saturation = filters.median(hsv[..., 1], morphology.footprint_rectangle((5, 5)))
    bright_enough = hsv[..., 2] > MAX_DARK_VALUE
    candidates = saturation[bright_enough]
    if candidates.size == 0:
        return np.zeros(rgb.shape[:2], dtype=bool)
    threshold = MIN_SATURATION
    if np.ptp(candidates) > 0:
        threshold = max(threshold, float(filters.threshold_otsu(candidates)))
    mask = (saturation > threshold) & bright_enough

    pixel_um = pixel_um or FALLBACK_PIXEL_UM
    pixel_area = pixel_um**2
    closing_radius = max(1, round(16.0 / pixel_um))
    mask = morphology.closing(mask, morphology.disk(closing_radius))
    mask = morphology.remove_small_holes(mask, max_size=max(1, round(MAX_HOLE_AREA_UM2 / pixel_area)))
    mask = morphology.remove_small_objects(mask, max_size=max(1, round(MIN_TISSUE_AREA_UM2 / pixel_area)))
    return mask
