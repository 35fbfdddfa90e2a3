"""What every computing stage does first, and what it reads and records through what it learns.

`start()` checks everything a stage could be refused for, before it reads data or computes:
params (config.py), the device, the thread count, the tracking store; it returns the stage's
Context. `load_subset` puts a prepared split on the device; `run_tags` are its MLflow run's tags.
How a stage ends (errors as one line, exit status 2): core/stage.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from reprovision.config import Params, load_params
from reprovision.core import track_store
from reprovision.data.datasets import data_sha256, load_split, stratified_subset
from reprovision.layout import PREPARED

# torch is imported where it is used: importing it costs ~1.3 s of CPU (measured).
if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Context:
    """What a stage knows once its checks pass."""

    params: Params
    device: torch.device
    threads: int  # torch's intra-op threads in force (params' `threads`, "auto" resolved)


def start(stage: str) -> Context:
    from reprovision.core.runtime import apply_threads, resolve_device, reuse_freed_memory

    params = load_params()
    device = resolve_device(params.device)
    threads = apply_threads(params.threads)
    reuse_freed_memory()
    track_store.check_store(track_store.tracking_uri())
    print(f"[{stage}] device {device}, {threads} thread(s), params sha256 {params.digest()[:12]}", flush=True)
    return Context(params, device, threads)


def load_subset(
    name: str, split: str, fraction: float, seed: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """The class-stratified `fraction` of a prepared split, on `device`: uint8 images, int64 labels, class names."""
    import torch

    data = load_split(PREPARED, name, split)
    idx = stratified_subset(data.y, fraction, seed)
    x = torch.from_numpy(np.ascontiguousarray(data.x[idx])).to(device)
    y = torch.from_numpy(data.y[idx]).to(device)
    return x, y, data.classes


def run_tags(ctx: Context, dataset: str) -> dict[str, str]:
    """Tags every training run carries: where it ran and on exactly which data and params."""
    import torch

    from reprovision.core.runtime import cpu_kernels

    device = ctx.device
    return {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": str(ctx.threads),
        "cpu_kernels": cpu_kernels(),
        "params_sha256": ctx.params.digest(),
        "data_sha256": data_sha256(PREPARED, dataset),
        "dataset": dataset,
        "seed": str(ctx.params.seed),
    }
