"""`reprovision reproduce <run-id>`: re-run a recorded MLflow run as a DVC experiment and compare.

Every training run stores its full resolved params (`resolved_params.json`), git commit and data
sha256. This replays the params as `dvc exp run --temp -f -s <stage> -S key=value ...` (forced, so the
stage really trains again rather than being restored from cache), then compares the new run's
per-epoch metrics with the recorded ones, value by value. On CPU they must be identical.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from .config import flatten, load_params
from .track import RESOLVED_PARAMS, git_state, project_root, tracking_uri

TIMING = {"epoch_seconds", "wall_seconds", "train_seconds", "s_per_epoch", "total_seconds"}


def dvc_value(value) -> str:
    """A params value as `dvc exp run -S` parses it (YAML flow style)."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ",".join(dvc_value(v) for v in value) + "]"
    return str(value)


def stage_of(run) -> str:
    stage, model = run.data.tags["stage"], run.data.tags["model"]
    return f"train-gan@{model.removeprefix('gan-')}" if stage == "train-gan" else stage


def histories(client, run_id: str, keys: list[str]) -> dict[str, list[tuple[int, float]]]:
    return {k: sorted((m.step, m.value) for m in client.get_metric_history(run_id, k)) for k in keys}


def reproduce(run_id: str, dry_run: bool = False) -> int:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri())
    run = client.get_run(run_id)
    recorded = json.loads(Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=RESOLVED_PARAMS, tracking_uri=tracking_uri())).read_text())
    current = load_params().flat()
    overrides = {k: v for k, v in flatten(recorded).items() if current.get(k) != v}
    stage = stage_of(run)
    # --temp: in a temporary copy (like a queued experiment), leaving the workspace as it is.
    cmd = ["dvc", "exp", "run", "--temp", "-f", "-s", stage]
    for key, value in sorted(overrides.items()):
        cmd += ["-S", f"{key}={dvc_value(value)}"]
    commit, dirty = git_state(project_root())
    if commit != run.data.tags.get("git_commit"):
        print(f"warning: the run was made at commit {run.data.tags.get('git_commit')}, this checkout is at {commit}; "
              f"for an exact replay: git checkout {run.data.tags.get('git_commit')}", file=sys.stderr)
    print(" ".join(cmd))
    if dry_run:
        return 0
    subprocess.run(cmd, check=True)

    exp = client.get_experiment(run.info.experiment_id)
    newest = client.search_runs(
        [exp.experiment_id],
        filter_string=f"tags.stage = '{run.data.tags['stage']}' and tags.model = '{run.data.tags['model']}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )[0]
    # Timings differ run to run; eval_* come from the evaluate stage, which is not replayed here.
    keys = sorted(k for k in run.data.metrics if k not in TIMING and not k.startswith("eval_"))
    before, after = histories(client, run_id, keys), histories(client, newest.info.run_id, keys)
    same = True
    print(f"{'metric':<24} {'recorded':>14} {'reproduced':>14}")
    for key in keys:
        equal = before[key] == after[key]
        same &= equal
        last = lambda h: f"{h[-1][1]:.6g}" if h else "-"
        print(f"{key:<24} {last(before[key]):>14} {last(after[key]):>14} {'' if equal else '  DIFFERS'}")
    print(f"{'identical' if same else 'NOT identical'}: {run_id} -> {newest.info.run_id}")
    return 0 if same else 1
