"""explain's viewer.html: a Deep Zoom pyramid made from the slide itself only where there is
tissue, within its size budget; and, in a real browser (headless Chromium driven by Selenium)
opening a copied run folder over file://, tiles load, overlays toggle and a click reports the
patch under it."""

from __future__ import annotations

import csv
import json
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mil_cli.slides import open_slide
from mil_cli.stores import SlideImages
from mil_cli.viewer import TILE, plan_pyramid, write_tiles


@pytest.fixture
def corner_slide(tmp_path: Path) -> tuple[Path, SlideImages]:
    """A 1000 x 700 px image, white glass but for a textured block of tissue at its top left,
    and the 10x-downsampled tissue mask a tile store would hold for it."""
    rng = np.random.default_rng(0)
    image = np.full((700, 1000, 3), 245, dtype=np.uint8)
    image[:300, :400] = rng.integers(80, 200, (300, 400, 3), dtype=np.uint8)
    path = tmp_path / "corner.png"
    Image.fromarray(image).save(path)
    mask = np.zeros((70, 100), dtype=bool)
    mask[:30, :40] = True
    return path, SlideImages(thumbnail=image[::10, ::10], tissue_mask=mask, downsample=10.0)


def test_the_pyramid_is_the_slide_itself_only_where_there_is_tissue(corner_slide, tmp_path: Path) -> None:
    path, images = corner_slide
    pyramid = plan_pyramid(1000, 700, 1.0, images, budget_mb=100)
    assert (pyramid.width, pyramid.height, pyramid.max_level) == (1000, 700, 10)
    with open_slide(path) as slide:
        written = set(write_tiles(slide, pyramid, images, tmp_path / "tiles"))
        top = {name for name in written if name.startswith("10/")}
        # tissue spans x < 400, y < 300: top-level tiles of columns 0-1 and rows 0-1; the rest is glass
        assert top == {"10/0_0", "10/1_0", "10/0_1", "10/1_1"}
        assert {f"{level}/0_0" for level in range(10)} <= written  # coarser levels: one tile holds it all
        tile = np.asarray(Image.open(tmp_path / "tiles" / "10" / "0_0.jpg"), dtype=float)
        assert tile.shape == (TILE, TILE, 3)
        truth = slide.read_region((0, 0), 0, (TILE, TILE)).astype(float)
        assert np.abs(tile - truth).mean() < 25  # the slide's own pixels (JPEG of noise: loose)
        assert np.abs(tile - np.roll(truth, 8, axis=1)).mean() > np.abs(tile - truth).mean() + 5
        assert "9/1_0" not in written  # level 9 is 500 x 350 px: its second column (x >= 512 at level 0) is glass
        assert Image.open(tmp_path / "tiles" / "8" / "0_0.jpg").size == (250, 175)  # a level smaller than a tile


def test_a_small_budget_halves_the_resolution_until_the_tiles_fit(corner_slide) -> None:
    _, images = corner_slide
    full = plan_pyramid(40_000, 28_000, 1.0, images, budget_mb=1000)
    small = plan_pyramid(40_000, 28_000, 1.0, images, budget_mb=50)
    assert full.scale == 1.0 and small.scale in (0.5, 0.25, 0.125)
    assert small.width == round(40_000 * small.scale)


