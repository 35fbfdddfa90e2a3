"""What closes the gap (issue 43): each variant's gain over its study's baseline, with a 95 % interval over seeds;
and the size study: each model's accuracy against the share of the training set it trained on.

benchmarks/ablations.json holds `{"runs": [...]}`, one entry per run: `study`, `variant`, `seed`, `val_acc`,
`test_acc`, `seconds` and the `overrides` that make the variant (and `earlier_runs`: runs of an earlier recipe,
set aside with a `note`, in no table). A variant's gain is its mean over its seeds
minus the baseline's; the interval is Welch's t for a difference of two means (the two sets of runs share no
random draws that pairing by seed could cancel). Decisions read the validation gain: a variant helps when that
interval lies wholly above zero. The test gain is reported beside it, never decided on.

Entries of the size study (`study` "size") also hold `model` and `train_fraction`; its table gives each model's
mean test accuracy per size with a t interval over seeds, and the two models' difference with Welch's.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

BASELINE = "baseline"  # the variant every other one in its study is compared with
GAP_STUDY = "gap"
SIZE_STUDY = "size"  # accuracy against training-set size: entries add `model` and `train_fraction`
FIELDS = ("study", "variant", "seed", "val_acc", "test_acc", "seconds", "overrides")


def check_entries(entries: Sequence[dict]) -> None:
    """Raise ValueError naming the first entry that lacks a field, or a run recorded twice."""
    seen = set()
    for i, entry in enumerate(entries):
        missing = [f for f in FIELDS if f not in entry]
        if missing:
            raise ValueError(f"ablations entry {i} lacks {', '.join(missing)}; each entry needs {', '.join(FIELDS)}")
        key = (entry["study"], entry["variant"], entry["seed"])
        if key in seen:
            raise ValueError(f"ablations: study {key[0]!r}, variant {key[1]!r}, seed {key[2]} is recorded twice")
        seen.add(key)


def gain_interval(variant: Sequence[float], baseline: Sequence[float]) -> tuple[float, float]:
    """(mean(variant) - mean(baseline), half its 95 % interval by Welch's t); the half is nan when either
    side has fewer than two runs, or both are constant (no spread to estimate)."""
    from scipy import stats

    gain = statistics.fmean(variant) - statistics.fmean(baseline)
    if len(variant) < 2 or len(baseline) < 2:
        return gain, math.nan
    a, b = statistics.variance(variant) / len(variant), statistics.variance(baseline) / len(baseline)
    if a + b == 0:
        return gain, math.nan
    dof = (a + b) ** 2 / (a**2 / (len(variant) - 1) + b**2 / (len(baseline) - 1))
    return gain, float(stats.t.ppf(0.975, dof) * math.sqrt(a + b))


def verdict(gain: float, half: float) -> str:
    if math.isnan(half):
        return "no interval (fewer than 2 seeds a side)"
    if gain - half > 0:
        return "helps"
    if gain + half < 0:
        return "hurts"
    return "not distinguishable from zero"


def gap_rows(entries: Sequence[dict]) -> list[dict]:
    """One row per study and variant: its seeds, mean accuracies, and gains over the baseline with intervals.
    A study without a baseline gives rows with no gain (nan)."""
    check_entries(entries)
    rows = []
    for study in dict.fromkeys(e["study"] for e in entries if e["study"] != SIZE_STUDY):
        runs = [e for e in entries if e["study"] == study]
        base = [e for e in runs if e["variant"] == BASELINE]
        for variant in dict.fromkeys(e["variant"] for e in runs):
            mine = [e for e in runs if e["variant"] == variant]
            row = {
                "study": study,
                "variant": variant,
                "seeds": len(mine),
                "val_acc": statistics.fmean(e["val_acc"] for e in mine),
                "test_acc": statistics.fmean(e["test_acc"] for e in mine),
                "seconds": statistics.fmean(e["seconds"] for e in mine),
            }
            for split in ("val", "test"):
                if base and variant != BASELINE:
                    gain, half = gain_interval([e[f"{split}_acc"] for e in mine], [e[f"{split}_acc"] for e in base])
                else:
                    gain, half = math.nan, math.nan
                row[f"{split}_gain"], row[f"{split}_half"] = gain, half
            row["verdict"] = "" if variant == BASELINE else verdict(row["val_gain"], row["val_half"])
            rows.append(row)
    return rows


def points(gain: float, half: float) -> str:
    """A gain in points with its interval: "+1.23 ± 0.45", or "—" where there is none."""
    if math.isnan(gain):
        return "—"
    return f"{100 * gain:+.2f}" + ("" if math.isnan(half) else f" ± {100 * half:.2f}")


HEADER = ["Study", "Variant", "Seeds", "Val acc", "Test acc", "Val gain (points, 95 %)", "Test gain", "Verdict (val)"]


def cells(row: dict) -> list[str]:
    """The row as HEADER's cells."""
    return [
        row["study"],
        row["variant"],
        str(row["seeds"]),
        f"{100 * row['val_acc']:.2f}%",
        f"{100 * row['test_acc']:.2f}%",
        points(row["val_gain"], row["val_half"]),
        points(row["test_gain"], row["test_half"]),
        row["verdict"],
    ]


def markdown(entries: Sequence[dict]) -> str:
    """The "what closes the gap" table as BENCHMARKS.md shows it."""
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(cells(row)) + " |" for row in gap_rows(entries)]
    return "\n".join(lines)


