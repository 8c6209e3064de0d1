"""Pick the torch device and the mixed precision that suits it."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import random

import numpy as np
import torch

from mil_cli.errors import MilcliError


def resolve_device(spec: str) -> torch.device:
    """`auto` takes CUDA when present; `cuda[:N]` must exist; `cpu` always works."""
    spec = spec.strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise MilcliError(f"--device {spec}: CUDA is not available on this machine (use --device cpu or auto)")
        device = torch.device(spec)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise MilcliError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) present")
        return device
    raise MilcliError(f"--device {spec}: expected auto, cpu, cuda or cuda:N")


def autocast(device: torch.device, precision: str = "bf16") -> contextlib.AbstractContextManager:
    """CUDA autocast in `precision` ("bf16", falling back to fp16 on GPUs without it; "fp16";
    "fp32" for none); the CPU always runs fp32."""
    if device.type != "cuda" or precision == "fp32":
        return contextlib.nullcontext()
    use_bf16 = precision == "bf16" and torch.cuda.is_bf16_supported()
    return torch.autocast("cuda", dtype=torch.bfloat16 if use_bf16 else torch.float16)


def fast_bf16(device: torch.device) -> bool:
    """Whether bf16 matrix work is native here: recent GPUs, or CPUs with AVX512-BF16 / AMX."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def training_autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast for training steps when asked for, or with "auto" on a GPU with native
    bf16; else fp32. "auto" keeps CPUs in fp32 even where they have bf16 units, so the same
    seed gives the same model on every CPU model."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda" and fast_bf16(device)):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


GLIBC_M_TRIM_THRESHOLD, GLIBC_M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD_BYTES = 1 << 30
NEVER_TRIM = -1  # mallopt(M_TRIM_THRESHOLD, -1): never shrink the heap


@functools.cache
def keep_freed_memory() -> bool:
    """Stop glibc from handing freed activation memory back to the OS after every batch.

    By default each tensor above 32 MiB gets its own mmap, unmapped when freed, and the heap
    is shrunk whenever its free top passes a threshold, so every forward pass page-faults its
    activations in again: on 2 CPU cores that more than halved EfficientNet-Lite0's
    throughput, most of the lost time being system time. Large blocks now come from the heap
    and the heap never shrinks, so the process keeps its peak working set (benchmarks/embed.py
    shows the figures). No-op without glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(GLIBC_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
                    and libc.mallopt(GLIBC_M_TRIM_THRESHOLD, NEVER_TRIM))
    except (OSError, AttributeError):
        return False


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
