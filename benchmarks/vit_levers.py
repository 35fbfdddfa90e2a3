"""What makes a ViT step faster on this CPU (issue 43 item 1): each lever measured alone, in a minimal loop.

For R3's ViT (batch 128) and the vit-hybrid recipe's ViT (batch 256), under the precision params.yaml's `auto`
resolves to here, with the params' thread count: images per second of one training step (forward, backward,
AdamW step) with torch's default attention kernel, with SDPA's reference ("math") kernel, with fused AdamW,
and with torch.compile (Inductor's generated C++), median of the timed steps after a warm-up. Then which SDPA
kernel each precision gets (read from the profiler), the ops that take the time of one R3 ViT step, and the
ceiling the matrix products set: R3's step at this CPU's matmul rate with nothing else taking time.

    python benchmarks/vit_levers.py [--steps 5] [--no-compile]      # prints Markdown for BENCHMARKS.md

Random images: speed does not depend on the pixels. Figures on a shared machine are only as good as its quiet.
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import statistics
import time

import torch
import torch.nn.functional as F
from recipes import VIT_HYBRID, nest
from runs import classifier_flops  # benchmarks/runs.py, beside this script

from reprovision.config import Params, ViTConfig
from reprovision.core.runtime import apply_threads, attention_kernels, autocast_dtype, compiled_for_determinism
from reprovision.models.vit import FAMILY

CPU = torch.device("cpu")
MODELS = {
    "R3 ViT": (ViTConfig(), 128),
    "hybrid ViT (vit-hybrid)": (ViTConfig(**nest(VIT_HYBRID.overrides)["vit"]), 256),
}
# (lever, attention kernel, fused AdamW, compiled): each alone against the first
LEVERS = [
    ("eager, torch's attention kernel", "default", False, False),
    ("math attention", "math", False, False),
    ("fused AdamW", "default", True, False),
    ("math attention + fused AdamW", "math", True, False),
    ("torch.compile", "default", False, True),
]


def step_rate(cfg: ViTConfig, batch: int, attention: str, fused: bool, compiled: bool, steps: int) -> float:
    """Images per second of a training step: the median over `steps` timed steps after a warm-up."""
    torch.manual_seed(0)
    model = FAMILY.build(cfg, num_classes=10, channels=3, image_size=32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05, fused=fused or None)
    run = compiled_for_determinism(model) if compiled else model
    amp = autocast_dtype("auto", CPU)
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))

    def step() -> None:
        with torch.autocast("cpu", dtype=amp, enabled=amp is not None), attention_kernels(CPU, amp, attention):
            loss = F.cross_entropy(run(x).float(), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(3 if compiled else 2):  # compiling happens in the first calls
        step()
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    return batch / statistics.median(times)


def attention_op(dtype: torch.dtype | None) -> str:
    """The aten op SDPA dispatches to on this CPU for one R3-shaped attention (65 tokens, 3 heads of 64)."""
    q = torch.randn(8, 3, 65, 64, requires_grad=True)
    with torch.profiler.profile() as prof:
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            F.scaled_dot_product_attention(q, q, q).sum().backward()
    names = {
        e.key for e in prof.key_averages() if "attention" in e.key and e.key != "aten::scaled_dot_product_attention"
    }
    return ", ".join(sorted(names))


def top_ops(cfg: ViTConfig, batch: int, rows: int) -> list[tuple[str, float, float]]:
    """(op, ms per step, share of the step) of one eager training step's most expensive ops (self time)."""
    torch.manual_seed(0)
    model = FAMILY.build(cfg, num_classes=10, channels=3, image_size=32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    amp = autocast_dtype("auto", CPU)
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    for profiled in (False, True):
        with torch.profiler.profile() if profiled else contextlib.nullcontext() as prof:
            with torch.autocast("cpu", dtype=amp, enabled=amp is not None):
                loss = F.cross_entropy(model(x).float(), y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    return [(e.key, e.self_cpu_time_total / 1000, e.self_cpu_time_total / total) for e in events[:rows]]


def matmul_ceiling(cfg: ViTConfig, batch: int, reps: int = 10) -> tuple[float, float, float]:
    """(GFLOP/s, GFLOP per step, img/s): the rate of the matrix products of the model's linear layers at their
    training shapes (forward, input gradient and weight gradient of each) under the precision `auto` resolves
    to; the FLOPs FlopCounterMode counts in one training step; and the images per second a step would reach if
    every counted FLOP ran at that rate and nothing else (norms, activations, dropout, optimiser) took time."""
    torch.manual_seed(0)
    model = FAMILY.build(cfg, num_classes=10, channels=3, image_size=32)
    shapes: list[tuple[int, int, int]] = []  # (rows, in, out) of each linear layer's call
    hooks = [
        m.register_forward_hook(
            lambda m, args, out: shapes.append((args[0].numel() // m.in_features, m.in_features, m.out_features))
        )
        for m in model.modules()
        if isinstance(m, torch.nn.Linear)
    ]
    with torch.no_grad():
        model(torch.randn(batch, 3, 32, 32))
    for hook in hooks:
        hook.remove()
    dtype = autocast_dtype("auto", CPU) or torch.float32
    flops = seconds = 0.0
    for rows, n_in, n_out in shapes:
        a, w, g = (torch.randn(*s).to(dtype) for s in ((rows, n_in), (n_out, n_in), (rows, n_out)))
        for left, right in ((a, w.T), (g, w), (g.T, a)):  # forward, input gradient, weight gradient
            left @ right
            started = time.perf_counter()
            for _ in range(reps):
                left @ right
            seconds += (time.perf_counter() - started) / reps
        flops += 3 * 2 * rows * n_in * n_out
    rate = flops / seconds
    step_flops = batch * classifier_flops(model, 3, 32, 10, CPU)  # the FLOPs of BENCHMARKS' FLOP table
    return rate / 1e9, step_flops / 1e9, batch * rate / step_flops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=5, help="timed steps per lever (after the warm-up)")
    parser.add_argument("--no-compile", action="store_true", help="leave out torch.compile (minutes of compiling)")
    args = parser.parse_args()
    threads = apply_threads(Params().threads)
    amp = autocast_dtype("auto", CPU)
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {threads} threads, {amp}\n")
    print("| model | lever | img/s | x eager |\n|---|---|---|---|")
    for name, (cfg, batch) in MODELS.items():
        base = None
        for lever, attention, fused, compiled in LEVERS:
            if compiled and args.no_compile:
                continue
            rate = step_rate(cfg, batch, attention, fused, compiled, args.steps)
            base = base or rate
            print(f"| {name}, batch {batch} | {lever} | {rate:.0f} | x{rate / base:.2f} |", flush=True)
    print("\n| precision | SDPA's CPU kernel (forward, backward) |\n|---|---|")
    for label, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        print(f"| {label} | {attention_op(dtype)} |")
    cfg, batch = MODELS["R3 ViT"]
    print(f"\n| op (R3 ViT, one eager {amp} step, batch {batch}) | ms | share |\n|---|---|---|")
    for op, ms, share in top_ops(cfg, batch, rows=10):
        print(f"| `{op}` | {ms:.0f} | {100 * share:.1f} % |")
    rate, step, ceiling = matmul_ceiling(cfg, batch)
    print(
        f"\nR3 ViT, batch {batch}: its linear layers' matrix products run at {rate:.0f} GFLOP/s ({amp}); a step "
        f"counts {step:.1f} GFLOP; at that rate and nothing else: {ceiling:.0f} img/s"
    )


if __name__ == "__main__":
    main()
