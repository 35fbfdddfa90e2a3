"""`reprovision study`: what a set of experiments says, read back from the classifier runs in MLflow.

Every executed train-vit / train-cnn stage logs one MLflow run (see track_run.py). A study is a set of
those runs: all of them, those of named DVC experiments (`--exp-names`, shell patterns allowed), or
those started after a moment (`--since`). This module tabulates the FINISHED ones and plots final
accuracy against each setting that varies, ViT and CNN on the same axes. "Best" is decided on the
validation split only: when every run held one out (`data.val_fraction` > 0) the plots show
validation accuracy with each model's best setting starred; otherwise they show test accuracy and
star nothing, since choosing on the test split would leak it. It only reads MLflow; it never logs to it.

A learning-rate study, queued and run two at a time (SQLite takes one writer, hence the server):

    reprovision mlflow-server start
    dvc exp run --queue -S 'lr=1e-3,4e-4,1e-4'
    dvc queue start -j 2                  # `dvc queue status` until every one is done
    reprovision study --name "learning rate" --since <the time you queued them>

Weight decay is per model: `dvc exp run --queue -S 'vit.weight_decay=0,1e-5,1e-3,0.05'`.

The data-size study (R4's accuracy versus training-set size; the GANs are not retrained):

    reprovision study --queue-data-size   # runs: dvc exp run --queue -S 'data.train_fraction=0.1,0.25,0.5,1.0'
    dvc queue start -j 2
    reprovision study --name "data size" --x train_fraction --since <the time the first command printed>

`--queue-data-size --dry-run` prints the commands without queueing; `--set key=value` adds an
override to every queued experiment (e.g. `--set vit.epochs=3 --set cnn.epochs=3` on a CPU).

The pre-training-set-size study (R4's SSL task): linear-probe accuracy against the number of images
SimCLR pre-trained on, read from the linear-probe runs, with the random-weights floor beside it:

    reprovision study --queue-ssl-size    # runs: dvc exp run --queue -S 'ssl.train_fraction=0.1,0.25,0.5,1.0'
    dvc queue start -j 2
    reprovision study --ssl-size --since <the time the first command printed>

Writes to --out (default reports/study): study.md, study.csv (one row per run) and
<metric>_vs_<setting>.png for each setting that varies.
"""

from __future__ import annotations

import fnmatch
import json
import math
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from reprovision.core import track_store
from reprovision.layout import LABELS, SSL_SIZE_STUDY, STUDY
from reprovision.publish.palette import COLOURS

CLASSIFIER_STAGES = ("train-vit", "train-cnn")
PROBE_METRICS = ("probe_test", "knn_test", "random_probe_test", "random_knn_test", "probe_val", "random_probe_val")
DEFAULT_X = ("lr", "weight_decay", "train_fraction")
DATA_SIZE_FRACTIONS = (0.1, 0.25, 0.5, 1.0)
METRICS = ("val_acc", "test_acc", "best_val_acc", "s_per_epoch")
CONTEXT = ("dataset", "epochs")  # runs that differ in these are not comparable: the report warns


@dataclass(frozen=True)
class Axis:
    label: str
    log: bool


# How each known setting is drawn; any other numeric run param can be studied on a linear axis.
AXES = {
    "lr": Axis("learning rate (lr × lr_mult)", log=True),
    "weight_decay": Axis("weight decay", log=True),
    "train_fraction": Axis("training-set fraction", log=False),
    "label_smoothing": Axis("label smoothing", log=False),
}


class StudyError(ValueError):
    """The study can't be made from what is in MLflow; the message says what to run first."""


def executable(name: str) -> str:
    """`dvc` from this Python's environment, so that it works without activating the venv."""
    return shutil.which(name, path=str(Path(sys.executable).parent)) or name


