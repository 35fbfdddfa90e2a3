"""How fast, and how good, each reference model trains under each recipe. A script, not a test.

    python benchmarks/benchmark.py                          # every recipe, on a GPU if there is one
    python benchmarks/benchmark.py --cpu-mode               # a tiny CPU-sized run: proves the path runs
    python benchmarks/benchmark.py --cpu-table              # the CPU speed table of BENCHMARKS.md
    (add --data <dir> unless data/prepared exists: see --help)

For every model x recipe it trains with the library's own loops (`reprovision.training.fit_classifier`,
`reprovision.training.fit_gan`), set up as the pipeline's stages set them up, and prints
one Markdown table row: throughput, seconds per epoch (measured, and extrapolated to a full
epoch when only a fraction of the data or of the steps was used), total time, final test
accuracy, achieved TFLOP/s against FLOPs counted with `FlopCounterMode`, peak GPU memory,
and the speed-up over the time the reference reported. Recipes live in recipes.py.

`--cpu-table` instead times, on the CPU with a fixed thread count, the R3 ViT and CNN in the
project's loop (`fit`, set up by the stage's own `setup`) and in a minimal hand-written PyTorch
loop, each in fp32 and under bf16 autocast, and prints one Markdown table with the machine it ran on.

Imports only torch, numpy, PIL, PyYAML, scikit-learn/torchvision (through reprovision.data.datasets)
and pydantic (through reprovision.config); no dvc, no mlflow. Reads data from prepared
arrays (`dvc repro fetch-data` writes them to data/prepared) or straight from a raw mirror of the
official files (see BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import recipes  # benchmarks/recipes.py: this script's folder is on sys.path
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from reprovision.data.augment import make_policy, normalize
from reprovision.config import CLASSIFIER_LABELS, DATASET_SHAPES, ConfigError, Params, parse_params
from reprovision.data.datasets import DataError, load_split, read_mirror, stratified_subset
from reprovision.training.fit_gan import gan_optimizers, fit_gan
from reprovision.models import count_parameters
from reprovision.models.classifiers import FAMILIES
from reprovision.models.gan import build_gan
from reprovision.publish.references import REFERENCE, midpoint
from reprovision.core.runtime import attention_kernels, autocast_dtype, compiled_for_determinism, cpu_has_native_bf16, resolve_device, seed_everything
from reprovision.training.fit_classifier import DeviceData, fit_classifier

# The train-vit / train-cnn stages' own set-up (stages/train_classifier.py), not a copy of it.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "stages"))
from train_classifier import setup as classifier_setup  # noqa: E402

# Seconds per epoch the references reported on their own hardware (reprovision/publish/references.py), a
# range taken as its middle; None where the source reported none (R1's MLP GAN).
REFERENCE_S_PER_EPOCH: dict[str, float | None] = {m: midpoint(ref.get("s_per_epoch")) for m, ref in REFERENCE.items()}
# The issue's back-of-envelope training cost, GFLOP per image (forward + backward).
ISSUE_GFLOP_PER_IMAGE: dict[str, float | None] = {"vit": 2.1, "cnn": 1.25, "dcgan": None, "mlp": None}
CLASSIFIERS = tuple(FAMILIES)
FLOP_BATCH = 16  # FLOPs are linear in the batch: a small batch keeps the count cheap on a CPU
# 200 CIFAR-10 train images, 100 test images, 1 epoch, <= 5 GAN steps: about 3 minutes on 2 vCPUs.
CPU_MODE = {"train_fraction": 0.004, "test_fraction": 0.01, "epochs": 1, "gan_steps": 5}


# ------------------------------------------------------------------------------------------ data


def load_dataset(root: Path, name: str) -> tuple[dict[str, np.ndarray], str]:
    """The four arrays of `name` and where they came from: prepared arrays under `root` (fetch-data's
    data/prepared), else `root` read as a mirror of the official files (reprovision.data, md5-checked;
    CIFAR-10 may come from its lossy JPEG copy, and the source then says so)."""
    if (root / name / "train_x.npy").is_file():
        splits = {split: load_split(root, name, split) for split in ("train", "test")}
        return {f"{s}_{a}": getattr(splits[s], a) for s in splits for a in "xy"}, "prepared"
    try:
        return read_mirror(name, root, lossy_ok=True)
    except DataError as err:
        raise SystemExit(f"no usable {name} under {root} ({err}); pass --data data/prepared after `dvc repro fetch-data`") from None


def subset(arrays: dict[str, np.ndarray], split: str, fraction: float, seed: int, device: torch.device):
    """The pipeline's class-stratified subset, moved to the device as uint8 images + int64 labels."""
    x, y = arrays[f"{split}_x"], arrays[f"{split}_y"]
    idx = stratified_subset(y, fraction, seed)
    return torch.from_numpy(np.ascontiguousarray(x[idx])).to(device), torch.from_numpy(y[idx]).to(device)


