"""What every computing stage does first, and how it ends: the one shared piece of the stage scripts.

`start()` checks everything a stage could be refused for, before it reads data or computes:
params (config.py), the device, the thread count, the tracking store. `main()` turns the errors a
user can fix into one line on stderr and exit status 2, without a traceback, and so does it for
Ctrl-C / SIGTERM (exit status 130); under DVC the line ends with the `dvc checkout` that restores the
outputs DVC removed before the stage ran.
"""

from __future__ import annotations

import csv
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from reprovision.config import ConfigError, Params, load_params
from reprovision.core import track
from reprovision.data.datasets import DataError, data_sha256, load_split, stratified_subset
from reprovision.layout import PREPARED

# torch is imported where it is used: check-params and fetch-data compute nothing with it, and
# importing it costs ~1.3 s of CPU (measured), which check-params would pay on every `dvc exp run`.
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
    track.check_store(track.tracking_uri())
    print(f"[{stage}] device {device}, {threads} thread(s), params sha256 {params.digest()[:12]}", flush=True)
    return Context(params, device, threads)


def restore_hint() -> str:
    """Under `dvc repro` / `dvc exp run` in the workspace, DVC removed the stage's outputs before running it (all
    but check-params', kept with `persist`): what puts the last ones back. Empty elsewhere (run by hand, or in a
    queued experiment's temporary copy, which leaves the workspace alone)."""
    stage = os.environ.get("DVC_STAGE", "")
    if not stage or stage == "check-params" or track.project_root() != Path.cwd().resolve():
        return ""
    return f" DVC removed {stage}'s outputs before running it: `dvc checkout {stage}` restores the last ones."


def main(stage: Callable[..., None], *args) -> None:
    """Run a stage function and end the process; errors a user can fix end with their message alone
    (exit 2; Ctrl-C / SIGTERM 130), not a traceback. Any other error propagates as usual (exit 1)."""
    code = 0
    try:
        stage(*args)
    except (ConfigError, DataError, track.TrackingError) as err:
        print(f"error: {err}{restore_hint()}", file=sys.stderr)
        code = 2
    except RuntimeError as err:  # an op with no deterministic kernel: one line naming it and the opt-out
        from reprovision.core.runtime import nondeterministic_op

        explained = nondeterministic_op(err)
        if explained is None:
            raise
        print(f"error: {explained}{restore_hint()}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt as err:  # its MLflow run is already ended KILLED (track.stage_run)
        how = "SIGTERM" if isinstance(err, track.Terminated) else "Ctrl-C (SIGINT)"
        print(f"error: interrupted by {how}. {track.resume_hint()}{restore_hint()}", file=sys.stderr)
        code = 130
    # Every output is written and closed and the MLflow run ended by now. Python's own teardown of
    # the torch and MLflow modules would take another 1.5-2.6 s per stage on this machine (measured:
    # ~20 s of a pipeline run, and of every stage a test runs), so the process ends here.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


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


def write_json(path: Path, obj, sort_keys: bool = True) -> None:
    """`sort_keys=False` keeps the caller's order: what `dvc exp show` shows a metrics file's columns in."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=sort_keys) + "\n")


def write_csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