# ---------------------------------------------------------------------------- gather
def since_millis(since: str, client) -> int:
    """`--since`: an ISO time (local when it has no zone) or an MLflow run id (that run's start)."""
    if re.fullmatch(r"[0-9a-f]{32}", since):
        return client.get_run(since).info.start_time
    try:
        return int(datetime.fromisoformat(since).timestamp() * 1000)
    except ValueError:
        raise StudyError(
            f"--since {since!r} is neither an ISO time (e.g. 2025-06-01T14:30) nor an MLflow run id"
        ) from None


def _search(uri: str | None, stages: str, since: str | None, exp_names: Sequence[str]) -> tuple[str, pd.DataFrame]:
    """(uri, FINISHED runs of the stages matching the `tags.stage` LIKE pattern, filtered as asked)."""
    import mlflow

    uri = uri or track_store.tracking_uri()
    if (
        uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists()
    ):  # don't create an empty store
        raise StudyError(f"no MLflow store at {uri}: train something first (`dvc exp run`), or set MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name(track_store.experiment_name())
    if experiment is None:
        raise StudyError(
            f"no MLflow experiment {track_store.experiment_name()!r} in {uri}: train something first (`dvc exp run`)"
        )
    query = ["attributes.status = 'FINISHED'", f"tags.stage LIKE '{stages}'"]
    if since:
        query.append(f"attributes.start_time >= {since_millis(since, client)}")
    runs = mlflow.search_runs([experiment.experiment_id], filter_string=" and ".join(query))
    if exp_names and not runs.empty:
        names = runs.get("tags.dvc_exp_name", pd.Series("", index=runs.index)).fillna("")
        runs = runs[names.map(lambda name: any(fnmatch.fnmatchcase(name, p) for p in exp_names))]
    return uri, runs


def collect_probe_runs(
    exp_names: Sequence[str] = (), since: str | None = None, tracking_uri: str | None = None
) -> pd.DataFrame:
    """One row per FINISHED linear-probe run: the pre-training images and fraction, PROBE_METRICS."""
    uri, runs = _search(tracking_uri, "linear-probe", since, exp_names)
    if runs.empty:
        raise StudyError(
            f"no FINISHED linear-probe runs in {uri}: queue the study first (`reprovision study --queue-ssl-size`), "
            "or widen --exp-names/--since"
        )
    column = lambda prefix, name: pd.to_numeric(
        runs.get(f"{prefix}.{name}", pd.Series(index=runs.index, dtype=object)), errors="coerce"
    )  # noqa: E731
    table = pd.DataFrame(
        {
            "dvc_exp_name": runs.get("tags.dvc_exp_name", pd.Series("", index=runs.index)).fillna(""),
            "run_id": runs["run_id"],
            "arch": runs.get("params.arch"),
            "ssl_train_fraction": column("params", "ssl_train_fraction"),
            "ssl_train_images": column("params", "ssl_train_images"),
            "ssl_epochs": column("params", "ssl_epochs"),
            **{name: column("metrics", name) for name in PROBE_METRICS},
        }
    )
    return table.dropna(subset=["probe_test", "ssl_train_images"]).sort_values(
        ["ssl_train_images", "run_id"], ignore_index=True
    )


def write_ssl_size_study(table: pd.DataFrame, out: Path = STUDY, source: str = "", record: bool = False) -> Path:
    """ssl_size.csv, probe_vs_pretraining_images.png and ssl_size.md; returns the md path. Nothing is chosen
    here: the plot shows test accuracy against the pre-training-set size, as R4's figure does. `record`:
    also write the rows to benchmarks/ssl_size_study.json, which the report stage shows (commit it)."""
    from reprovision.publish.report_charts import SSL_SIZE_SERIES, ssl_size_chart

    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "ssl_size.csv", index=False)
    lines = [
        "# Study: pre-training-set size (SimCLR, linear probe)",
        "",
        f"{len(table)} finished linear-probe runs{source}. Table: [ssl_size.csv](ssl_size.csv).",
        "",
    ]
    for context in ("arch", "ssl_epochs"):
        if table[context].nunique(dropna=True) > 1:
            lines += [
                f"> **Warning:** the runs differ in `{context}`: their accuracies are not directly comparable.",
                "",
            ]
    rows = [
        {k: (None if pd.isna(v) else v) for k, v in row.items()}
        for row in table[
            ["dvc_exp_name", "run_id", "arch", "ssl_train_fraction", "ssl_train_images", "ssl_epochs", *SSL_SIZE_SERIES]
        ].to_dict(orient="records")
    ]
    ssl_size_chart(rows, out / "probe_vs_pretraining_images.png")
    lines += [
        "![Test accuracy vs pre-training images](probe_vs_pretraining_images.png)",
        "",
        "## All runs",
        "",
        _markdown_table(table),
        "",
    ]
    if record:
        SSL_SIZE_STUDY.parent.mkdir(parents=True, exist_ok=True)
        SSL_SIZE_STUDY.write_text(json.dumps({"runs": rows}, indent=2) + "\n")
        lines += [f"Recorded in `{SSL_SIZE_STUDY}`: commit it, and the report's SSL section shows this plot.", ""]
    path = out / "ssl_size.md"
    path.write_text("\n".join(lines))
    return path


