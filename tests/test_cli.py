"""Each command end to end on tiny data, in the bare forms DESIGN.md promises, and the
one-line errors for the mistakes users make."""

from __future__ import annotations

import csv
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import pytest
import torch
from PIL import Image

from conftest import FAST, invoke


def test_each_command_in_a_working_folder(sample_subset: Path) -> None:
    cwd = sample_subset
    tiled = invoke("tile", "slides/", *FAST, cwd=cwd)
    assert tiled.exit_code == 0, tiled.stderr
    assert (cwd / "tiles.h5").is_file()

    embedded = invoke("embed", "--device", "cpu", "--workers", "0", cwd=cwd)
    assert embedded.exit_code == 0, embedded.stderr
    assert (cwd / "feats.h5").is_file()

    trained = invoke("train", "--features", "feats.h5", "--epochs", "5", "--device", "cpu", cwd=cwd)
    assert trained.exit_code == 0, trained.stderr
    assert "AUC" in trained.stderr and (cwd / "model.pt").is_file()

    predicted = invoke("predict", "--device", "cpu", cwd=cwd)
    assert predicted.exit_code == 0, predicted.stderr
    rows = list(csv.DictReader(io.StringIO(predicted.stdout)))
    assert sorted(r["slide_id"] for r in rows) == ["slide_00", "slide_01", "slide_02", "slide_03"]
    assert {"prediction", "prob_normal", "prob_tumour"} <= set(rows[0])

    twice = invoke("predict", "--features", "feats.h5", "--features", "feats.h5", "--device", "cpu", cwd=cwd)
    assert twice.exit_code == 2 and "slide 'slide_00' is also in feats.h5" in twice.stderr

    explained = invoke("explain", "slide_00", "--device", "cpu", cwd=cwd)
    assert explained.exit_code == 0, explained.stderr
    for name in ("heatmap.png", "attention.csv", "top_patches.png", "regions.geojson"):
        assert (cwd / "explain" / "slide_00" / name).is_file()


def test_tile_json_summary_and_resume(sample_subset: Path) -> None:
    first = invoke("tile", sample_subset / "slides", "--out", sample_subset / "t.h5", *FAST, "--json", "--quiet")
    assert first.exit_code == 0
    assert len(json.loads(first.stdout)["done"]) == 4
    again = invoke("tile", sample_subset / "slides", "--out", sample_subset / "t.h5", *FAST, "--json", "--quiet")
    assert json.loads(again.stdout)["skipped"] == ["slide_00", "slide_01", "slide_02", "slide_03"]
    redo = invoke("tile", sample_subset / "slides", "--out", sample_subset / "t.h5", *FAST, "--json", "--overwrite")
    assert len(json.loads(redo.stdout)["done"]) == 4


def test_bad_inputs_are_named_and_the_rest_processed(small_slides: Path, tmp_path: Path) -> None:
    (small_slides / "broken.png").write_text("not an image at all")
    Image.new("RGB", (500, 400), (244, 244, 244)).save(small_slides / "blank.png")
    out = tmp_path / "tiles.h5"
    result = invoke("tile", small_slides, "--out", out, "--patch-size", "64")
    assert result.exit_code == 1
    assert "broken.png: not a readable image" in result.stderr
    assert "blank.png: no tissue found" in result.stderr
    assert "Traceback" not in result.stderr
    with h5py.File(out, "r") as f:
        assert sorted(f["slides"]) == ["jpeg_slide", "png_slide"]


def test_missing_default_input_names_the_option(tmp_path: Path) -> None:
    result = invoke("embed", cwd=tmp_path)
    assert result.exit_code == 2
    assert "tiles.h5: no such file (pass the TILES argument" in result.stderr
    result = invoke("predict", cwd=tmp_path)
    assert result.exit_code == 2 and "pass --model" in result.stderr


