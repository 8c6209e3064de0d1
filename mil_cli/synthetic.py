"""Datasets with a known answer, for benchmarks and tests of the MIL heads.

`digit_bags` rebuilds the MNIST-bags protocol of Ilse et al. (2018) from scikit-learn's
bundled 8 x 8 digits (no download): a bag is a set of digit images, positive when it holds
at least one target digit. Bag sizes are Gaussian (mean 10, sd 2, at least 2); half the bags
are positive; training and test bags draw on disjoint halves of the digits, so a test bag
holds only images the model never saw. Instance features are the 64 pixel intensities.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from mil_cli import stores


def _digit_pools(target: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{'train' | 'test': (target-digit images, other images)}, each (n, 64) float32 in [0, 1]."""
    digits = load_digits()
    images = (digits.data / 16.0).astype(np.float32)
    train_idx, test_idx = train_test_split(np.arange(len(images)), test_size=0.5, stratify=digits.target,
                                           random_state=0)
    pools = {}
    for name, idx in (("train", train_idx), ("test", test_idx)):
        is_target = digits.target[idx] == target
        pools[name] = (images[idx][is_target], images[idx][~is_target])
    return pools


LabelledBag = tuple[np.ndarray, int, np.ndarray]  # (N, D) features, bag label, (N,) instance labels


def digit_bags(n_bags: int, pool: str, seed: int, target: int = 9, mean_size: float = 10.0,
               sd_size: float = 2.0) -> list[LabelledBag]:
    """`n_bags` bags, half positive, from the 'train' or 'test' digits; an instance is
    positive when it is the target digit."""
    rng = np.random.default_rng(seed)
    targets, others = _digit_pools(target)[pool]
    bags = []
    for i in range(n_bags):
        size = max(2, int(round(rng.normal(mean_size, sd_size))))
        positive = i % 2 == 0
        # as if drawn at random and kept only when a target appears: at least one, ~10 % more
        n_target = 1 + rng.binomial(size - 1, 0.1) if positive else 0
        chosen = np.concatenate([targets[rng.integers(0, len(targets), n_target)],
                                 others[rng.integers(0, len(others), size - n_target)]])
        order = rng.permutation(size)
        bags.append((chosen[order], int(positive), (np.arange(size) < n_target)[order]))
    return bags


def key_instance_bags(n_bags: int, dim: int, witness_rate: float, signal: float, seed: int,
                      mean_size: int = 30, large_range: bool = False) -> list[LabelledBag]:
    """Bags whose label is carried by a few key instances, half of them positive.

    Instances come from a mixture of 8 Gaussian clusters (unit noise, centres drawn with unit
    sd per dimension); a quarter of every bag, positive or not, comes from one salient
    'distractor' cluster (centre drawn with sd 2). In a positive bag a `witness_rate` share of the instances (at
    least one) is moved `signal` noise-sds along a hidden direction. Bag sizes are Poisson
    around `mean_size` (at least 4). `large_range` rescales every dimension by a factor
    between 0.1 and 300 and shifts it by up to +-300, as raw descriptors such as MUSK's are."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1, (8, dim))
    distractor = rng.normal(0, 2, dim)
    direction = rng.normal(0, 1, dim)
    direction /= np.linalg.norm(direction)
    scale = 10 ** rng.uniform(-1, 2.5, dim) if large_range else np.ones(dim)
    shift = rng.uniform(-300, 300, dim) if large_range else np.zeros(dim)
    bags = []
    for i in rng.permutation(n_bags):
        positive = i % 2 == 0
        size = max(4, int(rng.poisson(mean_size)))
        x = centres[rng.integers(0, 8, size)] + rng.normal(0, 1, (size, dim))
        n_distractors = size // 4
        x[:n_distractors] = distractor + rng.normal(0, 1, (n_distractors, dim))
        key = np.zeros(size, dtype=bool)
        if positive:
            n_key = max(1, int(rng.binomial(size, witness_rate)))
            key[size - n_key:] = True
            x[key] += signal * direction
        order = rng.permutation(size)
        bags.append(((x[order] * scale + shift).astype(np.float32), int(positive), key[order]))
    return bags


def tumour_share_bags(n_bags: int, seed: int, dim: int = 16, mean_size: int = 24,
                      max_share: float = 0.5, signal: float = 3.0) -> list[tuple[np.ndarray, float, np.ndarray]]:
    """Bags with a hidden 'tumour' share: each bag draws a share uniformly in [0, max_share]
    and that share of its instances (rounded) is moved `signal` noise-sds along a hidden
    direction; the rest are noise around 4 tissue clusters. Returns (features, the bag's
    actual tumour fraction, which instances are tumour) per bag: the targets of the
    regression and survival checks are functions of the fraction."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1, (4, dim))
    direction = rng.normal(0, 1, dim)
    direction /= np.linalg.norm(direction)
    bags = []
    for _ in range(n_bags):
        size = max(8, int(rng.poisson(mean_size)))
        n_key = int(round(rng.uniform(0, max_share) * size))
        x = centres[rng.integers(0, 4, size)] + rng.normal(0, 1, (size, dim))
        key = np.arange(size) < n_key
        x[key] += signal * direction
        order = rng.permutation(size)
        bags.append((x[order].astype(np.float32), n_key / size, key[order]))
    return bags


