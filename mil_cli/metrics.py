"""Slide-level metrics and ROC curves with bootstrap confidence bands."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from sklearn.metrics import (accuracy_score, balanced_accuracy_score, confusion_matrix, f1_score, roc_auc_score,
                             roc_curve)

SUMMARY_KEYS = ("auc", "balanced_accuracy", "accuracy", "f1")
BOOTSTRAP_SAMPLES = 1000
FPR_GRID = np.linspace(0, 1, 101)


def auc(targets: np.ndarray, probs: np.ndarray) -> float:
    """ROC AUC; macro one-vs-rest for more than two classes; NaN when one class is present."""
    if len(np.unique(targets)) < 2:
        return float("nan")
    if probs.shape[1] == 2:
        return float(roc_auc_score(targets, probs[:, 1]))
    present = np.unique(targets)
    if len(present) < probs.shape[1]:  # a class absent from these slides: average over the others
        return float(np.mean([roc_auc_score(targets == c, probs[:, c]) for c in present]))
    return float(roc_auc_score(targets, probs, multi_class="ovr", average="macro"))


def classification_metrics(targets: np.ndarray, probs: np.ndarray) -> dict:
    """n, AUC, balanced accuracy, accuracy, F1 (positive class when binary, macro otherwise)
    and the confusion matrix (rows: true class, columns: predicted)."""
    if len(targets) == 0:
        return {}
    n_classes = probs.shape[1]
    predicted = probs.argmax(1)
    labels = list(range(n_classes))
    return {
        "n": int(len(targets)),
        "auc": auc(targets, probs),
        "balanced_accuracy": float(balanced_accuracy_score(targets, predicted)),
        "accuracy": float(accuracy_score(targets, predicted)),
        "f1": float(f1_score(targets, predicted, labels=labels, average="binary" if n_classes == 2 else "macro",
                             zero_division=0)),
        "confusion": confusion_matrix(targets, predicted, labels=labels).tolist(),
    }


def epochs_note(metrics: dict) -> str:
    """One line on how the model's members were trained, from training's `epochs_summary`."""
    kept, run = metrics.get("best_epochs", []), metrics.get("epochs_run", [])
    if kept == run:
        return f"{len(kept)} seed(s) x {run[0] if len(set(run)) == 1 else run} epochs"
    return f"{len(kept)} seed(s), epochs kept {kept} of {run} (early stopping)"


def summarise(per_fold: list[dict]) -> dict:
    """Mean and standard deviation of each summary metric over folds (NaN folds left out)."""
    summary = {}
    for key in SUMMARY_KEYS:
        values = np.array([m[key] for m in per_fold if key in m], dtype=float)
        values = values[np.isfinite(values)]
        summary[key] = {"mean": float(values.mean()) if len(values) else float("nan"),
                        "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0}
    return summary


def summarise_repeats(per_repeat: list[dict]) -> dict:
    """Each summary metric of the repeats' pooled out-of-fold predictions: mean, sd over the
    repeats, and the standard error of the mean (sd / sqrt(repeats)), the figure that says
    how far another run of the same cross-validation could land."""
    spread = {}
    for key, values in summarise(per_repeat).items():
        values["sem"] = values["std"] / np.sqrt(len(per_repeat))
        spread[key] = values
    return spread


def bootstrap_roc(targets: np.ndarray, scores: np.ndarray, seed: int = 0) -> dict:
    """ROC of binary `targets` vs `scores` on a fixed FPR grid, with a 95 % band and AUC
    interval from resampling the slides with replacement."""
    rng = np.random.default_rng(seed)
    fpr, tpr, _ = roc_curve(targets, scores)
    curves, aucs = [], []
    for _ in range(BOOTSTRAP_SAMPLES):
        pick = rng.integers(0, len(targets), len(targets))
        if len(np.unique(targets[pick])) < 2:
            continue
        f, t, _ = roc_curve(targets[pick], scores[pick])
        curves.append(np.interp(FPR_GRID, f, t))
        aucs.append(roc_auc_score(targets[pick], scores[pick]))
    low, high = np.percentile(curves, [2.5, 97.5], axis=0)
    return {"fpr": fpr, "tpr": tpr, "band_low": low, "band_high": high, "auc": float(roc_auc_score(targets, scores)),
            "auc_low": float(np.percentile(aucs, 2.5)), "auc_high": float(np.percentile(aucs, 97.5))}


def plot_roc(path: Path, targets: np.ndarray, probs: np.ndarray, classes: list[str], title: str) -> dict:
    """ROC curve(s) with bootstrap 95 % bands to a PNG: the positive class when binary, one
    curve per class (one-vs-rest) otherwise. Returns the AUC and its interval per curve."""
    from matplotlib.figure import Figure

    shown = [1] if len(classes) == 2 else range(len(classes))
    figure = Figure(figsize=(5.5, 5), dpi=120)
    ax = figure.add_subplot()
    summary = {}
    for c in shown:
        is_class = (targets == c).astype(int)
        if len(np.unique(is_class)) < 2:
            continue
        roc = bootstrap_roc(is_class, probs[:, c])
        line, = ax.plot(roc["fpr"], roc["tpr"], lw=2,
                        label=f"{classes[c]}: AUC {roc['auc']:.3f} (95% CI {roc['auc_low']:.3f}-{roc['auc_high']:.3f})")
        ax.fill_between(FPR_GRID, roc["band_low"], roc["band_high"], color=line.get_color(), alpha=0.2)
        summary[classes[c]] = {k: roc[k] for k in ("auc", "auc_low", "auc_high")}
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", xlim=(0, 1), ylim=(0, 1.01), title=title)
    ax.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return summary
