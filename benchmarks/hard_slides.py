"""A harder generated slide set than sample_data, for benchmarks/panel.py: small tumours
(often one or two 256-px patches), distractors on every slide (dense lymphocyte clusters and
patches of large, pale, atypical-looking nuclei that are not tumour), and a stain difference
between three 'sites' (each site's slides tinted by its own haematoxylin/eosin balance).
Slides, ground-truth masks and labels are drawn with sample_data/generate.py's primitives.

    python benchmarks/hard_slides.py OUT_DIR [--slides 60]
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

SAMPLE = Path(__file__).resolve().parents[1] / "sample_data"
_spec = importlib.util.spec_from_file_location("sample_generate", SAMPLE / "generate.py")
gen = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gen)  # type: ignore[union-attr]

WIDTH, HEIGHT = 2304, 1792
SITE_TINTS = [np.array([1.0, 1.0, 1.0]), np.array([0.92, 1.04, 0.9]), np.array([1.06, 0.9, 1.04])]
ATYPICAL_RGB = np.array([120.0, 80.0, 160.0])
SEED = 20261124


def make_slide(rng: np.random.Generator, positive: bool, site: int) -> tuple[np.ndarray, np.ndarray]:
    shape = (HEIGHT, WIDTH)
    tissue = gen.blob_mask(rng, shape, (HEIGHT / 2 + rng.uniform(-80, 80), WIDTH / 2 + rng.uniform(-100, 100)),
                           (HEIGHT * rng.uniform(0.34, 0.44), WIDTH * rng.uniform(0.34, 0.44)), wobble=0.35)
    texture = gen.smooth_noise(rng, shape, sigma=3) + 0.6 * gen.smooth_noise(rng, shape, sigma=(1, 8))
    img = np.empty(shape + (3,))
    img[:] = gen.BACKGROUND
    img[tissue] = gen.STROMA_RGB[None, :] + 10.0 * texture[tissue][:, None]
    gen.stamp_nuclei(img, rng, tissue, density=0.0012, radius=(5, 7), colour=gen.NUCLEUS_RGB, elongation=2.2)
    ys, xs = np.nonzero(tissue)
    for _ in range(rng.integers(3, 6)):  # lymphocyte clusters: dark, dense, small round nuclei
        k = rng.integers(len(ys))
        cluster = gen.blob_mask(rng, shape, (ys[k], xs[k]), (rng.uniform(60, 110),) * 2, wobble=0.3) & tissue
        gen.stamp_nuclei(img, rng, cluster, density=0.012, radius=(3.5, 4.5), colour=gen.LYMPHOCYTE_RGB,
                         elongation=1.1)
    for _ in range(rng.integers(1, 3)):  # atypical-looking but benign: large, pale, sparse nuclei
        k = rng.integers(len(ys))
        patch = gen.blob_mask(rng, shape, (ys[k], xs[k]), (rng.uniform(70, 120),) * 2, wobble=0.3) & tissue
        gen.stamp_nuclei(img, rng, patch, density=0.0035, radius=(7, 11), colour=ATYPICAL_RGB, elongation=1.5)
    tumour = np.zeros(shape, dtype=bool)
    if positive:
        inner_y, inner_x = np.nonzero(ndimage.binary_erosion(tissue, iterations=140))
        k = rng.integers(len(inner_y))
        tumour = gen.blob_mask(rng, shape, (inner_y[k], inner_x[k]), (rng.uniform(70, 140), rng.uniform(80, 150)),
                               wobble=0.4) & tissue
        img[tumour] = 0.7 * img[tumour] + 0.3 * np.array([205.0, 140.0, 185.0])
        gen.stamp_nuclei(img, rng, tumour, density=0.006, radius=(8, 13), colour=gen.TUMOUR_NUCLEUS_RGB,
                         elongation=1.7)
    img = ndimage.gaussian_filter(img, sigma=(0.7, 0.7, 0))
    tinted = 255.0 * (img / 255.0) ** SITE_TINTS[site]  # per-channel gamma: a stain/scanner difference
    tinted += rng.normal(0, 3.0, img.shape)
    return np.clip(tinted, 0, 255).astype(np.uint8), tumour


def generate(out: Path, n_slides: int = 60) -> Path:
    """Write out/slides/*.tif, out/masks/*.png (positive slides) and out/labels.csv; returns
    the labels path. Deterministic; slides already written are kept."""
    rng = np.random.default_rng(SEED)
    (out / "slides").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(exist_ok=True)
    rows = []
    for i in range(n_slides):
        positive, site = i % 2 == 0, (i // 2) % len(SITE_TINTS)
        slide_id = f"hard_{i:03d}"
        rgb, tumour = make_slide(rng, positive, site)
        path = out / "slides" / f"{slide_id}.tif"
        if not path.exists():
            gen.write_tiff(path, rgb)
            if positive:
                Image.fromarray(tumour).save(out / "masks" / f"{slide_id}.png", optimize=True)
        rows.append({"slide_id": slide_id, "label": "tumour" if positive else "normal", "site": site})
    return write_labels(out, rows)


def write_labels(out: Path, rows: list[dict]) -> Path:
    """out/labels.csv with slide_id, label and site columns; returns its path."""
    labels = out / "labels.csv"
    with open(labels, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["slide_id", "label", "site"])
        writer.writeheader()
        writer.writerows(rows)
    return labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--slides", type=int, default=60)
    args = parser.parse_args()
    print(generate(args.out, args.slides))


if __name__ == "__main__":
    main()
