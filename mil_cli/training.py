"""Train a MIL head on a feature store and a labels CSV: a seed ensemble of heads on
standardised features, class-weighted loss, and honest metrics (evaluated in fp32, as predict).

The small-cohort rule: without validation slides (the default) every training slide trains for
exactly `epochs` epochs under a cosine learning-rate decay; with them (the split column, or
`val_fraction`) each head stops early on the validation loss with its best weights restored.
Steps take `batch_size` bags padded to the batch's largest with a mask, and each training bag
contributes a fresh random subset of at most `max_patches` patches per epoch (instance
dropout, and a bound on memory); evaluation always sees whole bags. All bags are loaded once
and kept in memory."""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.model_selection import StratifiedGroupKFold
from torch import nn

from mil_cli import __version__
from mil_cli.console import warn
from mil_cli.devices import FLOAT16_MAX, keep_freed_memory, seed_everything, training_autocast
from mil_cli.errors import InputError
from mil_cli.labels import LabelTable, check_cohort, check_patients, read_labels
from mil_cli.metrics import auc
from mil_cli.config import AUTO_ARCHITECTURE, DEFAULT_INSTANCE_LOSS, FAMILY_JOIN, ModelConfig, TrainOptions
from mil_cli.models import MODELS, MILHead, SeedEnsemble, build_model, check_architecture
from mil_cli.stores import FeatureSource
from mil_cli.tasks import Task, make_task

MODEL_FORMAT = "milcli-model"
# 2: a seed ensemble of heads holding their feature scaling; 3: and each head's recipe, [share, standardised];
# 4: recipes name their scaling, [share, "z"]; 5: and their head family, [share, "z", "abmil"] (--model auto mixes);
# 6: and their weight in the ensemble's mean, [share, "z", "abmil", 0.05] (auto weighs the families)
MODEL_FORMAT_VERSION = 6
READABLE_FORMAT_VERSIONS = (2, 3, 4, 5, 6)


@dataclass
class Bag:
    bag_id: str             # the slide's id, or the patient's with --bag-by patient
    features: torch.Tensor
    target: Any             # the task's target: a class index, a number, (time, event)
    group: str              # patient id, or the slide id when patients are unknown: never split across folds
    split: str | None = None  # the labels' split column
    parts: list[tuple[str, int]] = field(default_factory=list)  # (slide id, patches) in the order concatenated


@dataclass
class TrainResult:
    model: nn.Module
    checkpoint: dict
    metrics: dict
    missing: list[str]          # labelled slides absent from the store
    seconds: float


def load_bags(source: FeatureSource, labels: LabelTable, task: Task, bag_by: str = "slide") -> list[Bag]:
    """Bags for every labelled slide in the store: one per slide, or with `bag_by` 'patient'
    one per patient holding its slides' patches one after the other (their rows in the labels
    must agree, labels.check_patients)."""
    groups = labels.patients() if bag_by == "patient" else {sid: [sid] for sid in labels.rows}
    bags = []
    expected_dim = None
    for bag_id, slide_ids in groups.items():
        parts, arrays = [], []
        for slide_id in slide_ids:
            if slide_id not in source:
                continue
            data = source.load(slide_id)
            assert data.features is not None
            if len(data.features) == 0:
                warn(f"{slide_id}: bag has no patches; skipped")
                continue
            if expected_dim is None:
                expected_dim = data.features.shape[1]
            elif data.features.shape[1] != expected_dim:
                raise InputError(f"{source.path} [{slide_id}]", f"feature dim {data.features.shape[1]}, others have "
                                                                f"{expected_dim}")
            parts.append((slide_id, len(data.features)))
            arrays.append(torch.from_numpy(data.features))
        if parts:
            row = labels.rows[parts[0][0]]
            bags.append(Bag(bag_id, arrays[0] if len(arrays) == 1 else torch.cat(arrays), task.target(row),
                            row.patient_id or bag_id, row.split, parts))
    return bags


