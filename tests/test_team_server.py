"""A team's infrastructure for real (README "Team setup"): an MLflow server with runs in PostgreSQL,
artifacts in S3 (moto's emulator) and a login for everyone; a DVC remote on that S3; exp-workers.

The server is started the way a team starts it (`reprovision mlflow-server start --auth
--backend-store-uri postgresql+psycopg://... --artifacts-destination s3://...`, tests/servers.py),
and a teammate's client logs with nothing but the server's address and a login: no storage
credentials, since the server proxies every artifact. The tests run in order and build on each
other: the queue's experiments are what the run-cache test shares.
"""

from __future__ import annotations

import html
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock
from urllib.parse import quote

import psycopg
import pytest
import requests
import servers
import yaml
from conftest import TINY, copy_repo, dvc, pipeline_env, sh
from pipeline import stages_cached, stages_run
from test_report import chromium

from reprovision.core import track

pytestmark = pytest.mark.scaleout

USERNAME, PASSWORD = "alice", "alice-password-0001"


@pytest.fixture(scope="module")
def team(tmp_path_factory):
    """(PostgreSQL URI, S3, the team server), shared by this module's tests and stopped after them."""
    root = tmp_path_factory.mktemp("team-repo")
    with (
        servers.postgres() as database,
        servers.s3() as store,
        servers.team_mlflow_server(root, database, store) as server,
    ):
        yield database, store, server


def client_env(monkeypatch, tmp_path: Path, uri: str, **login: str) -> None:
    """A teammate's environment: the server's address and the login given, nothing else of MLflow's
    or AWS's (and no ~/.mlflow/credentials, which MLflow would read too)."""
    for name in list(os.environ):
        if name.startswith(servers.CLIENT_SETTINGS):
            monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    for name, value in login.items():
        monkeypatch.setenv(name, value)


def test_clients_without_a_valid_login_are_refused_before_any_compute(team, monkeypatch, tmp_path):
    _, _, server = team
    # /health is open (MLflow exempts it from the login, for load balancers and `start`'s readiness wait)...
    assert requests.get(server.uri + "/health", timeout=10).status_code == 200
    # ...the API is not.
    search = server.uri + "/api/2.0/mlflow/experiments/search"
    assert requests.get(search, params={"max_results": 1}, timeout=10).status_code == 401
    assert (
        requests.get(search, params={"max_results": 1}, auth=("admin", "not-the-password"), timeout=10).status_code
        == 401
    )

    client_env(monkeypatch, tmp_path, server.uri)
    with pytest.raises(
        track.TrackingError, match="requires a login: set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"
    ):
        track.check_store(server.uri)
    client_env(
        monkeypatch, tmp_path, server.uri, MLFLOW_TRACKING_USERNAME="admin", MLFLOW_TRACKING_PASSWORD="not-the-password"
    )
    with pytest.raises(
        track.TrackingError,
        match="refused the login of 'admin': check MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD",
    ):
        track.check_store(server.uri)
    client_env(monkeypatch, tmp_path, server.uri, **server.admin_env())
    track.check_store(server.uri)


