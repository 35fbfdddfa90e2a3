"""Write dvc.yaml's generated parts: each classifier family's entries, and every stage's code deps: `make deps`.

    python -m reprovision.tools.deps            # rewrite dvc.yaml in place
    python -m reprovision.tools.deps --check    # exit 1, naming what would change

Families: the classifier families are config.CLASSIFIERS of this checkout. The first family that
dvc.yaml already has (a `train-<name>` stage running stages/train_classifier.py) is the pattern: its
stage, its plot entries and each line naming it (evaluate's and report's deps, params, outs; the
plots' files) are written once per family, in CLASSIFIERS' order, in place of every family's.

Code deps: a stage depends on its script and on every project file the script imports, transitively;
imports inside functions count (they run when their code path does). The closure is read from the
source (ast; nothing is executed); models/classifiers.py imports the module of each family by name,
so those count as its imports. Each stage's `deps:` keeps its other entries (data, outputs of earlier
stages) first, in their order, then `CODE_COMMENT` and the code. tests/test_stage_deps.py checks that
dvc.yaml is current.
"""

from __future__ import annotations

import argparse
import ast
import functools
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import yaml


class Closure:
    """The project files scripts of the checkout at `root` import: its stages/ folder, then src/."""

    def __init__(self, root: Path):
        self.root = root.resolve()
        self.search = [self.root / "stages", self.root / "src"]
        self.registry = self.root / FAMILY_REGISTRY

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
        if path == self.registry:  # imports models/<name>.py of every family, by name
            for name in classifier_families(self.root):
                found.update(self.module_files(f"reprovision.models.{name}"))
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


FAMILY_REGISTRY = "src/reprovision/models/classifiers.py"
FAMILY_STAGE_SCRIPT = "stages/train_classifier.py"  # what every `train-<family>` stage runs


@functools.cache
def classifier_families(root: Path) -> list[str]:
    """config.CLASSIFIERS of the checkout at `root` (read by its own code, in a process of its own)."""
    code = "import json; from reprovision.config import CLASSIFIERS; print(json.dumps(CLASSIFIERS))"
    env = {**os.environ, "PYTHONPATH": str(root / "src")}
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"deps: {root / 'src/reprovision/config.py'} does not import:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout)


def script_of(cmd: str) -> str:
    return next(word for word in shlex.split(cmd) if word.endswith(".py"))


def code_deps(root: Path, cmd: str) -> list[str]:
    """A stage's code deps in dvc.yaml's order: its script, the other stage files, then the library, sorted."""
    script = script_of(cmd)
    files = {str(p.relative_to(root.resolve())) for p in Closure(root).of(root / script)} - {script}
    return [
        script,
        *sorted(f for f in files if f.startswith("stages/")),
        *sorted(f for f in files if not f.startswith("stages/")),
    ]


def token(name: str) -> re.Pattern:
    """`name` as a word of dvc.yaml: models/vit, train-vit, train_vit.py, metrics/eval/vit_confusion.json."""
    return re.compile(rf"(?<![A-Za-z0-9]){re.escape(name)}(?![A-Za-z0-9])")


def families_in(line: str, families: list[str]) -> list[str]:
    return [name for name in families if token(name).search(line)]


BLOCK = re.compile(r"^  (- )?\S")  # a stage under `stages:`, an entry under `plots:`


def blocks(lines: list[str]) -> list[list[str]]:
    """dvc.yaml's lines cut before each stage and plot entry (and before each top-level key)."""
    out: list[list[str]] = [[]]
    for line in lines:
        if BLOCK.match(line) or (line[:1].strip() and not line.startswith("#")):
            out.append([])
        out[-1].append(line)
    return [block for block in out if block]