def collect_runs(
    x: Sequence[str] = DEFAULT_X,
    exp_names: Sequence[str] = (),
    since: str | None = None,
    tracking_uri: str | None = None,
) -> pd.DataFrame:
    """One row per FINISHED classifier run: model, dvc_exp_name, run_id, context, the x settings, METRICS."""
    # MLflow's filter has no IN for tags: take train-* and keep the classifiers.
    uri, runs = _search(tracking_uri, "train-%", since, exp_names)
    if not runs.empty:
        runs = runs[runs["tags.stage"].isin(CLASSIFIER_STAGES)]
    if runs.empty:
        filters = "".join(
            [f", dvc_exp_name in {list(exp_names)}" if exp_names else "", f", started since {since}" if since else ""]
        )
        raise StudyError(
            f"no FINISHED train-vit/train-cnn runs in {uri} (experiment {track_store.experiment_name()!r}{filters}): "
            "run experiments first (see `reprovision study --help`), or widen --exp-names/--since"
        )

    def column(prefix: str, name: str, numeric: bool = True) -> pd.Series:
        values = runs.get(f"{prefix}.{name}", pd.Series(index=runs.index, dtype=object))
        return pd.to_numeric(values, errors="coerce") if numeric else values

    table = pd.DataFrame(
        {
            "model": runs["tags.model"],
            "dvc_exp_name": column("tags", "dvc_exp_name", numeric=False).fillna(""),
            "run_id": runs["run_id"],
            "start_time": runs["start_time"]
            .dt.tz_convert(datetime.now().astimezone().tzinfo)
            .dt.strftime("%Y-%m-%d %H:%M:%S"),
            "dataset": column("params", "dataset", numeric=False),
            "epochs": column("params", "epochs"),
            **{name: column("params", name) for name in x},
            # search_runs gives each metric's value at its last step: test_acc is the final epoch's.
            **{name: column("metrics", name) for name in METRICS},
        }
    )
    # A run without test_acc has nothing to say about accuracy (it can only be a run from older code).
    return table.dropna(subset=["test_acc"]).sort_values(["model", *x, "start_time"], ignore_index=True)


# ---------------------------------------------------------------------------- analyse
def varying(table: pd.DataFrame, x: Sequence[str]) -> list[str]:
    """The settings among x that take more than one value for some model (one value per model is no curve)."""
    return [name for name in x if table.groupby("model")[name].nunique(dropna=True).max() > 1]


def decision_metric(table: pd.DataFrame) -> str | None:
    """ "val_acc" when every run held out a validation split, else None: no "best" can be chosen honestly."""
    return "val_acc" if table["val_acc"].notna().all() else None


# A study has each run's accuracies from MLflow, not its per-image predictions, so McNemar's paired test
# (measure/noise.py, the report's ViT vs CNN) cannot apply: settings are compared by their means over
# seeds with Student's t, which is right for that. `clears` asks for non-overlapping intervals, stricter
# than a test of the difference: overlap is reported as "not distinguishable at N seeds", not as "equal".
def interval(values) -> float:
    """Half the 95 % confidence interval of the mean of `values` (Student's t: runs of one setting over
    seeds); nan for fewer than two values, where no interval can be given."""
    from scipy import stats

    values = pd.Series(values, dtype=float).dropna()
    if len(values) < 2:
        return math.nan
    return float(stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / math.sqrt(len(values)))