def test_a_teammate_logs_runs_models_and_figures_to_postgres_and_s3_with_a_login_only(team, monkeypatch, tmp_path):
    import mlflow
    import psycopg
    import torch
    from PIL import Image
    from torch import nn

    from reprovision.config import Params
    from reprovision.publish.serving import RawImageClassifier

    database, store, server = team
    experiment = "team-vit"  # through MLFLOW_EXPERIMENT_NAME, as a team would pick its own
    # The admin makes the account and the experiment (README, "Team setup"); EDIT comes below.
    server.create_user(USERNAME, PASSWORD)
    experiment_id = server.experiment_id(experiment)

    client_env(monkeypatch, tmp_path, server.uri, MLFLOW_TRACKING_USERNAME=USERNAME, MLFLOW_TRACKING_PASSWORD=PASSWORD)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", experiment)
    assert not any(name.startswith("AWS_") for name in os.environ)
    track.check_store(server.uri)  # the login is right...
    tags = {"dataset": "mnist", "data_sha256": "0" * 64, "params_sha256": "team-test"}
    with pytest.raises(track.TrackingError, match=f"does not let 'alice' write to the experiment '{experiment}'.*EDIT"):
        with track.stage_run("train-vit", "vit", {}, tags, Params(), root=tmp_path):
            pass  # ...but READ, everyone's default, does not let it log

    server.grant(USERNAME, experiment_id, "EDIT")
    figure = tmp_path / "confusion.png"
    Image.new("RGB", (8, 8), (200, 30, 30)).save(figure)
    model = RawImageClassifier(nn.Sequential(nn.Flatten(), nn.Linear(64, 3)), mean=[0.5], std=[0.25])
    example = torch.randint(0, 256, (2, 1, 8, 8), dtype=torch.uint8)
    with track.stage_run("train-vit", "vit", {"lr": 1e-3}, tags, Params(), root=tmp_path) as run:
        track.log_metrics({"test_acc": 0.5}, step=1)
        track.log_artifacts(figure, folder="figures")
        logged = track.log_model(
            model,
            name="vit",
            example=example,
            description="a tiny test model",
            params={"lr": 1e-3},
            run_tags=tags,
            step=1,
        )
    run_id = run.info.run_id

    # The run is a row of the team's PostgreSQL...
    with psycopg.connect(database.replace("postgresql+psycopg://", "postgresql://")) as conn:
        row = conn.execute("SELECT experiment_id, status FROM runs WHERE run_uuid = %s", (run_id,)).fetchone()
        models = conn.execute("SELECT model_id FROM logged_models WHERE source_run_id = %s", (run_id,)).fetchall()
    assert row == (int(experiment_id), "FINISHED")
    assert models == [(logged.model_id,)]
    # ...the experiment's artifacts go through the server (not to a file:// path on the client's disk)...
    location = mlflow.MlflowClient().get_experiment(experiment_id).artifact_location
    assert location == f"mlflow-artifacts:/{experiment_id}"
    assert not (tmp_path / "mlartifacts").exists()
    # ...into the bucket.
    keys = set(store.keys(f"mlartifacts/{experiment_id}/"))
    run_artifacts = f"mlartifacts/{experiment_id}/{run_id}/artifacts"
    assert {f"{run_artifacts}/figures/confusion.png", f"{run_artifacts}/{track.RESOLVED_PARAMS}"} <= keys, sorted(keys)
    assert f"mlartifacts/{experiment_id}/models/{logged.model_id}/artifacts/MLmodel" in keys, sorted(keys)


# --- A team's DVC work through the server and a shared DVC remote ---------------------------------
# One bare git origin with a DVC remote on the emulated S3 (s3://<bucket>/dvc), clones of it as
# teammates' checkouts. DVC reaches the emulator through AWS_ENDPOINT_URL (what boto3 reads for
# S3-compatible storage); MLflow's client needs only its login.

TEAMMATE, TEAMMATE_PASSWORD = "bob", "bob-password-00001"
DVC_REMOTE = "shared"
SMALL = [*TINY, "cnn.epochs=2"]  # histories of 2 epochs (TINY holds out a validation split)
QUEUED = {"alice-lr-1e-3": "1e-3", "alice-lr-4e-4": "4e-4"}  # experiment name -> lr


@pytest.fixture(scope="module")
def origin(team, tmp_path_factory, stage_mirror) -> Path:
    """The team's bare git repository: this checkout's code with `dvc remote add -d shared s3://<bucket>/dvc`."""
    _, store, server = team
    server.create_user(TEAMMATE, TEAMMATE_PASSWORD)
    server.grant(TEAMMATE, server.experiment_id(track.DEFAULT_EXPERIMENT), "EDIT")
    work = copy_repo(tmp_path_factory.mktemp("baseline"))
    dvc(work, "remote", "add", "-d", DVC_REMOTE, f"s3://{store.bucket}/dvc")
    sh(["git", "-c", "user.name=test", "-c", "user.email=test@example.com", "commit", "-qam", "DVC remote"], work)
    bare = tmp_path_factory.mktemp("origin") / "reprovision.git"
    sh(["git", "clone", "-q", "--bare", str(work), str(bare)], work)
    return bare


def teammate_env(team, storage: bool) -> dict:
    """A teammate's shell: the server's address and their login; S3 keys only for the DVC remote."""
    _, store, server = team
    env = servers.without_client_settings(pipeline_env())
    env.update(
        MLFLOW_TRACKING_URI=server.uri, MLFLOW_TRACKING_USERNAME=TEAMMATE, MLFLOW_TRACKING_PASSWORD=TEAMMATE_PASSWORD
    )
    if storage:
        env.update({k: v for k, v in store.env.items() if k.startswith("AWS_")}, AWS_ENDPOINT_URL=store.endpoint_url)
    return env


def clone(origin: Path, dest: Path) -> Path:
    sh(["git", "clone", "-q", str(origin), str(dest)], dest.parent)
    return dest


def server_runs(server, **tags: str) -> list:
    """The runs on the team server whose tags match (read as the admin)."""
    from mlflow import MlflowClient

    with mock.patch.dict(os.environ, server.admin_env()):
        client = MlflowClient(server.uri)
        exp = client.get_experiment_by_name(track.DEFAULT_EXPERIMENT)
        query = " and ".join(f"tags.{k} = '{v}'" for k, v in tags.items())
        return client.search_runs([exp.experiment_id], query, max_results=1000)


