"""What closes the gap (issue 43 item 3): the hybrid ViT's ablation study, its runs and its table.

Each variant is the `vit-hybrid` recipe at the study's budget, with a validation split to decide on, plus the one
change the references propose: SAM, MixUp and Cutout (R5), CutMix and R4's tuned Adam (R4). Every run goes
through the pipeline in a clone of its own, and is recorded from there into benchmarks/ablations.json:

    python benchmarks/ablations.py commands [--seeds 3]            # the `dvc exp run` lines, one per run
    python benchmarks/ablations.py record --repo ../abl --variant sam   # after that clone's run ended
    python benchmarks/ablations.py table                           # the Markdown BENCHMARKS.md shows

The report shows the same table (measure/ablation.py builds both).
"""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path

import yaml
from recipes import VIT_HYBRID, dvc_set_args

from reprovision.config import flatten
from reprovision.layout import ABLATIONS, METRICS, SUMMARY
from reprovision.measure import ablation

RESULTS = Path(__file__).resolve().parents[1] / ABLATIONS
STUDY = "gap"  # the hybrid ViT at full data, 5 epochs (~18 min of training per run on EPYC-512)
# The study's budget and the split its decisions read, on top of the recipe.
BUDGET = {"vit.epochs": 5, "data.val_fraction": 0.1}
VARIANTS: dict[str, dict] = {
    ablation.BASELINE: {},
    "sam": {"vit.sam": "sam"},  # R5: SAM, rho 0.05 (twice the passes: its runs take about twice the time)
    "mixup": {"augment.mixup_prob": 1.0, "augment.mixup_alpha": 0.2},  # R5
    "cutout": {"augment.cutout_prob": 1.0, "augment.cutout_size": 8},  # R5
    "cutmix": {"augment.cutmix_prob": 0.5, "augment.cutmix_alpha": 1.0},  # R4: per mini-batch
    "adam-r4": {"vit.optimizer": "adam", "vit.lr_mult": 0.4, "vit.weight_decay": 1e-5},  # R4's tuned ViT Adam
}


def overrides(variant: str, seed: int) -> dict:
    """Every param the run sets: the recipe, the study's budget, the variant and the seed."""
    if variant not in VARIANTS:
        raise SystemExit(f"unknown variant {variant!r}; the variants: {', '.join(VARIANTS)}")
    return {**VIT_HYBRID.overrides, **BUDGET, **VARIANTS[variant], "seed": seed}


def command(variant: str, seed: int) -> str:
    name = f"abl-{STUDY}-{variant}-s{seed}"
    return shlex.join(["dvc", "exp", "run", "-n", name, *dvc_set_args(overrides(variant, seed)), "train-vit"])


def record(repo: Path, variant: str) -> dict:
    """The finished run in `repo` as one entry of RESULTS (a run recorded again replaces its entry)."""
    params = yaml.safe_load((repo / "params.yaml").read_text())
    summary = json.loads((repo / METRICS / "vit" / SUMMARY).read_text())
    seed = params["seed"]
    expected = overrides(variant, seed)
    flat = flatten(params)
    wrong = {k: (v, flat.get(k)) for k, v in expected.items() if flat.get(k) != v}
    if wrong:
        raise SystemExit(f"{repo}'s params.yaml is not variant {variant!r} (key: wanted, found): {wrong}")
    entry = {
        "study": STUDY,
        "variant": variant,
        "seed": seed,
        "val_acc": summary["val_acc"],
        "test_acc": summary["test_acc"],
        "seconds": summary["train_seconds"],
        "overrides": VARIANTS[variant],
        "epochs": summary["epochs_trained"],
        "params": expected,
    }
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"runs": []}
    runs = [r for r in results["runs"] if (r["study"], r["variant"], r["seed"]) != (STUDY, variant, seed)]
    results["runs"] = [*runs, entry]
    ablation.check_entries(results["runs"])
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    return entry


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    commands = sub.add_parser("commands", help="print the dvc exp run line of every run")
    commands.add_argument("--seeds", type=int, default=3)
    rec = sub.add_parser("record", help="record the finished run of a clone")
    rec.add_argument("--repo", type=Path, required=True)
    rec.add_argument("--variant", required=True, choices=list(VARIANTS))
    sub.add_parser("table", help="print the table of benchmarks/ablations.json as Markdown")
    args = parser.parse_args()
    if args.command == "commands":
        for seed in range(args.seeds):
            for variant in VARIANTS:
                print(command(variant, seed))
    elif args.command == "record":
        print(json.dumps(record(args.repo, args.variant), indent=2))
    else:
        print(ablation.markdown(json.loads(RESULTS.read_text())["runs"]))


if __name__ == "__main__":
    main()
