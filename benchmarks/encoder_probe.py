"""How well an encoder's patch features see nuclei on real H&E: a linear probe on small patches.

CMU-1-Small-Region (tests/data, 0.5 µm/px, CC0) is cut into a grid of P-px patches (default
32, the size image-level cohorts of small crops are tiled at); patches under half tissue are
left out. A haematoxylin blob detector (colour deconvolution, Otsu's threshold over tissue,
blobs of 25-600 px) marks nucleus centres. A patch is positive when a centre lies in its
central half, negative when no centre lies anywhere in it (the rest are left out). Each
backbone embeds the patches exactly as `milcli embed` does (resized to its input side,
normalised, on the CPU); a logistic regression on the features, 5-fold cross-validated,
gives the probe's AUC. 8 x 8 RGB pixels are the floor any encoder should beat.

Labels come from pixels, so the probe asks one thing: does the feature keep what a nucleus
looks like (the key instances of nucleus-level cohorts are cells), or lose it to the
ImageNet-specific last layer?

    python benchmarks/encoder_probe.py [--backbones efficientnet-lite0 efficientnet-lite0-mid]
                                       [--patch-size 32] [--weights NAME=FILE ...]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage
from skimage.color import rgb2hed
from skimage.filters import threshold_otsu
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from mil_cli.backbones import get_backbone
from mil_cli.config import DEFAULT_BACKBONE
from mil_cli.embedding import Embedder
from mil_cli.slides import open_slide

SLIDE = Path(__file__).resolve().parents[1] / "tests" / "data" / "CMU-1-Small-Region.svs"
TISSUE_SATURATION = 20   # max - min of RGB: glass is below
NUCLEUS_AREA = (25, 600)  # px at 0.5 µm/px: a lymphocyte to a large tumour nucleus


def labelled_patches(patch: int) -> tuple[np.ndarray, np.ndarray]:
    """(n, P, P, 3) uint8 patches and their labels (a nucleus centre in the central half)."""
    slide = open_slide(SLIDE)
    image = slide.read_region((0, 0), 0, slide.dimensions)[..., :3]
    haematoxylin = ndimage.gaussian_filter(rgb2hed(image)[..., 0], 1.0)
    tissue = image.max(2).astype(int) - image.min(2) > TISSUE_SATURATION
    blobs, count = ndimage.label(haematoxylin > threshold_otsu(haematoxylin[tissue]))
    areas = ndimage.sum_labels(np.ones_like(blobs), blobs, range(1, count + 1))
    centres = np.zeros(blobs.shape, dtype=bool)
    for (y, x), area in zip(ndimage.center_of_mass(blobs > 0, blobs, range(1, count + 1)), areas):
        if NUCLEUS_AREA[0] <= area <= NUCLEUS_AREA[1]:
            centres[int(y), int(x)] = True
    patches, labels = [], []
    q = patch // 4
    for y in range(0, image.shape[0] - patch + 1, patch):
        for x in range(0, image.shape[1] - patch + 1, patch):
            if tissue[y:y + patch, x:x + patch].mean() < 0.5:
                continue
            if centres[y + q:y + patch - q, x + q:x + patch - q].any():
                labels.append(1)
            elif not centres[y:y + patch, x:x + patch].any():
                labels.append(0)
            else:
                continue
            patches.append(image[y:y + patch, x:x + patch])
    return np.stack(patches), np.array(labels)


def features(backbone: str, patches: np.ndarray, weights: Path | None) -> np.ndarray:
    embedder = Embedder(get_backbone(backbone), torch.device("cpu"), weights)
    batches = [embedder(torch.from_numpy(patches[i:i + 128])) for i in range(0, len(patches), 128)]
    return torch.cat(batches).float().numpy()


def probe_auc(x: np.ndarray, labels: np.ndarray) -> float:
    """5-fold cross-validated AUC of a logistic regression on standardised `x` (the probes' one model)."""
    model = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=3000))
    return float(roc_auc_score(labels, cross_val_predict(model, x, labels, cv=5, method="predict_proba")[:, 1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", nargs="+", default=[DEFAULT_BACKBONE])
    parser.add_argument("--patch-size", type=int, default=32)
    parser.add_argument("--weights", nargs="*", default=[], metavar="NAME=FILE", help="a backbone's weight file")
    args = parser.parse_args()
    weights = dict(w.split("=", 1) for w in args.weights)
    patches, labels = labelled_patches(args.patch_size)
    print(f"{len(patches)} patches of {args.patch_size} px, {labels.mean():.0%} holding a nucleus centre")
    pixels = torch.nn.functional.interpolate(torch.from_numpy(patches).permute(0, 3, 1, 2).float(), size=(8, 8),
                                             mode="area").flatten(1).numpy()
    print(f"| features | dim | probe AUC |\n| --- | --- | --- |\n| 8 x 8 RGB pixels | 192 | {probe_auc(pixels, labels):.3f} |")
    for name in args.backbones:
        x = features(name, patches, Path(weights[name]) if name in weights else None)
        print(f"| {name} | {x.shape[1]} | {probe_auc(x, labels):.3f} |", flush=True)


if __name__ == "__main__":
    main()
