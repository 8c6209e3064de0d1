"""Every format users bring, in one folder: real Aperio slides (JPEG and JPEG-2000), a
generated pyramidal TIFF, a PNG, a JPEG and a corrupt file; plus the OpenSlide reader,
resolution handling and tissue on pale and dark stains."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import tifffile
from PIL import Image

from conftest import TEST_DATA, he_like_image, invoke
from mil_cli.slides import WholeSlideReader, open_slide
from mil_cli.tissue import tissue_mask

CMU = TEST_DATA / "CMU-1-Small-Region.svs"
TCGA = TEST_DATA / "TCGA-CR-7395-01A-01-TS1.svs"


def write_pyramid(path: Path, mpp: float = 0.5) -> None:
    """A 2048 x 1536 tiled JPEG TIFF with 4x and 16x sub-resolution levels."""
    base = Image.fromarray(he_like_image(5, (1536, 2048)))
    options = dict(photometric="rgb", tile=(256, 256), compression="jpeg", resolutionunit="CENTIMETER",
                   resolution=(1e4 / mpp, 1e4 / mpp))
    with tifffile.TiffWriter(path) as tif:
        tif.write(np.asarray(base), subifds=2, **options)
        for factor in (4, 16):
            tif.write(np.asarray(base.resize((2048 // factor, 1536 // factor))), subfiletype=1, **options)


@pytest.fixture
def mixed_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "slides"
    folder.mkdir()
    shutil.copy(CMU, folder)
    shutil.copy(TCGA, folder)
    write_pyramid(folder / "pyramid.tif")
    Image.fromarray(he_like_image(6)).save(folder / "scan.png")
    Image.fromarray(he_like_image(7)).save(folder / "crop.jpg", quality=90)
    (folder / "corrupt.svs").write_bytes(CMU.read_bytes()[:50_000])  # truncated download
    return folder


def test_mixed_folder_tiles_everything_but_the_corrupt_file(mixed_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "tiles.h5"
    result = invoke("tile", mixed_folder, "--out", out, "--workers", "2", "--previews", "--json")
    assert result.exit_code == 1
    summary = json.loads(result.stdout)
    assert list(summary["failed"]) == [str(mixed_folder / "corrupt.svs")]
    assert "corrupt.svs" in result.stderr and "Traceback" not in result.stderr
    assert "TCGA-CR-7395-01A-01-TS1.svs: no resolution (mpp)" in result.stderr
    assert "scan.png: no resolution (mpp)" in result.stderr
    expected = ["CMU-1-Small-Region", "TCGA-CR-7395-01A-01-TS1", "crop", "pyramid", "scan"]
    with h5py.File(out, "r") as f:
        assert sorted(f["slides"]) == expected
        cmu = f["slides/CMU-1-Small-Region"].attrs
        assert cmu["mpp"] == pytest.approx(0.499) and cmu["patch_size_level0"] == 257  # 256 * 0.5 / 0.499
        pyramid = f["slides/pyramid"]
        assert pyramid.attrs["mpp"] == pytest.approx(0.5) and len(pyramid["coords"]) > 10
        assert "mpp" not in f["slides/TCGA-CR-7395-01A-01-TS1"].attrs
        assert all(len(f[f"slides/{s}/coords"]) > 0 for s in expected)
    previews = sorted(p.stem for p in (tmp_path / "tiles_previews").glob("*.png"))
    assert previews == expected


def test_pyramidal_tiff_levels_and_reads(tmp_path: Path) -> None:
    path = tmp_path / "pyramid.tif"
    write_pyramid(path)
    with open_slide(path) as slide:
        assert slide.level_dimensions == [(2048, 1536), (512, 384), (128, 96)]
        assert slide.level_downsamples == [1.0, 4.0, 16.0]
        assert slide.best_level(5.0) == 1 and slide.best_level(1.5) == 0
        assert slide.read_patch((256, 256), 512, 128).shape == (128, 128, 3)  # read from level 1


def test_openslide_reader_agrees_with_tiffslide() -> None:
    pytest.importorskip("openslide")
    with WholeSlideReader(CMU, "openslide") as ours, WholeSlideReader(CMU, "tiffslide") as theirs:
        assert ours.dimensions == theirs.dimensions == (2220, 2967)
        assert ours.mpp == pytest.approx(0.499) and ours.vendor == "aperio"
        a = ours.read_region((800, 1200), 0, (128, 128)).astype(int)
        b = theirs.read_region((800, 1200), 0, (128, 128)).astype(int)
        assert np.abs(a - b).mean() < 3  # the same JPEG tiles, decoded by two libraries


def test_magnification_is_sugar_for_target_mpp(tmp_path: Path) -> None:
    out = tmp_path / "tiles.h5"
    assert invoke("tile", CMU, "--out", out, "--magnification", "10", "--quiet").exit_code == 0
    with h5py.File(out, "r") as f:
        attrs = f["slides/CMU-1-Small-Region"].attrs
        assert attrs["target_mpp"] == pytest.approx(1.0) and attrs["patch_size_level0"] == 513


@pytest.mark.parametrize("stain", ["pale", "dark"])
def test_tissue_found_on_pale_and_dark_slides(stain: str) -> None:
    image = he_like_image(8, (300, 400)).astype(float)
    if stain == "pale":
        image = 0.35 * image + 0.65 * 245  # washed-out staining
    else:
        image = image * 0.55  # over-stained, dim scan: background grey, tissue dark
    mask = tissue_mask(image.astype(np.uint8), 8.0)
    truth = tissue_mask(he_like_image(8, (300, 400)), 8.0)
    agreement = (mask == truth).mean()
    assert agreement > 0.95, agreement


def test_hdf5_lock_errors_say_what_happened() -> None:
    """h5py's own messages: a lock held by another process, and a filesystem without locks
    (NFS, Lustre: errno 38 ENOSYS or 37 ENOLCK), which is not "another process"."""
    from mil_cli.stores import lock_failure

    held = ("Unable to synchronously open file (unable to lock file, errno = 11, error message = "
            "'Resource temporarily unavailable')")
    assert "in use by another process" in lock_failure(held)
    for code, text in ((38, "Function not implemented"), (37, "No locks available")):
        message = lock_failure(f"Unable to synchronously open file (unable to lock file, errno = {code}, "
                               f"error message = '{text}')")
        assert "does not support file locks" in message and "HDF5_USE_FILE_LOCKING=FALSE" in message
    assert lock_failure("Unable to synchronously open file (file signature not found)") is None
