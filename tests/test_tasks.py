"""Regression, survival and patient-level bags, on synthetic cohorts whose answer is known
(mil_cli.synthetic), through the same functions and CLI as classification."""

from __future__ import annotations

import csv
import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import SAMPLE, invoke
from mil_cli import stores
from mil_cli.config import ModelConfig, TrainOptions
from mil_cli.crossval import cross_validate
from mil_cli.metrics import bootstrap_interval, harrell_c, harrell_c_interval
from mil_cli.synthetic import patient_slides, survival_times, tumour_share_bags
from mil_cli.tasks import cox_loss, discrete_time_nll

CPU = torch.device("cpu")


def write_store(path: Path, bags: list[np.ndarray], ids: list[str]) -> Path:
    entries = [(sid, np.stack([np.arange(len(x)) * 8, np.zeros(len(x))], axis=1).astype(np.int64), x)
               for sid, x in zip(ids, bags)]
    stores.write_feature_store(path, entries, backbone="synthetic")
    return path


def write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    return path


def tumour_share_cohort(folder: Path, n_bags: int = 200) -> tuple[Path, np.ndarray]:
    bags = tumour_share_bags(n_bags, seed=0)
    ids = [f"s{i:03d}" for i in range(n_bags)]
    return write_store(folder / "feats.h5", [x for x, _, _ in bags], ids), np.array([f for _, f, _ in bags])


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_cox_loss_is_the_partial_likelihood() -> None:
    """Against the textbook formula, ties included (Breslow: a tie's risk set holds all of it)."""
    risk = torch.tensor([0.5, -1.0, 2.0, 0.0, 1.0])
    time = torch.tensor([3.0, 1.0, 3.0, 5.0, 2.0])
    event = torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0])
    expected = 0.0
    for i in range(5):
        if event[i]:
            expected -= float(risk[i] - torch.logsumexp(risk[time >= time[i]], 0))
    assert float(cox_loss(risk, time, event)) == pytest.approx(expected / 4, rel=1e-6)
    assert float(cox_loss(risk, time, torch.zeros(5))) == 0.0  # no event: nothing to rank


def test_discrete_time_likelihood() -> None:
    logits = torch.tensor([[0.0, 1.0, -1.0]])
    hazard = torch.sigmoid(logits)[0].tolist()
    event_in_1 = float(discrete_time_nll(logits, torch.tensor([1]), torch.tensor([1.0])))
    censored_in_1 = float(discrete_time_nll(logits, torch.tensor([1]), torch.tensor([0.0])))
    assert event_in_1 == pytest.approx(-np.log((1 - hazard[0]) * hazard[1]), rel=1e-6)
    assert censored_in_1 == pytest.approx(-np.log((1 - hazard[0]) * (1 - hazard[1])), rel=1e-6)


def sksurv_harrell_c(times: np.ndarray, events: np.ndarray, risk: np.ndarray) -> float:
    from sksurv.metrics import concordance_index_censored

    try:
        with np.errstate(invalid="ignore"):  # comparable events with nothing later: 0 / 0
            return float(concordance_index_censored(events, times, risk)[0]) if events.any() else float("nan")
    except ValueError:  # no comparable pair
        return float("nan")


def test_pairwise_harrell_c_equals_scikit_survival() -> None:
    """Our pairwise Harrell's C against scikit-survival's loop on small cohorts full of tied
    times, tied risks, heavy and no censoring (NaN where neither has a comparable pair); its
    bootstrap interval against the generic resampling of scikit-survival's statistic."""
    rng = np.random.default_rng(0)
    for _ in range(300):
        n = int(rng.integers(1, 30))
        times = rng.integers(0, 6, n).astype(float)
        events = rng.random(n) < rng.random()
        risk = np.round(rng.normal(size=n), int(rng.integers(0, 3)))
        ours, theirs = harrell_c(times, events, risk), sksurv_harrell_c(times, events, risk)
        assert ours == theirs or (np.isnan(ours) and np.isnan(theirs)), (times, events, risk)
    times, events = rng.exponential(size=120), rng.random(120) < 0.6
    risk = rng.normal(size=120) - times
    assert harrell_c_interval(times, events, risk, samples=200) == pytest.approx(
        bootstrap_interval(sksurv_harrell_c, times, events, risk, samples=200), abs=1e-12)
    assert np.isnan(harrell_c(times, events, np.where(times > 1, np.nan, risk)))


