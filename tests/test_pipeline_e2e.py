"""The whole DAG for real: `dvc exp run` on the real mirror, MLflow runs, what fresh interpreters compute, caching,
`-S lr=4e-4`, the run-cache, `reprovision reproduce` and an unreachable tracking server.

The tests run in order on one copy of the repository and build on each other's results.
test_pipeline_params_e2e.py runs the same first run in a second clone (on the other pytest-xdist
worker): the two must agree bit for bit. test_team_server.py runs the parallel queue (through a team server).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
import requests
import yaml
from conftest import _new_copy, dvc, exp_run, pipeline_env, sh
from pipeline import (
    ALL_STAGES,
    OUTPUTS_TO_COMPARE,
    agree_with_the_other_clone,
    all_runs,
    fingerprints,
    metric_columns,
    outputs_sha256,
    stages_cached,
    stages_run,
    tiny_parameters,
    training_runs,
)

from reprovision.data.datasets import load_split, stratified_subset
from reprovision.publish.registry import read_champion

pytestmark = pytest.mark.slow
FIRST_RUN: dict[str, str] = {}  # result fingerprints of the first run, which later runs of its params must match


@pytest.fixture(scope="module")
def module_repo(tmp_path_factory, stage_mirror) -> Path:
    """A DVC cache of its own (not the session's shared one): these tests count what runs and what
    comes back from the run-cache, starting from nothing."""
    return _new_copy(tmp_path_factory.mktemp("repo"))


def test_first_run_produces_every_output_and_run(module_repo, tmp_path_factory):
    repo = module_repo
    first = exp_run(repo)
    assert stages_run(first.stdout) == ALL_STAGES, first.stdout

    for path in [
        "data/prepared/manifest.json",
        "data/augment/policy.json",
        "data/augment/preview.png",
        "models/judge/model.pt",
        "models/vit/model.pt",
        "models/cnn/model.pt",
        "models/vit/card.md",
        "models/gan/mlp/generator.pt",
        "models/gan/dcgan/generator.pt",
        "models/gan/mlp/progression.gif",
        "models/gan/dcgan/samples/epoch_000.png",
        "models/gan/dcgan/samples/epoch_001.png",
        "models/gan/mlp/grid_10x10.png",
        "models/gan/mlp/nearest_neighbours.png",
        "metrics/vit.json",
        "metrics/cnn.json",
        "metrics/judge.json",
        "metrics/gan/mlp.json",
        "metrics/gan/dcgan.json",
        "metrics/vit/summary.json",
        "metrics/judge/summary.json",
        "metrics/gan/dcgan/summary.json",
        "metrics/eval/summary.json",
        "metrics/vit/history.csv",
        "metrics/gan/mlp/history.csv",
        "metrics/gan/mlp/fid.csv",
        "metrics/evaluate.json",
        "metrics/eval/vit_confusion.json",
        "reports/figures/confusion_raw.png",
        "models/ssl/encoder.pt",
        "metrics/ssl/history.csv",
        "metrics/probe/summary.json",
        "reports/curves/ssl_loss.png",
        "checkpoints/ssl.pt",
        "reports/figures/gradcam_cnn.png",
        "reports/figures/rollout_vit.png",
        "reports/report.md",
        "reports/report.html",
        "checkpoints/vit.pt",
    ]:
        assert (repo / path).is_file(), f"missing output {path}"
    manifest = json.loads((repo / "data/prepared/manifest.json").read_text())
    assert manifest["mnist"]["train"] == 60000 and manifest["cifar10"]["test"] == 10000
    vit = json.loads((repo / "metrics/vit/summary.json").read_text())
    assert vit["params"] == tiny_parameters("vit") and vit["epochs"] == 1 and 0.0 <= vit["monitor_test_acc"] <= 1.0
    assert "test_acc" not in vit  # the stage's test figures are monitoring: the test accuracy is evaluate's
    assert json.loads((repo / "metrics/cnn/summary.json").read_text())["params"] == tiny_parameters("cnn")
    # What `dvc exp show` compares: numbers only, each a figure people compare: one test accuracy per
    # classifier, evaluate's, with its noise (half the width of its 95 % Wilson interval), the training
    # stages' validation and training figures; 25 columns (23 without a validation split).
    shown = dvc(repo, "exp", "show", "--json").stdout
    columns = metric_columns(json.loads(shown))
    assert len(columns) == 25 and all(isinstance(v, (int, float)) for v in columns.values()), columns  # issue 44: <= 25
    assert [c for c in columns if c.startswith(("metrics/vit.json:", "metrics/evaluate.json:vit."))] == [
        "metrics/vit.json:val_acc",
        "metrics/vit.json:train_acc",
        "metrics/vit.json:train_seconds",
        "metrics/evaluate.json:vit.accuracy",
        "metrics/evaluate.json:vit.accuracy_ci95",
        "metrics/evaluate.json:vit.macro_f1",
    ]
    assert sorted(c for c in columns if c.endswith(("test_acc", "accuracy"))) == [
        "metrics/evaluate.json:cnn.accuracy",
        "metrics/evaluate.json:vit.accuracy",
        "metrics/judge.json:test_acc",  # the judge's, on MNIST
    ]
    evaluated = json.loads((repo / "metrics/evaluate.json").read_text())
    acc, n, z = evaluated["vit"]["accuracy"], vit["test_images"], 1.959963984540054
    wilson_half_width = z / (1 + z * z / n) * (acc * (1 - acc) / n + z * z / (4 * n * n)) ** 0.5
    assert columns["metrics/evaluate.json:vit.accuracy_ci95"] == pytest.approx(wilson_half_width)
    html = (repo / "reports/report.html").read_text()
    assert f"{100 * acc:.2f}%" in html
    assert f"ViT vs CNN on the same {n:,} test images: " in html  # McNemar on evaluate's per-image predictions

    client, runs = all_runs(repo)
    by_stage: dict[str, list] = {}
    for run in runs:
        by_stage.setdefault(run.data.tags["stage"], []).append(run)
    assert {s: len(r) for s, r in by_stage.items()} == {
        "dvc-exp": 1,
        "train-judge": 1,
        "train-gan": 2,
        "train-vit": 1,
        "train-cnn": 1,
        "evaluate": 2,
        "pretrain-ssl": 1,
        "linear-probe": 1,
        "report": 1,
    }
    # One run per `dvc exp run`, named after it, groups the stage runs (nested under it in the UI).
    [group] = by_stage.pop("dvc-exp")
    runs = [run for run in runs if run is not group]
    assert group.info.run_name == group.data.tags["dvc_exp_name"] and group.info.status == "FINISHED"
    assert all(run.data.tags["mlflow.parentRunId"] == group.info.run_id for run in runs)
    # ...and spans them: its duration in the UI is the pipeline's, from the first stage run to the last.
    assert group.info.start_time <= min(run.info.start_time for run in runs)
    assert group.info.end_time == max(run.info.end_time for run in runs)
    for run in runs:
        tags = run.data.tags
        assert len(tags["git_commit"]) == 40 and tags["dvc_exp_name"] and tags["version.torch"] and tags["model"]
        assert run.info.status == "FINISHED"
    for run in runs:
        if run.data.tags["stage"] != "report":
            assert len(run.data.tags["data_sha256"]) == 64 and run.data.tags["device"] == "cpu"
    vit_run = by_stage["train-vit"][0]
    assert json.loads((repo / "models/vit/run.json").read_text())["run_id"] == vit_run.info.run_id
    assert vit_run.data.params["lr"] == "0.001" and vit_run.data.params["epochs"] == "1"
    assert [m.step for m in client.get_metric_history(vit_run.info.run_id, "test_acc")] == [1]
    # The logged model: named, with params, tags, step and the last epoch's metrics linked to it.
    [vit_model] = client.search_logged_models(
        [vit_run.info.experiment_id], filter_string=f"source_run_id = '{vit_run.info.run_id}'"
    )
    assert (
        vit_model.name == "vit"
        and vit_model.params["depth"] == "1"
        and vit_model.tags["data_sha256"] == manifest["cifar10"]["sha256"]
    )
    linked = {m.key: m for m in vit_model.metrics}
    assert linked["test_acc"].step == 1 and linked["test_acc"].value == vit["monitor_test_acc"]  # the epoch's
    inputs = {d.dataset.name: d for d in vit_run.inputs.dataset_inputs}
    assert (
        set(inputs) == {"cifar10-train", "cifar10-val", "cifar10-test"}
        and inputs["cifar10-train"].dataset.digest == manifest["cifar10"]["sha256"][:32]
    )
    names = {m.name for m in client.search_logged_models([vit_run.info.experiment_id])}
    assert names == {"vit", "cnn", "judge", "gan-mlp-generator", "gan-dcgan-generator", "ssl-encoder"}
    # Evaluation is a run of its own that names the model it evaluated.
    vit_eval = next(r for r in by_stage["evaluate"] if r.data.tags["model"] == "vit")
    assert (
        vit_eval.data.tags["evaluated_run"] == vit_run.info.run_id
        and vit_eval.data.tags["evaluated_model_id"] == vit_model.model_id
    )
    assert vit_eval.data.metrics["eval_accuracy"] == acc
    assert vit_eval.data.metrics["eval_accuracy_ci95"] == columns["metrics/evaluate.json:vit.accuracy_ci95"]
    # ...and its figures are linked to that model and to the test set they were measured on.
    evaluated = {
        m.key: m for m in client.get_logged_model(vit_model.model_id).metrics if m.run_id == vit_eval.info.run_id
    }
    assert (
        evaluated["eval_accuracy"].dataset_name == "cifar10-test"
        and evaluated["eval_macro_f1"].value == vit_eval.data.metrics["eval_macro_f1"]
    )
    assert "figures/misclassified_vit.png" in {a.path for a in client.list_artifacts(vit_eval.info.run_id, "figures")}
    judge_run = by_stage["train-judge"][0]
    assert "judge_test_acc" in judge_run.data.metrics and "test_acc" not in judge_run.data.metrics
    assert client.get_experiment(vit_run.info.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    # R4's SSL: the probe run names the pre-training run it measured; the report shows the table and the loss curve.
    probe = json.loads((repo / "metrics/probe/summary.json").read_text())
    ssl_run = json.loads((repo / "models/ssl/run.json").read_text())["run_id"]
    assert by_stage["linear-probe"][0].data.tags["evaluated_run"] == by_stage["pretrain-ssl"][0].info.run_id == ssl_run
    assert all(0 <= probe[k] <= 1 for k in ("probe_test", "knn_test", "random_probe_test", "random_knn_test"))
    assert [m.step for m in client.get_metric_history(by_stage["pretrain-ssl"][0].info.run_id, "ssl_loss")] == [1]
    assert "Self-supervised pre-training (R4)" in html and f"{100 * probe['probe_test']:.2f}%" in html
    gan_run = next(r for r in by_stage["train-gan"] if r.data.tags["model"] == "gan-dcgan")
    assert {"fid", "fid_floor", "inception_score", "kl_uniform", "d_loss", "g_loss", "fid_during"} <= set(
        gan_run.data.metrics
    )
    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}")
    try:
        generator = mlflow.pyfunc.load_model(json.loads((repo / "models/gan/dcgan/run.json").read_text())["model_uri"])
    finally:
        mlflow.set_tracking_uri(None)
    digits = generator.predict(np.random.default_rng(0).standard_normal((3, 100), dtype=np.float32))
    assert digits.shape == (3, 1, 28, 28) and digits.dtype == np.uint8
    FIRST_RUN.update(fingerprints(repo))
    agree_with_the_other_clone(FIRST_RUN, tmp_path_factory)


# What the fresh run below re-runs, and the results it compares: a classifier's, a GAN's and evaluate's.
RERUN_FRESH = ["train-cnn", "train-gan@dcgan", "evaluate"]
FRESH_RESULTS = [
    "models/cnn/model.pt",
    "metrics/cnn.json",
    "metrics/cnn/summary.json",
    "models/gan/dcgan/generator.pt",
    "metrics/gan/dcgan.json",
    "metrics/gan/dcgan/summary.json",
    "metrics/evaluate.json",
    "metrics/eval/summary.json",
    "metrics/eval/cnn_confusion.json",
]


def test_fresh_interpreters_compute_what_the_forked_stages_did(module_repo, tmp_path):
    """The tests' `dvc` and stages are forked from a server that imported torch, MLflow, DVC and the rest once
    (tests/forkserver.py). In a copy of the first run, these stages run again as a user runs them, `dvc` and the
    stages fresh interpreters: the same bits (a whole fresh DAG cost ~120 s of the suite's CPU more, measured)."""
    copy = tmp_path / "fresh"
    # A cache of its own (empty): the run-cache entries of this run must not reach the first run's cache.
    not_the_cache = lambda folder, names: ["cache"] if Path(folder).name == ".dvc" else []  # noqa: E731
    shutil.copytree(module_repo, copy, symlinks=True, ignore=not_the_cache)
    run = dvc(copy, "repro", "--force", "--single-item", *RERUN_FRESH, env=pipeline_env(forked=False))
    assert stages_run(run.stdout) == set(RERUN_FRESH), run.stdout
    assert set(FRESH_RESULTS) <= set(OUTPUTS_TO_COMPARE)
    assert fingerprints(copy, FRESH_RESULTS) == fingerprints(module_repo, FRESH_RESULTS)


def test_the_champion_serves_raw_images_over_rest_as_the_pipeline_predicts(module_repo):
    """The report promoted the better classifier by validation accuracy; `mlflow models serve` of
    models:/<name>@champion takes raw uint8 CIFAR-10 test images over REST and answers what the
    evaluate stage predicted, as does pyfunc.load_model in-process."""
    repo = module_repo
    champion = read_champion(repo)
    val_acc = {m: json.loads((repo / f"metrics/{m}/summary.json").read_text())["val_acc"] for m in ("vit", "cnn")}
    assert champion.scores == val_acc and val_acc[champion.model] == max(val_acc.values())
    assert champion.uri == f"models:/reprovision-{champion.model}@champion"
    uri = f"sqlite:///{repo / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    assert str(client.get_model_version_by_alias(champion.registered_model, "champion").version) == champion.version
    other = next(m for m in ("vit", "cnn") if m != champion.model)
    assert "champion" not in client.get_registered_model(f"reprovision-{other}").aliases
    assert champion.sentence() in (repo / "reports/report.md").read_text()

    params = yaml.safe_load((repo / "params.yaml").read_text())
    test = load_split(repo / "data/prepared", "cifar10", "test")
    images = test.x[stratified_subset(test.y, params["data"]["test_fraction"], params["seed"])]
    records = json.loads((repo / f"metrics/eval/{champion.model}_confusion.json").read_text())
    expected = [test.classes.index(r["predicted"]) for r in records]
    assert images.dtype == np.uint8 and len(images) == len(expected) == 100

    mlflow.set_tracking_uri(uri)
    try:
        in_process = mlflow.pyfunc.load_model(champion.uri).predict(images)
    finally:
        mlflow.set_tracking_uri(None)
    assert in_process.shape == (100, 10) and np.allclose(in_process.sum(axis=1), 1, atol=1e-5)
    assert in_process.argmax(axis=1).tolist() == expected

    port = free_port()
    server = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "mlflow"),
            "models",
            "serve",
            "-m",
            champion.uri,
            "--env-manager",
            "local",
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
            "-w",
            "1",
        ],
        cwd=repo,
        env=pipeline_env(MLFLOW_TRACKING_URI=uri),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and server.poll() is None:
            with contextlib.suppress(requests.ConnectionError):
                if requests.get(f"{url}/ping", timeout=5).ok:
                    break
            time.sleep(0.5)
        assert server.poll() is None, server.stderr.read().decode()[-3000:]
        answer = requests.post(f"{url}/invocations", json={"inputs": images.tolist()}, timeout=60)
        assert answer.ok, answer.text[-2000:]
        served = np.array(answer.json()["predictions"])
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    assert served.shape == (100, 10) and served.argmax(axis=1).tolist() == expected


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_rerun_with_same_params_runs_nothing(module_repo):
    before = len(all_runs(module_repo)[1])
    second = exp_run(module_repo)
    assert stages_run(second.stdout) == set(), second.stdout
    assert len(all_runs(module_repo)[1]) == before


