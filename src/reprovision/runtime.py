"""Device choice, seeding and determinism: the knobs that make a run repeatable."""

from __future__ import annotations

import os
import random

import numpy as np
import torch

from .config import ConfigError


def resolve_device(requested: str) -> torch.device:
    """`auto` picks cuda, then mps, then cpu; an explicit device that is absent is an error."""
    has = {
        "cuda": torch.cuda.is_available(),
        "mps": getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available(),
        "cpu": True,
    }
    if requested == "auto":
        return torch.device(next(name for name in ("cuda", "mps", "cpu") if has[name]))
    if not has.get(requested, False):
        found = [name for name, ok in has.items() if ok]
        raise ConfigError(
            f"device = {requested!r}, but no {requested} device is available on this machine "
            f"(found: {', '.join(found)}); set `device: auto` or `device: cpu` in params.yaml"
        )
    return torch.device(requested)


def seed_everything(seed: int, device: torch.device) -> torch.Generator:
    """Seed every RNG and ask for deterministic kernels; returns a generator for data order."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    # Deterministic algorithms everywhere: on CUDA cuBLAS needs this workspace setting.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=device.type != "cpu")
    torch.backends.cudnn.benchmark = False
    return torch.Generator(device=device).manual_seed(seed)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 on CUDA by default; fp32 on CPU so CPU runs stay bit-exact and comparable."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None