def test_survival_learns_a_hazard_set_by_the_tumour_share(tmp_path: Path) -> None:
    """Event times whose hazard rises with a hidden share of 'tumour' patches (censoring
    30 %): out-of-fold C-index >= 0.75 (the true shares reach about 0.84) and the KM risk
    groups differ with log-rank p < 0.01. Default options but --task survival."""
    feats, shares = tumour_share_cohort(tmp_path)
    times, events = survival_times(shares, seed=1)
    labels = write_csv(tmp_path / "labels.csv", ["slide_id", "time", "event"],
                       [[f"s{i:03d}", f"{t:.6g}", e] for i, (t, e) in enumerate(zip(times, events))])
    oracle = harrell_c(times, events.astype(bool), shares)
    result = cross_validate(feats, labels, TrainOptions(task="survival"), CPU, tmp_path / "cv", folds=5, repeats=1)
    pooled = result.metrics["out_of_fold"]["0"]
    assert pooled["c_index"] >= 0.75, (pooled, oracle)
    assert pooled["c_index_ci"][0] < pooled["c_index"] < pooled["c_index_ci"][1]
    assert 0.6 < pooled["c_index_uno"] <= 1 and 0.6 < pooled["time_auc"] <= 1
    assert result.metrics["plot"]["logrank_p_median"] < 0.01
    assert result.metrics["plot"]["logrank_p_tertiles"] < 0.01
    assert (tmp_path / "cv" / "km.png").stat().st_size > 10_000
    oof = read_rows(tmp_path / "cv" / "oof_predictions.csv")
    assert list(oof[0]) == ["slide_id", "risk", "time", "event", "fold"] and len(oof) == 200
    risk = np.array([float(r["risk"]) for r in oof])
    order = [int(r["slide_id"][1:]) for r in oof]
    assert harrell_c(times[order], events[order].astype(bool), risk) == pytest.approx(pooled["c_index"])


def test_discrete_time_survival_learns_too(tmp_path: Path) -> None:
    feats, shares = tumour_share_cohort(tmp_path, n_bags=120)
    times, events = survival_times(shares, seed=1)
    labels = write_csv(tmp_path / "labels.csv", ["slide_id", "time", "event"],
                       [[f"s{i:03d}", f"{t:.6g}", e] for i, (t, e) in enumerate(zip(times, events))])
    options = TrainOptions(task="survival", survival_loss="nll", ensemble=1, epochs=20)
    result = cross_validate(feats, labels, options, CPU, tmp_path / "cv", folds=3, repeats=1)
    assert result.metrics["out_of_fold"]["0"]["c_index"] >= 0.65
    model = torch.load(tmp_path / "cv" / "fold_0" / "model.pt", weights_only=True)["config"]
    assert model["task"]["loss"] == "nll" and len(model["task"]["edges"]) == 3


def test_regression_recovers_the_tumour_share(tmp_path: Path) -> None:
    """A target equal to the share of key patches: out-of-fold Spearman >= 0.8, with every
    regression metric and its bootstrap interval, predict's `prediction` column and the
    scatter plot."""
    feats, shares = tumour_share_cohort(tmp_path)
    labels = write_csv(tmp_path / "labels.csv", ["slide_id", "label"],
                       [[f"s{i:03d}", f"{s * 100:.4f}"] for i, s in enumerate(shares)])  # in percent
    options = TrainOptions(task="regression", ensemble=1, epochs=20)
    result = cross_validate(feats, labels, options, CPU, tmp_path / "cv", folds=3, repeats=1)
    pooled = result.metrics["out_of_fold"]["0"]
    assert pooled["spearman"] >= 0.8, pooled
    for key in ("mae", "rmse", "r2", "pearson", "spearman"):
        low, high = pooled[f"{key}_ci"]
        assert low <= pooled[key] <= high
    assert pooled["mae"] < 10  # percent points: predictions come back in the label's unit
    assert (tmp_path / "cv" / "scatter.png").is_file()

    out = tmp_path / "preds.csv"
    result = invoke("predict", "--model", tmp_path / "cv", "--features", feats, "--labels", labels, "--out", out,
                    "--device", "cpu")
    assert result.exit_code == 0, result.stderr
    rows = read_rows(out)
    assert list(rows[0]) == ["slide_id", "prediction", "label", "split"]
    predicted, truth = (np.array([float(r[k]) for r in rows]) for k in ("prediction", "label"))
    assert np.corrcoef(predicted, truth)[0, 1] > 0.8


