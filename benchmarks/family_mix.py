"""abmil's recipe ensemble, kme, their 50/50 mix, and inner-CV gates between them, scored on
the very same heads: per fold of a panel row it trains abmil's ensemble and a kme ensemble of
as many heads on the training bags, and keeps both families' out-of-fold predictions over the
inner cross-validation that --model auto chooses by (training.inner_predictions). Every rule
is then scored from those saved predictions, without training again.

    python benchmarks/family_mix.py run --rows musk2 --repeats 1 [--first-repeat 0] [--results DIR]
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
from mil_cli.training import evaluate, fit, inner_predictions

from panel import BINARY, DEVICE, ROWS, as_bags, fold_seed  # type: ignore[import-not-found]

GATES = (0.5, 0.8, 0.95)  # confidence that the mix's inner AUC leads abmil's, above which the mix is taken


def family_options(options: TrainOptions, family: str, seed: int) -> TrainOptions:
    """abmil: the shipped ensemble; kme: as many heads as abmil's two recipes train."""
    heads = options.ensemble * (2 if family == "kme" else 1)
    return replace(options, seed=seed, ensemble=heads, model=replace(options.model, architecture=family))


def run_fold(train: list, test: list, seed: int, options: TrainOptions) -> dict:
    bags, test_bags = as_bags(train, "b"), as_bags(test, "t")
    task = BINARY.fitted([b.target for b in bags])
    inner = inner_predictions(bags, task, replace(options, seed=seed), DEVICE, ("abmil", "kme"))
    fold = {"inner y": [b.target for b in bags], "test y": [b.target for b in test_bags]}
    for family in ("abmil", "kme"):
        fitted = fit(bags, [], BINARY, family_options(options, family, seed), DEVICE)
        fold[f"test {family}"] = evaluate(fitted.model, test_bags, DEVICE, fitted.task)[1][:, 1].tolist()
        fold[f"inner {family}"] = inner[family][:, 1].tolist()
    return fold


def run(rows: list[str], repeats: range, results: Path, cache: Path) -> None:
    options = TrainOptions()
    for name in rows:
        row = ROWS[name](cache)
        for repeat in repeats:
            path = results / f"{name}-repeat{repeat}.json"
            if path.exists():
                continue
            start, folds = time.perf_counter(), []
            for fold, (train, test) in enumerate(row.splits(repeat)):
                folds.append(run_fold(train, test, fold_seed(repeat, fold), options))
                print(f"  {name} repeat {repeat} fold {fold} done ({time.perf_counter() - start:.0f} s)",
                      file=sys.stderr, flush=True)
            results.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"folds": folds, "seconds": time.perf_counter() - start}))


def two_columns(p: list[float]) -> np.ndarray:
    p = np.asarray(p)
    return np.stack([1 - p, p], 1)


def rules(fold: dict, seed: int) -> dict[str, tuple[list[float], str]]:
    """Each rule's held-out probabilities on one fold, and the family it took."""
    y = np.array(fold["inner y"])
    inner_abmil, inner_kme = two_columns(fold["inner abmil"]), two_columns(fold["inner kme"])
    abmil, kme = np.array(fold["test abmil"]), np.array(fold["test kme"])
    mix = (abmil + kme) / 2
    kme_lead = auc_lead_confidence(y, inner_kme, inner_abmil, seed)
    mix_lead = auc_lead_confidence(y, (inner_abmil + inner_kme) / 2, inner_abmil, seed)
    out = {"abmil": (abmil, "abmil"), "kme": (kme, "kme"), "mix": (mix, "mix"),
           "auto (kme at 0.95)": (kme, "kme") if kme_lead >= 0.95 else (abmil, "abmil")}
    for gate in GATES:
        out[f"mix at {gate}"] = (mix, "mix") if mix_lead >= gate else (abmil, "abmil")
    inner = {"abmil": inner_abmil, "mix": (inner_abmil + inner_kme) / 2, "kme": inner_kme}
    best = max(inner, key=lambda name: roc_auc_score(y, inner[name][:, 1]))
    out["best inner AUC"] = ({"abmil": abmil, "mix": mix, "kme": kme}[best], best)
    return out


def table(rows: list[str], results: Path) -> None:
    print("| row (repeats) | " + " | ".join(["abmil", "kme", "mix", "auto (kme at 0.95)",
                                             *(f"mix at {g}" for g in GATES), "best inner AUC"]) + " |")
    for name in rows:
        files = sorted(results.glob(f"{name}-repeat*.json"))
        if not files:
            continue
        scores: dict[str, list[tuple[float, float]]] = {}
        taken: dict[str, list[str]] = {}
        for path in files:
            repeat = int(path.stem.rsplit("repeat", 1)[1])
            folds = json.loads(path.read_text())["folds"]
            pooled: dict[str, list[float]] = {}
            y: list[int] = []
            for f, fold in enumerate(folds):
                y += fold["test y"]
                for rule, (p, family) in rules(fold, fold_seed(repeat, f)).items():
                    pooled.setdefault(rule, []).extend(p)
                    taken.setdefault(rule, []).append(family)
            for rule, p in pooled.items():
                p = np.array(p)
                scores.setdefault(rule, []).append((roc_auc_score(y, p), accuracy_score(y, p >= 0.5)))
        cells = []
        for rule, s in scores.items():
            auc, acc = np.mean(s, 0)
            mixed = taken[rule].count("mix") + taken[rule].count("kme") if rule.startswith(("mix at", "auto", "best")) else 0
            cells.append(f"{auc:.3f} / {acc:.3f}" + (f" ({mixed}/{len(taken[rule])})" if mixed else ""))
        print(f"| {name} ({len(files)}) | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("run", "table"))
    parser.add_argument("--rows", nargs="+", required=True, choices=list(ROWS))
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--first-repeat", type=int, default=0)
    parser.add_argument("--results", type=Path, default=Path("runs/family-mix"))
    parser.add_argument("--cache", type=Path, default=Path("runs/panel-cache"))
    args = parser.parse_args()
    set_quiet(True)
    if args.action == "run":
        run(args.rows, range(args.first_repeat, args.first_repeat + args.repeats), args.results, args.cache)
    table(args.rows, args.results)


if __name__ == "__main__":
    main()
