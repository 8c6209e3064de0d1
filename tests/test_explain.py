"""Explanation outputs for one slide: shapes, ranges, geometry, and exact logit decomposition."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from conftest import TEST_DATA, invoke
from mil_cli.explain import rank_percent, percentile_level, region_grid, region_polygons, region_scores
from mil_cli.raster import mass_box
from mil_cli.inference import load_model
from mil_cli.models import whole_bag
from mil_cli.stores import FeatureSource


def test_contributions_sum_to_the_logit(sample_run: Path) -> None:
    model = load_model(sample_run / "model.pt", torch.device("cpu"))
    data = FeatureSource(sample_run / "feats.h5").load("slide_00")
    x = torch.from_numpy(data.features)
    assert model.config["recipes"] == [[0.5, "z", "abmil", 0.1]] * 5 + [[0.0, "none", "abmil", 0.1]] * 5  # 5 heads per recipe
    with torch.inference_mode():
        _, attention = model.module.bag(x)
        assert attention.sum().item() == pytest.approx(1.0, abs=1e-5)
        for member in model.module.members:  # each head's attention stream splits exactly into patch contributions
            logits = member(*whole_bag(x)).pooled_logits[0]
            contributions = member.patch_scores(x)
            assert torch.allclose(contributions.sum(0), logits - member.classifier.bias, atol=1e-4)


def test_explain_outputs_for_one_slide(sample_run: Path) -> None:
    folder = sample_run / "explain" / "slide_00"
    with open(folder / "attention.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0])[:5] == ["x", "y", "size", "attention", "rank_pct"]
    attention = np.array([float(r["attention"]) for r in rows])
    ranks = np.array([float(r["rank_pct"]) for r in rows])
    assert attention.sum() == pytest.approx(1.0, abs=1e-3) and (attention >= 0).all()
    assert ranks.min() > 0 and ranks.max() == pytest.approx(100.0)
    assert np.argmax(ranks) == np.argmax(attention)
    instance = np.array([float(r["instance_tumour"]) for r in rows])
    assert ((instance >= 0) & (instance <= 1)).all() and instance.std() > 0

    heatmap = Image.open(folder / "heatmap.png")
    assert heatmap.width >= 500 and heatmap.mode in ("RGB", "RGBA")
    pixels = np.asarray(heatmap.convert("RGB")).astype(int)
    outline = (pixels[..., 0] < 80) & (pixels[..., 1] > 180) & (pixels[..., 2] > 200)  # the regions, in cyan
    assert outline.sum() > 50
    assert Image.open(folder / "top_patches.png").width > 800

    collection = json.loads((folder / "regions.geojson").read_text())
    assert collection["type"] == "FeatureCollection" and collection["features"]
    for feature in collection["features"]:
        assert feature["geometry"]["type"] == "Polygon"
        assert feature["properties"]["classification"]["name"] == "tumour"  # the class the map shows
        for k, ring in enumerate(feature["geometry"]["coordinates"]):
            points = np.array(ring)
            assert len(points) >= 4 and (points[0] == points[-1]).all()
            assert signed_area(points) > 0 if k == 0 else signed_area(points) < 0  # RFC 7946 winding
            assert (points[:, 0] >= 0).all() and (points[:, 0] <= 1792).all()
            assert (points[:, 1] >= 0).all() and (points[:, 1] <= 1280).all()


def signed_area(ring: np.ndarray) -> float:
    x, y = ring[:-1, 0], ring[:-1, 1]
    return float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2


def grid_coords(columns: int, rows: int, step: int = 100, origin: tuple[int, int] = (0, 0)) -> np.ndarray:
    return np.array([(origin[0] + x * step, origin[1] + y * step) for y in range(rows) for x in range(columns)])


def test_regions_are_traced_between_patch_centres_and_keep_holes() -> None:
    coords = grid_coords(5, 5, origin=(30, 70))
    cells = (coords - (30, 70)) // 100
    ring = np.array([(x, y) != (2, 2) and 1 <= x <= 3 and 1 <= y <= 3 for x, y in cells], dtype=float)
    regions = region_grid(coords, 100, 100, ring, 0.5)
    polygons = region_polygons(regions)
    assert len(polygons) == 1 and len(polygons[0]) == 2  # outer ring and one hole
    outer, hole = np.array(polygons[0][0]), np.array(polygons[0][1])
    assert signed_area(outer) > 0 > signed_area(hole)  # RFC 7946: outer rings one way, holes the other
    # value 1 at ring centres, 0 at their neighbours' centres: the 0.5 contour lies midway
    assert outer[:, 0].min() == pytest.approx(30 + 100, abs=15) and outer[:, 0].max() == pytest.approx(30 + 400, abs=15)
    assert outer[:, 1].min() == pytest.approx(70 + 100, abs=15) and outer[:, 1].max() == pytest.approx(70 + 400, abs=15)
    assert hole[:, 0].min() == pytest.approx(30 + 200, abs=15) and hole[:, 0].max() == pytest.approx(30 + 300, abs=15)
    assert region_scores(regions, coords, 100, ring / ring.sum()) == [pytest.approx(1.0)]


@settings(max_examples=150, deadline=None)
@given(st.integers(2, 12), st.integers(2, 12), st.sampled_from([64, 100, 256]), st.sampled_from([1, 2]),
       st.integers(0, 2**32 - 1), st.floats(0.05, 0.95))
def test_every_region_is_a_valid_polygon_on_random_maps(columns: int, rows: int, step: int, overlap: int, seed: int,
                                                        threshold: float) -> None:
    """RFC 7946 and QuPath: rings of at least 4 positions, closed, outer rings counter-clockwise
    and holes clockwise (x right, y up), no ring crossing itself or another (shapely validity);
    random sparse maps, isolated peaks and missing patches included."""
    from shapely.geometry import Polygon

    rng = np.random.default_rng(seed)
    coords = grid_coords(columns, rows, step=step)
    values = rng.random(len(coords)) ** 3 * (rng.random(len(coords)) < 0.6)
    kept = rng.random(len(coords)) < 0.85
    coords, values = coords[kept], values[kept]
    if len(coords) == 0 or values.max() == 0:
        return
    regions = region_grid(coords, step, step * overlap, values, threshold)
    polygons = region_polygons(regions)
    assert len(polygons) == regions.labels.max() == len(region_scores(regions, coords, step * overlap, values))
    for rings in polygons:
        assert all(len(ring) >= 4 and ring[0] == ring[-1] for ring in rings)
        assert signed_area(np.array(rings[0])) > 0 and all(signed_area(np.array(r)) < 0 for r in rings[1:])
        assert Polygon(rings[0], rings[1:]).is_valid


def assert_regions_valid_on_tissue_and_scored(folder: Path, source: FeatureSource) -> int:
    """Every region of every regions.geojson under `folder`: valid, rings of >= 4 positions,
    at most 25 % of its area off the slide's tissue mask, a score above 0. Returns the count."""
    import shapely
    from shapely.geometry import shape

    count = 0
    for path in sorted(folder.glob("*/regions.geojson")):
        images = source.images(path.parent.name)
        for feature in json.loads(path.read_text())["features"]:
            rings = feature["geometry"]["coordinates"]
            polygon = shape(feature["geometry"])
            assert all(len(ring) >= 4 for ring in rings) and polygon.is_valid, path
            assert feature["properties"]["score"] > 0, path
            x0, y0, x1, y1 = polygon.bounds
            xs, ys = np.meshgrid(np.linspace(x0, x1, 60), np.linspace(y0, y1, 60))
            inside = shapely.contains_xy(polygon, xs.ravel(), ys.ravel())
            rows = np.clip((ys.ravel()[inside] / images.downsample).astype(int), 0, images.tissue_mask.shape[0] - 1)
            cols = np.clip((xs.ravel()[inside] / images.downsample).astype(int), 0, images.tissue_mask.shape[1] - 1)
            assert images.tissue_mask[rows, cols].mean() >= 0.75, f"{path}: region more than 25 % off tissue"
            count += 1
    return count


