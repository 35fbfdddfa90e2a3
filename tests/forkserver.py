"""A fork server for the processes the tests' pipelines start: `dvc` itself and the stages its `dvc exp run`s
start through `python stages/<name>.py`. Each is still a process of its own, but forked from a server that has
imported torch, torch._dynamo, MLflow and its SQLAlchemy store, and DVC's command machinery, once, instead of a
fresh interpreter importing them again (~4.6 s of CPU per stage at test size, ~2 s per `dvc` command: most of a
tiny stage's cost; docs/make-test-time.md).

    python tests/forkserver.py SOCKET OWNER   # the server: prints "ready" once it listens on SOCKET; ends with OWNER
    <bin>/python stages/x.py ARGS...      # the clients, written by `write_clients` first on PATH
    <bin>/dvc ARGS...

A client sends its argv, working directory, environment and its stdin/stdout/stderr to the server, forwards
SIGINT, SIGTERM and SIGHUP to the forked process, and ends with its exit status (or its signal). Anything
else `python` is asked to run (`python -c ...`, `python -m ...`), DVC's queue (`dvc queue ...`, the celery
workers it starts as `dvc exp queue-worker`: a forked one hung once in the suite), or every call when the
server is not there, a client hands to the real program with `exec`. A third client, `forked-python`, forks
any `python SCRIPT`, `-c CODE` or `-m MODULE`: tests name it (conftest.forked_python()) where their child
needs no fresh interpreter. The forked process sees what a fresh
one would: the environment it was given (PYTHONPATH included), its script's folder first on sys.path (the
venv's bin for `dvc`), `__main__` the script. No project module is imported by the server, so a copy's own
`src/` is what its stages import.

What a forked process is not: a descendant of the process that started it, nor in its process group. Tests that
find a stage below `dvc` to signal or kill it, or signal a `dvc` command's process group as a terminal's Ctrl-C
does, run the real programs (`pipeline_env(forked=False)`, or the venv's `dvc` by its path).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import sys
import time

# Imported by the server once: what the stages and DVC import that costs most, none of it this project's code.
PRELOAD = (
    "numpy",
    "yaml",
    "pydantic",
    "torch",
    "torch._dynamo",
    "torch.export",
    "torch.utils.data",
    "sqlalchemy",
    "alembic",
    "mlflow",
    "mlflow.store.tracking.sqlalchemy_store",
    "mlflow.tracking",
    "PIL.Image",
    "git",
    "networkx",
    "scipy",
    "sklearn",
    "jinja2",
    "matplotlib.pyplot",
    "seaborn",
    # DVC's: what its CLI imports for `exp run`, `exp show`, `status`, `plots` (not pygit2: libgit2 reads HOME
    # once, when it is first imported, and a test gives `dvc` a HOME of its own).
    "dvc.cli",
    "dvc.cli.parser",
    "dvc.repo",
    "dvc.repo.experiments",
    "dvc.repo.experiments.queue.celery",
    "dvc.repo.experiments.queue.tempdir",
    "dvc.repo.plots",
    "dvc.repo.index",
    "dvc.lock",
    "dvc.scm",
    "dvc.config",
    "dulwich.porcelain",
    "ruamel.yaml",
    "pyparsing",
)
# Not these: torchvision imports only through reprovision/compat.py's workaround; mlflow.pytorch configures the
# root logger when imported (`logging.basicConfig`), which a fresh `dvc` or stage must not find done.
NOT_PRELOADED = ("pygit2", "torchvision", "mlflow.pytorch")
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
HEADER = struct.Struct("!I")
STATUS = struct.Struct("!i")

CLIENT = """#!{python} -IS
# Written by tests/forkserver.py: a `python` that starts `stages/*.py`, or a `dvc`, by the fork server at {socket!r}.
import os, signal, socket, struct, sys
SOCKET, HELD = {socket!r}, {held}
args = sys.argv[1:]
if os.path.basename(sys.argv[0]) == "dvc":
    real = {dvc!r}
    argv = [real, *args]  # what a fresh `dvc`, found on PATH, has as sys.argv
    if args[:1] in (["queue"], ["daemon"]) or args[:2] == ["exp", "queue-worker"]:
        os.execv(real, [real, *args])  # the queue's long-lived workers: fresh (a forked one hung once)
