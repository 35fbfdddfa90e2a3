"""The speed tables of BENCHMARKS.md (`benchmark.py --cpu-table`, `--gpu-table`): R3's ViT and CNN (and on
the CPU the vit-hybrid recipe's ViT), and the GANs on a GPU, in the project's loop and in a minimal
hand-written PyTorch loop, each in fp32 and under bf16 autocast, with the machine they ran on.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from recipes import VIT_HYBRID
from runs import (  # benchmarks/runs.py, beside this script
    CLASSIFIERS,
    _fmt,
    apply,
    classifier_flops,
    dataset_of,
    load_dataset,
    run_classifier,
    run_gan,
    subset,
    write_results,
)

from reprovision.config import CLASSIFIER_LABELS, DATASET_SHAPES, Params
from reprovision.core.runtime import attention_kernels, autocast_dtype, cpu_has_native_bf16, seed_everything
from reprovision.data.augment import make_policy, normalize
from reprovision.models.classifiers import FAMILIES
from reprovision.models.gan import build_gan
from reprovision.training.classifier_setup import setup as classifier_setup  # the stages' own set-up
from reprovision.training.fit_classifier import DeviceData, fit_classifier

# ------------------------------------------------------------------------------------- cpu table
# `--cpu-table`: the steady-state CPU speed of the R3 classifiers, the project's loop against a
# minimal hand-written PyTorch loop, each in fp32 and under bf16 autocast, in one run.

CPU_TABLE = {"images": 512, "batch_size": 128, "threads": 2, "warmup_epochs": 1, "timed_epochs": 2, "test_images": 100}
LOAD_LIMIT = 1.0  # wait for the 1-minute load average to drop below this before timing...
LOAD_POLL_S = 30  # ...checking this often...
LOAD_WAIT_S = 20 * 60  # ...for at most this long, then measure anyway (the header shows the load)
PRECISIONS = ("fp32", "bf16")
LOOPS = ("project", "plain")
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")  # what decides whether bf16 is native
# The table's models, each (family, overrides on top of params.yaml's defaults): R3's classifiers, and the ViT of
# the vit-hybrid recipe (issue 43's fast ViT) as that recipe trains it (the table sets batch size and epochs).
CPU_TABLE_MODELS: dict[str, tuple[str, dict]] = {
    **{CLASSIFIER_LABELS[name]: (name, {}) for name in CLASSIFIERS},
    "hybrid ViT (`vit-hybrid`)": ("vit", VIT_HYBRID.overrides),
}


def _fraction(images: int, total: int) -> float:
    """The data fraction whose stratified subset holds exactly `images` of `total` (int() rounds down)."""
    return 1.0 if images >= total else (images + 0.5) / total


def wait_for_quiet(limit: float, poll_s: float, max_wait_s: float) -> tuple[float, float]:
    """Wait until the 1-minute load average is below `limit`, at most `max_wait_s`; (load, seconds waited)."""
    started = time.monotonic()
    while True:
        load, waited = os.getloadavg()[0], time.monotonic() - started
        if load < limit or waited >= max_wait_s:
            return load, waited
        print(
            f"1-minute load {load:.2f} >= {limit}: waiting ({waited / 60:.1f} of {max_wait_s / 60:.0f} min)", flush=True
        )
        time.sleep(min(poll_s, max_wait_s - waited))


def machine() -> dict:
    """What the CPU table ran on: the CPU as lscpu names it, its bf16 support, memory, torch, threads."""
    model_name = "unknown"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model_name = line.split(":", 1)[1].strip()
                break
    flags: list[str] = []
    mem_gib = None
    with contextlib.suppress(OSError, StopIteration, ValueError):
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        flags = next(line.split(":", 1)[1].split() for line in lines if line.startswith("flags"))
    with contextlib.suppress(OSError, StopIteration, ValueError):
        lines = Path("/proc/meminfo").read_text().splitlines()
        mem_gib = int(next(line.split()[1] for line in lines if line.startswith("MemTotal:"))) / 2**20
    return {
        "cpu": model_name,
        "cpus": os.cpu_count(),
        "mem_gib": mem_gib,
        "flags": {flag: flag in flags for flag in CPU_FLAGS},
        "native_bf16": cpu_has_native_bf16(),
        "torch": torch.__version__,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }


def _timed(seconds: list[float], warmup: int, images_per_epoch: int) -> dict:
    """Speed over the epochs after the warm-up: their images over their summed training seconds."""
    timed = seconds[warmup:]
    return {
        "epoch_seconds": seconds,
        "timed_seconds": sum(timed),
        "images_per_s": images_per_epoch * len(timed) / sum(timed),
    }


def table_project(name: str, params: Params, arrays: dict[str, np.ndarray], device: torch.device, warmup: int) -> dict:
    """The project's loop, exactly as the train-<name> stage runs it: stage `setup`, then `fit_classifier`."""
    cfg = params.classifier(name)
    rng = seed_everything(params.seed, device)
    train_x, train_y = subset(arrays, "train", params.data.train_fraction, params.seed, device)
    test_x, test_y = subset(arrays, "test", params.data.test_fraction, params.seed, device)
    policy = make_policy(params.data.classifier_dataset, params.augment, train_x)
    model, train, val, augmenter = classifier_setup(FAMILIES[name], params, device, rng, train_x, train_y, policy)
    wall, cpu = time.perf_counter(), time.process_time()
    history = fit_classifier(
        model, train, val, DeviceData(test_x, test_y), augmenter, cfg, params.learning_rate(name), rng, progress=False
    )
    cores = (time.process_time() - cpu) / (time.perf_counter() - wall)
    return {
        **_timed([row["epoch_seconds"] for row in history], warmup, len(train)),
        "cores_busy": cores,
        "train_images": len(train),
    }