def split_bags(bags: list[Bag], task: Task, val_fraction: float, seed: int,
               fixed: bool = True) -> tuple[list[Bag], list[Bag], list[Bag]]:
    """(train, val, test). Fixed roles (the labels' split column) are honoured unless `fixed`
    is False; when they name no validation bags and `val_fraction` > 0, a share of the
    training patients, stratified as the task stratifies, is held out, so no patient straddles
    train and validation; with `val_fraction` 0 there is no validation set."""
    role = (lambda bag: bag.split) if fixed else (lambda bag: None)
    test = [b for b in bags if role(b) == "test"]
    val = [b for b in bags if role(b) == "val"]
    pool = [b for b in bags if role(b) in (None, "train")]
    if val or val_fraction <= 0:
        return pool, val, test
    strata = task.strata([b.target for b in pool], 2)
    groups: dict[str, int] = {}
    for bag, stratum in zip(pool, strata):
        groups.setdefault(bag.group, int(stratum))
    rng = np.random.default_rng(seed)
    val_groups: set[str] = set()
    for stratum in sorted(set(groups.values())):
        names = sorted(name for name, s in groups.items() if s == stratum)
        if len(names) >= 2:
            count = max(1, round(val_fraction * len(names)))
            val_groups.update(rng.permutation(names)[:count].tolist())
    return ([b for b in pool if b.group not in val_groups], [b for b in pool if b.group in val_groups], test)


def collate(bags: list[Bag], device: torch.device, max_patches: int | None = None,
            generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, N, D) fp32 features padded with zeros to the largest bag, (B, N) mask, (B,) targets,
    all on `device`. With `max_patches`, a bag larger than that contributes a random subset of
    its patches. Bags already on the device (on_device) are padded there: no host copy, no
    host-side padding of a large tensor."""
    chosen = []
    for bag in bags:
        features = bag.features
        if max_patches is not None and len(features) > max_patches:
            features = features[torch.randperm(len(features), generator=generator)[:max_patches].to(features.device)]
        chosen.append(features.to(device, non_blocking=True))
    x = nn.utils.rnn.pad_sequence(chosen, batch_first=True).float()
    lengths = torch.tensor([len(f) for f in chosen]).to(device, non_blocking=True)
    mask = torch.arange(x.shape[1], device=device)[None] < lengths[:, None]
    targets = torch.tensor([b.target for b in bags])  # (B,) classes or values, (B, 2) time and event
    return x, mask, targets.to(device, non_blocking=True)


DEVICE_SHARE = 0.5  # of a GPU's free memory that the training bags may take


def device_dtype(elements: int, largest: float, free_bytes: int) -> torch.dtype | None:
    """The type training bags are kept in on a GPU with `free_bytes` free: fp16 (as the feature
    store holds them, half of fp32) when their values fit it, else fp32; None when they do not
    fit in DEVICE_SHARE of the free memory, and stay on the host."""
    dtype = torch.float16 if largest < FLOAT16_MAX else torch.float32
    size = 2 if dtype == torch.float16 else 4
    return dtype if elements * size <= DEVICE_SHARE * free_bytes else None


def on_device(bags: list[Bag], device: torch.device) -> list[Bag]:
    """The bags with their features moved to a GPU once, when they fit (device_dtype): training
    steps are then padded on the device with no copy from the host, which otherwise bounds a
    GPU's training speed. Steps and evaluation still compute in fp32. On the CPU, as they are."""
    if device.type != "cuda" or not bags or all(b.features.device == device for b in bags):
        return bags
    largest = max(float(b.features.abs().max()) for b in bags)
    dtype = device_dtype(sum(b.features.numel() for b in bags), largest, torch.cuda.mem_get_info(device)[0])
    if dtype is None:
        return bags
    return [replace(b, features=b.features.to(device, dtype)) for b in bags]


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


def evaluate(model: MILHead | SeedEnsemble, bags: list[Bag], device: torch.device, task: Task,
             weight: torch.Tensor | None = None) -> tuple[float, np.ndarray]:
    """The task's mean loss and (n_bags, outputs) predictions (class probabilities, values,
    risks) over whole bags, in eval mode and always in fp32, as `predict` runs, so stored
    metrics are what predict gives on the same slides."""
    if not bags:
        return float("nan"), np.zeros((0, 0))
    model.eval()
    logits = torch.zeros(len(bags), model.config.n_classes)
    with torch.inference_mode():
        for indices in evaluation_batches(bags):
            x, mask, _ = collate([bags[i] for i in indices], device)
            logits[indices] = model(x, mask).logits.float().cpu()
        targets = torch.tensor([b.target for b in bags])
        loss = float(task.eval_loss(logits, targets, None if weight is None else weight.cpu()))
    return loss, task.predict(logits).numpy()