else:
    real = {python!r}
    argv = args
    stage = args[:1] and args[0].startswith("stages/") and args[0].endswith(".py")
    # `forked-python` forks any `SCRIPT`, `-c CODE` or `-m MODULE` (with no other interpreter option).
    anything = os.path.basename(sys.argv[0]) == "forked-python" and (
        args[:1] and not args[0].startswith("-") or args[:1] in (["-c"], ["-m"]) and len(args) > 1
    )
    if not (stage or anything):
        os.execv(real, [real, *args])
# Held until the forked process's pid is known, then forwarded to it: a signal that came meanwhile is not lost.
signal.pthread_sigmask(signal.SIG_BLOCK, HELD)
conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try:
    conn.connect(SOCKET)
except OSError:
    signal.pthread_sigmask(signal.SIG_UNBLOCK, HELD)  # exec keeps the mask
    os.execv(real, [real, *args])
import json
ignored = [int(s) for s in HELD if signal.getsignal(s) == signal.SIG_IGN]
request = {{"argv": argv, "cwd": os.getcwd(), "env": dict(os.environ), "ignored": ignored}}
message = json.dumps(request).encode()
socket.send_fds(conn, [struct.pack("!I", len(message)) + message], [0, 1, 2])
def receive():
    data = b""
    while len(data) < 4:
        chunk = conn.recv(4 - len(data))
        if not chunk:
            sys.exit("tests/forkserver.py: the fork server went away")
        data += chunk
    return struct.unpack("!i", data)[0]
pid = receive()
for sig in HELD:
    if sig not in ignored:
        signal.signal(sig, lambda number, frame: os.kill(pid, number))
signal.pthread_sigmask(signal.SIG_UNBLOCK, HELD)
status = receive()
if status < 0:
    signal.signal(-status, signal.SIG_DFL)
    os.kill(os.getpid(), -status)
