"""The one command a GPU owner runs: is this GPU exact, and how fast, on the four reference models?

    python benchmarks/gpu_check.py --data <mirror>            # on one CUDA GPU, <= 8 minutes on an H200
    python benchmarks/gpu_check.py --data <mirror> --smoke    # the same checks at tiny sizes, on the CPU (~20 s)

For each of R3's ViT and CNN and R2's DCGAN and R1's MLP GAN, under their reference recipes and
full epochs (50,000 CIFAR-10 or 60,000 MNIST images), it measures, in this order:

1. determinism: two short runs of the project's loop from the same seed, compared tensor by tensor
   ("identical", or the first tensor that differs); on CUDA also one with torch's NaN fill of
   unwritten memory kept in the captured step (graphs.py leaves it out: the same bits prove that
   safe) and one with the step eager instead of captured, which must give the same bits too;
2. speed: the project's loop (`fit_classifier`, `fit_gan`) for 3 epochs; s/epoch is the median of epochs 2-3
   (the first one captures the graphs), against the reference's figure and the H200 target;
   images/s, counted TFLOP/s (FlopCounterMode), peak GPU memory;
3. the project loop against a minimal hand-written eager loop (speed_tables.py, `benchmark.py --gpu-table`);
4. every recipe option the classifier fit supports (OPTION_SETS: gradient clipping, label smoothing, MixUp,
   CutMix, drop-path, decay-exempt groups, EMA, lookahead, each optimiser and scheduler, SAM, fp32, ...),
   one tiny run each per classifier: on CUDA the step captured as a graph against the same step eager, bit
   for bit, or the reason the loop runs it eagerly (fit_classifier.eager_reason: SAM's two passes);
5. then, while the budget lasts, R3's CNN and ViT for their full 30 epochs with test accuracy.

Every short run records the sha256 of its final weights (`weights_sha256`: two machines compare by it) and
the attention kernel it ran (`attention_kernel`, runtime.attention_backend).

It prints one Markdown table per part and writes every figure to --json after each step, so a run
cut short keeps what it finished. Reads MNIST's idx files and CIFAR-10 (the lossless binary or the
lossy JPEG copy, ~31 MB together) from a mirror or data/prepared; imports neither MLflow nor DVC.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import runs  # benchmarks/runs.py and speed_tables.py: this script's folder is on sys.path
import torch
from runs import CLASSIFIERS, apply, dataset_of, load_dataset, subset
from speed_tables import GPU_TABLE, _fraction, plain_loop

from reprovision.config import DATASET_SHAPES, Params
from reprovision.core import graphs
from reprovision.core.runtime import attention_backend, autocast_dtype, nondeterministic_op
from reprovision.models.classifiers import FAMILIES
from reprovision.publish.references import REFERENCE, midpoint
from reprovision.training.fit_classifier import eager_reason
from reprovision.training.optim import build_optimizer

MODELS = ("vit", "cnn", "dcgan", "mlp")
# The targets for one H200 (reference recipes, full epochs), s/epoch.
H200_TARGET_S_PER_EPOCH = {"vit": 3.0, "cnn": 1.5, "dcgan": 5.0, "mlp": 3.0}
FULL_RUNS = ("cnn", "vit")  # the last part, in this order, while the budget lasts

# Every recipe option the classifier fit supports (config.TrainConfig, the augment policy's mixing, the
# ViT's drop-path), one tiny set each over the model's reference recipe; "{m}." is the classifier's own
# section, a set naming one family's section runs for that family only, and a set that leaves a model's
# reference recipe as it is (adam for the CNN) is not run for it. tests/test_gpu_path.py checks that the
# sets change every TrainConfig field but STEP_NEUTRAL's.
OPTION_SETS: dict[str, dict[str, Any]] = {
    "grad_clip": {"{m}.grad_clip": 0.1},  # small enough to bite in a few steps
    "label_smoothing": {"{m}.label_smoothing": 0.1},
    "mixup": {"augment.mixup_prob": 1.0, "augment.mixup_alpha": 0.4},  # soft targets
    "cutmix": {"augment.cutmix_prob": 1.0, "augment.cutmix_alpha": 0.5},
    "no_augment": {"{m}.augment": False},
    "drop_path": {"vit.drop_path": 0.1},  # stochastic depth: random draws inside the captured step
    "decay_exempt": {"{m}.decay_exempt": True},  # parameter groups without weight decay
    "no_weight_decay": {"{m}.weight_decay": 0.0},
    "norm_lr_mult": {"{m}.norm_lr_mult": 4.0},  # a parameter group with its own lr
    "ema": {"{m}.ema_decay": 0.9},  # updated between replays; its weights are in the digest
    "lookahead": {"{m}.lookahead_every": 2, "{m}.lookahead_decay": 0.9},  # weights moved between replays
    "adam": {"{m}.optimizer": "adam"},
    "adamw": {"{m}.optimizer": "adamw"},
    "sgd": {"{m}.optimizer": "sgd", "{m}.momentum": 0.8, "{m}.nesterov": False, "{m}.batch_size": 96},
    "sgd_nesterov": {"{m}.optimizer": "sgd", "{m}.momentum": 0.9, "{m}.nesterov": True},
    "no_scheduler": {"{m}.scheduler": "none"},
    "cosine": {"{m}.scheduler": "cosine"},
    "step": {"{m}.scheduler": "step", "{m}.step_size": 1, "{m}.gamma": 0.5},
    "warmup_cosine": {"{m}.scheduler": "warmup_cosine", "{m}.warmup_epochs": 1},
    "warmup_linear": {
        "{m}.scheduler": "warmup_linear",
        "{m}.warmup_fraction": 0.3,
        "{m}.lr_start_factor": 0.1,
        "{m}.lr_end_factor": 0.05,
    },
    "sam": {"{m}.sam": "sam", "{m}.sam_rho": 0.1},  # two passes per step: eager (fit_classifier.eager_reason)
    "asam": {"{m}.sam": "asam"},
    "fp32": {"{m}.precision": "fp32"},  # the check's other runs use the recipe's precision (bf16 on CUDA)
}
# TrainConfig fields that do not change what a training step computes, and why no set varies them.
STEP_NEUTRAL = {
    "epochs": "how many steps, not what one does",
    "eval_batch_size": "evaluation only",
    "tta": "evaluation and serving only",
    "early_stop": "when training stops, not what a step does",
    # A value the captured step reads from a device copy refreshed before every replay (graphs.py);
    # the schedulers' sets change that value every step.
    "lr_mult": "scales the learning rate",
    "cpu_attention": "the attention kernel on the CPU only; on CUDA runtime.attention_backend picks it (recorded)",
    "cpu_optimizer": "the optimiser kernels on the CPU only; on CUDA they are always fused",
    # A compiled step is never captured (fit_classifier.eager_reason) and compiling takes minutes on the
    # first call: `benchmark.py --compile` measures it.
    "compile": "torch.compile runs eagerly, not as a graph",
}

# How much each part trains. Determinism: a few dozen steps and an epoch boundary, with the last
# partial batch (its own graph) in it. --smoke shrinks everything to a CPU-sized slice.
SIZES = {
    "gpu": {
        "determinism_images": 2_600,
        "determinism_gan_steps": 40,
        "determinism_epochs": 2,
        "test_images": None,
        "speed_epochs": 3,
        "gan_steps": 0,
        "train_images": None,
        "plain_warmup": GPU_TABLE["plain_warmup_steps"],
        "plain_timed": GPU_TABLE["plain_timed_steps"],
        "full_epochs": None,
        "option_images": 1_000,  # 7 full batches of 128 and a partial one, per epoch
        "option_batch": None,  # the recipe's
        "option_test_images": 500,
        "option_epochs": 2,  # an epoch boundary, and warmup_cosine's decay after its warm-up epoch
    },
    "smoke": {
        "determinism_images": 300,
        "determinism_gan_steps": 3,
        "determinism_epochs": 1,
        "test_images": 100,
        "speed_epochs": 3,
        "gan_steps": 4,
        "train_images": 300,
        "plain_warmup": 1,
        "plain_timed": 2,
        "full_epochs": 2,
        "option_images": 32,
        "option_batch": 16,  # 2 steps per epoch: the schedulers' sets then differ from one another
        "option_test_images": 20,
        "option_epochs": 2,
        # Small architectures: the smoke exercises the code, and CI runs it (the reference sizes took ~4 min);
        # two ViT blocks, as drop-path's rate rises from 0 at the first block (one block would never drop);
        # the DCGAN at half width (its full-width steps were two fifths of the smoke's time)
        "shrink": {
            "vit.depth": 2,
            "vit.embed_dim": 32,
            "vit.heads": 2,
            "cnn.widths": [8, 16],
            "cnn.hidden": 16,
            "gan.dcgan.width": 32,
        },
    },
}


def fraction(images: int | None, total: int) -> float:
    return 1.0 if images is None else _fraction(images, total)


def overrides_for(model: str, size: dict, arrays, *, images: int | None, epochs: int, gan_steps: int) -> dict:
    """params.yaml overrides of the reference recipe for one part of the check."""
    if model in CLASSIFIERS:
        return {
            "data.train_fraction": fraction(images, len(arrays["train_y"])),
            "data.test_fraction": fraction(size["test_images"], len(arrays["test_y"])),
            f"{model}.epochs": epochs,
            **{k: v for k, v in size.get("shrink", {}).items() if k.startswith(f"{model}.")},
        }
    # gan.fid_samples only so that params validate (its FID floor needs as many training images);
    # no FID is computed here.
    return {
        **{k: v for k, v in size.get("shrink", {}).items() if k.startswith(f"gan.{model}.")},
        "gan.train_fraction": fraction(images, len(arrays["train_y"])),
        "gan.epochs": epochs,
        "gan.steps_per_epoch_max": gan_steps,
        "gan.fid_samples": min(images or len(arrays["train_y"]), Params().gan.fid_samples),
    }


# ------------------------------------------------------------------------------------ determinism


def trained_state(
    model: str, params: Params, arrays, device: torch.device, cuda_graphs: bool
) -> tuple[dict, list[dict]]:
    """Every tensor a short run ends with (weights, buffers), on the CPU, and its per-epoch history."""
    if model in CLASSIFIERS:
        net, history, *_, ema = runs.train_classifier(model, params, arrays, device, cuda_graphs)
        state = {f"{model}.{k}": v for k, v in net.state_dict().items()}
        if ema is not None:  # the weights' moving average, kept beside them (ema_decay > 0)
            state |= {f"{model}.ema.{k}": v for k, v in ema.state_dict().items()}
    else:
        images, _ = subset(arrays, "train", params.gan.train_fraction, params.seed, device)
        gen, disc, history, _ = runs.train_gan_pair(model, params, images, device, cuda_graphs=cuda_graphs)
        state = {
            **{f"G.{k}": v for k, v in gen.state_dict().items()},
            **{f"D.{k}": v for k, v in disc.state_dict().items()},
        }
    timeless = [{k: v for k, v in row.items() if k != "epoch_seconds"} for row in history]
    return {k: v.detach().cpu().clone() for k, v in state.items()}, timeless


def digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 of every tensor's name, dtype, shape and bytes: two runs, anywhere, compare by this."""
    h = hashlib.sha256()
    for name, tensor in state.items():
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name} {t.dtype} {tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def compare(a: tuple[dict, list[dict]], b: tuple[dict, list[dict]]) -> str:
    """ "identical", or the first tensor (or history row) that differs and by how much."""
    (state_a, history_a), (state_b, history_b) = a, b
    for name, tensor in state_a.items():
        other = state_b[name]
        if not torch.equal(tensor, other):
            gap = (tensor.double() - other.double()).abs().max().item() if tensor.is_floating_point() else "n/a"
            return f"differs: {name} (max |diff| {gap:.3g})" if isinstance(gap, float) else f"differs: {name}"
    for row_a, row_b in zip(history_a, history_b):
        if row_a != row_b:
            return f"differs: history of epoch {row_a['epoch']}"
    return "identical"


def determinism(model: str, size: dict, arrays, device: torch.device) -> dict:
    """The project's run twice ("repeat"); on CUDA also with torch's NaN fill of unwritten memory kept
    in the captured step ("NaN fill"), which proves leaving it out safe for this model, and with the
    step eager instead of captured ("graph vs eager")."""
    params = apply(
        overrides_for(
            model,
            size,
            arrays,
            images=size["determinism_images"],
            epochs=size["determinism_epochs"],
            gan_steps=size["determinism_gan_steps"],
        ),
        f"gpu_check determinism {model}",
    )
    first = trained_state(model, params, arrays, device, cuda_graphs=True)
    second = trained_state(model, params, arrays, device, cuda_graphs=True)
    result = {"repeat": compare(first, second), "weights_sha256": digest(first[0])}
    if model in CLASSIFIERS:
        result["attention_kernel"] = kernel_of(model, params, device)
    if device.type != "cuda":
        return {**result, "nan_fill": "n/a (CPU: no graphs)", "graph_vs_eager": "n/a (CPU: no graphs)"}
    graphs.FILL_UNINITIALIZED_MEMORY = True
    try:
        result["nan_fill"] = compare(first, trained_state(model, params, arrays, device, cuda_graphs=True))
    finally:
        graphs.FILL_UNINITIALIZED_MEMORY = False
    result["graph_vs_eager"] = compare(first, trained_state(model, params, arrays, device, cuda_graphs=False))
    return result


def kernel_of(model: str, params: Params, device: torch.device) -> str:
    """The attention kernel a classifier's steps run under (runtime.attention_backend, as the stage records it)."""
    cfg = params.classifier(model)
    return attention_backend(device, autocast_dtype(cfg.precision, device), cfg.cpu_attention)


# ------------------------------------------------------------------------------------------ option sets


def option_sets(model: str) -> dict[str, dict[str, Any]]:
    """The OPTION_SETS that apply to classifier `model`, as params.yaml overrides of its reference recipe;
    those that would leave the recipe as it is are left out."""
    reference = Params().model_dump()
    out = {}
    for name, overrides in OPTION_SETS.items():
        if {key.split(".")[0] for key in overrides} - {"{m}", "augment", model}:
            continue  # another family's option
        mine = {key.replace("{m}", model): value for key, value in overrides.items()}
        if any(reference[key.split(".")[0]][key.split(".")[1]] != value for key, value in mine.items()):
            out[name] = mine
    return out


def option_set(model: str, overrides: dict[str, Any], size: dict, arrays, device: torch.device) -> dict:
    """One option set, tiny: its final weights' digest, its attention kernel and, on CUDA, the captured
    step against the eager one (or why the loop runs it eagerly)."""
    base = overrides_for(model, size, arrays, images=size["option_images"], epochs=size["option_epochs"], gan_steps=0)
    base["data.test_fraction"] = fraction(size["option_test_images"], len(arrays["test_y"]))
    if size["option_batch"]:
        base[f"{model}.batch_size"] = size["option_batch"]  # a set's own batch size (sgd's) wins
    params = apply({**base, **overrides}, f"gpu_check option set {model} {overrides}")
    cfg = params.classifier(model)
    channels, image_size, _, classes = DATASET_SHAPES[params.data.classifier_dataset]
    net = FAMILIES[model].build(cfg, num_classes=classes, channels=channels, image_size=image_size).to(device)
    eager = eager_reason(net, build_optimizer(net, cfg, params.learning_rate(model), device), cfg, device)
    amp = autocast_dtype(cfg.precision, device)
    graphed = trained_state(model, params, arrays, device, cuda_graphs=True)
    row = {
        "overrides": overrides,
        "precision": "fp32" if amp is None else str(amp).removeprefix("torch."),
        "attention_kernel": kernel_of(model, params, device),
        "step": "captured" if eager is None else f"eager: {eager}",
        "weights_sha256": digest(graphed[0]),
    }
    if eager is None:
        row["graph_vs_eager"] = compare(graphed, trained_state(model, params, arrays, device, cuda_graphs=False))
    else:
        row["graph_vs_eager"] = f"n/a ({eager})"
    return row


# ------------------------------------------------------------------------------------------ speed


def speed(model: str, size: dict, arrays, device: torch.device) -> dict:
    params = apply(
        overrides_for(
            model, size, arrays, images=size["train_images"], epochs=size["speed_epochs"], gan_steps=size["gan_steps"]
        ),
        f"gpu_check speed {model}",
    )
    run = (
        runs.run_classifier(model, params, arrays, device)
        if model in CLASSIFIERS
        else runs.run_gan(model, params, arrays, device, False)
    )
    row = {
        key: run[key]
        for key in (
            "s_per_epoch",
            "images_per_s",
            "warmup_s",
            "total_s",
            "epochs",
            "batch_size",
            "train_images",
            "full_epoch_images",
            "flops_per_image",
            "precision",
            "params",
        )
    }
    seconds = [r["epoch_seconds"] for r in run["history"]]
    row["epoch_seconds"] = seconds
    row["s_per_full_epoch"] = run["full_epoch_images"] / run["images_per_s"]
    row["tflop_per_s"] = run["flops_per_image"] * run["images_per_s"] / 1e12
    row["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    row["test_acc"] = run.get("test_acc")
    if model in CLASSIFIERS:
        row["eval_s_per_epoch"] = (run["total_s"] - sum(seconds)) / len(seconds)
    plain = plain_loop(model, params, arrays, device, size["plain_warmup"], size["plain_timed"])
    row["plain_images_per_s"] = plain["images_per_s"]
    row["plain_ratio"] = run["images_per_s"] / plain["images_per_s"]
    return row


def full_run(model: str, size: dict, arrays, device: torch.device) -> dict:
    epochs = size["full_epochs"] or Params().classifier(model).epochs
    params = apply(
        overrides_for(model, size, arrays, images=size["train_images"], epochs=epochs, gan_steps=0),
        f"gpu_check full {model}",
    )
    net, history, train_images, test_images, total, _ = runs.train_classifier(model, params, arrays, device)
    seconds = [r["epoch_seconds"] for r in history]
    return {
        "epochs": epochs,
        "train_images": train_images,
        "test_images": test_images,
        "total_s": total,
        "train_s": sum(seconds),
        "s_per_epoch": statistics.median(seconds[1:] or seconds),
        "test_acc": history[-1]["test_acc"],
        "train_acc": history[-1]["train_acc"],
        "weights_sha256": digest(net.state_dict()),
        "history": [{k: row[k] for k in ("epoch", "train_acc", "test_acc", "epoch_seconds")} for row in history],
    }


# ------------------------------------------------------------------------------------------ table


def _f(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown(report: dict) -> str:
    env = report["environment"]
    out = [
        f"GPU check: {env['device']}, torch {env['torch']}, {env['date']}, {report['mode']}",
        "",
        "| model | batch | precision | s/epoch (full epoch) | reference s/epoch | H200 target | "
        "img/s | TFLOP/s counted | "
        "peak GiB | project / plain loop | repeat run | with NaN fill | graph vs eager |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for model in (m for m in MODELS if m in report["models"]):
        r = report["models"][model]
        s, d = r.get("speed", {}), r.get("determinism", {})
        if "error" in r:
            out.append(f"| {model} | error: {r['error']} |" + " |" * 11)
            continue
        out.append(
            "| "
            + " | ".join(
                [
                    model,
                    str(s.get("batch_size", "-")),
                    s.get("precision", "-"),
                    _f(s.get("s_per_full_epoch"), ".2f"),
                    _f(midpoint(REFERENCE[model].get("s_per_epoch")), ".0f"),
                    _f(H200_TARGET_S_PER_EPOCH[model], ".1f"),
                    _f(s.get("images_per_s"), ",.0f"),
                    _f(s.get("tflop_per_s"), ".1f"),
                    _f(s.get("peak_gib"), ".2f"),
                    "-"
                    if "plain_ratio" not in s
                    else f"x{s['plain_ratio']:.2f} ({s['plain_images_per_s']:,.0f} img/s)",
                    d.get("repeat", "-"),
                    d.get("nan_fill", "-"),
                    d.get("graph_vs_eager", "-"),
                ]
            )
            + " |"
        )
    if report.get("option_sets"):
        out += [
            "",
            "| model | option set | precision | attention | step | graph vs eager | weights sha256 |",
            "|---|---|---|---|---|---|---|",
        ]
        for model, sets in report["option_sets"].items():
            for name, r in sets.items():
                if "skipped" in r or "error" in r:
                    out.append(f"| {model} | {name} | {r.get('skipped') or 'error: ' + r['error']} | | | | |")
                    continue
                out.append(
                    f"| {model} | {name} | {r['precision']} | {r['attention_kernel']} | {r['step']} | "
                    f"{r['graph_vs_eager']} | {r['weights_sha256'][:12]} |"
                )
    if report["full_runs"]:
        out += [
            "",
            "| model | epochs | s/epoch | total s (train + eval) | test acc | reference test acc | reference train s |",
            "|---|---|---|---|---|---|---|",
        ]
        for model, r in report["full_runs"].items():
            ref = REFERENCE[model]
            if "skipped" in r or "error" in r:
                out.append(f"| {model} | {r.get('skipped') or 'error: ' + r['error']} | | | | | |")
                continue
            acc = ref["test_acc"]
            seconds = ref["train_seconds"]
            out.append(
                f"| {model} | {r['epochs']} | {r['s_per_epoch']:.2f} | {r['total_s']:.0f} | {r['test_acc']:.2%} | "
                f"{acc[0]:.0%}-{acc[1]:.0%} | {seconds if isinstance(seconds, int) else f'{seconds[0]}-{seconds[1]}'} |"
            )
    return "\n".join(out)


# -------------------------------------------------------------------------------------------- run


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--data",
        type=Path,
        help="a raw mirror (mnist/MNIST/raw, cifar10/...) or data/prepared; "
        "default: data/prepared, else $REPROVISION_DATA_MIRROR",
    )
    p.add_argument(
        "--json", type=Path, default=Path("gpu_check.json"), help="where every figure goes (default: %(default)s)"
    )
    p.add_argument(
        "--smoke",
        action="store_true",
        help="tiny sizes (~1 min on 2 CPU cores): proves the check runs, measures nothing",
    )
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda, or cpu with --smoke")
    p.add_argument(
        "--budget-min",
        type=float,
        default=8.0,
        help="stop starting new parts once this many minutes have passed (default: %(default)s)",
    )
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    args = p.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in args.models if m not in MODELS]
    if unknown or not args.models:
        p.error(f"--models {unknown or args.models}: allowed {', '.join(MODELS)}")
    if args.data is None:
        mirror = os.environ.get("REPROVISION_DATA_MIRROR")
        args.data = Path("data/prepared") if Path("data/prepared").is_dir() else Path(mirror) if mirror else None
        if args.data is None:
            p.error(
                "no --data, data/prepared or $REPROVISION_DATA_MIRROR: pass --data <mirror holding MNIST and CIFAR-10>"
            )
    if not args.data.is_dir():
        p.error(f"--data {args.data}: not a directory")
    if args.budget_min <= 0:
        p.error("--budget-min must be > 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Before any CUDA work: cuBLAS reads it when it starts, and deterministic mode refuses cuBLAS without it.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    device = torch.device(args.device or ("cpu" if args.smoke else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA GPU here; `--smoke` runs the check at tiny sizes on the CPU")
    if device.type == "cpu" and not args.smoke:
        raise SystemExit("gpu_check: full sizes on a CPU would take hours; add --smoke, or run it on a CUDA GPU")
    size = SIZES["smoke" if args.smoke else "gpu"]
    started = time.perf_counter()
    deadline = started + args.budget_min * 60
    env = runs.environment(device)
    # The attention kernel the classifiers' bf16 steps use here (runtime.attention_backend), for the record.
    env["attention_kernel"] = attention_backend(device, autocast_dtype("auto", device))
    report = {
        "environment": env,
        "mode": "SMOKE (tiny sizes: measures nothing)" if args.smoke else "reference recipes, full epochs",
        "budget_min": args.budget_min,
        "models": {},
        "option_sets": {},
        "full_runs": {},
        "data": {},
    }

    def save() -> None:
        report["wall_s"] = time.perf_counter() - started
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1, default=str) + "\n")

    print(f"{env['device']} | torch {env['torch']} | {report['mode']} | budget {args.budget_min} min", flush=True)
    data = {}
    for name in sorted({dataset_of(m, Params()) for m in args.models}):
        t = time.perf_counter()
        arrays, source = load_dataset(args.data, name)
        data[name] = arrays
        report["data"][name] = {"source": source, "seconds": time.perf_counter() - t}
        print(f"{name}: {source}, {time.perf_counter() - t:.1f} s", flush=True)

    failed = False
    for model in args.models:
        arrays = data[dataset_of(model, Params())]
        entry = report["models"].setdefault(model, {})
        for part, run in (("determinism", determinism), ("speed", speed)):
            if time.perf_counter() > deadline:
                entry[part] = {"skipped": "budget spent"}
                continue
            t = time.perf_counter()
            try:
                entry[part] = run(model, size, arrays, device)
            except Exception as err:  # one model's failure must not hide the others' figures
                explained = nondeterministic_op(err)
                entry["error"] = str(explained or err).splitlines()[0][:300]
                entry["traceback"] = traceback.format_exc()
                print(entry["traceback"], flush=True)
                failed = True
                break
            finally:
                save()
            print(
                f"{model} {part} ({time.perf_counter() - t:.1f} s): "
                + json.dumps({k: v for k, v in entry[part].items() if k != "epoch_seconds"}, default=str),
                flush=True,
            )

    for model in (m for m in CLASSIFIERS if m in args.models):
        arrays = data[dataset_of(model, Params())]
        for name, overrides in option_sets(model).items():
            sets = report["option_sets"].setdefault(model, {})
            if time.perf_counter() > deadline:
                sets[name] = {"skipped": "budget spent"}
                continue
            t = time.perf_counter()
            try:
                sets[name] = option_set(model, overrides, size, arrays, device)
            except Exception as err:
                explained = nondeterministic_op(err)
                sets[name] = {"error": str(explained or err).splitlines()[0][:300], "traceback": traceback.format_exc()}
                print(sets[name]["traceback"], flush=True)
                failed = True
            finally:
                save()
            print(
                f"{model} option set {name} ({time.perf_counter() - t:.1f} s): "
                + json.dumps({k: v for k, v in sets[name].items() if k not in ("overrides", "traceback")}),
                flush=True,
            )

    for model in (m for m in FULL_RUNS if m in args.models):
        s = report["models"].get(model, {}).get("speed", {})
        if "s_per_epoch" not in s:
            report["full_runs"][model] = {"skipped": "no speed figure"}
            continue
        epochs = size["full_epochs"] or Params().classifier(model).epochs
        estimate = epochs * (s["s_per_epoch"] + s["eval_s_per_epoch"]) + max(s["warmup_s"], 0) + 10
        left = deadline - time.perf_counter()
        if estimate > left:
            report["full_runs"][model] = {"skipped": f"skipped: ~{estimate:.0f} s needed, {max(left, 0):.0f} s left"}
            save()
            continue
        t = time.perf_counter()
        try:
            report["full_runs"][model] = full_run(model, size, data[dataset_of(model, Params())], device)
        except Exception as err:
            report["full_runs"][model] = {"error": str(err).splitlines()[0][:300], "traceback": traceback.format_exc()}
            failed = True
        save()
        print(
            f"{model} full run ({time.perf_counter() - t:.1f} s): test acc "
            f"{report['full_runs'][model].get('test_acc')}",
            flush=True,
        )

    report["finished"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    save()
    print("\n" + markdown(report))
    print(f"\nwrote {args.json} ({report['wall_s']:.0f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
