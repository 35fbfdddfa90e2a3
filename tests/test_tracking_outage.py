"""A tracking outage mid-run (issue 14): no hang, no lost training, no orphan runs.

A real `mlflow server` on 127.0.0.1 is killed (SIGKILL to its process group) while train-cnn runs:
the stage must stop within the bound track_store.py sets, after the epoch's checkpoint, with one line
and no traceback; once the server is back, `dvc repro` resumes and ends with the outputs of an
uninterrupted run, and no MLflow run is left RUNNING. Ctrl-C and SIGTERM end the run KILLED.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlflow
import pytest
from conftest import DVC, dvc, pipeline_env
from resume import checkpoint_state, history, set_params, sha256, signal_below

from reprovision.core import track
from reprovision.tools import server

# 2,500 images: an epoch of about a second, so that the test sees epoch 2 checkpointed before epoch 3
# ends (with 500 images a quiet machine ran epochs so fast that it noticed epoch 2 two epochs late).
SMALL_CNN = {
    "threads": 1,  # as conftest.TINY
    "data": {"train_fraction": 0.05, "test_fraction": 0.01},
    "cnn": {"epochs": 4, "widths": [8, 16], "hidden": 16, "batch_size": 64},  # stops at 2 or 3: unfinished
}


def stage_env() -> dict:
    """The stages' environment without MLflow's HTTP settings: the bound must come from track_store.py."""
    return {k: v for k, v in pipeline_env().items() if not k.startswith("MLFLOW_HTTP_")}


def kill_server(repo: Path, sig: int) -> None:
    """Signal the process group of the server this test started (the CLI and its uvicorn worker)."""
    state = repo / ".mlflow-server" / "server.json"
    if not state.exists():
        return
    pid = json.loads(state.read_text())["pid"]
    state.unlink()
    try:
        os.killpg(pid, sig)
        os.waitpid(pid, 0)  # this process started it: reap it, or its pid would still look alive
    except (ProcessLookupError, ChildProcessError):
        pass


def start_training(repo: Path, *args: str) -> subprocess.Popen:
    """A dvc command in its own process group, as a terminal runs it (Ctrl-C reaches the group).

    A shell starts its commands with SIGINT at the default; a child inherits an ignored SIGINT. Once,
    in the whole suite, the Ctrl-C reached nobody and the run completed (cause not pinned down; an
    ignored SIGINT in this process would do it), so the child gets the default whatever this has."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return subprocess.Popen(
            [DVC, *args],
            cwd=repo,
            env=stage_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
    finally:
        signal.signal(signal.SIGINT, previous)


