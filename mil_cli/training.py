"""Train a MIL head on a feature store and a labels CSV: validation split, class-weighted loss,
early stopping on validation loss with the best weights restored, and honest metrics."""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import accuracy_score, balanced_accuracy_score, roc_auc_score
from torch import nn

from mil_cli import __version__
from mil_cli.console import warn
from mil_cli.devices import seed_everything
from mil_cli.errors import InputError, MilcliError
from mil_cli.labels import LabelTable, read_labels
from mil_cli.models import ModelConfig, build_model
from mil_cli.stores import FeatureSource

MODEL_FORMAT = "milcli-model"


@dataclass(frozen=True)
class TrainOptions:
    epochs: int = 100
    lr: float = 2e-4
    weight_decay: float = 1e-5
    patience: int = 10            # epochs without a better validation loss before stopping
    val_fraction: float = 0.2     # of the training slides (or patients), when no split column
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)


@dataclass
class Bag:
    slide_id: str
    features: torch.Tensor
    target: int
    group: str   # patient id, or the slide id when patients are unknown


@dataclass
class TrainResult:
    model: nn.Module
    checkpoint: dict
    metrics: dict
    missing: list[str]          # labelled slides absent from the store
    seconds: float


def load_bags(source: FeatureSource, labels: LabelTable, classes: list[str]) -> tuple[list[Bag], list[str]]:
    """Bags for every labelled slide in the store, and the labelled slide ids it lacks."""
    bags, missing = [], []
    expected_dim = None
    for slide_id, row in labels.rows.items():
        if slide_id not in source.slide_ids:
            missing.append(slide_id)
            continue
        data = source.load(slide_id)
        assert data.features is not None
        if len(data.features) == 0:
            warn(f"{slide_id}: bag has no patches; skipped")
            continue
        if expected_dim is None:
            expected_dim = data.features.shape[1]
        elif data.features.shape[1] != expected_dim:
            raise InputError(f"{source.path} [{slide_id}]", f"feature dim {data.features.shape[1]}, others have {expected_dim}")
        bags.append(Bag(slide_id, torch.from_numpy(data.features), classes.index(row.label), row.patient_id or slide_id))
    return bags, missing


def split_bags(bags: list[Bag], labels: LabelTable, val_fraction: float, seed: int) -> tuple[list[Bag], list[Bag], list[Bag]]:
    """(train, val, test). A `split` column is honoured; when it names no validation slides,
    a stratified random share of the training patients is held out, so no patient
    straddles train and validation."""
    fixed = {b.slide_id: labels.rows[b.slide_id].split for b in bags}
    test = [b for b in bags if fixed[b.slide_id] == "test"]
    val = [b for b in bags if fixed[b.slide_id] == "val"]
    pool = [b for b in bags if fixed[b.slide_id] in (None, "train")]
    if val:
        return pool, val, test
    groups: dict[str, int] = {}
    for bag in pool:
        groups.setdefault(bag.group, bag.target)
    rng = np.random.default_rng(seed)
    val_groups: set[str] = set()
    for target in sorted(set(groups.values())):
        names = sorted(name for name, t in groups.items() if t == target)
        if len(names) >= 2:
            count = max(1, round(val_fraction * len(names)))
            val_groups.update(rng.permutation(names)[:count].tolist())
    return ([b for b in pool if b.group not in val_groups], [b for b in pool if b.group in val_groups], test)


def class_weights(bags: list[Bag], n_classes: int) -> torch.Tensor:
    counts = torch.bincount(torch.tensor([b.target for b in bags]), minlength=n_classes).float()
    return counts.sum() / (n_classes * counts.clamp(min=1))


def evaluate(model: nn.Module, bags: list[Bag], loss_fn: nn.Module, device: torch.device) -> tuple[float, np.ndarray]:
    """Mean loss and (n_bags, C) probabilities, in eval mode."""
    if not bags:
        return float("nan"), np.zeros((0, 0))
    model.eval()
    losses, probs = [], []
    with torch.inference_mode():
        for bag in bags:
            logits, _ = model(bag.features.to(device))
            losses.append(float(loss_fn(logits[None], torch.tensor([bag.target], device=device))))
            probs.append(torch.softmax(logits, -1).cpu().numpy())
    return float(np.mean(losses)), np.stack(probs)