@pytest.fixture(scope="module")
def alice(origin, tmp_path_factory) -> Path:
    """A teammate's clone; the queue test runs its experiments here, the next test shares them."""
    return clone(origin, tmp_path_factory.mktemp("alice") / "repo")


def test_a_queue_of_two_experiments_logs_through_the_team_server(team, alice, tmp_path):
    """`dvc queue start -j 2`: two experiments at once, both logging to the team server with a login
    and no storage keys; their runs are PostgreSQL rows, their models and figures S3 objects."""
    database, store, server = team
    repo = alice
    env = teammate_env(team, storage=False)
    dvc(repo, "repro", "fetch-data", env=env)  # the data once: the queued experiments restore it from the run-cache
    for name, lr in QUEUED.items():
        dvc(
            repo,
            "exp",
            "run",
            "--queue",
            "-n",
            name,
            *[a for s in [*SMALL, f"lr={lr}"] for a in ("-S", s)],
            "train-cnn",
            env=env,
        )
    dvc(repo, "queue", "start", "-j", "2", env=env)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        status = dvc(repo, "queue", "status", env=env).stdout
        if not re.search(r"\b(Queued|Running)\b", status):
            break
        time.sleep(1)
    failed = [line.split()[0] for line in status.splitlines() if "Failed" in line]
    assert not failed, status + "".join(
        dvc(repo, "queue", "logs", task, env=env, check=False).stdout[-3000:] for task in failed
    )
    assert status.count("Success") == len(QUEUED), status

    runs = [run for name in QUEUED for run in server_runs(server, stage="train-cnn", dvc_exp_name=name)]
    assert sorted(float(r.data.params["lr"]) for r in runs) == sorted(float(lr) for lr in QUEUED.values())
    assert all(r.info.status == "FINISHED" for r in runs)
    # Each experiment's stage run nests under one run named after it.
    groups = {r.info.run_id: r.info.run_name for r in server_runs(server, stage="dvc-exp")}
    assert all(groups[r.data.tags["mlflow.parentRunId"]] == r.data.tags["dvc_exp_name"] for r in runs)
    with psycopg.connect(database.replace("postgresql+psycopg://", "postgresql://")) as conn:
        finished = {row[0] for row in conn.execute("SELECT run_uuid FROM runs WHERE status = 'FINISHED'")}
        models = {
            run_id: model_id for model_id, run_id in conn.execute("SELECT model_id, source_run_id FROM logged_models")
        }
    assert {r.info.run_id for r in runs} <= finished
    keys = set(store.keys("mlartifacts/"))
    for run in runs:
        folder = f"mlartifacts/{run.info.experiment_id}"
        assert {
            f"{folder}/{run.info.run_id}/artifacts/history.csv",
            f"{folder}/{run.info.run_id}/artifacts/card.md",
            f"{folder}/models/{models[run.info.run_id]}/artifacts/MLmodel",
        } <= keys, sorted(keys)
    assert not (repo / "mlartifacts").exists() and not (repo / "mlflow.db").exists()  # nothing stayed on the client

    # The MLflow UI as a teammate uses it, logged in (headless Chromium): the compare view of the two
    # runs shows their params; its test_acc link opens both per-epoch curves.
    names = [r.info.run_name for r in runs]
    ids, experiments = (quote(json.dumps(x)) for x in ([r.info.run_id for r in runs], [runs[0].info.experiment_id]))
    with servers.logged_in_proxy(server.uri, TEAMMATE, TEAMMATE_PASSWORD) as ui:
        profile = tmp_path / "profile"
        compare = chromium(
            "--virtual-time-budget=20000",
            "--dump-dom",
            f"{ui}/#/compare-runs?runs={ids}&experiments={experiments}",
            profile=profile,
        )
        assert all(name in compare for name in names) and "widths" in compare and "convs_per_block" in compare, compare[
            -3000:
        ]
        link = next(html.unescape(h) for h in re.findall(r'href="(#/metric\?[^"]*)"', compare) if "%22test_acc%22" in h)
        curves = chromium("--virtual-time-budget=20000", "--dump-dom", f"{ui}/{link}", profile=profile)
        assert all(name in curves for name in names) and curves.count("(step=2)") >= 2, curves[-3000:]
        # One solid line through epochs 1 and 2 per run (plotly draws a faint copy of each beside it). Not
        # counted by colour: the UI derives a run's colour from its id, and two runs can get the same one.
        lines = re.findall(r'<path class="js-line" d="M[^"]*L[^"]*" style="[^"]*stroke-opacity: 1;', curves)
        assert len(lines) == 2, curves[-3000:]
        # The experiment's page as the report links it opens on its training runs, not MLflow 3's GenAI overview.
        runs_page = chromium(
            "--virtual-time-budget=20000",
            "--dump-dom",
            track.training_runs_url(ui, runs[0].info.experiment_id),
            profile=tmp_path / "fresh-profile",
        )
        parents = {groups[r.data.tags["mlflow.parentRunId"]] for r in runs}  # the table lists the top-level runs
        assert "<title>Runs - Experiment" in runs_page and all(name in runs_page for name in parents), runs_page[-3000:]


