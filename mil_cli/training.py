"""Train a MIL head on a feature store and a labels CSV: validation split, class-weighted loss,
early stopping on validation loss with the best weights restored, and honest metrics.

Steps take batches of bags padded to the batch's largest with a mask (not one bag per step),
and each training bag contributes a fresh random subset of at most `max_patches` patches per
epoch (instance dropout, and a bound on memory); evaluation always sees whole bags. All bags
are loaded once and kept in memory."""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mil_cli import __version__
from mil_cli.console import warn
from mil_cli.devices import keep_freed_memory, seed_everything, training_autocast
from mil_cli.errors import InputError, MilcliError
from mil_cli.labels import LabelTable, read_labels
from mil_cli.metrics import classification_metrics
from mil_cli.models import MILHead, ModelConfig, build_model
from mil_cli.stores import FeatureSource

MODEL_FORMAT = "milcli-model"


@dataclass(frozen=True)
class TrainOptions:
    epochs: int = 100
    lr: float = 5e-4              # 2e-4 (CLAM, one bag per step) scaled by sqrt(batch size 8)
    weight_decay: float = 1e-5
    patience: int = 10            # epochs without a better validation loss before stopping
    val_fraction: float = 0.2     # of the training slides (or patients), when no split column
    seed: int = 0
    batch_size: int = 8           # bags per optimiser step
    max_patches: int | None = 4096  # random patches per training bag and epoch; None: whole bags
    precision: str = "auto"       # auto: bf16 autocast where the device has fast bf16, else fp32
    model: ModelConfig = field(default_factory=ModelConfig)

    def __post_init__(self) -> None:
        if self.batch_size < 1 or (self.max_patches is not None and self.max_patches < 1):
            raise MilcliError("--batch-size and --max-patches must be at least 1")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise MilcliError(f"--precision {self.precision}: expected auto, fp32 or bf16")


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


def split_bags(bags: list[Bag], fixed: dict[str, str | None], val_fraction: float,
               seed: int) -> tuple[list[Bag], list[Bag], list[Bag]]:
    """(train, val, test). Fixed roles (the labels' split column, slide id -> role) are
    honoured; when they name no validation slides, a stratified random share of the training
    patients is held out, so no patient straddles train and validation."""
    test = [b for b in bags if fixed.get(b.slide_id) == "test"]
    val = [b for b in bags if fixed.get(b.slide_id) == "val"]
    pool = [b for b in bags if fixed.get(b.slide_id) in (None, "train")]
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


