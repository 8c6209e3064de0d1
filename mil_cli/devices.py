"""Pick the torch device and the mixed precision that suits it."""

from __future__ import annotations

import contextlib
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


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on GPUs that support it, else fp16; none on the CPU (fp32 there)."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
