"""How `make test` hands out its files: the order of tests/conftest.py's LONGEST_FILES, measured.

pytest-xdist's loadfile scheduling gives a worker its next file once 2 or fewer of its tests are pending, in
collection order. From one `pytest -v --durations=0` log of the suite (per-test seconds, which worker ran
what), this replays that schedule for the current LONGEST_FILES and for the files longest first, and prints
when each worker ends:

    .venv/bin/python -m pytest -v -n 3 --dist loadfile --no-loadscope-reorder --durations=0 > suite.log
    python benchmarks/suite_schedule.py suite.log
"""

from __future__ import annotations

import argparse
import ast
import re
from collections import defaultdict
from pathlib import Path

CONFTEST = Path(__file__).resolve().parents[1] / "tests" / "conftest.py"


def longest_files() -> list[str]:
    """tests/conftest.py's LONGEST_FILES, read from its source (importing it would import the suite's fixtures)."""
    for node in ast.parse(CONFTEST.read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "LONGEST_FILES" for t in node.targets):
            return ast.literal_eval(node.value)
    raise SystemExit(f"no LONGEST_FILES in {CONFTEST}")


def per_file_seconds(log: str) -> dict[str, list[float]]:
    """Each test file's tests in the order they ran, with their seconds (setup, call and teardown)."""
    seconds: dict[str, float] = defaultdict(float)
    for m in re.finditer(r"^([\d.]+)s (?:call|setup|teardown)\s+(tests/\S+)", log, re.M):
        seconds[m.group(2)] += float(m.group(1))
    files: dict[str, list[float]] = {}
    for m in re.finditer(r"^\[gw\d+\] \[\s*\d+%\] \w+ (tests/(\S+?)::\S+)", log, re.M):
        files.setdefault(m.group(2).removeprefix("tests/"), []).append(seconds.get(m.group(1), 0.0))
    return files


def worker_ends(files: dict[str, list[float]], longest: list[str], workers: int = 3) -> list[float]:
    """When each worker ends, the `longest` files handed out first and the rest in name order."""
    queue = [list(files[f]) for f in [*(f for f in longest if f in files), *sorted(set(files) - set(longest))]]
    pending: list[list[float]] = [[] for _ in range(workers)]
    ends = [0.0] * workers
    for _ in range(2):  # xdist's start: a file each, then a second where 2 or fewer tests are pending
        for w in range(workers):
            if queue and len(pending[w]) <= 2:
                pending[w] += queue.pop(0)
    while any(pending):
        w = min((i for i in range(workers) if pending[i]), key=lambda i: ends[i])
        ends[w] += pending[w].pop(0)
        if queue and len(pending[w]) <= 2:
            pending[w] += queue.pop(0)
    return ends


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("log", type=Path, help="a `pytest -v -n 3 --durations=0` log of the whole suite")
    parser.add_argument("--workers", type=int, default=3)
    args = parser.parse_args()
    current = longest_files()
    files = per_file_seconds(args.log.read_text())
    longest_first = sorted(files, key=lambda f: -sum(files[f]))[: len(current) + 1]
    print(f"{sum(map(sum, files.values())) / args.workers:.0f} s per worker if perfectly balanced")
    for name, order in (("LONGEST_FILES", current), ("longest first", longest_first)):
        ends = worker_ends(files, order, args.workers)
        print(f"{name}: workers end at {', '.join(f'{e:.0f}' for e in ends)} s: {order}")


if __name__ == "__main__":
    main()
