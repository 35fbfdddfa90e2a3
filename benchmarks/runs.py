"""The benchmarks' shared part: data, recipes applied to params, FLOP counts, one timed training run
of a model through the library's own loops (set up as the stages set them up), and the results
table. benchmark.py (the command), speed_tables.py and gpu_check.py build on it.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import recipes  # benchmarks/recipes.py: this script's folder is on sys.path
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from reprovision.config import DATASET_SHAPES, Params, parse_params
from reprovision.core.runtime import attention_kernels, autocast_dtype, compiled_for_determinism, seed_everything
from reprovision.data.augment import make_policy
from reprovision.data.datasets import DataError, load_split, read_mirror, stratified_subset
from reprovision.models import count_parameters
from reprovision.models.classifiers import FAMILIES
from reprovision.models.gan import build_gan
from reprovision.publish.references import REFERENCE, midpoint
from reprovision.training.classifier_setup import setup as classifier_setup  # the stages' own set-up
from reprovision.training.fit_classifier import DeviceData, fit_classifier
from reprovision.training.fit_gan import fit_gan, gan_optimizers
from reprovision.training.optim import ema_of

# The benchmarks' shared constants, defined here only: benchmark.py and speed_tables.py import them.
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
        raise SystemExit(
            f"no usable {name} under {root} ({err}); pass --data data/prepared after `dvc repro fetch-data`"
        ) from None


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
        fit_gan(
            gen,
            disc,
            opt_g,
            opt_d,
            images[:FLOP_BATCH],
            latent_dim,
            FLOP_BATCH,
            1,
            rng,
            max_steps=1,
            progress=False,
            cuda_graphs=False,
        )
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


def train_classifier(
    name: str, params: Params, arrays: dict[str, np.ndarray], device: torch.device, cuda_graphs: bool = True
) -> tuple[torch.nn.Module, list[dict], int, int, float, torch.nn.Module | None]:
    """The train-<name> stage's set-up and loop: (model, history, train images, test images, seconds, the
    weights' moving average or None), the average kept as the stage keeps it when `ema_decay` > 0."""
    cfg = params.classifier(name)
    rng = seed_everything(params.seed, device, params.deterministic)
    train_x, train_y = subset(arrays, "train", params.data.train_fraction, params.seed, device)
    test_x, test_y = subset(arrays, "test", params.data.test_fraction, params.seed, device)
    policy = make_policy(params.data.classifier_dataset, params.augment, train_x)
    model, train, val, augmenter = classifier_setup(FAMILIES[name], params, device, rng, train_x, train_y, policy)
    ema = ema_of(model, cfg.ema_decay)  # None unless the recipe keeps one (ema_decay > 0)
    reset_peak_memory(device)
    started = time.perf_counter()
    history = fit_classifier(
        model,
        train,
        val,
        DeviceData(test_x, test_y),
        augmenter,
        cfg,
        params.learning_rate(name),
        rng,
        progress=False,
        cuda_graphs=cuda_graphs,
        ema=ema,
    )
    return model, history, len(train), len(test_y), time.perf_counter() - started, ema


def run_classifier(name: str, params: Params, arrays: dict[str, np.ndarray], device: torch.device) -> dict:
    cfg = params.classifier(name)
    channels, size, _, classes = DATASET_SHAPES[params.data.classifier_dataset]
    flops = classifier_flops(
        FAMILIES[name].build(cfg, num_classes=classes, channels=channels, image_size=size).to(device),
        channels,
        size,
        classes,
        device,
    )
    model, history, train_images, test_images, total, _ = train_classifier(name, params, arrays, device)
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


def train_gan_pair(
    name: str,
    params: Params,
    images: torch.Tensor,
    device: torch.device,
    compile_: bool = False,
    cuda_graphs: bool = True,
) -> tuple[torch.nn.Module, torch.nn.Module, list[dict], float]:
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
        step_gen,
        step_disc,
        opt_g,
        opt_d,
        images,
        mcfg.latent_dim,
        mcfg.batch_size,
        gcfg.epochs,
        rng,
        max_steps=gcfg.steps_per_epoch_max,
        progress=False,
        cuda_graphs=cuda_graphs and not compile_,
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
    model: str,
    recipe: recipes.Recipe,
    overrides: dict,
    params: Params,
    compile_: bool,
    device: torch.device,
    data: dict,
) -> dict:
    arrays, source = data[dataset_of(model, params)]
    print(
        f"\n== {model} / {recipe.name}: {', '.join(f'{k}={v}' for k, v in overrides.items()) or 'defaults'}", flush=True
    )
    if model in CLASSIFIERS:
        row = run_classifier(model, params, arrays, device)
    else:
        row = run_gan(
            model, params, arrays, device, compile_
        )  # fit_classifier() compiles the classifiers from their config
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
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "git_commit": git_commit(),
        "load_average_1min": os.getloadavg()[0],  # other work on the machine slows a CPU run
    }


def git_commit() -> str:
    """The checkout's commit (with `+dirty` for uncommitted changes), so that a JSON says what code made it."""
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"  # no git on the machine, or a copy without .git
    return commit.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def write_results(path: Path, env: dict, mode: str, args: argparse.Namespace, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    report = {"environment": env, "mode": mode, "args": vars(args), "results": rows}
    path.write_text(json.dumps(report, indent=1, default=str) + "\n")
