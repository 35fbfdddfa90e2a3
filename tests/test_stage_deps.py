"""Each stage's `deps:` in dvc.yaml are exactly its script, the library files it imports and its data.

The import closure comes from the source (reprovision.tools.deps: ast, nothing executed), so a new
import anywhere in a stage's code path fails here until dvc.yaml declares the file: `make deps`
writes them. The real-run
half of the promise (editing any one library file makes `dvc status` name exactly the stages
that import it) is in test_pipeline_params_e2e.py.
"""

from __future__ import annotations

import shlex
import shutil

import pytest
import yaml
from imports import ROOT, closure

DVC_YAML = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def code_deps(stage: dict) -> set[str]:
    return {d for d in stage["deps"] if d.endswith(".py")}


def script_of(stage: dict) -> str:
    return next(word for word in shlex.split(stage["cmd"]) if word.endswith(".py"))


def imported(stage: dict) -> set[str]:
    return {str(p.relative_to(ROOT)) for p in closure(ROOT / script_of(stage))}


@pytest.mark.parametrize("name", sorted(DVC_YAML))
def test_deps_are_exactly_the_import_closure(name):
    stage = DVC_YAML[name]
    declared, runs = code_deps(stage), imported(stage)
    assert not runs - declared, f"{name} imports {sorted(runs - declared)} but dvc.yaml does not declare them"
    assert not declared - runs, f"{name} declares {sorted(declared - runs)} but never imports them"


def test_every_library_file_belongs_to_some_stage():
    used = set().union(*(imported(stage) for stage in DVC_YAML.values()))
    library = {str(p.relative_to(ROOT)) for p in (ROOT / "src" / "reprovision").rglob("*.py")}
    # Tools around the pipeline, run by `reprovision <command>` or `make`, never inside a stage.
    tools = {str(p.relative_to(ROOT)) for p in (ROOT / "src" / "reprovision" / "tools").rglob("*.py")}
    assert library - used == tools


def test_no_code_dep_is_an_empty_file():
    # DVC warns "'<file>' is empty" for each empty dep at every status and run (121 lines in make run's output).
    empty = sorted({d for stage in DVC_YAML.values() for d in code_deps(stage) if not (ROOT / d).read_text().strip()})
    assert not empty, f"give each a docstring saying what it holds: {empty}"


def test_stages_import_only_the_architectures_they_run():
    models = {name: f"src/reprovision/models/{name}.py" for name in ("vit", "cnn", "resnet", "gan", "judge")}
    vit, cnn, gan = (imported(DVC_YAML[stage]) for stage in ("train-vit", "train-cnn", "train-gan"))
    assert vit & set(models.values()) == {models["vit"]}
    assert cnn & set(models.values()) == {models["cnn"], models["resnet"]}  # resnet.py: only when cnn.arch asks for it
    assert (
        gan & set(models.values()) == {models["gan"], models["judge"]}
        and "src/reprovision/training/fit_classifier.py" not in gan
    )


@pytest.mark.parametrize("name", ["check-params", "fetch-data"])
def test_the_data_stages_depend_on_no_tracking_code(name):
    """Editing an MLflow helper (core/track*.py) re-runs no data stage: they end through core/stage.py,
    which imports none of it."""
    tracking = sorted(d for d in code_deps(DVC_YAML[name]) if d.startswith("src/reprovision/core/track"))
    assert not tracking, f"{name} depends on {tracking}"


def deps_lines(text: str) -> dict[str, list[str]]:
    """Each stage's `deps:` lines in dvc.yaml's text, as written (items and comments), stripped."""
    from reprovision.tools.deps import STAGE

    found, stage, lines = {}, None, iter(text.splitlines())
    for line in lines:
        stage = STAGE.match(line).group(1) if STAGE.match(line) else stage
        if line.rstrip() == "    deps:":
            found[stage] = []
            for item in lines:
                if not item.startswith("      "):
                    break
                found[stage].append(item.strip())
    return found


@pytest.mark.parametrize("name", sorted(DVC_YAML))
def test_data_deps_come_first_then_the_code_below_its_comment(name):
    """What a person writes (data, earlier stages' outputs) first; `make deps` writes the code after its comment."""
    from reprovision.tools.deps import CODE_COMMENT

    lines = deps_lines((ROOT / "dvc.yaml").read_text())[name]
    assert lines.count(CODE_COMMENT.strip()) == 1, f"{name}: no {CODE_COMMENT.strip()!r} line"
    cut = lines.index(CODE_COMMENT.strip())
    data, code = lines[:cut], lines[cut + 1 :]
    assert not [d for d in data if d.endswith(".py")], f"{name}: a code dep above the comment"
    assert code and all(d.startswith("- ") and d.endswith(".py") for d in code), f"{name}: {code}"
    assert code[0] == f"- {script_of(DVC_YAML[name])}"


def test_a_lazy_import_counts(tmp_path):
    """An import inside a function is part of the closure: it runs when that code path does."""
    import imports

    (tmp_path / "stages").mkdir()
    (tmp_path / "src" / "pkg").mkdir(parents=True)
    (tmp_path / "src" / "pkg" / "__init__.py").write_text("")
    (tmp_path / "src" / "pkg" / "eager.py").write_text("def f():\n    from .lazy import g\n    return g()\n")
    (tmp_path / "src" / "pkg" / "lazy.py").write_text("import numpy\ndef g():\n    return 1\n")
    (tmp_path / "stages" / "s.py").write_text("from pkg import eager\n")
    found = {str(p.relative_to(tmp_path)) for p in imports.closure(tmp_path / "stages" / "s.py", tmp_path)}
    assert found == {"stages/s.py", "src/pkg/__init__.py", "src/pkg/eager.py", "src/pkg/lazy.py"}


def test_make_deps_writes_what_this_checks(tmp_path):
    """The generator restores a dropped dep, drops a stray one, puts a data dep back above the code and the
    code's comment back above the code, and leaves the rest of dvc.yaml alone."""
    from reprovision.tools import deps

    current = (ROOT / "dvc.yaml").read_text()
    assert deps.rewrite(ROOT, current) == (current, [])
    damaged = (
        current.replace("      - src/reprovision/core/graphs.py\n", "", 1)
        .replace(
            "      - stages/augment.py\n", "      - stages/augment.py\n      - src/reprovision/publish/report.py\n", 1
        )
        .replace(deps.CODE_COMMENT, "", 1)  # check-params': its code deps then follow no comment
        .replace("      - data/prepared\n" + deps.CODE_COMMENT, deps.CODE_COMMENT + "      - data/prepared\n", 1)
    )
    assert damaged.count(deps.CODE_COMMENT) == current.count(deps.CODE_COMMENT) - 1
    (tmp_path / "dvc.yaml").write_text(damaged)
    for name in ("src", "stages"):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    assert deps.main(["--check", "--root", str(tmp_path)]) == 1
    assert deps.main(["--root", str(tmp_path)]) == 0
    assert (tmp_path / "dvc.yaml").read_text() == current
    assert deps.main(["--check", "--root", str(tmp_path)]) == 0
