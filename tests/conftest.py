"""Shared fixtures: a throwaway copy of the repository for tests that run DVC for real."""

from __future__ import annotations

import fcntl
import lzma
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from pathlib import Path

import pytest
import torch
from sqlalchemy import event
from sqlalchemy.engine import Engine

ROOT = Path(__file__).resolve().parents[1]

# The tests that compute in this process do so on tiny tensors, two test files at a time on 2 cores:
# one thread each, since a second one mostly waits for the first (test_ssl's resume test: 17 s with
# torch's default of 2 threads beside another busy process, 2.6 s with 1). test_runtime sets its own.
torch.set_num_threads(1)
# So does every process the tests start that does not pin its threads (the stages pin theirs with the
# `threads` param, TINY's 1): gpu_check's smoke took 46 s of CPU with torch's default of 2 threads
# beside a busy process, 21 s with 1 (OMP threads spin while they wait). Environment only, read at start.
os.environ["OMP_NUM_THREADS"] = "1"
MIRROR = Path(os.environ.get("REPROVISION_DATA_MIRROR") or ROOT.parent / "shared" / "datasets")
DVC = str(Path(sys.executable).parent / "dvc")  # the venv's own `dvc`, by its path: never the fork server's


# The longest test files, longest first (docs/make-test-time.md). `make test` hands
# out whole files in collection order (--dist loadfile --no-loadscope-reorder): the two pipeline files
# start at once, and the many short files fill the end instead of the long ones starting late. The order
# is measured: `benchmarks/suite_schedule.py` replays xdist's schedule from a `pytest -v --durations=0` log.
LONGEST_FILES = [
    "test_pipeline_params_e2e.py",
    "test_pipeline_e2e.py",
    "test_team_server.py",
    "test_tracking_outage.py",
    "test_example_family.py",
    "test_gan_resume.py",
    "test_tune.py",
    "test_data.py",
    "test_promotion_gate.py",
    "test_ssl.py",
    "test_distributed.py",
    "test_gpu_path.py",
    "test_runtime.py",
    "test_report.py",
]


def pytest_collection_modifyitems(items) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's tests keep their order


@event.listens_for(Engine, "connect")
def _sqlite_without_fsync(connection, _record) -> None:
    """The MLflow SQLite stores the tests open in this process are thrown away: they need not wait
    for the disk. Creating one runs 68 schema migrations, each commit an fsync: ~3.5 s of waiting
    per test that makes a store (measured), a few ms without. Stages, in their own processes, keep
    SQLite's defaults."""
    if isinstance(connection, sqlite3.Connection):
        connection.execute("PRAGMA synchronous = OFF")


# A run small enough for a test. The classifiers are narrowed too (their compute would otherwise
# be most of the suite's time); test_models checks that the defaults build the reference architectures.
# The GANs see 240 MNIST images (at least gan.fid_samples, which the FID floor needs), the DCGAN at half width.
# One thread: the suite runs two tests at once on 2 cores, and at this size a second thread per stage
# only adds synchronisation. test_threads_are_part_of_the_configuration switches to 2 and back.
# A validation split (50 of the 250 images), so that the report names a champion the way it must: on it.
TINY = [
    "threads=1",
    "data.train_fraction=0.005",
    "data.val_fraction=0.2",
    "data.test_fraction=0.01",
    "vit.depth=1",
    "vit.embed_dim=32",
    "vit.heads=2",
    "cnn.widths=[8,16]",
    "cnn.hidden=16",
    "judge.epochs=1",
    "judge.train_fraction=0.02",
    "gan.epochs=1",
    "gan.train_fraction=0.004",
    "gan.sample_every=1",
    "gan.fid_every=1",
    "gan.fid_samples_during=200",
    "gan.fid_samples=200",
    "gan.dcgan.width=32",
    "vit.epochs=1",
    "cnn.epochs=1",
    "ssl.arch=refcnn",
    "ssl.widths=[8,16]",
    "ssl.epochs=1",
    "ssl.train_fraction=0.005",
    "ssl.batch_size=64",
    "ssl.proj_hidden=32",
    "ssl.proj_dim=16",
    "probe.knn_k=5",
    "evaluate.heatmap_images=4",
    "evaluate.misclassified_images=8",
]


def sh(cmd: list[str], cwd: Path, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
        )
    return proc


# What a run leaves in the checkout and a test must not inherit: `dvc exp run` (e.g. `make run`)
# rewrites params.yaml with its -S overrides and writes dvc.lock and .gitignore files of outputs.
RUN_PRODUCTS = {"params.yaml", "dvc.lock"}


