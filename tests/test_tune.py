"""`reprovision tune` plumbing with a fake `dvc exp run`: values read back, pruning kills, MLflow
record, printed command."""

from __future__ import annotations

import csv
import io
import os
import sys
import time
from pathlib import Path

import optuna
import psutil
import pytest
import yaml
from conftest import committed_params, forked_python

from reprovision.core import track
from reprovision.tools.tune import TrialFailed, TuneError, check_overrides, read_history, tune, yaml_number

# Stands in for `dvc exp run -n NAME -S k=v ... train-vit`: like dvc, it starts the training as a
# child process and waits. The training rewrites metrics/vit/history.csv after every epoch and
# writes metrics/vit.json at the end. Trial 2 is hopeless: 1% validation accuracy, for a thousand
# epochs. The test accuracy column is the opposite of the validation one: tune must never read it.
FAKE_DVC = """
import json, os, subprocess, sys, time
from pathlib import Path
import yaml

name, sets = sys.argv[2], dict(s.split("=", 1) for s in sys.argv[3:])
Path("pids").mkdir(exist_ok=True)
if sys.argv[1] == "dvc":
    Path("pids", name + ".dvc").write_text(str(os.getpid()))
    sys.exit(subprocess.call([sys.executable, __file__, "train", *sys.argv[2:]]))
Path("pids", name + ".train").write_text(str(os.getpid()))
hopeless = name.endswith("-2")
epochs = 1000 if hopeless else int(sets["vit.epochs"])
history = Path("metrics/vit/history.csv")
history.parent.mkdir(parents=True, exist_ok=True)
rows = []
for epoch in range(1, epochs + 1):
    time.sleep(0.1)
    # Every good trial reports the same curve, so that none of them is pruned.
    val = 0.01 if hopeless else 0.5
    rows.append(f"{epoch},1.0,0.5,1.0,{val},1.0,{1 - val},0.1,0.001")
    header = "epoch,train_loss,train_acc,val_loss,val_acc,test_loss,test_acc,epoch_seconds,lr"
    history.write_text(header + "\\n" + "\\n".join(rows) + "\\n")
lr = yaml.safe_load(sets["lr"])
Path("metrics/vit.json").write_text(json.dumps({"val_acc": 0.5 + 100 * lr, "test_acc": 0.5 - 100 * lr}))
"""


@pytest.fixture
def workspace(tmp_path: Path, monkeypatch) -> Path:
    """A scratch cwd with the committed params.yaml (tune checks overrides against it; not as the last
    `dvc exp run`, e.g. `make run`, left it) and its own MLflow store."""
    (tmp_path / "params.yaml").write_text(committed_params())
    (tmp_path / "fake_dvc.py").write_text(FAKE_DVC)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    return tmp_path


def fake_dvc(exp_name: str, sets: list[str]) -> list[str]:
    return [sys.executable, "fake_dvc.py", "dvc", exp_name, *sets]


def gone(pid: int) -> bool:
    return not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_tune_reads_values_prunes_hopeless_trial_and_records_best(workspace, capsys):
    import mlflow

    study = tune("vit", trials=4, epochs=3, sets=["data.val_fraction=0.1"], name="t", command=fake_dvc, poll=0.05)

    states = [t.state for t in study.trials]
    assert states == [optuna.trial.TrialState.COMPLETE] * 2 + [
        optuna.trial.TrialState.PRUNED,
        optuna.trial.TrialState.COMPLETE,
    ]
    for t in study.trials:
        assert t.user_attrs["exp_name"] == f"tune-t-{t.number}"
        if t.state == optuna.trial.TrialState.COMPLETE:
            assert t.value == pytest.approx(0.5 + 100 * t.params["lr"])  # read back from metrics/vit.json
            assert sorted(t.intermediate_values) == [1, 2, 3]  # every epoch reported

    # The hopeless trial was stopped early, dvc and the training under it alike.
    pruned = study.trials[2]
    assert max(pruned.intermediate_values) < 10
    rows = len(read_history(workspace / "metrics/vit/history.csv", 0))
    time.sleep(0.4)
    assert len(read_history(workspace / "metrics/vit/history.csv", 0)) == rows  # nothing writes any more
    for role in ("dvc", "train"):
        assert gone(int((workspace / "pids" / f"tune-t-2.{role}").read_text()))

    # MLflow: one "tune" run with each finished trial's value, the table of trials and the best settings.
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name(track.experiment_name())
    (run,) = client.search_runs([experiment.experiment_id], "tags.stage = 'tune'")
    best = study.best_trial
    assert (
        run.info.status == "FINISHED"
        and run.data.tags["model"] == "vit"
        and run.data.tags["best_exp_name"] == f"tune-t-{best.number}"
    )
    assert float(run.data.params["best.lr"]) == best.params["lr"]
    assert float(run.data.params["best.vit.weight_decay"]) == best.params["weight_decay"]
    assert run.data.metrics["best_value"] == pytest.approx(best.value)
    # Parameter importances (Optuna's fANOVA): a share per searched parameter, summing to 1.
    shares = {k: v for k, v in run.data.metrics.items() if k.startswith("importance.")}
    assert set(shares) == {"importance.lr", "importance.vit.weight_decay", "importance.vit.label_smoothing"}
    assert sum(shares.values()) == pytest.approx(1.0) and all(v >= 0 for v in shares.values())
    history = client.get_metric_history(run.info.run_id, "trial_value")
    assert {m.step: m.value for m in history} == {
        t.number: t.value for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE
    }
    table_path = client.download_artifacts(run.info.run_id, "trials.csv", str(workspace))
    table = list(csv.DictReader(io.StringIO(Path(table_path).read_text())))
    assert [r["state"] for r in table] == [s.name for s in states] and table[2]["exp_name"] == "tune-t-2"
    assert (
        table[2]["value"] == ""
        and float(table[2]["last_val_acc"]) == 0.01
        and float(table[0]["lr"]) == study.trials[0].params["lr"]
    )

    # The printed command reproduces the best trial: its -S values read back to the exact floats.
    out = capsys.readouterr().out
    sets = [
        f"lr={yaml_number(best.params['lr'])}",
        f"vit.weight_decay={yaml_number(best.params['weight_decay'])}",
        f"vit.label_smoothing={yaml_number(best.params['label_smoothing'])}",
        "data.val_fraction=0.1",
        "vit.epochs=3",
    ]
    expected = "dvc exp run " + " ".join(f"-S {s}" for s in sets) + " train-vit"
    assert f"reproduce:  {expected}\n" in out
    assert [yaml.safe_load(s.split("=", 1)[1]) for s in sets[:3]] == [
        best.params[k] for k in ("lr", "weight_decay", "label_smoothing")
    ]
    assert f"dvc exp apply tune-t-{best.number}" in out


