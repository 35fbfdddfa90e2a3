"""Helpers of the end-to-end tests (test_pipeline_e2e.py, test_pipeline_params_e2e.py, test_team_server.py):
what a `dvc exp run` ran, what MLflow holds, and the fingerprints two clones must agree on."""

from __future__ import annotations

import csv
import fcntl
import hashlib
import io
import json
import re

from conftest import TINY, workers_folder
from mlflow import MlflowClient

ALL_STAGES = {
    "check-params",
    "fetch-data",
    "augment",
    "train-judge",
    "train-gan@mlp",
    "train-gan@dcgan",
    "train-vit",
    "train-cnn",
    "evaluate",
    "pretrain-ssl",
    "linear-probe",
    "report",
}


def stages_run(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


def stages_cached(output: str) -> set[str]:
    return set(re.findall(r"Stage '([^']+)' is cached - skipping run", output))


def training_runs(repo) -> list:
    return [r for r in all_runs(repo)[1] if r.data.tags["stage"].startswith("train-")]


def outputs_sha256(repo) -> dict[str, str]:
    """Every file DVC produced, by content: what a rejected or cached run must leave as it was."""
    return {
        str(path.relative_to(repo)): hashlib.sha256(path.read_bytes()).hexdigest()
        for folder in ("data", "models", "metrics", "reports")
        for path in sorted((repo / folder).rglob("*"))
        if path.is_file()
    }


def all_runs(repo) -> tuple[MlflowClient, list]:
    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    exp = client.get_experiment_by_name("reprovision")  # None before the first run
    return client, client.search_runs([exp.experiment_id], max_results=5000) if exp else []


def tiny_parameters(model: str) -> int:
    """Parameters of the classifier that TINY's params describe, built here as the stage builds it."""
    import yaml

    from reprovision.config import Params
    from reprovision.models import count_parameters
    from reprovision.models.classifiers import FAMILIES

    sections: dict = {}
    for setting in TINY:
        key, value = setting.split("=", 1)
        *path, leaf = key.split(".")
        node = sections
        for part in path:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value)
    params = Params.model_validate(sections)
    return count_parameters(FAMILIES[model].build(params.classifier(model), num_classes=10, channels=3, image_size=32))


OUTPUTS_TO_COMPARE = [
    "metrics/vit.json",
    "metrics/cnn.json",
    "metrics/judge.json",
    "metrics/gan/mlp.json",
    "metrics/gan/dcgan.json",
    "metrics/vit/summary.json",
    "metrics/cnn/summary.json",
    "metrics/judge/summary.json",
    "metrics/gan/mlp/summary.json",
    "metrics/gan/dcgan/summary.json",
    "metrics/eval/summary.json",
    "metrics/ssl.json",
    "metrics/ssl/summary.json",
    "metrics/ssl/history.csv",
    "metrics/probe.json",
    "metrics/probe/summary.json",
    "models/ssl/encoder.pt",
    "metrics/vit/history.csv",
    "metrics/evaluate.json",
    "metrics/eval/cnn_confusion.json",
    "models/vit/model.pt",
    "models/cnn/model.pt",
    "models/judge/model.pt",
    "models/gan/mlp/generator.pt",
    "models/gan/dcgan/generator.pt",
    "data/prepared/manifest.json",
]


def fingerprints(repo, names: list[str] = OUTPUTS_TO_COMPARE) -> dict[str, str]:
    """sha256 of results; timing figures are masked, they are the only thing allowed to differ."""
    out = {}
    for name in names:
        data = (repo / name).read_bytes()
        if name.endswith(".json"):
            obj = json.loads(data)
            for section in [obj, *[v for v in obj.values() if isinstance(v, dict)]] if isinstance(obj, dict) else []:
                for key in ("train_seconds", "s_per_epoch", "total_seconds", "wall_seconds"):
                    section.pop(key, None)
            data = json.dumps(obj, sort_keys=True).encode()
        elif name.endswith(".csv"):
            rows = list(csv.DictReader(io.StringIO(data.decode())))
            data = json.dumps([{k: v for k, v in row.items() if k != "epoch_seconds"} for row in rows]).encode()
        out[name] = hashlib.sha256(data).hexdigest()
    return out


def agree_with_the_other_clone(found: dict[str, str], tmp_path_factory) -> None:
    """Two first runs, each in a fresh clone with a DVC cache of its own (test_pipeline_e2e.py and
    test_pipeline_params_e2e.py, on two pytest-xdist workers or one after the other): the first to
    finish leaves its fingerprints here, the second asserts that its own are identical."""
    folder = workers_folder(tmp_path_factory)
    with open(folder / "first-run.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        published = folder / "first-run.json"
        if not published.exists():
            published.write_text(json.dumps(found))
            return
        other = json.loads(published.read_text())
    differ = sorted(name for name in other if other[name] != found.get(name))
    assert not differ and set(other) == set(found), f"two clones of the same code, params and data differ in {differ}"


def metric_columns(shown: list[dict]) -> dict[str, object]:
    """The workspace's metric columns of `dvc exp show --json`, `<file>:<key.path>` in the order shown."""
    workspace = next(row for row in shown if row["rev"] == "workspace")
    columns: dict[str, object] = {}

    def flatten(prefix: str, value) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                flatten(f"{prefix}.{key}" if not prefix.endswith(":") else prefix + key, inner)
        else:
            columns[prefix] = value

    for path, content in workspace["data"]["metrics"].items():
        flatten(f"{path}:", content["data"])
    return columns