def test_lr_override_reruns_only_classifiers(module_repo):
    _, before = all_runs(module_repo)
    third = exp_run(module_repo, "lr=4e-4")
    assert stages_run(third.stdout) == {"check-params", "train-vit", "train-cnn", "evaluate", "report"}, third.stdout
    _, after = all_runs(module_repo)
    new = [r for r in after if r.info.run_id not in {b.info.run_id for b in before}]
    assert sorted(r.data.tags["stage"] for r in new) == [
        "dvc-exp",
        "evaluate",
        "evaluate",
        "report",
        "train-cnn",
        "train-vit",
    ]
    assert all(r.data.params["lr"] == "0.0004" for r in new if r.data.tags["stage"].startswith("train-"))


def test_returning_to_earlier_params_restores_from_the_run_cache(module_repo):
    """lr=1e-3, then 4e-4, then 1e-3 again: the third run trains nothing, byte-identical results."""
    before = len(training_runs(module_repo))
    again = exp_run(module_repo, "lr=0.001")  # back to the first run's params
    assert {"train-vit", "train-cnn", "evaluate", "report"} <= stages_cached(again.stdout), again.stdout
    assert stages_run(again.stdout) == {"check-params"}, again.stdout  # the params check always runs (persist output)
    assert "| train loss" not in again.stdout
    assert len(training_runs(module_repo)) == before
    assert fingerprints(module_repo) == FIRST_RUN