def test_patient_bags_match_slide_bags_given_the_right_slide(tmp_path: Path) -> None:
    """--bag-by patient on every slide of each patient reaches the AUC of slide-level bags
    holding only the slide with the signal (within 0.02); predictions and metrics are per
    patient. (A strong signal and one head keep this test short; benchmarks/tasks.py runs the
    defaults on a weaker one.)"""
    features, rows, right = patient_slides(120, signal=6.0)
    feats = write_store(tmp_path / "feats.h5", features, [sid for sid, _, _ in rows])
    patients = write_csv(tmp_path / "patients.csv", ["slide_id", "patient_id", "label"], [list(r) for r in rows])
    chosen = write_csv(tmp_path / "right.csv", ["slide_id", "label"], [[rows[i][0], rows[i][2]] for i in right])
    options = TrainOptions(ensemble=1, epochs=20, model=ModelConfig(instance_loss=0.5))
    by_patient = cross_validate(feats, patients, replace(options, bag_by="patient"), CPU, tmp_path / "patient",
                                folds=3, repeats=1)
    by_slide = cross_validate(feats, chosen, options, CPU, tmp_path / "slide", folds=3, repeats=1)
    patient_auc, slide_auc = (r.metrics["out_of_fold"]["0"]["auc"] for r in (by_patient, by_slide))
    assert by_patient.metrics["out_of_fold"]["0"]["n"] == 120 and slide_auc > 0.85
    assert patient_auc >= slide_auc - 0.02, (patient_auc, slide_auc)
    oof = read_rows(tmp_path / "patient" / "oof_predictions.csv")
    assert oof[0]["patient_id"].startswith("p") and len(oof) == 120

    out = tmp_path / "preds.csv"
    result = invoke("predict", "--model", tmp_path / "patient" / "fold_0" / "model.pt", "--features", feats,
                    "--labels", patients, "--out", out, "--device", "cpu")
    assert result.exit_code == 0, result.stderr
    predicted = read_rows(out)
    assert list(predicted[0])[:2] == ["patient_id", "prediction"] and len(predicted) == 120
    assert sum(len(r["slides"].split(";")) for r in predicted) == len(rows)
    result = invoke("predict", "--model", tmp_path / "patient" / "fold_0" / "model.pt", "--features", feats,
                    "--device", "cpu")
    assert result.exit_code == 2 and "patient bags" in result.stderr and "--labels" in result.stderr

    # explain: a slide's maps come from its patient's bag, so its attention is its share of the patient's
    patient = next(p for _, p, _ in rows if sum(q == p for _, q, _ in rows) > 1)
    slides = [i for i, (_, p, _) in enumerate(rows) if p == patient]
    result = invoke("explain", *[rows[i][0] for i in slides], "--model", tmp_path / "patient" / "fold_0" / "model.pt",
                    "--features", feats, "--labels", patients, "--out", tmp_path / "explain", "--device", "cpu")
    assert result.exit_code == 0, result.stderr
    shares = []
    for i in slides:
        table = read_rows(tmp_path / "explain" / rows[i][0] / "attention.csv")
        assert len(table) == len(features[i])
        shares.append(sum(float(r["attention"]) for r in table))
    assert sum(shares) == pytest.approx(1.0, abs=1e-3) and max(shares) < 1


def test_patients_whose_slides_disagree_are_refused(tmp_path: Path) -> None:
    feats = write_store(tmp_path / "feats.h5", [np.ones((3, 4), np.float32)] * 4, ["a", "b", "c", "d"])
    labels = write_csv(tmp_path / "labels.csv", ["slide_id", "patient_id", "label"],
                       [["a", "p1", "x"], ["b", "p1", "y"], ["c", "p2", "x"], ["d", "p3", "y"]])
    result = invoke("train", "--features", feats, "--labels", labels, "--bag-by", "patient", "--device", "cpu")
    assert result.exit_code == 2
    assert "labels.csv" in result.stderr and "patient 'p1'" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize(("task", "rows", "message"), [
    ("survival", [["a", "-3", "1"]], "line 2: time -3 is negative"),
    ("survival", [["a", "", "1"]], "line 2: empty slide_id or time or event"),
    ("survival", [["a", "5", "2"]], "line 2: event '2' is not 0 (censored) or 1"),
    ("survival", [["a", "soon", "1"]], "line 2: time 'soon' is not a number"),
    ("regression", [["a", "tumour"]], "line 2: label 'tumour' is not a number; --task regression needs numeric"),
])
def test_bad_survival_and_regression_labels(tmp_path: Path, task: str, rows: list, message: str) -> None:
    feats = write_store(tmp_path / "feats.h5", [np.ones((3, 4), np.float32)], ["a"])
    header = ["slide_id", "time", "event"] if task == "survival" else ["slide_id", "label"]
    labels = write_csv(tmp_path / "labels.csv", header, rows)
    result = invoke("train", "--features", feats, "--labels", labels, "--task", task, "--device", "cpu")
    assert result.exit_code == 2
    assert f"labels.csv: {message}" in result.stderr and "Traceback" not in result.stderr