# --------------------------------------------------------------------------------------- recipes


def effective_overrides(recipe: recipes.Recipe, model: str, args: argparse.Namespace) -> dict[str, Any]:
    """The recipe's overrides plus this run's data/epoch/compile knobs, as params.yaml keys.

    Only the sections `model` reads are kept, so the row's `dvc exp run -S` list re-runs just it.
    """
    base = Params()
    out = dict(recipe.overrides)
    if args.train_fraction is not None:
        out["data.train_fraction"] = out["gan.train_fraction"] = args.train_fraction
    if args.test_fraction is not None:
        out["data.test_fraction"] = args.test_fraction
    if model in CLASSIFIERS:
        if args.compile:
            out[f"{model}.compile"] = True
        if args.epochs is not None:
            epochs = out.get(f"{model}.epochs", base.classifier(model).epochs)
            warmup = out.get(f"{model}.warmup_epochs", base.classifier(model).warmup_epochs)
            out[f"{model}.epochs"] = args.epochs
            if warmup:  # keep the warm-up's share of the run, and leave at least one epoch of decay
                out[f"{model}.warmup_epochs"] = min(round(warmup * args.epochs / epochs), args.epochs - 1)
    else:
        if args.epochs is not None:
            out["gan.epochs"] = args.epochs
        if args.gan_steps is not None:
            out["gan.steps_per_epoch_max"] = args.gan_steps
    sections = {model, "data", "augment", "lr", "seed"} if model in CLASSIFIERS else {"gan", "seed"}
    return {key: value for key, value in out.items() if key.split(".")[0] in sections}


def apply(overrides: dict[str, Any], source: str) -> Params:
    """Params() with the dotted overrides set, validated like params.yaml (a typo'd key is an error)."""

    def merge(base: dict, patch: dict) -> dict:
        for key, value in patch.items():
            both_sections = isinstance(value, dict) and isinstance(base.get(key), dict)
            base[key] = merge(base[key], value) if both_sections else value
        return base

    return parse_params(merge(Params().model_dump(), recipes.nest(overrides)), source)


# ----------------------------------------------------------------------------------------- FLOPs


def classifier_flops(model: torch.nn.Module, channels: int, size: int, classes: int, device: torch.device) -> float:
    """Forward + backward FLOPs per image of one training step (the optimiser's update is not counted)."""
    model.train()
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(FLOP_BATCH, channels, size, size, device=device, generator=g)
    y = torch.randint(classes, (FLOP_BATCH,), device=device, generator=g)
    with FlopCounterMode(display=False) as counter, attention_kernels(device, None):
        F.cross_entropy(model(x), y).backward()
    return counter.get_total_flops() / FLOP_BATCH


def gan_flops(gen, disc, images: torch.Tensor, latent_dim: int) -> float:
    """FLOPs of one whole D + G step of `fit_gan`, per real image."""
    opt_g, opt_d = torch.optim.Adam(gen.parameters()), torch.optim.Adam(disc.parameters())
    rng = torch.Generator(device=images.device).manual_seed(0)
    with FlopCounterMode(display=False) as counter, contextlib.redirect_stdout(io.StringIO()):
        fit_gan(gen, disc, opt_g, opt_d, images[:FLOP_BATCH], latent_dim, FLOP_BATCH, 1, rng, max_steps=1, progress=False,
                  cuda_graphs=False)
    return counter.get_total_flops() / FLOP_BATCH


# ------------------------------------------------------------------------------------------ runs


