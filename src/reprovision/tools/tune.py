"""`reprovision tune`: an Optuna search over one classifier's learning rate, weight decay and label smoothing.

Each trial is one named DVC experiment, run in the workspace, one after the other:

    dvc exp run -n tune-<study>-<k> -S lr=... -S vit.weight_decay=... -S vit.label_smoothing=... train-vit

so every trial is cached, reproducible, and has its own MLflow training run. The target
`train-<model>` keeps a trial from re-running the other classifier, evaluate and report.
Trials are judged on the validation split (`data.val_fraction` > 0 is required; the test split
is never read for a decision). While a trial trains, its per-epoch validation accuracy
(metrics/<model>/history.csv, rewritten after every epoch) goes to Optuna; a trial below the median
of the earlier ones at the same epoch is stopped there (MedianPruner), its whole process group terminated.

    reprovision tune --model vit --trials 20 --epochs 10 --set data.val_fraction=0.1
    reprovision tune --model cnn --trials 8 --epochs 3 --timeout 3600 \\
        --set data.train_fraction=0.1 --set data.val_fraction=0.2
    reprovision study --name "tune vit" --exp-names 'tune-<study>-*'    # the trials' runs, plotted

`--timeout S` stops starting new trials after S seconds (the running one finishes).

Several workers, on one machine (each in a clone of its own) or several, share one search: the same
`--name` and `--storage` (the team's PostgreSQL; SQLite for clones on one disk) in each. Each asks the
study for its next trial, so the sampler sees every worker's results, and each stops once the study
holds `--trials` finished trials (a worker's trial under way then still finishes).

The study lives in a database, not in memory: `optuna.db` in the workspace (SQLite, git-ignored) or
`--storage URL` (e.g. the team's PostgreSQL). Run the same `--name` again after a crash, a Ctrl-C
or a kill -9 and the search goes on from the trials on record, the sampler seeing all of them:
`--trials` is the study's total of finished (complete or pruned) trials. A trial dies with its tuner: it
runs under a lifeline (lifeline.py) that ends the trial's process group when the tuner exits, even by
kill -9 (Linux's parent-death signal). The next start on the same machine marks the trials of a dead tuner
failed at once, ending first whatever of them still runs (the trial records its host, its tuner's pid and
its process group); a trial of another machine stops sending its heartbeat and is marked failed once GRACE_S
have passed.
At the end it prints the best settings and the `dvc exp run` that reproduces the best trial, and
logs one MLflow run "tune" (tags stage=tune, model, study): `trial_value` per finished trial
(step = trial number), `trials.csv`, the best settings as params `best.<name>`, `best_value`, and
each parameter's importance (Optuna's fANOVA) as `importance.<name>`, also printed.

Like any `dvc exp run` in the workspace, the trials leave params.yaml with the last trial's values:
`dvc exp apply tune-<study>-<best>` brings back the best trial's params and results.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path

import optuna
import yaml

from reprovision.config import PARAMS_FILE, ConfigError, Params, parse_params, with_overrides
from reprovision.core import track
from reprovision.layout import CLASSIFIERS, METRICS
from reprovision.tools.study import executable

POLL_SECONDS = 2.0
STORAGE_FILE = "optuna.db"  # the default storage, in the workspace
HEARTBEAT_S, GRACE_S = 60, 180  # a RUNNING trial silent for GRACE_S died with its process
# name: (low, high, log scale). `lr` is the top-level lr (each model uses lr x lr_mult);
# the others are set in the tuned model's section.
SEARCH_SPACE: dict[str, tuple[float, float, bool]] = {
    "lr": (1e-4, 3e-3, True),
    "weight_decay": (1e-6, 1e-1, True),
    "label_smoothing": (0.0, 0.2, False),
}

# (experiment name, `-S` overrides) -> the command that runs one trial; tests swap in a fake.
CommandBuilder = Callable[[str, list[str]], list[str]]


class TuneError(ValueError):
    """A bad argument to `reprovision tune`; the message names it and the fix."""


class TrialFailed(RuntimeError):
    """A trial's command exited with an error (its output is above)."""


# ---------------------------------------------------------------------------- commands
def param_key(name: str, model: str) -> str:
    return name if name == "lr" else f"{model}.{name}"


