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
from mil_cli.training import AUTO_MIX, choose_from_inner, evaluate, fit, inner_predictions

from panel import BINARY, DEVICE, ROWS, as_bags, fold_seed  # type: ignore[import-not-found]

FAMILIES = ("abmil", "kme")
GATES = (0.5, 0.8, 0.95)  # confidence that the mix's (or kme's) inner AUC leads abmil's, above which it is taken


def family_options(options: TrainOptions, family: str, seed: int) -> TrainOptions:
    """abmil: the shipped ensemble; kme: as many heads as abmil's two recipes train."""
    heads = options.ensemble * (2 if family == "kme" else 1)
    return replace(options, seed=seed, ensemble=heads, model=replace(options.model, architecture=family))


def run_fold(train: list, test: list, seed: int, options: TrainOptions, outer: bool = True) -> dict:
    """One fold's inner out-of-fold predictions of both families, and (`outer`) their
    ensembles' held-out predictions."""
    bags, test_bags = as_bags(train, "b"), as_bags(test, "t")
    task = BINARY.fitted([b.target for b in bags])
    inner = inner_predictions(bags, task, replace(options, seed=seed), DEVICE, FAMILIES)
    fold = {"inner y": [b.target for b in bags], "test y": [b.target for b in test_bags]}
    for family in FAMILIES:
        fold[f"inner {family}"] = inner[family][:, 1].tolist()
        if outer:
            fitted = fit(bags, [], BINARY, family_options(options, family, seed), DEVICE)
            fold[f"test {family}"] = evaluate(fitted.model, test_bags, DEVICE, fitted.task)[1][:, 1].tolist()
    return fold


def run(rows: list[str], repeats: range, results: Path, cache: Path, outer: bool) -> None:
    """Each repeat of each row into results/ROW-repeatN.json (ROW-repeatN-inner.json without
    the outer fits); a repeat already there is kept."""
    options = TrainOptions()
    for name in rows:
        row = ROWS[name](cache)
        for repeat in repeats:
            path = results / f"{name}-repeat{repeat}{'' if outer else '-inner'}.json"
            if path.exists():
                continue
            start, folds = time.perf_counter(), []
            for fold, (train, test) in enumerate(row.splits(repeat)):
                folds.append(run_fold(train, test, fold_seed(repeat, fold), options, outer))
                print(f"  {name} repeat {repeat} fold {fold} done ({time.perf_counter() - start:.0f} s)",
                      file=sys.stderr, flush=True)
            results.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"folds": folds, "seconds": time.perf_counter() - start}))


def two_columns(p: list[float]) -> np.ndarray:
    p = np.asarray(p)
    return np.stack([1 - p, p], 1)


def choices(fold: dict, seed: int) -> dict[str, str]:
    """The family ("abmil", "kme" or "mix") each rule takes on a fold, from its inner predictions."""
    y = np.array(fold["inner y"])
    inner = {"abmil": two_columns(fold["inner abmil"]), "kme": two_columns(fold["inner kme"])}
    inner["mix"] = (inner["abmil"] + inner["kme"]) / 2
    shipped = choose_from_inner(y, {"abmil": inner["abmil"], "kme": inner["kme"]}, seed)
    kme_lead, mix_lead = shipped["confidence"]["kme"], shipped["confidence"][AUTO_MIX]  # leads over abmil
    chosen = shipped["chosen"]
    taken = {"abmil": "abmil", "kme": "kme", "mix": "mix", "auto": "mix" if chosen == AUTO_MIX else chosen,
             "kme at 0.95 (old auto)": "kme" if kme_lead >= 0.95 else "abmil"}
    for gate in GATES:
        taken[f"mix at {gate}"] = "mix" if mix_lead >= gate else "abmil"
    taken["best inner AUC"] = max(inner, key=lambda name: roc_auc_score(y, inner[name][:, 1]))
    for kme_gate in GATES[1:]:
        for mix_gate in GATES[:2]:
            taken[f"kme at {kme_gate}, else mix at {mix_gate}"] = ("kme" if kme_lead >= kme_gate else
                                                                  "mix" if mix_lead >= mix_gate else "abmil")
    return taken


def table(rows: list[str], results: Path) -> None:
    """Pooled AUC / accuracy of each rule, mean over the saved repeats, and how many folds took
    another family than abmil; for repeats saved without outer fits, only those counts."""
    header = False
    for name in rows:
        files = sorted(results.glob(f"{name}-repeat*.json"))
        if not files:
            continue
        scores: dict[str, list[tuple[float, float]]] = {}
        taken: dict[str, list[str]] = {}
        for path in files:
            repeat = int(path.stem.split("repeat", 1)[1].removesuffix("-inner"))
            folds = json.loads(path.read_text())["folds"]
            pooled: dict[str, list[float]] = {}
            y: list[int] = []
            for f, fold in enumerate(folds):
                y += fold["test y"]
                for rule, family in choices(fold, fold_seed(repeat, f)).items():
                    taken.setdefault(rule, []).append(family)
                    if "test abmil" in fold:
                        p = {"abmil": np.array(fold["test abmil"]), "kme": np.array(fold["test kme"])}
                        p["mix"] = (p["abmil"] + p["kme"]) / 2
                        pooled.setdefault(rule, []).extend(p[family])
            for rule, p in pooled.items():
                scores.setdefault(rule, []).append((roc_auc_score(y, p), accuracy_score(y, np.array(p) >= 0.5)))
        if not header:
            print("| row (repeats) | " + " | ".join(taken) + " |\n|" + " --- |" * (len(taken) + 1))
            header = True
        cells = []
        for rule, families in taken.items():
            other = len(families) - families.count("abmil")
            figure = "{:.3f} / {:.3f}".format(*np.mean(scores[rule], 0)) if rule in scores else "-"
            cells.append(figure + (f" ({other}/{len(families)})" if other and rule not in (*FAMILIES, "mix") else ""))
        print(f"| {name} ({len(files)}) | " + " | ".join(cells) + " |")


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
