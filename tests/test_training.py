"""Training on synthetic bags whose answer is known: it learns, it is reproducible, it splits
honestly, and the stores it reads are checked."""

from __future__ import annotations

import csv
from dataclasses import replace
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score

from conftest import invoke
from mil_cli import stores
from mil_cli.errors import InputError, MilcliError
from mil_cli.labels import read_labels
from mil_cli.tasks import Classification
from mil_cli.config import ModelConfig, TrainOptions
from mil_cli.models import MODELS, build_model, whole_bag
from mil_cli.pipeline import _model_matches
from mil_cli.metrics import choice_label, classification_metrics
from mil_cli.synthetic import digit_bags, write_digit_bags
from mil_cli.training import (Bag, choose_architecture, choose_from_inner, collate, evaluate, feature_statistics,
                              fit, train)

DIM = 16


def synthetic_store(folder: Path, n_bags: int = 40, seed: int = 0) -> tuple[Path, Path]:
    """Bags of 8-15 Gaussian instances; positive bags hold 1-3 instances shifted along axis 0.
    Every fifth bag is marked as test in the labels' split column."""
    rng = np.random.default_rng(seed)
    path = folder / "feats.h5"
    lines = ["slide_id,label,split"]
    bags = []
    for i in range(n_bags):
        positive = i % 2 == 0
        n = int(rng.integers(8, 16))
        feats = rng.normal(size=(n, DIM)).astype(np.float32)
        if positive:
            feats[: int(rng.integers(1, 4)), 0] += 4.0
        coords = np.stack([np.arange(n) * 256, np.zeros(n)], axis=1).astype(np.int64)
        bags.append((f"bag_{i:03d}", coords, feats))
        lines.append(f"bag_{i:03d},{'pos' if positive else 'neg'},{'test' if i % 5 == 4 else ''}")
    stores.write_feature_store(path, bags, backbone="synthetic")
    labels = folder / "labels.csv"
    labels.write_text("\n".join(lines) + "\n")
    return path, labels


def test_learns_a_key_instance_and_reports_held_out_metrics(tmp_path: Path) -> None:
    feats, labels = synthetic_store(tmp_path, n_bags=80)
    options = TrainOptions(epochs=60, lr=1e-3, seed=1, ensemble=1, model=ModelConfig(instance_loss=0.5))  # one recipe
    result = train(feats, labels, options, torch.device("cpu"))
    assert result.metrics["test"]["n"] == 16
    assert result.metrics["test"]["auc"] >= 0.9
    slides = result.checkpoint["config"]["slides"]
    assert not set(slides["test"]) & (set(slides["train"]) | set(slides["val"]))
    # the small-cohort rule: every training slide trains, for exactly --epochs epochs
    assert not slides["val"] and len(slides["train"]) == 64
    assert result.metrics["best_epochs"] == result.metrics["epochs_run"] == [60]


def test_same_seed_same_numbers(tmp_path: Path) -> None:
    feats, labels = synthetic_store(tmp_path)
    options = TrainOptions(epochs=8, seed=7, ensemble=2)
    a = train(feats, labels, options, torch.device("cpu"))
    b = train(feats, labels, options, torch.device("cpu"))
    assert a.metrics == b.metrics
    for key, tensor in a.checkpoint["state_dict"].items():
        assert torch.equal(tensor, b.checkpoint["state_dict"][key]), key


def test_class_balancing_weighs_the_rare_class_up_and_can_be_turned_off() -> None:
    """Bags of noise, a quarter of them positive: trained on the classes as common as they are
    (--no-balance-classes), a head calls new noise bags positive about as often as a quarter;
    balanced, it weighs the rare class up and its probabilities move towards 0.5."""
    rng = np.random.default_rng(0)

    def noise_bags(n: int, prefix: str) -> list[Bag]:
        return [Bag(f"{prefix}{i}", torch.from_numpy(rng.normal(size=(int(rng.integers(5, 12)), 8)).astype(np.float32)),
                    int(i % 4 == 0), f"{prefix}{i}") for i in range(n)]

    train_bags, new_bags = noise_bags(32, "b"), noise_bags(40, "t")
    mean_positive = {}
    for balance in (True, False):
        options = TrainOptions(epochs=5, ensemble=1, balance_classes=balance, standardise="z",
                               model=ModelConfig(instance_loss=0.5))
        fitted = fit(train_bags, [], Classification(["neg", "pos"]), options, torch.device("cpu"))
        mean_positive[balance] = float(evaluate(fitted.model, new_bags, torch.device("cpu"), fitted.task)[1][:, 1].mean())
    assert abs(mean_positive[False] - 0.25) < 0.05, mean_positive
    assert mean_positive[True] > mean_positive[False] + 0.05, mean_positive


def test_patients_never_straddle_train_and_validation(tmp_path: Path) -> None:
    feats, _ = synthetic_store(tmp_path)
    labels = tmp_path / "patients.csv"
    rows = ["slide_id,label,patient_id"] + [f"bag_{i:03d},{'pos' if i % 2 == 0 else 'neg'},p{i // 4}" for i in range(40)]
    labels.write_text("\n".join(rows) + "\n")
    result = train(feats, labels, TrainOptions(epochs=2, val_fraction=0.3, ensemble=1), torch.device("cpu"))
    slides = result.checkpoint["config"]["slides"]
    patient = {f"bag_{i:03d}": f"p{i // 4}" for i in range(40)}
    assert {patient[s] for s in slides["train"]}.isdisjoint({patient[s] for s in slides["val"]})


