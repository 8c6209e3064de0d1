"""`tile --qc`: a blurred region is left out, the sharp original and both real slides keep
every patch, and the measures and counts are stored and reported."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from scipy import ndimage

from conftest import TEST_DATA, invoke
from mil_cli.config import QCThresholds
from mil_cli.tiling import TilingOptions, tile_slide
from test_pen import level0, write_tiff

QC = TilingOptions(patch_size=128, qc=QCThresholds())


@pytest.mark.parametrize("name", ["CMU-1-Small-Region.svs", "TCGA-CR-7395-01A-01-TS1.svs"])
def test_real_slides_keep_every_patch_under_qc(name: str) -> None:
    plain = tile_slide(TEST_DATA / name, TilingOptions(patch_size=128))
    checked = tile_slide(TEST_DATA / name, QC)
    assert checked.dropped == {} and np.array_equal(plain.coords, checked.coords)
    assert checked.quality["sharpness"].min() >= QCThresholds().min_sharpness


def test_a_blurred_region_is_left_out_and_the_sharp_rest_kept(tmp_path: Path) -> None:
    image, mpp = level0("CMU-1-Small-Region.svs")  # 0.499 µm/px: level 0 is the patches' resolution
    blurred = image.copy()
    half = image.shape[0] // 2
    blurred[half:] = ndimage.gaussian_filter(image[half:].astype(np.float32), (4, 4, 0)).round().astype(np.uint8)
    tiled = tile_slide(write_tiff(tmp_path / "blurred.tif", blurred, mpp), QC)
    size = int(tiled.attrs["patch_size_level0"])
    left_out = {tuple(c) for c in tiled.dropped["blurred"]}
    kept = {tuple(c) for c in tiled.coords}
    whole = {tuple(c) for c in tile_slide(write_tiff(tmp_path / "sharp.tif", image, mpp), QC).coords}
    inside_blur = {c for c in left_out | kept if c[1] >= half + 8}  # 8 px: the filter's reach across the border
    sharp_side = {c for c in whole if c[1] + size <= half - 8}
    assert len(inside_blur) > 50 and inside_blur <= left_out
    assert len(sharp_side) > 20 and sharp_side <= kept
    assert json.loads(tiled.attrs["qc_dropped"])["blurred"] == len(left_out)


def test_qc_from_the_command_line_stores_measures_and_counts(tmp_path: Path) -> None:
    out = tmp_path / "tiles.h5"
    image, mpp = level0("CMU-1-Small-Region.svs")
    image[: image.shape[0] // 2] = ndimage.gaussian_filter(image[: image.shape[0] // 2], (4, 4, 0))
    slide = write_tiff(tmp_path / "half_blurred.tif", image, mpp)
    result = invoke("tile", slide, "--out", out, "--patch-size", "128", "--qc", "--previews", "--json")
    assert result.exit_code == 0, result.stderr
    counts = json.loads(result.stdout)["counts"]
    assert counts["qc_blurred"] > 5
    assert "half_blurred: --qc left out" in " ".join(result.stderr.split())
    with h5py.File(out, "r") as f:
        group = f["slides"]["half_blurred"]
        assert group["qc_sharpness"].shape == (len(group["coords"]),)
        assert group["qc_sharpness"][()].min() >= QCThresholds().min_sharpness
    assert (tmp_path / "tiles_previews" / "half_blurred.png").is_file()