def test_every_exported_region_of_the_sample_run_is_valid_on_tissue_and_scored(sample_run: Path,
                                                                               tmp_path: Path) -> None:
    assert len(list((sample_run / "explain").glob("*/regions.geojson"))) == 20
    source = FeatureSource(sample_run / "feats.h5")
    assert_regions_valid_on_tissue_and_scored(sample_run / "explain", source) >= 1
    attention = invoke("explain", "--all", "--model", sample_run / "model.pt", "--features", sample_run / "feats.h5",
                       "--map", "attention", "--out", tmp_path, "--device", "cpu", "-q")
    assert attention.exit_code == 0
    assert assert_regions_valid_on_tissue_and_scored(tmp_path, source) >= 20  # the attention map always has one


def test_regions_on_both_real_slides_are_valid_on_tissue_and_scored(sample_run: Path, tmp_path: Path) -> None:
    slides = tmp_path / "slides"
    slides.mkdir()
    for name in ("CMU-1-Small-Region.svs", "TCGA-CR-7395-01A-01-TS1.svs"):
        (slides / name).symlink_to(TEST_DATA / name)
    assert invoke("tile", slides, "--out", tmp_path / "tiles.h5", "-q").exit_code == 0
    assert invoke("embed", tmp_path / "tiles.h5", "--out", tmp_path / "feats.h5", "--device", "cpu", "-q").exit_code == 0
    for kind in ("instance", "attention"):
        result = invoke("explain", "--all", "--model", sample_run / "model.pt", "--features", tmp_path / "feats.h5",
                        "--map", kind, "--out", tmp_path / kind, "--device", "cpu", "-q")
        assert result.exit_code == 0, result.stderr
        assert_regions_valid_on_tissue_and_scored(tmp_path / kind, FeatureSource(tmp_path / "feats.h5"))


