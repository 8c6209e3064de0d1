"""Slide-level metrics and their figures, with bootstrap confidence intervals: classification
(AUC, accuracy, F1; ROC), regression (MAE, RMSE, R², Pearson, Spearman; scatter) and survival
(Harrell's and Uno's C-index, time-dependent AUC; Kaplan-Meier curves of risk groups with
the log-rank test). Survival statistics come from scikit-survival, except Harrell's C, which is
computed pairwise here so that its 1000 bootstrap resamples cost matrix products instead of
1000 Python loops (it equals scikit-survival's, tested)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy.stats import rankdata
from sklearn.metrics import (accuracy_score, balanced_accuracy_score, confusion_matrix, f1_score, roc_auc_score,
                             roc_curve)

SUMMARY_KEYS = ("auc", "balanced_accuracy", "accuracy", "f1")
REGRESSION_KEYS = ("mae", "rmse", "r2", "pearson", "spearman")
SURVIVAL_KEYS = ("c_index", "c_index_uno")
TASK_KEYS = {"classification": SUMMARY_KEYS, "regression": REGRESSION_KEYS, "survival": SURVIVAL_KEYS}
TASK_PLOTS = {"classification": "roc.png", "regression": "scatter.png", "survival": "km.png"}  # each task's figure
BOOTSTRAP_SAMPLES = 1000
FPR_GRID = np.linspace(0, 1, 101)


def shown_class(classes: list[str], predicted: int) -> int:
    """The class whose patch probabilities a slide's pictures show: the second (positive) class
    of a binary model, whatever was predicted (so a slide predicted negative shows where, if
    anywhere, positive patches are), else the predicted class. Used by explain and the report."""
    return 1 if len(classes) == 2 else predicted


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


def auc_lead_confidence(targets: np.ndarray, first: np.ndarray, second: np.ndarray, seed: int = 0,
                        resamples: int = BOOTSTRAP_SAMPLES) -> float:
    """The share of class-stratified bootstrap resamples of the bags in which `first`'s
    predictions (n, classes) have the higher AUC than `second`'s on the same bags (ties count
    half): a paired measure of how sure a lead in AUC is."""
    targets = np.asarray(targets)
    rng = np.random.default_rng(seed)
    strata = [np.flatnonzero(targets == c) for c in np.unique(targets)]
    rows = np.array([np.concatenate([rng.choice(members, len(members)) for members in strata])
                     for _ in range(resamples)])
    if first.shape[1] == 2 and len(strata) == 2:
        lead = binary_aucs(first[rows, 1], len(strata[0])) - binary_aucs(second[rows, 1], len(strata[0]))
    else:
        lead = np.array([auc(targets[r], first[r]) - auc(targets[r], second[r]) for r in rows])
    return float(np.mean(np.where(lead > 0, 1.0, np.where(lead == 0, 0.5, 0.0))))


def binary_aucs(scores: np.ndarray, negatives: int) -> np.ndarray:
    """Each row's ROC AUC (rows: resamples) where its first `negatives` columns are negative
    bags and the rest positive: the Mann-Whitney U of the positives' mid-ranks, as
    roc_auc_score gives, for all rows at once."""
    positives = scores.shape[1] - negatives
    ranks = rankdata(scores, axis=1)[:, negatives:].sum(1)
    return (ranks - positives * (positives + 1) / 2) / (positives * negatives)


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
    recipes = len(set(metrics.get("recipes", [])))
    heads = f"{len(metrics.get('best_epochs', []))} head(s)" + (f" ({recipes} recipes)" if recipes > 1 else "")
    trained = [(k, r) for k, r in zip(metrics.get("best_epochs", []), metrics.get("epochs_run", [])) if r]
    closed = len(metrics.get("epochs_run", [])) - len(trained)  # closed-form members run no epochs
    kept, run = [k for k, _ in trained], [r for _, r in trained]
    if not trained:
        note = f"{heads}, fitted in closed form"
    elif kept == run:
        note = f"{heads} x {run[0] if len(set(run)) == 1 else run} epochs"
    else:
        note = f"{heads}, epochs kept {kept} of {run} (early stopping)"
    if trained and closed:
        note += f" ({closed} of them fitted in closed form)"
    return f"{choice_note(metrics['architecture_choice'])}; {note}" if "architecture_choice" in metrics else note


def choice_note(choice: dict) -> str:
    """'abmil+kme (kme 0.75) chosen (inner CV by kme weight 0 / 0.25 / 0.5 / 0.75 / 1: Brier
    0.130 / ..., AUC 0.910 / ...)' from training.choose_architecture's record."""
    if "kme_weight" not in choice:
        return f"{choice['chosen']} ({choice['reason']})"
    weights = " / ".join(choice["inner_brier"])
    briers = " / ".join(f"{b:.3f}" for b in choice["inner_brier"].values())
    aucs = " / ".join(f"{a:.3f}" for a in choice["inner_auc"].values())
    return (f"{choice_label(choice)} chosen (inner CV by kme weight {weights}: Brier {briers}, AUC {aucs})")


def choice_label(choice: dict) -> str:
    """'abmil', 'kme', or 'abmil+kme (kme 0.75)': the head --model auto chose."""
    mixed = 0 < choice.get("kme_weight", 0) < 1
    return f"{choice['chosen']} (kme {choice['kme_weight']:g})" if mixed else choice["chosen"]


def summarise(per_fold: list[dict], keys: tuple[str, ...] = SUMMARY_KEYS) -> dict:
    """Mean and standard deviation of each summary metric over folds (NaN folds left out)."""
    summary = {}
    for key in keys:
        values = np.array([m[key] for m in per_fold if key in m], dtype=float)
        values = values[np.isfinite(values)]
        summary[key] = {"mean": float(values.mean()) if len(values) else float("nan"),
                        "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0}
    return summary


def summarise_repeats(per_repeat: list[dict], keys: tuple[str, ...] = SUMMARY_KEYS) -> dict:
    """Each summary metric of the repeats' pooled out-of-fold predictions: mean, sd over the
    repeats, and the standard error of the mean (sd / sqrt(repeats)), the figure that says
    how far another run of the same cross-validation could land."""
    spread = {}
    for key, values in summarise(per_repeat, keys).items():
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


def bootstrap_interval(statistic, *arrays: np.ndarray, samples: int = BOOTSTRAP_SAMPLES, seed: int = 0) -> list[float]:
    """95 % percentile interval of `statistic(*arrays)` over resamples of the slides (resamples
    where it is undefined are left out)."""
    values = [statistic(*(a[pick] for a in arrays)) for pick in _resamples(len(arrays[0]), samples, seed)]
    return _percentile_interval(np.array(values, dtype=float))


def _resamples(n: int, samples: int, seed: int):
    """The slide indices of each bootstrap resample (the same ones for every statistic)."""
    rng = np.random.default_rng(seed)
    for _ in range(samples):
        yield rng.integers(0, n, n)


def _percentile_interval(values: np.ndarray) -> list[float]:
    values = values[np.isfinite(values)]
    if not len(values):
        return [float("nan"), float("nan")]
    return [float(v) for v in np.percentile(values, [2.5, 97.5])]


def _correlation(kind: str):
    from scipy.stats import pearsonr, spearmanr

    test = pearsonr if kind == "pearson" else spearmanr

    def statistic(y: np.ndarray, p: np.ndarray) -> float:
        if np.ptp(y) == 0 or np.ptp(p) == 0:
            return float("nan")
        return float(test(y, p)[0])
    return statistic


def _r2(y: np.ndarray, p: np.ndarray) -> float:
    spread = np.square(y - y.mean()).sum()
    return float(1 - np.square(y - p).sum() / spread) if spread > 0 else float("nan")


REGRESSION_STATISTICS = {
    "mae": lambda y, p: float(np.abs(y - p).mean()),
    "rmse": lambda y, p: float(np.sqrt(np.square(y - p).mean())),
    "r2": _r2,
    "pearson": _correlation("pearson"),
    "spearman": _correlation("spearman"),
}


def regression_metrics(targets: np.ndarray, predictions: np.ndarray) -> dict:
    """n, then each of MAE, RMSE, R², Pearson's r and Spearman's rho with `<key>_ci`, its
    bootstrap 95 % interval."""
    if len(targets) == 0:
        return {}
    result: dict = {"n": int(len(targets))}
    for key, statistic in REGRESSION_STATISTICS.items():
        result[key] = statistic(targets, predictions)
        result[f"{key}_ci"] = bootstrap_interval(statistic, targets, predictions)
    return result


def _survival_array(times: np.ndarray, events: np.ndarray) -> np.ndarray:
    from sksurv.util import Surv

    return Surv.from_arrays(event=events.astype(bool), time=times.astype(float))


RISK_TIE = 1e-8  # risks this close count as tied (half a concordant pair), as scikit-survival counts them
PAIR_BLOCK = 1 << 22  # pairs held in memory at once by the pairwise C-index


def _harrell_sums(times: np.ndarray, events: np.ndarray, risk: np.ndarray,
                  weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Concordant credit and comparable pairs, weighted by `weights` (resamples x slides: how
    often each slide is drawn), for every row of weights at once. A pair (i, j) is comparable
    when i had an event before j's time, or at it with j censored (scikit-survival's rule);
    it earns 1 when i's risk is higher, 1/2 when tied. Built block by block from the pair
    matrices, so a resample costs a matrix product, not a Python loop over slides."""
    credit = np.zeros(len(weights))
    comparable = np.zeros(len(weights))
    step = max(1, PAIR_BLOCK // max(1, len(times)))
    for start in range(0, len(times), step):
        j = slice(start, start + step)
        later = times[:, None] < times[None, j]
        censored_at_same_time = (times[:, None] == times[None, j]) & ~events[None, j]
        pairs = (events[:, None] & (later | censored_at_same_time)).astype(float)
        gap = risk[:, None] - risk[None, j]
        score = np.where(np.abs(gap) <= RISK_TIE, 0.5, (gap > 0).astype(float))
        credit += ((weights @ (pairs * score)) * weights[:, j]).sum(axis=1)
        comparable += ((weights @ pairs) * weights[:, j]).sum(axis=1)
    return credit, comparable


def _survival_inputs(times, events, risk) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return np.asarray(times, dtype=float), np.asarray(events, dtype=bool), np.asarray(risk, dtype=float)


def _harrell_ratio(credit: np.ndarray, comparable: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(comparable > 0, credit / np.maximum(comparable, 1), np.nan)


def harrell_c(times: np.ndarray, events: np.ndarray, risk: np.ndarray) -> float:
    """Harrell's C: the share of comparable pairs (the earlier time an event) whose risks are
    ordered the same way; NaN without a comparable pair. Equals scikit-survival's
    `concordance_index_censored` (tested)."""
    times, events, risk = _survival_inputs(times, events, risk)
    if not np.isfinite(risk).all():
        return float("nan")
    return float(_harrell_ratio(*_harrell_sums(times, events, risk, np.ones((1, len(times)))))[0])


def harrell_c_interval(times: np.ndarray, events: np.ndarray, risk: np.ndarray,
                       samples: int = BOOTSTRAP_SAMPLES, seed: int = 0) -> list[float]:
    """`bootstrap_interval(harrell_c, ...)` with the same resamples, all at once: each resample
    is a vector of draw counts, and its C-index a weighted sum over the original pairs."""
    times, events, risk = _survival_inputs(times, events, risk)
    if not np.isfinite(risk).all():
        return [float("nan"), float("nan")]
    n = len(times)
    resamples = _resamples(n, samples, seed)
    values = []
    for start in range(0, samples, 250):  # 250 resamples per matrix product
        weights = np.stack([np.bincount(next(resamples), minlength=n) for _ in range(min(250, samples - start))])
        values.append(_harrell_ratio(*_harrell_sums(times, events, risk, weights.astype(float))))
    return _percentile_interval(np.concatenate(values))


UNO_BOOTSTRAP_SAMPLES = 200  # each resample re-estimates the censoring distribution (~2 ms for 200 slides)


def uno_c(times: np.ndarray, events: np.ndarray, risk: np.ndarray) -> float:
    """Uno's C: Harrell's with each pair weighted by the inverse probability of staying
    uncensored (the censoring distribution estimated on these slides), up to the last event
    time; less biased than Harrell's when censoring is heavy. NaN where it is undefined."""
    from sksurv.metrics import concordance_index_ipcw

    if events.sum() < 2:
        return float("nan")
    survival = _survival_array(times, events)
    try:
        return float(concordance_index_ipcw(survival, survival, risk, tau=float(times[events].max()))[0])
    except (ValueError, ZeroDivisionError):  # no comparable pair, or censoring weights that vanish
        return float("nan")


def survival_metrics(times: np.ndarray, events: np.ndarray, risk: np.ndarray,
                     horizons: tuple[float, ...] = ()) -> dict:
    """n, events, Harrell's and Uno's C-index, each with its bootstrap 95 % interval, and the
    cumulative/dynamic time-dependent AUC at `horizons` (default: the quartiles of the event
    times), those inside the follow-up (`time_auc_at`), and their mean (`time_auc`)."""
    from sksurv.metrics import cumulative_dynamic_auc

    if len(times) == 0:
        return {}
    events = events.astype(bool)
    result: dict = {"n": int(len(times)), "events": int(events.sum()),
                    "c_index": harrell_c(times, events, risk),
                    "c_index_ci": harrell_c_interval(times, events, risk),
                    "c_index_uno": uno_c(times, events, risk),
                    "c_index_uno_ci": bootstrap_interval(uno_c, times, events, risk, samples=UNO_BOOTSTRAP_SAMPLES)}
    result["time_auc"] = float("nan")
    if events.sum() >= 2 and len(np.unique(times[events])) >= 2:
        survival = _survival_array(times, events)
        try:
            at = np.unique(horizons or np.quantile(times[events], [0.25, 0.5, 0.75]))
            at = at[(at >= times.min()) & (at < times.max())]
            if len(at):
                aucs, mean_auc = cumulative_dynamic_auc(survival, survival, risk, at)
                result["time_auc"] = float(mean_auc)
                result["time_auc_at"] = {f"{t:g}": float(a) for t, a in zip(at, aucs)}
        except ValueError:  # a censoring distribution that reaches zero before the horizon
            pass
    return result


def risk_groups(risk: np.ndarray, groups: int) -> np.ndarray:
    """0 (lowest risk) .. groups-1 by the quantiles of `risk`."""
    edges = np.quantile(risk, np.linspace(0, 1, groups + 1)[1:-1])
    return np.searchsorted(edges, risk, side="right")


def logrank_p(times: np.ndarray, events: np.ndarray, groups: np.ndarray) -> float:
    from sksurv.compare import compare_survival

    if len(np.unique(groups)) < 2 or not events.any():
        return float("nan")
    return float(compare_survival(_survival_array(times, events), groups)[1])


def plot_km(path: Path, times: np.ndarray, events: np.ndarray, risk: np.ndarray, title: str) -> dict:
    """Kaplan-Meier curves of the slides split at the median risk (left) and into risk
    tertiles (right), each panel with its log-rank p-value, to a PNG; returns the p-values."""
    from matplotlib.figure import Figure
    from sksurv.nonparametric import kaplan_meier_estimator

    events = events.astype(bool)
    figure = Figure(figsize=(10, 4.5), dpi=120)
    summary = {}
    for ax, (name, count, labels) in zip(figure.subplots(1, 2), (("median", 2, ("low", "high")),
                                                                ("tertiles", 3, ("low", "middle", "high")))):
        groups = risk_groups(risk, count)
        p = logrank_p(times, events, groups)
        summary[f"logrank_p_{name}"] = p
        for g, label in enumerate(labels):
            chosen = groups == g
            if not chosen.any():
                continue
            t, s = kaplan_meier_estimator(events[chosen], times[chosen])
            ax.step(np.concatenate([[0], t]), np.concatenate([[1], s]), where="post",
                    label=f"{label} risk (n={chosen.sum()}, events {events[chosen].sum()})")
        ax.set(xlabel="time", ylabel="survival probability", ylim=(0, 1.02),
               title=f"risk split at the {'median' if count == 2 else 'tertiles'}: log-rank p = {p:.2g}")
        ax.legend(loc="lower left", fontsize=8)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return summary


def plot_scatter(path: Path, targets: np.ndarray, predictions: np.ndarray, title: str) -> dict:
    """Predicted against true values with the identity line, to a PNG; returns R² and Spearman."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5.5, 5), dpi=120)
    ax = figure.add_subplot()
    ax.scatter(targets, predictions, s=14, alpha=0.7)
    low, high = float(min(targets.min(), predictions.min())), float(max(targets.max(), predictions.max()))
    ax.plot([low, high], [low, high], ls="--", color="grey", lw=1)
    summary = {"r2": _r2(targets, predictions), "spearman": REGRESSION_STATISTICS["spearman"](targets, predictions)}
    ax.set(xlabel="true value", ylabel="predicted value",
           title=f"{title}\nR² {summary['r2']:.3f}, Spearman {summary['spearman']:.3f}")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return summary
