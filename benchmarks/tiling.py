"""Tiling throughput on a generated 20,000 x 20,000 px pyramidal TIFF (JPEG tiles, 0.25 µm/px,
levels 1, 4, 16, 64): seconds per slide and megapixels of slide per second for tissue
detection plus the patch grid. Target: under 5 s per such slide on 2 cores.

    python benchmarks/tiling.py [--size 20000] [--repeats 3] [--keep /tmp/bench_20k.tif]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

from mil_cli.tiling import TilingOptions, tile_slide

MPP = 0.25


def make_pyramidal_tiff(path: Path, size: int, seed: int = 0) -> None:
    """Pink tissue blobs with purple speckle on white, written as a tiled JPEG pyramid."""
    rng = np.random.default_rng(seed)
    coarse = size // 64
    yy, xx = np.mgrid[0:coarse, 0:coarse] / coarse
    tissue = np.zeros((coarse, coarse), dtype=bool)
    for _ in range(4):
        cy, cx, r = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.1, 0.2)
        tissue |= (yy - cy) ** 2 + (xx - cx) ** 2 < r**2
    mask = np.asarray(Image.fromarray(tissue).resize((size, size), Image.NEAREST))
    speckle = rng.integers(0, 40, (512, 512, 1), dtype=np.uint8)
    level0 = np.full((size, size, 3), 242, dtype=np.uint8)
    reps = -(-size // 512)
    texture = np.tile(speckle, (reps, reps, 1))[:size, :size]
    level0[mask] = (np.array([228, 160, 196], dtype=np.uint8) - texture[mask] * np.array([1, 1, 0], dtype=np.uint8))
    pixels_per_cm = 1e4 / MPP
    options = dict(photometric="rgb", tile=(512, 512), compression="jpeg", compressionargs={"level": 85},
                   resolution=(pixels_per_cm, pixels_per_cm), resolutionunit="CENTIMETER")
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        tif.write(level0, subifds=3, **options)
        image = Image.fromarray(level0)
        for factor in (4, 16, 64):
            smaller = np.asarray(image.resize((size // factor, size // factor), Image.BILINEAR))
            tif.write(smaller, subfiletype=1, **options)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--keep", type=Path, help="reuse / keep the generated slide at this path")
    args = parser.parse_args()
    path = args.keep or Path(tempfile.mkdtemp()) / "bench.tif"
    if not path.exists():
        start = time.perf_counter()
        make_pyramidal_tiff(path, args.size)
        print(f"generated {path} ({path.stat().st_size / 1e6:.0f} MB) in {time.perf_counter() - start:.0f} s")
    options = TilingOptions()  # the defaults: 256 px at 0.5 µm/px
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        tiled = tile_slide(path, options)
        times.append(time.perf_counter() - start)
    best, median = min(times), float(np.median(times))
    megapixels = args.size * args.size / 1e6
    print(f"{args.size} x {args.size} px slide, {len(tiled.coords)} patches of {tiled.attrs['patch_size_level0']} "
          f"level-0 px, tissue {tiled.attrs['tissue_fraction']:.0%}")
    print(f"tissue + grid: median {median:.2f} s per slide (best {best:.2f} s), "
          f"{megapixels / median:.0f} megapixels of slide per second")


if __name__ == "__main__":
    main()
