"""Readers, tissue detection and the patch grid on real, generated and broken inputs."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from conftest import SAMPLE, TEST_DATA, he_like_image
from mil_cli.errors import InputError
from mil_cli.slides import find_slides, open_slide, safe_file_stem, slide_id_from_path
from mil_cli.tiling import TilingOptions, grid_in_tissue, tile_slide
from mil_cli.tissue import tissue_mask

CMU = TEST_DATA / "CMU-1-Small-Region.svs"


def png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG whose header claims width x height but holds no pixel data."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))


def test_real_aperio_slide_reports_size_and_mpp() -> None:
    with open_slide(CMU) as slide:
        assert slide.reader == "tiffslide"
        assert slide.dimensions == (2220, 2967)
        assert slide.mpp == pytest.approx(0.499)
        assert slide.vendor == "aperio"
        region = slide.read_region((1000, 1000), 0, (64, 32))
        assert region.shape == (32, 64, 3) and region.dtype == np.uint8


def test_sample_tiff_mpp_comes_from_resolution_tags() -> None:
    with open_slide(SAMPLE / "slides" / "slide_00.tif") as slide:
        assert slide.mpp == pytest.approx(0.5)


def test_plain_png_has_no_mpp_and_reads_regions(tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    Image.fromarray(he_like_image(0, (100, 120))).save(path)
    with open_slide(path) as slide:
        assert slide.mpp is None and slide.dimensions == (120, 100)
        region = slide.read_region((110, 90), 0, (20, 20))  # hangs over the edge: padded white
        assert region.shape == (20, 20, 3)
        assert (region[15:, 15:] == 255).all()
        assert slide.thumbnail(60).shape == (50, 60, 3)


def test_jpeg_thumbnail_is_decoded_at_reduced_scale(tmp_path: Path) -> None:
    path = tmp_path / "big.jpg"
    Image.fromarray(he_like_image(0, (1600, 2400))).save(path, quality=85)
    with open_slide(path) as slide:
        thumb = slide.thumbnail(300)
    assert thumb.shape == (200, 300, 3)


def test_non_image_file_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "notes.png"
    path.write_text("this is not an image")
    with pytest.raises(InputError, match="notes.png: not a readable image"):
        open_slide(path)


def test_unsupported_suffix_is_named(tmp_path: Path) -> None:
    path = tmp_path / "slide.xyz"
    path.write_bytes(b"\0" * 10)
    with pytest.raises(InputError, match=r"unsupported file type '\.xyz'"):
        open_slide(path)


def test_absurd_image_size_is_refused_before_decoding(tmp_path: Path) -> None:
    path = tmp_path / "bomb.png"
    png_header_only(path, 200_000, 200_000)
    with pytest.raises(InputError, match="too large to decode"):
        open_slide(path)


def test_find_slides_skips_other_files_in_folders(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "labels.csv").write_text("x")
    (tmp_path / ".hidden.png").write_bytes(b"")
    assert [p.name for p in find_slides([tmp_path])] == ["a.png"]


def test_slide_ids_and_safe_names() -> None:
    assert slide_id_from_path(Path("/x/TCGA-01.svs")) == "TCGA-01"
    assert safe_file_stem("../../etc/passwd") == "_.._etc_passwd"
    assert safe_file_stem("a b\tc") == "a_b_c"
    assert "/" not in safe_file_stem("x/y") and not safe_file_stem("..").startswith(".")


def test_blank_image_has_no_tissue() -> None:
    rng = np.random.default_rng(0)
    blank = np.clip(240 + rng.normal(0, 3, (200, 300, 3)), 0, 255).astype(np.uint8)
    assert not tissue_mask(blank, 8.0).any()


def test_tissue_ignores_black_borders_and_finds_the_blob() -> None:
    image = he_like_image(3, (300, 400))
    image[:, :20] = 0  # scanner border
    mask = tissue_mask(image, 8.0)
    assert not mask[:, :20].any()
    assert mask[150, 200]
    assert 0.2 < mask.mean() < 0.5


def test_tissue_on_real_slide_covers_the_section() -> None:
    with open_slide(CMU) as slide:
        thumb = slide.thumbnail(512)
    mask = tissue_mask(thumb, 0.499 * 2967 / 512)
    assert 0.2 < mask.mean() < 0.6  # a strip of skin on white glass
    assert not mask[:20, :20].any()  # the glass corner


def test_crop_from_inside_the_tissue_is_all_tissue(tmp_path: Path) -> None:
    """An image with no glass (a crop, as image-level cohorts are): Otsu would split its pale
    stroma from its nuclei and drop a fifth of it (0.80 kept); its 32-px patches must all but
    stay (a few white lumens may go)."""
    with open_slide(TEST_DATA / "TCGA-CR-7395-01A-01-TS1.svs") as slide:
        crop = slide.read_region((3124, 1041), 0, (512, 512))[..., :3]
    assert tissue_mask(crop, None).mean() > 0.95
    Image.fromarray(crop).save(tmp_path / "crop.png")
    with pytest.warns(UserWarning, match="no resolution"):
        tiled = tile_slide(tmp_path / "crop.png", TilingOptions(patch_size=32))
    assert len(tiled.coords) >= 0.97 * (512 // 32) ** 2


def test_tinted_glass_is_still_glass() -> None:
    image = he_like_image(4, (300, 400))
    glass = (image == 240).all(axis=2)
    image[glass] = (235, 228, 210)  # yellowish glass, saturation 0.11
    mask = tissue_mask(image, 8.0)
    assert not mask[:30, :30].any() and mask[150, 200]
    assert 0.2 < mask.mean() < 0.5


def test_grid_keeps_only_patches_with_enough_tissue() -> None:
    mask = np.zeros((10, 10), dtype=bool)
    mask[:5, :5] = True  # top-left quarter of a 100 x 100 slide
    coords = grid_in_tissue(mask, downsample=10.0, width=100, height=100, patch_level0=50,
                            stride_level0=50, min_tissue=0.5)
    assert coords.tolist() == [[0, 0]]
    half = grid_in_tissue(mask, 10.0, 100, 100, patch_level0=50, stride_level0=25, min_tissue=0.5)
    assert sorted(map(tuple, half.tolist())) == [(0, 0), (0, 25), (25, 0)]


def test_real_slide_at_1_mpp_stores_level0_patch_size() -> None:
    tiled = tile_slide(CMU, TilingOptions(patch_size=224, target_mpp=1.0))
    assert tiled.attrs["patch_size_level0"] == 449  # 224 * 1.0 / 0.499
    assert tiled.attrs["mpp"] == pytest.approx(0.499)
    assert len(tiled.coords) > 10
    assert (tiled.coords[:, 0] + 449 <= 2220).all() and (tiled.coords[:, 1] + 449 <= 2967).all()


def test_image_without_mpp_is_tiled_at_native_resolution_with_a_warning(tmp_path: Path) -> None:
    path = tmp_path / "crop.png"
    Image.fromarray(he_like_image(4)).save(path)
    with pytest.warns(UserWarning, match="crop.png: no resolution"):
        tiled = tile_slide(path, TilingOptions(patch_size=64))
    assert tiled.attrs["patch_size_level0"] == 64 and "mpp" not in tiled.attrs


def test_blank_image_is_reported_by_name(tmp_path: Path) -> None:
    path = tmp_path / "blank.png"
    Image.new("RGB", (400, 300), (245, 245, 245)).save(path)
    with pytest.raises(InputError, match="blank.png: no tissue found"):
        tile_slide(path, TilingOptions(patch_size=64, mpp_override=0.5))


def test_transparent_pixels_of_a_tiled_tiff_read_as_white_glass(tmp_path: Path) -> None:
    rgba = np.zeros((512, 512, 4), dtype=np.uint8)
    rgba[..., :3] = (200, 100, 150)
    rgba[:, 256:, 3] = 255  # left half transparent (outside the scan), right half opaque tissue
    path = tmp_path / "rgba.tif"
    tifffile.imwrite(path, rgba, photometric="rgb", extrasamples=["unassalpha"], tile=(256, 256))
    with open_slide(path) as slide:
        region = slide.read_region((0, 0), 0, (512, 512))
    assert region.shape == (512, 512, 3)
    assert (region[:, :256] == 255).all()
    assert (region[:, 256:] == (200, 100, 150)).all()


@pytest.mark.parametrize("path", [CMU, TEST_DATA / "TCGA-CR-7395-01A-01-TS1.svs", SAMPLE / "slides" / "slide_00.tif"],
                         ids=["aperio-jpeg", "aperio-jpeg2000", "generic-tiff"])
def test_direct_tile_reads_match_tiffslide_pixel_for_pixel(path: Path) -> None:
    import tiffslide

    reference = tiffslide.TiffSlide(path)
    rng = np.random.default_rng(0)
    with open_slide(path) as slide:
        assert slide._tiles is not None  # the fast path is in use
        for level, (width, height) in enumerate(slide.level_dimensions):
            ds = slide.level_downsamples[level]
            for _ in range(10):
                w, h = (int(v) for v in rng.integers(1, 600, size=2))
                x, y = int(rng.integers(0, max(1, width - w))), int(rng.integers(0, max(1, height - h)))
                location = (int(x * ds), int(y * ds))
                ours = slide.read_region(location, level, (w, h))
                theirs = np.asarray(reference.read_region(location, level, (w, h), as_array=True))[..., :3]
                inside = (slice(0, min(h, height - int(location[1] / ds))), slice(0, min(w, width - int(location[0] / ds))))
                assert np.array_equal(ours[inside], theirs[inside])


DICOM = TEST_DATA / "CMU-1-Small-Region-dicom"  # the CMU slide's own JPEG tiles, as DICOM (tests/data/README.md)


def test_a_dicom_slide_reads_the_same_pixels_as_the_svs_it_came_from() -> None:
    pytest.importorskip("wsidicom", reason="the dicom extra is not installed (pip install 'milcli[dicom]')")
    with open_slide(DICOM) as dicom, open_slide(TEST_DATA / "CMU-1-Small-Region.svs") as svs:
        assert dicom.reader == "wsidicom" and dicom.dimensions == svs.dimensions == (2220, 2967)
        assert dicom.mpp == pytest.approx(0.499) and dicom.level_downsamples == [1.0]
        assert np.array_equal(dicom.read_region((700, 900), 0, (300, 200)), svs.read_region((700, 900), 0, (300, 200)))
        edge = dicom.read_region((2100, 2900), 0, (200, 100))  # past the right and bottom edges: white glass
        assert np.array_equal(edge[:67, :120], svs.read_region((2100, 2900), 0, (120, 67))) and (edge[:, 120:] == 255).all()
        a, b = dicom.thumbnail(256).astype(float), svs.thumbnail(256).astype(float)
        assert a.shape == b.shape and np.abs(a - b).mean() < 8  # its own stored thumbnail, resampled otherwise
    assert slide_id_from_path(DICOM) == "CMU-1-Small-Region-dicom"


def test_dicom_folders_are_found_as_slides_and_a_plain_folder_is_not_one(tmp_path: Path) -> None:
    import shutil

    shutil.copytree(DICOM, tmp_path / "cohort" / "site_a" / "case_1")
    (tmp_path / "cohort" / "case_2.svs").symlink_to(TEST_DATA / "CMU-1-Small-Region.svs")
    assert [p.name for p in find_slides([tmp_path / "cohort"])] == ["case_2.svs", "case_1"]
    assert find_slides([tmp_path / "cohort" / "site_a" / "case_1"]) == [tmp_path / "cohort" / "site_a" / "case_1"]
    with pytest.raises(InputError, match="a folder, not a slide"):
        open_slide(tmp_path / "cohort")


def test_a_dicom_slide_tiles_and_embeds_end_to_end_as_its_svs_does(tmp_path: Path) -> None:
    pytest.importorskip("wsidicom", reason="the dicom extra is not installed (pip install 'milcli[dicom]')")
    from conftest import invoke
    from mil_cli.stores import FeatureSource

    info = invoke("info", DICOM, "--json")
    assert info.exit_code == 0 and '"reader": "wsidicom"' in info.stdout
    for name, slide in (("dicom", DICOM), ("svs", TEST_DATA / "CMU-1-Small-Region.svs")):
        assert invoke("tile", slide, "--out", tmp_path / f"{name}_tiles.h5", "-q").exit_code == 0
        assert invoke("embed", tmp_path / f"{name}_tiles.h5", "--out", tmp_path / f"{name}.h5", "--device", "cpu",
                      "-q").exit_code == 0
    dicom = FeatureSource(tmp_path / "dicom.h5").load("CMU-1-Small-Region-dicom")
    svs = FeatureSource(tmp_path / "svs.h5").load("CMU-1-Small-Region")
    assert len(dicom.coords) > 20 and np.array_equal(dicom.coords, svs.coords)
    assert np.array_equal(dicom.features, svs.features)  # the same pixels give the same features