def yaml_number(value: float) -> str:
    """Exact (repr), and read back as a number: YAML 1.1 (PyYAML) takes '1e-06' for a string, '1.0e-06' for a float."""
    text = repr(float(value))
    mantissa, e, exponent = text.partition("e")
    return f"{mantissa}.0e{exponent}" if e and "." not in mantissa else text


def overrides(values: dict[str, float], model: str) -> list[str]:
    return [f"{param_key(name, model)}={yaml_number(value)}" for name, value in values.items()]


def dvc_command(exp_name: str | None, sets: Sequence[str], target: str) -> list[str]:
    command = ["dvc", "exp", "run", *(["-n", exp_name] if exp_name else [])]
    for override in sets:
        command += ["-S", override]
    return [*command, target]


def check_overrides(sets: Sequence[str], model: str, path: Path = PARAMS_FILE) -> Params:
    """The params every trial starts from; fails before the first trial if `--set`s would make
    params.yaml invalid, fight the search, or leave no validation split to judge trials on."""
    searched = {param_key(name, model) for name in SEARCH_SPACE}
    path = Path(path)
    if not path.exists():
        raise TuneError(f"{path} not found: run `reprovision tune` from the repository root (where dvc.yaml is)")
    for item in sets:
        key = item.partition("=")[0]
        if key in searched:
            raise TuneError(
                f"--set {key}: tune searches {key} itself; drop it from --set (searched: {', '.join(sorted(searched))})"
            )
    try:
        raw = with_overrides(yaml.safe_load(path.read_text()) or {}, sets, str(path))
        params = parse_params(raw, f"{path} with --set {' '.join(sets)}" if sets else str(path))
    except ConfigError as err:
        raise TuneError(str(err)) from None
    if params.data.val_fraction == 0:
        raise TuneError(
            "tune chooses on the validation split, and data.val_fraction is 0 (no validation split): "
            "hold one out, e.g. --set data.val_fraction=0.1 (the test split is never used to choose)"
        )
    return params


# ---------------------------------------------------------------------------- one trial
def read_history(path: Path, since: float) -> list[tuple[int, float]]:
    """(epoch, val_acc) of the rows written since `since` (an older file is the previous trial's).

    The file is rewritten while we read it: a row cut short has empty or missing fields, and is skipped."""
    try:
        if path.stat().st_mtime < since:
            return []
        with path.open(newline="") as fh:
            rows = list(csv.DictReader(fh))
    except FileNotFoundError:
        return []
    epochs = []
    for row in rows:
        if None in row or None in row.values() or "" in row.values():
            continue
        with contextlib.suppress(KeyError, ValueError):  # a header cut short
            epochs.append((int(row["epoch"]), float(row["val_acc"])))
    return epochs


def stop(proc: subprocess.Popen, grace: float = 30.0) -> None:
    """Terminate the trial's whole process group (its lifeline, dvc and the training under it)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def process_started(pid: int) -> float | None:
    """When process `pid` started (seconds since the epoch), None when there is none: with the pid, it names
    one process, also after the pid is reused."""
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def run_trial(command: list[str], model: str, trial: optuna.Trial, poll: float = POLL_SECONDS) -> float:
    """Run one trial's command, reporting each epoch's validation accuracy to Optuna; returns the final val_acc."""
    history, result = METRICS / model / "history.csv", METRICS / f"{model}.json"
    started = time.time()
    # Its own process group, so that a prune (or Ctrl-C, SIGTERM, an error here) stops dvc and the training it
    # started, under a lifeline that ends the group if this process dies without doing so (kill -9).
    # Who runs the trial, for a search resumed after this process died (end_orphaned_trials).
    trial.set_user_attr("host", socket.gethostname())
    trial.set_user_attr("tuner", [os.getpid(), process_started(os.getpid())])
    lifeline = [sys.executable, "-m", "reprovision.tools.lifeline", str(os.getpid())]
    proc = subprocess.Popen([*lifeline, *command], start_new_session=True)
    try:
        trial.set_user_attr("group", [proc.pid, process_started(proc.pid)])
        reported = 0
        while True:
            finished = proc.poll() is not None
            for epoch, val_acc in read_history(history, started):
                if epoch <= reported:
                    continue
                trial.report(val_acc, epoch)
                reported = epoch
                if not finished and trial.should_prune():
                    stop(proc)
                    raise optuna.TrialPruned(
                        f"val_acc {val_acc:.4f} at epoch {epoch}: below the median of earlier trials"
                    )
            if finished:
                break
            time.sleep(poll)
    finally:
        if proc.poll() is None:
            stop(proc)
    if proc.returncode:
        raise TrialFailed(
            f"trial {trial.number}: `{shlex.join(command)}` exited with {proc.returncode}; its output is above"
        )
    if not result.exists():
        raise TrialFailed(f"trial {trial.number}: `{shlex.join(command)}` succeeded but wrote no {result}")
    return float(json.loads(result.read_text())["val_acc"])


# ---------------------------------------------------------------------------- the search
def group_alive(leader: list) -> bool:
    """Whether the process group a trial's lifeline led still has a live process (the trial's, not a later one's)."""
    from reprovision.tools.lifeline import group_members

    pgid, started = leader
    if not group_members(pgid):
        return False
    now = process_started(pgid)
    # A leader that started later leads another group (Linux keeps a pgid from reuse while its group lives).
    return now is None or started is None or abs(now - started) < 1.0


