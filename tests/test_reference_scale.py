"""benchmarks/reference_scale.py progress: a reference run still under way (a classifier's or a GAN's),
recorded from its checkpoint and the MLflow run its stage started, without touching the committed
results file; `stopped`: such a run that can no longer resume."""

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
    rows = [
        {"epoch": e, "train_acc": 0.4 + e / 10, "test_acc": 0.5 + e / 10, "epoch_seconds": 60.0 * e} for e in (1, 2)
    ]
    torch.save({"epoch": 2, "complete": False, "history": rows}, repo / "checkpoints" / "cnn.pt")
    with pytest.raises(SystemExit, match="no train-cnn run in sqlite:///"):
        reference_scale.progress(repo, "cnn")

    client = mlflow.MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    experiment = client.create_experiment("reprovision")
    for commit in ("a" * 40, "b" * 40):  # the newest run of the stage is the one under way
        run = client.create_run(
            experiment,
            tags={
                "stage": "train-cnn",
                "git_commit": commit,
                "threads": "1",
                "device": "cpu",
                "dvc_exp_name": "ref-r3-cnn",
            },
        )
        client.log_param(run.info.run_id, "train_images", "50000")
        client.log_param(run.info.run_id, "precision_resolved", "fp32")

    entry = reference_scale.progress(repo, "cnn")
    assert entry["status"] == "under way" and entry["epochs"] == 2 and entry["epochs_planned"] == 30
    assert entry["test_acc"] == 0.7 and entry["history"] == rows and entry["seconds"] == 180.0
    assert entry["git_commit"] == "b" * 40 and entry["mlflow_run_id"] == run.info.run_id
    assert entry["train_images"] == 50_000 and entry["precision"] == "fp32" and entry["threads"] == 1
    assert json.loads(reference_scale.RESULTS.read_text())["cnn"] == entry


def test_a_run_that_cannot_resume_is_marked_stopped_with_its_epochs_kept(reference_scale):
    with pytest.raises(SystemExit, match="no cnn run under way"):
        reference_scale.stopped("cnn", "machine gone")
    finished = {"epochs": 50, "seconds": 2760.0}
    under_way = {"status": "under way", "epochs": 8, "epochs_planned": 30, "test_acc": 0.811, "history": [{"epoch": 8}]}
    reference_scale.RESULTS.write_text(json.dumps({"mlp": finished, "cnn": under_way}))
    with pytest.raises(SystemExit, match="no mlp run under way"):  # a finished run is not stopped
        reference_scale.stopped("mlp", "machine gone")
    entry = reference_scale.stopped("cnn", "machine gone")
    assert entry == under_way | {"status": "stopped", "stopped_why": "machine gone"}
    assert json.loads(reference_scale.RESULTS.read_text()) == {"mlp": finished, "cnn": entry}


def test_a_new_run_keeps_the_stopped_runs_it_replaces(reference_scale):
    def run(run_id: str, epochs: int, **extra) -> dict:
        return {
            "mlflow_run_id": run_id,
            "epochs": epochs,
            "history": [{"epoch": e} for e in range(1, epochs + 1)],
            **extra,
        }

    first = run("r1", 8, status="stopped", stopped_why="machine gone")
    reference_scale.RESULTS.write_text(json.dumps({"cnn": first}))
    # A new run (its own MLflow run) is recorded beside the stopped one, even with fewer epochs.
    assert reference_scale.save("cnn", run("r2", 1, status="under way")) == run("r2", 1, status="under way") | {
        "earlier_runs": [first]
    }
    # The same run going on (a resumed attempt logs a new MLflow run) replaces its own entry.
    assert reference_scale.save("cnn", run("r3", 2, status="under way"))["earlier_runs"] == [first]
    second = reference_scale.stopped("cnn", "machine gone again")
    assert second["earlier_runs"] == [first] and second["epochs"] == 2
    # A third run keeps both, newest first; a stopped entry that records itself again is not its own earlier run.
    third = reference_scale.save("cnn", run("r4", 30))
    assert third["earlier_runs"] == [{k: v for k, v in second.items() if k != "earlier_runs"}, first]
    assert json.loads(reference_scale.RESULTS.read_text()) == {"cnn": third}
    reference_scale.RESULTS.write_text(json.dumps({"cnn": first}))
    assert reference_scale.save("cnn", dict(first)) == first


