"""What closes the gap (issue 43 item 3): the table built from benchmarks/ablations.json, each variant's gain over
its study's baseline with Welch's 95 % interval, decided on the validation split, in the report and BENCHMARKS."""

from __future__ import annotations

import json
import math

import pytest
from scipy import stats
from test_report import page, write_results

from reprovision.measure import ablation
from reprovision.publish import report


def runs(study: str, variant: str, val: list[float], test: list[float], overrides: dict) -> list[dict]:
    return [
        {
            "study": study,
            "variant": variant,
            "seed": seed,
            "val_acc": v,
            "test_acc": t,
            "seconds": 900.0 + seed,
            "overrides": overrides,
        }  # fmt: skip
        for seed, (v, t) in enumerate(zip(val, test))
    ]


ENTRIES = [
    *runs("gap", "baseline", [0.900, 0.904, 0.902], [0.897, 0.899, 0.901], {}),
    *runs("gap", "sam", [0.915, 0.918, 0.916], [0.911, 0.913, 0.915], {"vit.sam": "sam"}),
    *runs("gap", "mixup", [0.899, 0.906, 0.901], [0.900, 0.896, 0.902], {"augment.mixup_prob": 1.0}),
    *runs("gap", "cutout", [0.880, 0.884, 0.882], [0.905, 0.903, 0.907], {"augment.cutout_prob": 1.0}),
    *runs("gap", "adam-r4", [0.92], [0.91], {"lr": 4e-4}),
]


def test_each_variants_gain_and_interval_are_welchs_and_the_verdict_reads_validation():
    rows = {r["variant"]: r for r in ablation.gap_rows(ENTRIES)}
    assert rows["baseline"]["verdict"] == "" and math.isnan(rows["baseline"]["val_gain"])
    for variant in ("sam", "mixup", "cutout"):
        mine = [e for e in ENTRIES if e["variant"] == variant]
        base = [e for e in ENTRIES if e["variant"] == "baseline"]
        for split in ("val", "test"):
            a, b = [e[f"{split}_acc"] for e in mine], [e[f"{split}_acc"] for e in base]
            low, high = stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
            assert rows[variant][f"{split}_gain"] == pytest.approx((low + high) / 2)
            assert rows[variant][f"{split}_half"] == pytest.approx((high - low) / 2)
    assert rows["sam"]["verdict"] == "helps" and rows["mixup"]["verdict"] == "not distinguishable from zero"
    # Cutout helps on the test set here and hurts on validation: the verdict is validation's.
    assert rows["cutout"]["test_gain"] - rows["cutout"]["test_half"] > 0 and rows["cutout"]["verdict"] == "hurts"
    assert rows["adam-r4"]["verdict"] == "no interval (fewer than 2 seeds a side)" and rows["adam-r4"]["seeds"] == 1


def test_a_run_recorded_twice_or_missing_a_field_is_refused_naming_it():
    with pytest.raises(ValueError, match="variant 'sam', seed 0 is recorded twice"):
        ablation.gap_rows([*ENTRIES, ENTRIES[3]])
    with pytest.raises(ValueError, match="ablations entry 0 lacks overrides"):
        ablation.gap_rows([{k: v for k, v in ENTRIES[0].items() if k != "overrides"}])


def report_of(root, entries: list[dict]) -> tuple[str, str]:
    """The report (markdown, html) of a synthetic results tree whose benchmarks/ablations.json holds `entries`."""
    write_results(root)
    (root / "benchmarks").mkdir(exist_ok=True)
    (root / "benchmarks/ablations.json").write_text(json.dumps({"runs": entries}))
    report.build_report(root)
    return page(root)


def test_the_report_and_benchmarks_show_the_table_from_a_synthetic_ablations_json(tmp_path):
    md, html = report_of(tmp_path, ENTRIES)
    sam = next(r for r in ablation.gap_rows(ENTRIES) if r["variant"] == "sam")
    shown = ablation.points(sam["val_gain"], sam["val_half"])
    assert shown.startswith("+1.43 ± ") and 'id="ablations"' in html and shown in html
    assert "## What closes the gap" in md and f"| gap | sam | 3 | 91.63% | 91.30% | {shown} |" in md
    assert f"| gap | sam | 3 | 91.63% | 91.30% | {shown} |" in ablation.markdown(ENTRIES)
    (tmp_path / "benchmarks/ablations.json").write_text('{"runs": []}')  # none recorded: no section
    report.build_report(tmp_path)
    assert 'id="ablations"' not in page(tmp_path)[1]