def test_region_edges_follow_the_evidence_not_the_patch_grid() -> None:
    """One hot patch: the region reaches 80 % of the way to a neighbour's centre where the
    neighbour is cold, and stops at the patch's own edge where no patch is."""
    coords = grid_coords(3, 3, step=256)
    attention = np.where((coords == (256, 256)).all(axis=1), 0.9, 0.0)
    attention[(coords == (512, 256)).all(axis=1)] = 0.1  # a warm neighbour to the right
    kept = ~(coords == (0, 256)).all(axis=1)  # no patch to the left
    coords, attention = coords[kept], attention[kept]
    level = 0.2 * 0.9
    polygons = region_polygons(region_grid(coords, 256, 256, attention, 0.2))
    box = np.array(polygons[0][0])
    up = 384 - 256 * (0.9 - level) / 0.9  # centre 384, cold neighbour centre 128
    right = 384 + 256 * (0.9 - level) / (0.9 - 0.1)
    assert box[:, 1].min() == pytest.approx(up, abs=20) and box[:, 0].max() == pytest.approx(right, abs=20)
    assert box[:, 0].min() == pytest.approx(256, abs=20)  # the missing patch takes the hot patch's value


def test_overlapping_patches_are_averaged_before_regions_are_traced() -> None:
    """Stride 128, patches of 256: one hot patch is spread over the four cells it covers, so its
    region is centred on the patch, not on its top-left cell."""
    coords = grid_coords(6, 6, step=128)
    attention = np.where((coords == (256, 256)).all(axis=1), 1.0, 0.0)
    box = np.array(region_polygons(region_grid(coords, 128, 256, attention, 0.2))[0][0])
    for axis in (0, 1):
        low, high = box[:, axis].min(), box[:, axis].max()
        assert (low + high) / 2 == pytest.approx(384, abs=10) and 256 <= high - low <= 400