def feature_statistics(bags: list[Bag], scaling: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-dimension mean over every patch of `bags` (float64 sums, one bag at a time) and
    the divisor of `scaling` (config.SCALINGS): each dimension's standard deviation (z; a
    constant dimension gets 1 so it stays finite), or for 'pooled' one standard deviation
    pooled over all dimensions (the root of their mean variance; 1 if all are constant) in
    every place."""
    total = torch.zeros(bags[0].features.shape[1], dtype=torch.float64, device=bags[0].features.device)
    squares, count = torch.zeros_like(total), 0
    for bag in bags:
        features = bag.features.double()
        total += features.sum(0)
        squares += features.square().sum(0)
        count += len(features)
    mean = total / count
    variance = (squares / count - mean.square()).clamp(min=0)
    if scaling == "pooled":
        pooled = float(variance.mean().sqrt())
        std = torch.full_like(mean, pooled if pooled > 1e-6 * float(mean.abs().max().clamp(min=1)) else 1.0)
    else:
        std = variance.sqrt()
        std[std <= 1e-6 * mean.abs().clamp(min=1)] = 1.0
    return mean.float().cpu(), std.float().cpu()


def learning_rate_schedule(optimiser: torch.optim.Optimizer, options: TrainOptions) -> torch.optim.lr_scheduler.LRScheduler:
    """Per epoch: constant, or cosine from --lr down to 1 % of it at the last epoch."""
    if options.lr_schedule == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimiser, lambda epoch: 1.0)
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=options.epochs, eta_min=options.lr / 100)


Recipe = tuple[float, str]  # (patch-classifier share, feature scaling: one of config.SCALINGS) of a member head


@dataclass
class Fitted:
    model: SeedEnsemble
    config: ModelConfig
    histories: list[list[dict]]  # per member: epoch, train_loss, val_loss
    best_epochs: list[int]       # per member: the epoch whose weights were kept
    recipes: list[Recipe]        # per member: its patch-classifier share and feature scaling
    task: Task                   # fitted to the training targets (a regression's scale, survival bins)
    records: list[dict]          # per member: what its head's last step recorded (protomil: its prototypes' origins)
    choice: dict = field(default_factory=dict)  # --model auto: the family chosen and why (choose_architecture)
    architectures: list[str] = field(default_factory=list)  # per member: its head family (models.MODELS)
    weights: list[float] = field(default_factory=list)  # per member: its weight in the ensemble's mean (sum 1)


MEMBER_SEED_STEP = 100_003  # member m of a recipe trains from seed + m * this (member 0 from the seed itself)

# abmil recipes left to milcli: `ensemble` heads are trained with each, and all are averaged
RECIPES: tuple[Recipe, ...] = ((DEFAULT_INSTANCE_LOSS, "z"), (0.0, "none"))
RECIPE_ENSEMBLE_MAX_BAGS = 300  # larger cohorts train the first recipe only (half the time)


def recipe_name(recipe: Recipe) -> str:
    """'0.5 z', '0.0 none': how metrics.json names a recipe."""
    share, scaling = recipe
    return f"{share} {scaling}"


def ensemble_recipes(options: TrainOptions, task: Task, n_bags: int) -> list[Recipe]:
    """The recipes the ensemble's heads train with, `options.ensemble` heads each. Left to
    milcli, abmil heads on up to RECIPE_ENSEMBLE_MAX_BAGS bags take both RECIPES: share 0.5
    on z-scored features, and share 0 on raw features. Why: the patch classifier helps on
    low-dimensional or strong-signal features but overfits a few dozen bags of 1,000-d
    features with a weak signal; standardising is what descriptors of wildly different
    ranges need, yet raw features did better on weak 1,000-d rows. Which case a cohort is
    cannot be told from its shape, and choosing by inner cross-validation on a few dozen bags
    picked by noise. The two recipes err differently: their average matched or beat that
    choice on all 6 panel rows measured (AUC +0.02 to +0.05 on 4, level on 2), and beat the
    average of three recipes (share 0 standardised too) in accuracy on 4 of 6 at two thirds
    of its cost (README). Pooled scaling in either recipe lost to these two on the panel
    (README: it fails the large-range rows in the first recipe, the 1,024-d rows in the second).
    With `--standardise` set, the two shares on that scaling; with `--instance-loss` set, that
    share (z-scored unless told otherwise); other heads and tasks, the first recipe's scaling."""
    share, scaling = options.model.instance_loss, options.standardise
    check_architecture(options.model.architecture, task.name)
    if share is not None or not MODELS[options.model.architecture].trains_patch_classifier(task.name):
        candidates = [(DEFAULT_INSTANCE_LOSS if share is None else share, scaling or RECIPES[0][1])]
    elif scaling is not None:
        candidates = [(DEFAULT_INSTANCE_LOSS, scaling), (0.0, scaling)]
    else:
        candidates = list(RECIPES)
    if n_bags > RECIPE_ENSEMBLE_MAX_BAGS:
        candidates = candidates[:1]
    return [recipe for recipe in candidates for _ in range(options.ensemble)]


