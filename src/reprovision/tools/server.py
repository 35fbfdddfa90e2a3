"""`reprovision mlflow-server start|stop|status`: one MLflow server, for parallel experiments or a team.

`dvc queue start -j N` runs N stages at once in temporary copies of the repo. SQLite takes one
writer at a time, so the stages log over HTTP to one server instead; by default the server owns the
SQLite file (the same `mlflow.db` at the repository root) and the artifacts folder, and listens on
127.0.0.1 only. While the server runs, `track_store.tracking_uri()` finds it through `.mlflow-server/server.json`.

A team server (README, "Team setup") is the same command with options:

    export MLFLOW_AUTH_ADMIN_USERNAME=admin MLFLOW_AUTH_ADMIN_PASSWORD=...   # never in the repo
    export AWS_ACCESS_KEY_ID=... AWS_SECRET_ACCESS_KEY=...                   # the server's own
    export MLFLOW_S3_ENDPOINT_URL=https://s3.example.lan                      # S3-compatible storage only
    reprovision mlflow-server start --host 10.0.0.5 --port 5000 --auth \\
        --backend-store-uri postgresql+psycopg://mlflow@db.lan:5432/mlflow \\
        --artifacts-destination s3://team-bucket/mlartifacts

`--host` is the address the server binds: a team server binds its LAN address (MLflow's own host
check accepts the private ranges 10.*, 172.16-31.*, 192.168.*). The server proxies every artifact
to `--artifacts-destination` (experiments get `mlflow-artifacts:/<id>` locations), so only the server
holds storage credentials: teammates' clients need a tracking login, no S3 keys. A database password
is better kept out of the URI (which `ps` shows): psycopg reads PGPASSWORD or ~/.pgpass.

`--auth` runs MLflow's basic-auth app. Its settings go to `.mlflow-server/basic_auth.ini` (written
at each start, git-ignored, mode 0600: the database URIs in it may carry passwords). The admin's name
and password are MLflow's own MLFLOW_AUTH_ADMIN_USERNAME / MLFLOW_AUTH_ADMIN_PASSWORD, which the
server reads from its environment (they win over the ini), so the password is never written to disk.
MLflow uses them once, to create the admin in an empty user database; after that the stored account
counts (change its password through MLflow's update-password API). `/health` answers without a login
(MLflow leaves it open for load balancers), so the readiness wait below needs no credentials.
"""

from __future__ import annotations

import configparser
import contextlib
import importlib.util
import io
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from reprovision.core.track_store import SERVER_STATE, database_problem, project_root, server_uri, shown_url

# MLflow's own variables for the admin account the auth app creates on first start (see above).
ADMIN_USERNAME_ENV = "MLFLOW_AUTH_ADMIN_USERNAME"
ADMIN_PASSWORD_ENV = "MLFLOW_AUTH_ADMIN_PASSWORD"
# MLflow 3.17 refuses shorter passwords (mlflow.utils.validation._validate_password) when it creates
# the admin: checked here too, so that the mistake is reported before a server starts, not in its log.
MIN_PASSWORD_LENGTH = 12
# The basic-auth app's CSRF key; when it is not set, one is made once and kept in the state folder.
SECRET_KEY_ENV = "MLFLOW_FLASK_SERVER_SECRET_KEY"
AUTH_CONFIG = "basic_auth.ini"
AUTH_DATABASE = "basic_auth.db"
# Users the admin has not granted anything may read every experiment, not write to it (MLflow's default).
DEFAULT_PERMISSION = "READ"
AUTH_CACHE_SECONDS = 60  # see _auth_settings

# SQLAlchemy drivers of the backend-store URIs a team would use, and the module each needs.
DATABASE_DRIVERS = {"postgresql+psycopg": "psycopg", "postgresql+psycopg2": "psycopg2", "postgresql": "psycopg2"}


class ServerError(RuntimeError):
    """The server can't be started as asked: a bad option, a missing setting, or it did not come up."""


