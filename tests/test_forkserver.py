"""The tests' fork server (tests/forkserver.py) starts a stage, or `dvc`, as a fresh interpreter would: argv,
working directory, environment and PYTHONPATH, `__main__`, standard streams, exit status and signals. (That a
forked stage computes the same bits as a fresh one, test_pipeline_e2e.py checks on the first run of the
DAG: test_fresh_interpreters_compute_what_the_forked_stages_did.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import DVC, dvc, fork_server, forked_python, pipeline_env, sh

PROBE = """
import json, os, sys, time
print(json.dumps({"argv": sys.argv, "cwd": os.getcwd(), "path0": sys.path[0], "path1": sys.path[1],
                  "file": __file__, "name": __name__, "flag": os.environ.get("PROBE_FLAG"),
                  "stdin": sys.stdin.read(), "pid": os.getpid(), "ppid": os.getppid()}))
sys.stdout.flush()
if sys.argv[1] == "sleep":
    time.sleep(60)
sys.exit(int(sys.argv[1]) if sys.argv[1].isdigit() else "a message")
"""


def run(repo: Path, *args: str, stdin: str = "", forked: bool = True) -> subprocess.CompletedProcess:
    env = pipeline_env(forked=forked, PROBE_FLAG="on", PYTHONPATH=str(repo / "lib"))
    return subprocess.run(
        ["python", "stages/probe.py", *args], cwd=repo, env=env, input=stdin, capture_output=True, text=True, timeout=60
    )


def test_a_forked_stage_sees_what_a_fresh_interpreter_sees(tmp_path):
    (tmp_path / "stages").mkdir()
    (tmp_path / "stages" / "probe.py").write_text(PROBE)
    forked, fresh = (run(tmp_path, "3", stdin="in", forked=f) for f in (True, False))
    assert forked.returncode == fresh.returncode == 3
    seen = [json.loads(r.stdout) for r in (forked, fresh)]
    assert seen[0]["ppid"] != os.getpid() and seen[1]["ppid"] == os.getpid()  # forked by the server, or not
    for s in seen:
        del s["pid"], s["ppid"]
    assert (
        seen[0]
        == seen[1]
        == {
            "argv": ["stages/probe.py", "3"],
            "cwd": str(tmp_path),
            "path0": str(tmp_path / "stages"),
            "path1": str(tmp_path / "lib"),
            "file": str(tmp_path / "stages" / "probe.py"),
            "name": "__main__",
            "flag": "on",
            "stdin": "in",
        }
    )
    message = run(tmp_path, "text")
    assert message.returncode == 1 and message.stderr.strip() == "a message"


def test_forked_python_runs_c_and_m_as_a_fresh_interpreter(tmp_path):
    """`forked-python -c CODE` and `-m MODULE`: the argv, sys.path, `__main__`, environment, streams and exit status
    of `python -c` and `python -m`."""
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "probe_module.py").write_text(PROBE)
    env = {**os.environ, "PROBE_FLAG": "on", "PYTHONPATH": str(tmp_path / "lib")}
    for args, first in ((["-c", PROBE.replace("__file__", "None")], ""), (["-m", "probe_module"], str(tmp_path))):
        forked, fresh = (
            subprocess.run([python, *args, "4"], cwd=tmp_path, env=env, input="in", capture_output=True, text=True)
            for python in (forked_python(), sys.executable)
        )
        assert forked.returncode == fresh.returncode == 4, forked.stderr
        seen = [json.loads(r.stdout) for r in (forked, fresh)]
        assert seen[0]["ppid"] != os.getpid() and seen[1]["ppid"] == os.getpid()  # forked by the server, or not
        for s in seen:
            del s["pid"], s["ppid"]
        assert seen[0] == seen[1], args[0]
        assert seen[0]["path0"] == first and seen[0]["path1"] == str(tmp_path / "lib") and seen[0]["name"] == "__main__"
        assert seen[0]["argv"][1:] == ["4"] and seen[0]["stdin"] == "in" and seen[0]["flag"] == "on"


def test_signals_reach_the_forked_stage_and_its_end_is_the_clients(tmp_path):
    (tmp_path / "stages").mkdir()
    (tmp_path / "stages" / "probe.py").write_text(PROBE)
    env = pipeline_env(PROBE_FLAG="on")
    client = subprocess.Popen(
        ["python", "stages/probe.py", "sleep"],
        cwd=tmp_path,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        text=True,
    )
    stage = json.loads(client.stdout.readline())["pid"]
    assert stage != client.pid
    client.send_signal(signal.SIGTERM)
    assert client.wait(timeout=30) == -signal.SIGTERM
    deadline = time.monotonic() + 10
    while Path(f"/proc/{stage}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not Path(f"/proc/{stage}").exists()


def test_dvc_forked_answers_as_the_real_one(tmp_path):
    sh(["git", "init", "-q"], tmp_path)
    dvc(tmp_path, "init", "-q", env=pipeline_env(forked=False))
    log = fork_server() / "server.log"  # a line per process the server forked, with its folder: every worker's
    logged = len(log.read_text())
    for args in (["status"], ["exp", "run", "--no-such-option"], ["params", "diff", "--json"]):
        forked, fresh = (dvc(tmp_path, *args, env=pipeline_env(forked=f), check=False) for f in (True, False))
        assert (forked.returncode, forked.stdout, forked.stderr) == (fresh.returncode, fresh.stdout, fresh.stderr)
    forks = log.read_text()[logged:]
    assert forks.count(f"{tmp_path}: {DVC} status\n") == 1  # forked, not exec'd
    assert forks.count(f"{tmp_path}: {DVC} exp run --no-such-option\n") == 1