def write_families(root: Path, text: str) -> str:
    """dvc.yaml's text with one set of entries per classifier family, copied from the pattern family's.

    A block (stage or plot entry) whose first line names a family is that family's: each run of
    such blocks becomes one per family. Elsewhere, each run of lines that differ only in the family
    they name becomes one line per family. Code deps (`.py`) and comments are left to the code pass."""
    stages = yaml.safe_load(text)["stages"]
    present = [
        n[len("train-") :]
        for n, s in stages.items()
        if n.startswith("train-") and FAMILY_STAGE_SCRIPT in s.get("deps", [])
    ]
    if not present:
        raise SystemExit(
            f"deps: dvc.yaml has no train-<family> stage (one running {FAMILY_STAGE_SCRIPT}) to copy: "
            "restore one from git"
        )
    wanted = classifier_families(root)
    for name in wanted:
        if name not in present and token(name).search(text):
            line = next(line for line in text.splitlines() if token(name).search(line))
            raise SystemExit(
                f"deps: the family name {name!r} already means something else in dvc.yaml "
                f"({line.strip()!r}): rename its params.yaml section"
            )
    pattern = present[0]

    def as_pattern(piece: str, name: str) -> str:
        return token(name).sub(pattern, piece)

    def per_family(piece: str) -> list[str]:
        return [token(pattern).sub(name, piece) for name in wanted]

    out: list[str] = []
    parts = blocks(text.splitlines(keepends=True))
    i = 0
    while i < len(parts):
        owner = families_in(parts[i][0], present)
        if len(owner) == 1:  # a run of family blocks: the pattern family's, written once per family
            run = []
            while i < len(parts) and len(families_in(parts[i][0], present)) == 1:
                run.append(parts[i])
                i += 1
            owners = [families_in(block[0], present)[0] for block in run]
            if pattern in owners:
                template = run[owners.index(pattern)]
            else:
                template = [as_pattern(line, owners[0]) for line in run[0]]
            for name in wanted:
                out.extend(token(pattern).sub(name, line) for line in template)
            continue
        out.extend(lines_per_family(parts[i], present, as_pattern, per_family))
        i += 1
    return "".join(out)


def lines_per_family(lines: list[str], present: list[str], as_pattern, per_family) -> list[str]:
    out, i = [], 0
    while i < len(lines):
        line = lines[i]
        named = families_in(line, present)
        if len(named) != 1 or line.lstrip().startswith("#") or line.rstrip().endswith(".py"):
            out.append(line)
            i += 1
            continue
        shape = as_pattern(line, named[0])
        while (
            i < len(lines)
            and len(named := families_in(lines[i], present)) == 1
            and as_pattern(lines[i], named[0]) == shape
        ):
            i += 1
        out.extend(per_family(shape))
    return out


STAGE = re.compile(r"^  ([A-Za-z0-9_-]+):\s*$")
ITEM = re.compile(r"^      - (\S+)\s*$")
# The line between a stage's data deps, which people write, and its code deps, which this module does.
CODE_COMMENT = "      # code: written by make deps (python -m reprovision.tools.deps)\n"


def rewrite(root: Path, text: str) -> tuple[str, list[str]]:
    """dvc.yaml's text with the families' entries written and every stage's `.py` deps replaced by
    its closure; and what changed (stage names, "plots")."""
    new = write_code_deps(root, write_families(root, text))
    before, after = yaml.safe_load(text), yaml.safe_load(new)
    changed = [
        name
        for name in {**before["stages"], **after["stages"]}
        if before["stages"].get(name) != after["stages"].get(name)
    ]
    changed += ["plots"] if before.get("plots") != after.get("plots") else []
    return (new, changed or ["its layout"]) if new != text else (text, [])


def write_code_deps(root: Path, text: str) -> str:
    """dvc.yaml's text with every stage's `.py` deps replaced by its closure: its other deps first,
    then CODE_COMMENT, then the code."""
    stages = yaml.safe_load(text)["stages"]
    out, stage, lines = [], None, text.splitlines(keepends=True)
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
            while i < len(lines) and (ITEM.match(lines[i]) or lines[i].strip() == CODE_COMMENT.strip()):
                if ITEM.match(lines[i]):
                    block.append(ITEM.match(lines[i]).group(1))
                i += 1
            out.extend(f"      - {dep}\n" for dep in block if not dep.endswith(".py"))
            out.append(CODE_COMMENT)
            out.extend(f"      - {dep}\n" for dep in code_deps(root, stages[stage]["cmd"]))
    return "".join(out)


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
        print(
            f"deps: not current for {', '.join(changed)}: run `make deps`" if changed else "deps: dvc.yaml is current"
        )
        return 1 if changed else 0
    if changed:
        path.write_text(text)
    print(f"deps: rewrote {', '.join(changed)}" if changed else "deps: dvc.yaml was already current")
    return 0


if __name__ == "__main__":
    sys.exit(main())
