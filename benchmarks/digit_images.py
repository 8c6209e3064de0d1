"""Image bags with 32-px instances, for benchmarks/panel.py: MNIST-bags (mil_cli/synthetic.py's
digit bags) drawn as small H&E-coloured PNG images, one 32 x 32 cell per digit (the 8 x 8
digit upscaled, its strokes in haematoxylin purple on textured eosin pink), cells in rows of
four, the unused cells of the last row left white. Each image's stain is tinted by one of three
'sites'. A bag is positive when it holds a 9; the ground-truth mask marks the 9s' cells. The
images go through milcli's own tile (`--patch-size 32`, no mpp: native pixels) and embed
(the default backbone, each patch upscaled to its input size), as a user's small image crops
would: the path that image-level cohorts with 32-px patches take.

    python benchmarks/digit_images.py OUT_DIR [--bags 100]
    python benchmarks/digit_images.py OUT_DIR --probe [--backbone NAME]  # after panel.py embedded OUT_DIR

`--probe` asks whether the encoder or the MIL head is the limit: a logistic regression trained
on the instance labels (which MIL never sees), 5-fold cross-validated over all cells, on the
features panel.py embedded with the backbone and on each cell's pixels shrunk to 8 x 8 grey.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import h5py
import numpy as np
from PIL import Image
from scipy import ndimage

from mil_cli.evaluation import patch_mask_fraction
from mil_cli.synthetic import digit_bags

from encoder_probe import probe_auc  # type: ignore[import-not-found]
from hard_slides import SITE_TINTS, gen, write_labels  # type: ignore[import-not-found]
from panel import EMBEDDING, TUMOUR_SHARE, features_path  # type: ignore[import-not-found]

CELL = 32
COLUMNS = 4
SEED = 20261207


def draw_bag(rng: np.random.Generator, digits: np.ndarray, key: np.ndarray, site: int) -> tuple[np.ndarray, np.ndarray]:
    """(rgb image, mask of the key digits' cells) for one bag of (N, 64) digit images in [0, 1]."""
    rows = -(-len(digits) // COLUMNS)
    shape = (rows * CELL, COLUMNS * CELL)
    img = np.full(shape + (3,), 255.0)
    mask = np.zeros(shape, dtype=bool)
    texture = gen.smooth_noise(rng, shape, sigma=2)
    for i, (digit, is_key) in enumerate(zip(digits, key)):
        r, c = divmod(i, COLUMNS)
        cell = (slice(r * CELL, (r + 1) * CELL), slice(c * CELL, (c + 1) * CELL))
        ink = np.asarray(Image.fromarray((digit.reshape(8, 8) * 255).astype(np.uint8)).resize(
            (CELL, CELL), Image.BILINEAR), dtype=np.float64)[..., None] / 255.0
        stroma = gen.STROMA_RGB[None, None, :] + 10.0 * texture[cell][..., None]
        img[cell] = (1 - ink) * stroma + ink * gen.NUCLEUS_RGB[None, None, :]
        mask[cell] = is_key
    img = ndimage.gaussian_filter(img, sigma=(0.5, 0.5, 0))
    tinted = 255.0 * (img / 255.0) ** SITE_TINTS[site] + rng.normal(0, 3.0, img.shape)
    return np.clip(tinted, 0, 255).astype(np.uint8), mask


def generate(out: Path, n_bags: int = 100) -> Path:
    """Write out/slides/*.png, out/masks/*.png (positive bags) and out/labels.csv; returns the
    labels path. Deterministic; images already written are kept."""
    rng = np.random.default_rng(SEED)
    (out / "slides").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(exist_ok=True)
    rows = []
    for i, (digits, label, key) in enumerate(digit_bags(n_bags, "train", seed=SEED)):
        site = (i // 2) % len(SITE_TINTS)
        slide_id = f"digits_{i:03d}"
        rgb, mask = draw_bag(rng, digits, key, site)
        path = out / "slides" / f"{slide_id}.png"
        if not path.exists():
            Image.fromarray(rgb).save(path)
            if label:
                Image.fromarray(mask).save(out / "masks" / f"{slide_id}.png")
        rows.append({"slide_id": slide_id, "label": "tumour" if label else "normal", "site": site})
    return write_labels(out, rows)


def probe(folder: Path) -> dict[str, float]:
    """Instance-probe AUC (key cell or not) on the embedded features and on 8 x 8 grey pixels."""
    features, pixels, key = [], [], []
    with h5py.File(features_path(folder), "r") as store:
        for slide_id in sorted(store["slides"]):
            group = store["slides"][slide_id]
            features.append(group["features"][:])
            coords = group["coords"][:]
            grey = Image.open(folder / "slides" / f"{slide_id}.png").convert("L")
            for x, y in coords:
                cell = grey.crop((x, y, x + CELL, y + CELL)).resize((8, 8), Image.BILINEAR)
                pixels.append(np.asarray(cell, dtype=np.float32).ravel())
            mask_path = folder / "masks" / f"{slide_id}.png"  # key cells as the panel labels them
            key.append(patch_mask_fraction(np.array(Image.open(mask_path)).astype(bool), coords, CELL) >= TUMOUR_SHARE
                       if mask_path.exists() else np.zeros(len(coords), dtype=bool))
    labels = np.concatenate(key)
    return {name: probe_auc(x, labels)
            for name, x in (("features", np.concatenate(features)), ("8 x 8 grey pixels", np.array(pixels)))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--bags", type=int, default=100)
    parser.add_argument("--probe", action="store_true", help="instance-probe AUCs of an embedded OUT_DIR")
    parser.add_argument("--backbone", default=EMBEDDING["backbone"], help="whose features --probe reads")
    args = parser.parse_args()
    if args.probe:
        EMBEDDING["backbone"] = args.backbone
        for name, auc in probe(args.out).items():
            print(f"instance probe on {name}: AUC {auc:.3f}")
    else:
        print(generate(args.out, args.bags))


if __name__ == "__main__":
    main()
