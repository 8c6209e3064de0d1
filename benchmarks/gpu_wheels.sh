#!/usr/bin/env bash
# Wheels of the milcli dependencies that the device tool's GPU machines lack (they have torch,
# timm, h5py, typer, rich, scikit-image, scikit-learn...), for Python 3.12 on x86-64, into .whl/
# (.gitignore has it): carry `.whl` with the run and install them there as benchmarks/gpu.py says.
# Versions are pinned to ones that work together (tiffslide 3.0 needs zarr 3.1 and tifffile < 2026.5).
# The efficientnet-lite0 weights package (17 MB) is left out to stay under the 64 MiB a run may
# carry; benchmarks/gpu.py then uses the same network with random weights.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
    tiffslide==3.0.1 zarr==3.1.6 numcodecs==0.16.6 imagecodecs==2026.3.6 tifffile==2026.3.3 shapely==2.2.0 \
    donfig==0.8.1.post1 google-crc32c==1.7.1
du -sh .whl
