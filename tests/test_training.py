"""Training on synthetic bags whose answer is known: it learns, it is reproducible, it splits
honestly, and the stores it reads are checked."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from mil_cli import stores
from mil_cli.errors import InputError
from mil_cli.labels import read_labels
from mil_cli.training import TrainOptions, train

DIM = 16


def synthetic_store(folder: Path, n_bags: int = 40, seed: int = 0) -> tuple[Path, Path]:
    """Bags of 8-15 Gaussian instances; positive bags hold 1-3 instances shifted along axis 0.
    Every fifth bag is marked as test in the labels' split column."""
    rng = np.random.default_rng(seed)
    path = folder / "feats.h5"
    lines = ["slide_id,label,split"]
    bags = []
    for i in range(n_bags):
        positive = i % 2 == 0
        n = int(rng.integers(8, 16))
        feats = rng.normal(size=(n, DIM)).astype(np.float32)
        if positive:
            feats[: int(rng.integers(1, 4)), 0] += 4.0
        coords = np.stack([np.arange(n) * 256, np.zeros(n)], axis=1).astype(np.int64)
        bags.append((f"bag_{i:03d}", coords, feats))
        lines.append(f"bag_{i:03d},{'pos' if positive else 'neg'},{'test' if i % 5 == 4 else ''}")
    stores.write_feature_store(path, bags, backbone="synthetic")
    labels = folder / "labels.csv"
    labels.write_text("\n".join(lines) + "\n")
    return path, labels


def test_learns_a_key_instance_and_reports_held_out_metrics(tmp_path: Path) -> None:
    feats, labels = synthetic_store(tmp_path, n_bags=80)
    result = train(feats, labels, TrainOptions(epochs=60, lr=1e-3, seed=1), torch.device("cpu"))
    assert result.metrics["test"]["n"] == 16
    assert result.metrics["test"]["auc"] >= 0.9
    slides = result.checkpoint["config"]["slides"]
    assert not set(slides["test"]) & (set(slides["train"]) | set(slides["val"]))
    assert slides["val"]  # carved out of the training slides for early stopping


def test_same_seed_same_numbers(tmp_path: Path) -> None:
    feats, labels = synthetic_store(tmp_path)
    options = TrainOptions(epochs=8, seed=7)
    a = train(feats, labels, options, torch.device("cpu"))
    b = train(feats, labels, options, torch.device("cpu"))
    assert a.metrics == b.metrics
    for key, tensor in a.checkpoint["state_dict"].items():
        assert torch.equal(tensor, b.checkpoint["state_dict"][key]), key


def test_patients_never_straddle_train_and_validation(tmp_path: Path) -> None:
    feats, _ = synthetic_store(tmp_path)
    labels = tmp_path / "patients.csv"
    rows = ["slide_id,label,patient_id"] + [f"bag_{i:03d},{'pos' if i % 2 == 0 else 'neg'},p{i // 4}" for i in range(40)]
    labels.write_text("\n".join(rows) + "\n")
    result = train(feats, labels, TrainOptions(epochs=2, val_fraction=0.3), torch.device("cpu"))
    slides = result.checkpoint["config"]["slides"]
    patient = {f"bag_{i:03d}": f"p{i // 4}" for i in range(40)}
    assert {patient[s] for s in slides["train"]}.isdisjoint({patient[s] for s in slides["val"]})


def test_nan_features_are_named(tmp_path: Path) -> None:
    feats, labels = synthetic_store(tmp_path, n_bags=4)
    with h5py.File(feats, "a") as f:
        f["slides/bag_001/features"][0, 0] = np.nan
    with pytest.raises(InputError, match=r"bag_001.*NaN or Inf"):
        train(feats, labels, TrainOptions(epochs=1), torch.device("cpu"))


def test_labels_csv_quirks(tmp_path: Path) -> None:
    path = tmp_path / "labels.csv"
    path.write_bytes("\ufeffslide_id , label\r\n\r\na,1\r\nb,10\r\nb,10\r\nc,2\r\n".encode("utf-8"))
    table = read_labels(path)
    assert sorted(table.rows) == ["a", "b", "c"]
    assert table.classes == ["1", "2", "10"]  # numeric order for integer labels
    path.write_text("slide_id,label\na,x\na,y\n")
    with pytest.raises(InputError, match="slide 'a' appears twice"):
        read_labels(path)
    path.write_text("slide_id,label,split\na,x,holdout\n")
    with pytest.raises(InputError, match="split 'holdout'"):
        read_labels(path)


def test_reads_a_clam_style_feature_folder(tmp_path: Path) -> None:
    folder = tmp_path / "h5_files"
    folder.mkdir()
    for i in range(3):
        with h5py.File(folder / f"s{i}.h5", "w") as f:
            f["features"] = np.ones((5, 8), dtype=np.float32) * i
            f["coords"] = np.arange(10).reshape(5, 2)
    source = stores.FeatureSource(folder)
    assert source.slide_ids == ["s0", "s1", "s2"]
    data = source.load("s2")
    assert data.features.shape == (5, 8) and data.features[0, 0] == 2.0
    with h5py.File(folder / "bad.h5", "w") as f:
        f["features"] = np.ones((5, 8), dtype=np.float32)
        f["coords"] = np.zeros((4, 2))
    with pytest.raises(InputError, match=r"bad\.h5 \[bad\]: 5 feature rows but 4 coords"):
        stores.FeatureSource(folder).load("bad")
