"""The library's layers: a package of src/reprovision imports only from itself and the layers beneath it,
so a newcomer can change a lower layer without reading the ones above. Read from the source (ast), lazy
and type-checking imports included, like the stage closures of tests/imports.py."""

from __future__ import annotations

import ast
from pathlib import Path

from imports import ROOT

LIBRARY = ROOT / "src" / "reprovision"

# Lowest first. Packages of one layer are peers: neither imports the other.
LAYERS = [
    {"config", "errors", "compat"},  # leaves: the params schema, the errors a stage ends on, the torchvision fix
    {"layout"},  # where every file goes (names the classifier families of config)
    {"data"},
    {"core"},  # what a stage stands on: its start and end, runtime, checkpoints, tracking, DDP, graphs
    {"models"},
    {"training", "measure"},
    {"publish"},
    {"tools"},  # the commands around the pipeline
]
RANK = {name: rank for rank, layer in enumerate(LAYERS) for name in layer}


def part_of(path: Path, library: Path) -> str:
    """The top-level module or package of the library that `path` belongs to ("core" for core/track.py)."""
    return path.relative_to(library).with_suffix("").parts[0]


def imported_parts(path: Path, library: Path) -> set[str]:
    """The library's top-level parts that `path` imports anywhere in its source."""
    package = ["reprovision", *path.relative_to(library).parent.parts]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[: len(package) - node.level + 1]) if node.level else ""
            module = ".".join(filter(None, [base, node.module]))
            modules = [f"{module}.{alias.name}" for alias in node.names]
        else:
            continue
        found.update(m.split(".")[1] for m in modules if m.startswith("reprovision."))
    return found


def upward_imports(library: Path) -> list[str]:
    """Each import of a part that is not beneath the importing file's part, as 'file imports part'."""
    wrong = []
    for path in sorted(library.rglob("*.py")):
        if path == library / "__init__.py":
            continue
        own = part_of(path, library)
        for other in sorted(imported_parts(path, library) - {own}):
            if RANK.get(other, len(LAYERS)) >= RANK[own]:
                wrong.append(f"{path.relative_to(library)} imports {other}")
    return wrong


def test_every_part_of_the_library_has_a_layer():
    parts = {part_of(p, LIBRARY) for p in LIBRARY.rglob("*.py") if p != LIBRARY / "__init__.py"}
    assert parts == set(RANK), "place a new module or package in LAYERS"


def test_no_import_runs_up_the_layers():
    wrong = upward_imports(LIBRARY)
    assert not wrong, "a layer imports only the layers beneath it (tests/test_layers.py LAYERS):\n" + "\n".join(wrong)


def test_the_check_sees_lazy_and_relative_imports(tmp_path):
    library = tmp_path / "reprovision"
    (library / "data").mkdir(parents=True)
    (library / "core").mkdir()
    (library / "__init__.py").write_text("")
    (library / "data" / "__init__.py").write_text("")
    (library / "core" / "__init__.py").write_text("")
    (library / "core" / "stage.py").write_text("from ..data import datasets\n")  # core above data: fine
    (library / "data" / "datasets.py").write_text("def f():\n    from reprovision.core import stage\n")
    (library / "data" / "augment.py").write_text("from ..core.stage import main\n")
    assert upward_imports(library) == ["data/augment.py imports core", "data/datasets.py imports core"]
