"""abmil's recipe ensemble, kme, their 50/50 mix, and inner-CV gates between them, scored on
the very same heads: per fold of a panel row it trains abmil's ensemble and a kme ensemble of
as many heads on the training bags, and keeps both families' out-of-fold predictions over the
inner cross-validation that --model auto chooses by (training.inner_predictions). Every rule
is then scored from those saved predictions, without training again.

    python benchmarks/family_mix.py run --rows musk2 --repeats 1 [--first-repeat 0] [--results DIR]
    python benchmarks/family_mix.py choices --rows key-1024d-w2 --repeats 1   # inner fits only
    python benchmarks/family_mix.py table --rows musk1 musk2 [--results DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from sklearn.metrics import accuracy_score, roc_auc_score

from mil_cli.config import TrainOptions
from mil_cli.console import set_quiet
from mil_cli.metrics import auc_lead_confidence
from mil_cli.training import AUTO_MIN_AUC, choose_from_inner, evaluate, fit, inner_predictions

from panel import BINARY, DEVICE, ROWS, as_bags, fold_seed  # type: ignore[import-not-found]

FAMILIES = ("abmil", "kme")
GATES = (0.5, 0.8)  # confidence that the mix's inner AUC leads abmil's, above which a rejected rule takes it


def family_options(options: TrainOptions, family: str, seed: int) -> TrainOptions:
    """abmil: the shipped ensemble; kme: as many heads as abmil's two recipes train."""
    heads = options.ensemble * (2 if family == "kme" else 1)
    return replace(options, seed=seed, ensemble=heads, model=replace(options.model, architecture=family))


def run_fold(train: list, test: list, seed: int, options: TrainOptions, outer: bool = True,
             saved: dict | None = None) -> dict:
    """One fold's inner out-of-fold predictions of both families (or those `saved` by an
    inner-only run of it), and (`outer`) their ensembles' held-out predictions."""
    bags, test_bags = as_bags(train, "b"), as_bags(test, "t")
    task = BINARY.fitted([b.target for b in bags])
    fold = {"inner y": [b.target for b in bags], "test y": [b.target for b in test_bags]}
    if saved is None:
        inner = inner_predictions(bags, task, replace(options, seed=seed), DEVICE, FAMILIES)
        saved = {f"inner {family}": inner[family][:, 1].tolist() for family in FAMILIES}
    elif saved["inner y"] != fold["inner y"]:
        raise ValueError("the saved inner predictions are of other training bags")
    for family in FAMILIES:
        fold[f"inner {family}"] = saved[f"inner {family}"]
        if outer:
            fitted = fit(bags, [], BINARY, family_options(options, family, seed), DEVICE)
            fold[f"test {family}"] = evaluate(fitted.model, test_bags, DEVICE, fitted.task)[1][:, 1].tolist()
    return fold


def run(rows: list[str], repeats: range, results: Path, cache: Path, outer: bool) -> None:
    """Each repeat of each row into results/ROW-repeatN.json (ROW-repeatN-inner.json without
    the outer fits, whose inner predictions a later full run reuses); a repeat already there is kept."""
    options = TrainOptions()
    for name in rows:
        row = ROWS[name](cache)
        for repeat in repeats:
            path = results / f"{name}-repeat{repeat}{'' if outer else '-inner'}.json"
            if path.exists():
                continue
            inner_only = results / f"{name}-repeat{repeat}-inner.json"
            saved = json.loads(inner_only.read_text())["folds"] if outer and inner_only.exists() else None
            start, folds = time.perf_counter(), []
            for fold, (train, test) in enumerate(row.splits(repeat)):
                folds.append(run_fold(train, test, fold_seed(repeat, fold), options, outer, saved and saved[fold]))
                print(f"  {name} repeat {repeat} fold {fold} done ({time.perf_counter() - start:.0f} s)",
                      file=sys.stderr, flush=True)
            results.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"folds": folds, "seconds": time.perf_counter() - start}))


def two_columns(p: list[float]) -> np.ndarray:
    p = np.asarray(p)
    return np.stack([1 - p, p], 1)


