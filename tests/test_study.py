"""`reprovision study` over a fabricated MLflow store: the table, the best settings, the plots, the report."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from PIL import Image

from reprovision.core import track
from reprovision.tools import cli
from reprovision.tools.study import (
    StudyError,
    best_settings,
    data_size_commands,
    queue_data_size,
    run_study,
    write_study,
)

# Final validation accuracy of each fabricated run: (model, lr, train_fraction) -> one value per seed.
# ViT is best at lr 4e-4 (mean of two seeds, 0.60), CNN at 1e-3; both grow with the training set.
# Each run's test accuracy is 1 - its validation accuracy: a "best" read off the test split would be
# the worst setting, so these tests also show the study never chooses on it.
RESULTS = {
    ("vit", 1e-4, 1.0): [0.50],
    ("vit", 4e-4, 1.0): [0.59, 0.61],
    ("vit", 1e-3, 1.0): [0.55],
    ("vit", 4e-4, 0.1): [0.30],
    ("vit", 4e-4, 0.5): [0.45],
    ("cnn", 1e-4, 1.0): [0.58],
    ("cnn", 4e-4, 1.0): [0.63],
    ("cnn", 1e-3, 1.0): [0.68],
    ("cnn", 1e-3, 0.1): [0.40],
    ("cnn", 1e-3, 0.5): [0.52],
}
WEIGHT_DECAY = {"vit": 0.05, "cnn": 1e-4}
EPOCHS = 3


def _log_classifier_run(
    client, experiment_id: str, model: str, lr: float, fraction: float, final: float, exp_name: str
) -> str:
    from mlflow.entities import Metric, Param

    run = client.create_run(experiment_id, tags={"stage": f"train-{model}", "model": model, "dvc_exp_name": exp_name})
    params = {
        "lr": lr,
        "lr_base": lr,
        "weight_decay": WEIGHT_DECAY[model],
        "train_fraction": fraction,
        "optimizer": "adamw",
        "epochs": EPOCHS,
        "dataset": "cifar10",
        "model": model,
    }
    # The epoch before last is the best: "final" must be the last step, not the maximum.
    curve = [final - 0.1, final + 0.02, final]
    metrics = [Metric("val_acc", acc, 0, epoch) for epoch, acc in enumerate(curve, start=1)]
    metrics += [Metric("test_acc", 1 - acc, 0, epoch) for epoch, acc in enumerate(curve, start=1)]
    metrics += [
        Metric("best_val_acc", max(curve), 0, EPOCHS),
        Metric("s_per_epoch", 10.0 if model == "vit" else 5.0, 0, EPOCHS),
    ]
    client.log_batch(run.info.run_id, metrics=metrics, params=[Param(k, str(v)) for k, v in params.items()])
    client.set_terminated(run.info.run_id)
    return run.info.run_id


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> dict:
    """A SQLite MLflow store with the runs of RESULTS, plus runs the study must leave out."""
    import mlflow

    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    experiment_id = client.create_experiment(track.experiment_name())
    first = None
    for i, ((model, lr, fraction), finals) in enumerate(RESULTS.items()):
        for seed, final in enumerate(finals):
            run_id = _log_classifier_run(client, experiment_id, model, lr, fraction, final, f"exp-{i}-{seed}")
            first = first or run_id
    # Left out: a GAN run, a classifier run that never finished, and one that failed.
    gan = client.create_run(experiment_id, tags={"stage": "train-gan", "model": "gan-mlp"})
    client.set_terminated(gan.info.run_id)
    client.create_run(experiment_id, tags={"stage": "train-vit", "model": "vit"})
    failed = client.create_run(experiment_id, tags={"stage": "train-cnn", "model": "cnn"})
    client.log_metric(failed.info.run_id, "test_acc", 0.99, step=1)
    client.set_terminated(failed.info.run_id, status="FAILED")
    return {"uri": uri, "client": client, "first_run": first}


def test_study_table_best_settings_plots_and_report(store, tmp_path):
    out = tmp_path / "study"
    md_path = run_study(out, name="lr and data size", tracking_uri=store["uri"])

    table = pd.read_csv(out / "study.csv")
    assert len(table) == sum(len(finals) for finals in RESULTS.values())
    assert set(table["model"]) == {"vit", "cnn"}
    expected_cols = [
        "model",
        "dvc_exp_name",
        "run_id",
        "lr",
        "weight_decay",
        "train_fraction",
        "epochs",
        "val_acc",
        "test_acc",
        "best_val_acc",
        "s_per_epoch",
    ]
    assert set(expected_cols) <= set(table.columns)
    row = table[(table["model"] == "cnn") & (table["lr"] == 1e-4)].iloc[0]
    assert row["val_acc"] == pytest.approx(0.58)  # the last epoch's value
    assert row["test_acc"] == pytest.approx(0.42)
    assert row["best_val_acc"] == pytest.approx(0.60)
    assert row["weight_decay"] == pytest.approx(1e-4) and row["epochs"] == EPOCHS

    best = best_settings(table, ["lr", "train_fraction"]).set_index("model")
    assert best.loc["vit", "lr"] == pytest.approx(4e-4) and best.loc["vit", "val_acc"] == pytest.approx(0.60)
    assert best.loc["vit", "runs"] == 2
    assert best.loc["cnn", "lr"] == pytest.approx(1e-3) and best.loc["cnn", "train_fraction"] == 1.0

    for setting in ("lr", "train_fraction"):
        with Image.open(out / f"val_acc_vs_{setting}.png") as image:
            assert image.size[0] > 300 and image.size[1] > 200
    # Each model has a single weight decay: there is no curve to draw.
    assert not (out / "val_acc_vs_weight_decay.png").exists()

    md = md_path.read_text()
    # One or two runs per setting: no interval clears the runner-up's, so nothing is starred as "best".
    assert (
        "highest ViT: `lr` = 0.0004 (validation 60.00 % ± 12.71, 2 runs), not distinguishable from `lr` = 0.001 "
        "at 2 seeds" in md
    )
    assert (
        "highest CNN: `lr` = 0.001 (validation 68.00 %, 1 run), not distinguishable from `lr` = 0.0004 at 1 seed" in md
    )
    assert "Not plotted: `weight_decay` is one value per model (CNN 0.0001, ViT 0.05)" in md
    assert "![Final val accuracy vs learning rate (lr × lr_mult)](val_acc_vs_lr.png)" in md


def test_study_filters_by_experiment_name_and_start(store, tmp_path):
    run_study(tmp_path / "named", exp_names=["exp-1-*", "exp-5-0"], tracking_uri=store["uri"])
    named = pd.read_csv(tmp_path / "named" / "study.csv")
    assert sorted(named["dvc_exp_name"]) == ["exp-1-0", "exp-1-1", "exp-5-0"]
    assert set(named["model"]) == {"vit", "cnn"}

    first_start = store["client"].get_run(store["first_run"]).info.start_time
    later = [
        r
        for r in store["client"].search_runs(
            [store["client"].get_experiment_by_name(track.experiment_name()).experiment_id]
        )
        if r.info.status == "FINISHED"
        and r.data.tags.get("stage") in ("train-vit", "train-cnn")
        and r.info.start_time >= first_start
    ]
    run_study(tmp_path / "since", since=store["first_run"], tracking_uri=store["uri"])
    assert len(pd.read_csv(tmp_path / "since" / "study.csv")) == len(later)

    with pytest.raises(StudyError, match="no FINISHED train-vit/train-cnn runs"):
        run_study(tmp_path / "none", exp_names=["no-such-exp"], tracking_uri=store["uri"])
    with pytest.raises(StudyError, match="no MLflow store at"):
        run_study(tmp_path / "empty", tracking_uri=f"sqlite:///{tmp_path / 'missing.db'}")
    assert not (tmp_path / "missing.db").exists()  # reading never creates a store
    with pytest.raises(StudyError, match="neither an ISO time"):
        run_study(tmp_path / "bad", since="yesterday", tracking_uri=store["uri"])


def test_study_cli_reads_the_tracking_uri(store, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store["uri"])
    assert cli.main(["study", "--out", str(tmp_path / "cli"), "--x", "train_fraction"]) == 0
    assert "study.md" in capsys.readouterr().out
    md = (tmp_path / "cli" / "study.md").read_text()
    assert "highest ViT: `train_fraction` = 1 (validation " in md  # lr is not held: every ViT run at 1.0 counts
    assert (tmp_path / "cli" / "val_acc_vs_train_fraction.png").exists()


def test_queue_data_size_dry_run_prints_the_commands(capsys):
    assert cli.main(["study", "--queue-data-size", "--dry-run", "--set", "vit.epochs=3"]) == 0
    out = capsys.readouterr().out
    assert "would run: dvc exp run --queue -S data.train_fraction=0.1,0.25,0.5,1 -S vit.epochs=3" in out
    assert "dvc queue start -j 2" in out and "--x train_fraction --since" in out
    assert data_size_commands([0.2, 1.0])[0] == ["dvc", "exp", "run", "--queue", "-S", "data.train_fraction=0.2,1"]
    with pytest.raises(StudyError, match=r"in \(0, 1\]"):
        data_size_commands([0.0, 1.5])


@pytest.mark.parametrize(
    "bad, message",
    [
        ("novalue", "--set 'novalue': expected key=value"),
        ("vit.epochs=0", "vit.epochs = 0"),
        ("vit.epoch=3", "did you mean 'vit.epochs'?"),
        ("lr=inf", 'lr = "inf": Input should be a finite number'),
    ],
)
def test_queue_data_size_checks_every_set_before_queueing(bad, message, capsys):
    """A malformed or invalid `--set` is one line naming it, and nothing is queued (the dry run is not even printed)."""
    assert cli.main(["study", "--queue-data-size", "--dry-run", "--set", bad]) == 2
    captured = capsys.readouterr()
    assert message in captured.err and "would run" not in captured.out


def test_weight_decay_with_zero_is_plotted_on_a_symlog_axis(tmp_path):
    # write_study needs only the table: a weight-decay sweep that includes "no weight decay".
    # No validation split was held out: the study plots test accuracy and chooses nothing.
    table = pd.DataFrame(
        {
            "model": ["vit"] * 4 + ["cnn"] * 2,
            "dvc_exp_name": [f"wd-{i}" for i in range(6)],
            "run_id": [f"{i:032x}" for i in range(6)],
            "dataset": "cifar10",
            "epochs": 3,
            "lr": 1e-3,
            "weight_decay": [0.0, 1e-5, 1e-3, 0.05, 0.0, 1e-4],
            "val_acc": float("nan"),
            "test_acc": [0.50, 0.56, 0.53, 0.51, 0.60, 0.62],
            "best_val_acc": float("nan"),
            "s_per_epoch": 1.0,
        }
    )
    md = write_study(table, tmp_path, x=["lr", "weight_decay"], name="weight decay").read_text()
    with Image.open(tmp_path / "test_acc_vs_weight_decay.png"):
        pass
    assert "best ViT" not in md and "best CNN" not in md
    assert "None chosen: not every run held out a validation split" in md
    assert "`weight_decay` = 0 is drawn on a symlog axis" in md
    assert "Not plotted: `lr` is one value per model (CNN 0.001, ViT 0.001)" in md


def test_ssl_size_study_plots_probe_accuracy_against_pretraining_images(tmp_path, capsys, monkeypatch):
    """Fabricated linear-probe runs at three pre-training-set sizes (one more from a classifier stage,
    which the study leaves out): the table in size order, the plot, and the queue command."""
    import mlflow
    from mlflow.entities import Metric, Param

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    experiment_id = client.create_experiment(track.experiment_name())
    for fraction, images, probe in ((1.0, 50_000, 0.71), (0.1, 5_000, 0.55), (0.5, 25_000, 0.66)):
        run = client.create_run(
            experiment_id, tags={"stage": "linear-probe", "model": "probe", "dvc_exp_name": f"ssl-{fraction}"}
        )
        params = {"arch": "resnet18", "ssl_train_fraction": fraction, "ssl_train_images": images, "ssl_epochs": 100}
        metrics = {"probe_test": probe, "knn_test": probe - 0.05, "random_probe_test": 0.45, "random_knn_test": 0.35}
        client.log_batch(
            run.info.run_id,
            metrics=[Metric(k, v, 0, 0) for k, v in metrics.items()],
            params=[Param(k, str(v)) for k, v in params.items()],
        )
        client.set_terminated(run.info.run_id)
    _log_classifier_run(client, experiment_id, "cnn", 1e-3, 1.0, 0.6, "not-ssl")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)  # --record writes benchmarks/ssl_size_study.json where it runs (the repository root)
    assert cli.main(["study", "--ssl-size", "--record", "--out", str(tmp_path / "ssl")]) == 0
    table = pd.read_csv(tmp_path / "ssl" / "ssl_size.csv")
    assert table["ssl_train_images"].tolist() == [5_000, 25_000, 50_000] and table["probe_test"].tolist() == [
        0.55,
        0.66,
        0.71,
    ]
    with Image.open(tmp_path / "ssl" / "probe_vs_pretraining_images.png"):
        pass
    assert "3 finished linear-probe runs" in (tmp_path / "ssl" / "ssl_size.md").read_text()
    recorded = json.loads((tmp_path / "benchmarks/ssl_size_study.json").read_text())["runs"]
    assert [r["ssl_train_images"] for r in recorded] == [5_000, 25_000, 50_000] and recorded[0][
        "random_probe_test"
    ] == 0.45
    assert cli.main(["study", "--queue-ssl-size", "--dry-run", "--fractions", "0.1,1"]) == 0
    out = capsys.readouterr().out
    assert (
        "would run: dvc exp run --queue -S ssl.train_fraction=0.1,1" in out
        and "reprovision study --ssl-size --since" in out
    )


def test_a_three_seed_study_prints_intervals_and_stars_only_a_best_that_clears_the_runner_up(tmp_path):
    def runs(model: str, lr: float, finals: list[float]) -> list[dict]:
        return [
            {"model": model, "dvc_exp_name": f"{model}-{lr}-{k}", "run_id": f"{model}{lr}{k}", "start_time": "",
             "dataset": "cifar10", "epochs": 3, "lr": lr, "weight_decay": 0.05, "train_fraction": 1.0,
             "val_acc": v, "test_acc": v, "best_val_acc": v, "s_per_epoch": 1.0}
            for k, v in enumerate(finals)
        ]  # fmt: skip

    table = pd.DataFrame(
        runs("cnn", 1e-3, [0.70, 0.71, 0.72])  # clearly above 4e-4
        + runs("cnn", 4e-4, [0.60, 0.61, 0.62])
        + runs("vit", 1e-3, [0.50, 0.55, 0.60])  # overlaps 4e-4: not distinguishable at 3 seeds
        + runs("vit", 4e-4, [0.49, 0.52, 0.55])
    )
    best = best_settings(table, ["lr"]).set_index("model")
    assert best.loc["cnn", "val_acc_ci"] == pytest.approx(4.303 * 0.01 / 3**0.5, rel=1e-3)  # t(0.975, 2) s / sqrt(3)
    assert best.loc["cnn", "distinguishable"] and not best.loc["vit", "distinguishable"]
    md = write_study(table, tmp_path / "study", x=("lr",), name="seeds").read_text()
    assert "best CNN: `lr` = 0.001 (validation 71.00 % ± 2.48, 3 runs)" in md
    assert (
        "highest ViT: `lr` = 0.001 (validation 55.00 % ± 12.42, 3 runs), not distinguishable from "
        "`lr` = 0.0004 at 3 seeds" in md
    )
    assert "| model | lr | runs | val_acc | val_acc_ci | distinguishable |" in md


def test_seeds_queue_each_setting_with_each_seed(capsys):
    commands = queue_data_size([0.5, 1.0], ["data.val_fraction=0.1"], dry_run=True, seeds=3)
    assert commands[0][-4:] == ["-S", "seed=0,1,2", "-S", "data.val_fraction=0.1"]
    assert "until all 6 are done" in capsys.readouterr().out
    with pytest.raises(StudyError, match="--seeds 0: give the number of seeds per setting"):
        queue_data_size([0.5], dry_run=True, seeds=0)
