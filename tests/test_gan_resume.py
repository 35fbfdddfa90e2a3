"""GAN crash and resume: the library loop resumes bit for bit, and so does the train-gan stage under kill -9."""

from __future__ import annotations

import csv
import hashlib
import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import DVC, dvc, pipeline_env
from resume import checkpoint_state, set_params, signal_below

from reprovision.models.gan import MLPDiscriminator, MLPGenerator
from reprovision.training.fit_gan import fit_gan

# ------------------------------------------------------------------ the loop, on a tiny in-memory dataset

LATENT = 8
EPOCHS = 4


class Killed(Exception):
    """Stands for a kill -9 between epochs: the loop stops, the last checkpoint stays."""


def tiny_setup(seed: int = 0):
    """A small MLP GAN with BatchNorm and dropout (dropout draws from torch's global RNG), 96 images."""
    torch.manual_seed(seed)
    gen = MLPGenerator(latent_dim=LATENT, hidden=(16, 32), dropout=0.2)
    disc = MLPDiscriminator(hidden=(32, 16), dropout=0.5)
    opt_g = torch.optim.Adam(gen.parameters(), lr=1e-3, betas=(0.0, 0.9))
    opt_d = torch.optim.Adam(disc.parameters(), lr=4e-3, betas=(0.0, 0.9))
    images = torch.randint(0, 256, (96, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(123))
    rng = torch.Generator().manual_seed(seed)
    return gen, disc, opt_g, opt_d, images, rng


def run(
    checkpoint: Path | None, fingerprint: str = "fp", kill_after: int = 0, extra=None, on_resume=None, elsewhere=False
):
    """(history, generator, discriminator, rows seen by on_epoch) of a run, stopped after `kill_after` epochs when > 0.

    `elsewhere`: both random streams start from other states (as in a new process): a resume must restore them.
    """
    gen, disc, opt_g, opt_d, images, rng = tiny_setup()
    if elsewhere:
        torch.manual_seed(999)
        rng.manual_seed(999)
    seen: list[tuple[int, dict]] = []

    def on_epoch(epoch: int, row: dict) -> None:
        if kill_after and epoch > kill_after:
            raise Killed
        row.setdefault("added_by_caller", epoch * 10)  # what the stage adds (its FID) is checkpointed too
        seen.append((epoch, {k: v for k, v in row.items() if k != "epoch_seconds"}))

    try:
        history = fit_gan(
            gen,
            disc,
            opt_g,
            opt_d,
            images,
            LATENT,
            16,
            EPOCHS,
            rng,
            on_epoch,
            progress=False,
            checkpoint=checkpoint,
            fingerprint=fingerprint,
            extra=extra,
            on_resume=on_resume,
        )
    except Killed:
        history = None
    return history, gen, disc, seen


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def without_seconds(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "epoch_seconds"} for row in history]


def test_train_gan_resume_matches_uninterrupted(tmp_path, capsys):
    ref_history, ref_gen, ref_disc, ref_seen = run(tmp_path / "ref.pt")
    ref_state = torch.load(tmp_path / "ref.pt", weights_only=False)
    assert ref_state["complete"] and ref_state["epoch"] == EPOCHS

    path = tmp_path / "gan.pt"
    extras = iter(range(100))
    assert run(path, kill_after=2, extra=lambda: {"n": next(extras)})[0] is None
    state = torch.load(path, weights_only=False)
    assert (state["epoch"], state["complete"], state["extra"]) == (2, False, {"n": 1})
    assert set(state) >= {"generator", "discriminator", "opt_g", "opt_d", "rng", "history", "fingerprint"}
    assert set(state["rng"]) == {"generator", "torch", "cuda"}

    resumed_with = []
    history, gen, disc, seen = run(
        path, on_resume=lambda epoch, extra: resumed_with.append((epoch, extra)), elsewhere=True
    )
    assert f"resuming from {path} after epoch 2" in capsys.readouterr().out
    assert resumed_with == [(2, {"n": 1})]
    # The earlier rows are replayed through on_epoch (with what the caller added), then training goes on.
    assert seen == ref_seen and [epoch for epoch, _ in seen] == [1, 2, 3, 4]
    assert without_seconds(history) == without_seconds(ref_history)
    assert same_weights(gen, ref_gen) and same_weights(disc, ref_disc)
    assert torch.load(path, weights_only=False)["complete"]