def copy_repo(dest: Path) -> Path:
    """This checkout's code as it is (tracked + untracked, not ignored), with the committed params.yaml
    and no run products, committed in a fresh repo: the same starting point whatever ran here before."""
    tracked = set(sh(["git", "ls-files", "--cached", "-z"], ROOT).stdout.split("\0"))
    files = sh(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], ROOT).stdout.split("\0")
    for name in filter(None, files):
        src = ROOT / name
        made_by_a_run = name in RUN_PRODUCTS or (name.endswith(".gitignore") and name not in tracked)
        if src.is_file() and not made_by_a_run:
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    (dest / "params.yaml").write_text(committed_params())
    # Outputs and the cache share their files (hard links; DVC makes both read-only and replaces a link before a
    # stage writes there) instead of DVC copying each into the cache and back: the prepared datasets alone are
    # 230 MB, restored from the shared run-cache into most copies. Local config, not git's: users keep DVC's own.
    (dest / ".dvc" / "config.local").write_text("[cache]\n    type = hardlink,copy\n")
    sh(["git", "init", "-q", "-b", "main"], dest)
    sh(["git", "-c", "user.name=test", "-c", "user.email=test@example.com", "add", "-A"], dest)
    sh(["git", "-c", "user.name=test", "-c", "user.email=test@example.com", "commit", "-q", "-m", "copy"], dest)
    return dest


def committed_params() -> str:
    """params.yaml as committed (the schema defaults), not as the last `dvc exp run` left it."""
    return sh(["git", "show", "HEAD:params.yaml"], ROOT).stdout


def pipeline_env(forked: bool = True, **extra: str) -> dict:
    """The environment of the tests' dvc commands. `dvc` and its stages are forked from the session's fork server
    (tests/forkserver.py) unless `forked` is False: a test that finds a stage below `dvc` to kill it, or compares
    with fresh interpreters."""
    # The tests' runs go to the default store and experiment (`reprovision`), whatever the shell sets.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_TRACKING", "MLFLOW_EXPERIMENT"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    if forked:
        env["PATH"] = f"{fork_server()}{os.pathsep}{env['PATH']}"
    env["REPROVISION_DATA_MIRROR"] = str(STAGE_MIRROR or MIRROR)
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"
    env.update(extra)
    return env


# The session's fork server (tests/forkserver.py), one for all pytest-xdist workers: its folder (socket, clients,
# log) is made by the session's first process, the owner (xdist's controller, before it starts the workers, which
# inherit the variable); the first worker to ask starts the server; the owner kills it at the session's end
# (`pytest_unconfigure`), and the server ends by itself if the owner is gone. One server instead of one per
# worker: each spent ~7 s of CPU importing the same modules.
FORK_SERVER_VAR = "REPROVISION_TESTS_FORK_SERVER"


def pytest_configure(config) -> None:
    if FORK_SERVER_VAR not in os.environ:  # the session's first process (a pytest a test starts shares its server)
        folder = tempfile.mkdtemp(prefix="forkserver-")  # short: a socket's path has at most 107 bytes
        os.environ[FORK_SERVER_VAR] = f"{os.getpid()}:{folder}"
        config.fork_server_folder = Path(folder)


def pytest_unconfigure(config) -> None:
    folder = getattr(config, "fork_server_folder", None)
    if folder is None:
        return
    os.environ.pop(FORK_SERVER_VAR, None)
    keep = os.environ.get("REPROVISION_TESTS_FORK_LOG")  # the server's log, for benchmarks/fork_profile.py
    if keep and (folder / "server.log").exists():
        shutil.copyfile(folder / "server.log", keep)
    if (folder / "server.pid").exists():
        pid = int((folder / "server.pid").read_text())
        with suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)  # its own process group: the server and any stage
        with suppress(ChildProcessError):
            os.waitpid(pid, 0)  # our child when this process started it (no xdist)
    shutil.rmtree(folder, ignore_errors=True)


