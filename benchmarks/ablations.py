"""What closes the gap (issue 43 item 3): the hybrid ViT's ablation study and the training-set-size study.

Study "gap": each variant is the `vit-hybrid` recipe at the study's budget, with a validation split to decide on,
plus the one change the references propose: SAM, MixUp and Cutout (R5), CutMix and R4's tuned Adam (R4), or an
architecture change a faster or better recipe might take.
Study "size" (R4's accuracy against training-set size): the hybrid ViT and airbench94, each at its own recipe, on
10 %, 30 % and 100 % of the training set, every point given the same minutes of training (the epochs scale
with 1 / size). Every run goes through the pipeline in a clone of its own, and is recorded from there into
benchmarks/ablations.json:

    python benchmarks/ablations.py commands [--study size] [--seeds 3]    # the `dvc exp run` lines, one per run
    python benchmarks/ablations.py record --repo ../abl --variant sam       # after that clone's run ended
    python benchmarks/ablations.py record --repo ../abl --study size --variant hybrid-10
    python benchmarks/ablations.py table                                  # the Markdown BENCHMARKS.md shows

The report shows the same tables (measure/ablation.py builds them).
"""

from __future__ import annotations

import argparse
import json
import shlex
from functools import reduce
from pathlib import Path

import yaml
from recipes import AIRBENCH94, VIT_HYBRID, Recipe, dvc_set_args, nest

from reprovision.config import Params
from reprovision.layout import ABLATIONS, METRICS, SUMMARY
from reprovision.measure import ablation

RESULTS = Path(__file__).resolve().parents[1] / ABLATIONS
STUDY = ablation.GAP_STUDY  # the hybrid ViT at full data, 10 epochs (~15 min of training per run on EPYC-512)
# The study's budget and the split its decisions read, on top of the recipe.
BUDGET = {"vit.epochs": 10, "data.val_fraction": 0.1}
VARIANTS: dict[str, dict] = {
    ablation.BASELINE: {},
    "sam": {"vit.sam": "sam"},  # R5: SAM, rho 0.05 (twice the passes: its runs take about twice the time)
    "mixup": {"augment.mixup_prob": 1.0, "augment.mixup_alpha": 0.2},  # R5
    "cutout": {"augment.cutout_prob": 1.0, "augment.cutout_size": 8},  # R5
    "cutmix": {"augment.cutmix_prob": 0.5, "augment.cutmix_alpha": 1.0},  # R4: per mini-batch
    "adam-r4": {"vit.optimizer": "adam", "vit.lr_mult": 0.4, "vit.weight_decay": 1e-5},  # R4's tuned ViT Adam
    # Architecture candidates for a recipe at 93 %: airbench's pool-before-BN order (faster), CCT's sequence pooling
    "pool-first": {"vit.tokenizer_pool_first": True},
    "seq-pool": {"vit.pool": "seq"},
}


# The size study: which recipe each model runs, the sizes, and the minutes every point trains for: airbench94's
# own at full data (10 epochs), so that its 100 % point is its recipe. Seconds per epoch on all 50,000 images,
# measured on EPYC-512 (benchmarks/reference_scale.json: airbench94 seed 0 alone; the third vit-hybrid recipe's
# seed 0), fix each point's epochs once for every seed.
SIZE_MODELS: dict[str, Recipe] = {"hybrid": VIT_HYBRID, "airbench94": AIRBENCH94}
SIZE_FRACTIONS = (0.1, 0.3, 1.0)
SIZE_MINUTES = 16
FULL_EPOCH_SECONDS = {"hybrid": 108.5, "airbench94": 91.5}
SIZE_VAL_FRACTION = 0.1


def size_variant(model: str, fraction: float) -> str:
    return f"{model}-{round(100 * fraction)}"


SIZE_VARIANTS: dict[str, tuple[str, float]] = {size_variant(m, f): (m, f) for m in SIZE_MODELS for f in SIZE_FRACTIONS}


def family(model: str) -> str:
    """The classifier family (and so the stage) a size-study model trains as: vit or cnn."""
    return SIZE_MODELS[model].models[0]


def size_epochs(model: str, fraction: float) -> int:
    """Epochs that give `model` SIZE_MINUTES of training on `fraction` of the training set (less validation)."""
    images = fraction * (1 - SIZE_VAL_FRACTION)
    return max(1, round(SIZE_MINUTES * 60 / (FULL_EPOCH_SECONDS[model] * images)))


def variants(study: str) -> list[str]:
    return list(VARIANTS if study == STUDY else SIZE_VARIANTS)