def fit(train_bags: list[Bag], val_bags: list[Bag], task: Task, options: TrainOptions,
        device: torch.device) -> Fitted:
    """Train `options.ensemble` fresh heads from different seeds for each of the ensemble's
    recipes (ensemble_recipes) and join them. A mix of head families (`abmil+kme`) trains each
    family's members (member_plan), each family weighing the same; --model auto first chooses
    the families and their weights (choose_architecture)."""
    keep_freed_memory()
    train_bags = on_device(train_bags, device)
    task = task.fitted([b.target for b in train_bags])
    choice, name = {}, options.model.architecture
    if name == AUTO_ARCHITECTURE:
        choice = choose_architecture(train_bags, task, options, device)
        name = choice["chosen"]
    families = name.split(FAMILY_JOIN)
    plan = member_plan(options, task, len(train_bags), families)
    family_weights = ({"abmil": 1 - choice["kme_weight"], "kme": choice["kme_weight"]} if "kme_weight" in choice
                      else dict.fromkeys(families, 1 / len(families)))
    members_of = {family: sum(1 for f, _, _ in plan if f == family) for family in families}
    weights = [family_weights[family] / members_of[family] for family, _, _ in plan]
    config = ModelConfig(**{**asdict(options.model), "architecture": name,
                            "in_dim": int(train_bags[0].features.shape[1]), "n_classes": task.n_outputs,
                            "task": task.name})
    scalings = {scaling for _, (_, scaling), _ in plan} - {"none"}
    statistics = {scaling: feature_statistics(train_bags, scaling) for scaling in scalings}
    if val_bags and all(MODELS[family].closed_form for family in families):
        warn(f"--model {config.architecture} is fitted in closed form, without early stopping: "
             f"the {len(val_bags)} validation bag(s) only get scored")
    members, histories, best_epochs, records = [], [], [], []
    for architecture, (share, scaling), index in plan:
        clip = options.clip if scaling == "z" else float("inf")
        head, history, best_epoch, record = fit_head(
            train_bags, val_bags, replace(config, architecture=architecture, instance_loss=share), task,
            (*statistics[scaling], clip) if scaling in statistics else None,
            replace(options, seed=options.seed + index * MEMBER_SEED_STEP), device)
        members.append(head)
        histories.append(history)
        best_epochs.append(best_epoch)
        records.append(record)
    return Fitted(SeedEnsemble(members, weights).eval(), config, histories, best_epochs,
                  [recipe for _, recipe, _ in plan], task, records, choice,
                  [architecture for architecture, _, _ in plan], weights)