def end_orphaned_trials(study: optuna.Study, storage: optuna.storages.BaseStorage, grace: float = 30.0) -> list[int]:
    """The RUNNING trials started on this machine by a tuner that is gone (kill -9, a crash): whatever of their
    process group still runs is ended (SIGTERM, then SIGKILL after `grace`), and they are marked failed now,
    so that a resumed search never runs beside a live orphan nor waits for a heartbeat to go stale. A RUNNING
    trial whose tuner lives (another worker here) or runs on another machine is left to it (and to Optuna's
    heartbeat). Returns the trial numbers failed."""
    failed = []
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        attrs = trial.user_attrs
        if attrs.get("host") != socket.gethostname() or "group" not in attrs:
            continue
        pid, started = attrs["tuner"]
        now = process_started(pid)
        if now is not None and (started is None or abs(now - started) < 1.0):
            continue  # its tuner still runs it
        pgid = attrs["group"][0]
        if group_alive(attrs["group"]):
            print(f"[tune] trial {trial.number}: its tuner is gone and process group {pgid} still runs: ending it")
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGTERM)
            deadline = time.monotonic() + grace
            while group_alive(attrs["group"]) and time.monotonic() < deadline:
                time.sleep(0.1)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
        # What Optuna's fail_stale_trials does to a trial whose heartbeat stopped, without waiting for it to.
        with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):  # another worker here was first
            storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)
            failed.append(trial.number)
    return failed


def trial_rows(study: optuna.Study, model: str) -> list[dict]:
    """One row per trial for trials.csv: what ran, how it ended, how far it got."""
    rows = []
    for t in study.trials:
        last_epoch = max(t.intermediate_values, default=None)
        rows.append(
            {
                "number": t.number,
                "exp_name": t.user_attrs.get("exp_name", ""),
                "state": t.state.name,
                "value": t.value
                if t.state == optuna.trial.TrialState.COMPLETE
                else "",  # Optuna gives pruned ones their last report
                "last_epoch": last_epoch if last_epoch is not None else "",
                "last_val_acc": t.intermediate_values[last_epoch] if last_epoch is not None else "",
                **{param_key(name, model): value for name, value in t.params.items()},
                "seconds": t.duration.total_seconds() if t.duration else "",
            }
        )
    return rows


def rdb_storage(url: str, attempts: int = 5) -> optuna.storages.RDBStorage:
    """Optuna's database storage at `url`. Workers started together on a new database race to create its
    tables, and all but one fail doing so: those try again, and find the tables made."""
    from sqlalchemy.exc import IntegrityError, OperationalError

    problem = track.database_problem(url)  # a typo, a missing driver or a closed port: one line, at once
    if problem:
        raise TuneError(
            f"--storage {track.shown_url(url)}: {problem}. Fix the URL or start the database; "
            f"without --storage the study lives in sqlite:///{STORAGE_FILE} here"
        )
    for attempt in range(attempts):
        try:
            return optuna.storages.RDBStorage(url, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S)
        except (IntegrityError, OperationalError):
            if attempt == attempts - 1:
                raise
            time.sleep(1.0 + attempt)
    raise AssertionError("unreachable")


