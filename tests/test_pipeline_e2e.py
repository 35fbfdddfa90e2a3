"""The whole DAG for real: `dvc exp run` on the real mirror, MLflow runs, caching, `-S lr=4e-4`,
the run-cache, narrow deps, rejected params, and a parallel queue of experiments logging to one
MLflow server.

The tests run in order on one copy of the repository and build on each other's results.
"""

from __future__ import annotations

import csv
import io
import json
import re
import sys
import time
from pathlib import Path

import pytest
import requests
from mlflow import MlflowClient

from conftest import TINY, _new_copy, dvc, exp_run, pipeline_env, sh
from imports import closure

ALL_STAGES = {"check-params", "fetch-data", "augment", "train-judge", "train-gan@mlp", "train-gan@dcgan", "train-vit", "train-cnn", "evaluate", "report"}
pytestmark = pytest.mark.slow
FIRST_RUN: dict[str, str] = {}  # result fingerprints of the first run, for the second clone to match


@pytest.fixture(scope="module")
def module_repo(tmp_path_factory) -> Path:
    """A DVC cache of its own (not the session's shared one): these tests count what runs and what
    comes back from the run-cache, starting from nothing."""
    return _new_copy(tmp_path_factory.mktemp("repo"))


def stages_run(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


def stages_cached(output: str) -> set[str]:
    return set(re.findall(r"Stage '([^']+)' is cached - skipping run", output))


def training_runs(repo) -> list:
    return [r for r in all_runs(repo)[1] if r.data.tags["stage"] != "report"]


def outputs_sha256(repo) -> dict[str, str]:
    """Every file DVC produced, by content: what a rejected or cached run must leave as it was."""
    import hashlib

    return {
        str(path.relative_to(repo)): hashlib.sha256(path.read_bytes()).hexdigest()
        for folder in ("data", "models", "metrics", "reports")
        for path in sorted((repo / folder).rglob("*"))
        if path.is_file()
    }


def all_runs(repo) -> tuple[MlflowClient, list]:
    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    exp = client.get_experiment_by_name("reprovision")
    return client, client.search_runs([exp.experiment_id], max_results=5000)


def test_first_run_produces_every_output_and_run(module_repo):
    repo = module_repo
    first = exp_run(repo)
    assert stages_run(first.stdout) == ALL_STAGES, first.stdout

    for path in [
        "data/prepared/manifest.json", "data/augment/policy.json", "data/augment/preview.png",
        "models/judge/model.pt", "models/vit/model.pt", "models/cnn/model.pt", "models/vit/card.md",
        "models/gan/mlp/generator.pt", "models/gan/dcgan/generator.pt", "models/gan/mlp/progression.gif",
        "models/gan/dcgan/samples/epoch_000.png", "models/gan/dcgan/samples/epoch_001.png",
        "models/gan/mlp/grid_10x10.png", "models/gan/mlp/nearest_neighbours.png",
        "metrics/vit.json", "metrics/cnn.json", "metrics/judge.json", "metrics/gan/mlp.json", "metrics/gan/dcgan.json",
        "metrics/vit/history.csv", "metrics/gan/mlp/history.csv", "metrics/gan/mlp/fid.csv", "metrics/evaluate.json",
        "metrics/eval/vit_confusion.json", "reports/figures/confusion_raw.png", "reports/figures/gradcam_cnn.png",
        "reports/figures/rollout_vit.png", "reports/report.md", "reports/report.html", "checkpoints/vit.pt",
    ]:
        assert (repo / path).is_file(), f"missing output {path}"
    manifest = json.loads((repo / "data/prepared/manifest.json").read_text())
    assert manifest["mnist"]["train"] == 60000 and manifest["cifar10"]["test"] == 10000
    vit = json.loads((repo / "metrics/vit.json").read_text())
    assert vit["params"] == 5_362_762 and vit["epochs"] == 1 and 0.0 <= vit["test_acc"] <= 1.0
    assert json.loads((repo / "metrics/cnn.json").read_text())["params"] == 4_823_114
    evaluation = json.loads((repo / "metrics/evaluate.json").read_text())
    assert set(evaluation["classifiers"]) == {"vit", "cnn"} and set(evaluation["gans"]) == {"mlp", "dcgan"}
    html = (repo / "reports/report.html").read_text()
    assert f"{100 * vit['test_acc']:.1f}" in html

    client, runs = all_runs(repo)
    by_stage: dict[str, list] = {}
    for run in runs:
        by_stage.setdefault(run.data.tags["stage"], []).append(run)
    assert {s: len(r) for s, r in by_stage.items()} == {"train-judge": 1, "train-gan": 2, "train-vit": 1, "train-cnn": 1, "report": 1}
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
    assert "eval_accuracy" in vit_run.data.metrics  # added by the evaluate stage
    assert "figures/misclassified_vit.png" in {a.path for a in client.list_artifacts(vit_run.info.run_id, "figures")}
    assert client.search_logged_models([vit_run.info.experiment_id], filter_string=f"source_run_id = '{vit_run.info.run_id}'")
    gan_run = next(r for r in by_stage["train-gan"] if r.data.tags["model"] == "gan-dcgan")
    assert {"fid", "fid_floor", "inception_score", "kl_uniform", "d_loss", "g_loss", "fid_during"} <= set(gan_run.data.metrics)
    FIRST_RUN.update(fingerprints(repo))


OUTPUTS_TO_COMPARE = [
    "metrics/vit.json", "metrics/cnn.json", "metrics/judge.json", "metrics/gan/mlp.json", "metrics/gan/dcgan.json",
    "metrics/vit/history.csv", "metrics/evaluate.json", "metrics/eval/cnn_confusion.json",
    "models/vit/model.pt", "models/cnn/model.pt", "models/judge/model.pt", "models/gan/mlp/generator.pt",
    "models/gan/dcgan/generator.pt", "data/prepared/manifest.json",
]


def fingerprints(repo) -> dict[str, str]:
    """sha256 of results; timing figures are masked, they are the only thing allowed to differ."""
    import hashlib

    out = {}
    for name in OUTPUTS_TO_COMPARE:
        data = (repo / name).read_bytes()
        if name.endswith(".json"):
            obj = json.loads(data)
            for section in [obj, *[v for v in obj.values() if isinstance(v, dict)]] if isinstance(obj, dict) else []:
                for key in ("train_seconds", "s_per_epoch", "total_seconds"):
                    section.pop(key, None)
            data = json.dumps(obj, sort_keys=True).encode()
        elif name.endswith(".csv"):
            rows = list(csv.DictReader(io.StringIO(data.decode())))
            data = json.dumps([{k: v for k, v in row.items() if k != "epoch_seconds"} for row in rows]).encode()
        out[name] = hashlib.sha256(data).hexdigest()
    return out

def test_second_clone_reproduces_bit_for_bit(tmp_path):
    """Same params, data and code in a separate clone: identical metrics files and model weights."""
    other = _new_copy(tmp_path / "clone")
    exp_run(other)
    assert fingerprints(other) == FIRST_RUN


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
    assert sorted(r.data.tags["stage"] for r in new) == ["report", "train-cnn", "train-vit"]
    assert all(r.data.params["lr"] == "0.0004" for r in new if r.data.tags["stage"] != "report")


def test_returning_to_earlier_params_restores_from_the_run_cache(module_repo):
    """lr=1e-3, then 4e-4, then 1e-3 again: the third run trains nothing, byte-identical results."""
    before = len(training_runs(module_repo))
    again = exp_run(module_repo, "lr=0.001")  # back to the first run's params
    assert {"train-vit", "train-cnn", "evaluate", "report"} <= stages_cached(again.stdout), again.stdout
    assert stages_run(again.stdout) == {"check-params"}, again.stdout  # the params check always runs (persist output)
    assert "| train loss" not in again.stdout
    assert len(training_runs(module_repo)) == before
    assert fingerprints(module_repo) == FIRST_RUN


def test_gan_params_rerun_only_that_gan(module_repo):
    changed = exp_run(module_repo, "gan.mlp.lr_g=0.0002")
    assert stages_run(changed.stdout) == {"check-params", "train-gan@mlp", "evaluate", "report"}, changed.stdout
    back = exp_run(module_repo, "gan.mlp.lr_g=0.0001")
    assert stages_run(back.stdout) == {"check-params"} and fingerprints(module_repo) == FIRST_RUN


def test_threads_are_part_of_the_configuration(module_repo):
    """Another thread count is another configuration: DVC re-runs what computes, MLflow records it."""
    params = module_repo / "params.yaml"
    text = params.read_text()
    params.write_text(text.replace("\nthreads: 2\n", "\nthreads: 1\n"))
    status = json.loads(dvc(module_repo, "status", "--json").stdout)
    computing = {"train-judge", "train-gan@mlp", "train-gan@dcgan", "train-vit", "train-cnn", "evaluate"}
    assert set(status) == computing | {"check-params", "report"}  # the last two read all of params.yaml
    params.write_text(text)
    sets = [arg for s in [*TINY, "threads=1"] for arg in ("-S", s)]
    one = dvc(module_repo, "exp", "run", *sets, "train-cnn", env=pipeline_env(OMP_NUM_THREADS="2"))
    assert stages_run(one.stdout) == {"check-params", "train-cnn"}, one.stdout
    assert "[train-cnn] device cpu, 1 thread(s)" in one.stdout  # params win over the environment
    newest = max((r for r in training_runs(module_repo) if r.data.tags["stage"] == "train-cnn"), key=lambda r: r.info.start_time)
    assert newest.data.params["threads"] == "1" and newest.data.tags["threads"] == "1"
    back = exp_run(module_repo, "threads=2")
    assert stages_run(back.stdout) == {"check-params"} and fingerprints(module_repo) == FIRST_RUN


def test_editing_any_library_file_marks_exactly_its_stages(module_repo):
    """Append a comment to one code file at a time: `dvc status` names exactly the stages that import it."""
    import yaml

    stages = yaml.safe_load((module_repo / "dvc.yaml").read_text())["stages"]
    script = lambda stage: next(w for w in stage["cmd"].split() if w.endswith(".py"))
    expected: dict[str, set[str]] = {}
    for name, stage in stages.items():
        addresses = [f"{name}@{m}" for m in stage["matrix"]["model"]] if "matrix" in stage else [name]
        for path in closure(module_repo / script(stage), module_repo):
            expected.setdefault(str(path.relative_to(module_repo.resolve())), set()).update(addresses)
    code = sorted(str(p.relative_to(module_repo)) for folder in ("src", "stages") for p in (module_repo / folder).rglob("*.py"))
    assert set(expected) <= set(code)
    # One process for all the files: `dvc status` through DVC's API, each file touched and restored.
    probe = f"""
import json, os
from pathlib import Path
from dvc.repo import Repo
found = {{}}
for name in {code!r}:
    path = Path(name)
    text, times = path.read_bytes(), (path.stat().st_atime_ns, path.stat().st_mtime_ns)
    path.write_bytes(text + b"\\n# touched\\n")
    with Repo() as repo:
        found[name] = sorted(repo.status())
    path.write_bytes(text)
    os.utime(path, ns=times)
print(json.dumps(found))
"""
    found = json.loads(sh([sys.executable, "-c", probe], module_repo, pipeline_env()).stdout.splitlines()[-1])
    for name in code:
        assert set(found[name]) == expected.get(name, set()), f"editing {name} marks {found[name]}, expected {sorted(expected.get(name, ()))}"
    assert dvc(module_repo, "status", "--json").stdout.strip() in ("{}", "")


@pytest.mark.parametrize("override, message", [
    ("vit.heads=0", "vit.heads = 0: Input should be greater than 0"),
    ("cnn.widths=[]", "cnn.widths = []: List should have at least 1 item"),
    ("gan.fid_samples=1", "gan.fid_samples = 1: Input should be greater than or equal to 2"),
    ("device=cuda", "device = 'cuda', but no cuda device is available"),
])
def test_a_rejected_param_leaves_the_workspace_whole(module_repo, override, message):
    outputs, text = outputs_sha256(module_repo), (module_repo / "params.yaml").read_text()
    failed = exp_run(module_repo, override, env=pipeline_env(CUDA_VISIBLE_DEVICES=""), check=False)
    assert failed.returncode != 0 and message in failed.stderr + failed.stdout
    assert stages_run(failed.stdout) == {"check-params"}, failed.stdout  # stopped before any other stage
    assert "Traceback" not in failed.stderr + failed.stdout
    assert outputs_sha256(module_repo) == outputs  # nothing deleted, nothing rewritten
    (module_repo / "params.yaml").write_text(text)  # DVC leaves the value the user set; put ours back


def test_parallel_queue_logs_every_run_to_the_server(module_repo):
    """8 queued experiments, 2 at a time, all logging over HTTP to one `reprovision mlflow-server`."""
    repo = module_repo
    env = pipeline_env()
    reprovision = str(Path(sys.executable).parent / "reprovision")
    uri = sh([reprovision, "mlflow-server", "start"], repo, env).stdout.strip()
    try:
        assert uri.startswith("http://127.0.0.1:")
        _, before = all_runs(repo)
        # Small classifiers: this test is about the queue, not the models. Two epochs: histories must be complete.
        # With a validation split, which every history then carries.
        small = ["vit.depth=1", "vit.embed_dim=32", "vit.heads=2", "cnn.widths=[8,16]", "cnn.hidden=16", "vit.epochs=2", "cnn.epochs=2",
                 "data.val_fraction=0.2"]
        lrs = ["1e-3", "4e-4", "1e-4", "2e-3", "3e-4", "5e-4", "7e-4", "8e-4"]
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
        assert "Failed" not in status, status + dvc(repo, "queue", "logs", status.split()[0], env=env, check=False).stdout
        assert status.count("Success") >= len(lrs), status

        shown = json.loads(dvc(repo, "exp", "show", "--json", env=env).stdout)
        text = json.dumps(shown)
        for lr in ["0.001", "0.0004", "0.0001", "0.002", "0.0003", "0.0005", "0.0007", "0.0008"]:
            assert f'"lr": {lr}' in text or f'"lr": "{lr}"' in text or lr in text

        # The REST API of the server: every queued classifier run is there with complete histories and artifacts.
        exp = requests.get(f"{uri}/api/2.0/mlflow/experiments/get-by-name", params={"experiment_name": "reprovision"}).json()
        search = requests.post(
            f"{uri}/api/2.0/mlflow/runs/search",
            json={"experiment_ids": [exp["experiment"]["experiment_id"]], "max_results": 1000},
        ).json()
        known = {r.info.run_id for r in before}
        new = [r for r in search["runs"] if r["info"]["run_id"] not in known]
        tags = lambda r: {t["key"]: t["value"] for t in r["data"].get("tags", [])}
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



def test_reproduce_replays_a_recorded_run(module_repo):
    """`reprovision reproduce <run-id>` where a user stands after `make run`: nothing committed since the
    clone, the workspace at other params (4e-4 was run since). It trains the first ViT run again from
    its commit and recorded params, in a temporary clone, and finds the same metrics."""
    client, found = all_runs(module_repo)
    first_vit = min((r for r in found if r.data.tags["stage"] == "train-vit"), key=lambda r: r.info.start_time)
    status, outputs = sh(["git", "status", "--porcelain"], module_repo).stdout, outputs_sha256(module_repo)
    result = sh([str(Path(sys.executable).parent / "reprovision"), "reproduce", first_vit.info.run_id], module_repo, pipeline_env())
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
    weights = {p: (module_repo / p).read_bytes() for p in ("models/vit/model.pt", "models/cnn/model.pt", "metrics/vit.json")}
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