def member_plan(options: TrainOptions, task: Task, n_bags: int, families: list[str]) -> list[tuple[str, Recipe, int]]:
    """(head family, recipe, seed index) of each member: each family's ensemble_recipes, member
    m of a family training from seed index m % its heads per recipe. Each family trains as
    many heads as the one with most (kme, one recipe, trains 2 x --ensemble heads beside
    abmil's two), so a family's weight is spread over as many seeds as the other's."""
    recipes = {family: ensemble_recipes(with_family(options, family), task, n_bags) for family in families}
    heads = max(len(r) for r in recipes.values())
    plan = []
    for family, family_recipes in recipes.items():
        per_recipe = options.ensemble * heads // len(family_recipes)
        if per_recipe != options.ensemble:
            family_recipes = ensemble_recipes(replace(with_family(options, family), ensemble=per_recipe), task, n_bags)
        plan += [(family, recipe, m % per_recipe) for m, recipe in enumerate(family_recipes)]
    return plan


def with_family(options: TrainOptions, family: str) -> TrainOptions:
    return replace(options, model=replace(options.model, architecture=family))


AUTO_FAMILIES = ("abmil", "kme")  # --model auto: abmil, or the two mixed (AUTO_MIX) at one of AUTO_KME_WEIGHTS
AUTO_MIX = FAMILY_JOIN.join(AUTO_FAMILIES)
AUTO_FOLDS = 3
AUTO_KME_WEIGHTS = (0.0, 0.25, 0.5, 0.75)  # kme's share of the ensemble's mean that auto chooses from: never all
AUTO_MIN_AUC = 0.7  # the inner AUC kme must reach alone to be blended in at all


def choose_architecture(train_bags: list[Bag], task: Task, options: TrainOptions, device: torch.device) -> dict:
    """--model auto: from an inner AUTO_FOLDS-fold cross-validation of the training bags (one
    head per recipe of each family, so the estimate costs about 40 % of abmil's ensemble), the
    weight of kme in a blend with abmil (AUTO_KME_WEIGHTS, 0 = abmil alone) whose out-of-fold
    probabilities score the lowest Brier score; where kme's own inner AUC is below
    AUTO_MIN_AUC, abmil alone. Why: on descriptor bags (musk1, musk2, elephant, ucsb-breast,
    protein) blends beat abmil's ensemble, while wherever a few patches carry the label kme
    alone lost by 0.1-0.4 AUC; the Brier score (a proper score: calibration and ranking) tells
    these apart where AUC gates at a bootstrap confidence missed the blends on elephant and
    ucsb-breast. The floor: a quarter of a kme that learns nothing still lowers the Brier score
    of an overconfident abmil by pulling it towards 0.5 (it cost key-1536d-w20 0.015
    accuracy). Never kme alone: on 48 bags its inner AUC passed the floor by chance and kme
    alone cost a fold of key-1024d-w10 what a quarter of abmil kept (README,
    benchmarks/family_mix.py). Classification on up to RECIPE_ENSEMBLE_MAX_BAGS bags with
    AUTO_FOLDS patients of each class; otherwise abmil.
    Returns {"chosen": name, "kme_weight": w, "inner_brier": {w: score}, "inner_auc": {w: AUC}}
    or {"chosen": "abmil", "reason": ...}."""
    targets = np.array([b.target for b in train_bags])
    default = AUTO_FAMILIES[0]
    if task.name != "classification":
        return {"chosen": default, "reason": f"kme does not learn {task.name}"}
    if len(train_bags) > RECIPE_ENSEMBLE_MAX_BAGS:
        return {"chosen": default, "reason": f"more than {RECIPE_ENSEMBLE_MAX_BAGS} training bags"}
    if min(len({b.group for b in train_bags if b.target == c}) for c in range(task.n_outputs)) < AUTO_FOLDS:
        return {"chosen": default, "reason": f"a class has fewer than {AUTO_FOLDS} patients"}
    return choose_from_inner(targets, inner_predictions(train_bags, task, options, device, AUTO_FAMILIES))