def test_nan_features_are_named(tmp_path: Path) -> None:
    feats, labels = synthetic_store(tmp_path, n_bags=4)
    with h5py.File(feats, "a") as f:
        f["slides/bag_001/features"][0, 0] = np.nan
    with pytest.raises(InputError, match=r"bag_001.*NaN or Inf"):
        train(feats, labels, TrainOptions(epochs=1), torch.device("cpu"))


def test_labels_csv_quirks(tmp_path: Path) -> None:
    path = tmp_path / "labels.csv"
    path.write_bytes("\ufeffslide_id , label\r\n\r\na,1\r\nb,10\r\nb,10\r\nc,2\r\n".encode("utf-8"))
    table = read_labels(path, Classification())
    assert sorted(table.rows) == ["a", "b", "c"]
    assert table.classes == ["1", "2", "10"]  # numeric order for integer labels
    path.write_text("slide_id,label\na,x\na,y\n")
    with pytest.raises(InputError, match="slide 'a' appears twice"):
        read_labels(path, Classification())
    path.write_text("slide_id,label,split\na,x,holdout\n")
    with pytest.raises(InputError, match="split 'holdout'"):
        read_labels(path, Classification())


def test_reads_a_clam_style_feature_folder(tmp_path: Path) -> None:
    folder = tmp_path / "h5_files"
    folder.mkdir()
    for i in range(3):
        with h5py.File(folder / f"s{i}.h5", "w") as f:
            f["features"] = np.ones((5, 8), dtype=np.float32) * i
            f["coords"] = np.arange(10).reshape(5, 2)
    source = stores.FeatureSource(folder)
    assert source.slide_ids == ["s0", "s1", "s2"]
    data = source.load("s2")
    assert data.features.shape == (5, 8) and data.features[0, 0] == 2.0
    with h5py.File(folder / "bad.h5", "w") as f:
        f["features"] = np.ones((5, 8), dtype=np.float32)
        f["coords"] = np.zeros((4, 2))
    with pytest.raises(InputError, match=r"bad\.h5 \[bad\]: 5 feature rows but 4 coords"):
        stores.FeatureSource(folder).load("bad")


@pytest.mark.parametrize("architecture", sorted(MODELS))
def test_every_head_ignores_padding_and_learns_the_key_instance(architecture: str, tmp_path: Path) -> None:
    config = ModelConfig(architecture=architecture, in_dim=DIM, n_classes=3, hidden_dim=16, attention_dim=8,
                         dropout=0.0, instance_k=4)
    model = build_model(config).eval()
    small, large = torch.randn(5, DIM), torch.randn(9, DIM)
    x, mask, _ = collate([Bag("a", small, 0, "a"), Bag("b", large, 1, "b")], torch.device("cpu"))
    with torch.no_grad():
        batched = model(x, mask)
        alone_logits, alone_attention = model.bag(small)
    assert torch.allclose(batched.logits[0], alone_logits, atol=1e-5)
    assert torch.allclose(batched.attention[0, :5], alone_attention, atol=1e-5)
    assert batched.attention[0, 5:].abs().sum() == 0 and torch.allclose(batched.attention.sum(1), torch.ones(2))
    assert model.patch_scores(small).shape == (5, 3)
    scores = model.instance_scores(small)
    assert scores.shape == (5, 3) and ((scores >= 0) & (scores <= 1)).all()
    if model.additive:  # per-patch contributions sum to the attention stream's logits minus the bias
        with torch.no_grad():
            pooled = model(*whole_bag(small)).pooled_logits[0]
        bias = 0.0 if model.classifier.bias is None else model.classifier.bias  # protomil's has none
        assert torch.allclose(model.patch_scores(small).sum(0) + bias, pooled, atol=1e-4)
    model.train()
    loss = model.loss(model(x, mask), torch.tensor([0, 2]), mask, None)
    loss.backward()  # clam-sb's instance loss copes with any bag size
    assert torch.isfinite(loss)
    if model.closed_form:
        return  # kme: a mean embedding, for which a 1-in-8 key instance on one axis of 16 is too faint (its own tests)

    feats, labels = synthetic_store(tmp_path, n_bags=60)
    result = train(feats, labels, TrainOptions(epochs=40, seed=1, ensemble=1,
                                               model=ModelConfig(architecture=architecture)), torch.device("cpu"))
    assert result.metrics["test"]["auc"] >= 0.8, architecture


def spread_bags(n_bags: int, seed: int) -> list[Bag]:
    """Bags of 6-20 instances whose class is how widely they spread (sd 1 against 0.5 in the
    first 4 of DIM axes): every bag's mean is near zero whatever its class, so a linear
    readout of mean features cannot tell them apart, while a kernel mean embedding can."""
    rng = np.random.default_rng(seed)
    bags = []
    for i in range(n_bags):
        x = rng.normal(size=(int(rng.integers(6, 21)), DIM)).astype(np.float32)
        x[:, :4] *= 1.0 if i % 2 else 0.5
        bags.append(Bag(f"b{i}", torch.from_numpy(x), i % 2, f"b{i}"))
    return bags


def test_kme_separates_bags_by_how_their_instances_spread() -> None:
    task = Classification(["0", "1"])
    train_bags, test_bags = spread_bags(60, seed=0), spread_bags(40, seed=1)
    options = TrainOptions(seed=0, ensemble=1, model=ModelConfig(architecture="kme"))
    fitted = fit(train_bags, [], task, options, torch.device("cpu"))
    assert fitted.histories == [[]] and fitted.best_epochs == [0]  # fitted at once, no epochs
    _, probs = evaluate(fitted.model, test_bags, torch.device("cpu"), task)
    assert roc_auc_score([b.target for b in test_bags], probs[:, 1]) >= 0.95