def mean_interval(values: Sequence[float]) -> tuple[float, float]:
    """(mean, half its 95 % interval by Student's t over seeds); the half is nan with fewer than two."""
    from scipy import stats

    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, math.nan
    return mean, float(stats.t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values)))


def size_rows(entries: Sequence[dict]) -> list[dict]:
    """One row per training-set size: each model's mean test accuracy and interval, minutes of training, and
    (with two models) the second's test accuracy minus the first's, with Welch's interval."""
    check_entries(entries)
    runs = [e for e in entries if e["study"] == SIZE_STUDY]
    models = list(dict.fromkeys(e["model"] for e in runs))
    rows = []
    for fraction in sorted({e["train_fraction"] for e in runs}):
        at = {m: [e for e in runs if e["model"] == m and e["train_fraction"] == fraction] for m in models}
        row: dict = {"train_fraction": fraction, "models": {}}
        for model, mine in at.items():
            if mine:
                acc, half = mean_interval([e["test_acc"] for e in mine])
                minutes = statistics.fmean(e["seconds"] for e in mine) / 60
                row["models"][model] = {"seeds": len(mine), "test_acc": acc, "half": half, "minutes": minutes}
        if len(models) == 2 and all(at[m] for m in models):
            first, second = ([e["test_acc"] for e in at[m]] for m in models)
            row["difference"] = gain_interval(second, first)
        rows.append(row)
    return rows


def size_models(entries: Sequence[dict]) -> list[str]:
    return list(dict.fromkeys(e["model"] for e in entries if e["study"] == SIZE_STUDY))


def size_header(models: Sequence[str]) -> list[str]:
    header = ["Training set", *(f"{m} test acc (95 %, seeds)" for m in models), *(f"{m} min" for m in models)]
    return header + ([f"{models[1]} − {models[0]} (points, 95 %)"] if len(models) == 2 else [])


def size_cells(row: dict, models: Sequence[str]) -> list[str]:
    """A size_rows row as size_header's cells."""
    shown = [row["models"].get(m) for m in models]
    accs = ["—" if s is None else f"{points(s['test_acc'], s['half'])[1:]} % ({s['seeds']})" for s in shown]
    minutes = ["—" if s is None else f"{s['minutes']:.1f}" for s in shown]
    cells = [f"{100 * row['train_fraction']:g} %", *accs, *minutes]
    if len(models) == 2:
        cells.append(points(*row["difference"]) if "difference" in row else "—")
    return cells


def size_markdown(entries: Sequence[dict]) -> str:
    """The size study as BENCHMARKS.md shows it: one row per size, one column per model."""
    models = size_models(entries)
    header = size_header(models)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(size_cells(row, models)) + " |" for row in size_rows(entries)]
    return "\n".join(lines)