def param_importances(study: optuna.Study, seed: int = 0) -> dict[str, float]:
    """Each searched parameter's share of the variance of the finished trials' validation accuracy
    (Optuna's fANOVA, seeded so that the same trials give the same shares); {} with fewer than 2 trials."""
    if len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))) < 2:
        return {}
    evaluator = optuna.importance.FanovaImportanceEvaluator(seed=seed)
    return dict(optuna.importance.get_param_importances(study, evaluator=evaluator))


def tune(
    model: str,
    trials: int,
    epochs: int | None = None,
    sets: Sequence[str] = (),
    timeout: float | None = None,
    name: str | None = None,
    seed: int = 0,
    command: CommandBuilder | None = None,
    poll: float = POLL_SECONDS,
    storage: str | None = None,
) -> optuna.Study:
    """Search SEARCH_SPACE for `model` with `trials` DVC experiments; logs the "tune" MLflow run and prints the best."""
    check_numbers(model, trials, epochs)
    fixed = [*sets, *([f"{model}.epochs={epochs}"] if epochs else [])]
    params = check_overrides(fixed, model)
    name = name or f"{model}-{datetime.now():%m%d-%H%M}"
    build = command or (lambda exp_name, overrides_: dvc_command(exp_name, overrides_, f"train-{model}"))
    storage = storage or f"sqlite:///{Path.cwd() / STORAGE_FILE}"
    study = open_study(name, storage, seed)
    import mlflow  # seconds of imports: after the arguments and the storage are known to work

    finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    remaining = trials - len(study.get_trials(deepcopy=False, states=finished))
    if len(study.trials):
        print(
            f"[tune {name}] resuming: {len(study.trials)} trials on record in {storage}, {max(remaining, 0)} to run",
            flush=True,
        )
    objective = trial_objective(name=name, model=model, fixed=fixed, build=build, poll=poll)

    def log_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if trial.state == optuna.trial.TrialState.COMPLETE:
            mlflow.log_metric("trial_value", trial.value, step=trial.number)

    run_params = {
        "model": model,
        "trials": trials,
        "epochs": epochs or "params.yaml",
        "sets": " ".join(sets),
        "storage": storage,
        "timeout": timeout or "none",
        "seed": seed,
        "sampler": "TPE",
        "pruner": "median(2 startup, 1 warmup)",
    }
    tags = {"study": name, "search_space": json.dumps(SEARCH_SPACE)}
    with track.stage_run("tune", model, run_params, tags, params) as run:
        # Each trial's `dvc exp run` groups its stage runs under a run that nests under this one.
        os.environ[track.PARENT_RUN_ENV] = run.info.run_id
        try:
            if remaining > 0:
                # The study's total, not this process's: other workers on the same storage count too.
                enough = optuna.study.MaxTrialsCallback(trials, states=finished)
                study.optimize(objective, n_trials=remaining, timeout=timeout, callbacks=[log_trial, enough])
        finally:  # a failed or interrupted search still leaves its trials on record
            os.environ.pop(track.PARENT_RUN_ENV, None)
            log_trials_table(study, model)
        complete = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
        if not complete:
            raise TuneError(
                f"no trial of study {name} finished (all pruned or stopped by --timeout {timeout}); raise --timeout"
            )
        best = study.best_trial
        reproduce = dvc_command(None, [*overrides(best.params, model), *fixed], f"train-{model}")
        importances = log_best(study, best, reproduce, model=model, seed=seed)
    print_summary(
        study, best, name=name, model=model, finished=len(complete), reproduce=reproduce, importances=importances
    )
    return study


def check_numbers(model: str, trials: int, epochs: int | None) -> None:
    """A TuneError for a --model, --trials or --epochs that cannot run, before anything starts."""
    if model not in CLASSIFIERS:
        raise TuneError(f"--model {model!r}: allowed: {', '.join(CLASSIFIERS)}")
    if trials < 1:
        raise TuneError(f"--trials {trials}: need at least 1")
    if epochs is not None and epochs < 1:
        raise TuneError(f"--epochs {epochs}: need at least 1 (and 2 or more for pruning to act)")


