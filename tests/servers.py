"""Throwaway servers for the scale-out tests: PostgreSQL, an S3 emulator (moto) and a team MLflow server.

Context managers, for pytest fixtures of any scope. Each server listens on 127.0.0.1 only, on a free
port; every wait has a deadline; and each stops what it started by that process's own pid or process
group (never by name), also when the test inside fails, then removes its files.

    with postgres() as db_uri, s3() as store, team_mlflow_server(repo, db_uri, store) as server:
        ...  # server.uri, server.admin_username, server.admin_password
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

LOCALHOST = "127.0.0.1"
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOCALHOST, 0))
        return sock.getsockname()[1]


def wait_for(
    ready: Callable[[], bool], what: str, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None
) -> None:
    """Poll `ready` until it answers True; fail naming `what` (and the log's tail) if `proc` exits or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"{what} exited with code {proc.returncode}{_tail(log)}")
        with contextlib.suppress(Exception):  # not up yet: refused, reset, not answering
            if ready():
                return
        time.sleep(0.2)
    pytest.fail(f"{what} did not come up within {timeout:.0f} s{_tail(log)}")


def _tail(log: Path | None) -> str:
    if log is None or not log.exists():
        return ""
    return ":\n" + log.read_text(errors="replace")[-3000:]


def stop_group(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 15.0) -> None:
    """End a process started with start_new_session=True and everything in its group: `sig`, then SIGKILL."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


# --- PostgreSQL ---------------------------------------------------------------------------------


def _postgres_bin() -> Path:
    """The folder of PostgreSQL's server programs: initdb's, from PATH (Debian links it there) or
    Debian's versioned folders, newest first. initdb and postgres come from it, so one version."""
    installed = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda path: int(Path(path).parts[-3]), reverse=True
    )
    initdb = shutil.which("initdb") or next(iter(installed), None)
    if initdb is None:
        pytest.fail("PostgreSQL is not installed (no initdb): apt-get install postgresql-15 (CI installs it)")
    return Path(os.path.realpath(initdb)).parent


def _accepts(dsn: str) -> bool:
    import psycopg

    with psycopg.connect(dsn):
        return True


@contextlib.contextmanager
def postgres(database: str = "mlflow", timeout: float = 60.0) -> Iterator[str]:
    """A throwaway PostgreSQL cluster with an empty database `database`; yields its SQLAlchemy URI
    (postgresql+psycopg://postgres@127.0.0.1:<port>/<database>, psycopg 3, no password).

    PostgreSQL refuses to run as root: as root, the cluster runs as the `postgres` user in a folder
    it owns, made outside pytest's tmp folders (those are 0700 root's). Trust authentication is
    fine for a cluster that listens on 127.0.0.1 only, on a private socket folder, and then is gone.
    """
    import psycopg

    bin_dir = _postgres_bin()
    as_root = os.geteuid() == 0
    # Popen switches user itself: no runuser/su process between us and postgres, whose group we stop.
    run_as = {"user": "postgres", "group": "postgres", "extra_groups": []} if as_root else {}
    base = Path(tempfile.mkdtemp(prefix="reprovision-pg-"))
    data, sockets, log = base / "data", base / "sockets", base / "postgres.log"
    proc = None
    try:
        sockets.mkdir()
        if as_root:
            for path in (base, sockets):
                shutil.chown(path, "postgres", "postgres")
        made = subprocess.run(
            [
                str(bin_dir / "initdb"),
                "-D",
                str(data),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ],
            capture_output=True,
            text=True,
            cwd=base,
            timeout=timeout,
            **run_as,
        )
        if made.returncode != 0:
            pytest.fail(f"initdb failed ({made.returncode}):\n{made.stdout[-2000:]}\n{made.stderr[-2000:]}")
        port = free_port()
        # postgres itself, not pg_ctl (which detaches it): our child, in its own process group, stopped by its pid.
        cmd = [
            str(bin_dir / "postgres"),
            "-D",
            str(data),
            "-p",
            str(port),
            "-c",
            f"listen_addresses={LOCALHOST}",
            "-c",
            f"unix_socket_directories={sockets}",
            # A test's database: losing it in a crash costs nothing, waiting for the disk costs time.
            "-c",
            "fsync=off",
            "-c",
            "synchronous_commit=off",
            "-c",
            "full_page_writes=off",
        ]
        with log.open("ab") as out:
            proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, cwd=base, start_new_session=True, **run_as
            )
        admin = f"host={LOCALHOST} port={port} user=postgres dbname=postgres connect_timeout=2"
        wait_for(lambda: _accepts(admin), "PostgreSQL", timeout, proc, log)
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{database}"')
        yield f"postgresql+psycopg://postgres@{LOCALHOST}:{port}/{database}"
    finally:
        if proc is not None:
            stop_group(proc, signal.SIGINT)  # PostgreSQL's "fast" shutdown: ends the sessions, exits
        shutil.rmtree(base, ignore_errors=True)