def test_percentile_level() -> None:
    attention = np.array([0.5, 0.3, 0.1, 0.05, 0.05])
    assert percentile_level(attention, 40.0) == pytest.approx(0.2)  # midway between the 2nd and 3rd
    assert percentile_level(attention, 100.0) == pytest.approx(0.025)


def test_rank_percent_spreads_tiny_values() -> None:
    ranks = rank_percent(np.array([1e-9, 2e-9, 0.5, 3e-9]))
    assert ranks.tolist() == [25.0, 50.0, 100.0, 75.0]


def test_raw_scale_smoothing_width_evidence_and_boxes(sample_run: Path, tmp_path: Path) -> None:
    result = invoke("explain", "slide_00", "--model", sample_run / "model.pt", "--features", sample_run / "feats.h5",
                    "--out", tmp_path, "--map", "attention", "--scale", "raw", "--smooth", "1", "--width", "700",
                    "--device", "cpu", "-q")
    assert result.exit_code == 0, result.stderr
    folder = tmp_path / "slide_00"
    raw = np.load(folder / "heatmap.npy")
    data = FeatureSource(sample_run / "feats.h5")
    images = data.images("slide_00")
    assert raw.shape == images.tissue_mask.shape and raw.dtype == np.float32
    assert np.isnan(raw[~images.tissue_mask]).all()
    on_tissue = raw[np.isfinite(raw)]
    assert on_tissue.min() >= 0 and on_tissue.max() < 1  # raw attention weights, smoothed
    default = np.load(sample_run / "explain" / "slide_00" / "heatmap.npy")  # patch probabilities by default
    assert np.nanmin(default) >= 0 and 0.5 < np.nanmax(default) <= 1
    ranked = invoke("explain", "slide_00", "--model", sample_run / "model.pt", "--features", sample_run / "feats.h5",
                    "--out", tmp_path / "ranked", "--map", "attention", "--device", "cpu", "-q")
    assert ranked.exit_code == 0, ranked.stderr
    ranks = np.load(tmp_path / "ranked" / "slide_00" / "heatmap.npy")
    assert np.nanmax(ranks) == pytest.approx(100.0) and np.nanmin(ranks) == 0  # patches without attention: 0
    assert 690 <= Image.open(folder / "heatmap.png").width <= 900  # 700 px of map plus the colour bar
    for name in ("normal", "tumour"):
        evidence = Image.open(folder / f"evidence_{name}.png").convert("RGB")
        assert evidence.width >= 690
    with open(folder / "boxes.csv", newline="") as f:
        boxes = {row["box"]: row for row in csv.DictReader(f)}
    assert set(boxes) == {"largest_region", "attention_95pct"}
    for row in boxes.values():
        x0, y0, x1, y1 = (int(row[k]) for k in ("x0", "y0", "x1", "y1"))
        assert 0 <= x0 < x1 <= 1792 + 256 and 0 <= y0 < y1 <= 1280 + 256
    assert float(boxes["attention_95pct"]["attention_mass"]) >= 0.95


def test_mass_box_trims_to_the_mass() -> None:
    coords = np.array([(x, y) for y in range(0, 500, 100) for x in range(0, 500, 100)])
    attention = np.full(len(coords), 0.001)
    attention[(coords[:, 0] == 300) & (coords[:, 1] == 100)] = 1.0
    attention /= attention.sum()
    assert mass_box(coords, 100, 100, attention, 0.95) == [300, 100, 400, 200]