def test_the_run_cache_and_experiments_move_between_teammates_through_the_remote(team, alice, tmp_path_factory):
    """Alice pushes her run-cache (the queued experiments'); Bob, in a fresh clone with no cache, asks
    for the same experiment as one of hers: DVC restores every stage, nothing trains."""
    _, _, server = team
    name, lr = next(iter(QUEUED.items()))
    storage = teammate_env(team, storage=True)
    dvc(alice, "push", "--run-cache", env=storage)
    dvc(alice, "exp", "push", "origin", name, env=storage)

    bob = clone(origin_of(alice), tmp_path_factory.mktemp("bob") / "repo")
    assert not (bob / ".dvc/cache").exists()
    before = len(server_runs(server))
    pulled = dvc(
        bob,
        "exp",
        "run",
        "--pull",
        "-n",
        "bob-same",
        *[a for s in [*SMALL, f"lr={lr}"] for a in ("-S", s)],
        "train-cnn",
        env=storage,
    )
    # Only the params check runs (persist: true keeps its output out of the run-cache); it trains nothing.
    assert stages_run(pulled.stdout) == {"check-params"}, pulled.stdout
    assert {"fetch-data", "augment", "train-cnn"} <= stages_cached(pulled.stdout)
    assert len(server_runs(server)) == before  # no MLflow run: nothing executed
    # Alice's experiment itself, through git: `dvc exp pull` in Bob's clone...
    dvc(bob, "exp", "pull", "origin", name, env=storage)
    assert name in dvc(bob, "exp", "list", env=storage).stdout
    # ...whose train-cnn outputs (by DVC's content hashes in its dvc.lock) are byte for byte Bob's.
    refs = sh(["git", "for-each-ref", "--format=%(refname)", "refs/exps"], bob).stdout.split()
    ref = next(r for r in refs if r.endswith("/" + name))
    hers = yaml.safe_load(sh(["git", "show", f"{ref}:dvc.lock"], bob).stdout)["stages"]["train-cnn"]["outs"]
    his = yaml.safe_load((bob / "dvc.lock").read_text())["stages"]["train-cnn"]["outs"]
    assert his == hers and {out["path"] for out in his} >= {"models/cnn", "metrics/cnn.json"}
    assert "up to date" in dvc(bob, "status", "train-cnn", env=storage).stdout  # the files are what dvc.lock says
    assert (bob / "models/cnn/model.pt").stat().st_size > 0


def origin_of(repo: Path) -> Path:
    return Path(sh(["git", "remote", "get-url", "origin"], repo).stdout.strip())


def test_two_exp_workers_side_by_side_share_their_experiments(team, origin, tmp_path_factory):
    """`reprovision exp-worker` as a SLURM array task or a Kubernetes Job pod runs it: two at once here."""
    _, _, server = team
    env = teammate_env(team, storage=True)
    reprovision = str(Path(sys.executable).parent / "reprovision")
    work = tmp_path_factory.mktemp("workers")
    workers = {}
    # The first trains on 2 processes (torchrun + DDP): one MLflow run all the same.
    for name, sets in (("w-lr-2e-3", ["lr=2e-3", "dist.nproc=2"]), ("w-lr-5e-4", ["lr=5e-4"])):
        cmd = [
            reprovision,
            "exp-worker",
            "--origin",
            str(origin),
            "-n",
            name,
            "--workdir",
            str(work / name),
            *[a for s in [*SMALL, *sets] for a in ("-S", s)],
            "train-cnn",
        ]
        log = (work / f"{name}.log").open("w")
        workers[name] = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        for name, proc in workers.items():
            code = proc.wait(timeout=600)
            assert code == 0, (work / f"{name}.log").read_text()[-4000:]
    finally:
        for proc in workers.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    # Both workers restored the data stages from the run-cache and trained only the classifier.
    for name in workers:
        log = (work / f"{name}.log").read_text()
        assert stages_run(log) == {"check-params", "train-cnn"}, log[-3000:]
    home = clone(origin, tmp_path_factory.mktemp("carol") / "repo")
    dvc(home, "exp", "pull", "origin", *workers, env=env)
    shown = dvc(home, "exp", "show", "--json", env=env).stdout
    assert all(name in shown for name in workers)
    for name in workers:
        (run,) = server_runs(server, stage="train-cnn", dvc_exp_name=name)
        assert run.info.status == "FINISHED"
        assert run.data.params["world_size"] == ("2" if name == "w-lr-2e-3" else "1")
