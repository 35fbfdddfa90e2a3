"""The whole DAG for real: `dvc exp run` on the real mirror, MLflow runs, caching, `-S lr=4e-4`."""

from __future__ import annotations

import json
import re

import pytest
from mlflow import MlflowClient

from conftest import exp_run

TRAINING_STAGES = {"train-judge", "train-gan@mlp", "train-gan@dcgan", "train-vit", "train-cnn"}
ALL_STAGES = {"fetch-data", "augment", "evaluate", "report", *TRAINING_STAGES}


def stages_run(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


def runs(repo):
    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    exp = client.get_experiment_by_name("reprovision")
    return client, client.search_runs([exp.experiment_id], max_results=1000)


@pytest.mark.slow
def test_pipeline_end_to_end(repo_copy):
    repo = repo_copy
    first = exp_run(repo)
    assert stages_run(first.stdout) == ALL_STAGES, first.stdout

    for path in [
        "data/prepared/manifest.json", "data/augment/policy.json", "data/augment/preview.png",
        "models/judge/model.pt", "models/vit/model.pt", "models/cnn/model.pt", "models/vit/card.md",
        "models/gan/mlp/generator.pt", "models/gan/dcgan/generator.pt", "models/gan/mlp/progression.gif",
        "models/gan/dcgan/samples/epoch_000.png", "models/gan/dcgan/samples/epoch_001.png",
        "metrics/vit.json", "metrics/cnn.json", "metrics/judge.json", "metrics/gan/mlp.json", "metrics/gan/dcgan.json",
        "metrics/vit/history.csv", "metrics/gan/mlp/history.csv", "metrics/evaluate.json",
        "metrics/eval/vit_confusion.json", "reports/figures/confusion_raw.png", "reports/report.md", "reports/report.html",
        "checkpoints/vit.pt",
    ]:
        assert (repo / path).is_file(), f"missing output {path}"
    manifest = json.loads((repo / "data/prepared/manifest.json").read_text())
    assert manifest["mnist"]["train"] == 60000 and manifest["cifar10"]["test"] == 10000
    vit = json.loads((repo / "metrics/vit.json").read_text())
    assert vit["params"] == 5_362_762 and vit["epochs"] == 1 and 0.0 <= vit["test_acc"] <= 1.0
    assert json.loads((repo / "metrics/cnn.json").read_text())["params"] == 4_823_114
    evaluation = json.loads((repo / "metrics/evaluate.json").read_text())
    assert set(evaluation["classifiers"]) == {"vit", "cnn"} and set(evaluation["gans"]) == {"mlp", "dcgan"}

    client, found = runs(repo)
    by_stage = {}
    for run in found:
        by_stage.setdefault(run.data.tags["stage"], []).append(run)
    assert {s: len(r) for s, r in by_stage.items()} == {"train-judge": 1, "train-gan": 2, "train-vit": 1, "train-cnn": 1, "report": 1}
    for run in found:
        tags = run.data.tags
        assert len(tags["git_commit"]) == 40 and tags["dvc_exp_name"] and tags["version.torch"]
        assert len(tags.get("data_sha256", "x" * 64)) == 64
        assert run.info.status == "FINISHED"
    vit_run = by_stage["train-vit"][0]
    assert json.loads((repo / "models/vit/run.json").read_text())["run_id"] == vit_run.info.run_id
    assert vit_run.data.params["lr"] == "0.001" and vit_run.data.params["epochs"] == "1"
    history = client.get_metric_history(vit_run.info.run_id, "test_acc")
    assert [m.step for m in history] == [1]
    assert "eval_accuracy" in vit_run.data.metrics  # added by the evaluate stage
    artifacts = {a.path for a in client.list_artifacts(vit_run.info.run_id, "figures")}
    assert "figures/misclassified_vit.png" in artifacts
    gan_run = next(r for r in by_stage["train-gan"] if r.data.tags["model"] == "gan-dcgan")
    assert {"fid", "inception_score", "kl_uniform", "d_loss", "g_loss"} <= set(gan_run.data.metrics)

    # Same params, data and code: DVC runs nothing and MLflow gets no new run.
    second = exp_run(repo)
    assert stages_run(second.stdout) == set(), second.stdout
    assert len(runs(repo)[1]) == len(found)

    # The documented study entry point re-runs only the classifiers and what depends on them.
    third = exp_run(repo, "lr=4e-4")
    assert stages_run(third.stdout) == {"train-vit", "train-cnn", "evaluate", "report"}, third.stdout
    client, after = runs(repo)
    new = [r for r in after if r.info.run_id not in {f.info.run_id for f in found}]
    assert sorted(r.data.tags["stage"] for r in new) == ["report", "train-cnn", "train-vit"]
    assert all(r.data.params["lr"] == "0.0004" for r in new if r.data.tags["stage"] != "report")
