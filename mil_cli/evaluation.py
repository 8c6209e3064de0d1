"""Score explanations against ground-truth annotation masks (level-0 boolean images)."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score


def patch_mask_fraction(mask: np.ndarray, coords: np.ndarray, size: int) -> np.ndarray:
    """Fraction of each patch (level-0 top-left `coords`, side `size`) inside `mask`."""
    table = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), dtype=np.int64)
    table[1:, 1:] = mask.astype(np.int64).cumsum(0).cumsum(1)
    x0, y0 = np.clip(coords[:, 0], 0, mask.shape[1]), np.clip(coords[:, 1], 0, mask.shape[0])
    x1, y1 = np.clip(x0 + size, 0, mask.shape[1]), np.clip(y0 + size, 0, mask.shape[0])
    inside = table[y1, x1] - table[y0, x1] - table[y1, x0] + table[y0, x0]
    return inside / float(size * size)


def localisation_auc(scores: np.ndarray, inside: np.ndarray) -> float:
    """AUC of patch scores for telling patches inside the annotation from those outside;
    NaN when all patches are on one side."""
    if inside.all() or not inside.any():
        return float("nan")
    return float(roc_auc_score(inside, scores))


def mask_box(mask: np.ndarray) -> list[int]:
    """Bounding box (x0, y0, x1, y1, exclusive ends) of a non-empty boolean mask."""
    rows, cols = np.nonzero(mask)
    return [int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1]


def box_iou(a: list[float], b: list[float]) -> float:
    """Intersection over union of two (x0, y0, x1, y1) boxes."""
    width = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = width * height
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0