def test_a_failing_trial_stops_the_search(workspace):
    import mlflow

    def failing(exp_name: str, sets: list[str]) -> list[str]:
        return [sys.executable, "-c", "import sys; sys.exit(3)"]

    with pytest.raises(TrialFailed, match="exited with 3"):
        tune("cnn", trials=3, sets=["data.val_fraction=0.1"], name="f", command=failing, poll=0.05)
    (run,) = mlflow.MlflowClient().search_runs(
        [mlflow.MlflowClient().get_experiment_by_name(track.experiment_name()).experiment_id]
    )
    assert run.info.status == "FAILED"


def test_read_history_skips_stale_files_and_rows_cut_short(tmp_path):
    path = tmp_path / "history.csv"
    path.write_text(
        "epoch,train_loss,train_acc,val_loss,val_acc,test_loss,test_acc,epoch_seconds,lr\n"
        "1,1.0,0.3,1.1,0.25,1.0,0.9,2.0,0.001\n2,0.9,0.4,1.0,0.3"
    )
    assert read_history(path, since=0) == [(1, 0.25)]  # row 2 is still being written
    os.utime(path, (time.time() - 60, time.time() - 60))
    assert read_history(path, since=time.time() - 1) == []  # the previous trial's file
    assert read_history(tmp_path / "missing.csv", since=0) == []


def test_numbers_and_overrides_are_checked_before_any_trial(workspace):
    assert yaml_number(1e-06) == "1.0e-06" and yaml.safe_load(yaml_number(1e-06)) == 1e-06
    assert yaml_number(0.00041) == "0.00041" and yaml_number(2.5e-05) == "2.5e-05"
    check_overrides(["data.train_fraction=0.1", "data.val_fraction=0.2", "vit.epochs=3"], "vit")
    with pytest.raises(TuneError, match="data.val_fraction is 0 .*--set data.val_fraction=0.1"):
        check_overrides(["vit.epochs=3"], "vit")  # no validation split: nothing to choose on but the test set
    with pytest.raises(TuneError, match="did you mean 'vit.epochs'"):
        check_overrides(["vit.epoch=3", "data.val_fraction=0.1"], "vit")
    with pytest.raises(TuneError, match="tune searches cnn.weight_decay itself"):
        check_overrides(["cnn.weight_decay=0.1", "data.val_fraction=0.1"], "cnn")
    with pytest.raises(TuneError, match="expected key=value"):
        check_overrides(["vit.epochs"], "vit")
    with pytest.raises(TuneError, match="--model 'resnet'"):
        tune("resnet", trials=1)


KILLED_SEARCH = """
import sys
from reprovision.tools import tune
tune.HEARTBEAT_S, tune.GRACE_S = 1, 2
fake = lambda exp_name, sets: [sys.executable, "fake_dvc.py", "dvc", exp_name, *sets]
tune.tune("vit", trials=4, epochs=3, sets=["data.val_fraction=0.1"], name="k", command=fake, poll=0.05)
"""


# Trial 1 would run for a hundred seconds: what ends it early is the kill, not its own end.
ENDLESS_TRIAL_1 = FAKE_DVC.replace('hopeless = name.endswith("-2")', "hopeless = False").replace(
    "epochs = 1000 if hopeless else", 'epochs = 1000 if hopeless or name.endswith("-1") else'
)


