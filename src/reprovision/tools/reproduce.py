"""`reprovision reproduce <run-id>`: train a recorded MLflow run again, from what it recorded, and compare.

Every training run records its git commit, its full resolved params (`resolved_params.json`), its
thread count and data sha256. This replays it where the user stands, without touching the
workspace:

1. a throwaway clone of this repository at the run's commit (`git clone --shared`, in a temp dir),
   sharing this repository's DVC cache, with params.yaml written from the recorded params;
2. `dvc repro` of the stages the run's stage depends on: restored from DVC's run-cache (nothing
   is recomputed when this repository ran them before), or computed when it did not;
3. `dvc repro --force --single-item <stage>`: the stage really trains again, logging a new run
   (tagged `reproduces=<run-id>`) to the same tracking store;
4. the two runs' per-epoch metrics compared value by value. With the same code, params, data,
   thread count and CPU kernels (`cpu_kernels` tag) they must be identical.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from reprovision.core.track_run import RESOLVED_PARAMS
from reprovision.core.track_store import project_root, tracking_uri

TIMING = {"epoch_seconds", "wall_seconds", "train_seconds", "s_per_epoch", "total_seconds"}
REPRODUCES_ENV = "REPROVISION_REPRODUCES"  # track_run.stage_run tags the new run with the run it replays


class ReproduceError(RuntimeError):
    """The run can't be replayed here; the message says why and what to do."""


def stage_of(run) -> str:
    stage, model = run.data.tags["stage"], run.data.tags["model"]
    return f"train-gan@{model.removeprefix('gan-')}" if stage == "train-gan" else stage


def histories(client, run_id: str, keys: list[str]) -> dict[str, list[tuple[int, float]]]:
    return {k: sorted((m.step, m.value) for m in client.get_metric_history(run_id, k)) for k in keys}


def run(cmd: list[str], cwd: Path, env: dict) -> None:
    print(f"$ {' '.join(cmd)}", flush=True)
    subprocess.run(cmd, cwd=cwd, env=env, check=True)


def upstream_stages(workdir: Path, stage: str) -> list[str]:
    """The stages `stage` depends on, directly or not (DVC's own graph of the replayed commit)."""
    from dvc.repo import Repo

    with contextlib.chdir(workdir), Repo() as repo:
        return sorted(s.addressing for s in repo.stage.collect(stage, with_deps=True) if s.addressing != stage)


def reproduce(run_id: str, dry_run: bool = False) -> int:
    """Replays training run `run_id` in a throwaway clone and compares its metrics with the recorded ones
    (the module's docstring says how); 0 when they are identical, 1 when not. `dry_run`: print what would
    be replayed only."""
    import mlflow

    root, uri = project_root(), tracking_uri()
    client = mlflow.MlflowClient(uri)
    recorded_run = recorded_training_run(client, run_id, uri)
    tags = recorded_run.data.tags
    commit = tags.get("git_commit", "unknown")
    check_commit_known(root, run_id, commit)
    params = recorded_params(run_id, uri, tags)
    stage = stage_of(recorded_run)
    if tags.get("git_dirty") == "true":
        print(
            f"warning: run {run_id} ran code with uncommitted changes; replaying commit {commit[:12]} as committed",
            file=sys.stderr,
        )
    print(f"replaying {stage} of run {run_id}: commit {commit[:12]}, threads {params.get('threads')}, recorded params")
    if dry_run:
        print(yaml.safe_dump(params, sort_keys=False))
        return 0

    started_ms = replay_in_clone(root, commit, params, stage, uri=uri, run_id=run_id)
    # The replay's run: the stage's newest since the replay started (code at an older commit may
    # predate the `reproduces` tag).
    replays = client.search_runs(
        [recorded_run.info.experiment_id],
        filter_string=f"attributes.start_time >= {started_ms} and tags.stage = '{tags['stage']}' "
        f"and tags.model = '{tags['model']}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if not replays:
        raise ReproduceError(f"the replay of {stage} logged no run to {uri}")
    return 0 if compare_runs(client, run_id, recorded_run, replays[0]) else 1


def recorded_training_run(client, run_id: str, uri: str):
    """The MLflow run `run_id`, which must be a training run; a ReproduceError says what to check otherwise."""
    import mlflow

    try:
        recorded_run = client.get_run(run_id)
    except mlflow.exceptions.MlflowException as err:
        raise ReproduceError(
            f"no run {run_id!r} in the tracking store {uri} ({str(err).splitlines()[0]}); "
            "copy the run id from the MLflow UI or a stage's models/<name>/run.json, and check MLFLOW_TRACKING_URI"
        ) from None
    tags = recorded_run.data.tags
    if tags.get("stage") not in ("train-judge", "train-gan", "train-vit", "train-cnn"):
        raise ReproduceError(
            f"run {run_id} is a {tags.get('stage', 'untagged')!r} run; reproduce replays training runs"
        )
    return recorded_run


def check_commit_known(root: Path, run_id: str, commit: str) -> None:
    """A ReproduceError unless the repository at `root` has `commit`, the run's."""
    known = (
        subprocess.run(["git", "cat-file", "-e", f"{commit}^{{commit}}"], cwd=root, capture_output=True).returncode == 0
    )
    if not known:
        raise ReproduceError(
            f"run {run_id} was made at commit {commit}, which this repository does not have; "
            f"`git fetch` the branch that has it, then run this again"
        )


def recorded_params(run_id: str, uri: str, tags: dict[str, str]) -> dict:
    """The run's resolved params, with `threads: auto` replaced by the count it resolved to when it ran."""
    import mlflow

    params = json.loads(
        Path(
            mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=RESOLVED_PARAMS, tracking_uri=uri)
        ).read_text()
    )
    if params.get("threads") == "auto" and tags.get("threads"):
        params["threads"] = int(tags["threads"])  # the count "auto" resolved to, on the recorded machine
    return params


