"""MNIST-bags (Ilse et al. 2018) rebuilt from scikit-learn's 8 x 8 digits: test AUC of
`abmil` with milcli's default training settings, for 50/100/200/500 training bags and 3
seeds, each scored on 500 test bags of held-out digits (mil_cli/synthetic.py has the protocol).

    python benchmarks/mnist_bags.py [--bags 50 100 200 500] [--seeds 3] [--model abmil]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from mil_cli.console import set_quiet
from mil_cli.config import ModelConfig, TrainOptions
from mil_cli.synthetic import write_digit_bags
from mil_cli.training import train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bags", type=int, nargs="+", default=[50, 100, 200, 500])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--model", default="abmil")
    args = parser.parse_args()
    set_quiet(True)
    print(f"model {args.model}, default training settings {TrainOptions()}")
    for n_bags in args.bags:
        aucs, seconds = [], []
        for seed in range(args.seeds):
            with tempfile.TemporaryDirectory() as tmp:
                features, labels = write_digit_bags(Path(tmp), n_bags, seed=seed)
                start = time.perf_counter()
                result = train(features, labels, TrainOptions(seed=seed, model=ModelConfig(architecture=args.model)),
                               torch.device("cpu"))
                seconds.append(time.perf_counter() - start)
                aucs.append(result.metrics["test"]["auc"])
        print(f"{n_bags:>4} training bags: test AUC {np.mean(aucs):.3f} ± {np.std(aucs, ddof=1):.3f} "
              f"(seeds: {', '.join(f'{a:.3f}' for a in aucs)}), {np.mean(seconds):.1f} s per training")


if __name__ == "__main__":
    main()