def reset_peak_memory(device: torch.device) -> None:
    """Peak memory then covers the data on the device and the training run, not the FLOP count."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _timing(seconds: list[float], images_per_epoch: int) -> dict[str, float | None]:
    """Steady-state speed from the epochs after the first; the first one's excess is warm-up (compile)."""
    steady = statistics.median(seconds[1:]) if len(seconds) > 1 else seconds[0]
    return {
        "s_per_epoch": steady,
        "images_per_s": images_per_epoch / steady,
        "warmup_s": seconds[0] - steady if len(seconds) > 1 else None,
    }


def train_classifier(name: str, params: Params, arrays: dict[str, np.ndarray], device: torch.device,
                     cuda_graphs: bool = True) -> tuple[torch.nn.Module, list[dict], int, int, float]:
    """The train-<name> stage's set-up and loop: (model, history, train images, test images, seconds)."""
    cfg = params.classifier(name)
    rng = seed_everything(params.seed, device, params.deterministic)
    train_x, train_y = subset(arrays, "train", params.data.train_fraction, params.seed, device)
    test_x, test_y = subset(arrays, "test", params.data.test_fraction, params.seed, device)
    policy = make_policy(params.data.classifier_dataset, params.augment, train_x)
    model, train, val, augmenter = classifier_setup(FAMILIES[name], params, device, rng, train_x, train_y, policy)
    reset_peak_memory(device)
    started = time.perf_counter()
    history = fit_classifier(model, train, val, DeviceData(test_x, test_y), augmenter, cfg, params.learning_rate(name), rng,
                  progress=False, cuda_graphs=cuda_graphs)
    return model, history, len(train), len(test_y), time.perf_counter() - started


def run_classifier(name: str, params: Params, arrays: dict[str, np.ndarray], device: torch.device) -> dict:
    cfg = params.classifier(name)
    channels, size, _, classes = DATASET_SHAPES[params.data.classifier_dataset]
    flops = classifier_flops(FAMILIES[name].build(cfg, num_classes=classes, channels=channels, image_size=size).to(device),
                             channels, size, classes, device)
    model, history, train_images, test_images, total = train_classifier(name, params, arrays, device)
    amp = autocast_dtype(cfg.precision, device)
    return {
        **_timing([row["epoch_seconds"] for row in history], train_images),
        "total_s": total,
        "epochs": cfg.epochs,
        "batch_size": cfg.batch_size,
        "train_images": train_images,
        "test_images": test_images,
        "full_epoch_images": len(arrays["train_y"]),
        "test_acc": history[-1]["test_acc"],
        "flops_per_image": flops,
        "params": count_parameters(model),
        "precision": "fp32" if amp is None else str(amp).removeprefix("torch."),
        "history": history,
    }


def train_gan_pair(name: str, params: Params, images: torch.Tensor, device: torch.device, compile_: bool = False,
                   cuda_graphs: bool = True) -> tuple[torch.nn.Module, torch.nn.Module, list[dict], float]:
    """The train-gan stage's set-up (stages/train_gan.py) and loop, without its FID/sampling side work:
    (generator, discriminator, history, seconds)."""
    gcfg = params.gan
    mcfg = getattr(gcfg, name)
    rng = seed_everything(params.seed, device, params.deterministic)
    gen, disc = (net.to(device) for net in build_gan(name, mcfg, DATASET_SHAPES[params.data.gan_dataset][:3]))
    opt_g, opt_d = gan_optimizers(gen, disc, mcfg, device)
    step_gen, step_disc = (compiled_for_determinism(gen), compiled_for_determinism(disc)) if compile_ else (gen, disc)
    reset_peak_memory(device)
    started = time.perf_counter()
    history = fit_gan(
        step_gen, step_disc, opt_g, opt_d, images, mcfg.latent_dim, mcfg.batch_size, gcfg.epochs, rng,
        max_steps=gcfg.steps_per_epoch_max, progress=False, cuda_graphs=cuda_graphs and not compile_,
    )
    return gen, disc, history, time.perf_counter() - started