def test_kme_says_that_validation_bags_do_not_steer_it(tmp_path: Path) -> None:
    feats, labels = synthetic_store(tmp_path, n_bags=20)
    trained = invoke("train", "--features", feats, "--labels", labels, "--out", tmp_path / "m.pt", "--model", "kme",
                     "--val-fraction", "0.25", "--ensemble", "1", "--device", "cpu")
    assert trained.exit_code == 0, trained.stderr
    assert "--model kme is fitted in closed form, without early stopping" in " ".join(trained.stderr.split())


def test_kme_fit_is_scikit_learns_logistic_regression_on_its_bag_embeddings() -> None:
    """Three classes of unequal size, class-weighted: the L-BFGS fit lands where scikit-learn's
    multinomial logistic regression with the same C, weights and embeddings does."""
    from sklearn.linear_model import LogisticRegression
    from torch.nn import functional as F

    from mil_cli.models import KME_C

    rng = np.random.default_rng(0)
    bags = [Bag(f"b{i}", torch.from_numpy(rng.normal(c, 1.0, size=(int(rng.integers(3, 12)), DIM)).astype(np.float32)),
                c, f"b{i}") for i, c in enumerate([0] * 20 + [1] * 12 + [2] * 8)]
    task = Classification(["a", "b", "c"])
    weight = task.class_weight([b.target for b in bags])
    torch.manual_seed(0)
    model = build_model(ModelConfig(architecture="kme", in_dim=DIM, n_classes=3))
    model.fit_closed_form(bags, weight)
    with torch.no_grad():
        x = F.normalize(torch.stack([model.embed_patches(b.features).double().mean(0) for b in bags]), dim=-1).numpy()
        ours = np.concatenate([torch.softmax(model.bag(b.features)[0], -1).numpy()[None] for b in bags])
    reference = LogisticRegression(C=KME_C, class_weight=dict(enumerate(weight.tolist())), tol=1e-10, max_iter=10_000)
    theirs = reference.fit(x, [b.target for b in bags]).predict_proba(x)
    assert np.abs(ours - theirs).max() < 1e-5  # 1.5e-7 measured
    assert np.abs(model.classifier.weight.detach().numpy() - reference.coef_).max() < 1e-4


def key_bags(n_bags: int, seed: int) -> list[Bag]:
    """Bags of 8-15 instances; positive bags hold 1-3 instances shifted along axis 0 (a mean
    embedding dilutes them)."""
    rng = np.random.default_rng(seed)
    bags = []
    for i in range(n_bags):
        x = rng.normal(size=(int(rng.integers(8, 16)), DIM)).astype(np.float32)
        if i % 2:
            x[: int(rng.integers(1, 4)), 0] += 4.0
        bags.append(Bag(f"b{i}", torch.from_numpy(x), i % 2, f"b{i}"))
    return bags


@pytest.mark.parametrize("bags_of, sees, weight", [(spread_bags, "kme", 0.75), (key_bags, "abmil", 0.0)])
def test_auto_weighs_the_family_that_can_see_the_signal_and_fits_the_blend_it_chose(bags_of, sees: str,
                                                                                    weight: float) -> None:
    """How widely instances spread is what kme's embedding sees and abmil misses; a 1-3 in 8-15
    key instance the other way round. The inner cross-validation must tell (margins of 0.19 and
    0.24 AUC measured): kme gets the most weight auto gives (never all of it), or none; and the
    model it returns is exactly that blend of the families' own fits (kme with as many heads as
    abmil's two recipes)."""
    task, device = Classification(["0", "1"]), torch.device("cpu")
    train_bags, test_bags = bags_of(48, seed=0), bags_of(20, seed=1)
    options = TrainOptions(epochs=10, seed=0, ensemble=1, model=ModelConfig(architecture="auto"))
    fitted = fit(train_bags, [], task, options, device)
    choice = fitted.choice
    assert choice["kme_weight"] == weight and choice["chosen"] == fitted.config.architecture, choice
    inner = {family: choice["inner_auc"][w] for family, w in (("abmil", "0"), ("kme", "1"))}
    loser = "abmil" if sees == "kme" else "kme"
    assert inner[sees] >= inner[loser] + 0.1, choice
    families = {"abmil": 1 - weight, "kme": weight}
    blend = sum(share * evaluate(fit(train_bags, [], task, replace(options, ensemble=2 if family == "kme" else 1,
                                                                  model=ModelConfig(architecture=family)),
                                     device).model, test_bags, device, task)[1]
                for family, share in families.items() if share)
    assert np.allclose(evaluate(fitted.model, test_bags, device, task)[1], blend, atol=1e-6)


