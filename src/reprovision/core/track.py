"""MLflow tracking: where runs go, what every run records, and failing fast when it can't.

Where runs go, first match wins:
1. `MLFLOW_TRACKING_URI`, when set;
2. the server started by `reprovision mlflow-server` (it writes `.mlflow-server/server.json` in the repo),
   needed for parallel `dvc queue start -j N`, because SQLite does not take parallel writers well;
3. MLflow's own default, SQLite `mlflow.db` at the repository root, by absolute path.
The experiment is `reprovision`, or MLFLOW_EXPERIMENT_NAME when set (`experiment_name()`).

A team's server (`reprovision mlflow-server start --auth`, server.py) asks for a login: MLflow sends
MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD, and `check_store` tries them before any compute.

DVC runs queued experiments in temporary copies under `<repo>/.dvc/tmp/exps/`; `project_root()`
resolves those back to the real repository so that their runs and artifacts land in the same
store as everything else instead of vanishing with the copy.

When the store goes away mid-run (README, "Tracking and reproducibility"): every call that talks to
it gives up within a bound (`HTTP_DEFAULTS`, instead of MLflow's ~4 minutes per call) and raises
TrackingError with one line saying what happened, what is safe and how to continue; the classifier
loop checkpoints each epoch before it logs it, so stopping there loses no training. A run whose
process dies is ended FAILED or KILLED on the way out where the process can, and otherwise by the
next attempt of the same stage, which links the two (`previous_attempt` / `superseded_by`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

from reprovision.config import Params
from reprovision.layout import CHECKPOINTS, PREPARED

DEFAULT_EXPERIMENT = "reprovision"
RESOLVED_PARAMS = "resolved_params.json"
SERVER_STATE = Path(".mlflow-server")
LIBRARIES = ("torch", "torchvision", "numpy", "mlflow", "dvc", "scikit-learn", "torchmetrics", "pydantic")

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

# MLflow retries a failed HTTP call 7 times with back-off up to 120 s, ~4 minutes per call, and
# waits up to 120 s for an answer: a stage whose server died hung ~8 minutes (two calls) before it
# failed. These bound one call to ~6-9 s when the server is gone (connection refused: retries after
# 0, 2 and 4 s, plus MLflow's jitter of up to 1 s each) and ~50 s when it hangs (4 tries x 10 s):
# enough to ride out a blip, short enough to stop soon after the epoch's checkpoint. They are
# defaults only: a value set in the environment wins (e.g. a remote server that rate-limits).
HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}
for _name, _value in HTTP_DEFAULTS.items():
    os.environ.setdefault(_name, _value)

# The stage run of this process (stage_run fills it): what an error message says is safe.
_attempt: dict[str, Any] = {}


class TrackingError(RuntimeError):
    """The tracking store can't be used: refused before training starts, or lost during a run."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process was (like Ctrl-C's KeyboardInterrupt), so that clean-up runs."""


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


LOCAL_UI = "http://127.0.0.1:5000"  # where `mlflow ui` serves by default


def training_runs_url(ui: str, experiment_id: str) -> str:
    """The MLflow UI page of an experiment's training runs. MLflow 3.17's UI opens an experiment on its
    GenAI overview (traces, tokens) unless the URL, or the browser's last choice, says
    `workflowType=machine_learning`: the experiment's `mlflow.experimentKind` tag does not decide it
    (read in its JS bundle; tests/test_team_server.py checks the page in headless Chromium)."""
    return f"{ui.rstrip('/')}/#/experiments/{experiment_id}?workflowType=machine_learning"


def tracking_uri(root: Path | None = None) -> str:
    root = root or project_root()
    return os.environ.get("MLFLOW_TRACKING_URI") or server_uri(root) or f"sqlite:///{root / 'mlflow.db'}"


def experiment_name() -> str:
    """The MLflow experiment the runs go to: MLFLOW_EXPERIMENT_NAME (MLflow's own variable), else `reprovision`."""
    return os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT


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
        # /health answers anyone, also on a server with a login (MLflow leaves it open for load
        # balancers): one call that needs the login tells whether this client's is accepted.
        refused = _login_refused(uri)
        if refused:
            raise TrackingError(refused)
    elif uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        folder = db.parent
        if not folder.is_dir() or not os.access(folder, os.W_OK) or (db.exists() and not os.access(db, os.W_OK)):
            raise TrackingError(
                f"MLflow store {db} is not writable. Fix the permissions, or point "
                "MLFLOW_TRACKING_URI at a writable store (e.g. sqlite:////tmp/mlflow.db). Nothing was trained."
            )
    elif uri.partition("://")[0].partition("+")[0] in DATABASE_SERVERS:
        problem = database_problem(uri)
        if problem:
            raise TrackingError(
                f"MLflow store {shown_url(uri)}: {problem}. Start the database, or point MLFLOW_TRACKING_URI at "
                "a store that answers (unset, runs go to the local SQLite mlflow.db). Nothing was trained."
            )


# The database servers MLflow (and Optuna) store runs in through SQLAlchemy, by URL scheme; SQLite is a file.
DATABASE_SERVERS = ("postgresql", "mysql", "mssql")


def shown_url(uri: str) -> str:
    """A database URL as a message may show it: its password masked (`ps` and logs see the rest anyway)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(uri).render_as_string(hide_password=True)
    except ArgumentError:
        return uri


def database_problem(uri: str, timeout: int = 5) -> str | None:
    """Why the SQLAlchemy database URL `uri` can't be used, in a few words, or None once it connects.

    One connection attempt, bounded by `timeout` seconds for a database server (MLflow and Optuna
    would retry for minutes, or end in a SQLAlchemy traceback); a SQLite file is opened (and made)."""
    import sqlalchemy

    try:
        url = sqlalchemy.engine.make_url(uri)
    except sqlalchemy.exc.ArgumentError:
        return (
            "not a database URL; expected dialect[+driver]://[user@]host[:port]/database, "
            "e.g. postgresql+psycopg://mlflow@db.lan:5432/mlflow or sqlite:///optuna.db"
        )
    try:
        url.get_dialect()
    except sqlalchemy.exc.NoSuchModuleError:
        return (
            f"SQLAlchemy knows no database {url.drivername!r}; "
            "use e.g. sqlite:///optuna.db or postgresql+psycopg://user@host:5432/database"
        )
    bounded = {"connect_timeout": timeout} if url.get_backend_name() in ("postgresql", "mysql") else {}
    try:
        engine = sqlalchemy.create_engine(url, connect_args=bounded)
    except ImportError as err:
        return (
            f"its driver needs the Python module {err.name or err}, which is not installed; for PostgreSQL use "
            "postgresql+psycopg://... (the team extras: pip install -e '.[team]')"
        )
    try:
        with engine.connect():
            return None
    except sqlalchemy.exc.SQLAlchemyError as err:
        why = (str(getattr(err, "orig", None) or err).strip().splitlines() or ["no reason given"])[0]
        return f"no connection ({why})"
    finally:
        engine.dispose()


def _login_refused(uri: str) -> str | None:
    """Why the server refuses this client's login (None: accepted, or it asks for none). The call is
    made with the credentials MLflow itself will send, from the environment or ~/.mlflow/credentials."""
    from mlflow.exceptions import MlflowException
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    creds = get_default_host_creds(uri)
    try:
        # Any authenticated user may search (the answer lists what they may read); one try, like /health.
        response = http_request(
            creds,
            "/api/2.0/mlflow/experiments/search",
            "GET",
            params={"max_results": 1},
            max_retries=0,
            timeout=5,
            raise_on_status=False,
        )
    except MlflowException:
        return None  # no answer just after /health's: not a login problem; the run reports it if it lasts
    if response.status_code != 401:
        return None
    if not creds.username:
        return (
            f"MLflow server {uri} requires a login: set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD "
            "to the account its admin made for you (README, 'Team setup'). Nothing was trained."
        )
    return (
        f"MLflow server {uri} refused the login of {creds.username!r}: check MLFLOW_TRACKING_USERNAME and "
        "MLFLOW_TRACKING_PASSWORD (a wrong or changed password, or no such user). Nothing was trained."
    )


@contextlib.contextmanager
def _reports_refusal(uri: str) -> Iterator[None]:
    """A server that knows the login but does not let it write to the experiment (HTTP 403): one
    line saying what to ask for, before the stage's run starts, instead of MLflow's REST error."""
    from mlflow.exceptions import MlflowException

    try:
        yield
    except MlflowException as err:
        if err.error_code != "PERMISSION_DENIED":
            raise
        from mlflow.utils.credentials import read_mlflow_creds

        who = read_mlflow_creds().username or "this client"
        raise TrackingError(
            f"MLflow server {uri} does not let {who!r} write to the experiment {experiment_name()!r}. "
            "Ask its admin for EDIT on that experiment (README, 'Team setup'), or log to one of your own "
            "with MLFLOW_EXPERIMENT_NAME=<new name>. The stage stopped before its run started."
        ) from None


def _outage_cause(err: BaseException | None) -> BaseException | None:
    """The HTTP failure behind an error, if the store stopped answering. MLflow re-raises requests'
    errors as MlflowException inside its `except`, so the cause is found along the exception chain."""
    import requests

    lost = (
        requests.ConnectionError,
        requests.Timeout,
        requests.exceptions.RetryError,
        requests.exceptions.ChunkedEncodingError,
    )
    while err is not None and not isinstance(err, lost):
        err = err.__cause__ or err.__context__
    return err


def resume_hint() -> str:
    """What is safe and the command that continues, for the one-line error of a stopped stage."""
    command = "`dvc exp run` again (same -S options)" if os.environ.get("DVC_EXP_NAME") else "`dvc repro`"
    checkpoint = _attempt.get("checkpoint")
    if checkpoint is not None and checkpoint.exists():
        return f"Training so far is safe in the per-epoch checkpoint {checkpoint}; {command} continues from it."
    return f"{command} runs the stage again."


def _outage_error(cause: BaseException) -> TrackingError:
    import mlflow

    run = _attempt.get("run")  # the stage's own run (not one that evaluate reopened)
    text = str(cause).lower()  # requests reports a read timeout after retries as a ConnectionError
    if "timed out" in text:
        what = f"no answer within {os.environ.get('MLFLOW_HTTP_REQUEST_TIMEOUT')} s"
    else:
        what = "connection refused" if "refused" in text else cause.__class__.__name__
    what += f", {os.environ.get('MLFLOW_HTTP_REQUEST_MAX_RETRIES')} retries"
    return TrackingError(
        f"the MLflow tracking server {mlflow.get_tracking_uri()} stopped answering mid-run ({what}). "
        f"{resume_hint()} If it is the local server, start it again first (`reprovision mlflow-server start`)"
        + (f"; run {run.info.run_id} ends FAILED, at the latest when the next attempt starts." if run else ".")
    )


@contextlib.contextmanager
def _reports_outage() -> Iterator[None]:
    """Turns the store going away into TrackingError (one line, no traceback, via stage.main)."""
    try:
        yield
    except Exception as err:
        cause = None if isinstance(err, TrackingError) else _outage_cause(err)
        if cause is None:
            raise
        raise _outage_error(cause) from None


@contextlib.contextmanager
def _one_short_try() -> Iterator[None]:
    """MLflow's HTTP settings for a single quick attempt: for a store that has just failed us."""
    quick = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "3"}  # MLflow reads them per call
    saved = {name: os.environ.get(name) for name in quick}
    os.environ.update(quick)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                del os.environ[name]
            else:
                os.environ[name] = value


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
        client.set_tag(old.info.run_id, "superseded_by", run.info.run_id)
        earlier.append(old.info.run_id)
    if earlier:
        client.set_tag(run.info.run_id, "previous_attempt", ",".join(earlier))


