"""Each training recipe's heads on the panel's rows, kept apart, and mixes of them scored.

milcli's default ensemble averages heads trained with several recipes (a patch-classifier
share and a feature scaling, training.RECIPES). Choosing those recipes needs each one's
answers on every row, and the answers of any mix, without training the mix again: per outer
fold (the panel's folds and seeds), this trains each recipe's `--ensemble` heads exactly as
milcli trains them and saves each member's held-out bag probability. A mix is the mean over
the members of its recipes, as milcli's ensemble is; it is scored as the panel scores milcli
(AUC and accuracy at 0.5 of each repeat's pooled held-out predictions, mean ± sd over repeats),
and also with the training bags' class shares put back into the mix's probability (Bayes' rule
on the balanced posterior the class-weighted loss learns: p' = p*pi / (p*pi + (1-p)*(1-pi)),
pi the fold's training share of positive bags), a rule measured and rejected (README).

    python benchmarks/recipes.py --rows musk1 ucsb-breast --repeats 2 \\
        --recipes 0.5:z 0:none 0:pooled --mix 0.5:z+0:none 0.5:z+0:pooled --results runs/recipes

A recipe is SHARE:SCALING (config.SCALINGS), or HEAD:SCALING for another head's members in the
mix (`kme:z`: five kme heads beside two abmil recipes' ten weigh 1/3). Saved answers are reused from `--results`
(keyed by row, repeat, recipe and the other options; not by milcli's code).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
from sklearn.metrics import accuracy_score, roc_auc_score

from mil_cli.config import TrainOptions
from mil_cli.console import set_quiet
from mil_cli.models import MODELS
from mil_cli.training import evaluate, fit

from panel import (BINARY, DEVICE, ROWS, Row, apply_overrides, as_bags, fmt, fold_seed,  # type: ignore[import-not-found]
                   results_key)


Recipe = tuple[float | str, str]  # (abmil's patch-classifier share, or another head's name; feature scaling)


def parse_recipe(text: str) -> Recipe:
    first, scaling = text.split(":")
    if first in MODELS:
        return first, scaling
    return float(first), scaling


def member_answers(row: Row, repeat: int, recipe: Recipe, options: TrainOptions) -> dict:
    """The targets of the repeat's held-out bags (folds one after the other), the share of
    positive bags in each one's training fold, and, per member head of `recipe`, its
    positive-class probability for each of them."""
    first, scaling = recipe
    model = (replace(options.model, architecture=first) if isinstance(first, str)
             else replace(options.model, instance_loss=first))
    recipe_options = replace(options, standardise=scaling, model=model)
    y: list[int] = []
    prior: list[float] = []
    members: list[list[float]] = [[] for _ in range(options.ensemble)]
    for fold, (train, test) in enumerate(row.splits(repeat)):
        fitted = fit(as_bags(train, "b"), [], BINARY, replace(recipe_options, seed=fold_seed(repeat, fold)), DEVICE)
        y += [label for _, label, _ in test]
        prior += [float(np.mean([label for _, label, _ in train]))] * len(test)
        held_out = as_bags(test, "t")
        for m, member in enumerate(fitted.model.members):
            members[m] += evaluate(member, held_out, DEVICE, fitted.task)[1][:, 1].tolist()
        print(f"  {row.name} repeat {repeat} {first}:{scaling} fold {fold} done", file=sys.stderr, flush=True)
    return {"y": y, "prior": prior, "members": members}


def saved_answers(row: Row, repeat: int, recipe: Recipe, options: TrainOptions, results: Path) -> dict:
    path = results / f"{row.name}-repeat{repeat}-{recipe[0]}-{recipe[1]}-{results_key(options)}.json"
    if path.exists():
        return json.loads(path.read_text())
    answers = member_answers(row, repeat, recipe, options)
    results.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(answers))
    return answers


def score_mix(answers: dict[Recipe, dict], mix: list[Recipe]) -> tuple[float, float, float]:
    """AUC and accuracy of the mean probability over the members of the mix's recipes, and
    accuracy with the training class shares put back (nan for answers saved without them)."""
    y = np.array(answers[mix[0]]["y"])
    p = np.mean([member for recipe in mix for member in answers[recipe]["members"]], axis=0)
    prior = np.array(answers[mix[0]].get("prior", np.full(len(y), np.nan)))
    with_shares = p * prior / (p * prior + (1 - p) * (1 - prior))
    shares_accuracy = float(accuracy_score(y, with_shares >= 0.5)) if np.isfinite(prior).all() else float("nan")
    return float(roc_auc_score(y, p)), float(accuracy_score(y, p >= 0.5)), shares_accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="+", required=True, help=f"panel rows: {', '.join(ROWS)}")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--first-repeat", type=int, default=0)
    parser.add_argument("--recipes", nargs="+", required=True, metavar="SHARE:SCALING")
    parser.add_argument("--mix", nargs="*", default=[], metavar="RECIPE+RECIPE",
                        help="mixes to score besides each recipe alone, e.g. 0.5:z+0:pooled")
    parser.add_argument("--results", type=Path, default=Path("runs/recipes"))
    parser.add_argument("--cache", type=Path, default=Path("runs/panel-cache"))
    parser.add_argument("--set", nargs="*", default=[], metavar="OPTION=VALUE", help="other training options")
    args = parser.parse_args()
    set_quiet(True)
    options = apply_overrides(TrainOptions(), args.set)
    recipes = [parse_recipe(r) for r in args.recipes]
    mixes = [[r] for r in recipes] + [[parse_recipe(r) for r in mix.split("+")] for mix in args.mix]
    unknown = {r for mix in mixes for r in mix} - set(recipes)
    if unknown:
        raise SystemExit(f"--mix names recipes not in --recipes: {sorted(map(str, unknown))}")
    print("| row | mix | AUC | accuracy | accuracy, class shares put back |\n| --- | --- | --- | --- | --- |")
    for name in args.rows:
        row = ROWS[name](args.cache)
        scores: dict[str, list[tuple[float, float, float]]] = {}
        for repeat in range(args.first_repeat, args.first_repeat + args.repeats):
            answers = {recipe: saved_answers(row, repeat, recipe, options, args.results) for recipe in recipes}
            for mix in mixes:
                scores.setdefault(" + ".join(f"{s}:{c}" for s, c in mix), []).append(score_mix(answers, mix))
        for mix_name, figures in scores.items():
            print(f"| {name} | {mix_name} | " + " | ".join(fmt(list(column)) for column in zip(*figures)) + " |",
                  flush=True)


if __name__ == "__main__":
    main()