def test_a_task_flag_that_does_not_match_the_csv(tmp_path: Path) -> None:
    feats = write_store(tmp_path / "feats.h5", [np.ones((3, 4), np.float32)], ["a"])
    classes = write_csv(tmp_path / "classes.csv", ["slide_id", "label"], [["a", "x"]])
    survival = write_csv(tmp_path / "survival.csv", ["slide_id", "time", "event"], [["a", "3", "1"]])
    result = invoke("train", "--features", feats, "--labels", classes, "--task", "survival", "--device", "cpu")
    assert result.exit_code == 2
    assert "classes.csv: missing column(s) event, time" in result.stderr and "--task classification" in result.stderr
    result = invoke("train", "--features", feats, "--labels", survival, "--device", "cpu")
    assert result.exit_code == 2
    assert "survival.csv: missing column(s) label" in result.stderr and "--task survival" in result.stderr
    result = invoke("train", "--features", feats, "--labels", survival, "--task", "survival", "--device", "cpu")
    assert result.exit_code == 2 and "survival.csv: survival training needs at least 2" in result.stderr
    result = invoke("train", "--features", feats, "--labels", classes, "--task", "ranking", "--device", "cpu")
    assert result.exit_code == 2 and "--task ranking: expected one of classification, regression, survival" in result.stderr
    result = invoke("train", "--features", feats, "--labels", survival, "--task", "survival", "--model", "dsmil",
                    "--device", "cpu")
    assert result.exit_code == 2 and "--model dsmil predicts classes only" in result.stderr


@pytest.fixture(scope="module")
def survival_run(sample_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`milcli run --task survival` over the sample run's stores (tiling and embedding
    resume) with a made-up time,event file: tumour slides fare worse."""
    out = tmp_path_factory.mktemp("survival") / "run"
    out.mkdir()
    for name in ("tiles.h5", "feats.h5", "feats.slides"):
        source = sample_run / name
        (shutil.copytree if source.is_dir() else shutil.copy)(source, out / name)
    rows = read_rows(SAMPLE / "labels.csv")
    labels = write_csv(out.parent / "survival.csv", ["slide_id", "time", "event"],
                       [[r["slide_id"], 12 + 5 * i if r["label"] == "normal" else 3 + i, int(i % 3 != 0)]
                        for i, r in enumerate(rows)])
    result = invoke("run", SAMPLE / "slides", "--labels", labels, "--out", out, "--task", "survival", "--epochs", "20",
                    "--ensemble", "2",
                    "--device", "cpu")
    assert result.exit_code == 0, result.stderr
    return out


def test_survival_run_writes_risk_km_and_explanations(survival_run: Path) -> None:
    record = json.loads((survival_run / "run.json").read_text())
    assert record["task"] == "survival" and record["stages"]["embed"]["done"] == []  # resumed, not re-embedded
    assert "c_index" in record["metrics"]["train"]
    rows = read_rows(survival_run / "predictions.csv")
    assert list(rows[0]) == ["slide_id", "risk", "time", "event", "split"] and len(rows) == 20
    assert (survival_run / "km.png").stat().st_size > 10_000
    folder = survival_run / "explain" / "slide_00"
    assert (folder / "evidence_risk.png").is_file() and (folder / "heatmap.png").is_file()
    header = (folder / "attention.csv").read_text().splitlines()[0]
    assert header == "x,y,size,attention,rank_pct,contribution_risk,instance_risk"
    regions = json.loads((folder / "regions.geojson").read_text())
    assert all(f["properties"]["classification"]["name"] == "High risk" for f in regions["features"])

    result = invoke("report", survival_run)
    assert result.exit_code == 0, result.stderr
    page = (survival_run / "report.html").read_text()
    assert 'src="km.png"' in page and "c_index" in page and "risk" in page


def test_survival_model_refuses_classification_labels(survival_run: Path) -> None:
    result = invoke("predict", "--model", survival_run / "model.pt", "--features", survival_run / "feats.h5",
                    "--labels", SAMPLE / "labels.csv", "--device", "cpu")
    assert result.exit_code == 2
    assert "labels.csv: missing column(s) event, time that survival labels need" in result.stderr
