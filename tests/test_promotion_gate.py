"""Issue 36 item 1, the promotion gate, against a real MLflow server: the alias `champion` moves only to a
version that beats its holder on the same validation split by more than the margin; a worse run leaves it,
and what the served alias predicts, as it was; another split is not compared; `--force` decides; two runs
finishing together are decided one after the other, so the better one holds the alias at the end."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from conftest import forked_python

from reprovision.publish import registry
from reprovision.tools import cli, server

ROOT = Path(__file__).resolve().parents[1]


class Constant(torch.nn.Module):
    """A 'classifier' whose answer is a fixed class: its predictions say which version is served."""

    def __init__(self, answer: int) -> None:
        super().__init__()
        self.register_buffer("logits", torch.nn.functional.one_hot(torch.tensor(answer), 10).float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(x.shape[0], -1)


@pytest.fixture(scope="module")
def running_server(tmp_path_factory):
    """A `reprovision mlflow-server` (127.0.0.1, its own SQLite) for the module, stopped after it."""
    root = tmp_path_factory.mktemp("project")
    uri = server.start(root=root)
    try:
        yield root, uri
    finally:
        server.stop(root)


@pytest.fixture
def project(running_server, monkeypatch):
    """The server's checkout, its registry emptied: each test starts with no version and no alias."""
    root, uri = running_server
    monkeypatch.chdir(root)
    (root / "params.yaml").write_text("registry:\n  promote_margin: 0.01\n")
    client = mlflow.MlflowClient(uri)
    for model in client.search_registered_models():
        client.delete_registered_model(model.name)
    return root, uri


def register(uri: str, model: str, answer: int) -> str:
    """A new version of reprovision-<model> whose every prediction is class `answer`; its version number."""
    mlflow.set_tracking_uri(uri)
    try:
        with mlflow.start_run():
            info = mlflow.pytorch.log_model(
                Constant(answer),
                name=model,
                registered_model_name=f"reprovision-{model}",
                serialization_format="pickle",
                # Pinned, as the stages pin theirs: inferring them loads the model in a new interpreter (~6 s of CPU).
                pip_requirements=["torch"],
            )
    finally:
        mlflow.set_tracking_uri(None)
    return str(info.registered_model_version)


def checkout(root: Path, uri: str, run: dict[str, tuple[float, str]], split: str = "cifar10 abc, seed 0") -> None:
    """This checkout's run: for each model its (val_acc, registered version)."""
    for model, (val_acc, version) in run.items():
        (root / "metrics" / model).mkdir(parents=True, exist_ok=True)
        summary = {"val_acc": val_acc, "test_acc": val_acc, "val_split": split}
        (root / "metrics" / model / "summary.json").write_text(json.dumps(summary))
        (root / "models" / model).mkdir(parents=True, exist_ok=True)
        ref = {
            "run_id": "r",
            "tracking_uri": uri,
            "registered_model": f"reprovision-{model}",
            "registered_version": version,
        }
        (root / "models" / model / "run.json").write_text(json.dumps(ref))


def served(uri: str) -> int:
    """The class the alias `champion` predicts for an image."""
    client = mlflow.MlflowClient(uri)
    for name in ("reprovision-vit", "reprovision-cnn"):
        try:
            version = client.get_model_version_by_alias(name, "champion")
        except mlflow.exceptions.MlflowException:
            continue
        mlflow.set_tracking_uri(uri)
        try:
            model = mlflow.pyfunc.load_model(f"models:/{name}/{version.version}")
        finally:
            mlflow.set_tracking_uri(None)
        return int(np.asarray(model.predict(np.zeros((1, 3, 4, 4), dtype=np.float32))).argmax())
    raise AssertionError("no version carries the alias")


def test_good_then_worse_then_better_moves_the_alias_only_forward(project, capsys):
    root, uri = project
    # A good run: ViT 60 % (answers class 1) against CNN 40 %; nothing held the alias.
    checkout(root, uri, {"vit": (0.60, register(uri, "vit", 1)), "cnn": (0.40, register(uri, "cnn", 2))})
    assert cli.main(["promote"]) == 0 and served(uri) == 1
    assert "no version held it" in capsys.readouterr().out
    # A worse run (its best, the CNN, 55 %): the alias stays, and so does what it serves.
    checkout(root, uri, {"vit": (0.30, register(uri, "vit", 3)), "cnn": (0.55, register(uri, "cnn", 4))})
    assert cli.main(["promote"]) == 1
    out = capsys.readouterr().out
    assert (
        "`champion` stays on reprovision-vit version 1: 60.00 % validation accuracy against this run's CNN 55.00 %"
        in out
    )
    assert served(uri) == 1
    # Better, but within the margin (params.yaml: 0.01): still stays; a tie would too.
    checkout(root, uri, {"vit": (0.605, register(uri, "vit", 5)), "cnn": (0.1, register(uri, "cnn", 6))})
    assert cli.main(["promote"]) == 1 and served(uri) == 1
    capsys.readouterr()
    # A better run: 70 % moves it.
    checkout(root, uri, {"vit": (0.20, register(uri, "vit", 7)), "cnn": (0.70, register(uri, "cnn", 8))})
    assert cli.main(["promote"]) == 0 and served(uri) == 8
    assert (
        "moved from reprovision-vit version 1 (60.00 %) to reprovision-cnn version 4 (70.00 %)"
        in capsys.readouterr().out
    )
    assert "champion" not in mlflow.MlflowClient(uri).get_registered_model("reprovision-vit").aliases


def test_another_split_is_not_compared_and_force_decides(project, capsys):
    root, uri = project
    checkout(root, uri, {"vit": (0.60, register(uri, "vit", 1)), "cnn": (0.40, register(uri, "cnn", 2))})
    assert cli.main(["promote"]) == 0
    checkout(root, uri, {"vit": (0.90, register(uri, "vit", 3)), "cnn": (0.1, register(uri, "cnn", 4))}, split="other")
    assert cli.main(["promote"]) == 1 and served(uri) == 1
    assert "validated on another split (cifar10 abc, seed 0, this run's: other)" in capsys.readouterr().out
    assert cli.main(["promote", "--force"]) == 0 and served(uri) == 3
    assert "by `--force`" in capsys.readouterr().out


RACER = """
import json, sys
from reprovision.publish import registry
model, acc, version, uri = sys.argv[1:]
champion = registry.Champion(model, {model: float(acc)}, f"reprovision-{model}", version, uri)
print(json.dumps(registry.promote(champion, "split A").moved))
"""


def test_two_runs_finishing_together_leave_the_better_one_holding_the_alias(project):
    root, uri = project
    checkout(root, uri, {"vit": (0.50, register(uri, "vit", 1)), "cnn": (0.40, register(uri, "cnn", 2))}, "split A")
    assert registry.promote(registry.read_champion(root), "split A").moved
    better, worse = register(uri, "cnn", 7), register(uri, "vit", 9)
    racers = [
        subprocess.Popen(
            [forked_python(), "-c", RACER, model, acc, version, uri], cwd=root, stdout=subprocess.PIPE, text=True
        )
        for model, acc, version in (("vit", "0.60", worse), ("cnn", "0.70", better))
    ]
    outcomes = [json.loads(p.communicate(timeout=120)[0].strip().splitlines()[-1]) for p in racers]
    assert all(p.returncode == 0 for p in racers) and outcomes[1] is True  # the better one always wins
    assert served(uri) == 7