def clears(best_mean: float, best_half: float, other_mean: float, other_half: float) -> bool:
    """Whether the best setting's 95 % interval lies wholly above the runner-up's: only then is it starred."""
    return not (math.isnan(best_half) or math.isnan(other_half)) and best_mean - best_half > other_mean + other_half


def best_settings(table: pd.DataFrame, x: Sequence[str]) -> pd.DataFrame:
    """Per model, the settings (a combination of x) with the highest mean final validation accuracy, the
    95 % interval of that mean over its runs (`val_acc_ci`, half-width), and whether that interval clears
    the runner-up setting's (`distinguishable`; a model with one setting has no runner-up: True)."""
    groups = table.groupby(["model", *x], dropna=False)
    means = groups[list(METRICS)].mean().join(groups.size().rename("runs")).reset_index()
    means["val_acc_ci"] = groups["val_acc"].agg(interval).to_numpy()
    rows = []
    for _, block in means.groupby("model", sort=False):
        ranked = block.sort_values("val_acc", ascending=False, kind="stable")
        top = ranked.iloc[0].copy()
        if len(ranked) > 1:
            second = ranked.iloc[1]
            top["distinguishable"] = clears(top["val_acc"], top["val_acc_ci"], second["val_acc"], second["val_acc_ci"])
        else:
            top["distinguishable"] = True
        rows.append(top)
    return pd.DataFrame(rows).sort_values("model").reset_index(drop=True)


def slice_through_best(table: pd.DataFrame, best: pd.DataFrame, others: Sequence[str]) -> pd.DataFrame:
    """Per model, the runs whose `others` settings equal that model's best ones.

    Plotting accuracy against one setting along this slice shows that setting alone; a mean over
    every run at each x would mix in the other settings (e.g. small training sets at a good lr)."""
    keep = pd.Series(False, index=table.index)
    for _, top in best.iterrows():
        match = table["model"] == top["model"]
        for other in others:
            match &= table[other].isna() if pd.isna(top[other]) else table[other] == top[other]
        keep |= match
    return table[keep]