def patient_slides(n_patients: int, signal: float, seed: int = 0) -> tuple[list[np.ndarray], list[tuple[str, str, str]],
                                                                     list[int]]:
    """Patients of 1-4 slides of key-instance bags (32-d, 10 % witnesses, ~20 patches); a
    positive patient's signal is in one of its slides only, the others are negative slides.
    Returns the slides' features, (slide_id, patient_id, label) rows, and the index of each
    patient's signal-bearing (or, for a negative patient, first-drawn) slide."""
    rng = np.random.default_rng(seed)
    pool = key_instance_bags(n_patients * 5, dim=32, witness_rate=0.1, signal=signal, seed=seed, mean_size=20)
    positives = [x for x, y, _ in pool if y == 1]
    negatives = [x for x, y, _ in pool if y == 0]
    features: list[np.ndarray] = []
    rows: list[tuple[str, str, str]] = []
    right = []
    for p in range(n_patients):
        label = "positive" if p % 2 == 0 else "negative"
        slides = [positives.pop() if label == "positive" else negatives.pop()]
        slides += [negatives.pop() for _ in range(int(rng.integers(0, 4)))]
        for k in rng.permutation(len(slides)):
            if k == 0:
                right.append(len(features))
            rows.append((f"p{p:03d}_s{len(rows):04d}", f"p{p:03d}", label))
            features.append(slides[k])
    return features, rows, right


def survival_times(fractions: np.ndarray, seed: int, log_hazard_ratio: float = 12.0,
                   censored_share: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    """(time, event) with exponential event times whose log hazard rises by
    `log_hazard_ratio` per unit of tumour fraction, censored at uniform random times chosen so
    that about `censored_share` of the bags are censored."""
    rng = np.random.default_rng(seed)
    event_times = rng.exponential(1.0, len(fractions)) / np.exp(log_hazard_ratio * fractions)
    limit = np.quantile(event_times, 1 - censored_share) * 2
    censor_times = rng.uniform(0, limit, len(fractions))
    return np.minimum(event_times, censor_times), (event_times <= censor_times).astype(int)


def write_digit_bags(folder: Path, n_train: int, n_test: int = 500, seed: int = 0) -> tuple[Path, Path]:
    """A feature store and labels CSV holding `n_train` training bags and `n_test` test bags
    (marked `test` in the split column)."""
    folder.mkdir(parents=True, exist_ok=True)
    rows, entries = ["slide_id,label,split"], []
    for pool, n in (("train", n_train), ("test", n_test)):
        for i, (features, label, _) in enumerate(digit_bags(n, pool, seed=seed * 1000 + (pool == "test"))):
            slide_id = f"{pool}_{i:04d}"
            coords = np.stack([np.arange(len(features)) * 8, np.zeros(len(features))], axis=1).astype(np.int64)
            entries.append((slide_id, coords, features))
            rows.append(f"{slide_id},{'positive' if label else 'negative'},{'test' if pool == 'test' else ''}")
    features_path, labels_path = folder / "feats.h5", folder / "labels.csv"
    stores.write_feature_store(features_path, entries, backbone="digits-8x8-pixels")
    labels_path.write_text("\n".join(rows) + "\n")
    return features_path, labels_path