def replay_in_clone(root: Path, commit: str, params: dict, stage: str, *, uri: str, run_id: str) -> int:
    """Trains `stage` again in a throwaway clone of `root` at `commit` with `params`, logging to `uri` a run
    tagged as replaying `run_id`; returns when the replay started (epoch milliseconds)."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, REPRODUCES_ENV: run_id}
    env.pop("DVC_EXP_NAME", None)
    workdir = Path(tempfile.mkdtemp(prefix="reprovision-reproduce-"))
    started_ms = int(time.time() * 1000)
    try:
        run(["git", "clone", "-q", "--shared", "--no-checkout", str(root), str(workdir)], root, env)
        run(["git", "checkout", "-q", "--detach", commit], workdir, env)
        run(["dvc", "cache", "dir", "--local", str(root / ".dvc" / "cache")], workdir, env)
        (workdir / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        if upstream := upstream_stages(workdir, stage):
            run(["dvc", "repro", *upstream], workdir, env)
        run(["dvc", "repro", "--force", "--single-item", stage], workdir, env)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return started_ms


def compare_runs(client, run_id: str, recorded_run, replay) -> bool:
    """Prints the two runs' last value of each metric side by side, and whether every metric's history is
    identical, which it returns; when not, a note if the runs computed with different CPU kernels."""
    tags = recorded_run.data.tags
    # Timings differ run to run; eval_* came from the evaluate stage (now runs of their own).
    # System metrics (CPU, memory, disk) describe the machine at that moment, not the result.
    keys = sorted(k for k in recorded_run.data.metrics if k not in TIMING and not k.startswith(("eval_", "system/")))
    before, after = histories(client, run_id, keys), histories(client, replay.info.run_id, keys)
    same = True
    print(f"{'metric':<24} {'recorded':>14} {'reproduced':>14}")
    for key in keys:
        equal = before[key] == after[key]
        same &= equal
        last = lambda h: f"{h[-1][1]:.6g}" if h else "-"
        print(f"{key:<24} {last(before[key]):>14} {last(after[key]):>14} {'' if equal else '  DIFFERS'}")
    print(f"{'identical' if same else 'NOT identical'}: {run_id} -> {replay.info.run_id}")
    kernels = tags.get("cpu_kernels"), replay.data.tags.get("cpu_kernels")
    if not same and kernels[0] and kernels[0] != kernels[1]:  # runs from before the tag have none
        print(
            f"note: the recorded run computed with {kernels[0]} CPU kernels, the replay with {kernels[1]}, and float "
            "sums depend on them; README, Threads and precision, says how to lower this machine's kernels",
            file=sys.stderr,
        )
    return same
