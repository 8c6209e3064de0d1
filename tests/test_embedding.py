"""The embedding pipeline: block reads, rebatching, worker processes, dtypes, the store lock
and a kill -9 in the middle of `milcli embed`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from conftest import SAMPLE, invoke
from mil_cli import stores
from mil_cli.backbones import get_backbone
from mil_cli.config import DEFAULT_BACKBONE
from mil_cli.embedding import EmbedOptions, Rebatcher, embed_store
from mil_cli.slides import group_into_blocks, open_slide
from mil_cli.tiling import TilingOptions, tile_slides

SLIDE = SAMPLE / "slides" / "slide_00.tif"


@pytest.fixture(scope="module")
def tiles(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tile store of four sample slides."""
    out = tmp_path_factory.mktemp("tiles") / "tiles.h5"
    paths = [SAMPLE / "slides" / f"slide_0{i}.tif" for i in range(4)]
    report = tile_slides(paths, out, TilingOptions())
    assert report.ok and len(report.done) == 4
    return out


def read_features(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as f:
        return {sid: g["features"][()] for sid, g in f["slides"].items()}


def test_block_reads_equal_one_read_per_patch() -> None:
    coords = np.array([[x, y] for y in range(0, 1024, 256) for x in range(0, 1536, 256)], dtype=np.int64)
    with open_slide(SLIDE) as slide:
        together = slide.read_patches_unscaled(coords[[0, 1, 7, 13]], 256, 224)
        for patch, location in zip(together, coords[[0, 1, 7, 13]]):
            assert np.array_equal(patch, slide.read_patches_unscaled(location[None], 256, 224)[0])
    blocks = group_into_blocks(coords, 1024)
    assert sorted(np.concatenate(blocks).tolist()) == list(range(len(coords)))
    assert all(len(np.unique(coords[b] // 1024, axis=0)) == 1 for b in blocks)


def test_rebatcher_gives_exact_batches_in_order() -> None:
    rebatcher = Rebatcher(size=4)
    batches = []
    for j, n in enumerate([3, 5, 1, 2]):
        images = torch.full((n, 3, 2, 2), j, dtype=torch.uint8)
        batches += list(rebatcher.add(images, j, torch.arange(n), torch.ones(n, dtype=torch.bool)))
    batches += list(rebatcher.flush())
    assert [len(b.rows) for b in batches] == [4, 4, 3]
    assert torch.cat([b.slide_index for b in batches]).tolist() == [0] * 3 + [1] * 5 + [2] + [3] * 2
    assert all((b.images[:, 0, 0, 0] == b.slide_index).all() for b in batches)


def test_worker_processes_and_inline_decoding_give_the_same_features(tiles: Path, tmp_path: Path) -> None:
    backbone, cpu = get_backbone("efficientnet-lite0"), torch.device("cpu")
    inline = embed_store(tiles, tmp_path / "inline.h5", backbone, cpu, EmbedOptions(workers=0, batch_size=16))
    workers = embed_store(tiles, tmp_path / "workers.h5", backbone, cpu, EmbedOptions(workers=2, batch_size=24,
                                                                                     dtype="float32"))
    assert inline.ok and workers.ok and len(workers.done) == 4
    a, b = read_features(tmp_path / "inline.h5"), read_features(tmp_path / "workers.h5")
    assert a.keys() == b.keys()
    for sid in a:
        assert a[sid].dtype == np.float16 and b[sid].dtype == np.float32
        assert np.allclose(a[sid].astype(np.float32), b[sid], atol=2e-2, rtol=1e-2)  # fp16 storage and batching
    with h5py.File(tmp_path / "workers.h5", "r") as f:
        assert f.attrs["dim"] == 1280 and f.attrs["dtype"] == "float32"
        group = f["slides"]["slide_00"]
        assert group.attrs["complete"] and group["thumbnail"].attrs["downsample"] > 0
        assert group["tissue_mask"].dtype == bool


def test_a_second_writer_is_refused(tiles: Path, tmp_path: Path) -> None:
    out = tmp_path / "feats.h5"
    with stores.StoreWriter(out, stores.FEATURES_FORMAT, {"backbone": DEFAULT_BACKBONE}):
        result = invoke("embed", tiles, "--out", out, "--device", "cpu")
    assert result.exit_code == 2
    assert "in use by another milcli process" in result.stderr and "Traceback" not in result.stderr
    assert invoke("embed", tiles, "--out", out, "--device", "cpu", "--quiet").exit_code == 0  # free again


@pytest.fixture(scope="module")
def clean_features(tiles: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, np.ndarray]:
    clean = tmp_path_factory.mktemp("clean") / "clean.h5"
    assert embed_store(tiles, clean, get_backbone(DEFAULT_BACKBONE), torch.device("cpu"),  # as the CLI embeds
                       EmbedOptions(batch_size=8)).ok
    return read_features(clean)


@pytest.mark.parametrize(("moment", "finished"), [
    ("slide-writing:1", 0),  # before the first slide is finished
    ("slide-written:2", 2),  # between slides
    ("slide-writing:5", 2),  # while the third slide's file is being written (coords done, features not)
    ("index-writing:2", 4),  # while the closing index is being written, every slide done
])
def test_kill_9_mid_embed_loses_at_most_the_slide_in_progress(tiles: Path, clean_features: dict, tmp_path: Path,
                                                              moment: str, finished: int) -> None:
    """The kill happens at a known moment (stores.fault_point), not by timing luck."""
    out = tmp_path / "killed.h5"
    command = [sys.executable, "-m", "mil_cli", "embed", str(tiles), "--out", str(out), "--device", "cpu",
               "--batch-size", "8", "--quiet"]
    process = subprocess.run(command, env=os.environ | {stores.KILL_AT: moment}, timeout=300)
    assert process.returncode == -signal.SIGKILL
    source = stores.FeatureSource(out)  # the store exists from the start and opens whatever the moment
    assert len(source.slide_ids) == finished
    for slide_id in source.slide_ids:  # only whole slides
        assert np.array_equal(source.load(slide_id).features, clean_features[slide_id].astype(np.float32))
    rerun = invoke("embed", tiles, "--out", out, "--device", "cpu", "--batch-size", "8", "--json", "--quiet")
    assert rerun.exit_code == 0
    assert len(json.loads(rerun.stdout)["skipped"]) == finished
    got = read_features(out)  # through the index's links, as another tool would read it
    assert clean_features.keys() == got.keys()
    for sid in clean_features:
        assert np.array_equal(clean_features[sid], got[sid])  # bit for bit on CPU
    assert not list(stores.slides_dir(out).glob("*.tmp")) and not list(tmp_path.glob("*.tmp"))


def test_patches_at_another_resolution_than_the_encoders_get_a_warning(capsys, monkeypatch) -> None:
    from dataclasses import replace

    from mil_cli.console import console
    from mil_cli.embedding import SlideJob, warn_on_resolution

    monkeypatch.setattr(console, "quiet", False)  # an earlier --quiet command may have left it on

    jobs = [SlideJob(f"s{i}", Path("x"), np.zeros((1, 2)), 256, {"target_mpp": mpp}) for i, mpp in
            enumerate((0.5, 0.6, 1.0, float("nan")))]
    warn_on_resolution(replace(get_backbone("efficientnet-lite0"), mpp=0.5), jobs)
    message = " ".join(capsys.readouterr().err.split())
    assert "trained on patches at 0.5 µm/px; 2 slide(s) were tiled at 1, nan µm/px" in message
    assert "--target-mpp 0.5" in message
    warn_on_resolution(get_backbone("efficientnet-lite0"), jobs)  # ImageNet: no scale to hold to
    assert capsys.readouterr().err == ""


def test_tile_warns_before_tiling_when_the_encoder_was_trained_at_another_scale(tmp_path) -> None:
    from conftest import SAMPLE, invoke

    slide = SAMPLE / "slides" / "slide_00.tif"
    result = invoke("tile", slide, "--backbone", "uni", "--target-mpp", "1.0", "--out", tmp_path / "t.h5")
    assert result.exit_code == 0, result.stderr
    message = " ".join(result.stderr.split())
    assert "uni was trained on patches at 0.5 µm/px; --target-mpp is 1" in message and "--target-mpp 0.5" in message
    result = invoke("tile", slide, "--backbone", "uni", "--target-mpp", "0.5", "--out", tmp_path / "u.h5")
    assert result.exit_code == 0 and "trained on patches" not in result.stderr


def test_a_slide_that_breaks_under_decode_workers_is_named_and_the_rest_embedded(sample_subset: Path) -> None:
    """The slide file is truncated after tiling; with --workers 2 its failure happens inside a
    DataLoader worker, where an exception used to end the run as a RuntimeError traceback."""
    from conftest import FAST

    assert invoke("tile", "slides/", *FAST, "--quiet", cwd=sample_subset).exit_code == 0
    broken = sample_subset / "slides" / "slide_01.tif"
    broken.write_bytes(broken.read_bytes()[:100])  # too short to hold its image directory: it cannot be opened
    result = invoke("embed", "--device", "cpu", "--workers", "2", "--json", cwd=sample_subset)
    assert result.exit_code == 1 and "Traceback" not in result.stderr
    summary = json.loads(result.stdout)
    assert sorted(summary["done"]) == ["slide_00", "slide_02", "slide_03"]
    assert "truncated or damaged" in summary["failed"]["slide_01"]
    assert "slide_01" in result.stderr and "truncated or damaged" in result.stderr


def test_a_feature_stores_embedding_options_read_back_from_its_attributes(tmp_path) -> None:
    """explain --refine embeds new patches as the store's were: weights and stain read back."""
    from mil_cli.embedding import EmbedOptions, embed_options_of, feature_store_attrs

    backbone = get_backbone("efficientnet-lite0")
    weights, target = tmp_path / "w.pth", tmp_path / "target.png"
    for options in (EmbedOptions(), EmbedOptions(stain="macenko"),
                    EmbedOptions(weights=weights, stain="reinhard", stain_target=target)):
        back = embed_options_of(feature_store_attrs(backbone, options))
        assert (back.weights, back.stain, back.stain_target) == (
            options.weights and options.weights.resolve(), options.stain,
            options.stain_target and options.stain_target.resolve())