def open_study(name: str, storage: str, seed: int) -> optuna.Study:
    """The study `name` in `storage`, made or resumed, with its dead trials (a tuner killed here, or a machine
    lost elsewhere) marked failed."""
    database = rdb_storage(storage)
    study = optuna.create_study(
        study_name=name,
        storage=database,
        load_if_exists=True,
        direction="maximize",
        sampler=optuna.samplers.TPESampler(seed=seed),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1),
    )
    end_orphaned_trials(study, database)  # trials of a tuner here that died (kill -9), their processes ended
    with warnings.catch_warnings():  # "experimental" since Optuna 2.9; what its own heartbeat runs
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)  # trials of a process that died elsewhere (a lost machine)
    return study


def trial_objective(
    *, name: str, model: str, fixed: list[str], build: CommandBuilder, poll: float
) -> Callable[[optuna.Trial], float]:
    """Optuna's objective: one trial's settings drawn from SEARCH_SPACE, run as the DVC experiment
    tune-<name>-<number>; its value is the last validation accuracy."""

    def objective(trial: optuna.Trial) -> float:
        values = {n: trial.suggest_float(n, low, high, log=log) for n, (low, high, log) in SEARCH_SPACE.items()}
        exp_name = f"tune-{name}-{trial.number}"
        trial.set_user_attr("exp_name", exp_name)
        cmd = build(exp_name, [*overrides(values, model), *fixed])
        cmd = [executable(cmd[0]), *cmd[1:]]
        print(f"[tune {name}] trial {trial.number}: {shlex.join(cmd)}", flush=True)
        return run_trial(cmd, model, trial, poll)

    return objective


def log_trials_table(study: optuna.Study, model: str) -> None:
    """trials.csv (trial_rows) as an artifact of the active MLflow run; nothing while the study has no trial."""
    import mlflow

    with tempfile.TemporaryDirectory() as tmp:
        table = Path(tmp) / "trials.csv"
        rows = trial_rows(study, model)
        if rows:
            fields = list(dict.fromkeys(k for row in rows for k in row))  # a failed first trial may lack later params
            with table.open("w", newline="") as fh:
                writer = csv.DictWriter(fh, fieldnames=fields, restval="")
                writer.writeheader()
                writer.writerows(rows)
            mlflow.log_artifact(str(table))


def log_best(
    study: optuna.Study, best: optuna.trial.FrozenTrial, reproduce: list[str], *, model: str, seed: int
) -> dict[str, float]:
    """Logs the best trial's settings, value, experiment and command (`reproduce`) to the active MLflow run,
    then each parameter's importance, which it returns."""
    import mlflow

    mlflow.log_params({f"best.{param_key(k, model)}": v for k, v in best.params.items()})
    mlflow.log_metric("best_value", best.value)
    mlflow.set_tags({"best_exp_name": best.user_attrs["exp_name"], "best_command": shlex.join(reproduce)})
    importances = param_importances(study, seed)
    mlflow.log_metrics({f"importance.{param_key(k, model)}": v for k, v in importances.items()})
    return importances


def print_summary(
    study: optuna.Study,
    best: optuna.trial.FrozenTrial,
    *,
    name: str,
    model: str,
    finished: int,
    reproduce: list[str],
    importances: dict[str, float],
) -> None:
    """The search's outcome: trial counts, the best trial's settings, the importances and what to run next."""
    pruned = len(study.get_trials(states=(optuna.trial.TrialState.PRUNED,)))
    print(
        f"\n[tune {name}] {len(study.trials)} trials ({finished} finished, {pruned} pruned); "
        f"best: trial {best.number} ({best.user_attrs['exp_name']}), val_acc {best.value:.4f}"
    )
    for key, value in best.params.items():
        print(f"  {param_key(key, model)} = {value:.6g}")
    if importances:
        shown = ", ".join(f"{param_key(k, model)} {v:.2f}" for k, v in importances.items())
        print(f"parameter importances (Optuna's fANOVA over the finished trials): {shown}")
    print(f"reproduce:  {shlex.join(reproduce)}")
    print(f"its results: dvc exp apply {best.user_attrs['exp_name']}")
    print(f"all trials:  reprovision study --name 'tune {name}' --exp-names 'tune-{name}-*'")
