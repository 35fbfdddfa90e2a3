"""A parallel queue of experiments (`dvc queue start -j 2`) logging to one MLflow server."""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import pytest
import requests

from conftest import TINY, dvc, pipeline_env, sh
from pipeline import all_runs

pytestmark = pytest.mark.slow


def test_parallel_queue_logs_every_run_to_the_server(module_repo):
    """2 queued experiments at once (2 queue workers), both logging over HTTP to one `reprovision mlflow-server`."""
    repo = module_repo
    env = pipeline_env()
    # The data once, here: the queued experiments restore it from the run-cache instead of both converting it.
    dvc(repo, "repro", "fetch-data", env=env)
    reprovision = str(Path(sys.executable).parent / "reprovision")
    uri = sh([reprovision, "mlflow-server", "start"], repo, env).stdout.strip()
    try:
        assert uri.startswith("http://127.0.0.1:")
        _, before = all_runs(repo)
        # Small classifiers: this test is about the queue, not the models. Two epochs: histories must be complete.
        # With a validation split, which every history then carries.
        small = ["vit.epochs=2", "cnn.epochs=2", "data.val_fraction=0.2"]
        lrs = ["1e-3", "4e-4"]  # one at a time on each worker
        # Only the classifier stages (and what they need, restored from the run cache): the queue is under test.
        queue_args = ["exp", "run", "--queue", "train-vit", "train-cnn"]
        for s in [*TINY, *small]:
            queue_args += ["-S", s]
        dvc(repo, *queue_args, "-S", "lr=" + ",".join(lrs), env=env)
        dvc(repo, "queue", "start", "-j", "2", env=env)
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:
            status = dvc(repo, "queue", "status", env=env).stdout
            if not re.search(r"\b(Queued|Running)\b", status):
                break
            time.sleep(5)
        failed = [line.split()[0] for line in status.splitlines() if "Failed" in line]
        assert not failed, status + "".join(dvc(repo, "queue", "logs", task, env=env, check=False).stdout[-3000:] for task in failed)
        assert status.count("Success") >= len(lrs), status

        shown = json.loads(dvc(repo, "exp", "show", "--json", env=env).stdout)
        text = json.dumps(shown)
        for lr in ["0.001", "0.0004"]:
            assert f'"lr": {lr}' in text or f'"lr": "{lr}"' in text or lr in text

        # The REST API of the server: every queued classifier run is there with complete histories and artifacts.
        exp = requests.get(f"{uri}/api/2.0/mlflow/experiments/get-by-name", params={"experiment_name": "reprovision"}).json()
        search = requests.post(
            f"{uri}/api/2.0/mlflow/runs/search",
            json={"experiment_ids": [exp["experiment"]["experiment_id"]], "max_results": 1000},
        ).json()
        known = {r.info.run_id for r in before}
        tags = lambda r: {t["key"]: t["value"] for t in r["data"].get("tags", [])}
        new = [r for r in search["runs"] if r["info"]["run_id"] not in known]
        # Each experiment's stage runs nest under one run named after it.
        groups = {r["info"]["run_id"]: r["info"]["run_name"] for r in new if tags(r)["stage"] == "dvc-exp"}
        new = [r for r in new if r["info"]["run_id"] not in groups]
        assert len(groups) == len(lrs) and all(tags(r)["dvc_exp_name"] == groups[tags(r)["mlflow.parentRunId"]] for r in new)
        stages = sorted(tags(r)["stage"] for r in new)
        assert stages == sorted(["train-vit", "train-cnn"] * len(lrs)), stages
        assert all(r["info"]["status"] == "FINISHED" for r in new)
        for run in new:
            if tags(run)["stage"] not in ("train-vit", "train-cnn"):
                continue
            history = requests.get(
                f"{uri}/api/2.0/mlflow/metrics/get-history", params={"run_id": run["info"]["run_id"], "metric_key": "test_acc"}
            ).json()["metrics"]
            assert sorted(m["step"] for m in history) == [1, 2]
            val = requests.get(
                f"{uri}/api/2.0/mlflow/metrics/get-history", params={"run_id": run["info"]["run_id"], "metric_key": "val_acc"}
            ).json()["metrics"]
            assert sorted(m["step"] for m in val) == [1, 2]
            artifacts = requests.get(f"{uri}/api/2.0/mlflow/artifacts/list", params={"run_id": run["info"]["run_id"]}).json()
            assert {"card.md", "history.csv"} <= {f["path"] for f in artifacts.get("files", [])}, artifacts
        lrs_logged = sorted(float({p["key"]: p["value"] for p in r["data"]["params"]}["lr"]) for r in new if tags(r)["stage"] == "train-vit")
        assert lrs_logged == sorted(float(x) for x in lrs)
        assert "database is locked" not in (repo / ".mlflow-server/server.log").read_text()
    finally:
        sh([reprovision, "mlflow-server", "stop"], repo, env, check=False)