def _end_run(status: str, store_failed: bool) -> None:
    """End the active run on the way out of an error, never hiding that error. After the store
    failed, one short try only: if it is still down, the next attempt ends the run instead."""
    import mlflow

    with _one_short_try() if store_failed else contextlib.nullcontext(), contextlib.suppress(Exception):
        mlflow.end_run(status)  # MLflow forgets the run locally before it calls the store


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


def _parent_run(client, experiment_id: str, exp_name: str, commit: str) -> str | None:
    """The run the stage run nests under: the group run of its `dvc exp run` (made by the first stage
    that logs, found by the next ones), itself nested under $REPROVISION_PARENT_RUN_ID when set;
    that run alone for a plain `dvc repro`."""
    outer = os.environ.get(PARENT_RUN_ENV) or None
    if not exp_name:
        return outer
    query = f"tags.stage = '{EXP_PARENT}' and tags.dvc_exp_name = '{exp_name}'"
    found = client.search_runs([experiment_id], query, max_results=1)
    if found:
        return found[0].info.run_id
    tags = {
        "stage": EXP_PARENT,
        "dvc_exp_name": exp_name,
        "git_commit": commit,
        **({"mlflow.parentRunId": outer} if outer else {}),
    }
    group = client.create_run(experiment_id, run_name=exp_name, tags=tags)
    client.set_terminated(group.info.run_id, "FINISHED")  # a folder for the stage runs: nothing runs in it
    return group.info.run_id


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

    `params` are the run's flat MLflow params; `resolved` is the whole params.yaml as the stage
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
    _attempt.clear()
    _attempt["checkpoint"] = checkpoint or CHECKPOINTS / f"{model}.pt"
    commit, dirty = git_state(Path.cwd())
    exp_name = os.environ.get("DVC_EXP_NAME", "")
    all_tags = {
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
    run_name = run_name or stage
    run_name = f"{run_name}-{exp_name}" if exp_name else run_name
    with _reports_outage(), _reports_refusal(uri):
        experiment_id = _ensure_experiment(client, root, uri)
        parent = _parent_run(client, experiment_id, exp_name, commit)
        if parent:
            all_tags["mlflow.parentRunId"] = parent  # how MLflow nests a run under another
        run = _attempt["run"] = mlflow.start_run(
            experiment_id=experiment_id, run_name=run_name, tags=all_tags, log_system_metrics=system_metrics
        )
    try:
        with _sigterm_as_interrupt():
            with _reports_outage():
                _supersede_earlier_attempts(client, run, all_tags)
                items = sorted((k, str(v)) for k, v in params.items())
                for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
                    mlflow.log_params(dict(items[i : i + 100]))
                # The full resolved params: what `reprovision reproduce <run-id>` replays.
                mlflow.log_dict(resolved.model_dump(), RESOLVED_PARAMS)
            yield run
    except BaseException as err:
        # Also the store failing inside the block through mlflow's own functions (report, tune).
        cause = _outage_cause(err)
        _end_run("KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED", store_failed=cause is not None)
        if cause is not None and not isinstance(err, TrackingError):
            raise _outage_error(cause) from None
        raise
    with _reports_outage():
        mlflow.end_run("FINISHED")


def params_hash(flat: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(flat, sort_keys=True, default=str).encode()).hexdigest()[:16]


def log_epoch(metrics: dict[str, float], step: int) -> None:
    log_metrics({k: v for k, v in metrics.items() if k != "epoch"}, step=step)


@_reports_outage()
def log_metrics(metrics: dict[str, float], step: int | None = None, model_id: str | None = None, dataset=None) -> None:
    """Numbers to the active run (non-numbers are left out: they are tags or params), linked to a
    logged model and a dataset when given."""
    import mlflow

    numbers = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
    mlflow.log_metrics(numbers, step=step, model_id=model_id, dataset=dataset)


@_reports_outage()
def log_artifacts(*paths: Path, folder: str | None = None) -> None:
    import mlflow

    for path in paths:
        mlflow.log_artifact(str(path), artifact_path=folder)


# What the server answers when two runs insert the same dataset at once, by backend store.
DATASET_INSERT_CLASHES = ("UNIQUE constraint failed: datasets", 'violates unique constraint "dataset_pk"')

# MLflow's names for where a dataset was used (its UI shows them beside each input).
DATASET_CONTEXTS = {"train": "training", "val": "validation", "test": "test"}


@_reports_outage()
def log_datasets(root: Path, dataset: str, sha256: str, images: dict[str, int]) -> dict[str, Any]:
    """The data the active run read, as MLflow dataset inputs: one per split in `images` (train,
    val, test: how many images of it), named `<dataset>-<split>`, with fetch-data's manifest digest
    and its folder as the source. Returns the datasets by split, to link metrics to (MLflow keeps a
    metric's dataset only together with a model_id: evaluate's figures have both)."""
    import mlflow
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    with warnings.catch_warnings():  # MLflow registers its local source class twice, then warns it can't choose
        warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted in multiple ways")
        source = resolve_dataset_source(str((root / PREPARED / dataset).resolve()))
    found = {}
    for split, count in images.items():
        found[split] = MetaDataset(source, name=f"{dataset}-{split}", digest=sha256[:32])
        tags = {"images": str(count), "sha256": sha256}
        try:
            mlflow.log_input(found[split], context=DATASET_CONTEXTS[split], tags=tags)
        except mlflow.exceptions.MlflowException as err:
            # The store looks a dataset up, then inserts it: two experiments logging the same one at
            # once collide on the insert (SQLite: UNIQUE constraint failed; PostgreSQL: duplicate key
            # ... "dataset_pk"). The other run has made it meanwhile: a second try finds it.
            if not any(clash in str(err) for clash in DATASET_INSERT_CLASHES):
                raise
            time.sleep(0.5)
            mlflow.log_input(found[split], context=DATASET_CONTEXTS[split], tags=tags)
    return found


# The run tags a logged model carries too: what it was trained on, and with which params.
MODEL_TAGS = ("dataset", "data_sha256", "params_sha256")


@_reports_outage()
def log_model(
    module,
    *,
    name: str,
    example,
    description: str,
    params: dict[str, Any],
    run_tags: dict[str, str],
    step: int,
    metadata: dict[str, Any] | None = None,
    registered_model_name: str | None = None,
):
    """Log `module` (serving.py's raw-input wrappers) as the active run's logged model `name`, with
    its params and the run's tags that identify what it was trained on, returning its ModelInfo.
    MLflow links the run's metrics of `step` (the shipped epoch's, with their datasets) to it.

    pt2 format (torch.export, batch size left dynamic), so it loads without this package and without
    unpickling; the signature and input example come from `example`, a real input batch of 2 or more.
    """
    import mlflow
    import torch
    from mlflow.models import infer_signature

    module = module.cpu().eval()
    example = example.cpu()
    with torch.no_grad():
        output = module(example)
    with warnings.catch_warnings():
        # torch.export's archive writer rebuilds channels-last (non-contiguous) weights from their storage and
        # warns that this may fail off the CPU; they are on the CPU here (the e2e test serves them).
        warnings.filterwarnings("ignore", message="No complete tensor found in the group", category=UserWarning)
        info = mlflow.pytorch.log_model(
            module,
            name=name,
            signature=infer_signature(example.numpy(), output.numpy()),
            input_example=example.numpy(),
            serialization_format="pt2",
            params={k: str(v) for k, v in params.items()},
            tags={key: run_tags[key] for key in MODEL_TAGS},
            step=step,
            metadata=metadata,
            registered_model_name=registered_model_name,
            # Pinned: otherwise MLflow infers requirements by loading the model once more.
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
        )
    mlflow.set_tag("mlflow.note.content", description)
    return info


def write_run_ref(path: Path, run, model=None, registered_model: str | None = None) -> dict[str, str]:
    """models/<name>/run.json: the run (and logged model, when given) that made the model in this folder."""
    import mlflow

    ref = {
        "run_id": run.info.run_id,
        "experiment_id": run.info.experiment_id,
        # Where the run was logged; tracking_uri() would fall back to SQLite if the server had died since.
        "tracking_uri": mlflow.get_tracking_uri(),
        "run_name": run.info.run_name,
        **({"model_id": model.model_id, "model_uri": model.model_uri} if model is not None else {}),
        **(
            {"registered_model": registered_model, "registered_version": str(model.registered_model_version)}
            if registered_model
            else {}
        ),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(ref, indent=2) + "\n")
    return ref