def test_auto_weighs_kme_by_the_inner_brier_score_and_never_blends_near_chance() -> None:
    """The rule on inner predictions: the kme weight whose blend scores the lowest Brier score;
    a family that is sure and right takes all the weight auto gives, errors of two families that differ
    (here each family sees one half of the bags' signal) a blend; a kme whose own inner AUC is
    below AUTO_MIN_AUC is not blended in even where a blend's Brier score is lower."""
    from mil_cli.training import AUTO_KME_WEIGHTS, AUTO_MIN_AUC

    rng = np.random.default_rng(0)
    targets = np.array([0, 1] * 40)
    noise = lambda scale: scale * rng.normal(size=80)  # noqa: E731
    as_probs = lambda p: np.stack([1 - p, p], axis=1)  # noqa: E731
    sharp = np.clip(np.where(targets == 1, 0.9, 0.1) + noise(0.05), 0, 1)
    blurred = np.clip(0.5 + 0.2 * (targets - 0.5) + noise(0.3), 0, 1)
    choice = choose_from_inner(targets, {"abmil": as_probs(blurred), "kme": as_probs(sharp)})
    assert choice["chosen"] == "abmil+kme" and choice["kme_weight"] == 0.75  # never kme alone
    assert choice["inner_brier"]["1"] < choice["inner_brier"]["0.75"]
    choice = choose_from_inner(targets, {"abmil": as_probs(sharp), "kme": as_probs(blurred)})
    assert choice["chosen"] == "abmil" and choice["kme_weight"] == 0.0
    assert list(choice["inner_brier"]) == [f"{w:g}" for w in AUTO_KME_WEIGHTS] + ["1"]  # and kme alone
    half = np.arange(80) < 40  # abmil sees the first half's bags, kme the second's
    abmil = np.clip(np.where(half, targets, 0.5) + noise(0.1), 0, 1)
    kme = np.clip(np.where(half, 0.5, targets) + noise(0.1), 0, 1)
    choice = choose_from_inner(targets, {"abmil": as_probs(abmil), "kme": as_probs(kme)})
    assert choice["chosen"] == "abmil+kme" and choice["kme_weight"] == 0.5, choice
    brier = choice["inner_brier"]
    assert brier["0.5"] < min(brier["0"], brier["1"]) - 0.05
    # abmil right but overconfident, kme hedging near 0.5 and seeing nothing: a quarter of kme
    # lowers the Brier score by pulling abmil towards 0.5, yet kme learns nothing to blend in
    bold = np.where(rng.random(80) < 0.85, targets, 1 - targets).astype(float)
    hedged = 0.5 + noise(0.01)
    choice = choose_from_inner(targets, {"abmil": as_probs(bold), "kme": as_probs(hedged)})
    assert choice["inner_brier"]["0.25"] < choice["inner_brier"]["0"] - 0.03
    assert choice["inner_auc"]["1"] < AUTO_MIN_AUC <= choice["inner_auc"]["0"]
    assert choice["chosen"] == "abmil" and choice["kme_weight"] == 0.0


def test_an_ensemble_weighs_its_members_as_the_model_file_says(tmp_path: Path) -> None:
    """A weighted ensemble (auto's blend of families) answers with its members' weighted mean,
    and its model file (format 6: each recipe carries the member's weight) rebuilds it; a file
    without weights (format 5) weighs the members equally."""
    from mil_cli import training
    from mil_cli.inference import load_model

    feats, labels = synthetic_store(tmp_path, n_bags=12)
    result = train(feats, labels, TrainOptions(epochs=2, ensemble=2, model=ModelConfig(instance_loss=0.0)),
                   torch.device("cpu"))
    assert result.checkpoint["config"]["recipes"] == [[0.0, "z", "abmil", 0.5]] * 2
    x = torch.from_numpy(stores.FeatureSource(feats).load("bag_001").features)
    members = result.model.members
    with torch.inference_mode():
        probs = [torch.softmax(m.bag(x)[0], -1) for m in members]
        attention = [m.bag(x)[1] for m in members]
    config = {**result.checkpoint["config"], "recipes": [[0.0, "z", "abmil", 0.2], [0.0, "z", "abmil", 0.8]]}
    for version, recipes, weights in ((6, config["recipes"], (0.2, 0.8)), (5, [[0.0, "z", "abmil"]] * 2, (0.5, 0.5))):
        path = tmp_path / f"format{version}.pt"
        training.save_checkpoint({**result.checkpoint, "format_version": version,
                                  "config": {**config, "recipes": recipes}}, path)
        loaded = load_model(path, torch.device("cpu"))
        with torch.inference_mode():
            logits, weighted_attention = loaded.module.bag(x)[:2]
        assert torch.allclose(torch.exp(logits), weights[0] * probs[0] + weights[1] * probs[1], atol=1e-6)
        assert torch.allclose(weighted_attention, weights[0] * attention[0] + weights[1] * attention[1], atol=1e-6)