def collate(bags: list[Bag], device: torch.device, max_patches: int | None = None,
            generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, N, D) features padded with zeros to the largest bag, (B, N) mask, (B,) targets. With
    `max_patches`, a bag larger than that contributes a random subset of its patches."""
    chosen = []
    for bag in bags:
        features = bag.features
        if max_patches is not None and len(features) > max_patches:
            features = features[torch.randperm(len(features), generator=generator)[:max_patches]]
        chosen.append(features)
    longest = max(len(f) for f in chosen)
    x = torch.zeros(len(chosen), longest, chosen[0].shape[1])
    mask = torch.zeros(len(chosen), longest, dtype=torch.bool)
    for i, features in enumerate(chosen):
        x[i, : len(features)] = features
        mask[i, : len(features)] = True
    targets = torch.tensor([b.target for b in bags])
    return x.to(device, non_blocking=True), mask.to(device, non_blocking=True), targets.to(device, non_blocking=True)


EVAL_PATCH_BUDGET = 1 << 18  # padded patches per evaluation batch


def evaluation_batches(bags: list[Bag]) -> list[list[int]]:
    """Bag indices grouped by size, so evaluation pads little and stays within a memory budget."""
    order = sorted(range(len(bags)), key=lambda i: len(bags[i].features))
    batches: list[list[int]] = []
    for i in order:
        if batches and len(bags[i].features) * (len(batches[-1]) + 1) <= EVAL_PATCH_BUDGET:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def evaluate(model: MILHead, bags: list[Bag], device: torch.device, weight: torch.Tensor | None = None,
             precision: str = "fp32") -> tuple[float, np.ndarray]:
    """Mean loss and (n_bags, C) probabilities over whole bags, in eval mode."""
    if not bags:
        return float("nan"), np.zeros((0, 0))
    model.eval()
    probs = np.zeros((len(bags), model.config.n_classes))
    total_loss = 0.0
    with torch.inference_mode(), training_autocast(device, precision):
        for indices in evaluation_batches(bags):
            x, mask, targets = collate([bags[i] for i in indices], device)
            out = model(x, mask)
            logits = out.logits.float()
            total_loss += float(nn.functional.cross_entropy(logits, targets, weight=weight, reduction="sum"))
            probs[indices] = torch.softmax(logits, -1).cpu().numpy()
    return total_loss / len(bags), probs


@dataclass
class Fitted:
    model: MILHead
    config: ModelConfig
    history: list[dict]
    best_epoch: int


def fit(train_bags: list[Bag], val_bags: list[Bag], n_classes: int, options: TrainOptions,
        device: torch.device) -> Fitted:
    """Train a fresh head; early stopping on validation loss, best weights restored."""
    keep_freed_memory()
    seed_everything(options.seed)
    config = ModelConfig(**{**asdict(options.model), "in_dim": int(train_bags[0].features.shape[1]),
                            "n_classes": n_classes})
    model = build_model(config).to(device)
    optimiser = torch.optim.Adam(model.parameters(), lr=options.lr, weight_decay=options.weight_decay)
    weight = class_weights(train_bags, n_classes).to(device)
    generator = torch.Generator().manual_seed(options.seed)

    best_loss, best_state, best_epoch, stale = float("inf"), copy.deepcopy(model.state_dict()), 0, 0
    history = []
    for epoch in range(1, options.epochs + 1):
        model.train()
        train_loss = 0.0
        order = torch.randperm(len(train_bags), generator=generator).tolist()
        for start in range(0, len(order), options.batch_size):
            batch = [train_bags[i] for i in order[start:start + options.batch_size]]
            x, mask, targets = collate(batch, device, options.max_patches, generator)
            with training_autocast(device, options.precision):
                out = model(x, mask)
                loss = model.loss(out, targets, mask, weight)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            train_loss += float(loss.detach()) * len(batch) / len(train_bags)
        val_loss, _ = evaluate(model, val_bags, device, weight, options.precision)
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
    return Fitted(model, config, history, best_epoch)


@dataclass
class LabelledBags:
    """Labelled bags from a feature store, checked for what training needs."""

    bags: list[Bag]
    classes: list[str]
    labels: LabelTable
    backbone: str
    missing: list[str]


def load_dataset(features_path: Path, labels_path: Path) -> LabelledBags:
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
    return LabelledBags(bags, classes, labels, str(source.attrs.get("backbone", "unknown")), missing)


def require_two_classes(bags: list[Bag], classes: list[str], where: Path) -> None:
    present = {classes[b.target] for b in bags}
    if len(present) < 2:
        raise InputError(where, f"the training slides found in the store hold one class only ({', '.join(present)})")


def make_checkpoint(fitted: Fitted, data: LabelledBags, options: TrainOptions, metrics: dict,
                    roles: dict[str, list[str]], features_path: Path, labels_path: Path) -> dict:
    """The model file's contents: tensors and plain data only (loads with weights_only=True)."""
    return {
        "format": MODEL_FORMAT,
        "format_version": 1,
        "state_dict": {k: v.detach().cpu() for k, v in fitted.model.state_dict().items()},
        "config": {
            "milcli_version": __version__,
            "model": fitted.config.to_dict(),
            "classes": data.classes,
            "backbone": data.backbone,
            "feature_dim": fitted.config.in_dim,
            "training": {k: v for k, v in asdict(options).items() if k != "model"},
            "metrics": metrics,
            "history": fitted.history,
            "slides": roles,
            "slide_labels": {sid: data.labels.rows[sid].label for sid in roles.get("train", [])},
            "features": str(features_path),
            "labels": str(labels_path),
        },
    }


def subset_metrics(model: MILHead, subsets: dict[str, list[Bag]], device: torch.device,
                   precision: str) -> dict:
    metrics = {}
    for name, subset in subsets.items():
        if subset:
            _, probs = evaluate(model, subset, device, precision=precision)
            metrics[name] = classification_metrics(np.array([b.target for b in subset]), probs)
    return metrics


def train(features_path: Path, labels_path: Path, options: TrainOptions, device: torch.device) -> TrainResult:
    start = time.perf_counter()
    data = load_dataset(features_path, labels_path)
    fixed = {slide_id: row.split for slide_id, row in data.labels.rows.items()}
    train_bags, val_bags, test_bags = split_bags(data.bags, fixed, options.val_fraction, options.seed)
    require_two_classes(train_bags, data.classes, labels_path)
    if not val_bags:
        warn(f"too few slides for a validation split; training {options.epochs} epochs without early stopping")
    fitted = fit(train_bags, val_bags, len(data.classes), options, device)
    metrics: dict = {"best_epoch": fitted.best_epoch, "epochs_run": len(fitted.history)}
    metrics |= subset_metrics(fitted.model, {"train": train_bags, "val": val_bags, "test": test_bags}, device,
                              options.precision)
    roles = {"train": [b.slide_id for b in train_bags], "val": [b.slide_id for b in val_bags],
             "test": [b.slide_id for b in test_bags]}
    checkpoint = make_checkpoint(fitted, data, options, metrics, roles, features_path, labels_path)
    return TrainResult(model=fitted.model, checkpoint=checkpoint, metrics=metrics, missing=data.missing,
                       seconds=time.perf_counter() - start)


def save_checkpoint(checkpoint: dict, path: Path) -> None:
    """Write atomically (temp file, then rename) so a crash never leaves half a model."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(checkpoint, tmp)
    tmp.replace(path)