def test_a_finished_run_is_recorded_once_per_variant_and_seed_and_a_mislabelled_one_refused(tmp_path, monkeypatch):
    import sys
    from pathlib import Path

    import yaml

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import ablations  # benchmarks/ablations.py
    from recipes import nest

    monkeypatch.setattr(ablations, "RESULTS", tmp_path / "ablations.json")
    repo = tmp_path / "clone"
    (repo / "metrics/vit").mkdir(parents=True)
    (repo / "params.yaml").write_text(yaml.safe_dump(nest(ablations.overrides("sam", 1))))
    summary = {"val_acc": 0.81, "monitor_test_acc": 0.8, "train_seconds": 1800.0, "epochs_trained": 5}
    (repo / "metrics/vit/summary.json").write_text(json.dumps(summary))
    for _ in range(2):  # recorded again: replaces its entry
        ablations.record(repo, "sam")
    (entry,) = json.loads((tmp_path / "ablations.json").read_text())["runs"]
    assert (entry["study"], entry["variant"], entry["seed"], entry["val_acc"], entry["test_acc"], entry["seconds"]) == (
        "gap", "sam", 1, 0.81, 0.8, 1800.0)  # fmt: skip
    assert entry["overrides"] == {"vit.sam": "sam"} and entry["params"]["vit.epochs"] == ablations.BUDGET["vit.epochs"]
    with pytest.raises(SystemExit, match="is not variant 'mixup'"):
        ablations.record(repo, "mixup")
    # `-S vit.weight_decay=1e-05` as DVC writes it: a string to PyYAML, the float to the stage.
    written = yaml.safe_dump(nest(ablations.overrides("adam-r4", 1))).replace(
        "weight_decay: 1.0e-05", "weight_decay: 1e-05"
    )
    assert yaml.safe_load(written)["vit"]["weight_decay"] == "1e-05"
    (repo / "params.yaml").write_text(written)
    assert ablations.record(repo, "adam-r4")["params"]["vit.weight_decay"] == 1e-05
    assert "abl-gap-cutmix-s2" in ablations.command("cutmix", 2) and "augment.cutmix_prob=0.5" in ablations.command(
        "cutmix", 2
    )


def size_runs(model: str, fraction: float, test: list[float]) -> list[dict]:
    return [
        {**entry, "variant": f"{model}-{round(100 * fraction)}", "model": model, "train_fraction": fraction}
        for entry in runs("size", "", [0.5] * len(test), test, {})
    ]


SIZE_ENTRIES = [
    *size_runs("hybrid", 0.1, [0.60, 0.62, 0.61]),
    *size_runs("airbench94", 0.1, [0.80, 0.81, 0.79]),
    *size_runs("hybrid", 1.0, [0.90, 0.91, 0.92]),
    *size_runs("airbench94", 1.0, [0.93, 0.94]),
]


def test_the_size_study_gives_each_models_accuracy_per_size_and_their_difference_with_intervals():
    rows = ablation.size_rows([*ENTRIES, *SIZE_ENTRIES])  # the gap study's entries are not the size study's
    assert [r["train_fraction"] for r in rows] == [0.1, 1.0]
    small = rows[0]["models"]["hybrid"]
    low, high = stats.t.interval(0.95, 2, loc=0.61, scale=stats.sem([0.60, 0.62, 0.61]))
    assert small["test_acc"] == pytest.approx(0.61) and small["half"] == pytest.approx((high - low) / 2)
    low, high = stats.ttest_ind([0.93, 0.94], [0.90, 0.91, 0.92], equal_var=False).confidence_interval(0.95)
    assert rows[1]["difference"] == pytest.approx(((low + high) / 2, (high - low) / 2))
    assert not any(r["study"] == "size" for r in ablation.gap_rows([*ENTRIES, *SIZE_ENTRIES]))
    table = ablation.size_markdown(SIZE_ENTRIES)
    assert "| Training set | hybrid test acc (95 %, seeds) | airbench94 test acc (95 %, seeds) |" in table
    assert "| 10 % | 61.00 ± 2.48 % (3) | 80.00 ± 2.48 % (3) |" in table


def test_the_size_study_runs_each_recipe_on_a_share_of_the_data_for_the_same_minutes(tmp_path, monkeypatch):
    import sys
    from pathlib import Path

    import yaml

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import ablations  # benchmarks/ablations.py
    from recipes import nest

    for model in ablations.SIZE_MODELS:  # epochs x images x seconds per image: the same minutes at every size
        budget = [
            ablations.size_epochs(model, f) * f * ablations.FULL_EPOCH_SECONDS[model] * 0.9 / 60
            for f in ablations.SIZE_FRACTIONS
        ]
        assert max(budget) - min(budget) < 0.1 * ablations.SIZE_MINUTES
    command = ablations.command("airbench94-30", 2, "size")
    assert "data.train_fraction=0.3" in command and "cnn.arch=airbench94" in command and command.endswith("train-cnn")
    monkeypatch.setattr(ablations, "RESULTS", tmp_path / "ablations.json")
    repo = tmp_path / "clone"
    (repo / "metrics/cnn").mkdir(parents=True)
    (repo / "params.yaml").write_text(yaml.safe_dump(nest(ablations.overrides("airbench94-30", 2, "size"))))
    summary = {"val_acc": 0.88, "monitor_test_acc": 0.87, "train_seconds": 950.0, "epochs_trained": 39}
    (repo / "metrics/cnn/summary.json").write_text(json.dumps(summary))
    entry = ablations.record(repo, "airbench94-30", "size")
    assert (entry["model"], entry["train_fraction"], entry["test_acc"], entry["seed"]) == ("airbench94", 0.3, 0.87, 2)
    assert ablation.size_rows([entry])[0]["models"]["airbench94"]["minutes"] == pytest.approx(950 / 60)


def test_the_report_shows_the_size_study_beside_the_gap_table_and_neither_without_its_runs(tmp_path):
    md, html = report_of(tmp_path, SIZE_ENTRIES)
    row = ablation.size_cells(ablation.size_rows(SIZE_ENTRIES)[0], ["hybrid", "airbench94"])
    assert 'id="size-study"' in html and 'id="ablations"' not in html  # size runs only: no gap table
    assert "## Accuracy against training-set size" in md and "| " + " | ".join(row) + " |" in md
    assert "| " + " | ".join(row) + " |" in ablation.size_markdown(SIZE_ENTRIES)
