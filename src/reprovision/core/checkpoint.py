"""Resume checkpoints: written atomically after every epoch, resumed only by the same configuration.

A checkpoint carries a fingerprint of everything that shapes the result: the params sections a
stage reads, the data's sha256, the code that ran (every module of this package and every stage
script loaded in the process), the thread count, precision and world size, and the instruction
set of the CPU kernels (runtime.cpu_kernels: resumed on another, a run would match no
uninterrupted run). A checkpoint whose fingerprint differs, or that is marked complete, is never
resumed: the stage starts afresh.

They are read with torch.load(weights_only=True): tensors, dicts, lists, tuples and plain values
(what every loop saves: state dicts, RNG states as ByteTensors, histories of numbers and strings),
never an arbitrary pickled object, which could run code on load. A file that cannot be read as one
of this version's checkpoints (truncated by a full disk, random bytes, another program's file or
an older layout: no matching `format`) is moved aside to `<name>.pt.corrupt`, said in one line,
and the stage starts afresh: a fault costs the epochs since, never the file or the run.
Checkpoints live in the git-ignored `checkpoints/` folder, outside DVC's outputs (see layout.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pickle
import re
import sys
from pathlib import Path

import torch

from reprovision.core.runtime import cpu_kernels

PACKAGE = Path(__file__).resolve().parent.parent  # reprovision/, of which this is core/checkpoint.py
# Written into every checkpoint by `save` and required by `load`: raise it when what a checkpoint
# holds changes shape, and files of the old layout are moved aside instead of half-resumed.
FORMAT = 1


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
    """Write `state` (and this version's `format`) to a temporary file, flush it to the disk, then rename
    it over `path` and flush the folder: a kill or a power cut mid-write leaves the previous checkpoint
    or the new one, never a torn file (POSIX: a rename is durable only once its folder is synced)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as fh:
        torch.save({"format": FORMAT, **state}, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _sync_folder(path.parent)


def _sync_folder(folder: Path) -> None:
    """fsync a folder, so that a rename in it survives a power cut (there is no folder to open on Windows)."""
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load(path: Path | None, fingerprint: str, *, main: bool = True) -> dict | None:
    """The checkpoint at `path` if it may be resumed: this `format`, same fingerprint, not complete; else None.

    A file that is no readable checkpoint of this version is moved aside to `<path>.corrupt` (an older
    one there is replaced) and one line says so; the caller starts afresh. `main`: whether this process
    moves it and speaks (rank 0); the other ranks of a distributed run only start afresh.
    """
    if path is None or not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        return None  # rank 0 moved it aside this instant
    except Exception as err:  # truncated, random bytes, not a torch file: each raises its own error
        named = re.search(r"GLOBAL ([\w.]+)", str(err))  # the module.name it refused
        if isinstance(err, pickle.UnpicklingError) and named:
            # An object weights_only does not know (its `__reduce__` could run code): never built.
            return _set_aside(path, f"holds a pickled object ({named.group(1)}), which is never loaded", main=main)
        return _set_aside(path, f"cannot be read, truncated or corrupt ({_first_words(err)})", main=main)
    if not isinstance(state, dict):
        return _set_aside(
            path, f"is not a checkpoint of this version (a {type(state).__name__}, not a dict)", main=main
        )
    if state.get("format") != FORMAT or "fingerprint" not in state:
        written = f"format {state['format']}" if "format" in state else "no format"
        return _set_aside(path, f"is not a checkpoint of this version ({written}; this one writes {FORMAT})", main=main)
    if state.get("complete") or state.get("fingerprint") != fingerprint:
        return None  # finished, or made by other params/data/code: start afresh
    return state


def _first_words(err: Exception) -> str:
    """The error's kind and its telling sentence: weights_only's errors open with the same boilerplate,
    torch's zip reader's go on about what may have caused it."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if lines and lines[0].startswith("Weights only load failed"):
        lines = [line for line in lines[1:] if not line.startswith(("Please file an issue", "Check the documentation"))]
    return f"{type(err).__name__}: {lines[0].split('. ')[0].rstrip('.')}" if lines else type(err).__name__


def _set_aside(path: Path, why: str, *, main: bool) -> None:
    """Move an unreadable checkpoint to `<path>.corrupt` and say so in one line (on the main process only)."""
    if not main:
        return None
    aside = path.with_name(path.name + ".corrupt")
    with contextlib.suppress(FileNotFoundError):  # moved already (another process)
        os.replace(path, aside)
    print(f"checkpoint {path} {why}: moved to {aside}; the stage starts afresh.", flush=True)
    return None


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