def fork_server() -> Path:
    """The folder whose `python` and `dvc` start stages and DVC by the session's fork server, which the first
    process to ask starts."""
    owner, folder = os.environ[FORK_SERVER_VAR].split(":", 1)
    folder = Path(folder)
    if (folder / "server.pid").exists():  # written last, once the server is ready: no lock needed then
        return folder
    with open(folder / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the first worker starts it, the others wait for it
        if not (folder / "server.pid").exists():
            from forkserver import write_clients

            env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # a stage's PYTHONPATH comes with it
            with open(folder / "server.log", "wb") as log:
                server = subprocess.Popen(
                    [sys.executable, str(ROOT / "tests" / "forkserver.py"), str(folder / "socket"), owner],
                    stdout=subprocess.PIPE,
                    stderr=log,
                    env=env,
                    start_new_session=True,
                )
            if server.stdout.readline().strip() != b"ready":
                server.kill()
                pytest.fail(f"the stages' fork server did not start: {(folder / 'server.log').read_text()[-2000:]}")
            write_clients(folder, sys.executable, DVC, str(folder / "socket"))
            (folder / "server.pid").write_text(str(server.pid))
    return folder


def forked_python() -> str:
    """A `python` for `SCRIPT`, `-c CODE` or `-m MODULE` that forks it from the session's fork server: for a test
    whose child needs no fresh interpreter (not one that reads the environment when torch is imported, counts its
    page faults, or is found in a process group to be killed)."""
    return str(fork_server() / "forked-python")


def require_mirror() -> Path:
    """MIRROR, or the test fails (never skips) saying how to point the suite at the datasets."""
    if not (MIRROR / "cifar10" / "cifar-10-batches-bin").is_dir():
        pytest.fail(f"the dataset mirror {MIRROR} is missing or incomplete: set REPROVISION_DATA_MIRROR (see README)")
    return MIRROR


def _new_copy(folder: Path, cache: Path | None = None) -> Path:
    """A fresh copy; with `cache`, it shares that DVC cache (and so its run-cache) with other copies."""
    repo = copy_repo(folder)
    if cache is not None:
        dvc(repo, "cache", "dir", "--local", str(cache))
    return repo


# The mirror the tests' stages read: MIRROR with CIFAR-10's batches decompressed once per session
# (the other layout data.py reads, the same md5-checked bytes). fetch-data runs in four test files
# and test_ssl fetches CIFAR-10 itself; each would spend ~8 s of CPU xz-decompressing the same
# 180 MB. The fixtures that make repository copies request it (a test without one reads MIRROR, as
# test_data's real-mirror tests do); pipeline_env() points the stages at it.
STAGE_MIRROR: Path | None = None


@pytest.fixture(autouse=True)
def tracking_uri_restored():
    """mlflow.set_tracking_uri() keeps the URI process-wide and also sets MLFLOW_TRACKING_URI in os.environ (for
    child processes), and the library calls it (a stage's run, a study's search): a test that ran such code
    in-process against its own server left it behind, and a later test on the same worker reached for that
    stopped server (test_registry's `promote`, in one `.ci/run` of 2026-12-07). Each test ends with MLflow's
    URI and the variable as the test began."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    mlflow = sys.modules.get("mlflow")
    if mlflow is not None:
        mlflow.set_tracking_uri(before)  # a no-op unless something changed it
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before


@pytest.fixture(scope="session")
def stage_mirror(tmp_path_factory) -> Path:
    global STAGE_MIRROR
    require_mirror()
    folder = workers_folder(tmp_path_factory) / "mirror"
    with open(workers_folder(tmp_path_factory) / "mirror.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the first worker decompresses, the others wait for it
        if not folder.exists():
            staging = folder.with_name("mirror.tmp")
            shutil.rmtree(staging, ignore_errors=True)
            packed = MIRROR / "cifar10" / "cifar-10-batches-bin"
            plain = staging / "cifar10" / "cifar-10-batches-bin"
            plain.mkdir(parents=True)
            for source, dest in ((MIRROR, staging), (MIRROR / "cifar10", staging / "cifar10"), (packed, plain)):
                for entry in source.iterdir():  # the rest is linked, not copied
                    if entry.suffix != ".xz" and not (dest / entry.name).exists():
                        (dest / entry.name).symlink_to(entry)

            def decompress(path: Path) -> None:
                with lzma.open(path) as src, open(plain / path.stem, "wb") as out:
                    shutil.copyfileobj(src, out, 1 << 20)

            with ThreadPoolExecutor() as pool:  # lzma releases the GIL
                list(pool.map(decompress, sorted(packed.glob("*.xz"))))
            os.replace(staging, folder)
    STAGE_MIRROR = folder
    return folder


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory) -> Path:
    """One DVC cache for the copies of the whole session, on every pytest-xdist worker: a stage that
    an earlier test ran with the same deps and params (fetch-data, augment, the judge) is restored
    from the run-cache instead of computed again. (DVC writes a cache object or run-cache entry to
    a temporary name and renames it: copies on two workers may fill one cache at once, as a team's
    shared cache is filled.) Tests that must train give their stages params no other test uses; the
    two-clone reproduction test uses a cache of its own."""
    cache = workers_folder(tmp_path_factory) / "dvc-cache"
    cache.mkdir(exist_ok=True)
    return cache


def workers_folder(tmp_path_factory) -> Path:
    """The session's temporary folder that every pytest-xdist worker sees (each has one of its own below it)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture
def repo_copy(tmp_path: Path, shared_cache: Path, stage_mirror) -> Path:
    return _new_copy(tmp_path / "repo", shared_cache)


@pytest.fixture(scope="module")
def module_repo(tmp_path_factory, shared_cache: Path, stage_mirror) -> Path:
    """One copy shared by the tests of a module that build on each other's runs."""
    return _new_copy(tmp_path_factory.mktemp("repo"), shared_cache)


def dvc(repo: Path, *args: str, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """`dvc` as found on the environment's PATH: forked by the fork server, unless `forked=False` made it."""
    return sh(["dvc", *args], repo, env or pipeline_env(), check)


def exp_run(repo: Path, *sets: str, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    args = ["exp", "run"]
    for s in [*TINY, *sets]:
        args += ["-S", s]
    return dvc(repo, *args, env=env, check=check)
