"""What a model predicts, and all that follows from it: the labels-CSV columns holding the
target and how they are checked, the head's output size, the loss, the metrics, how
cross-validation stratifies, the prediction columns and the plots. A new task is one Task
subclass added to TASKS.

- classification: `label` is a class. Softmax over the classes; the head's own class-weighted
  cross-entropy (with its patch-level terms); AUC, accuracy, F1; ROC plot.
- regression: `label` is a number. One output: the target z-scored with the training slides'
  mean and sd (kept in the model file), so the default learning rate suits any unit. Huber
  loss (delta 1 sd): squared error within a standard deviation, absolute beyond it, because
  biomarker scores (expression, purity estimates) have heavy tails and a few extreme slides
  must not drive a head trained on a few dozen. MAE, RMSE, R², Pearson, Spearman with
  bootstrap CIs; predicted-vs-true scatter.
- survival: `time` and `event` (1 = event observed, 0 = censored). One output, the log
  relative risk, trained by the Cox partial likelihood over each batch (default), or
  `--survival-loss nll`: four discrete-time hazards (bins at the quartiles of the training
  event times) and their censoring-aware likelihood. Harrell's and Uno's C-index with bootstrap
  CIs, time-dependent AUC, Kaplan-Meier plot of risk groups with the log-rank p-value.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch.nn import functional as F

from mil_cli import metrics
from mil_cli.errors import InputError
from mil_cli.config import TASK_NAMES
from mil_cli.labels import MIN_SLIDES_PER_CLASS, LabelRow, LabelTable

Target = Any  # a class name (str), a number (float) or (time, event)


class Task:
    name: ClassVar[str]
    columns: ClassVar[tuple[str, ...]]       # the labels CSV's columns holding the target
    summary_keys: ClassVar[tuple[str, ...]]  # the metrics tables and summaries show
    plot_name: ClassVar[str]                 # the figure cross-validation draws
    contribution_scale = 1.0  # patch contributions (logit units) times this are in the predicted quantity's units

    # -- labels ------------------------------------------------------------------------------
    def parse(self, values: dict[str, str]) -> Target:
        """The target from a CSV row's `columns`; ValueError saying what is wrong."""
        raise NotImplementedError

    def bind(self, labels: LabelTable) -> Task:
        """This task knowing the labels (classification takes its classes from them)."""
        return self

    def check_cohort(self, labels: LabelTable, labels_path: Path, found: list[str], where: str,
                     held_out: frozenset[str], folds: int | None) -> None:
        """Raise InputError when the training slides among `found` cannot train a model."""
        raise NotImplementedError

    # -- the model ---------------------------------------------------------------------------
    def outputs(self) -> list[str]:
        """Names of the predicted quantities: the classes, or one name."""
        raise NotImplementedError

    @property
    def n_outputs(self) -> int:
        return len(self.outputs())

    def target(self, row: LabelRow) -> Target:
        """A labelled slide's target as a bag holds it (a class index, a float, (time, event))."""
        return row.target

    def as_label(self, target: Target) -> Target:
        """A bag's target as the labels CSV wrote it (the inverse of `target`)."""
        return target

    def fitted(self, targets: list[Target]) -> Task:
        """This task with what it learns from the training targets (scales, bins)."""
        return self

    def strata(self, targets: list[Target], folds: int) -> np.ndarray:
        """Integer strata for stratified splits, each holding `folds` slides where possible."""
        raise NotImplementedError

    def class_weight(self, targets: list[Target]) -> torch.Tensor | None:
        return None

    def batches(self, targets: list[Target], batch_size: int, generator: torch.Generator) -> list[list[int]]:
        """One epoch's batches of bag indices, in random order."""
        order = torch.randperm(len(targets), generator=generator).tolist()
        return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]

    def loss(self, model: Any, out: Any, targets: torch.Tensor, mask: torch.Tensor,
             weight: torch.Tensor | None) -> torch.Tensor:
        """The training loss of one batch (model: the head, out: its MILOutput)."""
        return self.eval_loss(out.logits, targets, weight)

    def eval_loss(self, logits: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
        """Mean loss of (n, outputs) fp32 logits, the prediction's part only."""
        raise NotImplementedError

    def predict(self, logits: torch.Tensor) -> torch.Tensor:
        """(n, outputs) logits -> (n, len(outputs())) predictions: probabilities, values or risk."""
        raise NotImplementedError

    def patch_values(self, scores: np.ndarray) -> np.ndarray:
        """A head's instance scores (N, outputs) -> the predicted quantity per patch alone."""
        return self.predict(torch.from_numpy(scores)).numpy()

    def describe(self, predictions: np.ndarray) -> str:
        """One bag's prediction in words, for titles."""
        return f"{self.outputs()[0]} {predictions[0]:.3g}"

    # -- results -----------------------------------------------------------------------------
    def metrics(self, targets: list[Target], predictions: np.ndarray) -> dict:
        raise NotImplementedError

    def plot(self, path: Path, targets: list[Target], predictions: np.ndarray, title: str) -> dict:
        """The task's figure (ROC, scatter, Kaplan-Meier) to `path`; returns its figures."""
        raise NotImplementedError

    def prediction_columns(self) -> list[str]:
        """The predictions CSV's columns after the id: by default the one predicted quantity."""
        return self.outputs()

    def prediction_values(self, predictions: np.ndarray) -> list[str]:
        return [f"{predictions[0]:.6g}"]

    def known_columns(self) -> list[str]:
        """Columns the predictions CSV adds when the slide's target is known."""
        raise NotImplementedError

    def known_values(self, target: Target | None, predictions: np.ndarray) -> list[str]:
        raise NotImplementedError

    def check_known(self, labels: LabelTable, labels_path: Path, slide_ids: Iterable[str]) -> None:
        """Raise InputError when the known targets of slides to predict cannot be compared
        with the model's predictions."""

    def to_config(self) -> dict:
        return {"name": self.name}


def _count(n: int, what: str) -> str:
    return f"{n} {what}{'s' * (n != 1)}"


class Classification(Task):
    name = "classification"
    columns = ("label",)
    summary_keys = metrics.TASK_KEYS["classification"]
    plot_name = metrics.TASK_PLOTS["classification"]

    def __init__(self, classes: list[str] | None = None) -> None:
        self.classes = list(classes or [])

    def parse(self, values: dict[str, str]) -> Target:
        return values["label"]

    def bind(self, labels: LabelTable) -> Task:
        return Classification(labels.classes)

    def check_cohort(self, labels: LabelTable, labels_path: Path, found: list[str], where: str,
                     held_out: frozenset[str], folds: int | None) -> None:
        classes = labels.classes
        if len(classes) < 2:
            raise InputError(labels_path, f"only one class ({classes[0]!r}); training needs at least two")
        counts = Counter(labels.rows[sid].target for sid in found if labels.rows[sid].split not in held_out)
        needed = max(MIN_SLIDES_PER_CLASS, folds or 0)
        short = [c for c in classes if counts[c] < needed]
        if short:
            per_class = ", ".join(f"{c}: {counts[c]}" for c in classes)
            purpose = f"{folds}-fold cross-validation" if folds and folds > MIN_SLIDES_PER_CLASS else "training"
            raise InputError(labels_path, f"{purpose} needs at least {needed} training slides of every class; found "
                                          f"in {where}: {per_class} ({len(found)} of its {len(labels.rows)} slides)")

    def outputs(self) -> list[str]:
        return self.classes

    def target(self, row: LabelRow) -> Target:
        return self.classes.index(row.target)

    def as_label(self, target: Target) -> Target:
        return self.classes[target]

    def strata(self, targets: list[Target], folds: int) -> np.ndarray:
        return np.asarray(targets, dtype=int)

    def class_weight(self, targets: list[Target]) -> torch.Tensor | None:
        counts = torch.bincount(torch.tensor(targets), minlength=len(self.classes)).float()
        return counts.sum() / (len(self.classes) * counts.clamp(min=1))

    def loss(self, model: Any, out: Any, targets: torch.Tensor, mask: torch.Tensor,
             weight: torch.Tensor | None) -> torch.Tensor:
        return model.loss(out, targets, mask, weight)

    def eval_loss(self, logits: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
        return F.cross_entropy(logits, targets, weight=weight, reduction="sum") / len(targets)

    def predict(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits, -1)

    def patch_values(self, scores: np.ndarray) -> np.ndarray:
        return scores  # already class probabilities

    def describe(self, predictions: np.ndarray) -> str:
        best = int(np.argmax(predictions))
        return f"predicted {self.classes[best]} (p={predictions[best]:.2f})"

    def metrics(self, targets: list[Target], predictions: np.ndarray) -> dict:
        return metrics.classification_metrics(np.asarray(targets, dtype=int), predictions)

    def plot(self, path: Path, targets: list[Target], predictions: np.ndarray, title: str) -> dict:
        return metrics.plot_roc(path, np.asarray(targets, dtype=int), predictions, self.classes, title)

    def prediction_columns(self) -> list[str]:
        return ["prediction"] + [f"prob_{c}" for c in self.classes]

    def prediction_values(self, predictions: np.ndarray) -> list[str]:
        return [self.classes[int(np.argmax(predictions))]] + [f"{p:.6f}" for p in predictions]

    def known_columns(self) -> list[str]:
        return ["label", "correct"]

    def known_values(self, target: Target | None, predictions: np.ndarray) -> list[str]:
        if target is None:
            return ["", ""]
        return [target, str(target == self.classes[int(np.argmax(predictions))]).lower()]

    def check_known(self, labels: LabelTable, labels_path: Path, slide_ids: Iterable[str]) -> None:
        """The labels of the slides to predict must be classes the model knows; otherwise every
        such slide would silently count as wrong."""
        unknown = Counter(labels.rows[sid].target for sid in slide_ids if sid in labels.rows
                          and labels.rows[sid].target is not None and labels.rows[sid].target not in self.classes)
        if unknown:
            listed = ", ".join(f"{label!r} ({_count(n, 'slide')})" for label, n in sorted(unknown.items()))
            raise InputError(labels_path, f"label(s) {listed} are not classes of the model ({', '.join(self.classes)}); "
                                          f"give the labels it was trained with, or predict without --labels")

    def to_config(self) -> dict:
        return {"name": self.name, "classes": self.classes}


def _number(text: str, column: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{column} {text!r} is not a number") from None
    if not math.isfinite(value):
        raise ValueError(f"{column} {text!r} is not a finite number")
    return value


def quantile_bins(values: np.ndarray, bins: int) -> np.ndarray:
    """Index (0 .. bins-1) of each value's quantile bin."""
    if bins <= 1:
        return np.zeros(len(values), dtype=int)
    edges = np.quantile(values, np.linspace(0, 1, bins + 1)[1:-1])
    return np.searchsorted(edges, values, side="right")


MAX_STRATA = 5


class Regression(Task):
    name = "regression"
    columns = ("label",)
    summary_keys = metrics.TASK_KEYS["regression"]
    plot_name = metrics.TASK_PLOTS["regression"]
    min_slides = 4

    def __init__(self, mean: float = 0.0, std: float = 1.0) -> None:
        self.mean, self.std = float(mean), float(std)
        self.contribution_scale = self.std  # the head predicts z-scores: contributions in the label's unit

    def parse(self, values: dict[str, str]) -> Target:
        try:
            return _number(values["label"], "label")
        except ValueError as exc:
            raise ValueError(f"{exc}; --task regression needs numeric labels (for classes, --task "
                             f"classification)") from None

    def check_cohort(self, labels: LabelTable, labels_path: Path, found: list[str], where: str,
                     held_out: frozenset[str], folds: int | None) -> None:
        values = [labels.rows[sid].target for sid in found if labels.rows[sid].split not in held_out]
        needed = max(self.min_slides, 2 * (folds or 0))
        if len(values) < needed:
            raise InputError(labels_path, f"regression needs at least {needed} training slides; found "
                                          f"{len(values)} in {where}")
        if np.ptp(values) == 0:
            raise InputError(labels_path, f"every training slide has the label {values[0]}: nothing to learn")

    def outputs(self) -> list[str]:
        return ["prediction"]

    def fitted(self, targets: list[Target]) -> Task:
        values = np.asarray(targets, dtype=float)
        return Regression(values.mean(), values.std() or 1.0)

    def strata(self, targets: list[Target], folds: int) -> np.ndarray:
        return quantile_bins(np.asarray(targets, dtype=float), max(1, min(MAX_STRATA, len(targets) // max(folds, 2))))

    def eval_loss(self, logits: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
        return F.huber_loss(logits[:, 0], (targets.to(logits.dtype) - self.mean) / self.std, delta=1.0)

    def predict(self, logits: torch.Tensor) -> torch.Tensor:
        return logits[:, :1] * self.std + self.mean

    def metrics(self, targets: list[Target], predictions: np.ndarray) -> dict:
        return metrics.regression_metrics(np.asarray(targets, dtype=float), predictions[:, 0])

    def plot(self, path: Path, targets: list[Target], predictions: np.ndarray, title: str) -> dict:
        return metrics.plot_scatter(path, np.asarray(targets, dtype=float), predictions[:, 0], title)

    def known_columns(self) -> list[str]:
        return ["label"]

    def known_values(self, target: Target | None, predictions: np.ndarray) -> list[str]:
        return ["" if target is None else f"{target:.6g}"]

    def to_config(self) -> dict:
        return {"name": self.name, "mean": self.mean, "std": self.std}


COX_BATCH = 32          # bags per Cox step at least: the partial likelihood compares bags within a batch
MIN_EVENTS_PER_BATCH = 2
HAZARD_BINS = 4         # nll: discrete-time intervals, at the quartiles of the training event times


class Survival(Task):
    name = "survival"
    columns = ("time", "event")
    summary_keys = metrics.TASK_KEYS["survival"]
    plot_name = metrics.TASK_PLOTS["survival"]

    def __init__(self, loss: str = "cox", edges: list[float] | None = None, horizons: list[float] | None = None) -> None:
        self.loss_name = loss
        self.edges = list(edges or [])        # nll: the inner bin edges
        self.horizons = list(horizons or [])  # the time-dependent AUC's times (none: event-time quartiles)

    def parse(self, values: dict[str, str]) -> Target:
        time = _number(values["time"], "time")
        if time < 0:
            raise ValueError(f"time {values['time']} is negative")
        if values["event"] not in ("0", "1"):
            raise ValueError(f"event {values['event']!r} is not 0 (censored) or 1 (event observed)")
        return (time, int(values["event"]))

    def check_cohort(self, labels: LabelTable, labels_path: Path, found: list[str], where: str,
                     held_out: frozenset[str], folds: int | None) -> None:
        rows = [labels.rows[sid].target for sid in found if labels.rows[sid].split not in held_out]
        events = sum(event for _, event in rows)
        needed = max(MIN_EVENTS_PER_BATCH, folds or 0)
        if events < needed:
            raise InputError(labels_path, f"survival training needs at least {needed} training slides with an event "
                                          f"(event = 1); found {events} among {len(rows)} in {where}")

    def outputs(self) -> list[str]:
        return ["risk"]

    @property
    def n_outputs(self) -> int:
        return HAZARD_BINS if self.loss_name == "nll" else 1

    def fitted(self, targets: list[Target]) -> Task:
        if self.loss_name != "nll":
            return self
        times = np.array([t for t, e in targets if e] or [t for t, _ in targets], dtype=float)
        return Survival("nll", np.quantile(times, np.linspace(0, 1, HAZARD_BINS + 1)[1:-1]).tolist(), self.horizons)

    def strata(self, targets: list[Target], folds: int) -> np.ndarray:
        """Event, crossed with early / late time where each cell keeps `folds` slides."""
        times = np.array([t for t, _ in targets])
        events = np.array([e for _, e in targets], dtype=int)
        crossed = events * 2 + (times > np.median(times))
        if np.bincount(crossed).min(initial=len(targets)) >= folds and len(np.unique(crossed)) == 4:
            return crossed
        return events

    def batches(self, targets: list[Target], batch_size: int, generator: torch.Generator) -> list[list[int]]:
        """nll: random batches. Cox: at least COX_BATCH bags per batch (the likelihood ranks each
        event against the bags of its batch still at risk, so a batch of one learns nothing),
        and the events dealt round-robin over the batches after shuffling, so every batch holds
        at least MIN_EVENTS_PER_BATCH events (fewer, larger batches when events are scarce)."""
        if self.loss_name == "nll":
            return super().batches(targets, batch_size, generator)
        order = torch.randperm(len(targets), generator=generator).tolist()
        with_event = [i for i in order if targets[i][1]]
        censored = [i for i in order if not targets[i][1]]
        count = max(1, min(math.ceil(len(order) / max(batch_size, COX_BATCH)),
                           len(with_event) // MIN_EVENTS_PER_BATCH))
        batches: list[list[int]] = [[] for _ in range(count)]
        for k, i in enumerate(with_event + censored):
            batches[k % count].append(i)
        return batches

    def eval_loss(self, logits: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
        time, event = targets[:, 0].float(), targets[:, 1].float()
        if self.loss_name == "cox":
            return cox_loss(logits[:, 0].float(), time, event)
        bins = torch.searchsorted(torch.tensor(self.edges, device=time.device), time.contiguous(), right=True)
        return discrete_time_nll(logits.float(), bins, event)

    def predict(self, logits: torch.Tensor) -> torch.Tensor:
        if self.loss_name == "cox":
            return logits[:, :1]
        survival = torch.cumprod(torch.sigmoid(-logits.float()), dim=1)  # S(bin k) = prod (1 - hazard)
        return -survival.sum(1, keepdim=True)  # fewer expected intervals survived = higher risk

    @staticmethod
    def _split(targets: list[Target]) -> tuple[np.ndarray, np.ndarray]:
        return np.array([t for t, _ in targets], dtype=float), np.array([e for _, e in targets], dtype=bool)

    def metrics(self, targets: list[Target], predictions: np.ndarray) -> dict:
        return metrics.survival_metrics(*self._split(targets), predictions[:, 0], tuple(self.horizons))

    def plot(self, path: Path, targets: list[Target], predictions: np.ndarray, title: str) -> dict:
        return metrics.plot_km(path, *self._split(targets), predictions[:, 0], title)

    def known_columns(self) -> list[str]:
        return ["time", "event"]

    def known_values(self, target: Target | None, predictions: np.ndarray) -> list[str]:
        return ["", ""] if target is None else [f"{target[0]:g}", str(target[1])]

    def to_config(self) -> dict:
        return {"name": self.name, "loss": self.loss_name, "edges": self.edges, "horizons": self.horizons}


def cox_loss(risk: torch.Tensor, time: torch.Tensor, event: torch.Tensor) -> torch.Tensor:
    """Negative Cox partial log-likelihood per event (Breslow's handling of tied times): each
    event's risk against the log-sum-exp of the risks of every bag still at risk at its time.
    Zero, with a gradient of zero, when the batch holds no event."""
    order = torch.argsort(time, descending=True)
    risk, time, event = risk[order], time[order], event[order]
    running = torch.logcumsumexp(risk, dim=0)
    _, group, counts = torch.unique_consecutive(time, return_inverse=True, return_counts=True)
    at_risk = running[torch.cumsum(counts, 0)[group] - 1]  # tied times share the whole tie's risk set
    return -((risk - at_risk) * event).sum() / event.sum().clamp(min=1)


def discrete_time_nll(logits: torch.Tensor, bins: torch.Tensor, event: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood of discrete-time hazards (logits (n, K), one per interval):
    an event in interval k survived the intervals before it and fell in k; a slide censored
    in interval k survived it."""
    log_survive = torch.cumsum(F.logsigmoid(-logits), dim=1)                     # log S(k)
    before = torch.cat([torch.zeros_like(log_survive[:, :1]), log_survive[:, :-1]], dim=1)
    k = bins[:, None]
    with_event = before.gather(1, k)[:, 0] + F.logsigmoid(logits).gather(1, k)[:, 0]
    censored = log_survive.gather(1, k)[:, 0]
    return -(event * with_event + (1 - event) * censored).mean()


TASKS: dict[str, type[Task]] = {"classification": Classification, "regression": Regression, "survival": Survival}
assert tuple(TASKS) == TASK_NAMES


def make_task(name: str, survival_loss: str = "cox", horizons: tuple[float, ...] = ()) -> Task:
    """The task `--task` names (not yet bound to labels or fitted; TrainOptions checked the names)."""
    return Survival(survival_loss, horizons=list(horizons)) if name == "survival" else TASKS[name]()


def task_from_config(config: dict) -> Task:
    """The fitted task a model file records (models without a record are classifiers)."""
    recorded = dict(config.get("task") or {"name": "classification", "classes": config.get("classes", [])})
    kind = TASKS[recorded.pop("name")]
    return kind(**recorded)

