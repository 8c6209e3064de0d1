"""How the feature store scales with the number of slides it holds (no model involved).

Prints, for stores already holding 10, 1,000 and 10,000 slides: the seconds to add one
1,000-patch slide (float16, 1280 dims, as `embed` writes it), the seconds a resume takes to
open the writer and list the finished slides, and the slides/s at which `train` loads bags
from the store (every slide of the largest store read through FeatureSource). The filler
slides are small (10 patches) so that 10,000 of them fit on a laptop disk; only their count
matters to the costs measured. Targets (issue 14): adding a slide flat and < 50 ms, resuming
over 10,000 finished slides < 2 s.

    python benchmarks/store.py [--sizes 10 1000 10000] [--folder DIR]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from mil_cli import stores

ATTRS = {"backbone": "efficientnet-lite0", "dim": 1280, "dtype": "float16"}


def slide(n: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"coords": rng.integers(0, 100_000, (n, 2)).astype(np.int64),
            "features": rng.normal(0, 1, (n, 1280)).astype(np.float16)}


def fill(path: Path, count: int) -> None:
    filler = slide(10, 0)
    with stores.StoreWriter(path, stores.FEATURES_FORMAT, ATTRS) as writer:
        for i in range(len(writer.completed()), count):
            writer.write_slide(f"filler_{i:05d}", {"patch_size_level0": 256}, filler)


def time_add(path: Path, repeats: int = 5) -> float:
    """Median seconds of writing one 1,000-patch slide into the open store (index refreshes
    that fall due are included, as they are in a real run)."""
    big = slide(1000, 1)
    seconds = []
    with stores.StoreWriter(path, stores.FEATURES_FORMAT, ATTRS) as writer:
        for r in range(repeats):
            start = time.perf_counter()
            writer.write_slide(f"added_{r}", {"patch_size_level0": 256}, big)
            seconds.append(time.perf_counter() - start)
    return float(np.median(seconds))


def time_resume(path: Path) -> tuple[float, int]:
    """Seconds to open the store for writing and learn which slides are finished (what a rerun
    of embed does before its first new slide), including the closing index rewrite."""
    start = time.perf_counter()
    with stores.StoreWriter(path, stores.FEATURES_FORMAT, ATTRS) as writer:
        done = len(writer.completed())
    return time.perf_counter() - start, done


def loading_rate(path: Path) -> float:
    start = time.perf_counter()
    source = stores.FeatureSource(path)
    for slide_id in source.slide_ids:
        source.load(slide_id)
    return len(source.slide_ids) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 1000, 10000])
    parser.add_argument("--folder", type=Path, default=None, help="where to build the stores (default: a temp folder)")
    args = parser.parse_args()
    folder = args.folder or Path(tempfile.mkdtemp(prefix="milcli-store-"))
    path = folder / "feats.h5"
    print("| slides in the store | add one 1,000-patch slide (s) | resume: open + list finished (s) | train loading (slides/s) |")
    print("| --- | --- | --- | --- |")
    try:
        for size in sorted(args.sizes):
            fill(path, size)
            add = time_add(path)
            for r in range(5):  # back to `size` slides before the next measure
                (stores.slides_dir(path) / f"added_{r}.h5").unlink()
            resume, done = time_resume(path)
            assert done == size
            print(f"| {size:,} | {add:.4f} | {resume:.3f} | {loading_rate(path):,.0f} |", flush=True)
    finally:
        if args.folder is None:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