def test_a_mix_of_families_weighs_each_half_and_its_model_file_rebuilds_every_member(tmp_path: Path) -> None:
    """--model abmil+kme: abmil's recipe ensemble and as many kme heads (from seeds of their
    own), each family half of the mean; the model file names each member's family and
    predict rebuilds the very ensemble."""
    from mil_cli import training
    from mil_cli.inference import load_model

    task, device = Classification(["0", "1"]), torch.device("cpu")
    train_bags, test_bags = spread_bags(24, seed=0), spread_bags(10, seed=1)
    options = TrainOptions(epochs=2, seed=3, ensemble=1)
    mixed = fit(train_bags, [], task, replace(options, model=ModelConfig(architecture="abmil+kme")), device)
    assert mixed.architectures == ["abmil", "abmil", "kme", "kme"]
    abmil = fit(train_bags, [], task, replace(options, model=ModelConfig(architecture="abmil")), device)
    kme = fit(train_bags, [], task, replace(options, ensemble=2, model=ModelConfig(architecture="kme")), device)
    halves = [evaluate(f.model, test_bags, device, task)[1] for f in (abmil, kme)]
    assert np.allclose(evaluate(mixed.model, test_bags, device, task)[1], np.mean(halves, axis=0), atol=1e-6)
    kme_heads = [m.classifier.weight for m in mixed.model.members[2:]]
    assert not torch.equal(*kme_heads)  # two seeds, not one head twice
    # auto's blend: the same members, each family weighing as chosen
    blend = {"chosen": "abmil+kme", "kme_weight": 0.75}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(training, "choose_architecture", lambda *_: blend)
        blended = fit(train_bags, [], task, replace(options, model=ModelConfig(architecture="auto")), device)
    assert blended.weights == [0.125, 0.125, 0.375, 0.375] and blended.choice == blend
    assert np.allclose(evaluate(blended.model, test_bags, device, task)[1], 0.25 * halves[0] + 0.75 * halves[1],
                       atol=1e-6)

    feats, labels = synthetic_store(tmp_path, n_bags=16)
    result = train(feats, labels, replace(options, model=ModelConfig(architecture="abmil+kme")), device)
    config = result.checkpoint["config"]
    assert config["model"]["architecture"] == result.metrics["architecture"] == "abmil+kme"
    assert config["recipes"] == [[0.5, "z", "abmil", 0.25], [0.0, "none", "abmil", 0.25], [0.5, "z", "kme", 0.25],
                                 [0.5, "z", "kme", 0.25]]
    assert result.metrics["recipes"] == ["abmil 0.5 z", "abmil 0.0 none", "kme 0.5 z", "kme 0.5 z"]
    path = tmp_path / "model.pt"
    training.save_checkpoint(result.checkpoint, path)
    loaded = load_model(path, device)
    assert [type(m).__name__ for m in loaded.module.members] == ["AttentionMIL"] * 2 + ["KernelMeanMIL"] * 2
    x = torch.from_numpy(stores.FeatureSource(feats).load("bag_003").features)
    with torch.inference_mode():
        assert torch.allclose(loaded.module.bag(x)[0], result.model.bag(x)[0])


@pytest.mark.parametrize("name, says", [("abmil+foo", "or heads joined by +"), ("kme+kme", "a head named twice")])
def test_a_mix_that_names_no_heads_is_refused(name: str, says: str) -> None:
    from mil_cli.models import check_architecture

    with pytest.raises(MilcliError, match=says):
        check_architecture(name)
    with pytest.raises(MilcliError, match="--model kme predicts classes only"):
        check_architecture("abmil+kme", "regression")


def test_auc_lead_confidence_is_paired_and_one_sided() -> None:
    from mil_cli.metrics import auc_lead_confidence

    rng = np.random.default_rng(0)
    targets = np.array([0, 1] * 30)
    noise = rng.normal(size=60)
    sharp, blurred = targets + 0.5 * noise, targets + 3.0 * noise  # same noise: a paired, certain lead
    as_probs = lambda score: np.stack([1 - score, score], axis=1)  # noqa: E731
    assert auc_lead_confidence(targets, as_probs(sharp), as_probs(blurred), resamples=200) == 1.0
    assert auc_lead_confidence(targets, as_probs(blurred), as_probs(sharp), resamples=200) == 0.0
    assert auc_lead_confidence(targets, as_probs(sharp), as_probs(sharp), resamples=200) == 0.5
    unrelated = as_probs(targets + 3.0 * rng.normal(size=60))  # a lead within the noise
    assert 0.05 < auc_lead_confidence(targets, as_probs(blurred), unrelated, resamples=200) < 0.95


def test_auc_lead_confidence_counts_what_roc_auc_score_counts_on_each_resample() -> None:
    """All resamples' AUCs at once (mid-ranks) are scikit-learn's, resample by resample."""
    from mil_cli.metrics import auc_lead_confidence

    rng = np.random.default_rng(3)
    targets = rng.integers(0, 2, 40)
    first, second = rng.random(40), rng.random(40) + 0.3 * targets  # continuous: no exact ties
    as_probs = lambda score: np.stack([1 - score, score], axis=1)  # noqa: E731
    draw = np.random.default_rng(7)
    strata = [np.flatnonzero(targets == c) for c in (0, 1)]
    wins = 0
    for _ in range(300):
        rows = np.concatenate([draw.choice(members, len(members)) for members in strata])
        wins += roc_auc_score(targets[rows], first[rows]) > roc_auc_score(targets[rows], second[rows])
    assert auc_lead_confidence(targets, as_probs(first), as_probs(second), seed=7, resamples=300) == wins / 300


def test_auto_keeps_abmil_where_kme_cannot_be_weighed() -> None:
    """Regression (kme classifies only) and a class with fewer patients than inner folds: abmil,
    with the reason recorded."""
    from mil_cli.tasks import make_task

    regression = make_task("regression").fitted([0.0, 1.0])
    choice = choose_architecture(key_bags(12, 0), regression, TrainOptions(task="regression"), torch.device("cpu"))
    assert choice == {"chosen": "abmil", "reason": "kme does not learn regression"}
    few = [b for b in key_bags(12, 0) if b.target == 0] + [b for b in key_bags(12, 0) if b.target == 1][:2]
    choice = choose_architecture(few, Classification(["0", "1"]), TrainOptions(), torch.device("cpu"))
    assert choice == {"chosen": "abmil", "reason": "a class has fewer than 3 patients"}


