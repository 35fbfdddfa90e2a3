"""Data-parallel training with torchrun + DDP (gloo, 2 CPU processes, loopback only): the ranks train
as one process would on the same global batches, agree with each other, repeat bit for bit and resume.

Each run is tests/ddp_worker.py: fit_classifier on a tiny synthetic task (100 images, batches of 16, so
the last batch of 4 is split 2 + 2), as the ranks of `torchrun --standalone` or in this process.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import ddp_worker
import pytest
import torch
from resume import signal_below

from reprovision.config import ConfigError, Params
from reprovision.core.distributed import World, join

pytestmark = pytest.mark.scaleout

WORKER = Path(__file__).with_name("ddp_worker.py")
SRC = Path(__file__).resolve().parents[1] / "src"
# Gloo on loopback only; one thread per rank, as torchrun's own default.
ENV = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(SRC)}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(WORKER)]
DEADLINE = 120  # seconds any one torchrun may take


def torchrun(out: Path, *args: str) -> None:
    proc = subprocess.run([*TORCHRUN, str(out), *args], env=ENV, capture_output=True, text=True, timeout=DEADLINE)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def ranks(out: Path, model: str) -> list[dict]:
    return [torch.load(out / f"{model}-rank{r}.pt") for r in range(2)]


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def without_timing(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "epoch_seconds"} for row in history]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Path:
    """The ViT and the CNN, each trained by 2 ranks, uninterrupted (checkpointing as the stages do)."""
    out = tmp_path_factory.mktemp("two-ranks")
    torchrun(out, "--models", "vit,cnn", "--checkpoints", str(out))
    return out


def test_two_ranks_train_as_one_process_with_the_same_global_batch(two_ranks):
    alone = ddp_worker.train("vit", World())  # in this process
    rank0, rank1 = ranks(two_ranks, "vit")
    assert rank0["world_size"] == 2 and alone["world_size"] == 1
    # The stated tolerance: 1e-6 on every weight (measured: 1.5e-8) and on every per-epoch loss.
    for key, value in alone["model"].items():
        torch.testing.assert_close(rank0["model"][key], value, rtol=0, atol=1e-6)
    for one, two in zip(alone["history"], rank0["history"], strict=True):
        assert one["train_acc"] == two["train_acc"] and one["test_acc"] == two["test_acc"]
        for key in ("train_loss", "test_loss", "lr"):
            assert two[key] == pytest.approx(one[key], rel=1e-6, abs=1e-6), key
    assert same_weights(rank0["model"], rank1["model"])
    assert without_timing(rank0["history"]) == without_timing(rank1["history"])  # all-reduced: one history


def test_cnn_ranks_agree_and_a_run_killed_and_resumed_repeats_the_uninterrupted_one_bit_for_bit(two_ranks, tmp_path):
    uninterrupted = ranks(two_ranks, "cnn")
    # BatchNorm: each rank normalises its own share, and rank 0's running statistics go to every
    # rank; parameters (all-reduced gradients) and buffers end identical on both ranks.
    assert same_weights(uninterrupted[0]["model"], uninterrupted[1]["model"])

    # Another run, killed (SIGKILL to torchrun and both ranks) after epoch 1's checkpoint, then run again.
    out = tmp_path / "killed"
    out.mkdir()
    proc = subprocess.Popen(
        [*TORCHRUN, str(out), "--models", "cnn", "--checkpoints", str(out), "--pause-after", "1"],
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + DEADLINE
        while not (out / "paused").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the ranks never reached the end of epoch 1"
            time.sleep(0.2)
    finally:
        # torchrun starts each rank in a process group of its own: SIGKILL to torchrun's group leaves
        # the ranks behind, waiting forever. So they are found below torchrun and killed by pid first.
        rank_pids = signal_below(proc.pid, WORKER.name, signal.SIGKILL)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert len(rank_pids) == 2, "the two ranks were not found below torchrun"
    assert torch.load(out / "cnn.pt", weights_only=False)["epoch"] == 1
    assert not list(out.glob("cnn-rank*.pt"))
    torchrun(out, "--models", "cnn", "--checkpoints", str(out))
    resumed = ranks(out, "cnn")
    # Epoch 1 from the killed processes, 2 and 3 from the resumed ones: each the same as the
    # uninterrupted run's, so a repeat run is bit-identical too.
    assert without_timing(resumed[0]["history"]) == without_timing(uninterrupted[0]["history"])
    assert same_weights(resumed[0]["model"], uninterrupted[0]["model"])
    assert same_weights(resumed[1]["model"], uninterrupted[0]["model"])


def test_world_split_and_size_checks(monkeypatch):
    shares = [World(rank, 3).share(10) for rank in range(3)]
    assert [(s.start, s.stop) for s in shares] == [(0, 3), (3, 6), (6, 10)]  # contiguous, sizes differ by one at most
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(
        ConfigError, match=r"torchrun started 4 processes, but params.yaml says dist.nnodes x dist.nproc = 1 x 2"
    ):
        join(1, 2, torch.device("cpu"))
    with pytest.raises(ValueError, match=r"cnn.batch_size = 4 is split over dist.nnodes x dist.nproc = 4"):
        Params(dist={"nproc": 2, "nnodes": 2}, cnn={"batch_size": 4})
