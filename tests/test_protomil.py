"""protomil: learned prototypes projected onto real training patches, as accurate as abmil on
sample_data, with prototypes of the tumour class drawn from tumour (sample_data/masks), and
explain showing which fire, where, and where each came from."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import SAMPLE, invoke
from mil_cli.inference import load_model
from mil_cli.stores import FeatureSource


def tumour_share(slide_id: str, x: int, y: int, size: int) -> float:
    """Share of the patch's pixels inside the slide's tumour mask (normal slides have none)."""
    path = SAMPLE / "masks" / f"{slide_id}.png"
    if not path.exists():
        return 0.0
    mask = np.asarray(Image.open(path)) > 0
    return float(mask[y:y + size, x:x + size].mean())


@pytest.fixture(scope="module")
def protomil_model(sample_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("protomil") / "model.pt"
    result = invoke("train", "--features", sample_run / "feats.h5", "--labels", SAMPLE / "labels.csv",
                    "--model", "protomil", "--ensemble", "2", "--out", path, "--device", "cpu", "-q")
    assert result.exit_code == 0, result.stderr
    return path


def test_protomil_is_as_accurate_as_abmil_held_out(sample_run: Path, tmp_path: Path) -> None:
    auc = {}
    for head in ("abmil", "protomil"):
        result = invoke("train", "--features", sample_run / "feats.h5", "--labels", SAMPLE / "labels.csv",
                        "--model", head, "--folds", "4", "--repeats", "1", "--ensemble", "1",
                        "--out", tmp_path / head, "--device", "cpu", "-q")
        assert result.exit_code == 0, result.stderr
        auc[head] = json.loads((tmp_path / head / "metrics.json").read_text())["mean_std"]["auc"]["mean"]
    assert auc["protomil"] >= auc["abmil"] - 0.02, auc


def test_prototypes_are_distinct_training_patches_and_the_tumour_ones_lie_on_tumour(
        sample_run: Path, protomil_model: Path) -> None:
    model = load_model(protomil_model, torch.device("cpu"))
    source = FeatureSource(sample_run / "feats.h5")
    records = model.config["members"]
    assert len(records) == len(model.module.members) == 2
    tumour = model.classes.index("tumour")
    shares = []
    for member, record in zip(model.module.members, records):
        origins = record["prototypes"]
        assert len(origins) == len(member.prototypes) == 2 * 5
        assert len({(o["slide"], o["patch"]) for o in origins}) == len(origins)  # no two on one patch
        for p, origin in enumerate(origins):
            assert origin["class"] == int(member.prototype_class[p])
            assert model.config["slide_labels"][origin["slide"]] == model.classes[origin["class"]]
            data = source.load(origin["slide"])
            with torch.no_grad():  # the prototype is that patch: its distance to it is 0
                d = member.distances(member.embed_patches(torch.from_numpy(data.features[origin["patch"]][None])))
            assert float(d[0, p]) < 1e-4
            if origin["class"] == tumour:
                x, y = (int(v) for v in data.coords[origin["patch"]])
                shares.append(tumour_share(origin["slide"], x, y, int(data.attrs["patch_size_level0"])))
    # about 29 % of the tumour slides' patches touch the tumour at all: 10 of 10 by chance is ~1e-5
    assert len(shares) == 10 and min(shares) > 0, shares


def test_explain_shows_which_prototypes_fire_where_and_their_source(sample_run: Path, protomil_model: Path,
                                                                    tmp_path: Path) -> None:
    result = invoke("explain", "slide_00", "--model", protomil_model, "--features", sample_run / "feats.h5",
                    "--out", tmp_path, "--no-viewer", "--device", "cpu", "-q")
    assert result.exit_code == 0, result.stderr
    folder = tmp_path / "slide_00"
    with open(folder / "learned_prototypes.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 10
    activations = [float(r["activation"]) for r in rows]
    assert activations == sorted(activations, reverse=True)
    top = rows[0]
    assert top["class"] == "tumour"  # slide_00 is a tumour slide: a tumour prototype fires most
    assert tumour_share(top["source_slide_id"], int(top["source_x"]), int(top["source_y"]), 256) > 0
    for row in rows:
        assert float(row["box_activation_share"]) >= 0.95
        assert int(row["box_x0"]) < int(row["box_x1"]) and int(row["box_y0"]) < int(row["box_y1"])
    best = (int(top["best_x"]), int(top["best_y"]))  # where it fires most lies in its box
    assert int(top["box_x0"]) <= best[0] < int(top["box_x1"]) and int(top["box_y0"]) <= best[1] < int(top["box_y1"])
    for k in range(1, 5):
        assert Image.open(folder / f"learned_prototype_{k}.png").width > 300
    assert Image.open(folder / "learned_prototypes.png").height > 4 * 160


def test_projection_never_takes_a_patch_of_another_class() -> None:
    """With fewer patches of its class than prototypes, a prototype stays unprojected rather
    than moving onto another class's patch; no two share a patch."""
    from mil_cli.config import ModelConfig
    from mil_cli.models import build_model
    from mil_cli.training import Bag

    torch.manual_seed(0)
    model = build_model(ModelConfig(architecture="protomil", in_dim=6, hidden_dim=8, prototypes=3))
    bags = [Bag("neg", torch.randn(10, 6), 0, "neg", parts=[("neg", 10)]),
            Bag("pos", torch.randn(2, 6), 1, "pos", parts=[("pos", 2)])]
    origins = model.after_training(bags, lambda parameters, epochs: None)["prototypes"]
    classes = model.prototype_class.tolist()
    assert [o["slide"] for o, c in zip(origins, classes) if c == 0] == ["neg"] * 3
    positive = [o for o, c in zip(origins, classes) if c == 1]
    assert sorted(o["patch"] for o in positive if o) == [0, 1] and sum(not o for o in positive) == 1
    assert all(o["class"] == 1 and o["slide"] == "pos" for o in positive if o)
