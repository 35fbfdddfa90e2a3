"""A parallel queue of experiments (`dvc queue start -j 2`) logging to one MLflow server, and
that server's UI in a browser."""

from __future__ import annotations

import html
import json
import re
import sys
import time
from pathlib import Path
from urllib.parse import quote

import pytest
import requests

from conftest import ROOT, TINY, dvc, pipeline_env, sh
from pipeline import all_runs
from test_report import chromium

pytestmark = pytest.mark.slow


def test_parallel_queue_logs_every_run_to_the_server(module_repo, tmp_path):
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
            time.sleep(1)
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

        # The MLflow UI as people use it (headless Chromium): the compare view of a ViT and a CNN run
        # of one experiment shows both runs' params; its test_acc link opens both per-epoch curves.
        vit = next(r for r in new if tags(r)["stage"] == "train-vit")
        cnn = next(r for r in new if tags(r)["stage"] == "train-cnn" and tags(r)["dvc_exp_name"] == tags(vit)["dvc_exp_name"])
        names = [vit["info"]["run_name"], cnn["info"]["run_name"]]
        runs, experiments = (quote(json.dumps(ids)) for ids in ([vit["info"]["run_id"], cnn["info"]["run_id"]], [exp["experiment"]["experiment_id"]]))
        compare = chromium("--virtual-time-budget=20000", "--dump-dom", f"{uri}/#/compare-runs?runs={runs}&experiments={experiments}",
                           profile=tmp_path / "profile")
        assert all(name in compare for name in names) and "embed_dim" in compare and "widths" in compare  # ViT's and CNN's params
        link = next(html.unescape(h) for h in re.findall(r'href="(#/metric\?[^"]*)"', compare) if "%22test_acc%22" in h)
        curves = chromium("--virtual-time-budget=20000", "--dump-dom", f"{uri}/{link}", profile=tmp_path / "profile")
        assert all(name in curves for name in names) and curves.count("(step=2)") >= 2, curves[-3000:]
        # One solid line through epochs 1 and 2 per run (plotly draws a faint copy of each beside it). Not
        # counted by colour: the UI derives a run's colour from its id, and two runs can get the same one.
        lines = re.findall(r'<path class="js-line" d="M[^"]*L[^"]*" style="[^"]*stroke-opacity: 1;', curves)
        assert len(lines) == 2, curves[-3000:]
        shot = ROOT / "reports/screenshots/mlflow-compare.png"  # a CI artifact (git-ignored)
        shot.parent.mkdir(parents=True, exist_ok=True)
        chromium("--virtual-time-budget=20000", f"--screenshot={shot}", "--window-size=1366,900", "--hide-scrollbars", f"{uri}/{link}",
                 profile=tmp_path / "profile")
        assert shot.stat().st_size > 10_000
    finally:
        sh([reprovision, "mlflow-server", "stop"], repo, env, check=False)