def run_gan(name: str, params: Params, arrays: dict[str, np.ndarray], device: torch.device, compile_: bool) -> dict:
    gcfg = params.gan
    mcfg = getattr(gcfg, name)
    images, _ = subset(arrays, "train", gcfg.train_fraction, params.seed, device)
    # Counted on a separate pair before seeding: the timed run then draws the stage's exact RNG stream.
    shape = DATASET_SHAPES[params.data.gan_dataset][:3]
    flops = gan_flops(*(net.to(device) for net in build_gan(name, mcfg, shape)), images, mcfg.latent_dim)
    gen, disc, history, total = train_gan_pair(name, params, images, device, compile_)
    steps = len(images) // mcfg.batch_size
    if gcfg.steps_per_epoch_max:
        steps = min(steps, gcfg.steps_per_epoch_max)
    full = len(arrays["train_y"]) // mcfg.batch_size * mcfg.batch_size
    return {
        **_timing([row["epoch_seconds"] for row in history], steps * mcfg.batch_size),
        "total_s": total,
        "epochs": gcfg.epochs,
        "batch_size": mcfg.batch_size,
        "train_images": steps * mcfg.batch_size,
        "test_images": 0,
        "full_epoch_images": full,
        "test_acc": None,
        "d_loss": history[-1]["d_loss"],
        "g_loss": history[-1]["g_loss"],
        "flops_per_image": flops,
        "params": count_parameters(gen) + count_parameters(disc),
        "precision": "fp32",  # fit_gan has no autocast (cuDNN's convolutions may use TF32, torch's default)
        "history": history,
    }


def dataset_of(model: str, params: Params) -> str:
    return params.data.classifier_dataset if model in CLASSIFIERS else params.data.gan_dataset


def benchmark(
    model: str, recipe: recipes.Recipe, overrides: dict, params: Params, compile_: bool, device: torch.device, data: dict
) -> dict:
    arrays, source = data[dataset_of(model, params)]
    print(f"\n== {model} / {recipe.name}: {', '.join(f'{k}={v}' for k, v in overrides.items()) or 'defaults'}", flush=True)
    if model in CLASSIFIERS:
        row = run_classifier(model, params, arrays, device)
    else:
        row = run_gan(model, params, arrays, device, compile_)  # fit_classifier() compiles the classifiers from their config
    s_full = row["full_epoch_images"] / row["images_per_s"]
    reference = REFERENCE_S_PER_EPOCH[model]
    return {
        "model": model,
        "recipe": recipe.name,
        "data_source": source,
        "compile": compile_,
        "overrides": overrides,
        "dvc_set_args": recipes.dvc_set_args(overrides),
        **row,
        "s_per_full_epoch": s_full,
        "gflop_per_image": row["flops_per_image"] / 1e9,
        "gflop_per_image_issue": ISSUE_GFLOP_PER_IMAGE.get(model),
        "tflop_per_s": row["flops_per_image"] * row["images_per_s"] / 1e12,
        "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "reference_s_per_epoch": reference,
        "speedup_vs_reference": reference / s_full if reference else None,
    }


# ----------------------------------------------------------------------------------------- table


def _fmt(value, spec: str, prefix: str = "") -> str:
    return "-" if value is None else f"{prefix}{value:{spec}}"


COLUMNS = [
    ("model", lambda r: r["model"]),
    ("recipe", lambda r: r["recipe"]),
    ("epochs", lambda r: str(r["epochs"])),
    ("train imgs/epoch", lambda r: str(r["train_images"])),
    ("img/s", lambda r: _fmt(r["images_per_s"], ",.0f")),
    ("s/epoch", lambda r: _fmt(r["s_per_epoch"], ".3f")),
    ("s/full epoch", lambda r: _fmt(r["s_per_full_epoch"], ".2f")),
    ("warm-up s", lambda r: _fmt(r["warmup_s"], ".2f")),
    ("total s", lambda r: _fmt(r["total_s"], ".1f")),
    ("test acc", lambda r: _fmt(r["test_acc"], ".2%")),
    ("GFLOP/img counted (issue)", lambda r: f"{r['gflop_per_image']:.3f} ({_fmt(r['gflop_per_image_issue'], '.2f')})"),
    ("TFLOP/s", lambda r: _fmt(r["tflop_per_s"], ".3f")),
    ("peak GiB", lambda r: _fmt(r["peak_gib"], ".2f")),
    ("ref s/epoch", lambda r: _fmt(r["reference_s_per_epoch"], ".0f")),
    ("vs ref", lambda r: _fmt(r["speedup_vs_reference"], ".3g", "x")),
]