def _free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _check_driver(uri: str, option: str) -> None:
    scheme = uri.split("://", 1)[0]
    module = DATABASE_DRIVERS.get(scheme)
    if module and importlib.util.find_spec(module) is None:
        fix = (
            "use the psycopg 3 driver: postgresql+psycopg://..."
            if module == "psycopg2"
            else "install the team extras: pip install -e '.[team]'"
        )
        raise ServerError(f"{option} {scheme}://... needs the Python module {module}, which is not installed: {fix}")


def _check_options(
    backend_store_uri: str, artifacts_destination: str, auth: bool, auth_database_uri: str | None
) -> None:
    """Refuse what could not work, naming the fix, before a server starts."""
    _check_driver(backend_store_uri, "--backend-store-uri")
    if auth and auth_database_uri:
        _check_driver(auth_database_uri, "--auth-database-uri")
    if artifacts_destination.startswith("s3://") and importlib.util.find_spec("boto3") is None:
        raise ServerError(
            "--artifacts-destination s3://... needs boto3: install the team extras: pip install -e '.[team]'"
        )
    if auth:
        missing = [name for name in (ADMIN_USERNAME_ENV, ADMIN_PASSWORD_ENV) if not os.environ.get(name)]
        if missing:
            raise ServerError(
                f"--auth needs the admin's login in the environment: set {' and '.join(missing)} "
                f"({ADMIN_USERNAME_ENV}, {ADMIN_PASSWORD_ENV}; MLflow creates that admin on first start). "
                "Nothing was started."
            )
        if len(os.environ[ADMIN_PASSWORD_ENV]) < MIN_PASSWORD_LENGTH:
            raise ServerError(
                f"{ADMIN_PASSWORD_ENV} is shorter than MLflow's minimum of {MIN_PASSWORD_LENGTH} "
                "characters. Nothing was started."
            )
        if importlib.util.find_spec("flask_wtf") is None:
            raise ServerError(
                "--auth needs Flask-WTF (MLflow's `auth` extra), which is not installed: "
                "pip install -e '.[team]'. Nothing was started."
            )
    _check_database(backend_store_uri, "--backend-store-uri")
    if auth and auth_database_uri:
        _check_database(auth_database_uri, "--auth-database-uri")


def _check_database(uri: str, option: str) -> None:
    """Connect once to a database server given by URI (SQLite files need no check). MLflow itself
    retries an unreachable database for ~100 s before it says why; this says so in at most 5."""
    if uri.startswith("sqlite:"):
        return
    problem = database_problem(uri)
    if problem:
        raise ServerError(
            f"{option} {shown_url(uri)}: {problem}. Is the database server running, does the database exist, "
            "and may this user log in? Nothing was started."
        )


def _write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read, also when it existed with a wider mode."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        os.fchmod(fd, 0o600)
        f.write(text)


def _auth_settings(state_dir: Path, auth_database_uri: str | None) -> dict[str, str]:
    """Write the auth app's ini and return the server's environment variables that point to it."""
    config = configparser.ConfigParser()
    config["mlflow"] = {
        "default_permission": DEFAULT_PERMISSION,
        "database_uri": auth_database_uri or f"sqlite:///{state_dir / AUTH_DATABASE}",
        "authorization_function": "mlflow.server.auth:authenticate_request_basic_auth",
        # MLflow checks the password hash on every request: 0.6 s of server CPU each (measured), for
        # a stage's dozens of calls. It can remember a login that succeeded; off by default because
        # with several workers a changed password is seen by one worker at once, by the others only
        # after the TTL. With our one worker, changes made through the API count at once; only edits
        # of the user database by hand wait up to these 60 s.
        "auth_cache_ttl_seconds": str(AUTH_CACHE_SECONDS),
        # admin_username / admin_password are left to MLFLOW_AUTH_ADMIN_* in the server's environment.
    }
    ini = state_dir / AUTH_CONFIG
    text = io.StringIO()
    config.write(text)
    _write_private(ini, text.getvalue())
    env = {"MLFLOW_AUTH_CONFIG_PATH": str(ini)}
    if not os.environ.get(SECRET_KEY_ENV):
        # Static across restarts (CSRF tokens of open browser sessions stay valid), never in the repo.
        key_file = state_dir / "flask_secret_key"
        if not key_file.exists():
            _write_private(key_file, secrets.token_urlsafe(32))
        env[SECRET_KEY_ENV] = key_file.read_text().strip()
    return env