def wait_until(condition, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)
    return condition()


@pytest.mark.parametrize("killed", ["tuner", "tuner and lifeline"])
def test_a_killed_search_leaves_no_trial_running_and_resumes_from_its_database(killed, workspace, capsys):
    """kill -9 of the tuner in the middle of trial 1: the trial's processes die with it (its lifeline ends
    its process group). Had they survived (the lifeline killed too), the next start ends them. Either way
    the same command again keeps trial 0, marks trial 1 failed at once (its tuner is gone: no heartbeat to
    wait for), and runs to 4 finished trials with new numbers."""
    import signal
    import subprocess

    (workspace / "killed_search.py").write_text(KILLED_SEARCH)
    (workspace / "fake_dvc.py").write_text(ENDLESS_TRIAL_1)
    proc = subprocess.Popen(
        [sys.executable, "killed_search.py"],
        cwd=workspace,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    assert wait_until(lambda: (workspace / "pids" / "tune-k-1.train").exists() or proc.poll() is not None, 300)
    assert (workspace / "pids" / "tune-k-1.train").exists(), "trial 1 never started"
    trial = [int((workspace / "pids" / f"tune-k-1.{role}").read_text()) for role in ("dvc", "train")]
    lifeline = os.getpgid(trial[0])
    assert lifeline != os.getpgid(proc.pid) and os.getpgid(trial[1]) == lifeline  # a process group of its own
    if killed == "tuner":
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        survivors = lambda: [pid for pid in (lifeline, *trial) if not gone(pid)]  # noqa: E731
        assert wait_until(lambda: not survivors(), 30), f"outlived their tuner's kill -9: {survivors()}"
    else:
        os.kill(proc.pid, signal.SIGSTOP)  # the tuner can't stop its trial now...
        os.kill(lifeline, signal.SIGKILL)  # ...nor can the lifeline
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert wait_until(lambda: gone(lifeline), 10) and not any(gone(pid) for pid in trial)  # orphans, running on
    assert (workspace / "optuna.db").exists()

    study = tune("vit", trials=4, epochs=3, sets=["data.val_fraction=0.1"], name="k", command=fake_dvc, poll=0.05)
    out = capsys.readouterr().out
    assert all(gone(pid) for pid in trial)
    assert (f"trial 1: its tuner is gone and process group {lifeline} still runs: ending it" in out) is (
        killed != "tuner"
    )
    states = {t.number: t.state for t in study.trials}
    S = optuna.trial.TrialState
    assert states == {0: S.COMPLETE, 1: S.FAIL, 2: S.COMPLETE, 3: S.COMPLETE, 4: S.COMPLETE}
    assert len({t.user_attrs["exp_name"] for t in study.trials}) == 5
    assert "[tune k] resuming: 2 trials on record" in out
    # Run again: nothing left to do, the same best.
    again = tune("vit", trials=4, epochs=3, sets=["data.val_fraction=0.1"], name="k", command=fake_dvc, poll=0.05)
    assert len(again.trials) == 5 and again.best_trial.number == study.best_trial.number


TUNE_WORKER = """
import sys
from reprovision.tools import tune
fake = lambda exp_name, sets: [sys.executable, "fake_dvc.py", "dvc", exp_name, *sets]
tune.tune("vit", trials=5, epochs=2, sets=["data.val_fraction=0.1"], name="shared", command=fake, poll=0.05,
          storage=sys.argv[1])
"""


def test_two_workers_share_one_search_through_its_storage(tmp_path):
    """Two `reprovision tune` processes, each in a workspace of its own (two clones, or two machines),
    on one storage: trial numbers are handed out once, both workers run trials, and together they stop
    at the study's --trials (plus at most the other's trial under way)."""
    import subprocess

    storage = f"sqlite:///{tmp_path / 'optuna.db'}?timeout=60"
    workers = []
    for name in ("a", "b"):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "params.yaml").write_text(committed_params())
        (folder / "fake_dvc.py").write_text(FAKE_DVC.replace('hopeless = name.endswith("-2")', "hopeless = False"))
        (folder / "worker.py").write_text(TUNE_WORKER)
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}"}
        workers.append(subprocess.Popen([forked_python(), "worker.py", storage], cwd=folder, env=env, text=True,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT))  # fmt: skip
    outputs = [w.communicate(timeout=300)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], "\n".join(o[-2500:] for o in outputs)
    study = optuna.load_study(study_name="shared", storage=storage)
    numbers = [t.number for t in study.trials]
    assert len(numbers) == len(set(numbers)) and 5 <= len(study.trials) <= 6
    ran = {name: sorted(p.name for p in (tmp_path / name / "pids").glob("*.train")) for name in ("a", "b")}
    assert ran["a"] and ran["b"] and not set(ran["a"]) & set(ran["b"])  # both worked, never on the same trial