def markdown_table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(name for name, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(r) for _, cell in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


def environment(device: torch.device) -> dict:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, StopIteration):
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU: {cpu}",
        "cpu": cpu,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "load_average_1min": os.getloadavg()[0],  # other work on the machine slows a CPU run
    }


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
        print(f"1-minute load {load:.2f} >= {limit}: waiting ({waited / 60:.1f} of {max_wait_s / 60:.0f} min)", flush=True)
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
    return {"epoch_seconds": seconds, "timed_seconds": sum(timed), "images_per_s": images_per_epoch * len(timed) / sum(timed)}


def table_project(name: str, params: Params, arrays: dict[str, np.ndarray], device: torch.device, warmup: int) -> dict:
    """The project's loop, exactly as the train-<name> stage runs it: stage `setup`, then `fit`."""
    cfg = params.classifier(name)
    rng = seed_everything(params.seed, device)
    train_x, train_y = subset(arrays, "train", params.data.train_fraction, params.seed, device)
    test_x, test_y = subset(arrays, "test", params.data.test_fraction, params.seed, device)
    policy = make_policy(params.data.classifier_dataset, params.augment, train_x)
    model, train, val, augmenter = classifier_setup(FAMILIES[name], params, device, rng, train_x, train_y, policy)
    wall, cpu = time.perf_counter(), time.process_time()
    history = fit_classifier(model, train, val, DeviceData(test_x, test_y), augmenter, cfg, params.learning_rate(name), rng, progress=False)
    cores = (time.process_time() - cpu) / (time.perf_counter() - wall)
    return {**_timed([row["epoch_seconds"] for row in history], warmup, len(train)), "cores_busy": cores, "train_images": len(train)}