def table_plain(name: str, params: Params, arrays: dict[str, np.ndarray], device: torch.device, warmup: int) -> dict:
    """A minimal hand-written loop: the same model, optimiser and 128-image batches, no augmentation.

    The images are normalised once, before timing; every step is autocast (when bf16) forward,
    cross-entropy, zero_grad, backward, optimiser step. No scheduler, no metrics, no determinism flag.
    The model's CPU kernel choices (`cpu_attention`, `cpu_optimizer`) are kept: they are the model's speed,
    not the loop's.
    """
    cfg = params.classifier(name)
    channels, size, _, classes = DATASET_SHAPES[params.data.classifier_dataset]
    amp = autocast_dtype(cfg.precision, device)
    torch.use_deterministic_algorithms(False)
    torch.manual_seed(params.seed)
    train_x, train_y = subset(arrays, "train", params.data.train_fraction, params.seed, device)
    x = normalize(train_x, make_policy(params.data.classifier_dataset, params.augment, train_x))
    batches = list(zip(x.split(cfg.batch_size), train_y.split(cfg.batch_size)))
    model = FAMILIES[name].build(cfg, num_classes=classes, channels=channels, image_size=size).to(device)
    if FAMILIES[name].channels_last:  # the model as the stage builds it
        model = model.to(memory_format=torch.channels_last)
    optimizer = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[cfg.optimizer](
        model.parameters(),
        lr=params.learning_rate(name),
        weight_decay=cfg.weight_decay,
        fused=(cfg.cpu_optimizer == "fused") or None,
    )
    model.train()
    seconds = []
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(cfg.epochs):
        started = time.perf_counter()
        for xb, yb in batches:
            with (
                torch.autocast(device.type, dtype=amp, enabled=amp is not None),
                attention_kernels(device, amp, cfg.cpu_attention),
            ):
                logits = model(xb)
            loss = F.cross_entropy(logits.float(), yb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        loss.item()
        seconds.append(time.perf_counter() - started)
    cores = (time.process_time() - cpu) / (time.perf_counter() - wall)
    return {**_timed(seconds, warmup, len(train_y)), "cores_busy": cores, "train_images": len(train_y)}


def cpu_table(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    warmup, timed = CPU_TABLE["warmup_epochs"], args.timed_epochs
    command = shlex.join(["python", Path(sys.argv[0]).as_posix(), *sys.argv[1:]])
    started_at = datetime.datetime.now().astimezone()
    load_at_launch = os.getloadavg()[0]
    print(f"CPU table: {command}", flush=True)

    started = time.perf_counter()
    arrays, source = load_dataset(args.data, "cifar10")
    print(f"cifar10: {source} from {args.data}, {time.perf_counter() - started:.1f} s", flush=True)
    total_train, total_test = len(arrays["train_y"]), len(arrays["test_y"])
    channels, size, _, classes = DATASET_SHAPES["cifar10"]
    plan, flops = [], {}
    for label, (name, model_overrides) in CPU_TABLE_MODELS.items():
        for precision in PRECISIONS:
            overrides = {
                **model_overrides,
                "data.train_fraction": _fraction(args.table_images, total_train),
                "data.test_fraction": _fraction(CPU_TABLE["test_images"], total_test),  # fit evaluates it, untimed
                "data.val_fraction": 0.0,
                f"{name}.batch_size": CPU_TABLE["batch_size"],
                f"{name}.epochs": warmup + timed,
                f"{name}.precision": precision,
            }
            params = apply(overrides, f"--cpu-table {label} {precision}")
            for loop in LOOPS:
                plan.append((label, name, precision, loop, params))
        # FLOPs do not depend on the precision: the model as the last params build it
        model = FAMILIES[name].build(params.classifier(name), num_classes=classes, channels=channels, image_size=size)
        flops[label] = classifier_flops(model, channels, size, classes, device)

    load_before, waited = wait_for_quiet(LOAD_LIMIT, LOAD_POLL_S, args.max_wait)
    print(f"1-minute load {load_before:.2f} after waiting {waited / 60:.1f} min: timing", flush=True)
    measured_at = datetime.datetime.now().astimezone()
    rows = []
    for label, name, precision, loop, params in plan:
        print(f"\n== {label} / {loop} loop / {precision}", flush=True)
        run = table_project if loop == "project" else table_plain
        row = run(name, params, arrays, device, warmup)
        row.update(
            model=label,
            family=name,
            precision=precision,
            loop=loop,
            load_1min_after=os.getloadavg()[0],
            gflop_per_image=flops[label] / 1e9,
            gflop_per_s=flops[label] / 1e9 * row["images_per_s"],
        )
        print(
            f"{row['images_per_s']:.1f} img/s over {timed} timed epoch(s) of {row['train_images']} images "
            f"(epochs: {', '.join(f'{s:.2f}' for s in row['epoch_seconds'])} s)",
            flush=True,
        )
        rows.append(row)
        if args.json:  # after every row: a run cut short keeps what it finished
            write_results(args.json, {**machine(), "command": command, "partial": True}, "cpu-table", args, rows)
    load_after = os.getloadavg()[0]
    env = {
        **machine(),
        "command": command,
        "data_source": source,
        "date": measured_at.isoformat(timespec="seconds"),
        "started": started_at.isoformat(timespec="seconds"),
        "wall_s": (datetime.datetime.now().astimezone() - started_at).total_seconds(),
        "load_1min_at_launch": load_at_launch,
        "load_1min_at_start": load_before,
        "load_wait_s": waited,
        "load_1min_at_end": load_after,
        "images": args.table_images,
        "warmup_epochs": warmup,
        "timed_epochs": timed,
    }
    print("\n" + cpu_table_markdown(env, rows))
    if args.json:
        write_results(args.json, env, "cpu-table", args, rows)
        print(f"\nwrote {args.json}")


def cpu_table_markdown(env: dict, rows: list[dict]) -> str:
    by = {(r["model"], r["loop"], r["precision"]): r for r in rows}
    flags = ", ".join(f"{flag} {'yes' if present else 'no'}" for flag, present in env["flags"].items())
    mem = f"{env['mem_gib']:.0f} GiB" if env["mem_gib"] else "memory unknown"
    out = [
        f"- Command: `{env['command']}`",
        f'- Machine: {env["cpus"]} CPUs, {mem}, `lscpu` model name "{env["cpu"]}"; flags: {flags}',
        f"- Native bf16 (`runtime.cpu_has_native_bf16()`): **{'yes' if env['native_bf16'] else 'no'}**; "
        f"torch's CPU kernels: {env['torch_cpu_capability']}",
        f"- Software: torch {env['torch']}, Python {env['python']}, {env['threads']} threads (`torch.set_num_threads`)",
        f"- Date: {env['date']}; wall time {env['wall_s'] / 60:.1f} min",
        f"- Load (1-minute average): {env['load_1min_at_start']:.2f} when timing started "
        f"(after waiting {env['load_wait_s'] / 60:.1f} min; {env['load_1min_at_launch']:.2f} at launch), "
        f"{env['load_1min_at_end']:.2f} at the end (this run's own 2 threads count in it)",
        f"- Data: {env['images']} CIFAR-10 training images ({env['data_source']}), batches of "
        f"{CPU_TABLE['batch_size']}; {env['warmup_epochs']} untimed warm-up epoch, then "
        f"{env['timed_epochs']} timed epoch{'s' if env['timed_epochs'] > 1 else ''}",
        "",
        "| model | loop | precision | img/s | GFLOP/s | bf16 / fp32 | project / plain | cores busy |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        fp32 = by[(r["model"], r["loop"], "fp32")]
        plain = by[(r["model"], "plain", r["precision"])]
        out.append(
            "| "
            + " | ".join(
                [
                    f"{r['model']} ({r['gflop_per_image']:.3f} GFLOP/img)",
                    "project (`fit_classifier`)" if r["loop"] == "project" else "plain PyTorch",
                    "fp32" if r["precision"] == "fp32" else "bf16 autocast",
                    f"{r['images_per_s']:.1f}",
                    f"{r['gflop_per_s']:.1f}",
                    "-" if r["precision"] == "fp32" else f"x{r['images_per_s'] / fp32['images_per_s']:.2f}",
                    "-" if r["loop"] == "plain" else f"x{r['images_per_s'] / plain['images_per_s']:.2f}",
                    _fmt(r["cores_busy"], ".2f"),
                ]
            )
            + " |"
        )
    return "\n".join(out)


# ------------------------------------------------------------------------------------- gpu table
# `--gpu-table`: the project's loops (graph-captured, deterministic) against minimal hand-written
# eager loops, the same model, batch and precision, on the GPU, in one run. gpu_check.py prints it too.

GPU_TABLE = {"project_epochs": 3, "plain_warmup_steps": 20, "plain_timed_steps": 200}


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_steps(step, batches: int, warmup: int, timed: int, device: torch.device) -> float:
    """Seconds for `timed` calls of step(i) after `warmup` untimed ones, the device's queue drained."""
    for i in range(warmup):
        step(i % batches)
    _synchronize(device)
    started = time.perf_counter()
    for i in range(warmup, warmup + timed):
        step(i % batches)
    _synchronize(device)
    return time.perf_counter() - started


def plain_classifier(
    name: str, params: Params, arrays: dict[str, np.ndarray], device: torch.device, warmup: int, timed: int
) -> dict:
    """What a user writes by hand: normalised images on the device, no augmentation, torch's default
    optimiser implementation, autocast forward, cross-entropy, zero_grad, backward, step; eager,
    no determinism flag, no scheduler, no metrics."""
    cfg = params.classifier(name)
    channels, size, _, classes = DATASET_SHAPES[params.data.classifier_dataset]
    amp = autocast_dtype(cfg.precision, device)
    torch._C._set_deterministic_algorithms(False, warn_only=False)
    torch.manual_seed(params.seed)
    train_x, train_y = subset(arrays, "train", params.data.train_fraction, params.seed, device)
    x = normalize(train_x, make_policy(params.data.classifier_dataset, params.augment, train_x))
    batches = list(zip(x.split(cfg.batch_size), train_y.split(cfg.batch_size)))[: len(train_y) // cfg.batch_size]
    model = FAMILIES[name].build(cfg, num_classes=classes, channels=channels, image_size=size).to(device)
    if FAMILIES[name].channels_last:  # the model as the stage builds it
        model = model.to(memory_format=torch.channels_last)
    optimizer = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[cfg.optimizer](
        model.parameters(), lr=params.learning_rate(name), weight_decay=cfg.weight_decay
    )
    model.train()

    def step(i: int) -> None:
        xb, yb = batches[i]
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            logits = model(xb)
        loss = F.cross_entropy(logits.float(), yb)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    seconds = _time_steps(step, len(batches), warmup, timed, device)
    return {"images_per_s": timed * cfg.batch_size / seconds, "timed_steps": timed, "seconds": seconds}


def plain_gan(
    name: str, params: Params, arrays: dict[str, np.ndarray], device: torch.device, warmup: int, timed: int
) -> dict:
    """A minimal hand-written GAN loop: real batches in [-1, 1] on the device, noise from torch's global
    RNG, Adam with torch's default implementation, one D then one G update per step; eager."""
    mcfg = getattr(params.gan, name)
    torch._C._set_deterministic_algorithms(False, warn_only=False)
    torch.manual_seed(params.seed)
    images, _ = subset(arrays, "train", params.gan.train_fraction, params.seed, device)
    real = images.float() / 127.5 - 1
    batches = real[: len(real) // mcfg.batch_size * mcfg.batch_size].split(mcfg.batch_size)
    gen, disc = (net.to(device) for net in build_gan(name, mcfg, DATASET_SHAPES[params.data.gan_dataset][:3]))
    opt_g = torch.optim.Adam(gen.parameters(), lr=mcfg.lr_g, betas=(mcfg.beta1, mcfg.beta2))
    opt_d = torch.optim.Adam(disc.parameters(), lr=mcfg.lr_d, betas=(mcfg.beta1, mcfg.beta2))
    bce = F.binary_cross_entropy_with_logits

    def step(i: int) -> None:
        fake = gen(torch.randn(mcfg.batch_size, mcfg.latent_dim, device=device))
        d_real, d_fake = disc(batches[i]), disc(fake.detach())
        d_loss = bce(d_real, torch.ones_like(d_real)) + bce(d_fake, torch.zeros_like(d_fake))
        opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        opt_d.step()
        d_fake_for_g = disc(fake)
        g_loss = bce(d_fake_for_g, torch.ones_like(d_fake_for_g))
        opt_g.zero_grad(set_to_none=True)
        g_loss.backward()
        opt_g.step()

    seconds = _time_steps(step, len(batches), warmup, timed, device)
    return {"images_per_s": timed * mcfg.batch_size / seconds, "timed_steps": timed, "seconds": seconds}


def plain_loop(
    model: str, params: Params, arrays: dict[str, np.ndarray], device: torch.device, warmup: int, timed: int
) -> dict:
    run = plain_classifier if model in CLASSIFIERS else plain_gan
    return run(model, params, arrays, device, warmup, timed)


def gpu_table(args: argparse.Namespace, device: torch.device, env: dict, data: dict) -> None:
    rows = []
    for model in args.models:
        overrides = (
            {f"{model}.epochs": GPU_TABLE["project_epochs"]}
            if model in CLASSIFIERS
            else {"gan.epochs": GPU_TABLE["project_epochs"]}
        )
        params = apply(overrides, f"--gpu-table {model}")
        arrays = data[dataset_of(model, params)][0]
        print(f"\n== {model}: project loop, {GPU_TABLE['project_epochs']} epochs", flush=True)
        project = (
            run_classifier(model, params, arrays, device)
            if model in CLASSIFIERS
            else run_gan(model, params, arrays, device, False)
        )
        print(f"== {model}: plain loop, {GPU_TABLE['plain_timed_steps']} timed steps", flush=True)
        plain = plain_loop(
            model, params, arrays, device, GPU_TABLE["plain_warmup_steps"], GPU_TABLE["plain_timed_steps"]
        )
        rows.append(
            {
                "model": model,
                "batch_size": project["batch_size"],
                "precision": project["precision"],
                "project_images_per_s": project["images_per_s"],
                "plain_images_per_s": plain["images_per_s"],
                "project_s_per_epoch": project["s_per_epoch"],
                "ratio": project["images_per_s"] / plain["images_per_s"],
            }
        )
        if args.json:
            write_results(args.json, env, "gpu-table", args, rows)
    print(f"\n{env['device']} | torch {env['torch']} | {env['date']}\n")
    print(gpu_table_markdown(rows))


def gpu_table_markdown(rows: list[dict]) -> str:
    out = ["| model | batch | precision | project img/s | plain img/s | project / plain |", "|---|---|---|---|---|---|"]
    for r in rows:
        out.append(
            f"| {r['model']} | {r['batch_size']} | {r['precision']} | {r['project_images_per_s']:,.0f} | "
            f"{r['plain_images_per_s']:,.0f} | x{r['ratio']:.2f} |"
        )
    return "\n".join(out)
