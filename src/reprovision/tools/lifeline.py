"""A tune trial's lifeline: `python -m reprovision.tools.lifeline <tuner pid> <command...>` runs the command
and takes its whole process group down with the tuner.

`reprovision tune` starts each trial (`dvc exp run ...`, which starts the stage, which may start torchrun's
workers) through this process, in a session and process group of its own whose id is this pid. While the
tuner lives, it stops the group itself (a prune, an error, Ctrl-C or SIGTERM: tune.stop), and this process
waits for the command as if it were not there. When the tuner dies without a word (kill -9, a crash, the
OOM killer), Linux's parent-death signal (prctl PR_SET_PDEATHSIG, set below) tells this process at once; it
then terminates the group: SIGTERM, which a stage answers by ending its MLflow run KILLED with its checkpoint
kept, and SIGKILL to whatever is left after GRACE_S. Where there is no such signal (macOS), it checks its
parent every POLL_S instead. Either way, once the command ends, what it left in the group gets GRACE_S to
finish, then SIGKILL: the lifeline ends last, so whoever waits for it waits for the whole trial.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time

GRACE_S = 10.0  # a stage's way out (its MLflow run ended KILLED) takes a few seconds
POLL_S = 1.0  # without a parent-death signal: how often the parent is checked
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


class TunerGone(Exception):
    """The tuner that started this trial died: the trial goes too."""


def parent_death_signal(signum: int) -> bool:
    """Have Linux send `signum` to this process when its parent exits; False where that is not available."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def group_members(pgid: int) -> list[int]:
    """The live processes of process group `pgid` (a zombie, dead but not yet reaped, runs nothing: left out)."""
    import psutil

    found = []
    for pid in psutil.pids():
        with contextlib.suppress(OSError, psutil.Error):
            if os.getpgid(pid) == pgid and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                found.append(pid)
    return found


def others_in_group() -> list[int]:
    """The processes of this process group but this one (the command's, and what they started)."""
    return [pid for pid in group_members(os.getpid()) if pid != os.getpid()]


def drain(child: subprocess.Popen | None, grace: float = GRACE_S) -> None:
    """Give the command and what it left in the group `grace` seconds to end, then SIGKILL what remains."""
    deadline = time.monotonic() + grace
    if child is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(timeout=grace)
    while (rest := others_in_group()) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in rest:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    if child is not None and child.poll() is None:
        child.wait()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    tuner, command = int(argv[0]), argv[1:]

    def on_term(signum, frame):
        if os.getppid() != tuner:
            raise TunerGone
        # Otherwise the tuner signalled the whole group (tune.stop): the command has it too; wait for it.

    signal.signal(signal.SIGTERM, on_term)
    child = None
    try:
        told = parent_death_signal(signal.SIGTERM)
        if os.getppid() != tuner:  # it died before the signal was set: start nothing
            return 1
        child = subprocess.Popen(command)  # this process group: the tuner's stop reaches it
        while True:
            try:
                code = child.wait(timeout=None if told else POLL_S)
                break
            except subprocess.TimeoutExpired:
                if os.getppid() != tuner:
                    raise TunerGone from None
    except TunerGone:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        os.killpg(0, signal.SIGTERM)
        code = 128 + signal.SIGTERM
    except FileNotFoundError as err:
        print(f"lifeline: {command[0]}: {err.strerror}", file=sys.stderr)
        return 127
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # from here on, bounded by GRACE_S whatever happens
    drain(child)
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main())
