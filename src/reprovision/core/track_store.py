"""Where MLflow runs go, and failing fast when they can't be recorded there.

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
TrackingError with one line saying what happened, what is safe and how to continue
(`reports_outage`); the classifier loop checkpoints each epoch before it logs it, so stopping there
loses no training. Every tracking module imports this one, so these bounds hold wherever MLflow is called.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

from reprovision.core.stage import attempt, resume_hint
from reprovision.errors import TrackingError

DEFAULT_EXPERIMENT = "reprovision"
SERVER_STATE = Path(".mlflow-server")

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
def reports_refusal(uri: str) -> Iterator[None]:
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


def outage_cause(err: BaseException | None) -> BaseException | None:
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


def outage_error(cause: BaseException) -> TrackingError:
    import mlflow

    run = attempt.get("run")  # the stage's own run (not one that evaluate reopened)
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
def reports_outage() -> Iterator[None]:
    """Turns the store going away into TrackingError (one line, no traceback, via stage.main)."""
    try:
        yield
    except Exception as err:
        cause = None if isinstance(err, TrackingError) else outage_cause(err)
        if cause is None:
            raise
        raise outage_error(cause) from None


@contextlib.contextmanager
def one_short_try() -> Iterator[None]:
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