def classification_metrics(targets: np.ndarray, probs: np.ndarray) -> dict:
    """AUC (macro one-vs-rest when multi-class; NaN when only one class is present),
    balanced accuracy and accuracy."""
    if len(targets) == 0:
        return {}
    predicted = probs.argmax(1)
    metrics = {"n": int(len(targets)), "accuracy": float(accuracy_score(targets, predicted)),
               "balanced_accuracy": float(balanced_accuracy_score(targets, predicted)), "auc": float("nan")}
    if len(np.unique(targets)) >= 2:
        if probs.shape[1] == 2:
            metrics["auc"] = float(roc_auc_score(targets, probs[:, 1]))
        else:
            metrics["auc"] = float(roc_auc_score(targets, probs, multi_class="ovr", average="macro",
                                                 labels=list(range(probs.shape[1]))))
    return metrics


def train(features_path: Path, labels_path: Path, options: TrainOptions, device: torch.device) -> TrainResult:
    start = time.perf_counter()
    labels = read_labels(labels_path)
    classes = labels.classes
    if len(classes) < 2:
        raise InputError(labels_path, f"only one class ({classes[0]!r}); training needs at least two")
    source = FeatureSource(features_path)
    bags, missing = load_bags(source, labels, classes)
    if not bags:
        raise MilcliError(f"{labels_path}: none of its {len(labels.rows)} slides is in {features_path}")
    unlabelled = len(set(source.slide_ids) - set(labels.rows))
    if unlabelled:
        warn(f"{unlabelled} slide(s) in {features_path} have no label in {labels_path}; not used for training")
    train_bags, val_bags, test_bags = split_bags(bags, labels, options.val_fraction, options.seed)
    present = {classes[b.target] for b in train_bags}
    if len(present) < 2:
        raise InputError(labels_path, f"the training slides found in the store hold one class only ({', '.join(present)})")
    if not val_bags:
        warn(f"too few slides for a validation split; training {options.epochs} epochs without early stopping")

    seed_everything(options.seed)
    config = ModelConfig(**{**asdict(options.model), "in_dim": int(bags[0].features.shape[1]), "n_classes": len(classes)})
    model = build_model(config).to(device)
    optimiser = torch.optim.Adam(model.parameters(), lr=options.lr, weight_decay=options.weight_decay)
    loss_fn = nn.CrossEntropyLoss(weight=class_weights(train_bags, len(classes)).to(device))
    order_rng = torch.Generator().manual_seed(options.seed)

    best_loss, best_state, best_epoch, stale = float("inf"), copy.deepcopy(model.state_dict()), 0, 0
    history = []
    for epoch in range(1, options.epochs + 1):
        model.train()
        train_loss = 0.0
        for i in torch.randperm(len(train_bags), generator=order_rng).tolist():
            bag = train_bags[i]
            logits, _ = model(bag.features.to(device))
            loss = loss_fn(logits[None], torch.tensor([bag.target], device=device))
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            train_loss += float(loss.detach()) / len(train_bags)
        val_loss, _ = evaluate(model, val_bags, loss_fn, device)
        history.append({"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss})
        if not val_bags:
            best_state, best_epoch = copy.deepcopy(model.state_dict()), epoch
            continue
        if val_loss < best_loss - 1e-6:
            best_loss, best_state, best_epoch, stale = val_loss, copy.deepcopy(model.state_dict()), epoch, 0
        else:
            stale += 1
            if stale >= options.patience:
                break
    model.load_state_dict(best_state)

    metrics: dict = {"best_epoch": best_epoch, "epochs_run": len(history)}
    for name, subset in (("train", train_bags), ("val", val_bags), ("test", test_bags)):
        if subset:
            _, probs = evaluate(model, subset, loss_fn, device)
            metrics[name] = classification_metrics(np.array([b.target for b in subset]), probs)
    checkpoint = {
        "format": MODEL_FORMAT,
        "format_version": 1,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "config": {
            "milcli_version": __version__,
            "model": config.to_dict(),
            "classes": classes,
            "backbone": str(source.attrs.get("backbone", "unknown")),
            "feature_dim": config.in_dim,
            "training": {k: v for k, v in asdict(options).items() if k != "model"},
            "metrics": metrics,
            "history": history,
            "slides": {"train": [b.slide_id for b in train_bags], "val": [b.slide_id for b in val_bags],
                       "test": [b.slide_id for b in test_bags]},
            "features": str(features_path),
            "labels": str(labels_path),
        },
    }
    return TrainResult(model=model, checkpoint=checkpoint, metrics=metrics, missing=missing,
                       seconds=time.perf_counter() - start)


def save_checkpoint(checkpoint: dict, path: Path) -> None:
    """Write atomically (temp file, then rename) so a crash never leaves half a model."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(checkpoint, tmp)
    tmp.replace(path)
