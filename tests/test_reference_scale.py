"""benchmarks/reference_scale.py progress: a reference run still under way, recorded from its checkpoint
and the MLflow run its stage started, without touching the committed results file."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import mlflow
import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def reference_scale(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("reference_scale", ROOT / "benchmarks" / "reference_scale.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "RESULTS", tmp_path / "reference_scale.json")  # not the committed file
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    return module


def test_progress_records_the_epochs_so_far(tmp_path, reference_scale):
    repo = tmp_path / "ref"
    (repo / "checkpoints").mkdir(parents=True)
    (repo / "params.yaml").write_text(yaml.safe_dump({"cnn": {"epochs": 30}}))
    rows = [{"epoch": e, "train_acc": 0.4 + e / 10, "test_acc": 0.5 + e / 10, "epoch_seconds": 60.0 * e} for e in (1, 2)]
    torch.save({"epoch": 2, "complete": False, "history": rows}, repo / "checkpoints" / "cnn.pt")
    with pytest.raises(SystemExit, match="no train-cnn run in sqlite:///"):
        reference_scale.progress(repo, "cnn")

    client = mlflow.MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    experiment = client.create_experiment("reprovision")
    for commit in ("a" * 40, "b" * 40):  # the newest run of the stage is the one under way
        run = client.create_run(experiment, tags={"stage": "train-cnn", "git_commit": commit, "threads": "1", "device": "cpu",
                                                  "dvc_exp_name": "ref-r3-cnn"})
        client.log_param(run.info.run_id, "train_images", "50000")
        client.log_param(run.info.run_id, "precision_resolved", "fp32")

    entry = reference_scale.progress(repo, "cnn")
    assert entry["status"] == "under way" and entry["epochs"] == 2 and entry["epochs_planned"] == 30
    assert entry["test_acc"] == 0.7 and entry["history"] == rows and entry["seconds"] == 180.0
    assert entry["git_commit"] == "b" * 40 and entry["mlflow_run_id"] == run.info.run_id
    assert entry["train_images"] == 50_000 and entry["precision"] == "fp32" and entry["threads"] == 1
    assert json.loads(reference_scale.RESULTS.read_text())["cnn"] == entry


def test_progress_without_a_checkpoint_says_so(tmp_path, reference_scale):
    with pytest.raises(SystemExit, match="no epoch of a vit run has ended"):
        reference_scale.progress(tmp_path, "vit")