def browser():
    """Headless Chromium through Selenium and the system's chromedriver, or a skip saying what
    is missing (README: apt install chromium chromium-driver)."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[test]')")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip("the browser test needs Debian's chromium and chromium-driver (apt install chromium chromium-driver)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1200,800"):
        options.add_argument(argument)
    options.binary_location = chromium
    return webdriver.Chrome(service=Service(driver), options=options)


def wait_for(driver, script: str, seconds: float = 20.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = driver.execute_script(script)
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for: {script}")


def test_the_report_viewer_loads_toggles_and_reports_the_clicked_patch_offline(sample_run: Path,
                                                                             tmp_path: Path) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    from conftest import invoke

    copied = tmp_path / "copied run"  # a copy elsewhere, with a space in its path, opened as file://
    shutil.copytree(sample_run, copied, ignore=shutil.ignore_patterns("*.h5", "*.slides"))
    assert invoke("report", copied).exit_code == 0
    report = (copied / "report.html").read_text()
    assert report.count('<iframe class="viewer"') == 20
    folder = copied / "explain" / "slide_00"
    rows = list(csv.DictReader(open(folder / "attention.csv")))
    top = max(range(len(rows)), key=lambda i: float(rows[i]["attention"]))
    x, y, size = (int(rows[top][key]) for key in ("x", "y", "size"))

    driver = browser()
    try:
        driver.get((copied / "report.html").as_uri())
        frame = driver.find_element(By.CSS_SELECTOR, 'iframe[title="slide_00 viewer"]')
        driver.execute_script("arguments[0].scrollIntoView()", frame)
        driver.switch_to.frame(frame)
        wait_for(driver, "return window.milcliViewer && window.milcliViewer.tilesLoaded > 0 "
                         "&& Object.keys(window.milcliViewer.items).length === window.MILCLI.overlays.length")
        assert driver.execute_script("return window.milcliViewer.items.heatmap.getOpacity()") > 0
        driver.find_element(By.ID, "overlay-heatmap").click()
        assert driver.execute_script("return window.milcliViewer.items.heatmap.getOpacity()") == 0
        driver.find_element(By.ID, "overlay-evidence_tumour").click()
        assert driver.execute_script("return window.milcliViewer.items.evidence_tumour.getOpacity()") > 0
        assert driver.find_element(By.ID, "regions").is_displayed()

        centre = driver.execute_script(
            "const v = window.milcliViewer.viewer, d = window.MILCLI;"
            "const p = v.viewport.pixelFromPoint(new OpenSeadragon.Point(arguments[0] / d.width0,"
            " arguments[1] / d.width0), true); return [p.x, p.y];", x + size / 2, y + size / 2)
        canvas = driver.find_element(By.ID, "osd")
        ActionChains(driver).move_to_element_with_offset(
            canvas, centre[0] - canvas.size["width"] / 2, centre[1] - canvas.size["height"] / 2).click().perform()
        wait_for(driver, "return window.milcliViewer.selected !== null")
        assert driver.execute_script("return window.milcliViewer.selected") == top
        info = driver.find_element(By.ID, "patch-info").text
        assert f"at x={x}, y={y}" in info
        shown = float(re.search(r"attention: ([0-9.e+-]+)", info).group(1))
        assert shown == pytest.approx(float(rows[top]["attention"]), rel=1e-3)
        assert "P(tumour) of the patch" in info
        assert not [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]
    finally:
        driver.quit()


def viewer_data(folder: Path) -> dict:
    page = (folder / "viewer.html").read_text()
    return json.loads(re.search(r"window\.MILCLI = (.*?);</script>", page).group(1))


def test_evidence_maps_share_one_scale_across_the_slides(sample_run: Path) -> None:
    """A colour on one slide's evidence map means the same contribution on another's."""
    limits = {tuple(o["limits"]) for folder in (sample_run / "explain").glob("slide_*")
              for o in viewer_data(folder)["overlays"] if o["name"].startswith("evidence_")}
    assert len(limits) == 1
    low, high = limits.pop()
    assert low == -high and high > 0


def test_viewer_data_names_every_patch_and_the_regions(sample_run: Path) -> None:
    folder = sample_run / "explain" / "slide_00"
    data = viewer_data(folder)
    rows = list(csv.DictReader(open(folder / "attention.csv")))
    assert [int(r["x"]) for r in rows] == data["patches"]["x"] and len(data["patches"]["attention"]) == len(rows)
    regions = json.loads((folder / "regions.geojson").read_text())["features"]
    assert len(data["regions"]) == len(regions)
    assert (sample_run / "explain" / "_viewer" / "openseadragon-LICENSE.txt").exists()
    for overlay in data["overlays"]:
        assert Image.open(folder / "viewer" / overlay["file"]).mode == "P"  # palette + transparent index