def test_reproduce_replays_a_recorded_run(module_repo):
    """`reprovision reproduce <run-id>` where a user stands after `make run`: nothing committed since the
    clone, the workspace at other params (4e-4 was run since). It trains the first ViT run again from
    its commit and recorded params, in a temporary clone, and finds the same metrics."""
    client, found = all_runs(module_repo)
    first_vit = min((r for r in found if r.data.tags["stage"] == "train-vit"), key=lambda r: r.info.start_time)
    status, outputs = sh(["git", "status", "--porcelain"], module_repo).stdout, outputs_sha256(module_repo)
    result = sh(
        [str(Path(sys.executable).parent / "reprovision"), "reproduce", first_vit.info.run_id],
        module_repo,
        pipeline_env(),
    )
    assert "dvc repro --force --single-item train-vit" in result.stdout
    assert "Stage 'fetch-data' is cached - skipping run" in result.stdout  # inputs from this repository's run-cache
    assert f"identical: {first_vit.info.run_id}" in result.stdout, result.stdout
    replay = client.search_runs([first_vit.info.experiment_id], f"tags.reproduces = '{first_vit.info.run_id}'")
    assert len(replay) == 1 and replay[0].data.params["lr"] == "0.001"
    assert sh(["git", "status", "--porcelain"], module_repo).stdout == status, "reproduce changed the workspace"
    assert outputs_sha256(module_repo) == outputs


def test_unreachable_tracking_server_fails_fast(module_repo):
    """No server at MLFLOW_TRACKING_URI: a clear error before any training, no run, cached outputs intact."""
    _, before = all_runs(module_repo)
    params_before = (module_repo / "params.yaml").read_text()
    weights = {
        p: (module_repo / p).read_bytes() for p in ("models/vit/model.pt", "models/cnn/model.pt", "metrics/vit.json")
    }
    env = pipeline_env(MLFLOW_TRACKING_URI="http://127.0.0.1:9")
    failed = exp_run(module_repo, "lr=2e-4", env=env, check=False)
    output = failed.stdout + failed.stderr
    assert failed.returncode != 0
    assert "MLflow server http://127.0.0.1:9 is not reachable" in output and "Nothing was trained" in output
    assert "| train loss" not in output  # not one epoch ran
    assert len(all_runs(module_repo)[1]) == len(before)
    # DVC removed the stage's outputs before the command failed; they are all in its cache.
    (module_repo / "params.yaml").write_text(params_before)
    dvc(module_repo, "checkout", "--force")
    assert all((module_repo / p).read_bytes() == content for p, content in weights.items())
