"""Resume checkpoints: written atomically after every epoch, resumed only by the same configuration.

A checkpoint carries a fingerprint of everything that shapes the result: the params sections a
stage reads, the data's sha256, the code that ran (every module of this package and every stage
script loaded in the process), the thread count, precision and world size, and the instruction
set of the CPU kernels (runtime.cpu_kernels: resumed on another, a run would match no
uninterrupted run). A checkpoint whose fingerprint differs, or that is marked complete, is never
resumed: the stage starts afresh.
Checkpoints live in the git-ignored `checkpoints/` folder, outside DVC's outputs (see layout.py).
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import torch

from reprovision.core.runtime import cpu_kernels

PACKAGE = Path(__file__).resolve().parent.parent  # reprovision/, of which this is core/checkpoint.py


def code_digest() -> str:
    """sha256 of the source of every project module this process has loaded (library and stage scripts)."""
    main = getattr(sys.modules.get("__main__"), "__file__", None)
    stages = os.path.dirname(os.path.abspath(main)) if main else None
    files = set()
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None)
        if path and (
            name == PACKAGE.name
            or name.startswith(PACKAGE.name + ".")
            or os.path.dirname(os.path.abspath(path)) == stages
        ):
            files.add(Path(path).resolve())
    h = hashlib.sha256()
    for path in sorted(files):
        # Named relative to src/ (two sub-packages may each have an __init__.py), never by where the clone lives.
        name = path.relative_to(PACKAGE.parent).as_posix() if path.is_relative_to(PACKAGE.parent) else path.name
        h.update(name.encode() + path.read_bytes())
    return h.hexdigest()


def fingerprint(*parts: object) -> str:
    """One sha256 over the given parts (params digest, data sha256, threads, ...), the CPU kernels
    and the code that ran."""
    return hashlib.sha256("|".join([*map(str, parts), cpu_kernels(), code_digest()]).encode()).hexdigest()


def save(path: Path, state: dict) -> None:
    """Write to a temporary file, then rename: a kill mid-write never leaves a broken checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load(path: Path | None, fingerprint: str) -> dict | None:
    """The checkpoint at `path` if it may be resumed: same fingerprint, not complete; else None."""
    if path is None or not path.exists():
        return None
    state = torch.load(path, map_location="cpu", weights_only=False)
    if state.get("complete") or state.get("fingerprint") != fingerprint:
        return None  # finished, or made by other params/data/code: start afresh
    return state


def capture_rng(generator: torch.Generator, device: torch.device) -> dict:
    """Every random stream a training loop draws from: its own generator, torch's global one and, on
    CUDA, the device's (dropout). Saved in each checkpoint, so that a resumed run draws what an
    uninterrupted one would have."""
    return {
        "generator": generator.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
    }


def restore_rng(state: dict, generator: torch.Generator, device: torch.device) -> None:
    """Put back what `capture_rng` saved."""
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch"])
    if device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