# --- S3 (moto) ----------------------------------------------------------------------------------


@dataclass
class S3:
    """An S3 endpoint with one bucket, and the credentials of whoever may use it (the server side only)."""

    endpoint_url: str
    bucket: str
    env: dict[str, str] = field(repr=False)  # AWS_* and MLFLOW_S3_ENDPOINT_URL, for a server's environment

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=self.env["AWS_DEFAULT_REGION"],
            aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=self.env["AWS_SECRET_ACCESS_KEY"],
        )

    def keys(self, prefix: str = "") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return [item["Key"] for page in pages for item in page.get("Contents", [])]


@contextlib.contextmanager
def s3(bucket: str = "reprovision", timeout: float = 30.0) -> Iterator[S3]:
    """moto's S3 server (an in-memory emulator) on 127.0.0.1 with `bucket` created."""
    import requests

    port = free_port()
    moto = BIN / "moto_server"
    cmd = [str(moto)] if moto.exists() else [sys.executable, "-m", "moto.server"]
    logs = Path(tempfile.mkdtemp(prefix="reprovision-s3-"))
    log = logs / "moto.log"
    proc = None
    try:
        with log.open("ab") as out:
            proc = subprocess.Popen(
                [*cmd, "-H", LOCALHOST, "-p", str(port)], stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        endpoint = f"http://{LOCALHOST}:{port}"
        wait_for(lambda: requests.get(endpoint, timeout=2).ok, "moto_server", timeout, proc, log)
        # moto takes any key; these only have to be set, and they are fake.
        env = {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "MLFLOW_S3_ENDPOINT_URL": endpoint,
        }
        store = S3(endpoint, bucket, env)
        store.client().create_bucket(Bucket=bucket)
        yield store
    finally:
        if proc is not None:
            stop_group(proc)
        shutil.rmtree(logs, ignore_errors=True)


# --- the team MLflow server ---------------------------------------------------------------------


@dataclass
class TeamServer:
    """A running team server, and what its admin does through MLflow's REST API (the README's
    commands: each method names its call; `curl -u admin:<password> -H 'Content-Type: application/json'`
    does the same)."""

    uri: str
    admin_username: str
    admin_password: str = field(repr=False)
    root: Path

    def admin_env(self) -> dict[str, str]:
        return {"MLFLOW_TRACKING_USERNAME": self.admin_username, "MLFLOW_TRACKING_PASSWORD": self.admin_password}

    def as_admin(self, method: str, path: str, **kwargs) -> dict:
        import requests

        response = requests.request(
            method, self.uri + path, auth=(self.admin_username, self.admin_password), timeout=30, **kwargs
        )
        assert response.ok, f"{method} {path}: {response.status_code} {response.text[:500]}"
        return response.json() if response.text.strip() else {}

    def create_user(self, username: str, password: str) -> None:
        """POST /api/2.0/mlflow/users/create {"username", "password"} (12 characters at least)."""
        self.as_admin("POST", "/api/2.0/mlflow/users/create", json={"username": username, "password": password})

    def experiment_id(self, name: str) -> str:
        """GET /api/2.0/mlflow/experiments/get-by-name, else POST /api/2.0/mlflow/experiments/create {"name"}."""
        import requests

        found = requests.get(
            self.uri + "/api/2.0/mlflow/experiments/get-by-name",
            params={"experiment_name": name},
            auth=(self.admin_username, self.admin_password),
            timeout=30,
        )
        if found.ok:
            return found.json()["experiment"]["experiment_id"]
        return self.as_admin("POST", "/api/2.0/mlflow/experiments/create", json={"name": name})["experiment_id"]

    def grant(self, username: str, experiment_id: str, permission: str = "EDIT") -> None:
        """POST /api/3.0/mlflow/users/permissions/grant {"username", "resource_type": "experiment",
        "resource_id": <experiment id>, "permission"}: READ, USE, EDIT (log runs), MANAGE (also grant)."""
        self.as_admin(
            "POST",
            "/api/3.0/mlflow/users/permissions/grant",
            json={
                "username": username,
                "resource_type": "experiment",
                "resource_id": experiment_id,
                "permission": permission,
            },
        )


# What would point MLflow or boto3 elsewhere than the servers under test, or log in as someone else.
CLIENT_SETTINGS = ("MLFLOW_TRACKING", "MLFLOW_S3", "MLFLOW_AUTH", "MLFLOW_EXPERIMENT", "AWS_")


def without_client_settings(env: dict[str, str]) -> dict[str, str]:
    """The environment less CLIENT_SETTINGS."""
    return {k: v for k, v in env.items() if not k.startswith(CLIENT_SETTINGS)}


@contextlib.contextmanager
def team_mlflow_server(
    root: Path,
    backend_store_uri: str,
    store: S3,
    *,
    admin_username: str = "admin",
    extra_env: dict[str, str] | None = None,
) -> Iterator[TeamServer]:
    """`reprovision mlflow-server start --auth` in `root` with the PostgreSQL backend and S3 artifacts
    (s3://<bucket>/mlartifacts), as a team would run it, on 127.0.0.1. The admin's login is made up
    here and handed to the server through its environment only; the S3 credentials likewise.
    Stopped with `reprovision mlflow-server stop` (its process group); by pid if that did not work."""
    password = secrets.token_urlsafe(18)
    env = {
        **without_client_settings(os.environ),
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        **store.env,
        "MLFLOW_AUTH_ADMIN_USERNAME": admin_username,
        "MLFLOW_AUTH_ADMIN_PASSWORD": password,
        **(extra_env or {}),
    }
    reprovision = str(BIN / "reprovision")
    state = root / ".mlflow-server" / "server.json"
    cmd = [
        reprovision,
        "mlflow-server",
        "start",
        "--auth",
        "--backend-store-uri",
        backend_store_uri,
        "--artifacts-destination",
        f"s3://{store.bucket}/mlartifacts",
    ]
    try:
        # `start` waits up to 120 s itself, then stops what it started: this deadline only catches a hang.
        started = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=180)
        if started.returncode != 0:
            log = root / ".mlflow-server" / "server.log"
            pytest.fail(f"{' '.join(cmd)} failed ({started.returncode}): {started.stderr[-3000:]}{_tail(log)}")
        yield TeamServer(started.stdout.strip().splitlines()[-1], admin_username, password, root)
    finally:
        pid = json.loads(state.read_text())["pid"] if state.exists() else None
        subprocess.run([reprovision, "mlflow-server", "stop"], cwd=root, env=env, capture_output=True, timeout=30)
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)  # only if `stop` left it running