# ---------------------------------------------------------------------------- plot
def plot_accuracy_vs(
    table: pd.DataFrame, x: str, path: Path, metric: str = "val_acc", star: bool = True
) -> pd.DataFrame:
    """Every run as a faint point, the mean `metric` per setting as a line with its 95 % interval over the
    runs (seeds) at that setting, each model's best mean starred when `star` (only ever on validation
    accuracy) and its interval clears the runner-up's.

    Returns each model's best row (model, x, metric, metric + "_ci", runs, distinguishable, runner_up);
    none when not `star`."""
    axis = AXES.get(x, Axis(x, log=False))
    split = metric.removesuffix("_acc")
    runs = table.dropna(subset=[x, metric]).assign(
        label=lambda t: t["model"].map(LABELS), acc=lambda t: 100 * t[metric]
    )
    grouped = runs.groupby(["label", x])["acc"]
    means = grouped.mean().reset_index().assign(half=grouped.agg(interval).to_numpy(), runs=grouped.size().to_numpy())
    best = means.loc[means.groupby("label")["acc"].idxmax()] if star else means.iloc[:0]
    best = best.assign(distinguishable=False, runner_up=math.nan)
    for index, row in best.iterrows():
        others = means[(means["label"] == row["label"]) & (means.index != index)]
        if others.empty:
            best.loc[index, "distinguishable"] = True
            continue
        second = others.loc[others["acc"].idxmax()]
        best.loc[index, "runner_up"] = second[x]
        best.loc[index, "distinguishable"] = clears(row["acc"], row["half"], second["acc"], second["half"])
    palette = {label: COLOURS[label] for label in means["label"].unique()}
    with sns.axes_style("whitegrid"), sns.plotting_context("notebook", font_scale=0.85, rc={"legend.fontsize": 8}):
        fig = Figure(figsize=(5.2, 3.6), layout="constrained")
        ax = fig.add_subplot()
        sns.scatterplot(runs, x=x, y="acc", hue="label", palette=palette, alpha=0.35, legend=False, ax=ax)
        sns.lineplot(means, x=x, y="acc", hue="label", palette=palette, marker="o", ax=ax)
        for label, block in means.dropna(subset=["half"]).groupby("label"):
            ax.errorbar(block[x], block["acc"], yerr=block["half"], fmt="none", ecolor=palette[label], capsize=3)
        for _, row in best[best["distinguishable"]].iterrows():
            ax.scatter(row[x], row["acc"], marker="*", s=260, color=palette[row["label"]], edgecolor="black", zorder=5)
            ax.annotate(
                f"best {row['label']}: {row[x]:g}",
                (row[x], row["acc"]),
                xytext=(6, 6),
                textcoords="offset points",
                fontsize=8,
            )
        if axis.log:
            positive = runs.loc[runs[x] > 0, x]
            if len(positive) < len(runs):  # a 0 (e.g. no weight decay) has no place on a log axis
                ax.set_xscale("symlog", linthresh=positive.min() if len(positive) else 1.0)
            else:
                ax.set_xscale("log")
        ax.set(title=f"Final {split} accuracy vs {axis.label}", xlabel=axis.label, ylabel=f"{split} accuracy (%)")
        ax.legend(title=None)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    best = best.assign(model=best["label"], **{metric: best["acc"] / 100, f"{metric}_ci": best["half"] / 100})
    return best[["model", x, metric, f"{metric}_ci", "runs", "distinguishable", "runner_up"]]


# ---------------------------------------------------------------------------- report
def verdict(row: pd.Series, setting: str, metric: str) -> str:
    """One model's best setting along `setting`, starred only when its interval clears the runner-up's."""
    ci = "" if math.isnan(row[f"{metric}_ci"]) else f" ± {100 * row[f'{metric}_ci']:.2f}"
    score = f"(validation {100 * row[metric]:.2f} %{ci}, {row['runs']} run{'s' * (row['runs'] > 1)})"
    if row["distinguishable"]:
        return f"best {row['model']}: `{setting}` = {row[setting]:g} {score}"
    runs = int(row["runs"])
    return (
        f"highest {row['model']}: `{setting}` = {row[setting]:g} {score}, not distinguishable from "
        f"`{setting}` = {row['runner_up']:g} at {runs} seed{'s' * (runs > 1)}"
    )


def _markdown_table(frame: pd.DataFrame) -> str:
    def cell(value) -> str:
        if isinstance(value, float):
            return "—" if math.isnan(value) else f"{value:.4g}"
        return str(value)

    lines = ["| " + " | ".join(frame.columns) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def write_study(
    table: pd.DataFrame, out: Path = STUDY, x: Sequence[str] = DEFAULT_X, name: str = "study", source: str = ""
) -> Path:
    """study.csv, one PNG per varying setting, and study.md tying them together; returns the md path."""
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "study.csv", index=False)
    lines = _summary_lines(table, name, source)
    moving = varying(table, x)
    decide_on = decision_metric(table)
    metric = decide_on or "test_acc"
    best = best_settings(table, moving or list(x)) if decide_on else None
    lines += _best_settings_lines(best, moving or x)
    for setting in x:
        lines += _setting_lines(table, setting, out=out, moving=moving, best=best, metric=metric)
    lines += [
        "## All runs",
        "",
        _markdown_table(table.assign(model=table["model"].map(lambda m: LABELS.get(m, m)))),
        "",
    ]
    path = out / "study.md"
    path.write_text("\n".join(lines))
    return path


