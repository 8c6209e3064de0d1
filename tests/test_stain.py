"""Stain normalisation (`embed --stain`): torch CIELAB as scikit-image computes it, colour-shifted
copies of both real slides brought back towards the target, glass left alone, the bundled
target reproducible, and a store never mixing normalised with raw features."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image
from skimage import color

from conftest import TEST_DATA, invoke
from mil_cli.slides import open_slide
from mil_cli.stain import BUNDLED_REGION, BUNDLED_TARGET, normalise, optical_density, rgb_to_lab, stain_target

REGIONS = {"CMU-1-Small-Region.svs": (200, 1000), "TCGA-CR-7395-01A-01-TS1.svs": (1500, 1200)}
SHIFTS = {"bluish": (0.85, 0.95, 1.1), "reddish": (1.1, 0.9, 0.8)}


def region(name: str, location: tuple[int, int], size: int = 1024) -> np.ndarray:
    with open_slide(TEST_DATA / name) as slide:
        return slide.read_region(location, 0, (size, size))[..., :3]


def as_patches(image: np.ndarray, size: int = 256) -> torch.Tensor:
    return torch.from_numpy(image).unfold(0, size, size).unfold(1, size, size).reshape(-1, 3, size, size).float()


def test_lab_matches_scikit_image() -> None:
    image = region("CMU-1-Small-Region.svs", (200, 1000), 256)
    ours = rgb_to_lab(as_patches(image))[0].permute(1, 2, 0).numpy()
    assert np.abs(ours - color.rgb2lab(image)).max() < 0.01


def test_the_bundled_target_is_what_its_region_measures() -> None:
    x, y, size = BUNDLED_REGION
    assert stain_target(region("CMU-1-Small-Region.svs", (x, y), size)) == BUNDLED_TARGET


@pytest.mark.parametrize("shift", sorted(SHIFTS))
@pytest.mark.parametrize("name", sorted(REGIONS))
def test_a_colour_shifted_copy_is_brought_back_towards_the_target(name: str, shift: str) -> None:
    original = region(name, REGIONS[name])
    target = stain_target(original)
    shifted = np.clip(original * np.array(SHIFTS[shift]), 0, 255).astype(np.uint8)
    goal = optical_density(as_patches(original)).mean(dim=(0, 2, 3))

    def distance(method: str) -> float:
        return float((optical_density(normalise(as_patches(shifted), method, target)).mean(dim=(0, 2, 3)) - goal).norm())

    assert distance("reinhard") < distance("none") and distance("macenko") < distance("none")


def test_glass_passes_unchanged() -> None:
    glass = torch.full((2, 3, 64, 64), 238.0) + torch.randn(2, 3, 64, 64)
    for method in ("reinhard", "macenko"):
        assert torch.equal(normalise(glass, method), glass)


def test_a_store_never_mixes_normalised_and_raw_features(embedded_subset: Path, tmp_path: Path) -> None:
    folder = embedded_subset  # tiles.h5 and feats.h5 (raw) made by the fixture
    result = invoke("embed", "--device", "cpu", "--stain", "macenko", "--out", "feats.h5", cwd=folder)
    assert result.exit_code == 2 and "was made with stain='none'" in result.stderr
    out = tmp_path / "macenko.h5"
    target = tmp_path / "target.png"
    Image.fromarray(region("TCGA-CR-7395-01A-01-TS1.svs", (1500, 1200), 512)).save(target)
    assert invoke("embed", folder / "tiles.h5", "--device", "cpu", "--stain", "macenko", "--stain-target", target,
                  "--out", out, "-q").exit_code == 0
    with h5py.File(out, "r") as f:
        assert f.attrs["stain"].startswith("macenko (") and "target.png" in f.attrs["stain"]
    again = invoke("embed", folder / "tiles.h5", "--device", "cpu", "--out", out)
    assert again.exit_code == 2 and "stain=" in again.stderr
    bad = invoke("embed", folder / "tiles.h5", "--device", "cpu", "--stain", "reinhard", "--stain-target",
                 folder / "labels.csv", "--out", tmp_path / "x.h5")
    assert bad.exit_code == 2 and "labels.csv" in bad.stderr and "not a readable image" in bad.stderr
    assert not (tmp_path / "x.h5").exists()  # refused before the store was made