def table_plain(name: str, params: Params, arrays: dict[str, np.ndarray], device: torch.device, warmup: int) -> dict:
    """A minimal hand-written loop: the same model, optimiser and 128-image batches, no augmentation.

    The images are normalised once, before timing; every step is autocast (when bf16) forward,
    cross-entropy, zero_grad, backward, optimiser step. No scheduler, no metrics, no determinism flag.
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
        model.parameters(), lr=params.learning_rate(name), weight_decay=cfg.weight_decay
    )
    model.train()
    seconds = []
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(cfg.epochs):
        started = time.perf_counter()
        for xb, yb in batches:
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
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
    plan = []
    for name in CLASSIFIERS:
        for precision in PRECISIONS:
            overrides = {
                "data.train_fraction": _fraction(args.table_images, total_train),
                "data.test_fraction": _fraction(CPU_TABLE["test_images"], total_test),  # fit evaluates it, untimed
                "data.val_fraction": 0.0,
                f"{name}.batch_size": CPU_TABLE["batch_size"],
                f"{name}.epochs": warmup + timed,
                f"{name}.precision": precision,
            }
            params = apply(overrides, f"--cpu-table {name} {precision}")
            for loop in LOOPS:
                plan.append((name, precision, loop, params))
    channels, size, _, classes = DATASET_SHAPES["cifar10"]
    flops = {name: classifier_flops(FAMILIES[name].build(Params().classifier(name), num_classes=classes, channels=channels,
                                                   image_size=size), channels, size, classes, device)
             for name in CLASSIFIERS}

    load_before, waited = wait_for_quiet(LOAD_LIMIT, LOAD_POLL_S, args.max_wait)
    print(f"1-minute load {load_before:.2f} after waiting {waited / 60:.1f} min: timing", flush=True)
    measured_at = datetime.datetime.now().astimezone()
    rows = []
    for name, precision, loop, params in plan:
        print(f"\n== {name} / {loop} loop / {precision}", flush=True)
        run = table_project if loop == "project" else table_plain
        row = run(name, params, arrays, device, warmup)
        row.update(model=name, precision=precision, loop=loop, load_1min_after=os.getloadavg()[0],
                   gflop_per_image=flops[name] / 1e9, gflop_per_s=flops[name] / 1e9 * row["images_per_s"])
        print(f"{row['images_per_s']:.1f} img/s over {timed} timed epoch(s) of {row['train_images']} images "
              f"(epochs: {', '.join(f'{s:.2f}' for s in row['epoch_seconds'])} s)", flush=True)
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
        f"- Machine: {env['cpus']} CPUs, {mem}, `lscpu` model name \"{env['cpu']}\"; flags: {flags}",
        f"- Native bf16 (`runtime.cpu_has_native_bf16()`): **{'yes' if env['native_bf16'] else 'no'}**; "
        f"torch's CPU kernels: {env['torch_cpu_capability']}",
        f"- Software: torch {env['torch']}, Python {env['python']}, {env['threads']} threads (`torch.set_num_threads`)",
        f"- Date: {env['date']}; wall time {env['wall_s'] / 60:.1f} min",
        f"- Load (1-minute average): {env['load_1min_at_start']:.2f} when timing started "
        f"(after waiting {env['load_wait_s'] / 60:.1f} min; {env['load_1min_at_launch']:.2f} at launch), "
        f"{env['load_1min_at_end']:.2f} at the end (this run's own 2 threads count in it)",
        f"- Data: {env['images']} CIFAR-10 training images ({env['data_source']}), batches of "
        f"{CPU_TABLE['batch_size']}; {env['warmup_epochs']} untimed warm-up epoch, then {env['timed_epochs']} timed epoch{'s' if env['timed_epochs'] > 1 else ''}",
        "",
        "| model | loop | precision | img/s | GFLOP/s | bf16 / fp32 | project / plain | cores busy |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        fp32 = by[(r["model"], r["loop"], "fp32")]
        plain = by[(r["model"], "plain", r["precision"])]
        out.append("| " + " | ".join([
            f"{CLASSIFIER_LABELS[r['model']]} ({r['gflop_per_image']:.3f} GFLOP/img)",
            "project (`fit_classifier`)" if r["loop"] == "project" else "plain PyTorch",
            "fp32" if r["precision"] == "fp32" else "bf16 autocast",
            f"{r['images_per_s']:.1f}",
            f"{r['gflop_per_s']:.1f}",
            "-" if r["precision"] == "fp32" else f"x{r['images_per_s'] / fp32['images_per_s']:.2f}",
            "-" if r["loop"] == "plain" else f"x{r['images_per_s'] / plain['images_per_s']:.2f}",
            _fmt(r["cores_busy"], ".2f"),
        ]) + " |")
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


def plain_classifier(name: str, params: Params, arrays: dict[str, np.ndarray], device: torch.device,
                     warmup: int, timed: int) -> dict:
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


def plain_gan(name: str, params: Params, arrays: dict[str, np.ndarray], device: torch.device, warmup: int, timed: int) -> dict:
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


def plain_loop(model: str, params: Params, arrays: dict[str, np.ndarray], device: torch.device, warmup: int, timed: int) -> dict:
    run = plain_classifier if model in CLASSIFIERS else plain_gan
    return run(model, params, arrays, device, warmup, timed)


def gpu_table(args: argparse.Namespace, device: torch.device, env: dict, data: dict) -> None:
    rows = []
    for model in args.models:
        overrides = {f"{model}.epochs": GPU_TABLE["project_epochs"]} if model in CLASSIFIERS else {"gan.epochs": GPU_TABLE["project_epochs"]}
        params = apply(overrides, f"--gpu-table {model}")
        arrays = data[dataset_of(model, params)][0]
        print(f"\n== {model}: project loop, {GPU_TABLE['project_epochs']} epochs", flush=True)
        project = run_classifier(model, params, arrays, device) if model in CLASSIFIERS else run_gan(model, params, arrays, device, False)
        print(f"== {model}: plain loop, {GPU_TABLE['plain_timed_steps']} timed steps", flush=True)
        plain = plain_loop(model, params, arrays, device, GPU_TABLE["plain_warmup_steps"], GPU_TABLE["plain_timed_steps"])
        rows.append({"model": model, "batch_size": project["batch_size"], "precision": project["precision"],
                     "project_images_per_s": project["images_per_s"], "plain_images_per_s": plain["images_per_s"],
                     "project_s_per_epoch": project["s_per_epoch"], "ratio": project["images_per_s"] / plain["images_per_s"]})
        if args.json:
            write_results(args.json, env, "gpu-table", args, rows)
    print(f"\n{env['device']} | torch {env['torch']} | {env['date']}\n")
    print(gpu_table_markdown(rows))


def gpu_table_markdown(rows: list[dict]) -> str:
    out = ["| model | batch | precision | project img/s | plain img/s | project / plain |", "|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['model']} | {r['batch_size']} | {r['precision']} | {r['project_images_per_s']:,.0f} | "
                   f"{r['plain_images_per_s']:,.0f} | x{r['ratio']:.2f} |")
    return "\n".join(out)


# ------------------------------------------------------------------------------------------- cli


def _choices(allowed: tuple[str, ...] | list[str]):
    def parse(text: str) -> list[str]:
        picked = [item.strip() for item in text.split(",") if item.strip()]
        unknown = [item for item in picked if item not in allowed]
        if unknown or not picked:
            raise argparse.ArgumentTypeError(f"{unknown or text!r}: allowed {', '.join(allowed)} (comma-separated)")
        return picked

    return parse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--models", type=_choices(recipes.MODELS), default=list(recipes.MODELS), help="default: all")
    p.add_argument("--recipes", type=_choices(list(recipes.RECIPES)), default=["reference", "improved"],
                   help=f"of {', '.join(recipes.RECIPES)}; default: reference,improved")
    p.add_argument("--epochs", type=int, help="override every run's epochs (a warm-up keeps its share)")
    p.add_argument("--train-fraction", type=float, help="class-stratified share of each train split")
    p.add_argument("--test-fraction", type=float, help="class-stratified share of the CIFAR test split")
    p.add_argument("--gan-steps", type=int, help="cap on GAN steps per epoch (gan.steps_per_epoch_max)")
    p.add_argument("--data", type=Path, help="prepared arrays (data/prepared) or a raw mirror; "
                   "default: data/prepared, else $REPROVISION_DATA_MIRROR")
    p.add_argument("--compile", action="store_true", help="torch.compile the models; compile time shows as warm-up s")
    p.add_argument("--json", type=Path, help="also write every result, with per-epoch history, here")
    p.add_argument("--gpu-table", action="store_true",
                   help="the project's loop against a minimal eager loop, same model, batch and precision, on --device "
                   f"(reference recipes, full data: {GPU_TABLE['project_epochs']} project epochs, "
                   f"{GPU_TABLE['plain_timed_steps']} plain steps); honours --models, --data and --json")
    p.add_argument("--cpu-mode", action="store_true",
                   help=f"a CPU-sized run, labelled as such: device cpu and, unless given, {CPU_MODE}")
    table = p.add_argument_group("--cpu-table: the CPU speed table of BENCHMARKS.md (ignores the options above but --data and --json)")
    table.add_argument("--cpu-table", action="store_true",
                       help="time the R3 ViT and CNN on the CPU, project loop vs plain PyTorch loop, fp32 vs bf16 autocast, "
                       "and print one Markdown table")
    table.add_argument("--table-images", type=int, default=CPU_TABLE["images"],
                       help="CIFAR-10 training images per epoch (default: %(default)s; 128 for a quick smoke run)")
    table.add_argument("--timed-epochs", type=int, default=CPU_TABLE["timed_epochs"],
                       help=f"epochs timed after {CPU_TABLE['warmup_epochs']} untimed warm-up epoch (default: %(default)s)")
    table.add_argument("--threads", type=int, default=CPU_TABLE["threads"], help="torch.set_num_threads (default: %(default)s)")
    table.add_argument("--max-wait", type=float, default=LOAD_WAIT_S,
                       help=f"seconds to wait for the 1-minute load average to fall below {LOAD_LIMIT}, polled every "
                       f"{LOAD_POLL_S} s, before timing; then it times anyway (default: %(default)s; 0: no wait)")
    args = p.parse_args(argv)
    if args.cpu_table:
        if args.cpu_mode:
            p.error("--cpu-table and --cpu-mode are two different runs: give one")
        if args.table_images < CPU_TABLE["batch_size"] or args.timed_epochs < 1 or args.threads < 1 or args.max_wait < 0:
            p.error(f"--cpu-table needs --table-images >= {CPU_TABLE['batch_size']}, --timed-epochs >= 1, --threads >= 1, --max-wait >= 0")
        args.device = "cpu"
    if args.cpu_mode:
        args.device = "cpu"
        for key, value in CPU_MODE.items():
            if getattr(args, key) is None:
                setattr(args, key, value)
    if args.epochs is not None and args.epochs < 1:
        p.error(f"--epochs {args.epochs}: must be >= 1")
    if args.gan_steps is not None and args.gan_steps < 0:
        p.error(f"--gan-steps {args.gan_steps}: must be >= 0 (0: full epochs)")
    if args.data is None:
        mirror = os.environ.get("REPROVISION_DATA_MIRROR")
        if not Path("data/prepared").is_dir() and not mirror:
            p.error("no --data given, and neither data/prepared (from `dvc repro fetch-data`) nor "
                    "$REPROVISION_DATA_MIRROR exists: pass --data <prepared arrays or raw mirror>")
        args.data = Path("data/prepared") if Path("data/prepared").is_dir() else Path(mirror)
    if not args.data.is_dir():
        p.error(f"--data {args.data}: not a directory (give data/prepared or a raw mirror)")
    return args


def describe_mode(args: argparse.Namespace) -> str:
    """How much of a full run this is, for the table's header: a partial run must never pass for a full one."""
    knobs = ("epochs", "train_fraction", "test_fraction", "gan_steps")
    changed = ", ".join(f"--{k.replace('_', '-')} {getattr(args, k)}" for k in knobs if getattr(args, k) is not None)
    if args.cpu_mode:
        return f"CPU MODE ({changed}): a tiny slice of data and steps; says nothing about a full run's speed or accuracy"
    return f"partial run ({changed})" if changed else "full run (every recipe's own epochs and all the data)"