def _summary_lines(table: pd.DataFrame, name: str, source: str) -> list[str]:
    """study.md's title, its runs per model and where they came from, and a warning for each CONTEXT that
    differs between them."""
    counts = ", ".join(f"{LABELS.get(m, m)} {n}" for m, n in table["model"].value_counts().sort_index().items())
    lines = [
        f"# Study: {name}",
        "",
        f"{len(table)} finished classifier runs ({counts}){source}. Table: [study.csv](study.csv).",
        "",
    ]
    for context in CONTEXT:
        values = sorted(table[context].dropna().unique())
        if len(values) > 1:
            lines += [
                f"> **Warning:** the runs differ in `{context}` ({', '.join(map(str, values))}): "
                "accuracies are not directly comparable.",
                "",
            ]
    return lines


def _best_settings_lines(best: pd.DataFrame | None, settings: Sequence[str]) -> list[str]:
    """study.md's "Best settings": each model's best (best_settings over `settings`), or why none is chosen
    (`best` None: not every run held out a validation split)."""
    if best is None:
        return [
            "## Best settings",
            "",
            "None chosen: not every run held out a validation split (`data.val_fraction` = 0), "
            "and choosing on the test split would leak it. Re-run the study with e.g. `--set data.val_fraction=0.1`. "
            "The plots show final test accuracy, without a best.",
            "",
        ]
    shown = best.assign(model=best["model"].map(lambda m: LABELS.get(m, m)))
    return [
        "## Best settings",
        "",
        "Highest mean final validation accuracy per model (mean over runs with the same "
        "settings, e.g. seeds; `val_acc_ci`: half the 95 % interval of that mean, Student's t); "
        "`distinguishable`: whether that interval clears the runner-up setting's. Test accuracy beside "
        "it (the training runs' last-epoch figure, monitoring in their precision; a pipeline's test accuracy "
        "is its evaluate stage's) is reported, never used to choose:",
        "",
        _markdown_table(shown[["model", *settings, "runs", "val_acc", "val_acc_ci", "distinguishable", *METRICS[1:]]]),
        "",
    ]


def _setting_lines(
    table: pd.DataFrame,
    setting: str,
    *,
    out: Path,
    moving: Sequence[str],
    best: pd.DataFrame | None,
    metric: str,
) -> list[str]:
    """study.md's section on one setting: its plot (written to `out`) with each model's best along it when
    `best` is known, or why it is not plotted (one value per model)."""
    label = AXES.get(setting, Axis(setting, log=False)).label
    lines = [f"## {metric.removesuffix('_acc').capitalize()} accuracy vs {label}", ""]
    if setting not in moving:
        values = table.groupby("model")[setting].first().dropna()
        kept = (
            "one value per model (" + ", ".join(f"{LABELS.get(m, m)} {v:g}" for m, v in values.items()) + ")"
            if len(values)
            else "not recorded in these runs"
        )
        return [*lines, f"Not plotted: `{setting}` is {kept}.", ""]
    others = [o for o in moving if o != setting]
    runs = slice_through_best(table, best, others) if best is not None else table
    figure = out / f"{metric}_vs_{setting}.png"
    starred = plot_accuracy_vs(runs, setting, figure, metric, star=best is not None)
    lines += [f"![Final {metric.removesuffix('_acc')} accuracy vs {label}]({figure.name})", ""]
    if best is not None:
        lines += ["; ".join(verdict(r, setting, metric) for _, r in starred.iterrows()) + "."]
    elif others:
        lines.append(
            "Each point is a run; the line is the mean over runs at that setting, whatever the "
            f"other settings ({', '.join(others)})."
        )
    if best is not None and others:
        held = "; ".join(
            f"{LABELS.get(top['model'], top['model'])} " + ", ".join(f"{o} = {top[o]:g}" for o in others)
            for _, top in best.iterrows()
        )
        lines.append(
            f"Other settings held at each model's best ({held}); {len(table) - len(runs)} runs "
            "off that slice are in the table only."
        )
    if AXES.get(setting, Axis("", False)).log and (runs[setting] == 0).any():
        lines.append(f"`{setting}` = 0 is drawn on a symlog axis (linear near 0, logarithmic beyond).")
    lines.append("")
    return lines