def test_auto_says_what_it_chose_in_the_table_and_metrics(tmp_path: Path) -> None:
    feats, labels = synthetic_store(tmp_path, n_bags=20)
    trained = invoke("train", "--features", feats, "--labels", labels, "--out", tmp_path / "m.pt", "--model", "auto",
                     "--epochs", "3", "--ensemble", "1", "--device", "cpu", "--json")
    assert trained.exit_code == 0, trained.stderr
    metrics = json.loads(trained.stdout.splitlines()[-1])["metrics"]
    assert metrics["architecture_choice"]["chosen"] == metrics["architecture"]
    assert set(metrics["architecture_choice"]["inner_brier"]) == {"0", "0.25", "0.5", "0.75", "1"}
    said = " ".join(trained.stderr.split())
    assert " chosen (inner CV by kme weight 0 / 0.25 / 0.5 / 0.75 / 1: Brier " in said and ", AUC " in said
    auto = TrainOptions(epochs=3, ensemble=1, model=ModelConfig(architecture="auto"))
    assert _model_matches(tmp_path / "m.pt", auto)  # `run` keeps it on a rerun though the file names the head chosen
    assert not _model_matches(tmp_path / "m.pt", replace(auto, epochs=4))
    crossed = invoke("train", "--features", feats, "--labels", labels, "--out", tmp_path / "cv", "--model", "auto",
                     "--folds", "2", "--repeats", "1", "--epochs", "3", "--ensemble", "1", "--device", "cpu")
    assert crossed.exit_code == 0, crossed.stderr
    per_fold = json.loads((tmp_path / "cv" / "metrics.json").read_text())["per_fold"]
    chosen = [choice_label(fold["architecture_choice"]) for fold in per_fold]  # a blend names kme's weight
    counts = ", ".join(f"{name} in {chosen.count(name)}" for name in sorted(set(chosen)))
    assert f"--model auto chose {counts} of 2 folds" in " ".join(crossed.stderr.split())


def test_clam_instance_loss_skips_single_patch_bags() -> None:
    model = build_model(ModelConfig(architecture="clam-sb", in_dim=DIM, hidden_dim=8, attention_dim=4))
    x, mask, targets = collate([Bag("a", torch.randn(1, DIM), 1, "a")], torch.device("cpu"))
    assert torch.isfinite(model.loss(model(x, mask), targets, mask, None))


def test_mnist_bags_small_version_with_default_options(tmp_path: Path) -> None:
    """The protocol of benchmarks/mnist_bags.py at 100 training bags and 200 test bags, with
    every default; the patch classifier's scores find the 9s inside the positive test bags."""
    feats, labels = write_digit_bags(tmp_path, n_train=100, n_test=200, seed=0)
    result = train(feats, labels, TrainOptions(seed=0), torch.device("cpu"))
    assert result.metrics["test"]["n"] == 200
    assert result.metrics["test"]["auc"] >= 0.93
    localisation = []
    with torch.inference_mode():
        for features, label, is_nine in digit_bags(200, "test", seed=1):
            if label and 0 < is_nine.sum() < len(is_nine):
                scores = result.model.instance_scores(torch.from_numpy(features))[:, 1].numpy()
                localisation.append(roc_auc_score(is_nine, scores))
    assert np.mean(localisation) >= 0.9


def test_stored_metrics_are_what_predict_gives(tmp_path: Path) -> None:
    feats, labels = synthetic_store(tmp_path, n_bags=40)
    out = tmp_path / "model.pt"
    trained = invoke("train", "--features", feats, "--labels", labels, "--out", out, "--epochs", "10",
                     "--ensemble", "2", "--device", "cpu", "--json")
    assert trained.exit_code == 0, trained.stderr
    stored = json.loads(trained.stdout)["metrics"]["test"]
    predicted = invoke("predict", "--model", out, "--features", feats, "--labels", labels, "--device", "cpu")
    rows = [r for r in csv.DictReader(predicted.stdout.splitlines()) if r["split"] == "test"]
    targets = np.array([r["label"] == "pos" for r in rows], dtype=int)
    probs = np.array([[float(r["prob_neg"]), float(r["prob_pos"])] for r in rows])
    recomputed = classification_metrics(targets, probs)
    assert len(rows) == stored["n"] == 8
    assert recomputed["confusion"] == stored["confusion"]
    for key in ("auc", "accuracy", "balanced_accuracy", "f1"):
        assert recomputed[key] == pytest.approx(stored[key], abs=1e-9), key


@pytest.mark.parametrize("scaling", ["z", "pooled"])
def test_scaling_lives_in_the_model_and_makes_training_scale_free(tmp_path: Path, scaling: str) -> None:
    """Features 300x larger and shifted give the same model answers, because the statistics
    of the training patches are taken out first and applied again at prediction time."""
    feats, labels = synthetic_store(tmp_path, n_bags=40)
    source = stores.FeatureSource(feats)
    scaled_entries = []
    for slide_id in source.slide_ids:
        data = source.load(slide_id)
        scaled_entries.append((slide_id, data.coords, data.features * 300.0 - 1000.0))
    scaled = tmp_path / "scaled.h5"
    stores.write_feature_store(scaled, scaled_entries, backbone="synthetic")
    options = TrainOptions(epochs=5, ensemble=1, seed=3, standardise=scaling)  # one scaling for both recipes
    plain, big = train(feats, labels, options, torch.device("cpu")), train(scaled, labels, options, torch.device("cpu"))
    mean = big.checkpoint["state_dict"]["members.0.feature_mean"]
    train_ids = set(big.checkpoint["config"]["slides"]["train"])
    patches = np.concatenate([e[2] for e in scaled_entries if e[0] in train_ids])
    assert np.allclose(mean.numpy(), patches.mean(0), rtol=1e-4, atol=1e-2)
    assert plain.metrics["test"]["auc"] == big.metrics["test"]["auc"]
    with torch.inference_mode():
        x = torch.from_numpy(source.load("bag_004").features)
        p_plain = torch.softmax(plain.model.bag(x)[0], -1)
        p_big = torch.softmax(big.model.bag(x * 300.0 - 1000.0)[0], -1)
    assert torch.allclose(p_plain, p_big, atol=1e-3)


