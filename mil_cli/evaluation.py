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