def test_progress_without_a_checkpoint_says_so(tmp_path, reference_scale):
    with pytest.raises(SystemExit, match="no epoch of a vit run has ended"):
        reference_scale.progress(tmp_path, "vit")


def test_progress_of_a_gan_records_its_losses_and_fid_curve_so_far(tmp_path, reference_scale):
    repo = tmp_path / "ref"
    (repo / "checkpoints").mkdir(parents=True)
    (repo / "params.yaml").write_text(yaml.safe_dump({"gan": {"epochs": 50, "train_fraction": 1.0}}))
    rows = [
        {"epoch": e, "d_loss": 1.2, "g_loss": 0.8, "d_real": 0.6, "d_fake": 0.4, "epoch_seconds": 400.0}
        for e in range(1, 7)
    ]
    rows[4]["fid_during"] = 12.5  # gan.fid_every = 5
    torch.save(
        {"epoch": 6, "complete": False, "history": rows, "extra": {"seconds": 2500.0}},
        repo / "checkpoints" / "gan-dcgan.pt",
    )
    client = mlflow.MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    experiment = client.create_experiment("reprovision")
    tags = {
        "stage": "train-gan",
        "git_commit": "c" * 40,
        "threads": "1",
        "device": "cpu",
        "dvc_exp_name": "ref-r2-dcgan",
    }
    dcgan = client.create_run(experiment, tags={**tags, "model": "gan-dcgan"})
    client.log_param(dcgan.info.run_id, "fid_samples_during", "2000")
    client.create_run(experiment, tags={**tags, "model": "gan-mlp"})  # newer, but the other GAN's

    entry = reference_scale.progress(repo, "dcgan")
    assert entry["status"] == "under way" and (entry["epochs"], entry["epochs_planned"]) == (6, 50)
    assert entry["mlflow_run_id"] == dcgan.info.run_id and entry["dvc_exp_name"] == "ref-r2-dcgan"
    assert entry["fid_curve"] == [{"epoch": 5, "fid": 12.5}] and entry["fid_curve_n"] == 2000
    assert [r["d_loss"] for r in entry["history"]] == [1.2] * 6 and "fid_during" not in entry["history"][4]
    assert entry["train_images"] == 60_000 and entry["seconds"] == 2400.0 and "fid" not in entry
    with pytest.raises(SystemExit, match="no epoch of a mlp run has ended"):
        reference_scale.progress(repo, "mlp")


def test_record_of_a_finished_gan_keeps_its_figures_and_its_grid(tmp_path, reference_scale):
    repo = tmp_path / "ref"
    (repo / "models/gan/mlp").mkdir(parents=True)
    (repo / "metrics/gan/mlp").mkdir(parents=True)
    (repo / "params.yaml").write_text(yaml.safe_dump({"gan": {"epochs": 50, "train_fraction": 1.0}}))
    client = mlflow.MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    run = client.create_run(
        client.create_experiment("reprovision"),
        tags={
            "stage": "train-gan",
            "model": "gan-mlp",
            "git_commit": "d" * 40,
            "threads": "1",
            "device": "cpu",
            "dvc_exp_name": "ref-r1-mlp",
        },
    )
    (repo / "models/gan/mlp/run.json").write_text(
        json.dumps({"tracking_uri": f"sqlite:///{repo / 'mlflow.db'}", "run_id": run.info.run_id})
    )
    summary = {
        "epochs": 50,
        "fid": 52.9,
        "fid_floor": 2.25,
        "inception_score": 7.95,
        "inception_score_real": 9.71,
        "kl_uniform": 0.016,
        "n": 10_000,
        "total_seconds": 2744.3,
    }
    (repo / "metrics/gan/mlp/summary.json").write_text(json.dumps(summary))
    (repo / "metrics/gan/mlp/history.csv").write_text("epoch,d_loss,g_loss\n1,1.1,0.9\n2,1.3,0.8\n")
    (repo / "metrics/gan/mlp/fid.csv").write_text("epoch,fid\n0,nan\n1,\n2,60.5\n")  # measured at epoch 2 only
    with pytest.raises(SystemExit, match="grid_10x10.png not found"):
        reference_scale.record(repo, "mlp")
    assert not reference_scale.RESULTS.exists()
    grid = bytes(range(256)) * 4  # the picture's bytes are copied as they are
    (repo / "models/gan/mlp/grid_10x10.png").write_bytes(grid)

    entry = reference_scale.record(repo, "mlp")
    assert (entry["fid"], entry["fid_n"], entry["inception_score"], entry["seconds"]) == (52.9, 10_000, 7.95, 2744.3)
    assert entry["history"] == [{"epoch": 1, "d_loss": 1.1, "g_loss": 0.9}, {"epoch": 2, "d_loss": 1.3, "g_loss": 0.8}]
    assert entry["fid_curve"] == [{"epoch": 2, "fid": 60.5}] and "status" not in entry
    assert (entry["git_commit"], entry["threads"], entry["train_images"]) == ("d" * 40, 1, 60_000)
    # The grid outlives the run's clone: beside the results file, named in the entry as a checkout's path.
    assert entry["grid"] == "benchmarks/reference_scale/mlp_grid_10x10.png"
    assert (reference_scale.RESULTS.with_suffix("") / "mlp_grid_10x10.png").read_bytes() == grid
    assert json.loads(reference_scale.RESULTS.read_text())["mlp"] == entry


