"""The project files a stage script runs, computed from the source: reprovision.tools.deps, which
`make deps` uses to write dvc.yaml, seen from the tests."""

from __future__ import annotations

from pathlib import Path

from reprovision.tools.deps import Closure

ROOT = Path(__file__).resolve().parents[1]


def closure(script: Path, root: Path = ROOT) -> set[Path]:
    """`script` and every project file it imports, transitively, within the checkout at `root`."""
    return Closure(root).of(script)
