"""How fast is `milcli explain --all`? Slides per second of the explain stage (maps, montage,
regions, viewer) over a `milcli run` folder, best of R rounds, and the whole command's wall time
(start-up included).

    python benchmarks/explain_speed.py RUN_DIR [--rounds 3] [--no-viewer]

Make RUN_DIR first with `milcli run sample_data/slides --labels sample_data/labels.csv --out RUN_DIR`.
Target (issue #18): >= 5 slides/s on sample_data on 2 cores.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from mil_cli.devices import available_cores
from mil_cli.explain import ExplainOptions, explain_slides
from mil_cli.inference import load_models
from mil_cli.stores import FeatureSource


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-viewer", action="store_true")
    args = parser.parse_args()
    device = torch.device("cpu")
    models = load_models(args.run / "model.pt", device)
    source = FeatureSource(args.run / "feats.h5")
    options = ExplainOptions(viewer=not args.no_viewer)
    with tempfile.TemporaryDirectory() as scratch:
        rates = []
        for _ in range(args.rounds):
            report = explain_slides(models, source, source.slide_ids, Path(scratch) / "explain", options, device)
            rates.append(len(report.done) / report.seconds)
        start = time.perf_counter()
        command = [sys.executable, "-m", "mil_cli", "explain", "--all", "--model", str(args.run / "model.pt"),
                   "--features", str(args.run / "feats.h5"), "--out", str(Path(scratch) / "cli"), "-q",
                   "--device", "cpu"] + ["--no-viewer"] * args.no_viewer
        subprocess.run(command, check=True)
        wall = time.perf_counter() - start
    print(f"{len(source.slide_ids)} slides, {available_cores()} cores, viewer {'off' if args.no_viewer else 'on'}")
    print(f"explain stage: {max(rates):.2f} slides/s (best of {args.rounds}: "
          + ", ".join(f"{r:.2f}" for r in rates) + ")")
    print(f"whole command (start-up included): {wall:.1f} s, {len(source.slide_ids) / wall:.2f} slides/s")


if __name__ == "__main__":
    main()
