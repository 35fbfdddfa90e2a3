"""Threads, precision, fingerprints and the validation split: the knobs a reproduction depends on."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import forked_python

from reprovision.config import CNNConfig
from reprovision.core import checkpoint, runtime
from reprovision.data.augment import BatchAugment, Policy
from reprovision.data.datasets import DataError, validation_split
from reprovision.models.cnn import RefCNN
from reprovision.training.fit_classifier import DeviceData, fit_classifier

CPU = torch.device("cpu")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_threads_param_pins_torch_and_auto_keeps_its_choice(threads):
    assert runtime.apply_threads(1) == 1 == torch.get_num_threads()
    assert runtime.apply_threads("auto") == 1  # "auto" changes nothing, and reports what is in force


def test_auto_precision_is_bf16_only_where_the_hardware_has_it(monkeypatch):
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: False)
    assert runtime.resolve_precision("auto", CPU) == "fp32" and runtime.autocast_dtype("auto", CPU) is None
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: True)
    assert runtime.resolve_precision("auto", CPU) == "bf16" and runtime.autocast_dtype("auto", CPU) == torch.bfloat16
    assert runtime.resolve_precision("auto", torch.device("cuda")) == "bf16"
    assert runtime.resolve_precision("fp32", torch.device("cuda")) == "fp32"  # explicit values win
    assert runtime.resolve_precision("auto", torch.device("mps")) == "fp32"


def test_this_machine_is_read_from_proc_cpuinfo():
    with open("/proc/cpuinfo") as fh:
        flags = fh.read()
    assert runtime.cpu_has_native_bf16() == ("avx512_bf16" in flags or "amx_bf16" in flags)


def _train(precision: str) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8, generator=gen)
    y = torch.randint(0, 4, (64,), generator=gen)
    policy = Policy("cifar10", (0.5,) * 3, (0.25,) * 3, 2, True, 0.0, 1.0, 0.0, 0.2, 0.0, 8)
    cfg = CNNConfig(epochs=2, batch_size=16, precision=precision, widths=[8, 16], hidden=16)
    rng = runtime.seed_everything(0, CPU)
    model = RefCNN(channels=3, num_classes=4, widths=(8, 16), hidden=16)
    fit_classifier(
        model,
        DeviceData(x[:48], y[:48]),
        DeviceData(x[48:56], y[48:56]),
        DeviceData(x[56:], y[56:]),
        BatchAugment(policy, 4, rng),
        cfg,
        1e-3,
        rng,
        progress=False,
    )
    return model.state_dict()


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_training_is_bit_reproducible_in_each_precision(precision, threads):
    torch.set_num_threads(2)
    first, second = _train(precision), _train(precision)
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_bf16_and_fp32_are_different_configurations(threads):
    torch.set_num_threads(2)
    bf16, fp32 = _train("bf16"), _train("fp32")
    assert not all(torch.equal(bf16[k], fp32[k]) for k in bf16)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_freed_memory_is_reused_instead_of_faulted_in_again():
    """What context.start() sets: a block freed and allocated again costs no new page faults (and so no
    kernel time zeroing pages), where glibc's default unmaps it and maps fresh pages each time."""
    out = subprocess.run(
        [sys.executable, Path(__file__).with_name("page_faults.py")], capture_output=True, text=True, check=True
    ).stdout
    default, applied, reused = out.split()
    assert applied == "True"
    assert int(reused) * 20 < int(default), out  # 65,536 faults by default here (64 MB in 4 KB pages, 4 times), 0


def test_fingerprint_knows_threads_and_precision():
    base = checkpoint.fingerprint("params", "data", 2, "fp32")
    assert base == checkpoint.fingerprint("params", "data", 2, "fp32")
    assert base != checkpoint.fingerprint("params", "data", 1, "fp32")
    assert base != checkpoint.fingerprint("params", "data", 2, "bf16")


