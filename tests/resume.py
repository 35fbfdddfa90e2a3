"""Helpers of the kill / stop and resume tests (test_tracking_outage.py, test_gan_resume.py,
test_distributed.py): params written into a copy's params.yaml, a checkpoint's progress, the processes
under a dvc or torchrun process."""

from __future__ import annotations

import csv
import hashlib
import os
import subprocess
from pathlib import Path

import torch
import yaml


def set_params(repo: Path, overrides: dict) -> None:
    path = repo / "params.yaml"
    params = yaml.safe_load(path.read_text())
    for key, value in overrides.items():
        if isinstance(value, dict):
            params[key].update(value)
        else:
            params[key] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def history(repo: Path) -> list[dict]:
    with (repo / "metrics/cnn/history.csv").open() as fh:
        return [{k: v for k, v in row.items() if k != "epoch_seconds"} for row in csv.DictReader(fh)]


def checkpoint_state(path: Path) -> tuple[int, bool]:
    """(epoch, complete) of the checkpoint, read in one go; (0, False) when there is none yet."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=False, mmap=True)  # the tensors stay on disk
    except Exception:  # not there yet, or being replaced this instant
        return 0, False
    return state["epoch"], state["complete"]


def signal_below(root_pid: int, script: str, sig: int) -> list[int]:
    """Send `sig` to each python process running `script` below `root_pid`; their pids, [] if none was found."""
    pids = stage_pids(root_pid, script)
    for pid in pids:
        os.kill(pid, sig)
    return pids


def stage_pids(root_pid: int, script: str) -> list[int]:
    """The python processes running `script` below `root_pid` (a stage below dvc, the ranks below torchrun)."""
    # -ww: whole command lines (without it ps cuts them at 80 columns when its output is a pipe).
    out = subprocess.run(["ps", "-ww", "-eo", "pid=,ppid=,args="], capture_output=True, text=True).stdout
    children: dict[int, list[int]] = {}
    args: dict[int, str] = {}
    for line in out.splitlines():
        parts = line.strip().split(None, 2)
        if len(parts) < 2:
            continue
        pid, ppid = int(parts[0]), int(parts[1])
        children.setdefault(ppid, []).append(pid)
        args[pid] = parts[2] if len(parts) > 2 else ""
    found, todo = [], [root_pid]
    while todo:
        for child in children.get(todo.pop(), []):
            todo.append(child)
            if script in args.get(child, "") and "python" in args.get(child, ""):
                found.append(child)
    return found
