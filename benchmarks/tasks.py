"""Regression, survival and patient-level bags with the default options, on synthetic cohorts
whose answer is known (mil_cli.synthetic); prints the out-of-fold figures.

    python benchmarks/tasks.py [--checks survival regression patients] [--folds 5]

- survival: 200 bags whose event-time hazard rises with a hidden share of tumour patches (30 %
  censored): Harrell's and Uno's C, time-dependent AUC and log-rank p for the Cox and the
  discrete-time losses, beside the C-index of the true shares (the ceiling).
- regression: the same bags, the target the tumour share itself: Spearman, R², MAE.
- patients: 120 patients of 1-4 slides, the signal in one slide of each positive patient:
  AUC of --bag-by patient over all slides against slide-level bags given only the right slide,
  at two signal strengths.
"""

from __future__ import annotations

import argparse
import csv
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from mil_cli import stores
from mil_cli.config import TrainOptions
from mil_cli.console import set_quiet
from mil_cli.crossval import cross_validate
from mil_cli.metrics import harrell_c
from mil_cli.synthetic import patient_slides, survival_times, tumour_share_bags

CPU = torch.device("cpu")


def write_cohort(folder: Path, features: list[np.ndarray], ids: list[str], header: list[str],
                 rows: list[list]) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    entries = [(sid, np.stack([np.arange(len(x)) * 8, np.zeros(len(x))], axis=1).astype(np.int64), x)
               for sid, x in zip(ids, features)]
    stores.write_feature_store(folder / "feats.h5", entries, backbone="synthetic")
    with open(folder / "labels.csv", "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    return folder / "feats.h5", folder / "labels.csv"


def pooled(feats: Path, labels: Path, options: TrainOptions, out: Path, folds: int) -> tuple[dict, dict, float]:
    start = time.perf_counter()
    result = cross_validate(feats, labels, options, CPU, out, folds, repeats=1)
    return result.metrics["out_of_fold"]["0"], result.metrics["plot"], time.perf_counter() - start


def survival(work: Path, folds: int) -> None:
    bags = tumour_share_bags(200, seed=0)
    shares = np.array([f for _, f, _ in bags])
    times, events = survival_times(shares, seed=1)
    ids = [f"s{i:03d}" for i in range(len(bags))]
    feats, labels = write_cohort(work / "survival", [x for x, _, _ in bags], ids, ["slide_id", "time", "event"],
                                 [[sid, f"{t:.6g}", e] for sid, t, e in zip(ids, times, events)])
    print(f"survival: 200 bags, {events.sum()} events; C-index of the true tumour shares "
          f"{harrell_c(times, events.astype(bool), shares):.3f}")
    for loss in ("cox", "nll"):
        m, plot, seconds = pooled(feats, labels, TrainOptions(task="survival", survival_loss=loss),
                                  work / f"cv-{loss}", folds)
        print(f"  {loss:<4} C-index {m['c_index']:.3f} (95% CI {m['c_index_ci'][0]:.3f}-{m['c_index_ci'][1]:.3f}), "
              f"Uno {m['c_index_uno']:.3f}, time-dependent AUC {m['time_auc']:.3f}, log-rank p median "
              f"{plot['logrank_p_median']:.1e} tertiles {plot['logrank_p_tertiles']:.1e} ({seconds:.0f} s)")


def regression(work: Path, folds: int) -> None:
    bags = tumour_share_bags(200, seed=0)
    ids = [f"s{i:03d}" for i in range(len(bags))]
    feats, labels = write_cohort(work / "regression", [x for x, _, _ in bags], ids, ["slide_id", "label"],
                                 [[sid, f"{f * 100:.4f}"] for sid, (_, f, _) in zip(ids, bags)])
    m, _, seconds = pooled(feats, labels, TrainOptions(task="regression"), work / "cv-regression", folds)
    print(f"regression (tumour share in %, 200 bags): Spearman {m['spearman']:.3f} "
          f"(95% CI {m['spearman_ci'][0]:.3f}-{m['spearman_ci'][1]:.3f}), Pearson {m['pearson']:.3f}, "
          f"R² {m['r2']:.3f}, MAE {m['mae']:.2f} points ({seconds:.0f} s)")


def patients(work: Path, folds: int) -> None:
    for signal in (4.0, 5.0):
        features, rows, right = patient_slides(120, signal=signal)
        folder = work / f"patients-{signal:g}"
        feats, by_patient = write_cohort(folder, features, [r[0] for r in rows], ["slide_id", "patient_id", "label"],
                                         [list(r) for r in rows])
        with open(folder / "right.csv", "w", newline="") as f:
            csv.writer(f).writerows([["slide_id", "label"], *[[rows[i][0], rows[i][2]] for i in right]])
        options = TrainOptions()
        patient, _, s1 = pooled(feats, by_patient, replace(options, bag_by="patient"), folder / "cv-patient", folds)
        slide, _, s2 = pooled(feats, folder / "right.csv", options, folder / "cv-slide", folds)
        print(f"patients (signal {signal:g}, 120 patients of 1-4 slides): AUC --bag-by patient {patient['auc']:.3f} "
              f"({s1:.0f} s), slide bags of the right slide {slide['auc']:.3f} ({s2:.0f} s), "
              f"difference {patient['auc'] - slide['auc']:+.3f}")


CHECKS = {"survival": survival, "regression": regression, "patients": patients}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checks", nargs="+", choices=list(CHECKS), default=list(CHECKS))
    parser.add_argument("--folds", type=int, default=5)
    args = parser.parse_args()
    set_quiet(True)
    with tempfile.TemporaryDirectory() as folder:
        for name in args.checks:
            CHECKS[name](Path(folder), args.folds)


if __name__ == "__main__":
    main()
