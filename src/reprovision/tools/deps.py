"""Write each dvc.yaml stage's code deps from its import closure: `make deps`.

    python -m reprovision.tools.deps            # rewrite dvc.yaml's `.py` deps in place
    python -m reprovision.tools.deps --check    # exit 1, naming the stages, if any would change

A stage depends on its script and on every project file the script imports, transitively; imports
inside functions count (they run when their code path does). The closure is read from the source
(ast; nothing is executed). Each stage's `deps:` keeps its other entries (data, outputs of earlier
stages) after the code, in their order; nothing else in dvc.yaml changes. tests/test_stage_deps.py
checks that dvc.yaml is current.
"""

from __future__ import annotations

import argparse
import ast
import re
import shlex
import sys
from pathlib import Path

import yaml


class Closure:
    """The project files scripts of the checkout at `root` import: its stages/ folder, then src/."""

    def __init__(self, root: Path):
        self.root = root.resolve()
        self.search = [self.root / "stages", self.root / "src"]

    def module_files(self, dotted: str) -> list[Path]:
        """The files `import <dotted>` runs: each package __init__.py on the way, then the module; [] if not ours."""
        parts = dotted.split(".")
        for base in self.search:
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

    def package_of(self, path: Path) -> str:
        """The dotted package holding `path` ("reprovision.models" for src/reprovision/models/vit.py)."""
        for base in self.search:
            if path.is_relative_to(base):
                parts = path.relative_to(base).with_suffix("").parts
                return ".".join(parts if path.name == "__init__.py" else parts[:-1])
        raise ValueError(f"{path} is outside {self.search}")

    def imported_files(self, path: Path) -> set[Path]:
        found: set[Path] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    found.update(self.module_files(alias.name))
            elif isinstance(node, ast.ImportFrom):
                module = node.module
                if node.level:
                    package = self.package_of(path).split(".")
                    base = ".".join(package[: len(package) - node.level + 1])
                    module = f"{base}.{node.module}" if node.module else base
                for alias in node.names:  # `from package import submodule` runs the submodule too
                    found.update(self.module_files(f"{module}.{alias.name}"))
        return found

    def of(self, script: Path) -> set[Path]:
        """`script` and every project file it imports, transitively."""
        todo, seen = [script.resolve()], set()
        while todo:
            path = todo.pop()
            if path not in seen:
                seen.add(path)
                todo.extend(self.imported_files(path) - seen)
        return seen


def script_of(cmd: str) -> str:
    return next(word for word in shlex.split(cmd) if word.endswith(".py"))


def code_deps(root: Path, cmd: str) -> list[str]:
    """A stage's code deps in dvc.yaml's order: its script, the other stage files, then the library, sorted."""
    script = script_of(cmd)
    files = {str(p.relative_to(root.resolve())) for p in Closure(root).of(root / script)} - {script}
    return [script, *sorted(f for f in files if f.startswith("stages/")), *sorted(f for f in files if not f.startswith("stages/"))]


STAGE = re.compile(r"^  ([A-Za-z0-9_-]+):\s*$")
ITEM = re.compile(r"^      - (\S+)\s*$")


def rewrite(root: Path, text: str) -> tuple[str, list[str]]:
    """dvc.yaml's text with every stage's `.py` deps replaced by its closure; and the stages that changed."""
    stages = yaml.safe_load(text)["stages"]
    out, changed, stage, lines = [], [], None, text.splitlines(keepends=True)
    i = 0
    while i < len(lines):
        line = lines[i]
        match = STAGE.match(line)
        if match:
            stage = match.group(1)
        out.append(line)
        i += 1
        if line.rstrip() == "    deps:" and stage in stages:
            block = []
            while i < len(lines) and ITEM.match(lines[i]):
                block.append(ITEM.match(lines[i]).group(1))
                i += 1
            code = code_deps(root, stages[stage]["cmd"])
            new = code + [dep for dep in block if not dep.endswith(".py")]
            if new != block:
                changed.append(stage)
            out.extend(f"      - {dep}\n" for dep in new)
    return "".join(out), changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if dvc.yaml is not current")
    parser.add_argument("--root", type=Path, default=Path.cwd(), help="the checkout (default: here)")
    args = parser.parse_args(argv)
    path = args.root / "dvc.yaml"
    if not path.is_file():
        print(f"deps: no dvc.yaml in {args.root}: run it from the repository root, or pass --root", file=sys.stderr)
        return 2
    text, changed = rewrite(args.root, path.read_text())
    if args.check:
        print(f"deps: not current for {', '.join(changed)}: run `make deps`" if changed else "deps: dvc.yaml is current")
        return 1 if changed else 0
    if changed:
        path.write_text(text)
    print(f"deps: rewrote the code deps of {', '.join(changed)}" if changed else "deps: dvc.yaml was already current")
    return 0


if __name__ == "__main__":
    sys.exit(main())
