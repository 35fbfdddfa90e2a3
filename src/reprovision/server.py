"""`reprovision mlflow-server start|stop|status`: one local MLflow server for parallel experiments.

`dvc queue start -j N` runs N stages at once in temporary copies of the repo. SQLite takes one
writer at a time, so the stages log over HTTP to one server instead; the server owns the
SQLite file (the same `mlflow.db` at the repository root) and the artifacts folder. While the
server runs, `track.tracking_uri()` finds it through `.mlflow-server/server.json`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from .track import SERVER_STATE, project_root, server_uri


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(root: Path | None = None, port: int = 0, timeout: float = 120.0) -> str:
    import requests

    root = root or project_root()
    running = server_uri(root)
    if running:
        return running
    port = port or _free_port()
    state_dir = root / SERVER_STATE
    state_dir.mkdir(exist_ok=True)
    mlflow_bin = shutil.which("mlflow", path=str(Path(sys.executable).parent)) or "mlflow"
    cmd = [
        mlflow_bin, "server",
        "--host", "127.0.0.1",
        "--port", str(port),
        "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination", str(root / "mlartifacts"),
        "--workers", "1",
    ]
    # No background job runner (it makes start-up ~4x slower and is not used here).
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
    log = (state_dir / "server.log").open("ab")
    # Its own session (process group), so `stop` can end the server and all its workers at once.
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=root)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited with code {proc.returncode}; see {state_dir / 'server.log'}")
        try:
            if requests.get(uri + "/health", timeout=2).ok:
                (state_dir / "server.json").write_text(json.dumps({"pid": proc.pid, "uri": uri}) + "\n")
                return uri
        except requests.RequestException:
            pass
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGTERM)
    raise RuntimeError(f"mlflow server did not answer on {uri} within {timeout:.0f} s; see {state_dir / 'server.log'}")


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
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    os.killpg(pid, signal.SIGKILL)
    return True
