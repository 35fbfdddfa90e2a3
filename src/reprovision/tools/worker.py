"""`reprovision exp-worker`: one DVC experiment on any machine, shared back through git and the DVC remote.

DVC's queue runs experiments on one machine. To fan them out, each machine (a SLURM array task, a
Kubernetes Job pod, a teammate's workstation) runs one worker:

1. `git clone` the team's origin at a revision (the baseline) into a fresh folder;
2. `dvc exp run --pull -n NAME -S ...`: stages whose deps and params a teammate already ran are
   restored from the shared run-cache instead of computed; the rest run and log to the team's
   MLflow server (MLFLOW_TRACKING_URI, MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD);
3. `dvc exp push --run-cache origin NAME`: the experiment's git ref to the origin, its outputs
   and run-cache entries to the DVC remote.

Anyone then gets it with `dvc exp pull origin NAME`. Nothing here is specific to a scheduler: the
same command runs under `srun`, in a pod, or by hand (deploy/ has examples).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# What `dvc exp run -n` accepts as an experiment name (a git ref component): checked before cloning.
EXPERIMENT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class WorkerError(RuntimeError):
    """A step failed or the request is malformed: the message says which and what to do."""


def _tool(name: str) -> str:
    """A command of this environment (dvc, git): beside this Python first, then on PATH."""
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if found is None:
        raise WorkerError(f"`{name}` is not installed here; install the project (`pip install -e .[team]`) and git")
    return found


def _step(what: str, cmd: list[str], cwd: Path | None = None) -> None:
    print(f"[exp-worker] {what}: {' '.join(cmd)}", flush=True)
    code = subprocess.run(cmd, cwd=cwd).returncode
    if code != 0:
        raise WorkerError(f"{what} failed (exit {code}): {' '.join(cmd)}")


def run(
    origin: str, name: str, sets: list[str], targets: list[str], rev: str = "main", workdir: Path | None = None
) -> Path:
    """Clone `origin` at `rev`, run experiment `name` with `sets` (`-S` overrides) on `targets`
    (all stages when empty), push it and its run-cache back. Returns the clone's folder."""
    if not EXPERIMENT_NAME.match(name):
        raise WorkerError(
            f"experiment name {name!r}: use letters, digits, '.', '_' and '-', starting with a letter or digit"
        )
    bad = [s for s in sets if "=" not in s]
    if bad:
        raise WorkerError(f"-S {bad[0]!r}: expected KEY=VALUE, e.g. -S lr=4e-4")
    git, dvc = _tool("git"), _tool("dvc")
    if workdir is not None and workdir.exists() and any(workdir.iterdir()):
        raise WorkerError(f"{workdir} is not empty: give a new folder (the worker clones into it)")
    clone = workdir or Path(tempfile.mkdtemp(prefix=f"exp-worker-{name}-"))
    _step("clone the baseline", [git, "clone", "--quiet", "--branch", rev, origin, str(clone)])
    overrides = [arg for s in sets for arg in ("-S", s)]
    _step("run the experiment", [dvc, "exp", "run", "--pull", "-n", name, *overrides, *targets], cwd=clone)
    _step("share it", [dvc, "exp", "push", "--run-cache", "origin", name], cwd=clone)
    print(f"[exp-worker] {name} pushed to {origin}; get it with `dvc exp pull origin {name}`", flush=True)
    return clone
