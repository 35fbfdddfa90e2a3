"""The champion: chosen on validation accuracy only (without a validation split, none, and said so),
and the registry alias that follows it from one classifier to the other."""

from __future__ import annotations

import json

import mlflow
import pytest

from reprovision.publish import registry


def test_validation_accuracy_decides_even_against_the_test_set():
    records = {"vit": {"val_acc": 0.61, "test_acc": 0.50}, "cnn": {"val_acc": 0.60, "test_acc": 0.70}}
    champion = registry.choose(records)
    assert (champion.model, champion.scores) == ("vit", {"vit": 0.61, "cnn": 0.60})
    assert champion.sentence().startswith("ViT, by validation accuracy: ViT 61.00 % vs CNN 60.00 %")
    assert registry.why_no_champion(records) is None


@pytest.mark.parametrize(
    "records",
    [
        {"vit": {"test_acc": 0.40}, "cnn": {"test_acc": 0.45}},
        {"vit": {"test_acc": 0.40}, "cnn": {"val_acc": 0.9, "test_acc": 0.45}},  # one without: no fair contest either
    ],
    ids=["neither-held-out", "one-held-out"],
)
def test_without_a_validation_split_the_test_set_chooses_nothing_and_the_reason_says_how_to_choose(records):
    assert registry.choose(records) is None
    reason = registry.why_no_champion(records)
    assert "no validation split was held out" in reason and "-S data.val_fraction=0.1" in reason


def test_one_classifier_is_no_contest():
    assert registry.choose({"vit": {"val_acc": 0.4, "test_acc": 0.4}}) is None
    assert registry.why_no_champion({"vit": {"test_acc": 0.4}}) is None


def write_checkout(root, scores: dict[str, float], versions: dict[str, str], uri: str, split: str = "split A") -> None:
    for model, acc in scores.items():
        (root / "metrics" / model).mkdir(parents=True, exist_ok=True)
        summary = {"val_acc": acc, "test_acc": acc, "val_split": split}
        (root / "metrics" / model / "summary.json").write_text(json.dumps(summary))
        (root / "models" / model).mkdir(parents=True, exist_ok=True)
        ref = {
            "run_id": "r",
            "tracking_uri": uri,
            "registered_model": f"reprovision-{model}",
            "registered_version": versions[model],
        }
        (root / "models" / model / "run.json").write_text(json.dumps(ref))


@pytest.fixture
def store(tmp_path) -> tuple[str, mlflow.MlflowClient]:
    """A SQLite registry holding version 1 of each classifier."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    for model in ("vit", "cnn"):
        client.create_registered_model(f"reprovision-{model}")
        client.create_model_version(f"reprovision-{model}", source=(tmp_path / model).as_uri())
    return uri, client


def test_the_alias_moves_to_a_better_champion_and_leaves_the_old_one(tmp_path, store):
    uri, client = store
    write_checkout(tmp_path, {"vit": 0.7, "cnn": 0.5}, {"vit": "1", "cnn": "1"}, uri)
    first = registry.read_champion(tmp_path)
    assert (first.model, first.version, first.uri) == ("vit", "1", "models:/reprovision-vit@champion")
    assert registry.promote(first, "split A").moved
    tags = client.get_model_version_by_alias("reprovision-vit", "champion").tags
    assert (tags["champion_by"], float(tags["val_acc"]), tags["val_split"]) == ("val_acc", 0.7, "split A")

    write_checkout(tmp_path, {"vit": 0.7, "cnn": 0.8}, {"vit": "1", "cnn": "1"}, uri)
    moved = registry.promote(registry.read_champion(tmp_path), "split A")
    assert (
        moved.moved and "from reprovision-vit version 1 (70.00 %) to reprovision-cnn version 1 (80.00 %)" in moved.why
    )
    assert str(client.get_model_version_by_alias("reprovision-cnn", "champion").version) == "1"
    assert "champion" not in client.get_registered_model("reprovision-vit").aliases
    with pytest.raises(mlflow.exceptions.MlflowException):
        client.get_model_version_by_alias("reprovision-vit", "champion")


def test_without_a_validation_split_promote_moves_no_alias_and_says_why(tmp_path, store, monkeypatch, capsys):
    from reprovision.tools import cli

    uri, client = store
    write_checkout(tmp_path, {"vit": 0.7, "cnn": 0.5}, {"vit": "1", "cnn": "1"}, uri)
    registry.promote(registry.read_champion(tmp_path), "split A")  # an earlier run, with a validation split
    for model in ("vit", "cnn"):  # this checkout's run held none out
        (tmp_path / "metrics" / model / "summary.json").write_text(
            json.dumps({"test_acc": {"vit": 0.4, "cnn": 0.9}[model]})
        )
    monkeypatch.chdir(tmp_path)
    assert cli.main(["promote"]) == 2
    assert "No champion is named: no validation split was held out" in capsys.readouterr().err
    assert str(client.get_model_version_by_alias("reprovision-vit", "champion").version) == "1"
    assert "champion" not in client.get_registered_model("reprovision-cnn").aliases
