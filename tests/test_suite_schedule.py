"""The suite's own profiling tools: benchmarks/suite_schedule.py replays pytest-xdist's loadfile schedule from a
suite's log; benchmarks/fork_profile.py sums the fork server's log."""

from __future__ import annotations

import sys
from pathlib import Path

from conftest import LONGEST_FILES

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import fork_profile  # noqa: E402
import suite_schedule  # noqa: E402

LOG = """
[gw0] [ 10%] PASSED tests/test_a.py::test_1
[gw0] [ 20%] PASSED tests/test_a.py::test_2
[gw1] [ 30%] PASSED tests/test_b.py::test_1
[gw1] [ 40%] PASSED tests/test_c.py::test_1
============================= slowest durations ==============================
30.00s call     tests/test_a.py::test_1
5.00s setup    tests/test_a.py::test_1
10.00s call     tests/test_a.py::test_2
20.00s call     tests/test_b.py::test_1
1.00s teardown tests/test_c.py::test_1
"""


def test_the_schedule_is_replayed_from_the_log():
    files = suite_schedule.per_file_seconds(LOG)
    assert files == {"test_a.py": [35.0, 10.0], "test_b.py": [20.0], "test_c.py": [1.0]}
    # Two workers: a.py and b.py start at once, and a.py's worker, with only 2 tests pending, takes c.py at
    # the start too (xdist hands a file to a worker with 2 or fewer pending), though b.py's is free at 20 s.
    assert suite_schedule.worker_ends(files, ["test_a.py", "test_b.py"], workers=2) == [46.0, 20.0]
    # c.py first: its worker takes b.py at the start as well.
    assert suite_schedule.worker_ends(files, ["test_c.py", "test_a.py"], workers=2) == [21.0, 45.0]


def test_it_reads_the_suites_order_from_conftest():
    assert suite_schedule.longest_files() == LONGEST_FILES


FORK_LOG = """forked 11 in /tmp/pytest-of-u/pytest-7/popen-gw0/repo0: stages/train_cnn.py
forked 12 in /tmp/pytest-of-u/pytest-7/popen-gw1/test_a_new_family_is_the_readm0/repo: /venv/bin/dvc exp run -S lr=1
ended 11 with 0 after 3.0 s, 2.5 s of CPU
forked 13 in /tmp/pytest-of-u/pytest-7/popen-gw0/repo0: stages/train_cnn.py
ended 13 with 1 after 1.0 s, 0.5 s of CPU
ended 12 with 0 after 9.0 s, 4.0 s of CPU
"""


def test_the_fork_log_is_summed_by_command_and_by_test_folder():
    by_command, by_test = fork_profile.per_key(FORK_LOG)
    assert by_command == {"stages/train_cnn.py": [2.5, 0.5], "dvc exp run": [4.0]}
    assert by_test == {"repo": [2.5, 0.5], "test_a_new_family_is_the_readm": [4.0]}