def test_train_gan_does_not_resume_other_or_complete_checkpoints(tmp_path, capsys):
    path = tmp_path / "gan.pt"
    run(path, fingerprint="old", kill_after=2)
    history, _, _, seen = run(path, fingerprint="new")  # other params/data/code: start afresh
    assert "resuming" not in capsys.readouterr().out
    assert [epoch for epoch, _ in seen] == [1, 2, 3, 4] and len(history) == EPOCHS
    run(path, fingerprint="new")  # the checkpoint is complete now: never resumed
    assert "resuming" not in capsys.readouterr().out


# ------------------------------------------------------------------ the stage, killed with SIGKILL under dvc repro

STAGE = "train-gan@mlp"
CKPT = "checkpoints/gan-mlp.pt"
SMALL_GAN = {
    "threads": 1,  # as conftest.TINY
    "judge": {"epochs": 1, "train_fraction": 0.02},
    "gan": {
        "epochs": 6,
        "train_fraction": 0.01,
        "fid_every": 2,
        "fid_samples_during": 200,
        "fid_samples": 200,
        "sample_every": 2,
    },
}
TIMING = {"total_seconds", "s_per_epoch"}


def start_repro(repo: Path, *options: str) -> subprocess.Popen:
    """`dvc repro <options> train-gan@mlp` in the background, its output (stdout and stderr) on a pipe."""
    return subprocess.Popen(
        [DVC, "repro", *options, STAGE],
        cwd=repo,
        env=pipeline_env(forked=False),  # its training process is found below dvc and killed
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def kill_stage(proc: subprocess.Popen) -> None:
    assert signal_below(proc.pid, "train_gan.py", signal.SIGKILL), "training process not found"


def repro_and_kill(repo: Path, after_epoch: int) -> int:
    """Start `dvc repro train-gan@mlp` (and the stages before it), kill -9 its training process once
    epoch `after_epoch` is checkpointed; the epoch of the checkpoint left behind."""
    ckpt = repo / CKPT
    proc = start_repro(repo)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:
        epoch, complete = checkpoint_state(ckpt)  # of this run, not a complete one from an earlier run
        if after_epoch <= epoch and not complete:
            kill_stage(proc)
            break
        time.sleep(0.02)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode != 0, f"the run finished before it could be killed:\n{output}"
    saved, complete = checkpoint_state(ckpt)
    assert not complete and after_epoch <= saved < SMALL_GAN["gan"]["epochs"]
    return saved


def outputs(repo: Path) -> dict[str, object]:
    """What must come out the same after kill + resume: metrics without timings, weights and pictures by hash."""
    found: dict[str, object] = {}
    metrics = json.loads((repo / "metrics/gan/mlp/summary.json").read_text())
    found["metrics"] = {k: v for k, v in metrics.items() if k not in TIMING}
    with (repo / "metrics/gan/mlp/history.csv").open() as fh:
        found["history"] = [{k: v for k, v in row.items() if k != "epoch_seconds"} for row in csv.DictReader(fh)]
    found["fid.csv"] = (repo / "metrics/gan/mlp/fid.csv").read_text()
    out = repo / "models/gan/mlp"
    names = ["generator.pt", "discriminator.pt", "grid_10x10.png", "progression.gif", "nearest_neighbours.png"]
    names += sorted(str(p.relative_to(out)) for p in (out / "samples").glob("*.png"))
    for name in names:
        found[name] = hashlib.sha256((out / name).read_bytes()).hexdigest()
    return found


@pytest.mark.slow
def test_gan_kill_and_resume_matches_uninterrupted_run(repo_copy):
    repo = repo_copy
    set_params(repo, SMALL_GAN)
    epochs = SMALL_GAN["gan"]["epochs"]

    # The first run of this config, killed -9 after epoch 2 or later...
    saved = repro_and_kill(repo, after_epoch=2)
    # ...resumes from the last complete epoch with a plain `dvc repro` (DVC deleted its outputs meanwhile).
    resumed = dvc(repo, "repro", STAGE)
    assert f"resuming from {CKPT} after epoch {saved}" in resumed.stdout
    result = outputs(repo)
    assert len(result["history"]) == epochs
    frames = sorted(k for k in result if k.startswith("samples/"))
    assert frames == [f"samples/epoch_{e:03d}.png" for e in range(0, epochs + 1, 2)]  # incl. those before the kill

    # The same config run afresh, uninterrupted (its checkpoint is complete now: never resumed; forced,
    # since dvc.lock already matches) gives the same metrics, curves, weights and pictures, bit for bit (CPU).
    uninterrupted = dvc(repo, "repro", "-f", "-s", STAGE)
    assert "resuming" not in uninterrupted.stdout
    assert outputs(repo) == result
    # A changed config never resumes: test_train_gan_does_not_resume_other_or_complete_checkpoints (the
    # loop) and test_runtime's checkpoint tests; the stage's fingerprint holds every param it reads.