def choices(fold: dict, seed: int) -> dict[str, float]:
    """The weight of kme (0: abmil alone, 1: kme alone, else a blend) each rule takes on a fold,
    from its inner predictions: the shipped auto (choose_from_inner), and earlier or rejected
    rules gating kme or the 50/50 mix on the bootstrap confidence that its inner AUC leads abmil's."""
    y = np.array(fold["inner y"])
    inner = {"abmil": two_columns(fold["inner abmil"]), "kme": two_columns(fold["inner kme"])}
    mix = (inner["abmil"] + inner["kme"]) / 2
    aucs = {0.0: roc_auc_score(y, inner["abmil"][:, 1]), 0.5: roc_auc_score(y, mix[:, 1]),
            1.0: roc_auc_score(y, inner["kme"][:, 1])}
    kme_lead = auc_lead_confidence(y, inner["kme"], inner["abmil"], seed) if aucs[1.0] >= AUTO_MIN_AUC else 0.0
    mix_lead = auc_lead_confidence(y, mix, inner["abmil"], seed) if aucs[0.5] >= AUTO_MIN_AUC else 0.0
    taken = {"abmil": 0.0, "kme": 1.0, "mix": 0.5, "auto": choose_from_inner(y, inner)["kme_weight"],
             "kme at 0.95, else mix at 0.8 (auto before)": 1.0 if kme_lead >= 0.95 else 0.5 if mix_lead >= 0.8 else 0.0,
             "kme at 0.95 (auto before that)": 1.0 if kme_lead >= 0.95 else 0.0,
             "best inner AUC of the three": max(aucs, key=aucs.__getitem__)}
    for gate in GATES:
        taken[f"mix at {gate}"] = 0.5 if mix_lead >= gate else 0.0
    return taken


def table(rows: list[str], results: Path) -> None:
    """Pooled AUC / accuracy of each rule, mean over the repeats saved with outer fits ("scored"),
    and how many folds of all saved repeats ("chosen") took kme alone or in a blend."""
    header = False
    for name in rows:
        files = [path for path in sorted(results.glob(f"{name}-repeat*.json"))  # an inner-only repeat run in full too
                 if not (path.stem.endswith("-inner") and path.with_name(path.name.replace("-inner", "")).exists())]
        if not files:
            continue
        scores: dict[str, list[tuple[float, float]]] = {}
        taken: dict[str, list[float]] = {}
        for path in files:
            repeat = int(path.stem.split("repeat", 1)[1].removesuffix("-inner"))
            folds = json.loads(path.read_text())["folds"]
            pooled: dict[str, list[float]] = {}
            y: list[int] = []
            for f, fold in enumerate(folds):
                y += fold["test y"]
                for rule, weight in choices(fold, fold_seed(repeat, f)).items():
                    taken.setdefault(rule, []).append(weight)
                    if "test abmil" in fold:
                        blend = (1 - weight) * np.array(fold["test abmil"]) + weight * np.array(fold["test kme"])
                        pooled.setdefault(rule, []).extend(blend)
            for rule, p in pooled.items():
                scores.setdefault(rule, []).append((roc_auc_score(y, p), accuracy_score(y, np.array(p) >= 0.5)))
        if not header:
            print("| row (repeats) | " + " | ".join(taken) + " |\n|" + " --- |" * (len(taken) + 1))
            header = True
        cells = []
        for rule, weights in taken.items():
            other = sum(w > 0 for w in weights)
            figure = "{:.3f} / {:.3f}".format(*np.mean(scores[rule], 0)) if rule in scores else "-"
            counts = f" ({other}/{len(weights)}" + (f", kme {np.mean(weights):.2f})" if rule == "auto" else ")")
            cells.append(figure + (counts if other and rule not in (*FAMILIES, "mix") else ""))
        scored = len(next(iter(scores.values()), []))
        print(f"| {name} ({scored} scored, {len(files)} chosen) | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("run", "choices", "table"),
                        help="run: inner and outer fits; choices: inner fits only (which family each rule takes)")
    parser.add_argument("--rows", nargs="+", required=True, choices=list(ROWS))
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--first-repeat", type=int, default=0)
    parser.add_argument("--results", type=Path, default=Path("runs/family-mix"))
    parser.add_argument("--cache", type=Path, default=Path("runs/panel-cache"))
    args = parser.parse_args()
    set_quiet(True)
    if args.action != "table":
        run(args.rows, range(args.first_repeat, args.first_repeat + args.repeats), args.results, args.cache,
            outer=args.action == "run")
    table(args.rows, args.results)


if __name__ == "__main__":
    main()
