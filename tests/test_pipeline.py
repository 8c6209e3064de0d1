"""The README's main command on sample_data, end to end, and what each stage leaves behind."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import SAMPLE, invoke
from mil_cli.backbones import get_backbone
from mil_cli.config import DEFAULT_BACKBONE
from mil_cli.evaluation import box_iou, localisation_auc, mask_box, patch_mask_fraction

DEFAULT_DIM = get_backbone(DEFAULT_BACKBONE).dim


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_run_leaves_every_output(sample_run: Path) -> None:
    for name in ("tiles.h5", "feats.h5", "model.pt", "predictions.csv", "run.json"):
        assert (sample_run / name).is_file(), name
    record = json.loads((sample_run / "run.json").read_text())
    assert set(record["stages"]) == {"tile", "embed", "train", "predict", "explain"}
    assert record["options"]["backbone"] == DEFAULT_BACKBONE
    assert all(stage["failed"] == {} for stage in record["stages"].values())
    for slide in ("slide_00", "slide_01"):
        for name in ("heatmap.png", "attention.csv", "top_patches.png", "regions.geojson"):
            assert (sample_run / "explain" / slide / name).is_file()


def test_tile_store_layout(sample_run: Path) -> None:
    with h5py.File(sample_run / "tiles.h5", "r") as f:
        assert f.attrs["format"] == "milcli-tiles" and f.attrs["format_version"] == 2
        assert "milcli_version" in f.attrs
        assert (sample_run / "tiles.slides" / "slide_00.h5").is_file()  # each slide in its own file, linked
        assert len(f["slides"]) == 20
        g = f["slides/slide_00"]
        for key in ("source_path", "width", "height", "mpp", "patch_size", "patch_size_level0", "target_mpp"):
            assert key in g.attrs, key
        assert g.attrs["complete"]
        assert (g.attrs["width"], g.attrs["height"]) == (1792, 1280)
        assert g.attrs["patch_size"] == 256 and g.attrs["patch_size_level0"] == 256
        coords = g["coords"][()]
        assert coords.dtype == np.int64 and coords.shape[1] == 2 and len(coords) > 5
        assert (coords[:, 0] + 256 <= 1792).all() and (coords[:, 1] + 256 <= 1280).all()
        thumb, mask = g["thumbnail"], g["tissue_mask"]
        assert thumb.dtype == np.uint8 and thumb.shape[2] == 3
        assert mask.dtype == bool and mask.shape == thumb.shape[:2]
        assert thumb.attrs["downsample"] == pytest.approx(1792 / thumb.shape[1])


def test_feature_store_layout(sample_run: Path) -> None:
    with h5py.File(sample_run / "feats.h5", "r") as f:
        assert f.attrs["format"] == "milcli-features"
        assert f.attrs["backbone"] == DEFAULT_BACKBONE and f.attrs["dim"] == DEFAULT_DIM == 704
        assert f.attrs["dtype"] == "float16"
        with h5py.File(sample_run / "tiles.h5", "r") as tiles:
            for slide_id, g in f["slides"].items():
                feats = g["features"][()]
                assert feats.dtype == np.float16 and feats.shape == (len(g["coords"]), DEFAULT_DIM)
                assert np.isfinite(feats).all() and feats.std() > 0
                assert np.array_equal(g["coords"][()], tiles[f"slides/{slide_id}/coords"][()])


def test_model_file_loads_with_weights_only(sample_run: Path) -> None:
    checkpoint = torch.load(sample_run / "model.pt", weights_only=True)
    config = checkpoint["config"]
    assert config["classes"] == ["normal", "tumour"]
    assert config["backbone"] == DEFAULT_BACKBONE and config["feature_dim"] == DEFAULT_DIM
    assert config["model"]["architecture"] == "abmil"
    assert set(config["slides"]["train"]).isdisjoint(config["slides"]["val"])


def test_predictions_separate_the_classes(sample_run: Path) -> None:
    rows = read_csv(sample_run / "predictions.csv")
    assert list(rows[0]) == ["slide_id", "prediction", "prob_normal", "prob_tumour", "label", "correct", "split"]
    assert len(rows) == 20
    for row in rows:
        assert float(row["prob_normal"]) + float(row["prob_tumour"]) == pytest.approx(1.0, abs=1e-5)
    assert {r["split"] for r in rows} == {"train"}  # the small-cohort rule: no slide held out for validation
    assert all(r["correct"] == "true" for r in rows)


def test_attention_falls_on_the_tumour(sample_run: Path) -> None:
    """Within each positive slide, attention ranks patches inside the true tumour mask above
    the others (AUC), averaged over the positive slides."""
    aucs = []
    for mask_path in sorted((SAMPLE / "masks").glob("*.png")):
        mask = np.array(Image.open(mask_path)).astype(bool)
        rows = read_csv(sample_run / "explain" / mask_path.stem / "attention.csv")
        coords = np.array([[int(r["x"]), int(r["y"])] for r in rows])
        inside = patch_mask_fraction(mask, coords, int(rows[0]["size"])) >= 0.5
        auc = localisation_auc(np.array([float(r["attention"]) for r in rows]), inside)
        if not np.isnan(auc):
            aucs.append(auc)
    assert len(aucs) >= 8
    assert np.mean(aucs) >= 0.85


def test_regions_mark_the_tumour_and_only_on_positive_slides(sample_run: Path) -> None:
    """regions.geojson and boxes.csv as `run` writes them (patch-probability map, cut at 0.5):
    on every positive slide the largest region's box holds the tumour's centre and overlaps
    its box (mean IoU >= 0.4; boxes are patch-quantised, as 256-px patches see a 300-500 px
    tumour), and no slide without tumour gets a region."""
    ious = []
    for mask_path in sorted((SAMPLE / "masks").glob("*.png")):
        mask = np.array(Image.open(mask_path)).astype(bool)
        boxes = {row["box"]: row for row in read_csv(sample_run / "explain" / mask_path.stem / "boxes.csv")}
        x0, y0, x1, y1 = (float(boxes["largest_region"][k]) for k in ("x0", "y0", "x1", "y1"))
        rows, cols = np.nonzero(mask)
        assert x0 <= cols.mean() <= x1 and y0 <= rows.mean() <= y1, mask_path.stem
        ious.append(box_iou([x0, y0, x1, y1], mask_box(mask)))
    assert len(ious) == 10 and np.mean(ious) >= 0.4, ious
    for row in read_csv(sample_run / "predictions.csv"):
        if row["label"] == "normal":
            regions = json.loads((sample_run / "explain" / row["slide_id"] / "regions.geojson").read_text())
            assert regions["features"] == [], row["slide_id"]


def test_rerun_resumes_without_redoing_work(sample_run: Path, tmp_path: Path) -> None:
    from conftest import invoke

    out = tmp_path / "rerun"
    shutil.copytree(sample_run, out, ignore=shutil.ignore_patterns("explain"))
    args = ("run", SAMPLE / "slides", "--labels", SAMPLE / "labels.csv", "--out", out, "--device", "cpu",
            "--no-explain", "--json", "--quiet")
    result = invoke(*args)
    assert result.exit_code == 0
    summary = json.loads(result.stdout)
    assert len(summary["stages"]["tile"]["skipped"]) == 20 and summary["stages"]["tile"]["done"] == []
    assert len(summary["stages"]["embed"]["skipped"]) == 20
    assert summary["stages"]["train"]["skipped"] == ["model.pt"]
    # other training options (one fixed recipe, one short head): the model is retrained, the stores are still reused
    recipe = ("--seed", "5", "--instance-loss", "0", "--standardise", "none", "--ensemble", "1", "--epochs", "5")
    summary = json.loads(invoke(*args, *recipe).stdout)
    assert summary["stages"]["train"]["done"] == ["model.pt"] and summary["stages"]["embed"]["done"] == []
    config = torch.load(out / "model.pt", weights_only=True)["config"]
    assert config["model"]["instance_loss"] == 0 and config["training"]["standardise"] == "none"
    assert json.loads(invoke(*args, *recipe).stdout)["stages"]["train"]["skipped"] == ["model.pt"]


def test_five_fold_cv_on_sample_data_writes_the_layout_and_repeats_exactly(sample_run: Path, tmp_path: Path) -> None:
    metrics = []
    for name in ("first", "second"):
        result = invoke("train", "--features", sample_run / "feats.h5", "--labels", SAMPLE / "labels.csv",
                        "--folds", "5", "--repeats", "1", "--ensemble", "2", "--instance-loss", "0.5",  # one recipe,
                        "--epochs", "10", "--out", tmp_path / name, "--device", "cpu", "--quiet")  # short heads
        assert result.exit_code == 0, result.stderr
        metrics.append(json.loads((tmp_path / name / "metrics.json").read_text()))
    assert metrics[0] == metrics[1]
    out = tmp_path / "first"
    for name in ("oof_predictions.csv", "splits.csv", "metrics.json", "roc.png"):
        assert (out / name).stat().st_size > 0
    assert len(list(out.glob("fold_*/model.pt"))) == 5
    assert metrics[0]["out_of_fold"]["0"]["n"] == 20 and metrics[0]["mean_std"]["auc"]["mean"] >= 0.9