def start(
    root: Path | None = None,
    port: int = 0,
    timeout: float = 120.0,
    *,
    host: str = "127.0.0.1",
    backend_store_uri: str | None = None,
    artifacts_destination: str | None = None,
    auth: bool = False,
    auth_database_uri: str | None = None,
) -> str:
    """Start the server (or return the URI of the one already running) once it answers.

    Defaults: the repository's SQLite `mlflow.db` and `mlartifacts/` folder, on 127.0.0.1, no login.
    `auth_database_uri` (with `auth`): MLflow's user database, by default `.mlflow-server/basic_auth.db`.
    """
    import requests

    root = root or project_root()
    running = server_uri(root)
    if running:
        return running
    backend_store_uri = backend_store_uri or f"sqlite:///{root / 'mlflow.db'}"
    artifacts_destination = artifacts_destination or str(root / "mlartifacts")
    _check_options(backend_store_uri, artifacts_destination, auth, auth_database_uri)
    port = port or _free_port(host)
    state_dir = root / SERVER_STATE
    state_dir.mkdir(exist_ok=True)
    mlflow_bin = shutil.which("mlflow", path=str(Path(sys.executable).parent)) or "mlflow"
    cmd = [
        mlflow_bin,
        "server",
        "--host",
        host,
        "--port",
        str(port),
        "--backend-store-uri",
        backend_store_uri,
        "--artifacts-destination",
        artifacts_destination,
        "--workers",
        "1",
    ]
    # No background job runner (it makes start-up ~4x slower and is not used here).
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
    if auth:
        cmd += ["--app-name", "basic-auth"]
        # The user database (password hashes, by default) and the CSRF key live here: owner only.
        state_dir.chmod(0o700)
        env.update(_auth_settings(state_dir, auth_database_uri))
    log_path = state_dir / "server.log"
    log = log_path.open("ab")
    # Its own session (process group), so `stop` can end the server and all its workers at once.
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=root)
    # Bound to every interface, it is reached on this machine through the loopback address.
    uri = f"http://{'127.0.0.1' if host == '0.0.0.0' else host}:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServerError(
                f"mlflow server exited with code {proc.returncode}: {_last_error(log_path)} (see {log_path})"
            )
        try:
            if requests.get(uri + "/health", timeout=2).ok:  # open to all, also with --auth
                (state_dir / "server.json").write_text(json.dumps({"pid": proc.pid, "uri": uri}) + "\n")
                return uri
        except requests.RequestException:
            pass
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGTERM)
    raise ServerError(f"mlflow server did not answer on {uri} within {timeout:.0f} s; see {log_path}")


def _last_error(log_path: Path) -> str:
    """The line of the server's log that says why it stopped (MLflow ends with the exception)."""
    lines = [line.strip() for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
    found = [line for line in lines if "Error" in line or "Exception" in line]
    return (found or lines or ["no output"])[-1][:500]


def stop(root: Path | None = None) -> bool:
    root = root or project_root()
    state = root / SERVER_STATE / "server.json"
    if not state.exists():
        return False
    pid = json.loads(state.read_text())["pid"]
    state.unlink()
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    for _ in range(50):
        with contextlib.suppress(ChildProcessError):  # started by this process: reaped, or it lingers as a zombie
            os.waitpid(pid, os.WNOHANG)
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    os.killpg(pid, signal.SIGKILL)
    return True