def test_pooled_scaling_keeps_the_dimensions_relative_scales() -> None:
    """'pooled' divides every dimension by one sd (the root of their mean variance), so a
    dimension 100x wider than another stays 100x wider; 'z' makes both sd 1."""
    rng = np.random.default_rng(0)
    bags = [Bag(f"b{i}", torch.from_numpy((rng.normal(size=(50, 2)) * [1.0, 100.0] + [5.0, -3.0]).astype(np.float32)),
                0, f"b{i}") for i in range(4)]
    everything = torch.cat([b.features for b in bags]).double()
    mean, std = feature_statistics(bags, "pooled")
    assert torch.allclose(mean.double(), everything.mean(0), atol=1e-4)
    assert torch.allclose(std.double(), everything.var(0, unbiased=False).mean().sqrt().expand(2), rtol=1e-5)
    scaled = (everything - mean) / std
    assert scaled.std(0)[1] / scaled.std(0)[0] == pytest.approx(float(everything.std(0)[1] / everything.std(0)[0]))
    _, z_std = feature_statistics(bags, "z")
    assert torch.allclose(((everything - mean) / z_std).std(0, unbiased=False), torch.ones(2, dtype=torch.float64),
                          atol=1e-5)


def test_a_model_file_of_another_format_is_refused_in_one_line(tmp_path: Path) -> None:
    feats, labels = synthetic_store(tmp_path, n_bags=12)
    out = tmp_path / "model.pt"
    assert invoke("train", "--features", feats, "--labels", labels, "--out", out, "--epochs", "1", "--ensemble", "1",
                  "--device", "cpu").exit_code == 0
    checkpoint = torch.load(out, weights_only=True)
    torch.save({**checkpoint, "format_version": 1}, out)
    result = invoke("predict", "--model", out, "--features", feats, "--device", "cpu")
    assert result.exit_code == 2 and "model format 1" in result.stderr and "train it again" in result.stderr


def test_format_2_3_and_4_model_files_still_load(tmp_path: Path) -> None:
    """Files from before the recipe ensemble (format 2: no `recipes`, every head with the
    share the file records), from before named scalings (format 3: recipes as [share,
    standardised]) and from before mixed families (format 4: [share, scaling]) load and
    predict as they did."""
    from mil_cli.inference import load_model

    feats, labels = synthetic_store(tmp_path, n_bags=12)
    result = train(feats, labels, TrainOptions(epochs=2, ensemble=2, model=ModelConfig(instance_loss=0.0)),
                   torch.device("cpu"))
    assert result.checkpoint["config"]["recipes"] == [[0.0, "z", "abmil", 0.5]] * 2
    format_2 = {k: v for k, v in result.checkpoint["config"].items() if k != "recipes"}
    format_3 = {**result.checkpoint["config"], "recipes": [[0.0, True]] * 2}
    format_4 = {**result.checkpoint["config"], "recipes": [[0.0, "z"]] * 2}
    x = torch.from_numpy(stores.FeatureSource(feats).load("bag_001").features)
    for version, config in ((2, format_2), (3, format_3), (4, format_4)):
        path = tmp_path / f"format{version}.pt"
        torch.save({**result.checkpoint, "format_version": version, "config": config}, path)
        loaded = load_model(path, torch.device("cpu"))
        assert [m.config.instance_loss for m in loaded.module.members] == [0.0, 0.0]
        with torch.inference_mode():
            assert torch.allclose(loaded.module.bag(x)[0], result.model.bag(x)[0])


def test_cross_validation_writes_the_layout_and_repeats_exactly(tmp_path: Path) -> None:
    feats, labels = write_digit_bags(tmp_path / "data", n_train=40, n_test=10, seed=1)
    runs = []
    for name in ("a", "b"):
        result = invoke("train", "--features", feats, "--labels", labels, "--folds", "3", "--repeats", "2",
                        "--out", tmp_path / name, "--epochs", "8", "--ensemble", "2", "--device", "cpu",
                        "--seed", "3", "--instance-loss", "0.5")  # no inner CV: test_same_seed_same_numbers has it
        assert result.exit_code == 0, result.stderr
        runs.append(json.loads((tmp_path / name / "metrics.json").read_text()))
    assert runs[0] == runs[1]
    out = tmp_path / "a"
    assert sorted(p.parent.name for p in out.glob("fold_*/model.pt")) == [f"fold_{i}" for i in range(6)]
    assert Image.open(out / "roc.png").size[0] > 400
    oof = list(csv.DictReader(open(out / "oof_predictions.csv")))
    assert len(oof) == 2 * 40 and {row["fold"] for row in oof} == {"0", "1", "2"}
    assert all(row["slide_id"].startswith("train_") for row in oof)  # split=test slides stay out of the folds
    splits = list(csv.DictReader(open(out / "splits.csv")))
    for repeat in ("0", "1"):
        held_out = [r["slide_id"] for r in splits if r["repeat"] == repeat and r["role"] == "test"]
        assert sorted(held_out) == sorted({r["slide_id"] for r in splits if r["slide_id"].startswith("train_")})
    metrics = runs[0]
    assert len(metrics["per_fold"]) == 6 and set(metrics["mean_std"]) == {"auc", "balanced_accuracy", "accuracy", "f1"}
    per_repeat = [metrics["out_of_fold"][r]["auc"] for r in ("0", "1")]
    spread = metrics["over_repeats"]["auc"]
    assert spread["mean"] == pytest.approx(np.mean(per_repeat))
    assert spread["std"] == pytest.approx(np.std(per_repeat, ddof=1)) and spread["sem"] == pytest.approx(spread["std"] / np.sqrt(2))
    assert metrics["holdout_ensemble"]["n"] == 10 and len(metrics["holdout_ensemble"]["confusion"]) == 2
    predicted = invoke("predict", "--model", out, "--features", feats, "--device", "cpu")
    assert predicted.exit_code == 0 and len(predicted.stdout.strip().splitlines()) == 51


