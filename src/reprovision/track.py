"""MLflow tracking: where runs go, what every run records, and failing fast when it can't.

Where runs go, first match wins:
1. `MLFLOW_TRACKING_URI`, when set;
2. the server started by `reprovision mlflow-server` (it writes `.mlflow-server/uri` in the repo),
   needed for parallel `dvc queue start -j N`, because SQLite does not take parallel writers well;
3. MLflow's own default, SQLite `mlflow.db` at the repository root, by absolute path.

DVC runs queued experiments in temporary copies under `<repo>/.dvc/tmp/exps/`; `project_root()`
resolves those back to the real repository so that their runs and artifacts land in the same
store as everything else instead of vanishing with the copy.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

from .config import Params

EXPERIMENT = "reprovision"
RESOLVED_PARAMS = "resolved_params.json"
SERVER_STATE = Path(".mlflow-server")
LIBRARIES = ("torch", "torchvision", "numpy", "mlflow", "dvc", "scikit-learn", "torchmetrics", "pydantic")

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


class TrackingError(RuntimeError):
    """The tracking store can't be used; raised before any training starts."""


def project_root(start: Path | None = None) -> Path:
    """The repository root, seen through DVC's temporary experiment copies."""
    path = (start or Path.cwd()).resolve()
    parts = path.parts
    for i in range(len(parts) - 2):
        if parts[i : i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    return path


def server_uri(root: Path) -> str | None:
    """URI of the server `reprovision mlflow-server` runs for this repository, if it is up."""
    state = root / SERVER_STATE / "server.json"
    if not state.exists():
        return None
    info = json.loads(state.read_text())
    try:
        os.kill(info["pid"], 0)
    except (ProcessLookupError, PermissionError):
        return None
    return info["uri"]


def tracking_uri(root: Path | None = None) -> str:
    root = root or project_root()
    return os.environ.get("MLFLOW_TRACKING_URI") or server_uri(root) or f"sqlite:///{root / 'mlflow.db'}"


def artifact_location(root: Path) -> str:
    return (root / "mlartifacts").as_uri()


def check_store(uri: str) -> None:
    """Fail fast, before any compute, if runs could not be recorded."""
    if uri.startswith(("http://", "https://")):
        import requests

        try:
            requests.get(uri.rstrip("/") + "/health", timeout=5).raise_for_status()
        except requests.RequestException as err:
            raise TrackingError(
                f"MLflow server {uri} is not reachable ({err.__class__.__name__}). Start it with "
                "`reprovision mlflow-server start`, or unset MLFLOW_TRACKING_URI to log to the local "
                "SQLite store mlflow.db. Nothing was trained."
            ) from None
    elif uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        folder = db.parent
        if not folder.is_dir() or not os.access(folder, os.W_OK) or (db.exists() and not os.access(db, os.W_OK)):
            raise TrackingError(
                f"MLflow store {db} is not writable. Fix the permissions, or point "
                "MLFLOW_TRACKING_URI at a writable store (e.g. sqlite:////tmp/mlflow.db). Nothing was trained."
            )


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
            cwd=root, capture_output=True, text=True, check=True,
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


def _ensure_experiment(client, root: Path) -> str:
    exp = client.get_experiment_by_name(EXPERIMENT)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(EXPERIMENT, artifact_location=artifact_location(root))
    except Exception:  # another stage created it a moment ago (parallel queue)
        exp = client.get_experiment_by_name(EXPERIMENT)
        if exp is None:
            raise
        return exp.experiment_id


@contextlib.contextmanager
def stage_run(
    stage: str, model: str, params: dict[str, Any], tags: dict[str, str], resolved: Params, root: Path | None = None
) -> Iterator[Any]:
    """One MLflow run for one executed stage, carrying everything needed to repeat it.

    `params` are the run's flat MLflow params; `resolved` is the whole params.yaml as the stage
    read it, logged as resolved_params.json for `reprovision reproduce`.
    """
    import mlflow

    root = root or project_root()
    uri = tracking_uri(root)
    check_store(uri)
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient(uri)
    experiment_id = _ensure_experiment(client, root)
    commit, dirty = git_state(Path.cwd())
    exp_name = os.environ.get("DVC_EXP_NAME", "")
    all_tags = {
        "stage": stage,
        "model": model,
        "git_commit": commit,
        "git_dirty": str(dirty).lower(),
        "dvc_exp_name": exp_name,
        "command": " ".join(sys.argv),
        # Set by `reprovision reproduce` for the replay of a recorded run.
        **({"reproduces": os.environ["REPROVISION_REPRODUCES"]} if os.environ.get("REPROVISION_REPRODUCES") else {}),
        **{f"version.{k}": v for k, v in library_versions().items()},
        **tags,
    }
    run_name = f"{stage}-{exp_name}" if exp_name else stage
    with mlflow.start_run(experiment_id=experiment_id, run_name=run_name, tags=all_tags) as run:
        items = sorted((k, str(v)) for k, v in params.items())
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            mlflow.log_params(dict(items[i : i + 100]))
        # The full resolved params: what `reprovision reproduce <run-id>` replays.
        mlflow.log_dict(resolved.model_dump(), RESOLVED_PARAMS)
        yield run


def params_hash(flat: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(flat, sort_keys=True, default=str).encode()).hexdigest()[:16]


@contextlib.contextmanager
def resumed_run(run_id: str) -> Iterator[Any]:
    """Reopen an earlier run of this store (e.g. the training run a model came from) to add to it."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    with mlflow.start_run(run_id=run_id) as run:
        yield run


def log_epoch(metrics: dict[str, float], step: int) -> None:
    log_metrics({k: v for k, v in metrics.items() if k != "epoch"}, step=step)


def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    """Numbers to the active run (non-numbers are left out: they are tags or params)."""
    import mlflow

    mlflow.log_metrics({k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)


def log_artifacts(*paths: Path, folder: str | None = None) -> None:
    import mlflow

    for path in paths:
        mlflow.log_artifact(str(path), artifact_path=folder)


def log_torch_model(model, name: str, example_input, description: str) -> None:
    """Log the model with a signature inferred from a real input; pinning requirements avoids a slow inference pass."""
    import mlflow
    import torch
    from mlflow.models import infer_signature

    model = model.eval()
    with torch.no_grad():
        example_output = model(example_input).float()
    signature = infer_signature(example_input.cpu().numpy(), example_output.cpu().numpy())
    mlflow.pytorch.log_model(
        model.cpu(),
        name=name,
        signature=signature,
        # pickle: works for every architecture here (pt2 needs torch.export to trace each model).
        serialization_format="pickle",
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
    )
    mlflow.set_tag("mlflow.note.content", description)


def write_run_ref(path: Path, run) -> dict[str, str]:
    ref = {
        "run_id": run.info.run_id,
        "experiment_id": run.info.experiment_id,
        "tracking_uri": tracking_uri(),
        "run_name": run.info.run_name,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(ref, indent=2) + "\n")
    return ref