def file_identity(path: Path) -> tuple[int, int] | None:
    """(inode, mtime in ns) of `path`, None when absent: a checkpoint is replaced by a new file each epoch."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns


def wait_for_epoch(
    proc: subprocess.Popen, ckpt: Path, epoch: int, before: tuple[int, int] | None, timeout: float = 300
) -> None:
    """Until `epoch` is checkpointed by this run: by a file other than `before`, the one there before it
    started. (An earlier test's run may have left one a moment ago: a time window let it through once.)"""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        saved, complete = checkpoint_state(ckpt)
        if epoch <= saved and not complete and file_identity(ckpt) not in (before, None):
            return
        time.sleep(0.05)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    raise AssertionError(f"epoch {epoch} was never checkpointed:\n{proc.communicate()[0][-3000:]}")


def finish(proc: subprocess.Popen, timeout: float) -> tuple[str, float, float | None]:
    """(output, seconds until `proc` ended, seconds until its `error:` line); kills its group if it overruns."""
    started = time.monotonic()
    timer = threading.Timer(timeout, os.killpg, (proc.pid, signal.SIGKILL))
    timer.start()
    lines, message_at = [], None
    for line in proc.stdout:
        lines.append(line)
        if message_at is None and line.startswith("error: "):
            message_at = time.monotonic() - started
    proc.wait()
    timer.cancel()
    output = "".join(lines)
    ended = time.monotonic() - started
    assert ended < timeout, f"still running {timeout:.0f} s later:\n{output[-8000:]}"
    return output, ended, message_at


def cnn_runs(uri: str) -> list:
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name("reprovision")
    return client.search_runs(
        [experiment.experiment_id], "tags.stage = 'train-cnn'", order_by=["attributes.start_time ASC"]
    )


def test_bounds_are_defaults_the_environment_overrides():
    code = (
        "import os, reprovision.core.track; "
        "print(os.environ['MLFLOW_HTTP_REQUEST_MAX_RETRIES'], os.environ['MLFLOW_HTTP_REQUEST_TIMEOUT'])"
    )
    env = {**stage_env(), "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "7", "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["7", track.HTTP_DEFAULTS["MLFLOW_HTTP_REQUEST_TIMEOUT"]]


def test_a_refused_connection_is_one_line_naming_the_server(monkeypatch):
    """No server needed: what any logging call raises when nothing answers at the URI."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # fast; the slow tests time the real bound
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri("http://127.0.0.1:9")
    try:
        with pytest.raises(track.TrackingError) as raised:
            track.log_metrics({"loss": 1.0}, step=1)
    finally:
        mlflow.set_tracking_uri(previous)
    message = str(raised.value)
    assert message.startswith(
        "the MLflow tracking server http://127.0.0.1:9 stopped answering mid-run (connection refused"
    )
    assert "`dvc repro`" in message and "\n" not in message


@pytest.mark.slow
def test_outage_stops_after_the_checkpoint_and_resumes_to_the_same_result(module_repo):
    repo = module_repo
    set_params(repo, SMALL_CNN)
    dvc(repo, "repro", "train-cnn")  # the uninterrupted reference (SQLite: the store does not shape results)
    reference_history = history(repo)
    reference_weights = sha256(repo / "models/cnn/model.pt")

    uri = server.start(root=repo)
    try:
        before = file_identity(repo / "checkpoints/cnn.pt")
        proc = start_training(repo, "repro", "-f", "-s", "train-cnn")
        wait_for_epoch(proc, repo / "checkpoints/cnn.pt", 2, before)
        kill_server(repo, signal.SIGKILL)  # the outage: a crash, no goodbye
        output, seconds, message_at = finish(proc, timeout=60)

        # Bounded: the epoch in flight, its checkpoint, then one failed call (3 retries, ~6-9 s).
        assert proc.returncode != 0 and message_at is not None, output
        print(f"outage -> error line: {message_at:.1f} s, dvc ended: {seconds:.1f} s")
        assert "Traceback" not in output, output
        errors = [line for line in output.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1, output
        # Refused, or (when the kill cut an answer short) a ChunkedEncodingError.
        assert re.search(
            rf"the MLflow tracking server {uri} stopped answering mid-run \((connection "
            rf"refused|ChunkedEncodingError), 3 retries\)",
            errors[0],
        )
        assert "safe in the per-epoch checkpoint checkpoints/cnn.pt; `dvc repro` continues from it" in errors[0]
        # It stopped at the first epoch it could not log: epoch 2's (if the outage beat it) or 3's.
        saved, complete = checkpoint_state(repo / "checkpoints/cnn.pt")
        assert saved in (2, 3) and not complete

        uri = server.start(root=repo)
        orphan = cnn_runs(uri)[-1]
        assert orphan.info.status == "RUNNING"  # its process could not reach the server to end it
        # -f -s: dvc.lock still holds the reference run of these params, whose outputs DVC would
        # check out of its cache instead (a new configuration, as in `dvc exp run -S`, has none).
        resumed = dvc(repo, "repro", "-f", "-s", "train-cnn", env=stage_env())
        assert f"resuming from checkpoints/cnn.pt after epoch {saved}" in resumed.stdout
        # Nothing trained was lost: the same metrics and weights, bit for bit, as without the outage.
        assert history(repo) == reference_history
        assert sha256(repo / "models/cnn/model.pt") == reference_weights

        # No orphan: the resumed attempt ended the dead one FAILED and both carry the link.
        runs = {run.info.run_id: run for run in cnn_runs(uri)}
        new = json.loads((repo / "models/cnn/run.json").read_text())["run_id"]
        assert [run.info.status for run in runs.values()] == ["FINISHED", "FAILED", "FINISHED"]
        assert runs[new].data.tags["previous_attempt"] == orphan.info.run_id
        assert runs[orphan.info.run_id].data.tags["superseded_by"] == new
    finally:
        kill_server(repo, signal.SIGTERM)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_interrupted_run_ends_killed_not_running(module_repo, how):
    """Ctrl-C: SIGINT to the process group of `dvc exp run`, as a terminal sends it. SIGTERM: to
    the stage process alone, as `kill` does. Either way the run ends KILLED, with one line."""
    repo = module_repo
    epochs = 12 if how == "ctrl-c" else 13  # a new configuration each: trained from scratch
    # 2,500 images: an epoch of a few seconds, so that the signal lands inside one, as intended
    # (with 500 images an idle machine finished an epoch in 0.28 s and the signal missed it).
    sets = [
        "threads=1",
        f"cnn.epochs={epochs}",
        "cnn.widths=[8,16]",
        "cnn.hidden=16",
        "data.train_fraction=0.05",
        "data.test_fraction=0.01",
    ]
    args = (
        ["exp", "run", *(a for s in sets for a in ("-S", s)), "train-cnn"]
        if how == "ctrl-c"
        else ["repro", "train-cnn"]
    )
    if how == "sigterm":
        set_params(
            repo,
            {
                "threads": 1,
                "data": {"train_fraction": 0.05},
                "cnn": {"epochs": epochs, "widths": [8, 16], "hidden": 16},
            },
        )
    before = file_identity(repo / "checkpoints/cnn.pt")
    proc = start_training(repo, *args)
    wait_for_epoch(proc, repo / "checkpoints/cnn.pt", 1, before)
    time.sleep(1.0)  # mid-epoch
    if how == "ctrl-c":
        os.killpg(proc.pid, signal.SIGINT)
    else:
        assert signal_below(proc.pid, "train_cnn.py", signal.SIGTERM), "training process not found"
    output, seconds, message_at = finish(proc, timeout=60)

    assert proc.returncode != 0 and message_at is not None and "Traceback" not in output, output
    print(f"{how} -> error line: {message_at:.1f} s, dvc ended: {seconds:.1f} s")
    signal_name = "Ctrl-C (SIGINT)" if how == "ctrl-c" else "SIGTERM"
    command = "`dvc exp run` again (same -S options)" if how == "ctrl-c" else "`dvc repro`"
    assert (
        f"error: interrupted by {signal_name}. Training so far is safe in the per-epoch checkpoint "
        f"checkpoints/cnn.pt; {command} continues from it." in output
    )
    last = cnn_runs(f"sqlite:///{repo / 'mlflow.db'}")[-1]
    assert last.data.params["epochs"] == str(epochs)
    assert last.info.status == "KILLED"
    assert all(run.info.status != "RUNNING" for run in cnn_runs(f"sqlite:///{repo / 'mlflow.db'}"))
