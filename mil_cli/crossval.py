"""K-fold cross-validation (optionally repeated) with the training-output layout of DESIGN.md:

    DIR/fold_<i>/model.pt      one model per fold (i counts on across repeats)
    DIR/oof_predictions.csv    every slide predicted by the fold that did not train on it
    DIR/splits.csv             repeat, fold, slide_id, role (train / val / test / holdout)
    DIR/metrics.json           per fold, mean ± std, pooled out-of-fold per repeat and its spread
                               over repeats, and the held-out test
    DIR/roc.png                out-of-fold ROC with bootstrap 95 % bands

Folds are stratified by label and grouped by patient (StratifiedGroupKFold), and each fold
holds out a stratified, patient-grouped validation share of its training slides for early
stopping. Slides marked `test` in the labels' split column stay out of every fold; the fold
ensemble predicts them at the end.
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
from mil_cli.metrics import classification_metrics, plot_roc, summarise, summarise_repeats
from mil_cli.config import TrainOptions
from mil_cli.training import (Bag, LabelledBags, epochs_summary, evaluate, fit_pool, group_folds, load_dataset,
                              make_checkpoint, save_checkpoint)


@dataclass
class CrossValidationResult:
    metrics: dict
    missing: list[str]
    seconds: float


def fold_splits(bags: list[Bag], folds: int, seed: int) -> list[tuple[list[int], list[int]]]:
    """(training, test) bag indices per fold: stratified by label, patients kept together."""
    smallest = np.bincount(np.array([b.target for b in bags])).min()
    if smallest < folds:
        raise InputError("--folds", f"{folds} folds need at least {folds} slides of every class; the rarest has "
                                    f"{smallest}")
    return group_folds(bags, folds, seed)


def cross_validate(features_path: Path, labels_path: Path, options: TrainOptions, device: torch.device,
                   out: Path, folds: int, repeats: int = 1) -> CrossValidationResult:
    start = time.perf_counter()
    data = load_dataset(features_path, labels_path, held_out=frozenset({"test"}), folds=folds)
    holdout = [b for b in data.bags if data.labels.rows[b.slide_id].split == "test"]
    pool = [b for b in data.bags if data.labels.rows[b.slide_id].split != "test"]
    if any(data.labels.rows[b.slide_id].split == "val" for b in pool):
        warn(f"{labels_path}: 'val' in the split column is ignored with --folds (each fold holds out its own)")
    out.mkdir(parents=True, exist_ok=True)
    per_fold, oof_rows, split_rows, holdout_probs = [], [], [], []
    pooled: dict[int, tuple[list[int], list[np.ndarray]]] = {}
    for repeat in range(repeats):
        seed = options.seed + repeat
        for k, (train_idx, test_idx) in enumerate(fold_splits(pool, folds, seed)):
            index = repeat * folds + k
            fold_options = replace(options, seed=seed * 1000 + k)
            fitted, train_bags, val_bags = fit_pool([pool[i] for i in train_idx], len(data.classes), fold_options,
                                                    device)
            test_bags = [pool[i] for i in test_idx]
            _, probs = evaluate(fitted.model, test_bags, device)
            targets = np.array([b.target for b in test_bags])
            metrics = {"repeat": repeat, "fold": k, **epochs_summary(fitted),
                       **classification_metrics(targets, probs)}
            per_fold.append(metrics)
            pooled.setdefault(repeat, ([], []))[0].extend(targets.tolist())
            pooled[repeat][1].append(probs)
            oof_rows += [(b, p, repeat, k) for b, p in zip(test_bags, probs)]
            roles = {"train": [b.slide_id for b in train_bags], "val": [b.slide_id for b in val_bags],
                     "test": [b.slide_id for b in test_bags], "holdout": [b.slide_id for b in holdout]}
            split_rows += [(repeat, k, sid, role) for role, ids in roles.items() for sid in ids]
            if holdout:
                holdout_probs.append(evaluate(fitted.model, holdout, device)[1])
            checkpoint = make_checkpoint(fitted, data, fold_options, {"fold": metrics}, roles, features_path,
                                         labels_path)
            save_checkpoint(checkpoint, out / f"fold_{index}" / "model.pt")

    out_of_fold = {str(r): classification_metrics(np.array(t), np.concatenate(p)) for r, (t, p) in pooled.items()}
    summary = {"folds": folds, "repeats": repeats, "per_fold": per_fold, "mean_std": summarise(per_fold),
               "out_of_fold": out_of_fold, "over_repeats": summarise_repeats(list(out_of_fold.values()))}
    if holdout:
        summary["holdout_ensemble"] = classification_metrics(np.array([b.target for b in holdout]),
                                                             np.mean(holdout_probs, axis=0))
    targets, probs = np.array(pooled[0][0]), np.concatenate(pooled[0][1])
    summary["roc"] = plot_roc(out / "roc.png", targets, probs, data.classes,
                              f"out-of-fold ROC, {folds}-fold CV ({len(targets)} slides)")
    _write_oof(out / "oof_predictions.csv", oof_rows, data, repeats > 1)
    with open(out / "splits.csv", "w", newline="") as f:
        csv.writer(f).writerows([("repeat", "fold", "slide_id", "role"), *split_rows])
    (out / "metrics.json").write_text(json.dumps(summary, indent=2))
    return CrossValidationResult(summary, data.missing, time.perf_counter() - start)


def _write_oof(path: Path, rows: list[tuple[Bag, np.ndarray, int, int]], data: LabelledBags, with_repeat: bool) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["slide_id", "prediction", *[f"prob_{c}" for c in data.classes], "label", "correct", "fold"]
                        + (["repeat"] if with_repeat else []))
        for bag, probs, repeat, fold in rows:
            predicted = data.classes[int(np.argmax(probs))]
            label = data.classes[bag.target]
            writer.writerow([bag.slide_id, predicted, *[f"{p:.6f}" for p in probs], label, str(predicted == label).lower(), fold]
                            + ([repeat] if with_repeat else []))