def choose_from_inner(targets: np.ndarray, predictions: dict[str, np.ndarray]) -> dict:
    """choose_architecture's rule on each family's inner out-of-fold class probabilities."""
    abmil, kme = (predictions[family] for family in AUTO_FAMILIES)
    blends = {w: (1 - w) * abmil + w * kme for w in (*AUTO_KME_WEIGHTS, 1.0)}  # and kme alone: the floor's AUC
    onehot = np.eye(abmil.shape[1])[targets]
    brier = {w: float(((p - onehot) ** 2).sum(1).mean()) for w, p in blends.items()}
    aucs = {w: auc(targets, p) for w, p in blends.items()}
    allowed = AUTO_KME_WEIGHTS if aucs[1.0] >= AUTO_MIN_AUC else (0.0,)
    weight = min(allowed, key=lambda w: (brier[w], w))  # a tie goes to less kme
    chosen = AUTO_MIX if weight else AUTO_FAMILIES[0]
    return {"chosen": chosen, "kme_weight": weight, "inner_brier": {f"{w:g}": b for w, b in brier.items()},
            "inner_auc": {f"{w:g}": a for w, a in aucs.items()}}


def inner_predictions(train_bags: list[Bag], task: Task, options: TrainOptions, device: torch.device,
                      families: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Each family's out-of-fold class probabilities (bags, classes) over an inner
    AUTO_FOLDS-fold cross-validation of `train_bags`, one head per recipe."""
    folds = group_folds(train_bags, AUTO_FOLDS, options.seed, task)
    predictions = {}
    for family in families:
        family_options = replace(with_family(options, family), ensemble=1)
        predictions[family] = np.zeros((len(train_bags), task.n_outputs))
        for inner_train, inner_test in folds:
            fitted = fit([train_bags[i] for i in inner_train], [], task, family_options, device)
            predictions[family][inner_test] = evaluate(fitted.model, [train_bags[i] for i in inner_test], device,
                                                       fitted.task)[1]
    return predictions


def group_folds(bags: list[Bag], folds: int, seed: int, task: Task) -> list[tuple[list[int], list[int]]]:
    """(training, test) bag indices per fold: stratified as the task stratifies (classes,
    quantile bins of a value, event and time), patients kept together."""
    strata = task.strata([b.target for b in bags], folds)
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    return [(train.tolist(), test.tolist())
            for train, test in splitter.split(np.zeros(len(bags)), strata, [b.group for b in bags])]


def fit_head(train_bags: list[Bag], val_bags: list[Bag], config: ModelConfig, task: Task,
             scaling: tuple[torch.Tensor, torch.Tensor, float] | None, options: TrainOptions,
             device: torch.device) -> tuple[MILHead, list[dict], int, dict]:
    """One head: `options.epochs` epochs, or early stopping on the validation loss (best
    weights restored) when there are validation bags; then the head's own last step
    (protomil projects its prototypes onto training patches and refits its last layer);
    closed-form heads (kme) are fitted at once instead, with an empty history and epoch 0.
    Returns it, its history, the epoch kept and what that last step records for the model file."""
    seed_everything(options.seed)
    model = build_model(config)
    if scaling is not None:  # (mean, divisor, clip): raw features when None
        model.set_standardisation(*scaling)
    model = model.to(device)
    if model.closed_form:  # fitted at once on every training bag: no epochs, no early stopping
        model.fit_closed_form(train_bags, loss_weight(task, train_bags, options, device))
        return model.eval(), [], 0, {}
    history, best_epoch = train_epochs(model, list(model.parameters()), train_bags, val_bags, task, options, device)

    def refit(parameters: list[nn.Parameter], epochs: int) -> None:
        """Train only `parameters` (the rest frozen) for `epochs` more epochs on the training bags."""
        trained = {id(p) for p in parameters}
        frozen = [p for p in model.parameters() if p.requires_grad and id(p) not in trained]
        for p in frozen:
            p.requires_grad_(False)
        try:
            train_epochs(model, parameters, train_bags, [], task, replace(options, epochs=epochs), device)
        finally:
            for p in frozen:
                p.requires_grad_(True)

    record = model.after_training(train_bags, refit)
    return model.eval(), history, best_epoch, record


def loss_weight(task: Task, train_bags: list[Bag], options: TrainOptions, device: torch.device) -> torch.Tensor | None:
    """The per-class loss weights (classification with --unbalanced unset), else None."""
    weight = task.class_weight([b.target for b in train_bags]) if options.balance_classes else None
    return None if weight is None else weight.to(device)


def train_epochs(model: MILHead, parameters: list[nn.Parameter], train_bags: list[Bag], val_bags: list[Bag],
                 task: Task, options: TrainOptions, device: torch.device) -> tuple[list[dict], int]:
    """Adam on `parameters` for `options.epochs` epochs, or early stopping on the validation
    loss (best weights restored) when there are validation bags. Returns the history and the
    epoch kept."""
    optimiser = torch.optim.Adam(parameters, lr=options.lr, weight_decay=options.weight_decay,
                                 fused=True)  # one kernel for the whole update: tiny heads are overhead-bound
    scheduler = learning_rate_schedule(optimiser, options)
    targets = [b.target for b in train_bags]
    weight = loss_weight(task, train_bags, options, device)
    generator = torch.Generator().manual_seed(options.seed)

    best_loss, best_state, best_epoch, stale = float("inf"), None, options.epochs, 0
    history = []
    for epoch in range(1, options.epochs + 1):
        model.train()
        train_loss = torch.zeros((), device=device)  # summed on the device: reading it each step would wait for the GPU
        for indices in task.batches(targets, options.batch_size, generator):
            batch = [train_bags[i] for i in indices]
            x, mask, batch_targets = collate(batch, device, options.max_patches, generator)
            with training_autocast(device, options.precision):
                out = model(x, mask)
                loss = task.loss(model, out, batch_targets, mask, weight)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            train_loss += loss.detach().float() * (len(batch) / len(train_bags))
        scheduler.step()
        val_loss, _ = evaluate(model, val_bags, device, task, weight)
        history.append({"epoch": epoch, "train_loss": float(train_loss), "val_loss": val_loss})
        if not val_bags:
            continue
        if val_loss < best_loss - 1e-6:
            best_loss, best_state, best_epoch, stale = val_loss, copy.deepcopy(model.state_dict()), epoch, 0
        else:
            stale += 1
            if stale >= options.patience:
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    return history, best_epoch


def fit_pool(pool: list[Bag], task: Task, options: TrainOptions,
             device: torch.device) -> tuple[Fitted, list[Bag], list[Bag]]:
    """The training policy on a pool of training bags (their split column set aside): with
    `val_fraction` > 0 a stratified, patient-grouped share is held out for early stopping; by
    default (0) every bag trains for exactly `epochs` epochs. Returns the fitted head and the
    (train, validation) bags."""
    train_bags, val_bags, _ = split_bags(pool, task, options.val_fraction, options.seed, fixed=False)
    return fit(train_bags, val_bags, task, options, device), train_bags, val_bags


@dataclass
class LabelledBags:
    """Labelled bags from a feature store, checked for what training needs."""

    bags: list[Bag]
    task: Task          # bound to the labels (classification: its classes), not yet fitted
    labels: LabelTable
    backbone: str
    missing: list[str]


def load_dataset(features_path: Path, labels_path: Path, options: TrainOptions,
                 held_out: frozenset[str] = frozenset({"val", "test"}), folds: int | None = None) -> LabelledBags:
    """The labelled bags in the store for the options' task and bagging, after checking that
    they can train (labels.check_cohort, labels.check_patients)."""
    task = make_task(options.task, options.survival_loss, options.horizons)
    labels = read_labels(labels_path, task)
    if options.bag_by == "patient":
        check_patients(labels, labels_path)
    source = FeatureSource(features_path)
    missing = check_cohort(labels, labels_path, task, source.slide_ids, str(features_path), held_out, folds)
    task = task.bind(labels)
    bags = load_bags(source, labels, task, options.bag_by)
    unlabelled = len(set(source.slide_ids) - set(labels.rows))
    if unlabelled:
        warn(f"{unlabelled} slide(s) in {features_path} have no label in {labels_path}; not used for training")
    return LabelledBags(bags, task, labels, str(source.attrs.get("backbone", "unknown")), missing)


def make_checkpoint(fitted: Fitted, data: LabelledBags, options: TrainOptions, metrics: dict,
                    roles: dict[str, list[Bag]], features_path: Path, labels_path: Path) -> dict:
    """The model file's contents: tensors and plain data only (loads with weights_only=True).
    `roles` are the bags each role held; the file records their ids (patient ids with
    --bag-by patient) and each training slide's label."""
    return {
        "format": MODEL_FORMAT,
        "format_version": MODEL_FORMAT_VERSION,
        "state_dict": {k: v.detach().cpu() for k, v in fitted.model.state_dict().items()},
        "config": {
            "milcli_version": __version__,
            "model": fitted.config.to_dict(),
            "ensemble": len(fitted.best_epochs),
            "classes": fitted.task.outputs(),
            "task": fitted.task.to_config(),
            "bag_by": options.bag_by,
            "backbone": data.backbone,
            "feature_dim": fitted.config.in_dim,
            "training": {k: v for k, v in asdict(options).items() if k != "model"},
            "recipes": [[*recipe, architecture, weight]
                        for recipe, architecture, weight in zip(fitted.recipes, fitted.architectures, fitted.weights)],
            "metrics": metrics,
            "history": fitted.histories,
            "members": fitted.records,
            "slides": {role: [b.bag_id for b in bags] for role, bags in roles.items()},
            "slide_labels": {sid: str(data.labels.rows[sid].target) for b in roles.get("train", [])
                             for sid, _ in b.parts},
            "features": str(features_path),
            "labels": str(labels_path),
        },
    }


def build_ensemble(config: dict) -> SeedEnsemble:
    """The untrained heads a model file's config describes, for its state_dict to load into
    (their standardisation is in the state_dict; format 2 files record no recipes: every
    member has the model's share; before format 5 every member is the model's architecture,
    before format 6 every member weighs the same)."""
    model = config["model"]
    recipes = config.get("recipes") or [[model["instance_loss"]]] * int(config["ensemble"])
    members = [build_model(ModelConfig(**{**model, "instance_loss": recipe[0],
                                          "architecture": (recipe[2:] or [model["architecture"]])[0]}))
               for recipe in recipes]
    return SeedEnsemble(members, [recipe[3] for recipe in recipes] if all(len(r) > 3 for r in recipes) else None)


def epochs_summary(fitted: Fitted) -> dict:
    """The epochs each member ran and kept, and its recipe, for metrics.json and the tables."""
    summary = {"architecture": fitted.config.architecture, "ensemble": len(fitted.best_epochs),
               "best_epochs": fitted.best_epochs, "epochs_run": [len(h) for h in fitted.histories],
               "recipes": [f"{family} {recipe_name(r)}" if FAMILY_JOIN in fitted.config.architecture else recipe_name(r)
                           for r, family in zip(fitted.recipes, fitted.architectures)]}
    return summary | ({"architecture_choice": fitted.choice} if fitted.choice else {})


def subset_metrics(model: SeedEnsemble, subsets: dict[str, list[Bag]], device: torch.device, task: Task) -> dict:
    metrics = {}
    for name, subset in subsets.items():
        if subset:
            _, predictions = evaluate(model, subset, device, task)
            metrics[name] = task.metrics([b.target for b in subset], predictions)
    return metrics


def train(features_path: Path, labels_path: Path, options: TrainOptions, device: torch.device) -> TrainResult:
    start = time.perf_counter()
    data = load_dataset(features_path, labels_path, options)
    train_bags, val_bags, test_bags = split_bags(data.bags, data.task, options.val_fraction, options.seed)
    if not val_bags and options.val_fraction > 0:
        warn(f"too few slides for a validation split; training {options.epochs} epochs without early stopping")
    fitted = fit(train_bags, val_bags, data.task, options, device)
    metrics: dict = epochs_summary(fitted)
    metrics |= subset_metrics(fitted.model, {"train": train_bags, "val": val_bags, "test": test_bags}, device,
                              fitted.task)
    roles = {"train": train_bags, "val": val_bags, "test": test_bags}
    checkpoint = make_checkpoint(fitted, data, options, metrics, roles, features_path, labels_path)
    return TrainResult(model=fitted.model, checkpoint=checkpoint, metrics=metrics, missing=data.missing,
                       seconds=time.perf_counter() - start)


def save_checkpoint(checkpoint: dict, path: Path) -> None:
    """Write atomically (temp file, then rename) so a crash never leaves half a model."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(checkpoint, tmp)
    tmp.replace(path)