def write_results(path: Path, env: dict, mode: str, args: argparse.Namespace, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    report = {"environment": env, "mode": mode, "args": vars(args), "results": rows}
    path.write_text(json.dumps(report, indent=1, default=str) + "\n")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.cpu_table:
        cpu_table(args)
        return
    # Before any CUDA work: deterministic cuBLAS (which seed_everything asks for) reads it at init.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    try:
        device = resolve_device(args.device)
    except ConfigError:
        raise SystemExit(f"--device {args.device}: no {args.device} device on this machine; use --device auto or cpu") from None
    try:
        # Every run's params are built and validated before any data is read or any model trained.
        plan = []
        for recipe in map(recipes.get, args.recipes):
            for model in args.models:
                if model in recipe.models:
                    overrides = effective_overrides(recipe, model, args)
                    plan.append((model, recipe, overrides, apply(overrides, f"recipe {recipe.name!r} + options")))
    except ConfigError as err:
        raise SystemExit(f"benchmark: {err}") from None
    if not plan:
        raise SystemExit(f"no recipe in {args.recipes} is meant for {args.models}: "
                         + "; ".join(f"{r.name}: {', '.join(r.models)}" for r in recipes.RECIPES.values()))
    env, mode = environment(device), describe_mode(args)
    print(f"{env['device']} | torch {env['torch']} | {env['torch_threads']} threads | load {env['load_average_1min']:.1f} "
          f"| {env['date']} | {mode}", flush=True)

    data = {}
    datasets = {dataset_of(model, Params()) for model in args.models} if args.gpu_table else {dataset_of(m, p) for m, _, _, p in plan}
    for name in sorted(datasets):
        started = time.perf_counter()
        data[name] = load_dataset(args.data, name)
        print(f"{name}: {data[name][1]} from {args.data}, {time.perf_counter() - started:.1f} s", flush=True)
    if args.gpu_table:
        gpu_table(args, device, env, data)
        return

    rows = []
    for run in plan:
        rows.append(benchmark(*run, args.compile, device, data))
        if args.json:  # after every run: a run cut off by a time limit keeps what it finished
            write_results(args.json, env, mode, args, rows)
    print(f"\n{env['device']} | torch {env['torch']} | {mode}\n")
    print(markdown_table(rows))
    if args.json:
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
