"""The store layout: an index of links plus one file per slide. Readers see every finished
slide while a writer still adds slides; version-1 single-file stores still read and are moved
to the new layout on resume; the slide folder is the per-slide layout other tools read."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from conftest import invoke
from mil_cli import stores
from mil_cli.errors import InputError


def bag(i: int, dim: int = 8) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(i)
    n = 5 + i % 4
    features = rng.normal(i % 2 * 2.0, 1.0, (n, dim)).astype(np.float32)  # odd bags sit higher: learnable
    coords = np.stack([np.arange(n) * 16, np.zeros(n)], axis=1).astype(np.int64)
    return coords, features


def write(writer: stores.StoreWriter, ids: list[str]) -> None:
    for slide_id in ids:
        coords, features = bag(int(slide_id[1:]))
        writer.write_slide(slide_id, {"patch_size_level0": 16}, {"coords": coords, "features": features})


def test_train_and_predict_run_on_a_store_that_a_writer_is_still_filling(tmp_path: Path) -> None:
    feats = tmp_path / "feats.h5"
    for n in (6, 10):
        (tmp_path / f"labels{n}.csv").write_text(
            "slide_id,label\n" + "".join(f"s{i},{'high' if i % 2 else 'low'}\n" for i in range(n)))
    train = ["train", "--features", feats, "--epochs", "2", "--ensemble", "1", "--device", "cpu", "-q"]
    with stores.StoreWriter(feats, stores.FEATURES_FORMAT, {"backbone": "synthetic", "dim": 8}) as writer:
        write(writer, [f"s{i}" for i in range(6)])
        early = invoke(*train, "--labels", tmp_path / "labels6.csv", "--out", tmp_path / "early.pt")
        assert early.exit_code == 0, early.stderr  # while the writer holds the store
        write(writer, [f"s{i}" for i in range(6, 10)])
        later = invoke(*train, "--labels", tmp_path / "labels10.csv", "--out", tmp_path / "later.pt")
        assert later.exit_code == 0, later.stderr
        predicted = invoke("predict", "--model", tmp_path / "later.pt", "--features", feats, "--device", "cpu")
        assert predicted.exit_code == 0 and len(predicted.stdout.strip().splitlines()) == 1 + 10

    def trained_on(model: Path) -> int:
        return len(torch.load(model, weights_only=True)["config"]["slides"]["train"])

    assert trained_on(tmp_path / "early.pt") == 6 and trained_on(tmp_path / "later.pt") == 10
    with h5py.File(feats, "r") as f:  # the closing index links every slide, for tools that follow links
        assert sorted(f["slides"]) == [f"s{i}" for i in range(10)]
        assert np.array_equal(f["slides"]["s3"]["features"][()], bag(3)[1])


def test_the_slide_folder_is_the_per_slide_layout_other_tools_read(tmp_path: Path) -> None:
    feats = tmp_path / "feats.h5"
    odd = "case 7/slide é"  # not a safe file name: stored under a cleaned name that still gives the id back
    entries = [("s1", *bag(1)), (odd, *bag(2))]
    stores.write_feature_store(feats, entries, backbone="synthetic")
    folder = stores.slides_dir(feats)
    assert folder == tmp_path / "feats.slides" and (folder / "s1.h5").is_file()
    with h5py.File(folder / "s1.h5", "r") as f:  # CLAM / TRIDENT: features and coords at the root
        assert np.array_equal(f["features"][()], bag(1)[1]) and np.array_equal(f["coords"][()], bag(1)[0])
    for source in (stores.FeatureSource(feats), stores.FeatureSource(folder)):
        assert source.slide_ids == sorted(["s1", odd])
        assert np.array_equal(source.load(odd).features, bag(2)[1])


def test_a_version_1_store_reads_as_it_is_and_moves_to_per_slide_files_on_resume(tmp_path: Path) -> None:
    feats = tmp_path / "feats.h5"
    with h5py.File(feats, "w") as f:  # as milcli wrote stores before format version 2
        f.attrs.update({"format": stores.FEATURES_FORMAT, "format_version": 1, "backbone": "synthetic"})
        for i in (0, 1):
            group = f.create_group(f"slides/s{i}")
            group["coords"], group["features"] = bag(i)
            group.attrs.update({"patch_size_level0": 16, "complete": True})
        f.create_group("slides/s9").create_dataset("coords", data=np.zeros((1, 2)))  # never finished
    assert stores.FeatureSource(feats).slide_ids == ["s0", "s1"]
    with stores.StoreWriter(feats, stores.FEATURES_FORMAT, {"backbone": "synthetic"}) as writer:
        assert writer.completed() == {"s0", "s1"}
        write(writer, ["s2"])
    with h5py.File(feats, "r") as f:
        assert f.attrs["format_version"] == 2 and sorted(f["slides"]) == ["s0", "s1", "s2"]
    source = stores.FeatureSource(feats)
    for i in range(3):
        assert np.array_equal(source.load(f"s{i}").features, bag(i)[1])
    assert source.load("s0").attrs["patch_size_level0"] == 16


def test_a_store_that_holds_no_slide_does_not_block_the_next_run(tmp_path: Path) -> None:
    feats = tmp_path / "feats.h5"
    with stores.StoreWriter(feats, stores.FEATURES_FORMAT, {"backbone": "resnet50-trunc", "weights": "default"}):
        pass  # a run that failed before its first slide
    with stores.StoreWriter(feats, stores.FEATURES_FORMAT, {"backbone": "resnet50-trunc", "weights": "mine.pt"}) as w:
        write(w, ["s0"])
    with pytest.raises(InputError, match="was made with weights='mine.pt'"):
        with stores.StoreWriter(feats, stores.FEATURES_FORMAT, {"backbone": "resnet50-trunc", "weights": "default"}):
            pass
    with pytest.raises(InputError, match="'resnet50-trunc', not 'uni'; pass --backbone resnet50-trunc to add to it"):
        with stores.StoreWriter(feats, stores.FEATURES_FORMAT, {"backbone": "uni", "weights": "mine.pt"}):
            pass  # e.g. a run folder from before the default backbone changed


def test_an_index_without_its_slide_folder_is_one_clear_error(tmp_path: Path) -> None:
    feats = tmp_path / "feats.h5"
    stores.write_feature_store(feats, [("s1", *bag(1))], backbone="synthetic")
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    feats.rename(moved / "feats.h5")
    with pytest.raises(InputError, match="slide folder .* is missing"):
        stores.FeatureSource(moved / "feats.h5")