def test_record_seed_keeps_one_run_per_seed_under_the_architecture_with_their_spread(tmp_path, reference_scale):
    repo = tmp_path / "ref"
    (repo / "models/cnn").mkdir(parents=True)
    (repo / "metrics/cnn").mkdir(parents=True)
    client = mlflow.MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    experiment = client.create_experiment("reprovision")

    def seed_run(seed: int, test_acc: float) -> dict:
        (repo / "params.yaml").write_text(yaml.safe_dump({"seed": seed, "cnn": {"epochs": 10}}))
        tags = {"stage": "train-cnn", "git_commit": "e" * 40, "threads": "2", "device": "cpu"}
        run = client.create_run(experiment, tags={**tags, "dvc_exp_name": f"ref-airbench94-s{seed}"})
        for key, value in {"arch": "airbench94", "train_images": 50000, "precision_resolved": "bf16"}.items():
            client.log_param(run.info.run_id, key, value)
        (repo / "models/cnn/run.json").write_text(
            json.dumps({"tracking_uri": f"sqlite:///{repo / 'mlflow.db'}", "run_id": run.info.run_id})
        )
        # The stage's test figures as monitor_* (evaluate's is the test accuracy), seed 1's as older code wrote them
        prefix = "monitor_" if seed == 0 else ""
        summary = {"epochs_trained": 10, f"{prefix}test_acc": test_acc, f"{prefix}test_acc_plain": test_acc - 0.005}
        (repo / "metrics/cnn/summary.json").write_text(
            json.dumps(summary | {"train_seconds": 1000.0, "tta_seconds": 50.0})
        )
        (repo / "metrics/cnn/history.csv").write_text("epoch,test_acc\n1,0.8\n")
        return reference_scale.record_seed(repo, "cnn", exp_seconds=1100.0)

    seed_run(1, 0.942)
    seed_run(0, 0.938)
    entry = seed_run(1, 0.940)  # seed 1 again: replaces its run, which stays beside it
    assert [r["seed"] for r in entry["runs"]] == [0, 1] and entry["model"] == "airbench94"
    assert [r["test_acc"] for r in entry["runs"][1]["earlier_runs"]] == [0.942]
    entry = seed_run(1, 0.940)
    assert [r["test_acc"] for r in entry["runs"][1]["earlier_runs"]] == [0.940, 0.942]
    first = entry["runs"][0]
    assert (first["model"], first["train_images"], first["test_acc"], first["seconds"]) == (
        "airbench94",
        50000,
        0.938,
        1050.0,
    )
    assert first["exp_seconds"] == 1100.0 and first["dvc_exp_name"] == "ref-airbench94-s0"
    assert first["test_acc_plain"] == pytest.approx(0.933) and entry["runs"][1]["test_acc_plain"] == pytest.approx(
        0.935
    )
    assert entry["test_acc_mean"] == pytest.approx(0.939) and (entry["test_acc_min"], entry["test_acc_max"]) == (
        0.938,
        0.94,
    )
    assert entry["test_acc_std"] == pytest.approx(0.0014142, abs=1e-6) and entry["seconds_median"] == 1050.0
    assert json.loads(reference_scale.RESULTS.read_text())["airbench94"] == entry
