"""Generate milcli's sample slides: small synthetic H&E-like images with a known answer.

Each slide is a JPEG-compressed tiled TIFF at 0.5 µm/px (resolution tags in cm, as generic
scanners write them). Tissue is pink stroma with purple nuclei and a few dense lymphocyte
clusters (dark, small, round nuclei) on every slide, so "dark" alone does not mean tumour.
Positive slides also carry one tumour region: crowded, larger, darker, irregular nuclei.
Its ground-truth mask is written to masks/<slide_id>.png.

Deterministic: the same script gives the same files. Run from anywhere:
    python sample_data/generate.py
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image
from scipy import ndimage
from skimage import draw

HERE = Path(__file__).resolve().parent
MPP = 0.5
WIDTH, HEIGHT = 1792, 1280
N_PER_CLASS = 10
SEED = 20261123

STROMA_RGB = np.array([233.0, 168.0, 196.0])
NUCLEUS_RGB = np.array([112.0, 72.0, 150.0])
TUMOUR_NUCLEUS_RGB = np.array([72.0, 38.0, 118.0])
LYMPHOCYTE_RGB = np.array([60.0, 40.0, 110.0])
BACKGROUND = 242.0


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float | tuple[float, float]) -> np.ndarray:
    """Gaussian-smoothed white noise rescaled to zero mean, unit std."""
    factor = max(1, int(min(np.atleast_1d(sigma)) // 4))  # smooth on a coarse grid when cheap to
    coarse = [-(-n // factor) for n in shape]
    field = ndimage.gaussian_filter(rng.standard_normal(coarse), np.asarray(sigma) / factor)
    field = ndimage.zoom(field, factor, order=1)[: shape[0], : shape[1]]
    return (field - field.mean()) / (field.std() + 1e-9)


def blob_mask(rng: np.random.Generator, shape: tuple[int, int], centre: tuple[float, float],
              radii: tuple[float, float], wobble: float) -> np.ndarray:
    """An irregular elliptical blob: an ellipse whose edge is pushed about by smooth noise."""
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    dist = ((yy - centre[0]) / radii[0]) ** 2 + ((xx - centre[1]) / radii[1]) ** 2
    return dist + wobble * smooth_noise(rng, shape, sigma=min(shape) / 12) < 1.0


def stamp_nuclei(img: np.ndarray, rng: np.random.Generator, region: np.ndarray, density: float,
                 radius: tuple[float, float], colour: np.ndarray, elongation: float) -> None:
    """Draw random elliptical nuclei whose centres fall inside `region` (in place)."""
    ys, xs = np.nonzero(region)
    count = rng.poisson(density * len(ys))
    for i in rng.choice(len(ys), size=min(count, len(ys)), replace=False):
        r = rng.uniform(*radius)
        r_row, r_col = r, r * rng.uniform(1.0, elongation)
        rr, cc = draw.ellipse(ys[i], xs[i], r_row, r_col, shape=img.shape[:2],
                              rotation=rng.uniform(0, np.pi))
        shade = colour * rng.uniform(0.85, 1.15)
        img[rr, cc] = 0.25 * img[rr, cc] + 0.75 * shade


def make_slide(rng: np.random.Generator, positive: bool) -> tuple[np.ndarray, np.ndarray]:
    shape = (HEIGHT, WIDTH)
    tissue = blob_mask(rng, shape, (HEIGHT / 2 + rng.uniform(-60, 60), WIDTH / 2 + rng.uniform(-80, 80)),
                       (HEIGHT * rng.uniform(0.36, 0.44), WIDTH * rng.uniform(0.36, 0.44)), wobble=0.35)
    texture = smooth_noise(rng, shape, sigma=3) + 0.6 * smooth_noise(rng, shape, sigma=(1, 8))
    img = np.empty(shape + (3,))
    img[:] = BACKGROUND
    stroma = STROMA_RGB[None, :] + 10.0 * texture[tissue][:, None]
    img[tissue] = stroma
    stamp_nuclei(img, rng, tissue, density=0.0012, radius=(5, 7), colour=NUCLEUS_RGB, elongation=2.2)
    for _ in range(rng.integers(2, 4)):
        ys, xs = np.nonzero(tissue)
        k = rng.integers(len(ys))
        cluster = blob_mask(rng, shape, (ys[k], xs[k]), (rng.uniform(50, 90),) * 2, wobble=0.3) & tissue
        stamp_nuclei(img, rng, cluster, density=0.01, radius=(3.5, 4.5), colour=LYMPHOCYTE_RGB,
                     elongation=1.1)
    tumour = np.zeros(shape, dtype=bool)
    if positive:
        ys, xs = np.nonzero(ndimage.binary_erosion(tissue, iterations=150))
        k = rng.integers(len(ys))
        tumour = blob_mask(rng, shape, (ys[k], xs[k]), (rng.uniform(150, 220), rng.uniform(170, 260)),
                           wobble=0.4) & tissue
        img[tumour] = 0.7 * img[tumour] + 0.3 * np.array([205.0, 140.0, 185.0])
        stamp_nuclei(img, rng, tumour, density=0.006, radius=(8, 13), colour=TUMOUR_NUCLEUS_RGB,
                     elongation=1.7)
    img = ndimage.gaussian_filter(img, sigma=(0.7, 0.7, 0))
    img += rng.normal(0, 3.0, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8), tumour


def write_tiff(path: Path, rgb: np.ndarray) -> None:
    pixels_per_cm = 1e4 / MPP
    tifffile.imwrite(path, rgb, photometric="rgb", tile=(256, 256), compression="jpeg",
                     compressionargs={"level": 70}, resolution=(pixels_per_cm, pixels_per_cm),
                     resolutionunit="CENTIMETER", description="milcli sample slide")


def main() -> None:
    rng = np.random.default_rng(SEED)
    (HERE / "slides").mkdir(exist_ok=True)
    (HERE / "masks").mkdir(exist_ok=True)
    rows = []
    for i in range(2 * N_PER_CLASS):
        positive = i % 2 == 0
        slide_id = f"slide_{i:02d}"
        rgb, tumour = make_slide(rng, positive)
        write_tiff(HERE / "slides" / f"{slide_id}.tif", rgb)
        if positive:
            Image.fromarray(tumour).save(HERE / "masks" / f"{slide_id}.png", optimize=True)
        rows.append({"slide_id": slide_id, "label": "tumour" if positive else "normal"})
    with open(HERE / "labels.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["slide_id", "label"])
        writer.writeheader()
        writer.writerows(rows)


if __name__ == "__main__":
    main()
