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
and the speed-up over the time the reference reported. Recipes live in recipes.py, the runs in
runs.py.

`--cpu-table` (speed_tables.py) instead times, on the CPU with a fixed thread count, the R3 ViT and CNN and the
vit-hybrid recipe's ViT in the project's loop (`fit_classifier`, set up by the stages' own `setup`,
reprovision/training/classifier_setup.py) and in a minimal hand-written PyTorch loop, each in fp32 and under bf16
autocast, and prints one Markdown table with the machine it ran on.

Imports only torch, numpy, PIL, PyYAML, scikit-learn/torchvision (through reprovision.data.datasets)
and pydantic (through reprovision.config); no dvc, no mlflow. Reads data from prepared
arrays (`dvc repro fetch-data` writes them to data/prepared) or straight from a raw mirror of the
official files (see BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import recipes  # benchmarks/recipes.py: this script's folder is on sys.path
from runs import (  # benchmarks/runs.py, beside this script
    CPU_MODE,
    apply,
    benchmark,
    dataset_of,
    effective_overrides,
    environment,
    load_dataset,
    markdown_table,
    write_results,
)
from speed_tables import CPU_TABLE, GPU_TABLE, LOAD_LIMIT, LOAD_POLL_S, LOAD_WAIT_S, cpu_table, gpu_table

from reprovision.config import ConfigError, Params
from reprovision.core.runtime import resolve_device

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
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--models", type=_choices(recipes.MODELS), default=list(recipes.MODELS), help="default: all")
    p.add_argument(
        "--recipes",
        type=_choices(list(recipes.RECIPES)),
        default=["reference", "improved"],
        help=f"of {', '.join(recipes.RECIPES)}; default: reference,improved",
    )
    p.add_argument("--epochs", type=int, help="override every run's epochs (a warm-up keeps its share)")
    p.add_argument("--train-fraction", type=float, help="class-stratified share of each train split")
    p.add_argument("--test-fraction", type=float, help="class-stratified share of the CIFAR test split")
    p.add_argument("--gan-steps", type=int, help="cap on GAN steps per epoch (gan.steps_per_epoch_max)")
    p.add_argument(
        "--data",
        type=Path,
        help="prepared arrays (data/prepared) or a raw mirror; default: data/prepared, else $REPROVISION_DATA_MIRROR",
    )
    p.add_argument("--compile", action="store_true", help="torch.compile the models; compile time shows as warm-up s")
    p.add_argument("--json", type=Path, help="also write every result, with per-epoch history, here")
    p.add_argument(
        "--gpu-table",
        action="store_true",
        help="the project's loop against a minimal eager loop, same model, batch and precision, on --device "
        f"(reference recipes, full data: {GPU_TABLE['project_epochs']} project epochs, "
        f"{GPU_TABLE['plain_timed_steps']} plain steps); honours --models, --data and --json",
    )
    p.add_argument(
        "--cpu-mode",
        action="store_true",
        help=f"a CPU-sized run, labelled as such: device cpu and, unless given, {CPU_MODE}",
    )
    table = p.add_argument_group(
        "--cpu-table: the CPU speed table of BENCHMARKS.md (ignores the options above but --data and --json)"
    )
    table.add_argument(
        "--cpu-table",
        action="store_true",
        help="time the R3 ViT and CNN on the CPU, project loop vs plain PyTorch loop, fp32 vs bf16 autocast, "
        "and print one Markdown table",
    )
    table.add_argument(
        "--table-images",
        type=int,
        default=CPU_TABLE["images"],
        help="CIFAR-10 training images per epoch (default: %(default)s; 128 for a quick smoke run)",
    )
    table.add_argument(
        "--timed-epochs",
        type=int,
        default=CPU_TABLE["timed_epochs"],
        help=f"epochs timed after {CPU_TABLE['warmup_epochs']} untimed warm-up epoch (default: %(default)s)",
    )
    table.add_argument(
        "--threads", type=int, default=CPU_TABLE["threads"], help="torch.set_num_threads (default: %(default)s)"
    )
    table.add_argument(
        "--max-wait",
        type=float,
        default=LOAD_WAIT_S,
        help=f"seconds to wait for the 1-minute load average to fall below {LOAD_LIMIT}, polled every "
        f"{LOAD_POLL_S} s, before timing; then it times anyway (default: %(default)s; 0: no wait)",
    )
    args = p.parse_args(argv)
    if args.cpu_table:
        if args.cpu_mode:
            p.error("--cpu-table and --cpu-mode are two different runs: give one")
        if (
            args.table_images < CPU_TABLE["batch_size"]
            or args.timed_epochs < 1
            or args.threads < 1
            or args.max_wait < 0
        ):
            p.error(
                f"--cpu-table needs --table-images >= {CPU_TABLE['batch_size']}, --timed-epochs >= 1, "
                "--threads >= 1, --max-wait >= 0"
            )
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
            p.error(
                "no --data given, and neither data/prepared (from `dvc repro fetch-data`) nor "
                "$REPROVISION_DATA_MIRROR exists: pass --data <prepared arrays or raw mirror>"
            )
        args.data = Path("data/prepared") if Path("data/prepared").is_dir() else Path(mirror)
    if not args.data.is_dir():
        p.error(f"--data {args.data}: not a directory (give data/prepared or a raw mirror)")
    return args


def describe_mode(args: argparse.Namespace) -> str:
    """How much of a full run this is, for the table's header: a partial run must never pass for a full one."""
    knobs = ("epochs", "train_fraction", "test_fraction", "gan_steps")
    changed = ", ".join(f"--{k.replace('_', '-')} {getattr(args, k)}" for k in knobs if getattr(args, k) is not None)
    if args.cpu_mode:
        return (
            f"CPU MODE ({changed}): a tiny slice of data and steps; says nothing about a full run's speed or accuracy"
        )
    return f"partial run ({changed})" if changed else "full run (every recipe's own epochs and all the data)"


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
        raise SystemExit(
            f"--device {args.device}: no {args.device} device on this machine; use --device auto or cpu"
        ) from None
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
        raise SystemExit(
            f"no recipe in {args.recipes} is meant for {args.models}: "
            + "; ".join(f"{r.name}: {', '.join(r.models)}" for r in recipes.RECIPES.values())
        )
    env, mode = environment(device), describe_mode(args)
    print(
        f"{env['device']} | torch {env['torch']} | {env['torch_threads']} threads | load "
        f"{env['load_average_1min']:.1f} "
        f"| {env['date']} | {mode}",
        flush=True,
    )

    data = {}
    datasets = (
        {dataset_of(model, Params()) for model in args.models}
        if args.gpu_table
        else {dataset_of(m, p) for m, _, _, p in plan}
    )
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
