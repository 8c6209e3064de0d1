"""Embedding throughput and memory: end-to-end `embed_store` patches/s against the model-only
patches/s of the same backbone, batch size and device in the same run (their ratio is the
data pipeline's efficiency), and peak RSS when embedding 1 vs 10 slides.

End-to-end time covers everything `milcli embed` does: model build, patch reads and JPEG
decoding, the forward passes, the writes and the final index update; "after model load" leaves
out the one-off model build (imports, weights). Model-only time is the forward pass (with the
on-device normalisation and reading the features back) over the same patches, decoded
beforehand and held in memory, timed in the same rounds, alternating with the end-to-end runs
so that both see the same machine.

    python benchmarks/embed.py [--slides sample_data/slides] [--copies 5] [--device auto]
                               [--backbone efficientnet-lite0] [--batch-size 64] [--workers N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from mil_cli import stores
from mil_cli.backbones import get_backbone
from mil_cli.devices import resolve_device
from mil_cli.embedding import (BlockReader, EmbedOptions, Embedder, block_specs, default_workers, embed_store,
                               pending_jobs)
from mil_cli.reports import StageReport
from mil_cli.slides import find_slides
from mil_cli.tiling import TilingOptions, tile_slides

ROOT = Path(__file__).resolve().parents[1]


def make_tiles(slides: Path, copies: int, folder: Path, options: TilingOptions = TilingOptions()) -> Path:
    """Tile `copies` links of each slide under `slides` (a folder or one file), with distinct ids."""
    links = folder / "slides"
    links.mkdir(parents=True, exist_ok=True)
    for k in range(copies):
        for path in find_slides([slides]):
            (links / f"{path.stem}_copy{k}{path.suffix}").symlink_to(path.resolve())
    tiles = folder / "tiles.h5"
    tile_slides([links], tiles, options, workers=2)
    return tiles


def decoded_batches(tiles: Path, batch_size: int, input_size: int, limit: int | None = None,
                    resize: bool = True) -> list[torch.Tensor]:
    """The tile store's patches (the first `limit`, or all), decoded once and kept in memory as
    uint8 channels-last batches: resized as the CPU path's reader does, or (not `resize`) at
    their read size, as the GPU path receives them."""
    source = stores.FeatureSource(tiles, kind=stores.TILES_FORMAT)
    reader = BlockReader(input_size, resize)
    blocks, count = [], 0
    for spec in block_specs(pending_jobs(source, set(), StageReport())):
        if limit is not None and count >= limit:
            break
        blocks.append(reader[spec][0])
        count += len(blocks[-1])
    return list(torch.cat(blocks)[:limit].split(batch_size))


def model_only(embedder: Embedder, batches: list[torch.Tensor]) -> float:
    """Patches/s of the forward pass alone over the same patches, already decoded in memory."""
    if embedder.device.type == "cuda":
        batches = [b.pin_memory() for b in batches]
    embedder(batches[0])
    synchronize(embedder.device)
    start = time.perf_counter()
    for batch in batches:
        embedder(batch).float().cpu()
    synchronize(embedder.device)
    return sum(len(b) for b in batches) / (time.perf_counter() - start)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_rss_mib() -> dict:
    """Peak resident memory of this process (decode workers, when any, are extra)."""
    return {"main": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def memory_run(args: argparse.Namespace) -> None:
    """Child mode: tile and embed `--memory-slides` copies of `--memory-slide`, print peak RSS."""
    with tempfile.TemporaryDirectory() as tmp:
        # at 0.25 µm/px the CMU crop gives ~160 patches, so 1 slide already fills whole batches
        tiles = make_tiles(args.memory_slide, args.memory_slides, Path(tmp), TilingOptions(target_mpp=0.25))
        report = embed_store(tiles, Path(tmp) / "feats.h5", get_backbone(args.backbone), resolve_device(args.device),
                             EmbedOptions(batch_size=args.batch_size, workers=args.workers))
        patches = sum(len(source.load(s, with_features=False).coords)
                      for source in [stores.FeatureSource(tiles, kind=stores.TILES_FORMAT)] for s in source.slide_ids)
        print(json.dumps({"slides": len(report.done), "patches": patches, **peak_rss_mib()}))


def peak_memory(args: argparse.Namespace, slides: int) -> dict:
    child = subprocess.run([sys.executable, __file__, "--memory-slides", str(slides), "--memory-slide",
                            str(args.memory_slide), "--backbone", args.backbone, "--device", args.device,
                            "--batch-size", str(args.batch_size)]
                           + (["--workers", str(args.workers)] if args.workers is not None else []),
                           capture_output=True, text=True, check=True)
    return json.loads(child.stdout.strip().splitlines()[-1])


def print_stain_cost(batches: list, device: torch.device) -> None:
    """patches/s of each --stain method alone, on the device, over the decoded batches."""
    from mil_cli.stain import METHODS, normalise

    for method in METHODS:
        normalise(batches[0].to(device).permute(0, 3, 1, 2).float(), method)  # warm-up
        start, count = time.perf_counter(), 0
        for images in batches:
            out = normalise(images.to(device).permute(0, 3, 1, 2).float(), method)
            count += len(images)
        float(out.sum())  # wait for the device
        print(f"--stain {method}: {count / (time.perf_counter() - start):,.0f} patches/s (normalisation alone)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slides", type=Path, default=ROOT / "sample_data" / "slides")
    parser.add_argument("--copies", type=int, default=2, help="each slide is embedded this many times per round")
    parser.add_argument("--backbone", default="efficientnet-lite0")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--memory-slide", type=Path, default=ROOT / "tests" / "data" / "CMU-1-Small-Region.svs",
                        help="the slide embedded 1 and 10 times for the peak-memory figures")
    parser.add_argument("--memory-slides", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_slides:
        memory_run(args)
        return

    memory = [peak_memory(args, n) for n in (1, 10)]  # first: a child's peak starts at its parent's size
    device = resolve_device(args.device)
    backbone = get_backbone(args.backbone)
    options = EmbedOptions(batch_size=args.batch_size, workers=args.workers)
    rounds = []
    with tempfile.TemporaryDirectory() as tmp:
        tiles = make_tiles(args.slides, args.copies, Path(tmp))
        source = stores.FeatureSource(tiles, kind=stores.TILES_FORMAT)
        total = sum(len(source.load(s, with_features=False).coords) for s in source.slide_ids)
        embedder = Embedder(backbone, device)
        batches = decoded_batches(tiles, args.batch_size, backbone.input_size, resize=device.type != "cuda")
        for _ in range(args.rounds):  # alternate, so both figures see the same machine state
            report = embed_store(tiles, Path(tmp) / "feats.h5", backbone, device, options, overwrite=True)
            model = model_only(embedder, batches)
            rounds.append((total / report.seconds, total / report.phases["embedding"], model))
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), "
          f"torch threads {torch.get_num_threads()}, decode workers "
          f"{args.workers if args.workers is not None else default_workers(device)}, backbone {backbone.name}, "
          f"batch {args.batch_size}, {total} patches of {len(source.slide_ids)} slides, {args.rounds} rounds")
    for i, (whole, steady, model) in enumerate(rounds, 1):
        print(f"round {i}: end-to-end {whole:.1f} patches/s (after model load {steady:.1f}), "
              f"model-only {model:.1f} patches/s, efficiency {whole / model:.2f} ({steady / model:.2f})")
    whole, steady, model = (statistics.median(r[k] for r in rounds) for k in range(3))
    print(f"median: end-to-end {whole:.1f} patches/s, after model load {steady:.1f}, model-only {model:.1f}")
    print_stain_cost(batches, device)
    print(f"efficiency, median of the rounds' ratios: {statistics.median(r[0] / r[2] for r in rounds):.2f} "
          f"(after model load {statistics.median(r[1] / r[2] for r in rounds):.2f})")
    for peak in memory:
        print(f"peak RSS embedding {peak['slides']:>2} x {args.memory_slide.name} ({peak['patches']} patches): "
              f"{peak['main']:.0f} MiB")


if __name__ == "__main__":
    main()