def test_labels_naming_a_slide_not_in_the_store(embedded_subset: Path) -> None:
    labels = embedded_subset / "labels.csv"
    labels.write_text(labels.read_text() + "ghost_slide,tumour\n")
    result = invoke("train", "--epochs", "2", "--device", "cpu", cwd=embedded_subset)
    assert result.exit_code == 1
    assert "ghost_slide: in labels.csv but not in feats.h5" in result.stderr
    assert (embedded_subset / "model.pt").is_file()  # the other slides were still used

    labels.write_text("slide_id,label\nghost_a,x\nghost_b,y\n")
    result = invoke("train", "--epochs", "2", "--device", "cpu", cwd=embedded_subset)
    assert result.exit_code == 2
    assert "none of its 2 slides is in feats.h5" in result.stderr


def test_labels_with_one_class_or_missing_columns(embedded_subset: Path) -> None:
    labels = embedded_subset / "labels.csv"
    labels.write_text("slide_id,label\nslide_00,a\nslide_01,a\n")
    result = invoke("train", "--device", "cpu", cwd=embedded_subset)
    assert result.exit_code == 2 and "only one class" in result.stderr
    labels.write_text("slide,diagnosis\nslide_00,a\n")
    result = invoke("train", "--device", "cpu", cwd=embedded_subset)
    assert result.exit_code == 2 and "missing column(s) label, slide_id" in result.stderr


def test_pickled_checkpoint_is_refused(embedded_subset: Path) -> None:
    evil = embedded_subset / "evil.pt"
    torch.save({"format": "milcli-model", "config": Path("x")}, evil)  # a pickled object, not plain data
    result = invoke("predict", "--model", "evil.pt", "--device", "cpu", cwd=embedded_subset)
    assert result.exit_code == 2
    assert "evil.pt: not a loadable milcli model" in result.stderr


def test_store_that_is_not_ours_is_rejected(tmp_path: Path) -> None:
    with h5py.File(tmp_path / "feats.h5", "w") as f:
        f.attrs["format"] = "something-else"
    result = invoke("predict", "--model", tmp_path / "feats.h5", cwd=tmp_path)
    assert result.exit_code == 2
    shutil.copy(tmp_path / "feats.h5", tmp_path / "tiles.h5")
    result = invoke("embed", "--device", "cpu", cwd=tmp_path)
    assert result.exit_code == 2 and "not a milcli-tiles store" in result.stderr


def test_every_command_documents_its_defaults() -> None:
    for name in ("tile", "embed", "train", "predict", "explain", "run", "info"):
        result = invoke(name, "--help")
        assert result.exit_code == 0
        assert "--quiet" in result.stdout
    assert "[default: feats.h5]" in invoke("train", "--help").stdout
    assert "[default: labels.csv]" in invoke("train", "--help").stdout


def test_info_and_list_backbones(tmp_path: Path) -> None:
    from conftest import TEST_DATA

    result = invoke("info", TEST_DATA / "CMU-1-Small-Region.svs", "--json")
    assert result.exit_code == 0
    slide = json.loads(result.stdout)["slides"][0]
    assert slide["mpp"] == pytest.approx(0.499) and slide["dimensions"] == [2220, 2967]
    listed = invoke("embed", "--list-backbones")
    assert listed.exit_code == 0
    assert all(name in listed.stdout for name in ("efficientnet-lite0", "resnet50-trunc", "uni", "timm:<model>"))


def test_real_process_error_is_one_line_without_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "labels.csv"
    bad.write_bytes(b"\xff\xfe\x00garbage")
    proc = subprocess.run([sys.executable, "-m", "mil_cli.cli", "train", "--labels", str(bad),
                           "--features", str(tmp_path / "nothing.h5")], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0, proc.stderr


def test_ray_without_the_extra_is_one_line_naming_it(tmp_path: Path) -> None:
    """Blocks the ray import (as on a machine without the extra) in a real milcli process."""
    tiles = tmp_path / "tiles.h5"
    tiles.write_bytes(b"")
    code = "import sys; sys.modules['ray'] = None; from mil_cli.cli import app; app()"
    proc = subprocess.run([sys.executable, "-c", code, "embed", str(tiles), "--ray", "local"], capture_output=True,
                          text=True, cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "pip install 'milcli[ray]'" in proc.stderr
