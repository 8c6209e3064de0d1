"""Pick the torch device and the mixed precision that suits it."""

from __future__ import annotations

import os

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


FLOAT16_MAX = 65504.0  # the largest finite float16: stored features and fp16 bags must stay below it
NATIVE_BF16_CAPABILITY = (8, 0)  # Ampere: the first NVIDIA generation with bf16 tensor cores


def native_bf16(capability: tuple[int, int]) -> bool:
    """Whether a CUDA device of this compute capability runs bf16 natively. Not
    torch.cuda.is_bf16_supported(): it says True on Turing and Volta too (where bf16 is
    emulated, several times slower than fp16) and asks the current device, not the one used."""
    return tuple(capability) >= NATIVE_BF16_CAPABILITY


def fast_bf16(device: torch.device) -> bool:
    """Whether bf16 matrix work is native on `device`: NVIDIA GPUs from Ampere on, or CPUs
    with AVX512-BF16 / AMX."""
    if device.type == "cuda":
        return native_bf16(torch.cuda.get_device_capability(device))
    return device.type == "cpu" and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def inference_dtype(precision: str, bf16_native: bool) -> torch.dtype | None:
    """The autocast type for a frozen encoder on a GPU: `precision` "bf16" falls back to fp16
    where bf16 is not native; "fp16" as asked; "fp32" none."""
    if precision == "fp32":
        return None
    return torch.bfloat16 if precision == "bf16" and bf16_native else torch.float16


def training_dtype(precision: str, device_type: str, bf16_native: bool) -> torch.dtype | None:
    """The autocast type for training steps: bf16 when asked for, or with "auto" on a GPU with
    native bf16; else none (fp32). "auto" keeps CPUs in fp32 even where they have bf16 units,
    so the same seed gives the same model on every CPU model."""
    if precision == "bf16" or (precision == "auto" and device_type == "cuda" and bf16_native):
        return torch.bfloat16
    return None


def autocast(device: torch.device, precision: str = "bf16") -> contextlib.AbstractContextManager:
    """CUDA autocast for inference in `precision` (inference_dtype); the CPU always runs fp32."""
    dtype = inference_dtype(precision, fast_bf16(device)) if device.type == "cuda" else None
    return torch.autocast("cuda", dtype=dtype) if dtype is not None else contextlib.nullcontext()


def training_autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Autocast for training steps in training_dtype's type, or none."""
    dtype = training_dtype(precision, device.type, device.type == "cuda" and fast_bf16(device))
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


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


def available_cores() -> int:
    """Cores this process may run on (its affinity mask: a container's or taskset's cpuset),
    not the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
