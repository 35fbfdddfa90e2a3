"""Crash and resume: kill -9 the training process mid-run, `dvc repro` again, get the same result."""

from __future__ import annotations

import csv
import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import dvc, pipeline_env

SMALL_CNN = {
    "threads": 1,  # as conftest.TINY
    "data": {"train_fraction": 0.02, "test_fraction": 0.02},
    "cnn": {"epochs": 12, "widths": [8, 16], "hidden": 16, "batch_size": 64},
}


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


def stage_pids(root_pid: int, script: str = "train_cnn.py") -> list[int]:
    """The `python stages/<script>` processes below the dvc process."""
    out = subprocess.run(["ps", "-eo", "pid=,ppid=,args="], capture_output=True, text=True).stdout
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


def repro_and_kill(repo: Path, after_epoch: int, *args: str) -> int:
    """Start `dvc repro <args> train-cnn`, kill -9 its training process once epoch `after_epoch` is checkpointed."""
    ckpt = repo / "checkpoints/cnn.pt"
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "dvc"), "repro", *args, "train-cnn"],
        cwd=repo, env=pipeline_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        # A checkpoint of this run, not a complete one from an earlier run.
        epoch, complete = checkpoint_state(ckpt)
        if after_epoch <= epoch and not complete:
            pids = stage_pids(proc.pid)
            assert pids, "training process not found"
            for pid in pids:
                os.kill(pid, signal.SIGKILL)
            break
        time.sleep(0.05)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode != 0, f"the run finished before it could be killed:\n{output}"
    saved, complete = checkpoint_state(ckpt)
    assert not complete and after_epoch <= saved < SMALL_CNN["cnn"]["epochs"]
    return saved


@pytest.mark.slow
def test_kill_and_resume_matches_uninterrupted_run(repo_copy):
    repo = repo_copy
    set_params(repo, SMALL_CNN)
    # Killed after epoch 3 on its first run: no result of these params exists anywhere yet, so the
    # next `dvc repro` has nothing to restore from DVC's run-cache and must train, resuming.
    saved = repro_and_kill(repo, 3)
    resumed = dvc(repo, "repro", "train-cnn")
    # It resumes from the last complete epoch: at most the epoch in flight is lost.
    assert f"resuming from checkpoints/cnn.pt after epoch {saved}" in resumed.stdout
    resumed_history, resumed_weights = history(repo), sha256(repo / "models/cnn/model.pt")
    assert len(resumed_history) == SMALL_CNN["cnn"]["epochs"]

    # The same params uninterrupted (forced; a complete checkpoint is never resumed): the same
    # metrics, the same weights, bit for bit (CPU).
    uninterrupted = dvc(repo, "repro", "-f", "-s", "train-cnn")
    assert "resuming" not in uninterrupted.stdout
    assert history(repo) == resumed_history
    assert sha256(repo / "models/cnn/model.pt") == resumed_weights

    # A changed config never resumes: test_runtime's checkpoint test (a run is too dear for it).