# --- a browser's login ---------------------------------------------------------------------------


@contextlib.contextmanager
def logged_in_proxy(upstream: str, username: str, password: str) -> Iterator[str]:
    """A reverse proxy on 127.0.0.1 that forwards every request to `upstream` with the user's Basic
    login: what a browser sends once its user has typed the login into its dialog. (Headless Chromium
    can't be given one: a URL with credentials breaks the MLflow UI's own fetch calls.)"""
    import http.server
    import threading

    import requests

    session = requests.Session()
    session.auth = (username, password)

    class Forward(http.server.BaseHTTPRequestHandler):
        def _forward(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0)) or None
            headers = {
                k: v for k, v in self.headers.items() if k.lower() not in ("host", "authorization", "accept-encoding")
            }
            answer = session.request(self.command, upstream + self.path, data=body, headers=headers, timeout=30)
            self.send_response(answer.status_code)
            for key, value in answer.headers.items():
                if key.lower() not in ("content-encoding", "content-length", "transfer-encoding", "connection"):
                    self.send_header(key, value)
            self.send_header("Content-Length", str(len(answer.content)))
            self.end_headers()
            self.wfile.write(answer.content)

        do_GET = do_POST = do_PATCH = do_DELETE = _forward

        def log_message(self, *args) -> None:
            pass

    proxy = http.server.ThreadingHTTPServer((LOCALHOST, 0), Forward)
    thread = threading.Thread(target=proxy.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://{LOCALHOST}:{proxy.server_address[1]}"
    finally:
        proxy.shutdown()
        proxy.server_close()
