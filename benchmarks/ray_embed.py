"""Slides/s embedding sample_data locally against through Ray with N workers, on this machine.

Each round embeds the same tile store into a fresh feature store twice, alternating: once with
`embed_store` (this process), once with `ray_embed_store` on a Ray instance started here
(`--ray local`) with `--ray-workers N`, each worker taking cores / N CPU threads. Both times are
end to end (model build in every worker, reads, forward passes, store writes and the index update); Ray's
own start-up is paid once, before the rounds, and reported apart. On a 2-core machine expect
no gain: the point of Ray is the path to many GPUs, and this measures its overhead.

    python benchmarks/ray_embed.py [--copies 3] [--rounds 3] [--workers 2]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from embed import make_tiles
from mil_cli import stores
from mil_cli.backbones import get_backbone
from mil_cli.distributed import RayOptions, connect, ray_embed_store
from mil_cli.embedding import EmbedOptions, embed_store

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copies", type=int, default=3, help="copies of the 20 sample slides")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="milcli-ray-bench-"))
    tiles = make_tiles(ROOT / "sample_data" / "slides", args.copies, work)
    source = stores.FeatureSource(tiles, kind=stores.TILES_FORMAT)
    slides = len(source.slide_ids)
    patches = sum(len(source.load(s, with_features=False).coords) for s in source.slide_ids)
    start = time.perf_counter()
    connect("local")
    print(f"Ray start-up: {time.perf_counter() - start:.1f} s; {slides} slides, {patches} patches per run")

    seconds: dict[str, list[float]] = {"local": [], f"Ray x{args.workers}": []}
    for r in range(args.rounds):
        for name in seconds:
            out = work / f"feats_{name.replace(' ', '')}_{r}.h5"
            start = time.perf_counter()
            if name == "local":
                report = embed_store(tiles, out, get_backbone("efficientnet-lite0"), torch.device("cpu"))
            else:
                report = ray_embed_store(tiles, out, "efficientnet-lite0", EmbedOptions(),
                                         RayOptions("local", workers=args.workers))
            seconds[name].append(time.perf_counter() - start)
            assert len(report.done) == slides and not report.failed
        print(f"round {r}: " + ", ".join(f"{name} {times[-1]:.1f} s" for name, times in seconds.items()))
    for name, times in seconds.items():
        median = statistics.median(times)
        print(f"{name:>8}: median {median:.1f} s = {slides / median:.2f} slides/s, {patches / median:.0f} patches/s")


if __name__ == "__main__":
    main()