def overrides(variant: str, seed: int, study: str = STUDY) -> dict:
    """Every param the run sets: the recipe, the study's budget, the variant and the seed."""
    if variant not in variants(study):
        raise SystemExit(f"unknown variant {variant!r} of study {study!r}; its variants: {', '.join(variants(study))}")
    if study == STUDY:
        return {**VIT_HYBRID.overrides, "recipe": VIT_HYBRID.name, **BUDGET, **VARIANTS[variant], "seed": seed}
    model, fraction = SIZE_VARIANTS[variant]
    size = {
        "data.train_fraction": fraction,
        "data.val_fraction": SIZE_VAL_FRACTION,
        f"{family(model)}.epochs": size_epochs(model, fraction),
    }
    return {**SIZE_MODELS[model].overrides, "recipe": SIZE_MODELS[model].name, **size, "seed": seed}


def stage(variant: str, study: str) -> str:
    return "train-vit" if study == STUDY else f"train-{family(SIZE_VARIANTS[variant][0])}"


def command(variant: str, seed: int, study: str = STUDY) -> str:
    name = f"abl-{study}-{variant}-s{seed}"
    set_args = dvc_set_args(overrides(variant, seed, study))
    return shlex.join(["dvc", "exp", "run", "-n", name, *set_args, stage(variant, study)])


def as_configured(params: dict, keys) -> dict:
    """Each dotted key's value as the stages read it: through `Params`, whose types turn the `1e-05` that DVC
    writes for `-S vit.weight_decay=1e-05` (a string to PyYAML) into the float."""
    config = Params.model_validate(params)
    return {key: reduce(getattr, key.split("."), config) for key in keys}


def record(repo: Path, variant: str, study: str = STUDY) -> dict:
    """The finished run in `repo` as one entry of RESULTS (a run recorded again replaces its entry). Its test
    accuracy is the training stage's figure of the weights it shipped (these runs train only: no evaluate)."""
    params = yaml.safe_load((repo / "params.yaml").read_text())
    seed = params["seed"]
    expected = overrides(variant, seed, study)
    found, wanted = as_configured(params, expected), as_configured(nest(expected), expected)
    wrong = {k: (wanted[k], found[k]) for k in expected if found[k] != wanted[k]}
    if wrong:
        raise SystemExit(f"{repo}'s params.yaml is not variant {variant!r} (key: wanted, found): {wrong}")
    trained_as = stage(variant, study).removeprefix("train-")
    summary = json.loads((repo / METRICS / trained_as / SUMMARY).read_text())
    entry = {
        "study": study,
        "variant": variant,
        "seed": seed,
        "val_acc": summary["val_acc"],
        "test_acc": summary.get("monitor_test_acc", summary.get("test_acc")),
        "seconds": summary["train_seconds"],
        "overrides": VARIANTS[variant] if study == STUDY else {},
        "epochs": summary["epochs_trained"],
        "params": expected,
    }
    if study != STUDY:
        model, fraction = SIZE_VARIANTS[variant]
        entry.update(model=model, train_fraction=fraction)
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"runs": []}
    runs = [r for r in results["runs"] if (r["study"], r["variant"], r["seed"]) != (study, variant, seed)]
    results["runs"] = [*runs, entry]
    ablation.check_entries(results["runs"])
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    return entry


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    commands = sub.add_parser("commands", help="print the dvc exp run line of every run")
    commands.add_argument("--seeds", type=int, default=3)
    commands.add_argument("--study", choices=[STUDY, ablation.SIZE_STUDY], default=STUDY)
    rec = sub.add_parser("record", help="record the finished run of a clone")
    rec.add_argument("--repo", type=Path, required=True)
    rec.add_argument("--study", choices=[STUDY, ablation.SIZE_STUDY], default=STUDY)
    rec.add_argument("--variant", required=True, choices=[*VARIANTS, *SIZE_VARIANTS])
    sub.add_parser("table", help="print the tables of benchmarks/ablations.json as Markdown")
    args = parser.parse_args()
    if args.command == "commands":
        for seed in range(args.seeds):
            for variant in variants(args.study):
                print(command(variant, seed, args.study))
    elif args.command == "record":
        print(json.dumps(record(args.repo, args.variant, args.study), indent=2))
    else:
        runs = json.loads(RESULTS.read_text())["runs"]
        tables = [ablation.markdown(runs)] if ablation.gap_rows(runs) else []
        if any(r["study"] == ablation.SIZE_STUDY for r in runs):
            tables.append(ablation.size_markdown(runs))
        print("\n\n".join(tables) or "(no run recorded)")


if __name__ == "__main__":
    main()