def test_fingerprint_knows_the_cpu_kernels():
    """A checkpoint made with one instruction set of CPU kernels is not resumed with another: float
    sums differ between them (ATEN_CPU_CAPABILITY lowers torch's own kernels, here to the plain ones)."""
    script = (
        "from reprovision.core import checkpoint, runtime; "
        "print(runtime.cpu_kernels(), checkpoint.fingerprint('p', 'd', 1, 'fp32'))"
    )

    def kernels_and_fingerprint(**env: str) -> tuple[str, str]:
        clean = {name: "" for name in runtime.KERNEL_VARIABLES}  # whatever the shell running the tests set
        out = subprocess.run(
            [sys.executable, "-c", script],
            env={**os.environ, **clean, **env},
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        kernels, fingerprint = out.rsplit(" ", 1)
        return kernels, fingerprint

    own_kernels, own = kernels_and_fingerprint()
    lowered_kernels, lowered = kernels_and_fingerprint(ATEN_CPU_CAPABILITY="default")
    assert own_kernels == torch.backends.cpu.get_cpu_capability()
    assert lowered_kernels == "DEFAULT ATEN_CPU_CAPABILITY=default" and lowered != own
    assert kernels_and_fingerprint() == (own_kernels, own)


def test_fingerprint_is_the_same_in_a_clone_elsewhere_and_knows_the_code(tmp_path):
    """What lets a run resume on another machine from a copied checkpoint: the fingerprint reads the
    code's content, not where the clone lives; a changed module (or stage script) is another run."""
    script = "from reprovision.core import checkpoint; print(checkpoint.fingerprint('params', 'data', 1, 'fp32'))"

    def clone_at(folder: Path) -> Path:
        shutil.copytree(
            ROOT / "src" / "reprovision", folder / "src" / "reprovision", ignore=shutil.ignore_patterns("__pycache__")
        )
        (folder / "stages").mkdir()
        (folder / "stages" / "fingerprint.py").write_text(script + "\n")
        return folder

    def fingerprint_in(clone: Path) -> str:
        env = {**os.environ, "PYTHONPATH": str(clone / "src"), "PYTHONDONTWRITEBYTECODE": "1"}
        return subprocess.run(
            [forked_python(), str(clone / "stages" / "fingerprint.py")],
            env=env,
            cwd=clone,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()

    here, there = clone_at(tmp_path / "a"), clone_at(tmp_path / "somewhere" / "else")
    original = fingerprint_in(here)
    assert fingerprint_in(there) == original
    with (there / "src" / "reprovision" / "core" / "checkpoint.py").open("a") as fh:
        fh.write("# an edit\n")
    assert fingerprint_in(there) != original
    (tmp_path / "a" / "stages" / "fingerprint.py").write_text(script + "  # the stage script edited\n")
    assert fingerprint_in(here) != fingerprint_in(clone_at(tmp_path / "third"))


def test_a_checkpoint_resumes_only_its_own_unfinished_configuration(tmp_path):
    path = tmp_path / "run.pt"
    checkpoint.save(path, {"fingerprint": "this config", "complete": False, "epoch": 3})
    assert checkpoint.load(path, "this config")["epoch"] == 3
    assert checkpoint.load(path, "another config") is None  # other params, data, code, threads or precision
    checkpoint.save(path, {"fingerprint": "this config", "complete": True, "epoch": 5})
    assert checkpoint.load(path, "this config") is None  # finished: a new run starts afresh
    assert checkpoint.load(tmp_path / "none.pt", "this config") is None


def test_validation_split_is_stratified_deterministic_and_disjoint():
    y = np.repeat(np.arange(10), 50)
    train, val = validation_split(y, 0.2, seed=0)
    assert len(val) == 100 and np.bincount(y[val]).tolist() == [10] * 10  # 20 % of every class
    assert not set(train) & set(val) and len(train) + len(val) == len(y)
    again = validation_split(y, 0.2, seed=0)
    assert np.array_equal(train, again[0]) and np.array_equal(val, again[1])
    assert not np.array_equal(val, validation_split(y, 0.2, seed=1)[1])
    everything, none = validation_split(y, 0.0, seed=0)
    assert len(everything) == len(y) and len(none) == 0
    with pytest.raises(DataError, match="raise data.val_fraction"):
        validation_split(y, 0.01, seed=0)  # 5 images for 10 classes


def test_seeding_switches_deterministic_algorithms_on_and_compiling_keeps_them(threads):
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(False)
    try:
        runtime.seed_everything(0, CPU)
        assert (
            torch.are_deterministic_algorithms_enabled() and not torch.is_deterministic_algorithms_warn_only_enabled()
        )
        runtime.compiled_for_determinism(torch.nn.Linear(2, 2))  # compiles lazily: nothing runs here
        import torch._inductor.config as inductor_config

        assert inductor_config.deterministic and torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