def test_training_errors_are_clear(tmp_path: Path) -> None:
    feats, _ = synthetic_store(tmp_path, n_bags=6)
    one_class = tmp_path / "one.csv"
    one_class.write_text("slide_id,label\nbag_000,pos\nbag_001,pos\n")
    result = invoke("train", "--features", feats, "--labels", one_class, "--device", "cpu")
    assert result.exit_code == 2 and "only one class" in result.stderr
    labels = tmp_path / "two.csv"
    labels.write_text("slide_id,label\nbag_000,pos\nbag_001,neg\nbag_002,pos\nbag_003,neg\n")
    result = invoke("train", "--features", feats, "--labels", labels, "--model", "transformer", "--device", "cpu")
    assert result.exit_code == 2 and "--model transformer" in result.stderr
    result = invoke("train", "--features", feats, "--labels", labels, "--folds", "3", "--device", "cpu")
    assert result.exit_code == 2 and "3-fold cross-validation needs at least 3 training slides of every class" in result.stderr


def test_left_to_milcli_every_recipe_trains_and_the_model_file_rebuilds_each_member(tmp_path: Path) -> None:
    """Left to milcli, abmil heads train `ensemble` heads with each of the two recipes, all
    averaged; the model file records each member's recipe, and predict rebuilds the very
    ensemble (share-0 members predict from the attention stream alone, raw members keep an
    identity scaling). Setting the scaling or the share narrows the recipes."""
    from mil_cli import training
    from mil_cli.inference import load_model

    feats, labels = synthetic_store(tmp_path, n_bags=24)
    abmil = ModelConfig(architecture="abmil")
    result = train(feats, labels, TrainOptions(epochs=2, ensemble=2, model=abmil), torch.device("cpu"))
    recipes = result.checkpoint["config"]["recipes"]
    assert recipes == [[0.5, "z", "abmil", 0.25]] * 2 + [[0.0, "none", "abmil", 0.25]] * 2
    assert result.metrics["recipes"] == ["0.5 z"] * 2 + ["0.0 none"] * 2
    state = result.checkpoint["state_dict"]
    for m, (share, scaling, _, _) in enumerate(recipes):
        assert result.model.members[m].config.instance_loss == share
        std = state[f"members.{m}.feature_std"]
        assert bool((std == 1).all()) is (scaling == "none")  # synthetic sd is never 1
        assert bool((std == std[0]).all()) is (scaling != "z")  # pooled: one sd everywhere
    path = tmp_path / "model.pt"
    training.save_checkpoint(result.checkpoint, path)
    loaded = load_model(path, torch.device("cpu"))
    assert [m.config.instance_loss for m in loaded.module.members] == [recipe[0] for recipe in recipes]
    with torch.inference_mode():
        x = torch.from_numpy(stores.FeatureSource(feats).load("bag_003").features)
        assert torch.allclose(loaded.module.bag(x)[0], result.model.bag(x)[0])
        # the members differ: the recipes' answers are not one model's
        probs = [torch.softmax(m.bag(x)[0], -1)[1] for m in result.model.members]
        assert len({round(float(p), 6) for p in probs}) == len(probs)

    def recipes_for(options: TrainOptions, n_bags: int = 24) -> list:
        return training.ensemble_recipes(options, Classification(["neg", "pos"]), n_bags)

    share = ModelConfig(architecture="abmil", instance_loss=0.2)
    assert recipes_for(TrainOptions(ensemble=1, standardise="none", model=abmil)) == [(0.5, "none"), (0.0, "none")]
    assert recipes_for(TrainOptions(ensemble=1, model=share)) == [(0.2, "z")]
    assert recipes_for(TrainOptions(ensemble=1, standardise="pooled", model=share)) == [(0.2, "pooled")]
    assert recipes_for(TrainOptions(ensemble=2, model=ModelConfig(architecture="mean"))) == [(0.5, "z")] * 2
    assert recipes_for(TrainOptions(ensemble=1, model=abmil), training.RECIPE_ENSEMBLE_MAX_BAGS + 1) == [(0.5, "z")]
    with pytest.raises(MilcliError, match="--standardise"):
        TrainOptions(standardise="minmax")


def test_with_no_patch_classifier_share_it_is_a_probe_that_shapes_nothing() -> None:
    """instance_loss 0: the patch classifier still learns (its scores localise) but its loss
    sends no gradient into the embedding or the attention, and the prediction ignores it."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(architecture="abmil", in_dim=DIM, instance_loss=0.0, dropout=0.0))
    x, mask = torch.randn(4, 12, DIM), torch.ones(4, 12, dtype=torch.bool)
    targets = torch.tensor([0, 1, 0, 1])
    out = model(x, mask)
    assert torch.equal(out.logits, out.pooled_logits)
    total = model.loss(out, targets, mask, None)
    bag_only = torch.nn.functional.cross_entropy(out.pooled_logits, targets)
    shared = [p for name, p in model.named_parameters() if not name.startswith("instance_classifier")]
    for a, b in zip(torch.autograd.grad(total, shared, retain_graph=True), torch.autograd.grad(bag_only, shared)):
        assert torch.allclose(a, b)
    probe = torch.autograd.grad(total, model.instance_classifier.weight)[0]
    assert probe.abs().sum() > 0
