"""How every stage script ends, and the writers of its JSON and CSV outputs.

`main()` turns the errors a user can fix into one line on stderr and exit status 2, without a
traceback, and so does it for Ctrl-C / SIGTERM (exit status 130); under DVC the line ends with the
`dvc checkout` that restores the outputs DVC removed before the stage ran. What a computing stage does
first is `start()` of core/context.py.

No MLflow and no torch here: check-params and fetch-data end through `main()` too, so editing the
tracking code re-runs neither (their deps in dvc.yaml), and check-params starts without torch's ~1.3 s.
"""

from __future__ import annotations

import csv
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from reprovision.config import ConfigError
from reprovision.errors import DataError, Terminated, TrackingError

# The stage run of this process (track_run.stage_run fills it): what a stopped stage's message says is safe.
attempt: dict[str, Any] = {}


def resume_hint() -> str:
    """What is safe and the command that continues, for the one-line error of a stopped stage."""
    command = "`dvc exp run` again (same -S options)" if os.environ.get("DVC_EXP_NAME") else "`dvc repro`"
    checkpoint = attempt.get("checkpoint")
    if checkpoint is not None and checkpoint.exists():
        return f"Training so far is safe in the per-epoch checkpoint {checkpoint}; {command} continues from it."
    return f"{command} runs the stage again."


def restore_hint() -> str:
    """Under `dvc repro` / `dvc exp run` in the workspace, DVC removed the stage's outputs before running it (all
    but check-params', kept with `persist`): what puts the last ones back. Empty elsewhere (run by hand, or in a
    queued experiment's temporary copy under .dvc/tmp/exps, which leaves the workspace alone)."""
    stage = os.environ.get("DVC_STAGE", "")
    if not stage or stage == "check-params" or "/.dvc/tmp/exps/" in f"{Path.cwd().resolve().as_posix()}/":
        return ""
    return f" DVC removed {stage}'s outputs before running it: `dvc checkout {stage}` restores the last ones."


def main(stage: Callable[..., None], *args) -> None:
    """Run a stage function and end the process; errors a user can fix end with their message alone
    (exit 2; Ctrl-C / SIGTERM 130), not a traceback. Any other error propagates as usual (exit 1)."""
    code = 0
    try:
        stage(*args)
    except (ConfigError, DataError, TrackingError) as err:
        print(f"error: {err}{restore_hint()}", file=sys.stderr)
        code = 2
    except RuntimeError as err:  # an op with no deterministic kernel: one line naming it and the opt-out
        from reprovision.core.runtime import nondeterministic_op

        explained = nondeterministic_op(err)
        if explained is None:
            raise
        print(f"error: {explained}{restore_hint()}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt as err:  # its MLflow run is already ended KILLED (track_run.stage_run)
        how = "SIGTERM" if isinstance(err, Terminated) else "Ctrl-C (SIGINT)"
        print(f"error: interrupted by {how}. {resume_hint()}{restore_hint()}", file=sys.stderr)
        code = 130
    # Every output is written and closed and the MLflow run ended by now. Python's own teardown of
    # the torch and MLflow modules would take another 1.5-2.6 s per stage on this machine (measured:
    # ~20 s of a pipeline run, and of every stage a test runs), so the process ends here.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def write_json(path: Path, obj, sort_keys: bool = True) -> None:
    """`sort_keys=False` keeps the caller's order: what `dvc exp show` shows a metrics file's columns in."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=sort_keys) + "\n")


def write_csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
