"""K-fold cross-validation (optionally repeated) with the training-output layout of DESIGN.md:

    DIR/fold_<i>/model.pt      one model per fold (i counts on across repeats)
    DIR/oof_predictions.csv    every slide (patient) predicted by the fold that did not train on it
    DIR/splits.csv             repeat, fold, slide_id (patient_id), role (train / val / test / holdout)
    DIR/metrics.json           per fold, mean ± std, pooled out-of-fold per repeat and its spread
                               over repeats, and the held-out test
    DIR/roc.png                out-of-fold ROC with bootstrap 95 % bands (classification);
                               scatter.png (regression), km.png (survival) instead

Folds are stratified as the task stratifies (classes; quantile bins of the value; event and
time) and grouped by patient (StratifiedGroupKFold). Slides marked `test` in the labels'
split column stay out of every fold; the fold ensemble predicts them at the end.
"""

from __future__ import annotations

import csv
import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from mil_cli.console import warn
from mil_cli.errors import InputError
from mil_cli.metrics import summarise, summarise_repeats
from mil_cli.config import TrainOptions
from mil_cli.tasks import Classification, Task
from mil_cli.training import (Bag, epochs_summary, evaluate, fit_pool, group_folds, load_dataset, make_checkpoint,
                              save_checkpoint)


@dataclass
class CrossValidationResult:
    metrics: dict
    missing: list[str]
    seconds: float


def fold_splits(bags: list[Bag], folds: int, seed: int, task: Task) -> list[tuple[list[int], list[int]]]:
    """(training, test) bag indices per fold: stratified as the task stratifies, patients kept together."""
    if isinstance(task, Classification):
        smallest = np.bincount(np.array([b.target for b in bags])).min()
        if smallest < folds:
            raise InputError("--folds", f"{folds} folds need at least {folds} slides of every class; the rarest has "
                                        f"{smallest}")
    return group_folds(bags, folds, seed, task)


def cross_validate(features_path: Path, labels_path: Path, options: TrainOptions, device: torch.device,
                   out: Path, folds: int, repeats: int = 1) -> CrossValidationResult:
    start = time.perf_counter()
    data = load_dataset(features_path, labels_path, options, held_out=frozenset({"test"}), folds=folds)
    task = data.task
    holdout = [b for b in data.bags if b.split == "test"]
    pool = [b for b in data.bags if b.split != "test"]
    if any(b.split == "val" for b in pool):
        warn(f"{labels_path}: 'val' in the split column is ignored with --folds (each fold holds out its own)")
    out.mkdir(parents=True, exist_ok=True)
    per_fold, oof_rows, split_rows, holdout_predictions = [], [], [], []
    pooled: dict[int, tuple[list, list[np.ndarray]]] = {}
    for repeat in range(repeats):
        seed = options.seed + repeat
        for k, (train_idx, test_idx) in enumerate(fold_splits(pool, folds, seed, task)):
            index = repeat * folds + k
            fold_options = replace(options, seed=seed * 1000 + k)
            fitted, train_bags, val_bags = fit_pool([pool[i] for i in train_idx], task, fold_options, device)
            test_bags = [pool[i] for i in test_idx]
            _, predictions = evaluate(fitted.model, test_bags, device, fitted.task)
            targets = [b.target for b in test_bags]
            metrics = {"repeat": repeat, "fold": k, **epochs_summary(fitted), **task.metrics(targets, predictions)}
            per_fold.append(metrics)
            pooled.setdefault(repeat, ([], []))[0].extend(targets)
            pooled[repeat][1].append(predictions)
            oof_rows += [(b, p, repeat, k) for b, p in zip(test_bags, predictions)]
            roles = {"train": train_bags, "val": val_bags, "test": test_bags, "holdout": holdout}
            split_rows += [(repeat, k, b.bag_id, role) for role, bags in roles.items() for b in bags]
            if holdout:
                holdout_predictions.append(evaluate(fitted.model, holdout, device, fitted.task)[1])
            checkpoint = make_checkpoint(fitted, data, fold_options, {"fold": metrics}, roles, features_path,
                                         labels_path)
            save_checkpoint(checkpoint, out / f"fold_{index}" / "model.pt")

    keys = task.summary_keys
    out_of_fold = {str(r): task.metrics(t, np.concatenate(p)) for r, (t, p) in pooled.items()}
    summary = {"task": task.name, "folds": folds, "repeats": repeats, "per_fold": per_fold,
               "mean_std": summarise(per_fold, keys), "out_of_fold": out_of_fold,
               "over_repeats": summarise_repeats(list(out_of_fold.values()), keys)}
    if holdout:
        summary["holdout_ensemble"] = task.metrics([b.target for b in holdout], np.mean(holdout_predictions, axis=0))
    targets, predictions = pooled[0][0], np.concatenate(pooled[0][1])
    summary["plot"] = task.plot(out / task.plot_name, targets, predictions,
                                f"out-of-fold, {folds}-fold CV ({len(targets)} {options.bag_by}s)")
    id_column = f"{options.bag_by}_id"  # slide_id, or patient_id
    _write_oof(out / "oof_predictions.csv", oof_rows, task, repeats > 1, id_column)
    with open(out / "splits.csv", "w", newline="") as f:
        csv.writer(f).writerows([("repeat", "fold", id_column, "role"), *split_rows])
    (out / "metrics.json").write_text(json.dumps(summary, indent=2))
    return CrossValidationResult(summary, data.missing, time.perf_counter() - start)


def _write_oof(path: Path, rows: list[tuple[Bag, np.ndarray, int, int]], task: Task, with_repeat: bool,
               id_column: str) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([id_column, *task.prediction_columns(), *task.known_columns(), "fold"]
                        + (["repeat"] if with_repeat else []))
        for bag, predictions, repeat, fold in rows:
            known = task.known_values(task.as_label(bag.target), predictions)
            writer.writerow([bag.bag_id, *task.prediction_values(predictions), *known, fold]
                            + ([repeat] if with_repeat else []))