sys.exit(status)
"""


def write_clients(folder, python: str, dvc: str, socket_path: str) -> None:
    """`folder`/python and `folder`/dvc: the clients, to put first on PATH (`python` and `dvc` are the real ones);
    `folder`/forked-python: the client a test names to fork any script, `-c` or `-m` (`forked_python()`)."""
    held = "(" + ", ".join(f"signal.{s.name}" for s in FORWARDED) + ")"  # the signals the server forwards
    for name in ("python", "forked-python", "dvc"):
        client = folder / name
        client.write_text(CLIENT.format(python=python, dvc=dvc, socket=socket_path, held=held))
        client.chmod(0o755)


def _receive(conn: socket.socket) -> tuple[dict, list[int]]:
    data, fds, _, _ = socket.recv_fds(conn, 1 << 16, 3)
    while len(data) < HEADER.size or len(data) < HEADER.size + HEADER.unpack_from(data)[0]:
        chunk = conn.recv(1 << 16)
        if not chunk:
            raise ConnectionError("the client went away")
        data += chunk
    return json.loads(data[HEADER.size :]), fds


def _run_stage(request: dict, fds: list[int]) -> None:
    """In the forked child: become `python <argv>` as started by the client (`argv[0]` the script: a stage's, the
    venv's `dvc`, any for `forked-python`, or its `-c`/`-m`), run it, exit. Never returns."""
    import threading

    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    sys.dont_write_bytecode = bool(os.environ.get("PYTHONDONTWRITEBYTECODE"))
    # The dispositions a fresh interpreter starts with, given what its parent left ignored.
    for sig in FORWARDED:
        default = signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL
        signal.signal(sig, signal.SIG_IGN if sig in request["ignored"] else default)
    code = 0
    try:
        _run_main(request["argv"])
    except SystemExit as end:
        if end.code is None or isinstance(end.code, int):
            code = end.code or 0
        else:
            print(end.code, file=sys.stderr)
            code = 1
    except BaseException as error:  # noqa: BLE001 - as the interpreter does: the traceback, exit status 1
        import traceback

        traceback.print_exc()
        code = -signal.SIGINT if isinstance(error, KeyboardInterrupt) else 1
    threading._shutdown()  # what the interpreter does at exit: non-daemon threads first, then atexit
    import atexit

    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    if code < 0:  # an uncaught KeyboardInterrupt: the interpreter ends by SIGINT
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    os._exit(code)


def _reap() -> None:
    """Wait for the per-request children that ended (their CPU, and their stages', then counts as the server's)."""
    try:
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass
    except ChildProcessError:
        pass


def _run_main(argv: list[str]) -> None:
    """Run `python *argv` (`SCRIPT ...`, `-c CODE ...` or `-m MODULE ...`) as the interpreter does: sys.argv,
    sys.path's first entry (then PYTHONPATH's), a new `__main__`."""
    import importlib.machinery
    import runpy
    import types

    extra = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    first = {"-c": "", "-m": os.getcwd()}.get(argv[0])
    script = None if first is not None else os.path.abspath(argv[0])  # a fresh __main__.__file__ is absolute too
    sys.path[:] = [os.path.dirname(script) if script else first, *extra, *sys.path[1:]]
    if argv[0] == "-m":
        sys.argv[:] = ["-m", *argv[2:]]  # run_module puts the module's file first, as `python -m` does
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        return
    main = types.ModuleType("__main__")
    main.__dict__.update(__builtins__=__builtins__)
    sys.modules["__main__"] = main
    if argv[0] == "-c":
        sys.argv[:] = ["-c", *argv[2:]]
        main.__dict__.update(__loader__=importlib.machinery.BuiltinImporter)
        exec(compile(argv[1], "<string>", "exec", dont_inherit=True), main.__dict__)
        return
    sys.argv[:] = argv
    loader = importlib.machinery.SourceFileLoader("__main__", script)
    main.__dict__.update(__file__=script, __loader__=loader, __cached__=None)
    with open(script, "rb") as source:
        code = compile(source.read(), script, "exec", dont_inherit=True)
    exec(code, main.__dict__)


def _serve_one(conn: socket.socket) -> None:
    """In a child of the server: fork the stage, tell the client its pid, then its exit status."""
    request, fds = _receive(conn)
    pid = os.fork()
    if pid == 0:
        conn.close()
        _run_stage(request, fds)
    for fd in fds:
        os.close(fd)
    print(f"forked {pid} in {request['cwd']}: {' '.join(request['argv'])}", file=sys.stderr, flush=True)  # its log
    conn.sendall(STATUS.pack(pid))
    start = time.monotonic()
    _, status, usage = os.wait4(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    cpu = usage.ru_utime + usage.ru_stime  # the process and the children it waited for
    wall = time.monotonic() - start
    print(f"ended {pid} with {code} after {wall:.1f} s, {cpu:.1f} s of CPU", file=sys.stderr, flush=True)
    conn.sendall(STATUS.pack(code))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def serve(socket_path: str, owner: int, hours: float = 2.0) -> None:
    """Serve until the process `owner` (the pytest session's first process) is gone, or `hours` have passed."""
    import importlib
    import logging
    import threading

    for name in PRELOAD:
        importlib.import_module(name)
    # MLflow's map of the installed packages to their modules, which it builds (~0.2 s) for every logged model's
    # requirements: the same venv for every stage, so built once here.
    from mlflow.utils import requirements_utils

    requirements_utils._init_packages_to_modules_map()
    assert threading.active_count() == 1, f"a thread before fork: {threading.enumerate()}"
    assert not set(NOT_PRELOADED) & set(sys.modules), f"preloaded: {set(NOT_PRELOADED) & set(sys.modules)}"
    assert not logging.root.handlers, f"the root logger configured: {logging.root.handlers}"
    deadline = time.monotonic() + 3600 * hours
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(socket_path)
    listener.listen(16)
    listener.settimeout(2.0)
    print("ready", flush=True)
    while _alive(owner) and time.monotonic() < deadline:
        _reap()
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            continue
        conn.settimeout(None)
        if os.fork() == 0:
            listener.close()
            try:
                _serve_one(conn)
            finally:
                os._exit(0)
        conn.close()


if __name__ == "__main__":
    serve(sys.argv[1], int(sys.argv[2]))
