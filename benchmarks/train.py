"""Training speed: seconds per epoch of batched, masked training (several bags per step,
bf16 autocast where the device has fast bf16) against one bag per step in fp32, on synthetic
bags (default 500 bags x 2000 patches x 1280 dims, held in memory), with the held-out AUC
each reaches so the speed is compared at equal quality.

Positive bags hold a few "tumour" patches whose features are shifted along a random
direction; the rest is Gaussian noise, so AUC depends on finding those patches.

    python benchmarks/train.py [--bags 500] [--patches 2000] [--dim 1280] [--epochs 6] [--device auto]
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import numpy as np
import torch

from mil_cli.console import set_quiet
from mil_cli.devices import fast_bf16, resolve_device
from mil_cli.metrics import auc
from mil_cli.config import TrainOptions
from mil_cli.tasks import Classification
from mil_cli.training import Bag, evaluate, fit


def synthetic_bags(n_bags: int, patches: int, dim: int, seed: int) -> list[Bag]:
    direction = np.random.default_rng(12345).standard_normal(dim).astype(np.float32)  # the same for every split
    direction /= np.linalg.norm(direction)
    rng = np.random.default_rng(seed)
    bags = []
    for i in range(n_bags):
        features = rng.standard_normal((patches, dim), dtype=np.float32)
        positive = i % 2 == 0
        if positive:
            key = rng.choice(patches, size=max(1, patches // 20), replace=False)  # 5 % tumour patches
            features[key] += 4.0 * direction
        bags.append(Bag(f"bag_{i}", torch.from_numpy(features), int(positive), f"bag_{i}"))
    return bags


def run(name: str, options: TrainOptions, train: list[Bag], val: list[Bag], test: list[Bag],
        device: torch.device) -> None:
    start = time.perf_counter()
    fitted = fit(train, val, Classification(["0", "1"]), options, device)
    seconds = time.perf_counter() - start
    _, probs = evaluate(fitted.model, test, device, fitted.task)
    test_auc = auc(np.array([b.target for b in test]), probs)
    epochs = sum(len(h) for h in fitted.histories)
    print(f"{name:<34} {seconds / epochs:6.2f} s/epoch over {epochs} epochs ({len(fitted.histories)} seeds), "
          f"test AUC {test_auc:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bags", type=int, default=500)
    parser.add_argument("--patches", type=int, default=2000)
    parser.add_argument("--dim", type=int, default=1280)
    parser.add_argument("--epochs", type=int, default=6, help="fixed epochs per configuration (no early stop)")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    set_quiet(True)
    device = resolve_device(args.device)
    start = time.perf_counter()
    bags = synthetic_bags(args.bags, args.patches, args.dim, seed=0)
    test = synthetic_bags(100, args.patches, args.dim, seed=1)
    train, val = bags[: int(0.8 * len(bags))], bags[int(0.8 * len(bags)):]
    print(f"{args.bags} bags x {args.patches} patches x {args.dim} dims made in {time.perf_counter() - start:.0f} s; "
          f"device {device}, torch threads {torch.get_num_threads()}, fast bf16: {fast_bf16(device)}")
    for name, options in configurations(args.epochs):
        run(name, options, train, val, test, device)


def configurations(epochs: int) -> list[tuple[str, TrainOptions]]:
    """One bag per step in fp32 against 8 bags per step in fp32 and in the device's precision;
    one head each, one recipe (the patch-classifier share fixed)."""
    base = TrainOptions(epochs=epochs, patience=epochs, seed=0, ensemble=1, batch_size=8,
                        model=replace(TrainOptions().model, instance_loss=0.5))
    return [("one bag per step, fp32, lr 2e-4", replace(base, batch_size=1, max_patches=None, precision="fp32",
                                                        lr=2e-4)),
            ("batched (8 bags), fp32", replace(base, precision="fp32")),
            ("batched (8 bags), auto precision", base)]


if __name__ == "__main__":
    main()