def test_report_links_every_output_and_renders_in_chromium(sample_run: Path, tmp_path: Path) -> None:
    import shutil
    import subprocess
    from urllib.parse import unquote

    result = invoke("report", sample_run)
    assert result.exit_code == 0, result.stderr
    page = (sample_run / "report.html").read_text()
    assert page.count("<section") == 20 and "slide_00: predicted" in page
    sources = re.findall(r'(?:src|href)="([^"]+)"', page)
    assert any(s.endswith("heatmap.png") for s in sources) and any("evidence_" in s for s in sources)
    # one row of maps: the heatmap and the positive class's evidence drawn, the other class's linked
    assert page.count('<img src="explain/slide_00/evidence_tumour.png"') == 1
    assert '<img src="explain/slide_00/evidence_normal.png"' not in page and 'href="explain/slide_00/evidence_normal.png"' in page
    assert all((sample_run / unquote(s)).exists() for s in sources)  # every link resolves beside the page
    assert invoke("report", tmp_path).exit_code == 2  # not a run folder: one-line error

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("Debian's chromium is not installed: the screenshot check is skipped")
    shot = tmp_path / "report.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    "--window-size=1280,2400", f"--screenshot={shot}", (sample_run / "report.html").as_uri()],
                   check=True, capture_output=True, timeout=120)
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    # the heatmap's yellow over tumour (inferno's top blended over the slide) and its colour bar's
    yellow = (pixels[..., 0] > 200) & (pixels[..., 1] > 180) & (pixels[..., 2] < 170) & (pixels[..., 0] - pixels[..., 2] > 40)
    assert yellow.sum() > 2000


