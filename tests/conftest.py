"""Shared fixtures: one real `milcli run` on the whole sample_data (reused by many tests), and
small slides made on the fly."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from mil_cli.cli import app

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "sample_data"
TEST_DATA = Path(__file__).resolve().parent / "data"
FAST = ("--target-mpp", "1.0")  # 512 level-0 px per patch on the 0.5 µm/px sample slides: few patches


if os.environ.get("PYTEST_XDIST_WORKER"):  # pytest-xdist runs one worker per core (pyproject's addopts):
    torch.set_num_threads(1)                # each computes on one thread,
    os.environ["OMP_NUM_THREADS"] = "1"     # as do the milcli processes its tests start


def invoke(*args: str, cwd: Path | None = None):
    """Run the CLI in-process; returns typer's Result (exit_code, stdout, stderr)."""
    runner = CliRunner()
    old = Path.cwd()
    try:
        if cwd is not None:
            os.chdir(cwd)
        return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
    finally:
        os.chdir(old)


@pytest.fixture(scope="session")
def sample_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The README's main command on sample_data, run once for the whole test session."""
    out = tmp_path_factory.mktemp("run") / "demo"
    result = invoke("run", SAMPLE / "slides", "--labels", SAMPLE / "labels.csv", "--out", out, "--device", "cpu")
    assert result.exit_code == 0, result.stderr
    return out


def he_like_image(seed: int, size: tuple[int, int] = (600, 800)) -> np.ndarray:
    """A white image with a pink, purple-speckled blob of tissue in the middle."""
    rng = np.random.default_rng(seed)
    h, w = size
    img = np.full((h, w, 3), 240, dtype=np.uint8)
    yy, xx = np.mgrid[0:h, 0:w]
    blob = ((yy - h / 2) / (h * 0.35)) ** 2 + ((xx - w / 2) / (w * 0.35)) ** 2 < 1
    img[blob] = (230, 160, 195)
    nuclei = blob & (rng.random((h, w)) < 0.03)
    img[nuclei] = (100, 60, 150)
    return img


@pytest.fixture
def small_slides(tmp_path: Path) -> Path:
    """A folder with one PNG and one JPEG H&E-like image (no mpp: native resolution)."""
    folder = tmp_path / "slides"
    folder.mkdir()
    Image.fromarray(he_like_image(1)).save(folder / "png_slide.png")
    Image.fromarray(he_like_image(2)).save(folder / "jpeg_slide.jpg", quality=90)
    return folder


@pytest.fixture
def sample_subset(tmp_path: Path) -> Path:
    """Four sample slides (two per class) and their labels, copied to a temp folder."""
    folder = tmp_path / "subset"
    (folder / "slides").mkdir(parents=True)
    lines = (SAMPLE / "labels.csv").read_text().splitlines()
    keep = [line for line in lines[1:] if line.split(",")[0] in {"slide_00", "slide_01", "slide_02", "slide_03"}]
    for line in keep:
        shutil.copy(SAMPLE / "slides" / f"{line.split(',')[0]}.tif", folder / "slides")
    (folder / "labels.csv").write_text("\n".join([lines[0], *keep]) + "\n")
    return folder


@pytest.fixture
def embedded_subset(sample_subset: Path) -> Path:
    """The four-slide subset tiled (FAST) and embedded in place: tiles.h5, feats.h5, labels.csv."""
    assert invoke("tile", "slides/", *FAST, "--quiet", cwd=sample_subset).exit_code == 0
    assert invoke("embed", "--device", "cpu", "--workers", "0", "--quiet", cwd=sample_subset).exit_code == 0
    return sample_subset
