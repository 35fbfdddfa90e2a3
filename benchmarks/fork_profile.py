"""Where the suite's forked CPU goes: the fork server's log (tests/forkserver.py), summed per command and per test.

The server logs each process it forks (`forked PID in FOLDER: ARGV`) and its end (`ended PID with STATUS after
WALL s, CPU s of CPU`). `make test` deletes the log with the server; keep it with:

    REPROVISION_TESTS_FORK_LOG=fork.log make test
    python benchmarks/fork_profile.py fork.log
"""

from __future__ import annotations

import argparse
import re
from collections import defaultdict
from pathlib import Path

FORKED = re.compile(r"^forked (\d+) in (\S+): (.*)$", re.M)
ENDED = re.compile(r"^ended (\d+) with (-?\d+) after ([\d.]+) s, ([\d.]+) s of CPU$", re.M)
TEST_FOLDER = re.compile(r"/pytest-\d+/popen-gw\d+/([^/]+?)(?:\d+|current)?(?:/|$)")  # pytest's tmp_path per test


def command(argv: str) -> str:
    """A stage's script (`stages/train_cnn.py`), or `dvc` and its subcommand (`dvc exp run`)."""
    words = argv.split()
    if Path(words[0]).name == "dvc":
        return " ".join(["dvc", *[w for w in words[1:3] if not w.startswith("-")]])
    return words[0]


def per_key(log: str) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """CPU seconds of every ended fork, by command and by the test folder it ran in (its pytest tmp_path)."""
    forks = {m.group(1): (m.group(2), m.group(3)) for m in FORKED.finditer(log)}
    by_command: dict[str, list[float]] = defaultdict(list)
    by_test: dict[str, list[float]] = defaultdict(list)
    for m in ENDED.finditer(log):
        folder, argv = forks[m.group(1)]
        cpu = float(m.group(4))
        by_command[command(argv)].append(cpu)
        test = TEST_FOLDER.search(folder + "/")
        by_test[test.group(1) if test else folder].append(cpu)
    return by_command, by_test


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("log", type=Path, help="the fork server's log (REPROVISION_TESTS_FORK_LOG)")
    parser.add_argument("--top", type=int, default=20)
    args = parser.parse_args()
    by_command, by_test = per_key(args.log.read_text())
    print(f"{sum(map(sum, by_command.values())):.1f} s of CPU in {sum(map(len, by_command.values()))} forks")
    for title, table in (("by command", by_command), ("by test folder", by_test)):
        print(f"\n{title}: CPU s, forks")
        for key, cpus in sorted(table.items(), key=lambda item: -sum(item[1]))[: args.top]:
            print(f"{sum(cpus):8.1f} {len(cpus):5d}  {key}")


if __name__ == "__main__":
    main()