def test_report_tints_wrong_predictions(sample_run: Path, tmp_path: Path) -> None:
    """predictions.csv says correct=false for a wrong one; the report used to look for "0"."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text((sample_run / "run.json").read_text())
    lines = (sample_run / "predictions.csv").read_text().splitlines()
    assert ",true," in lines[1]
    (run / "predictions.csv").write_text("\n".join([lines[0], lines[1].replace(",true,", ",false,"), *lines[2:]]) + "\n")
    assert invoke("report", run).exit_code == 0
    page = (run / "report.html").read_text()
    assert page.count('<tr class="wrong">') == 1
    assert re.search(r'<tr class="wrong"><td>' + lines[1].split(",")[0] + "</td>", page)


def test_prototypes_come_from_other_training_slides_of_each_class(sample_run: Path, tmp_path: Path) -> None:
    result = invoke("explain", "slide_00", "--prototypes", "--model", sample_run / "model.pt", "--features",
                    sample_run / "feats.h5", "--out", tmp_path, "--device", "cpu", "-q")
    assert result.exit_code == 0, result.stderr
    config = load_model(sample_run / "model.pt", torch.device("cpu")).config
    labels = config["slide_labels"]
    with open(tmp_path / "slide_00" / "prototypes.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 * 2  # four top patches, one match per class
    for row in rows:
        assert row["match_slide_id"] != "slide_00" and labels[row["match_slide_id"]] == row["class"]
        assert -1.0 <= float(row["cosine"]) <= 1.0001
    tumour = [float(r["cosine"]) for r in rows if r["class"] == "tumour"]
    normal = [float(r["cosine"]) for r in rows if r["class"] == "normal"]
    assert np.mean(tumour) > np.mean(normal)  # a tumour slide's top patches look like tumour patches
    assert Image.open(tmp_path / "slide_00" / "prototypes.png").height > 600


def test_attention_ranks_paint_only_the_patches_that_carry_attention() -> None:
    """Two patches hold 99.9 % of the attention: they are ranked, the near-zero rest shows 0
    (plain percentile ranks painted them up to 100 x 98/100 = 98 %, orange)."""
    from mil_cli.explain import mass_ranks

    attention = np.array([0.6, 0.399] + [0.001 / 98] * 98)
    ranks = mass_ranks(attention)
    assert ranks[0] == pytest.approx(100.0) and ranks[1] == pytest.approx(50.0)
    assert (ranks[2:] == 0).all()
    spread = np.full(10, 0.1)  # attention on every patch: every patch ranked
    assert (mass_ranks(spread) > 0).all()


def test_refine_maps_the_tumour_at_a_quarter_patch_step(sample_run: Path, tmp_path: Path) -> None:
    """--refine re-tiles the largest region every quarter patch and scores the new patches: on a
    tumour slide they sit on a 64-px grid, and their probability ranks patches centred in the
    true tumour (sample_data/masks) above the rest, at a step the 256-px patch grid cannot."""
    from sklearn.metrics import roc_auc_score

    from conftest import SAMPLE

    result = invoke("explain", "slide_00", "--model", sample_run / "model.pt", "--features", sample_run / "feats.h5",
                    "--out", tmp_path, "--refine", "--no-viewer", "--device", "cpu", "-q")
    assert result.exit_code == 0, result.stderr
    folder = tmp_path / "slide_00"
    with open(folder / "refined.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    coords = np.array([[int(r["x"]), int(r["y"])] for r in rows])
    assert {int(r["stride"]) for r in rows} == {64} and {int(r["size"]) for r in rows} == {256}
    assert len(np.unique(coords[:, 0] % 64)) == 1 and len(rows) > 40  # one 64-px lattice, many more than the patches
    centres = coords + 128
    mask = np.asarray(Image.open(SAMPLE / "masks" / "slide_00.png"))
    inside = mask[np.clip(centres[:, 1], 0, mask.shape[0] - 1), np.clip(centres[:, 0], 0, mask.shape[1] - 1)]
    probability = np.array([float(r["probability"]) for r in rows])
    assert 0 < inside.sum() < len(inside) and roc_auc_score(inside, probability) > 0.85
    assert Image.open(folder / "refined_1.png").width > 300


def test_refine_is_refused_for_the_attention_map(sample_run: Path, tmp_path: Path) -> None:
    result = invoke("explain", "slide_00", "--model", sample_run / "model.pt", "--features", sample_run / "feats.h5",
                    "--out", tmp_path, "--refine", "--map", "attention")
    assert result.exit_code == 2 and "--refine" in result.stderr and "Traceback" not in result.stderr


def test_refine_grids_keep_to_their_patch_budget() -> None:
    """A box cut to the budget's square can still round to one more row and column of patches;
    the budget holds anyway (an overdrawn budget once made the next box's square root fail)."""
    from mil_cli.refine import stride_grid
    from mil_cli.stores import SlideImages

    images = SlideImages(thumbnail=np.zeros((100, 100, 3), np.uint8), tissue_mask=np.ones((100, 100), bool),
                         downsample=10.0)
    for budget in (1, 10, 100, 400):
        grid = stride_grid((96.0, 96.0, 900.0, 900.0), 256, 64, images, budget)
        assert 0 < len(grid) <= budget


def test_small_crop_map_is_enlarged_to_be_seen() -> None:
    """A 128 x 96 image (a crop of 32-px patches) is drawn 512 px wide unless a width is given."""
    from mil_cli.render import MARGIN, MIN_PICTURE_WIDTH, map_image

    thumbnail = np.full((96, 128, 3), 200, dtype=np.uint8)
    grid = np.full((96, 128), np.nan)
    grid[:32, :32] = 1.0  # one patch, painted
    enlarged = map_image(thumbnail, grid, "inferno", (0.0, 1.0), 1.0, None, "crop", "P")
    assert enlarged.width == MIN_PICTURE_WIDTH + 2 * MARGIN
    pixels = np.asarray(enlarged.convert("RGB")).astype(int)
    yellow = (pixels[..., 0] > 240) & (pixels[..., 1] > 240) & (pixels[..., 2] < 190)  # inferno at 1
    assert yellow[:, MARGIN + 2].sum() == 4 * 32  # the patch, 4 x its 32 px tall (the bar starts dark)
    assert map_image(thumbnail, grid, "inferno", (0.0, 1.0), 1.0, 200, "crop", "P").width == 360
