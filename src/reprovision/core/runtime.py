"""Device, threads, precision and seeding: the knobs that make a run repeatable, resolved once per stage."""

from __future__ import annotations

import contextlib
import ctypes
import os
import random

import numpy as np
import torch

from reprovision.config import ConfigError


def resolve_device(requested: str) -> torch.device:
    """`auto` picks cuda, then mps, then cpu; an explicit device that is absent is an error."""
    has = {
        "cuda": torch.cuda.is_available(),
        "mps": getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available(),
        "cpu": True,
    }
    if requested == "auto":
        return torch.device(next(name for name in ("cuda", "mps", "cpu") if has[name]))
    if not has.get(requested, False):
        found = [name for name, ok in has.items() if ok]
        raise ConfigError(
            f"device = {requested!r}, but no {requested} device is available on this machine "
            f"(found: {', '.join(found)}); set `device: auto` or `device: cpu` in params.yaml"
        )
    return torch.device(requested)


def apply_threads(threads: int | str) -> int:
    """Pin torch's intra-op CPU threads (float sums depend on them); returns the number in force.

    An explicit number wins over OMP_NUM_THREADS (torchrun sets it to 1), so that the same params
    give the same floats wherever the stage runs; "auto" keeps torch's own choice.
    """
    if threads != "auto":
        torch.set_num_threads(int(threads))
    return torch.get_num_threads()


# glibc's mallopt() parameters (malloc.h) and the values reuse_freed_memory() sets.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 256 << 20
TRIM_THRESHOLD = 512 << 20


def reuse_freed_memory() -> bool:
    """Have glibc's malloc keep freed memory for the next batch instead of handing it back to the
    kernel; True where it applies (glibc), False elsewhere. Results do not change, only where the
    bytes live (a stage's weights and metrics are bit for bit the same either way, measured).

    By default glibc serves blocks above a threshold (128 KB, rising to 32 MB at most) with an mmap()
    of their own, unmapped on free(), and hands back the heap's free top beyond 128 KB: memory a
    stage frees and allocates again comes back as fresh pages, each faulted in and zeroed by the
    kernel. Measured on the AVX512 machine (2026-12-02), `make run` in fresh clones: 12.0 million page
    faults and 53 s of system CPU without these settings, 2.2 million and 26 s with them, the same
    395 s of user CPU and the same outputs bit for bit. At reference scale it matters less: the R3
    CNN's and ViT's bf16 steps at batch 128 spent 0.02-0.06 s of their 1-5 s in the kernel. The cost:
    a stage keeps up to 512 MB it has freed. PyTorch's tuning guide gets the same effect by
    preloading jemalloc or tcmalloc.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError, TypeError):  # not glibc: macOS, Windows (musl's mallopt returns 0)
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


# What lowers the instruction set of torch's CPU kernels: its own (ATen), oneDNN's (convolutions)
# and MKL's (matmuls). Read when each library starts, so set in the environment before the run.
KERNEL_VARIABLES = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")


def cpu_kernels() -> str:
    """The instruction set torch's CPU kernels run with here, "AVX512", "AVX2", ..., followed by any
    KERNEL_VARIABLES set. Float sums depend on it as on the thread count: the same stage, params and
    threads on an AVX2 and an AVX512 machine agree only to the last bits, unless the AVX512 one
    lowers all three libraries to AVX2 (README, Threads and precision)."""
    lowered = [f"{name}={os.environ[name]}" for name in KERNEL_VARIABLES if os.environ.get(name)]
    return " ".join([torch.backends.cpu.get_cpu_capability(), *lowered])


def cpu_has_native_bf16() -> bool:
    """True when the CPU computes bf16 in hardware (AVX512-BF16 or AMX): there autocast is ~1.7x faster."""
    try:
        with open("/proc/cpuinfo") as fh:
            flags = next((line.split(":", 1)[1].split() for line in fh if line.startswith("flags")), [])
    except OSError:  # not Linux: no cheap way to tell, stay in fp32
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str, device: torch.device) -> str:
    """ "auto" -> "bf16" on CUDA and on CPUs with native bf16, "fp32" elsewhere (MPS, older CPUs)."""
    if precision != "auto":
        return precision
    native = device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16())
    return "bf16" if native else "fp32"


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for a `precision` param (auto resolved on `device`); None = plain fp32."""
    return torch.bfloat16 if resolve_precision(precision, device) == "bf16" else None


