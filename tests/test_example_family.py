"""README's "Add a model family", followed to the letter in a throwaway copy: its steps are read from
the README itself (each names a file, new or changed before/after a line, and the code to put there),
then `make deps`'s generator, then the whole DAG with the new family, to the report, the registry and
`dvc exp show`."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import yaml
from conftest import ROOT, _new_copy, dvc, exp_run, pipeline_env, sh
from mlflow import MlflowClient
from pipeline import metric_columns, stages_run

pytestmark = pytest.mark.slow

STEP = re.compile(
    r"^\*\*\d+\. `(?P<path>[^`]+)`\*\*(?:, (?P<where>before|after) `(?P<anchor>[^`]+)`)?.*?\n```\w*\n(?P<code>.*?)```",
    re.M | re.S,
)


def readme_steps() -> tuple[str, list[dict]]:
    text = (ROOT / "README.md").read_text()
    section = text.split("### Add a model family", 1)[1].split("\n### ", 1)[0].split("\n## ", 1)[0]
    steps = [m.groupdict() for m in STEP.finditer(section)]
    name = re.search(r"^\*\*\d+\. `stages/train_(\w+)\.py`\*\*", section, re.M).group(1)
    return name, steps


def apply(repo, step: dict) -> None:
    path = repo / step["path"]
    if not step["where"]:
        assert not path.exists(), f"README's step writes {step['path']} as a new file, but it exists"
        path.write_text(step["code"])
        return
    lines = path.read_text().splitlines(keepends=True)
    at = [i for i, line in enumerate(lines) if line.rstrip("\n") == step["anchor"] or line.startswith(step["anchor"])]
    assert len(at) == 1, f"README's anchor {step['anchor']!r} matches {len(at)} lines of {step['path']}"
    i = at[0] + (step["where"] == "after")
    path.write_text("".join(lines[:i] + [step["code"]] + lines[i:]))


def test_a_new_family_is_the_readme_steps_and_make_deps(tmp_path, shared_cache, stage_mirror):
    name, steps = readme_steps()
    assert [s["path"] for s in steps] == [
        f"src/reprovision/models/{name}.py",
        "src/reprovision/config.py",
        "src/reprovision/config.py",
        "params.yaml",
        f"stages/train_{name}.py",
    ]
    repo = _new_copy(tmp_path / "repo", shared_cache)
    for step in steps:
        apply(repo, step)
    env = pipeline_env(PYTHONPATH=str(repo / "src"))  # the copy's own library, as its stages import it
    make_deps = sh([sys.executable, "-m", "reprovision.tools.deps"], repo, env)  # what `make deps` runs
    assert f"train-{name}" in make_deps.stdout and "evaluate" in make_deps.stdout and "plots" in make_deps.stdout
    changed = sh(["git", "status", "--porcelain"], repo).stdout.split("\n")
    assert sorted(line[3:] for line in changed if line) == sorted(
        [
            "dvc.yaml",
            "params.yaml",
            "src/reprovision/config.py",
            f"src/reprovision/models/{name}.py",
            f"stages/train_{name}.py",
        ]
    )
    assert sh([sys.executable, "-m", "reprovision.tools.deps", "--check"], repo, env).returncode == 0

    stage = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"][f"train-{name}"]
    assert f"src/reprovision/models/{name}.py" in stage["deps"] and "src/reprovision/models/vit.py" not in stage["deps"]
    assert stage["outs"][0] == f"models/{name}" and stage["metrics"] == [f"metrics/{name}.json"]

    run = exp_run(repo, f"{name}.epochs=1", f"{name}.hidden=32")
    assert {f"train-{name}", "evaluate", "report"} <= stages_run(run.stdout)
    summary = json.loads((repo / f"metrics/{name}/summary.json").read_text())
    assert summary["epochs"] == 1 and summary["params"] == 3 * 32 * 32 * 32 + 32 + 32 * 10 + 10
    evaluated = json.loads((repo / "metrics/evaluate.json").read_text())
    assert list(evaluated) == ["vit", "cnn", name] and 0 <= evaluated[name]["accuracy"] <= 1
    assert "test_acc" not in summary and 0 <= summary["monitor_test_acc"] <= 1  # the stage's is monitoring
    assert (repo / f"reports/figures/misclassified_{name}.png").is_file()
    assert sorted(p.name for p in (repo / "reports/figures").glob(f"*_{name}.png")) == [
        f"misclassified_{name}.png"
    ]  # no heat map
    card = (repo / f"models/{name}/card.md").read_text()
    assert "Two-layer perceptron" in card

    report = (repo / "reports/report.md").read_text()
    assert "| MLP |" in report and f"{100 * evaluated[name]['accuracy']:.2f}%" in report
    assert "Not produced by the evaluate stage" not in report

    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    versions = client.search_model_versions(f"name = 'reprovision-{name}'")
    assert (
        len(versions) == 1
        and versions[0].run_id == json.loads((repo / f"models/{name}/run.json").read_text())["run_id"]
    )

    columns = metric_columns(json.loads(dvc(repo, "exp", "show", "--json").stdout))
    assert columns[f"metrics/evaluate.json:{name}.accuracy"] == evaluated[name]["accuracy"]
    assert columns[f"metrics/evaluate.json:{name}.accuracy_ci95"] > 0
    assert not any(key.startswith(f"metrics/{name}.json:test") for key in columns)  # one test accuracy: evaluate's
    plots = json.loads(dvc(repo, "plots", "show", "--json").stdout)["data"]
    assert f"Confusion matrix ({name})" in plots and f"{name}/history.csv::train_acc" in json.dumps(
        plots["Classifier accuracy"]
    )

    # The name is the family's everywhere; one that dvc.yaml already uses is refused before anything is written.
    clash = _new_copy(tmp_path / "clash")
    for step in steps:
        step = {**step, "path": step["path"].replace(name, "mlp"), "code": step["code"].replace(name, "mlp")}
        step["anchor"] = step["anchor"] and step["anchor"].replace(name, "mlp")
        apply(clash, step)
    before = (clash / "dvc.yaml").read_text()
    refused = subprocess.run(
        [sys.executable, "-m", "reprovision.tools.deps"],
        cwd=clash,
        capture_output=True,
        text=True,
        env=pipeline_env(PYTHONPATH=str(clash / "src")),
    )
    assert refused.returncode != 0 and "mlp" in refused.stderr and "rename" in refused.stderr, refused.stderr
    assert (clash / "dvc.yaml").read_text() == before