def run_study(
    out: Path = STUDY,
    name: str = "study",
    x: Sequence[str] = DEFAULT_X,
    exp_names: Sequence[str] = (),
    since: str | None = None,
    tracking_uri: str | None = None,
) -> Path:
    """Gather the runs and write the study; returns the path of study.md."""
    table = collect_runs(x, exp_names, since, tracking_uri)
    filters = [
        f"dvc experiments {', '.join(exp_names)}" if exp_names else "",
        f"started since {since}" if since else "",
    ]
    source = f" from {tracking_uri or track_store.tracking_uri()}" + "".join(f"; {f}" for f in filters if f)
    return write_study(table, out, x, name, source)


# ---------------------------------------------------------------------------- queue the data-size study
def data_size_commands(
    fractions: Sequence[float] = DATA_SIZE_FRACTIONS,
    sets: Sequence[str] = (),
    key: str = "data.train_fraction",
    seeds: int = 1,
) -> list[list[str]]:
    """The commands of R4's accuracy-vs-training-set-size study (`key`: data.train_fraction, or
    ssl.train_fraction for the pre-training-set size): queue, then run two at a time. With `seeds` > 1
    each fraction is queued with seeds 0..seeds-1 (DVC's grid of the two lists)."""
    if not fractions or any(not 0 < f <= 1 for f in fractions):
        raise StudyError(f"training-set fractions must be in (0, 1], got {list(fractions)}")
    if seeds < 1:
        raise StudyError(f"--seeds {seeds}: give the number of seeds per setting, 1 or more (e.g. --seeds 3)")
    queue = ["dvc", "exp", "run", "--queue", "-S", f"{key}=" + ",".join(f"{f:g}" for f in fractions)]
    if seeds > 1:
        queue += ["-S", "seed=" + ",".join(str(k) for k in range(seeds))]
    for override in sets:
        queue += ["-S", override]
    return [queue, ["reprovision", "mlflow-server", "start"], ["dvc", "queue", "start", "-j", "2"]]


def check_sets(sets: Sequence[str]) -> None:
    """Every `--set key=value` well formed, and params.yaml valid with them, before anything is queued."""
    import yaml

    from reprovision.config import PARAMS_FILE, ConfigError, parse_params, with_overrides

    if not sets:
        return
    source = f"{PARAMS_FILE} with --set {' '.join(sets)}"
    try:
        if not PARAMS_FILE.exists():  # outside the repository: the form of each --set, at least
            with_overrides({}, list(sets), source)
            return
        parse_params(with_overrides(yaml.safe_load(PARAMS_FILE.read_text()) or {}, list(sets), source), source)
    except ConfigError as err:
        raise StudyError(str(err)) from None


def queue_data_size(
    fractions: Sequence[float] = DATA_SIZE_FRACTIONS,
    sets: Sequence[str] = (),
    dry_run: bool = False,
    ssl: bool = False,
    seeds: int = 1,
) -> list[list[str]]:
    """Queue the study (unless dry_run) and print what to run next; returns the commands. `ssl`: the
    pre-training-set-size study (ssl.train_fraction) instead of the classifiers' training-set size."""
    check_sets(sets)
    commands = data_size_commands(fractions, sets, "ssl.train_fraction" if ssl else "data.train_fraction", seeds)
    queued_at = datetime.now().isoformat(timespec="seconds")
    print(f"{'would run' if dry_run else 'running'}: {shlex.join(commands[0])}")
    if not dry_run:
        done = subprocess.run([executable(commands[0][0]), *commands[0][1:]])
        if done.returncode:
            raise StudyError(f"queueing failed (exit {done.returncode}); DVC's message is above")
    print("then:")
    for command in commands[1:]:
        print(f"  {shlex.join(command)}")
    print(f"  dvc queue status                    # until all {len(fractions) * seeds} are done")
    if ssl:
        print(f"  reprovision study --ssl-size --since {queued_at}")
    else:
        print(f"  reprovision study --name 'data size' --x train_fraction --since {queued_at}")
    return commands