def seed_everything(seed: int, device: torch.device, deterministic: bool = True) -> torch.Generator:
    """Seed every RNG and ask for deterministic kernels (params.yaml `deterministic`); returns a
    generator for data order.

    Deterministic means an error, never a warning: an op with no deterministic kernel on `device`
    stops the run at its first call (`nondeterministic_op` words it), so a run that finishes is
    one that repeats bit for bit. `deterministic: false` is the explicit, recorded opt-out."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    # Deterministic algorithms everywhere: on CUDA cuBLAS needs this workspace setting.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    # The switch itself, not torch.use_deterministic_algorithms: that one also imports
    # torch._inductor to set its own flag, ~3 s of every stage's start on this CPU, and only
    # torch.compile reads that flag (compiled_for_determinism sets it where a model is compiled).
    torch._C._set_deterministic_algorithms(deterministic, warn_only=False)
    torch.backends.cudnn.benchmark = False
    return torch.Generator(device=device).manual_seed(seed)


NO_DETERMINISTIC_KERNEL = " does not have a deterministic implementation"


def nondeterministic_op(err: BaseException) -> ConfigError | None:
    """torch's error for an op with no deterministic kernel, as one line naming the op and the param
    that opts out; None for any other error."""
    text = str(err)
    if NO_DETERMINISTIC_KERNEL not in text:
        return None
    op = text.split(NO_DETERMINISTIC_KERNEL)[0].strip().split()[-1]
    return ConfigError(
        f"{op} has no deterministic kernel on this device, so this run could not repeat bit for bit; "
        "use a model without that op, or set `deterministic: false` in params.yaml (recorded with the run)"
    )


def attention_backend(device: torch.device, amp: torch.dtype | None, cpu_attention: str = "default") -> str:
    """The scaled-dot-product attention kernel a classifier uses, chosen here, not by torch, on CUDA.

    torch's own first choice there can be cuDNN's attention, whose backward has no deterministic
    mode. Flash attention's and the memory-efficient kernel's backward switch to one under
    deterministic algorithms (attention_backward.cu); flash takes bf16 and fp16, the other fp32 too.
    On the CPU, `cpu_attention` (a classifier's param): "default" keeps torch's choice (its CPU flash
    kernel; the results recorded so far), "math" the reference implementation, matrix products and a
    softmax, whose backward is the faster at ViT token counts here (BENCHMARKS "ViT speed levers")."""
    if device.type != "cuda":
        return "math" if device.type == "cpu" and cpu_attention == "math" else "default"
    return "flash" if amp in (torch.bfloat16, torch.float16) else "efficient"


def attention_kernels(device: torch.device, amp: torch.dtype | None, cpu_attention: str = "default"):
    """A context that makes `F.scaled_dot_product_attention` use `attention_backend(device, amp, cpu_attention)`."""
    name = attention_backend(device, amp, cpu_attention)
    if name == "default":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = {
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "math": SDPBackend.MATH,
    }
    return sdpa_kernel(backends[name])


def compiled_for_determinism(model: torch.nn.Module) -> torch.nn.Module:
    """torch.compile(model), with the deterministic-algorithms setting in force passed on to
    inductor too (seed_everything leaves inductor's flag alone, to keep torch._inductor unimported)."""
    torch.use_deterministic_algorithms(
        torch.are_deterministic_algorithms_enabled(), warn_only=torch.is_deterministic_algorithms_warn_only_enabled()
    )
    return torch.compile(model)
