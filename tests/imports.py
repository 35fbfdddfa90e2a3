"""The project files a stage script runs, computed from the source (ast; nothing is executed).

Every import statement of every file reached counts, those inside functions too: a lazy import
still runs when its code path does, so the stage's result depends on that file.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def search_path(root: Path) -> list[Path]:
    """The stage scripts' sys.path within a checkout: their own folder, then src/."""
    return [root / "stages", root / "src"]


SEARCH = search_path(ROOT)


def module_files(dotted: str) -> list[Path]:
    """The files `import <dotted>` runs: every package __init__.py on the way, then the module. [] if not ours."""
    for base in SEARCH:
        parts = dotted.split(".")
        if not ((base / parts[0]).is_dir() or (base / f"{parts[0]}.py").is_file()):
            continue
        files = []
        for i in range(1, len(parts) + 1):
            path = base.joinpath(*parts[:i])
            if (path / "__init__.py").is_file():
                files.append(path / "__init__.py")
            elif path.with_suffix(".py").is_file():
                files.append(path.with_suffix(".py"))
            else:
                break
        return files
    return []


def package_of(path: Path) -> str:
    """Dotted package that holds `path` ("reprovision.models" for src/reprovision/models/vit.py)."""
    for base in SEARCH:
        if path.is_relative_to(base):
            parts = path.relative_to(base).with_suffix("").parts
            return ".".join(parts if path.name == "__init__.py" else parts[:-1])
    raise ValueError(f"{path} is outside {SEARCH}")


def imported_files(path: Path) -> set[Path]:
    found: set[Path] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.update(module_files(alias.name))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                package = package_of(path).split(".")
                base = ".".join(package[: len(package) - node.level + 1])
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module
            for alias in node.names:  # `from package import submodule` runs the submodule too
                found.update(module_files(f"{module}.{alias.name}"))
    return found


def closure(script: Path, root: Path = ROOT) -> set[Path]:
    """`script` and every project file it imports, transitively, within the checkout at `root`."""
    global SEARCH
    saved, SEARCH = SEARCH, search_path(root.resolve())
    try:
        todo, seen = [script.resolve()], set()
        while todo:
            path = todo.pop()
            if path in seen:
                continue
            seen.add(path)
            todo.extend(imported_files(path) - seen)
        return seen
    finally:
        SEARCH = saved
