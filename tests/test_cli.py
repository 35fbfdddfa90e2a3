"""Every `reprovision` subcommand answers what a user can fix (a broken params.yaml, a bad database URL, a store
that does not answer) with one line on stderr naming it and the fix, exit status 2, and no traceback.

The subcommands come from the parser itself, so that a new one is covered without a change here."""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import committed_params

from reprovision.core import track
from reprovision.tools import cli, server

# Two mistakes at once: ConfigError lists them on two lines, which the command line joins into one.
BROKEN_PARAMS = {
    "invalid value and unknown key": "lr: -1\nvit:\n  epoch: 3\n",
    "not YAML": "data:\n  train_fraction: [0.1\nlr: 1\n",
    "not a mapping": "- lr\n- 1\n",
}
EXPECTED = {
    "invalid value and unknown key": ["params.yaml: 2 invalid value(s):", "lr = -1", "did you mean 'vit.epochs'"],
    "not YAML": ["params.yaml is not valid YAML", "at line 3, column 3", "fix that line"],
    "not a mapping": ["params.yaml: expected a mapping of the sections"],
}


def subcommands() -> dict[str, argparse.ArgumentParser]:
    (group,) = [a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(group.choices)


def least_argv(name: str) -> list[str]:
    """The subcommand with each required argument given: its first choice, a number, or a word."""
    argv = [name]
    for action in subcommands()[name]._actions:
        if action.required:
            value = str(action.choices[0]) if action.choices else "1" if action.type in (int, float) else "x"
            argv += [action.option_strings[0], value] if action.option_strings else [value]
    return argv


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound by the kernel's choice, then let go)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def one_line_error(err: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def folder(tmp_path, monkeypatch) -> Path:
    """A scratch project folder with the committed params.yaml, its own MLflow store, no server."""
    for name in [k for k in os.environ if k.startswith(("MLFLOW_TRACKING", "MLFLOW_EXPERIMENT"))]:
        monkeypatch.delenv(name)
    (tmp_path / "params.yaml").write_text(committed_params())
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_the_subcommands_are_the_ones_this_file_knows_to_exercise():
    # A new subcommand is exercised by the tests below as it is; this only says which ones there are.
    assert {"mlflow-server", "reproduce", "study", "tune", "exp-worker", "promote"} <= set(subcommands())


@pytest.mark.parametrize("command", sorted(subcommands()))
def test_every_subcommand_answers_a_broken_params_yaml_with_one_line(command, folder):
    """The installed `reprovision` script, as a user runs it: exit 2, the line, and nothing started."""
    (folder / "params.yaml").write_text(BROKEN_PARAMS["invalid value and unknown key"])
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_TRACKING", "MLFLOW_EXPERIMENT"))}
    try:
        done = subprocess.run(
            [str(Path(sys.executable).parent / "reprovision"), *least_argv(command)],
            cwd=folder,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        server.stop(folder)  # had `mlflow-server start` started one, by its recorded process group
    line = one_line_error(done.stderr)
    assert done.returncode == 2, done.stdout + done.stderr
    assert line.startswith(f"reprovision {command}: ") and all(
        part in line for part in EXPECTED["invalid value and unknown key"]
    )
    assert sorted(p.name for p in folder.iterdir()) == ["params.yaml"]  # no store, no clone, no server state


@pytest.mark.parametrize("command", sorted(subcommands()))
@pytest.mark.parametrize("broken", sorted(BROKEN_PARAMS))
def test_each_kind_of_broken_params_yaml_is_one_line_for_every_subcommand(command, broken, folder, capsys):
    (folder / "params.yaml").write_text(BROKEN_PARAMS[broken])
    assert cli.main(least_argv(command)) == 2
    line = one_line_error(capsys.readouterr().err)
    assert line.startswith(f"reprovision {command}: ") and all(part in line for part in EXPECTED[broken]), line
    assert sorted(p.name for p in folder.iterdir()) == ["params.yaml"]


@pytest.mark.parametrize(
    "url, said",
    [
        ("foo://x", "--storage foo://x: SQLAlchemy knows no database 'foo'"),
        ("optuna.db", "--storage optuna.db: not a database URL"),
        (
            "postgresql+psycopg://tuner:secret@127.0.0.1:{port}/optuna",
            "tuner:***@127.0.0.1:{port}/optuna: no connection",
        ),
        ("sqlite:///{folder}/missing/optuna.db", "missing/optuna.db: no connection (unable to open database file)"),
    ],
)
def test_a_bad_or_unreachable_storage_url_is_one_line_before_anything_runs(url, said, folder, monkeypatch, capsys):
    port = closed_port()
    url, said = url.format(port=port, folder=folder), said.format(port=port)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{folder}/mlflow.db")
    argv = ["tune", "--model", "vit", "--trials", "1", "--set", "data.val_fraction=0.1", "--storage", url]
    assert cli.main(argv) == 2
    line = one_line_error(capsys.readouterr().err)
    assert line.startswith("reprovision tune: ") and said in line and "secret" not in line, line
    assert "without --storage the study lives in sqlite:///optuna.db" in line
    assert sorted(p.name for p in folder.iterdir()) == ["params.yaml"]  # no study, no MLflow run


STORE_COMMANDS = sorted(name for name, sub in subcommands().items() if sub.get_default("store") is not False)


@pytest.mark.parametrize("command", STORE_COMMANDS)
@pytest.mark.parametrize("kind", ["http", "postgresql"])
def test_an_unreachable_tracking_store_is_one_line_for_every_command_that_uses_it(command, kind, folder, monkeypatch,
                                                                                  capsys):  # fmt: skip
    port = closed_port()
    uri = {"http": f"http://127.0.0.1:{port}", "postgresql": f"postgresql+psycopg://mlflow@127.0.0.1:{port}/mlflow"}
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri[kind])
    assert cli.main(least_argv(command)) == 2
    line = one_line_error(capsys.readouterr().err)
    assert line.startswith(f"reprovision {command}: ") and uri[kind] in line and "MLFLOW_TRACKING_URI" in line, line
    assert ("not reachable" if kind == "http" else "no connection (") in line
    assert sorted(p.name for p in folder.iterdir()) == ["params.yaml"]


def test_a_store_found_unreachable_mid_command_is_one_line_too(folder, monkeypatch, capsys):
    """Past the checks, a library's own error for a store that went away (MLflow's, after its retries)."""
    import mlflow
    import requests

    def gone(*args, **kwargs):
        try:
            raise requests.ConnectionError("Connection refused")
        except requests.ConnectionError as err:
            raise mlflow.exceptions.MlflowException("API request failed") from err

    monkeypatch.setattr(cli, "_promote", gone)
    monkeypatch.setattr(track, "check_store", lambda uri: None)  # it was up when checked
    assert cli.main(["promote"]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert "does not answer (ConnectionError)" in line and "reprovision mlflow-server start" in line
