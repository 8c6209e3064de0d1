"""Faults provoked for real: kill -9 mid-command, a file-size limit (a full disk as the process
sees it), a corrupt JPEG tile inside a TIFF, and random labels CSVs and HDF5 stores thrown at
the CLI. Each must end in intact earlier work and a one-line error, never a traceback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import tifffile
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import SAMPLE, he_like_image, invoke
from mil_cli import stores
from mil_cli.inference import load_model

CLI = [sys.executable, "-m", "mil_cli"]


def read_group(path: Path, name: str) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as f:
        return {sid: g[name][()] for sid, g in f["slides"].items()}


def kill_when(process: subprocess.Popen, ready, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not ready() and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()


def test_kill_9_mid_tile_then_rerun_equals_a_clean_run(tmp_path: Path) -> None:
    clean, killed = tmp_path / "clean.h5", tmp_path / "killed.h5"
    assert invoke("tile", SAMPLE / "slides", "--out", clean, "--workers", "1", "--quiet").exit_code == 0
    env = os.environ | {stores.KILL_AT: "slide-writing:14"}  # the 4th slide's file half written (4 datasets each)
    process = subprocess.run(CLI + ["tile", str(SAMPLE / "slides"), "--out", str(killed), "--workers", "1", "-q"],
                             env=env)
    assert process.returncode == -signal.SIGKILL
    assert len(stores.FeatureSource(killed, kind=stores.TILES_FORMAT).slide_ids) == 3  # opens, whole slides only
    rerun = invoke("tile", SAMPLE / "slides", "--out", killed, "--workers", "1", "--quiet", "--json")
    assert rerun.exit_code == 0 and len(json.loads(rerun.stdout)["skipped"]) == 3
    expected, got = read_group(clean, "coords"), read_group(killed, "coords")
    assert expected.keys() == got.keys() and all(np.array_equal(expected[s], got[s]) for s in expected)


def test_kill_9_mid_cross_validation_leaves_loadable_models(sample_run: Path, tmp_path: Path) -> None:
    args = ["train", "--features", str(sample_run / "feats.h5"), "--labels", str(SAMPLE / "labels.csv"),
            "--folds", "4", "--repeats", "1", "--ensemble", "1", "--epochs", "10", "--instance-loss", "0.5",
            "--device", "cpu", "-q"]
    process = subprocess.Popen(CLI + args + ["--out", str(tmp_path / "killed")])
    kill_when(process, lambda: (tmp_path / "killed" / "fold_1" / "model.pt").exists())
    for model in (tmp_path / "killed").glob("fold_*/model.pt"):  # written whole or not at all
        load_model(model, torch.device("cpu"))
    assert invoke(*args, "--out", tmp_path / "killed").exit_code == 0
    assert invoke(*args, "--out", tmp_path / "clean").exit_code == 0
    assert (json.loads((tmp_path / "killed" / "metrics.json").read_text())
            == json.loads((tmp_path / "clean" / "metrics.json").read_text()))


def run_with_file_size_limit(limit: int, *args: str) -> subprocess.CompletedProcess:
    """The CLI in a process whose files may not grow past `limit` bytes (writes fail with EFBIG,
    as on a full disk)."""
    code = (f"import resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit})); "
            f"from mil_cli.cli import app; sys.argv = ['milcli', *sys.argv[1:]]; app()")
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)


def test_full_disk_is_one_clear_line_and_earlier_work_survives(tmp_path: Path) -> None:
    two, four = tmp_path / "two.h5", tmp_path / "four.h5"
    assert invoke("tile", SAMPLE / "slides" / "slide_00.tif", SAMPLE / "slides" / "slide_01.tif", "--out", two,
                  "-q").exit_code == 0
    assert invoke("tile", *[SAMPLE / "slides" / f"slide_0{i}.tif" for i in range(4)], "--out", four, "-q").exit_code == 0
    feats = tmp_path / "feats.h5"
    assert invoke("embed", two, "--out", feats, "--device", "cpu", "-q").exit_code == 0
    before = read_group(feats, "features")

    # every slide file is larger than this: the first slide of the run cannot be written
    result = run_with_file_size_limit(20_000, "embed", str(four), "--out", str(feats), "--device", "cpu", "-q")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "cannot write slide 'slide_02'" in result.stderr and "File too large" in result.stderr
    assert "slide_03" not in result.stderr  # the run stopped there, it did not go on failing slide after slide
    after = read_group(feats, "features")
    assert after.keys() == before.keys() and all(np.array_equal(before[s], after[s]) for s in before)
    assert not list(stores.slides_dir(feats).glob("*.tmp"))
    rerun = invoke("embed", four, "--out", feats, "--device", "cpu", "-q", "--json")
    assert rerun.exit_code == 0 and sorted(json.loads(rerun.stdout)["skipped"]) == ["slide_00", "slide_01"]
    assert read_group(feats, "features").keys() == {f"slide_0{i}" for i in range(4)}


def test_corrupt_jpeg_tile_skips_its_patches_not_the_slide(tmp_path: Path) -> None:
    image = np.concatenate([np.concatenate([he_like_image(i, (512, 512)) for i in range(4)], axis=1)] * 4, axis=0)
    path = tmp_path / "slides" / "broken.tif"
    path.parent.mkdir()
    options = dict(photometric="rgb", tile=(256, 256), compression="jpeg", resolution=(2e4, 2e4),
                   resolutionunit="CENTIMETER")
    with tifffile.TiffWriter(path) as tif:
        tif.write(image, subifds=1, **options)
        tif.write(image[::4, ::4], subfiletype=1, **options)
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        index = 5 * (image.shape[1] // 256) + 5  # a tile inside the tissue
        offset = page.dataoffsets[index]
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(b"\x00" * 64)  # no JPEG start marker any more
    tiles, feats = tmp_path / "tiles.h5", tmp_path / "feats.h5"
    assert invoke("tile", path.parent, "--out", tiles, "--thumbnail-size", "512", "-q").exit_code == 0
    total = len(read_group(tiles, "coords")["broken"])
    result = invoke("embed", tiles, "--out", feats, "--device", "cpu")
    assert result.exit_code == 0
    assert "broken: skipped" in result.stderr
    with h5py.File(feats, "r") as f:
        group = f["slides"]["broken"]
        skipped = int(group.attrs["skipped_patches"])
        assert 1 <= skipped <= 4 and len(group["features"]) == total - skipped


@pytest.fixture(scope="module")
def small_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("model")
    rng = np.random.default_rng(0)
    bags = [(f"s{i}", np.zeros((6, 2), np.int64), rng.normal(size=(6, 8)).astype(np.float32)) for i in range(6)]
    stores.write_feature_store(folder / "feats.h5", bags, backbone="synthetic")
    (folder / "labels.csv").write_text("slide_id,label\n" + "".join(f"s{i},{i % 2}\n" for i in range(6)))
    result = invoke("train", "--features", folder / "feats.h5", "--labels", folder / "labels.csv", "--out",
                    folder / "model.pt", "--epochs", "1", "--device", "cpu", "-q")
    assert result.exit_code == 0, result.stderr
    return folder / "feats.h5", folder / "model.pt"


def assert_clean_exit(result) -> None:
    assert result.exit_code in (0, 1, 2), result.exit_code
    assert "Traceback" not in result.stderr
    if result.exit_code == 2:
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr


csv_cell = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=8)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(header=st.lists(st.sampled_from(["slide_id", "label", "patient_id", "split", "x", ""]), max_size=5),
       rows=st.lists(st.lists(st.one_of(csv_cell, st.sampled_from(["s0", "s1", "s2", "0", "1", "train", "test"])),
                              max_size=5), max_size=8),
       encoding=st.sampled_from(["utf-8", "utf-8-sig", "utf-16", "cp1252"]))
def test_random_labels_csvs_never_crash_training(small_model, tmp_path: Path, header, rows, encoding) -> None:
    features, _ = small_model
    labels = tmp_path / "labels.csv"
    text = "\n".join(",".join(cells) for cells in [header, *rows])
    labels.write_bytes(text.encode(encoding, errors="replace"))
    assert_clean_exit(invoke("train", "--features", features, "--labels", labels, "--out", tmp_path / "m.pt",
                             "--epochs", "1", "--device", "cpu", "-q"))


arrays = st.tuples(st.sampled_from(["features", "coords", "thumbnail"]),
                   st.sampled_from([(0,), (3,), (3, 8), (3, 2), (0, 8), (2, 3, 8), (4, 2)]),
                   st.sampled_from(["float32", "float16", "int64", "uint8", "bool"]),
                   st.sampled_from([0.0, np.nan, 1e30]))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fmt=st.sampled_from(["milcli-features", "milcli-tiles", "other", None]),
       slides=st.dictionaries(st.sampled_from(["s0", "s1", "weird name", "../x"]), st.lists(arrays, max_size=3),
                              max_size=3),
       complete=st.booleans(), dim=st.sampled_from([None, 8, 9, "eight"]))
def test_random_stores_never_crash_predict_or_explain(small_model, tmp_path: Path, fmt, slides, complete, dim) -> None:
    _, model = small_model
    path = tmp_path / "random.h5"
    with h5py.File(path, "w") as f:
        if fmt is not None:
            f.attrs["format"] = fmt
        if dim is not None:
            f.attrs["dim"] = dim
        group = f.create_group("slides")
        for slide_id, datasets in slides.items():
            g = group.create_group(slide_id.replace("/", "_"))
            g.attrs["complete"] = complete
            for name, shape, dtype, fill in datasets:
                if name not in g:
                    g.create_dataset(name, data=np.full(shape, fill if dtype.startswith("float") else 1, dtype=dtype))
    assert_clean_exit(invoke("predict", "--model", model, "--features", path, "--device", "cpu", "-q"))
    assert_clean_exit(invoke("explain", "--all", "--model", model, "--features", path, "--out", tmp_path / "x",
                             "--device", "cpu", "-q"))
