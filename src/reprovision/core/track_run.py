"""One MLflow run per executed stage: what it records to be repeatable, where it nests, how it ends.

`stage_run` opens the run (store and experiment as track_store.py finds them), tags it with the code,
data and library versions, logs its params and resolved params.yaml, and ends it FINISHED, FAILED or
KILLED. Runs of one `dvc exp run` nest under a group run (`EXP_PARENT`), itself under
$REPROVISION_PARENT_RUN_ID when a caller (`reprovision tune`) sets it. A run whose process dies is
ended FAILED or KILLED on the way out where the process can, and otherwise by the next attempt of
the same stage, which links the two (`previous_attempt` / `superseded_by`).
"""

from __future__ import annotations

import contextlib
import os
import platform
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

from reprovision.config import Params
from reprovision.core.stage import attempt
from reprovision.core.track_store import (
    artifact_location,
    check_store,
    experiment_name,
    one_short_try,
    outage_cause,
    outage_error,
    project_root,
    reports_outage,
    reports_refusal,
    tracking_uri,
)
from reprovision.errors import Terminated, TrackingError
from reprovision.layout import CHECKPOINTS

RESOLVED_PARAMS = "resolved_params.json"
LIBRARIES = ("torch", "torchvision", "numpy", "mlflow", "dvc", "scikit-learn", "torchmetrics", "pydantic")


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (`kill`, `dvc queue kill`) unwinds like Ctrl-C, so the run is ended KILLED, not left
    RUNNING. Only where nobody else handles SIGTERM, and only in the main thread (Python's rule)."""
    install = (
        threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    )

    def interrupt(signum, frame):
        raise Terminated("SIGTERM")

    if install:
        signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        if install:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _process_alive(tags: dict[str, str]) -> bool:
    """Whether the process that started a run still runs. A run from another host is taken as alive
    (we can't tell); one without a pid tag predates them and is taken as dead."""
    if "pid" not in tags:
        return False
    if tags.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(tags["pid"]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # someone else's process
    return True


def _supersede_earlier_attempts(client, run, tags: dict[str, str]) -> None:
    """Link this run to the earlier attempts of the same stage that did not finish, and end those
    still RUNNING whose process is gone (kill -9, a tracking outage) as FAILED.

    An attempt is the same stage and model with the same params_sha256 (all of params.yaml): what a
    rerun of a failed `dvc repro` or `dvc exp run` has, although each `dvc exp run` gets a new
    dvc_exp_name. Stages without params_sha256 (tune) are not matched.
    """
    if not tags.get("params_sha256"):
        return
    query = " and ".join(f"tags.{key} = '{tags[key]}'" for key in ("stage", "model", "params_sha256"))
    earlier = []
    for old in client.search_runs([run.info.experiment_id], f"{query} and attributes.status != 'FINISHED'"):
        if old.info.run_id == run.info.run_id or "superseded_by" in old.data.tags:
            continue
        if old.info.status == "RUNNING":
            if _process_alive(old.data.tags):
                continue  # a parallel attempt (e.g. a queued twin), still at work
            client.set_terminated(old.info.run_id, "FAILED")
            if old.data.tags.get("mlflow.parentRunId") and old.data.tags.get("dvc_exp_name"):
                _settle_group(client, old.data.tags["mlflow.parentRunId"])  # its `dvc exp run` failed too
        client.set_tag(old.info.run_id, "superseded_by", run.info.run_id)
        earlier.append(old.info.run_id)
    if earlier:
        client.set_tag(run.info.run_id, "previous_attempt", ",".join(earlier))


def _end_run(status: str, store_failed: bool, client=None, group: str | None = None) -> None:
    """End the active run, and settle its `dvc exp run`'s group run, on the way out of an error, never
    hiding that error. After the store failed, one short try only: if it is still down, the next
    attempt ends the run (and settles its group) instead."""
    import mlflow

    with one_short_try() if store_failed else contextlib.nullcontext(), contextlib.suppress(Exception):
        mlflow.end_run(status)  # MLflow forgets the run locally before it calls the store
        if group:
            _settle_group(client, group)


def git_state(root: Path) -> tuple[str, bool]:
    """(commit, dirty) of the code being run; ("unknown", True) outside git.

    Dirty means changed code: params.yaml and dvc.lock are left out, since `dvc exp run -S` always
    changes them and every run records its resolved params anyway.
    """
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!params.yaml", ":!dvc.lock"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        return commit, bool(status.strip())
    except (OSError, subprocess.CalledProcessError):
        return "unknown", True


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


# The run that groups the stage runs of one `dvc exp run` (its `stage` tag), and the environment
# variable through which a caller (`reprovision tune`) nests those groups under a run of its own.
EXP_PARENT = "dvc-exp"
PARENT_RUN_ENV = "REPROVISION_PARENT_RUN_ID"

# MLflow 3's UI opens an experiment on this view: the training runs (not the GenAI overview).
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def _ensure_experiment(client, root: Path, uri: str) -> str:
    name = experiment_name()
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        for key, value in EXPERIMENT_KIND.items():
            if key not in exp.tags:  # made before the tag was set, or by someone else (a team's admin)
                try:
                    client.set_experiment_tag(exp.experiment_id, key, value)
                except Exception:
                    # Two stages at once (a parallel queue): the other one's insert won the race.
                    if key not in client.get_experiment(exp.experiment_id).tags:
                        raise
        return exp.experiment_id
    # Through a server, the server decides where artifacts go (it proxies them to its store): a
    # client-side file:// location would put them on the logging machine's disk, out of teammates' reach.
    location = None if uri.startswith(("http://", "https://")) else artifact_location(root)
    try:
        return client.create_experiment(name, artifact_location=location, tags=EXPERIMENT_KIND)
    except Exception:  # another stage created it a moment ago (parallel queue)
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def _parent_run(client, experiment_id: str, exp_name: str, commit: str) -> tuple[str | None, str | None]:
    """(the run the stage run nests under, the group run of its `dvc exp run` or None).

    The group is made by the first stage that logs and found by the next ones, itself nested under
    $REPROVISION_PARENT_RUN_ID when set; a plain `dvc repro` nests under that run alone (no group).
    The group is made when that first stage starts, so it starts before its first stage run (MLflow
    cannot move a run's start time); `_settle_group` keeps its end and status those of its stages."""
    outer = os.environ.get(PARENT_RUN_ENV) or None
    if not exp_name:
        return outer, None
    query = f"tags.stage = '{EXP_PARENT}' and tags.dvc_exp_name = '{exp_name}'"
    found = client.search_runs([experiment_id], query, max_results=1)
    if found:
        return found[0].info.run_id, found[0].info.run_id
    tags = {
        "stage": EXP_PARENT,
        "dvc_exp_name": exp_name,
        "git_commit": commit,
        **({"mlflow.parentRunId": outer} if outer else {}),
    }
    group = client.create_run(experiment_id, run_name=exp_name, tags=tags)  # RUNNING, from now
    return group.info.run_id, group.info.run_id


# A group run's status: the worst of its stage runs' (one FAILED stage fails the `dvc exp run`).
WORST_FIRST = ("FAILED", "KILLED", "RUNNING", "SCHEDULED", "FINISHED")


def _settle_group(client, group_id: str) -> None:
    """Make the group run of a `dvc exp run` span its stage runs: it ends when the latest of them
    ended, and its status is the worst of theirs (WORST_FIRST): FAILED as soon as one failed, RUNNING
    while one runs, FINISHED once all finished. Called when a stage run starts and when it ends."""
    group = client.get_run(group_id)
    stages = client.search_runs([group.info.experiment_id], f"tags.mlflow.parentRunId = '{group_id}'")
    if not stages:
        return
    statuses = {run.info.status for run in stages}
    status = next((s for s in WORST_FIRST if s in statuses), "FINISHED")
    end = max((run.info.end_time for run in stages if run.info.end_time), default=None)
    if status in ("RUNNING", "SCHEDULED"):
        client.update_run(group_id, status=status)  # keeps the end time so far (MLflow cannot clear it)
    else:
        client.set_terminated(group_id, status, end_time=end or group.info.end_time)


def _stage_tags(stage: str, model: str, tags: dict[str, str], *, commit: str, dirty: bool, exp_name: str) -> dict:
    """A stage run's tags: what ran (code, command, libraries), where (host, process), and the stage's own `tags`."""
    return {
        "stage": stage,
        "model": model,
        "git_commit": commit,
        "git_dirty": str(dirty).lower(),
        "dvc_exp_name": exp_name,
        "command": " ".join(sys.argv),
        # Which process runs it: a later attempt ends this run only once that process is gone.
        "host": socket.gethostname(),
        "pid": str(os.getpid()),
        # Set by `reprovision reproduce` for the replay of a recorded run.
        **({"reproduces": os.environ["REPROVISION_REPRODUCES"]} if os.environ.get("REPROVISION_REPRODUCES") else {}),
        **{f"version.{k}": v for k, v in library_versions().items()},
        **tags,
    }


def _start_stage_run(
    client,
    root: Path,
    uri: str,
    tags: dict[str, str],
    run_name: str,
    system_metrics: bool,
    *,
    exp_name: str,
    commit: str,
) -> tuple[Any, str | None]:
    """(the started run, its `dvc exp run`'s group run or None): in the project's experiment, nested
    under its parent, whose id it adds to `tags`."""
    import mlflow

    with reports_outage(), reports_refusal(uri):
        experiment_id = _ensure_experiment(client, root, uri)
        parent, group = _parent_run(client, experiment_id, exp_name, commit)
        if parent:
            tags["mlflow.parentRunId"] = parent  # how MLflow nests a run under another
        run = attempt["run"] = mlflow.start_run(
            experiment_id=experiment_id, run_name=run_name, tags=tags, log_system_metrics=system_metrics
        )
    return run, group


def _log_params(params: dict[str, Any], resolved: Params) -> None:
    """The run's flat params with the recipe it ran under, and the full resolved params: what `reprovision
    reproduce <run-id>` replays."""
    import mlflow

    items = sorted((k, str(v)) for k, v in {**params, "recipe": resolved.recipe}.items())
    for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
        mlflow.log_params(dict(items[i : i + 100]))
    mlflow.log_dict(resolved.model_dump(), RESOLVED_PARAMS)


@contextlib.contextmanager
def stage_run(
    stage: str,
    model: str,
    params: dict[str, Any],
    tags: dict[str, str],
    resolved: Params,
    root: Path | None = None,
    checkpoint: Path | None = None,
    run_name: str | None = None,
    system_metrics: bool = False,
) -> Iterator[Any]:
    """One MLflow run for one executed stage, carrying everything needed to repeat it.

    `params` are the run's flat MLflow params (with `recipe`); `resolved` is the whole params.yaml as the stage
    read it, logged as resolved_params.json for `reprovision reproduce`. `checkpoint` is where the
    stage saves its training (default: checkpoints/<model>.pt), named by the error messages.
    `run_name` defaults to the stage's name (plus the DVC experiment's); `system_metrics`: MLflow
    samples CPU, memory (and GPU, where pynvml finds one) every 10 s as `system/...` metrics.

    The run ends FINISHED, FAILED on an error (TrackingError when the store stopped answering),
    KILLED on Ctrl-C or SIGTERM.
    """
    import mlflow

    root = root or project_root()
    uri = tracking_uri(root)
    check_store(uri)
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient(uri)
    attempt.clear()
    attempt["checkpoint"] = checkpoint or CHECKPOINTS / f"{model}.pt"
    commit, dirty = git_state(Path.cwd())
    exp_name = os.environ.get("DVC_EXP_NAME", "")
    all_tags = _stage_tags(stage, model, tags, commit=commit, dirty=dirty, exp_name=exp_name)
    run_name = run_name or stage
    run_name = f"{run_name}-{exp_name}" if exp_name else run_name
    run, group = _start_stage_run(
        client, root, uri, all_tags, run_name, system_metrics, exp_name=exp_name, commit=commit
    )
    try:
        with _sigterm_as_interrupt():
            with reports_outage():
                if group:
                    _settle_group(client, group)  # RUNNING while this stage runs (unless one failed)
                _supersede_earlier_attempts(client, run, all_tags)
                _log_params(params, resolved)
            yield run
    except BaseException as err:
        # Also the store failing inside the block through mlflow's own functions (report, tune).
        cause = outage_cause(err)
        status = "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED"
        _end_run(status, store_failed=cause is not None, client=client, group=group)
        if cause is not None and not isinstance(err, TrackingError):
            raise outage_error(cause) from None
        raise
    with reports_outage():
        mlflow.end_run("FINISHED")
        if group:
            _settle_group(client, group)
