"""The `report` stage: every result of the pipeline on one page, beside the reference figures.

Writes `reports/report.md` (terminal, pull request) and `reports/report.html`, one self-contained
file (images as base64 data URIs, CSS inline, no network) that opens from disk on a laptop. Both
are rendered from the same context by two Jinja templates (templates/report.md.j2 and
report.html.j2, shipped as package data), so a number reads the same in both. This module builds
that context; the templates only lay it out. Curves are drawn here into `reports/curves/`; the
other pictures come from earlier stages. Any input may be missing (a GAN-less or classifier-less
run): its section says so and moves on.
"""

from __future__ import annotations

import base64
import json
import math
import mimetypes
import os
from pathlib import Path

import pandas as pd
import seaborn as sns
from jinja2 import Environment, FileSystemLoader, StrictUndefined
from markdown_it import MarkdownIt
from markupsafe import Markup, escape
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from reprovision.core import track
from reprovision.config import Params, load_params
from reprovision.publish.registry import read_champion, read_records, why_no_champion
from reprovision.layout import (
    CLASSIFIERS, CURVES, EVAL_METRICS, FIGURES, GAN_METRICS, GAN_MODELS, GANS, HEATMAPS, LABELS, MANIFEST, METRICS, MODELS, PARAMS,
    REFERENCE_SCALE, REPORTS, RUN_REF, SSL_SIZE_STUDY, SUMMARY,
)
from reprovision.publish.palette import COLOURS
from reprovision.publish.references import REFERENCE, midpoint

# report.md.j2, report.html.j2 and the CSS the HTML inlines; package data in a wheel (pyproject.toml).
# Found beside this module, which works in a checkout and any install (PackageLoader trips on some
# editable installs).
TEMPLATES = Path(__file__).parent / "templates"
TRAINED = (*CLASSIFIERS, *GANS, "judge")  # every trained model, in the page's order
# The evaluate stage's pictures, one list per row of the page.
EVALUATION_FIGURES = [
    [("confusion_raw.png", "Confusion matrices (counts)")],
    [("confusion_normalised.png", "Confusion matrices (each row: fraction of the true class)")],
    [("per_class_accuracy.png", "Per-class test accuracy")],
    [(f"misclassified_{m}.png", f"{LABELS[m]}: misclassified test images") for m in CLASSIFIERS],
    # Each family's heat map, of the kind its family names (models/<family>.py); only the one drawn exists.
    [(f"{kind}_{m}.png", f"{LABELS[m]}: {caption}") for m in CLASSIFIERS for kind, caption in HEATMAPS.items()],
]
MAX_FRAMES = 6  # sample-progression frames shown per GAN, evenly spaced, first and last included
DASH = "—"


class ReportError(ValueError):
    """An input of the report exists but can't be used; the message names the file and the fix."""


# ---------------------------------------------------------------------------- reading inputs
def model_dir(model: str) -> Path:
    """The folder of a model's weights, pictures, card and run reference; the GANs' are one deeper."""
    return (GAN_MODELS if model in GANS else MODELS) / model


def metrics_dir(model: str) -> Path:
    """metrics/<model>/: the stage's whole record (summary.json) and per-epoch CSVs."""
    return (GAN_METRICS if model in GANS else METRICS) / model


def read_json(path: Path) -> dict | None:
    """The JSON object at `path`, or None when the stage that writes it did not run."""
    if not path.exists():
        return None
    try:
        obj = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ReportError(f"{path} is not valid JSON ({err}); re-run the stage that writes it (`dvc repro`)") from None
    if not isinstance(obj, dict):
        raise ReportError(f"{path} holds a {type(obj).__name__}, expected a JSON object; re-run the stage that writes it")
    return obj


def read_csv(path: Path, columns: tuple[str, ...]) -> pd.DataFrame | None:
    """The table at `path` with at least `columns`, or None when absent."""
    if not path.exists():
        return None
    try:
        table = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise ReportError(f"{path} is not a readable CSV ({err}); re-run the stage that writes it (`dvc repro`)") from None
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise ReportError(
            f"{path} lacks column(s) {', '.join(missing)} (has: {', '.join(table.columns)}); re-run the stage that writes it"
        )
    return table


def run_refs(root: Path) -> dict[str, dict | None]:
    """The MLflow run that trained each model (None when its stage did not run)."""
    return {m: read_json(root / model_dir(m) / RUN_REF) for m in TRAINED}


# ---------------------------------------------------------------------------- number formats
def pct(x: float | None) -> str:
    return DASH if x is None else f"{100 * x:.2f}%"


def fixed(x: float | None, digits: int = 2) -> str:
    return DASH if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def count(n: int | None) -> str:
    return DASH if n is None else f"{int(n):,}"


def share(x: float) -> str:
    return f"{100 * x:g}%"


def seconds(s: float | None) -> str:
    return DASH if s is None else f"{s:,.0f} s"


def approx(value: float | tuple[float, float] | None, scale: float = 1.0, unit: str = "") -> str:
    """A reference figure as the source gave it: `~52–55%`, `~14 s`."""
    if value is None:
        return DASH
    if isinstance(value, tuple):
        return f"~{value[0] * scale:g}–{value[1] * scale:g}{unit}"
    return f"~{value * scale:g}{unit}"


def cell(text: str, ref: str | None = None, href: str | None = None, code: bool = False, badge: str | None = None) -> dict:
    """A table cell: our value, the reference beside it, an optional link or badge."""
    return {"text": text, "ref": ref, "href": href, "code": code, "badge": badge}


def table(header: list[str], rows: list[list[str | dict]]) -> dict:
    return {"header": header, "rows": rows}


# ---------------------------------------------------------------------------- page sections
def reference_scale_runs(results: dict[str, dict]):
    """(model, label, run) for each model's reference-scale run, then the stopped runs it replaced."""
    for model in (*CLASSIFIERS, *GANS):
        if (r := results.get(model)) is not None:
            yield model, LABELS[model], r
            for earlier in r.get("earlier_runs", []):
                yield model, f"{LABELS[model]} (earlier run)", earlier


def reference_scale_table(results: dict[str, dict]) -> dict | None:
    """The reference-scale runs (benchmarks/reference_scale.json) beside the seeds' figures."""
    rows = []
    for model, label, r in reference_scale_runs(results):
        ref = REFERENCE.get(model)
        if model in CLASSIFIERS:
            theirs = f"{ref['source']}: {approx(ref['test_acc'], 100, '%')}" if ref else None
            result = cell(f"test acc {pct(r['test_acc'])}", ref=theirs)
        else:
            last = r["history"][-1]
            if "fid" in r:
                quality = f"FID {fixed(r['fid'])} (floor {fixed(r['fid_floor'])}), IS {fixed(r['inception_score'])}; "
            elif r.get("fid_curve"):  # under way: the final FID comes at the end; the curve's latest point
                during = r["fid_curve"][-1]
                quality = f"FID {fixed(during['fid'])} at epoch {during['epoch']} (N = {r['fid_curve_n']:,}, during training); "
            else:
                quality = ""
            result = cell(
                f"{quality}D {fixed(last['d_loss'], 3)} / G {fixed(last['g_loss'], 3)}",
                ref=f"{ref['source']}: D {ref['d_loss']} / G {ref['g_loss']} ({ref['at']}), no quality metric",
            )
        epochs = f"{r['epochs']}" + (f" of {r['epochs_planned']}" if r.get("epochs_planned", r["epochs"]) != r["epochs"] else "")
        # A run under way (or stopped for good) has been paused and resumed: its wall time is no training time.
        seconds = r["status"] if r.get("status") in ("under way", "stopped") else f"{r['seconds'] / 60:.0f} min"
        rows.append([label, epochs, count(r["train_images"]), r["precision"], str(r["threads"]), result,
                     seconds, cell(r["git_commit"][:12], code=True)])
    header = ["Model", "Epochs", "Train images", "Precision", "Threads", "Result", "Training time", "Commit"]
    return table(header, rows) if rows else None


def reference_scale_epochs(results: dict[str, dict]) -> dict | None:
    """Those runs' epochs for which a source printed a figure (R3's ViT train accuracy, R2's losses)."""
    rows = []
    for model, label, r in reference_scale_runs(results):
        ref = REFERENCE.get(model, {})
        if (by_epoch := ref.get("train_acc_by_epoch") or ref.get("losses_by_epoch")) is None:
            continue
        for row in r["history"]:
            if (figure := by_epoch.get(row["epoch"])) is None:
                continue
            if model in CLASSIFIERS:
                ours, theirs = f"train acc {pct(row['train_acc'])}", pct(figure)
            else:
                ours, theirs = f"D {fixed(row['d_loss'], 3)} / G {fixed(row['g_loss'], 3)}", f"D {figure[0]} / G {figure[1]}"
            rows.append([label, str(row["epoch"]), cell(ours, ref=f"{ref['source']}: {theirs}")])
    return table(["Model", "Epoch", "Result"], rows) if rows else None



def run_link(ref: dict | None) -> tuple[dict | str, dict | None]:
    """The cell pointing at an MLflow run, and for a local store the `mlflow ui` command that serves it
    with the page of its training runs."""
    if ref is None:
        return DASH, None
    uri = ref.get("tracking_uri", "")
    if uri.startswith(("http://", "https://")):
        href = f"{uri.rstrip('/')}/#/experiments/{ref['experiment_id']}/runs/{ref['run_id']}"
        return cell(ref.get("run_name", "run"), href=href), None
    store = {"command": f"mlflow ui --backend-store-uri {uri}", "url": track.training_runs_url(track.LOCAL_UI, ref["experiment_id"])}
    return cell(ref["run_id"], code=True), store


def scale_of(model: str, params: Params, metrics: dict) -> tuple[str, bool]:
    """`train 10% · 2/30 epochs`, and whether that is below the full (reference) configuration."""
    full = Params()  # the defaults are the reference (GPU-sized) configurations
    epochs = metrics.get("epochs")
    if model in CLASSIFIERS:
        d, full_epochs = params.data, full.classifier(model).epochs
        parts = [f"train {share(d.train_fraction)}", f"test {share(d.test_fraction)}"]
        reduced = d.train_fraction < 1 or d.test_fraction < 1
    elif model in GANS:
        g, full_epochs = params.gan, full.gan.epochs
        parts = [f"train {share(g.train_fraction)}"]
        if g.steps_per_epoch_max:
            parts.append(f"≤{g.steps_per_epoch_max} steps/epoch")
        if metrics.get("n") is not None:
            parts.append(f"FID n={metrics['n']:,}")
        fewer_samples = metrics.get("n", full.gan.fid_samples) < full.gan.fid_samples
        reduced = g.train_fraction < 1 or g.steps_per_epoch_max > 0 or fewer_samples
    else:
        full_epochs = full.judge.epochs
        parts = [f"train {share(params.judge.train_fraction)}"]
        reduced = params.judge.train_fraction < 1
    if epochs is not None:
        parts.append(f"{epochs}/{full_epochs} epochs")
        reduced = reduced or epochs < full_epochs
    return " · ".join(parts), reduced


def summary_rows(params: Params, results: dict[str, dict], runs: dict[str, dict | None]) -> tuple[list[list], list[str], bool]:
    """One row per model, the `mlflow ui` commands of local stores, and whether any run was reduced."""
    rows, stores, any_reduced = [], [], False
    for model, m in results.items():
        ref = REFERENCE.get(model, {})
        source = ref.get("source", "")
        if model in CLASSIFIERS:
            size = cell(count(m.get("params")), ref=f"{source}: {count(ref['params'])}")
            result = cell(f"test acc {pct(m.get('test_acc'))}", ref=f"{source}: {approx(ref['test_acc'], 100, '%')}")
            time = cell(
                f"{seconds(m.get('train_seconds'))} · {fixed(m.get('s_per_epoch'), 1)} s/epoch",
                ref=f"{source}: {approx(ref['train_seconds'], unit=' s')} · {approx(ref['s_per_epoch'], unit=' s/epoch')}",
            )
        elif model in GANS:
            # No-break spaces keep "G 1,496,592" on one line when the cell wraps.
            size = cell(f"G\u00a0{count(m.get('g_params'))} · D\u00a0{count(m.get('d_params'))}",
                        ref=f"{source}: G\u00a0{count(ref['g_params'])} · D\u00a0{count(ref['d_params'])}" if "g_params" in ref else None)
            result = cell(
                f"FID {fixed(m.get('fid'))} (floor {fixed(m.get('fid_floor'))}) · IS {fixed(m.get('inception_score'))} "
                f"· D {fixed(m.get('d_loss'), 3)}, G {fixed(m.get('g_loss'), 3)}",
                ref=f"{source}: no quality metric reported; {ref['at']} D {ref['d_loss']}, G {ref['g_loss']}",
            )
            time = cell(
                f"{seconds(m.get('total_seconds'))} · {fixed(m.get('s_per_epoch'), 1)} s/epoch",
                ref=f"{source}: {approx(ref['s_per_epoch'], unit=' s/epoch')}" if "s_per_epoch" in ref else None,
            )
        else:
            size = count(m.get("params"))
            result = f"MNIST test acc {pct(m.get('test_acc'))} (its features measure FID / IS)"
            time = DASH
        scale, reduced = scale_of(model, params, m)
        any_reduced |= reduced
        link, store = run_link(runs.get(model))
        if store and store not in stores:
            stores.append(store)
        scale_cell = cell(scale, badge="reduced" if reduced else None)
        rows.append([LABELS[model], size, result, scale_cell, time, m.get("device", DASH), link])
    return rows, stores, any_reduced


def comparison_table(classifiers: dict[str, dict]) -> dict:
    """R3's own table: params, test accuracy, s/epoch, total time; ours then theirs per model."""
    header = ["", *[f"{LABELS[m]} {who}" for m in classifiers for who in ("ours", "R3")]]
    quantities = [
        ("Parameters", lambda m: count(m.get("params")), lambda r: count(r["params"])),
        ("Test accuracy", lambda m: pct(m.get("test_acc")), lambda r: approx(r["test_acc"], 100, "%")),
        ("Seconds / epoch", lambda m: fixed(m.get("s_per_epoch"), 1), lambda r: approx(r["s_per_epoch"])),
        ("Total training time", lambda m: seconds(m.get("train_seconds")), lambda r: approx(r["train_seconds"], unit=" s")),
    ]
    rows = []
    for name, ours, theirs in quantities:
        row = [name]
        for model, m in classifiers.items():
            row += [ours(m), theirs(REFERENCE[model]) if model in REFERENCE else DASH]
        rows.append(row)
    return table(header, rows)


def evaluation_table(evaluation: dict) -> dict | None:
    scores = {m: s for m, s in (evaluation.get("classifiers") or {}).items() if isinstance(s, dict)}
    if not scores:
        return None
    keys = {"accuracy": "Accuracy", "macro_precision": "Macro precision", "macro_recall": "Macro recall", "macro_f1": "Macro F1"}
    rows = [[LABELS.get(m, m), *[pct(s.get(k)) for k in keys]] for m, s in scores.items()]
    return table(["Model", *keys.values()], rows)


def gan_quality_table(gans: dict[str, dict]) -> dict:
    header = ["GAN", "FID ↓", "FID floor (real vs real)", "IS ↑", "IS of real images", "KL from uniform ↓", "n"]
    rows = [
        [LABELS[g], fixed(m.get("fid")), fixed(m.get("fid_floor")),
         f"{fixed(m.get('inception_score'))}\u00a0±\u00a0{fixed(m.get('inception_score_std'))}",
         fixed(m.get("inception_score_real")), fixed(m.get("kl_uniform"), 4), count(m.get("n"))]
        for g, m in gans.items()
    ]
    return table(header, rows)


def key_numbers_of(classifiers: dict, gans: dict, judge: dict | None, evaluation: dict) -> dict[str, float]:
    """The headline numbers, flat (`vit.test_acc`): returned, and logged as MLflow metrics."""
    classifier_keys = ("test_acc", "val_acc", "best_val_acc", "params", "s_per_epoch", "train_seconds")
    gan_keys = ("fid", "fid_floor", "inception_score", "inception_score_real", "kl_uniform", "s_per_epoch", "total_seconds")
    numbers = {f"{m}.{k}": metrics[k] for m, metrics in classifiers.items() for k in classifier_keys if k in metrics}
    numbers |= {f"{g}.{k}": metrics[k] for g, metrics in gans.items() for k in gan_keys if k in metrics}
    for m, scores in (evaluation.get("classifiers") or {}).items():
        if isinstance(scores, dict) and "macro_f1" in scores:
            numbers[f"{m}.macro_f1"] = scores["macro_f1"]
    if judge and "test_acc" in judge:
        numbers["judge.test_acc"] = judge["test_acc"]
    numeric = {k: v for k, v in numbers.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return {k: float(v) for k, v in numeric.items() if math.isfinite(v)}


# ---------------------------------------------------------------------------- curves
def _figure(path: Path, draw) -> Path:
    """One curve PNG; every curve has the same size so that they line up in the page's grid."""
    with sns.axes_style("whitegrid"), sns.plotting_context("notebook", font_scale=0.85, rc={"legend.fontsize": 8}):
        fig = Figure(figsize=(5.2, 3.6), layout="constrained")
        ax = fig.add_subplot()
        draw(ax)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs and digits are whole numbers
        lo, hi = ax.get_xlim()
        if hi - lo < 2:  # a single epoch: matplotlib would tick 0.95, 0.96, ... around it
            ax.set_xlim(round((lo + hi) / 2) - 1, round((lo + hi) / 2) + 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def r3_test_bands(ax, models) -> None:
    """R3's final test accuracy of each classifier, a band in the model's colour (accuracy in %)."""
    for m in (m for m in models if m in REFERENCE):
        lo, hi = REFERENCE[m]["test_acc"]
        ax.axhspan(100 * lo, 100 * hi, color=COLOURS[LABELS[m]], alpha=0.15, label=f"R3 {LABELS[m]} test")


def fid_lines(ax, curves: list[tuple[str, str, list, list, float | None]], title: str) -> None:
    """FID per epoch: a line per (label, colour, epochs, fids, floor), the floor dashed in its colour."""
    for label, colour, epochs, fids, floor in curves:
        ax.plot(epochs, fids, marker="o", color=colour, label=label)
        if floor is not None:
            ax.axhline(floor, color=colour, ls="--", lw=1, label=f"{label} floor")
    ax.set(title=title, xlabel="epoch", ylabel="FID (LeNet features)")
    ax.legend()


def classifier_curves(histories: dict[str, pd.DataFrame], out: Path) -> list[tuple[Path, str]]:
    """Loss, accuracy and seconds per epoch, ViT and CNN on each plot, as in R3."""
    long = pd.concat([h.assign(model=LABELS[m]) for m, h in histories.items()], ignore_index=True)
    palette = {LABELS[m]: COLOURS[LABELS[m]] for m in histories}

    def train_vs_test(metric: str, scale: float):
        # The validation curve too, when a validation split was held out.
        splits = [f"{split}_{metric}" for split in ("train", "val", "test") if f"{split}_{metric}" in long]
        table = long.melt(["epoch", "model"], splits, var_name="split")
        table["split"] = table["split"].str.removesuffix(f"_{metric}")
        table["value"] *= scale
        return table

    def lines(table: pd.DataFrame, ax) -> None:
        sns.lineplot(table, x="epoch", y="value", hue="model", style="split", palette=palette, marker="o", ax=ax)

    def loss(ax):
        lines(train_vs_test("loss", 1), ax)
        ax.set(title="Loss (cross-entropy)", ylabel="loss")

    def accuracy(ax):
        r3_test_bands(ax, histories)
        lines(train_vs_test("acc", 100), ax)
        ax.set(title="Accuracy (band: R3's final test accuracy)", ylabel="accuracy (%)")

    def epoch_time(ax):
        sns.lineplot(long, x="epoch", y="epoch_seconds", hue="model", palette=palette, marker="o", ax=ax)
        for m in (m for m in histories if m in REFERENCE):
            ax.axhline(midpoint(REFERENCE[m]["s_per_epoch"]), color=palette[LABELS[m]], ls=":", label=f"R3 {LABELS[m]}")
        ax.set(title="Seconds per epoch (dotted: R3)", ylabel="seconds", ylim=(0, None))
        ax.legend()

    return [
        (_figure(out / "classifier_loss.png", loss), "Loss per epoch, ViT vs CNN"),
        (_figure(out / "classifier_accuracy.png", accuracy), "Accuracy per epoch, ViT vs CNN"),
        (_figure(out / "classifier_epoch_time.png", epoch_time), "Seconds per epoch, ViT vs CNN"),
    ]


def gan_loss_curve(name: str, history: pd.DataFrame, out: Path) -> tuple[Path, str]:
    ref = REFERENCE[name]

    def draw(ax):
        for column, label, colour in (("d_loss", "D", "C0"), ("g_loss", "G", "C3")):
            ax.plot(history["epoch"], history[column], marker="o", color=colour, label=f"{label} loss")
            ax.axhline(ref[column], color=colour, ls=":", label=f"{ref['source']} {label} ({ref['at']}) {ref[column]}")
        ax.set(title=f"{LABELS[name]}: D and G loss (dotted: {ref['source']})", xlabel="epoch", ylabel="BCE loss")
        ax.legend()

    return _figure(out / f"gan_{name}_loss.png", draw), f"{LABELS[name]}: discriminator and generator loss"


def gan_fid_curve(fids: dict[str, pd.DataFrame], floors: dict[str, float], out: Path) -> tuple[Path, str]:
    def draw(ax):
        curves = [(LABELS[g], COLOURS[LABELS[g]], curve["epoch"], curve["fid"], floors.get(g)) for g, curve in fids.items()]
        fid_lines(ax, curves, "FID during training (dashed: real-vs-real floor)")

    return _figure(out / "gan_fid.png", draw), "FID (judge features) during training"


def class_histogram_chart(gans: dict[str, dict], out: Path) -> tuple[Path, str]:
    rows = [{"digit": str(d), "GAN": LABELS[g], "samples": c} for g, m in gans.items() for d, c in enumerate(m["class_histogram"])]
    palette = {LABELS[g]: COLOURS[LABELS[g]] for g in gans}

    def draw(ax):
        sns.barplot(pd.DataFrame(rows), x="digit", y="samples", hue="GAN", palette=palette, ax=ax)
        uniform = sum(gans[next(iter(gans))]["class_histogram"]) / 10
        ax.axhline(uniform, color="grey", ls="--", lw=1, label="uniform")
        ax.set(title="Generated digits per class (judge's labels)", ylabel="samples")
        ax.legend()

    return _figure(out / "gan_class_histogram.png", draw), "Class histogram of generated digits (dashed: uniform)"


def reference_scale_curves(results: dict[str, dict], out: Path) -> list[tuple[Path, str]]:
    """The reference-scale runs epoch by epoch: the classifiers' accuracy, the GANs' FID."""
    runs = list(reference_scale_runs(results))
    classifiers = [(m, label, r) for m, label, r in runs if m in CLASSIFIERS and r.get("history")]
    fids = [(m, label, r) for m, label, r in runs if m in GANS and r.get("fid_curve")]
    curves = []

    def accuracy(ax):
        models = dict.fromkeys(m for m, _, _ in classifiers)  # each once, in order
        r3_test_bands(ax, models)
        for m, label, r in classifiers:
            epochs = [row["epoch"] for row in r["history"]]
            style = {"color": COLOURS[LABELS[m]], "alpha": 1.0 if label == LABELS[m] else 0.45}
            ax.plot(epochs, [100 * row["test_acc"] for row in r["history"]], marker="o", ms=3, label=f"{label} test", **style)
            ax.plot(epochs, [100 * row["train_acc"] for row in r["history"]], ls=":", label=f"{label} train", **style)
        for m in models:
            if by_epoch := REFERENCE.get(m, {}).get("train_acc_by_epoch"):
                ax.plot(list(by_epoch), [100 * a for a in by_epoch.values()], "x", color="black", label=f"R3 {LABELS[m]} train")
        ax.set(title="Reference scale: accuracy per epoch (band: R3's final test)", xlabel="epoch", ylabel="accuracy (%)")
        # Below the axes: inside, its many entries hid the curves wherever matplotlib put them.
        ax.figure.legend(loc="outside lower center", ncol=3)

    def fid(ax):
        curves = [(label, COLOURS[LABELS[m]], [p["epoch"] for p in r["fid_curve"]], [p["fid"] for p in r["fid_curve"]], r.get("fid_floor"))
                  for m, label, r in fids]
        fid_lines(ax, curves, "Reference scale: FID during training (dashed: floor)")

    if classifiers:
        curves.append((_figure(out / "reference_scale_accuracy.png", accuracy), "Reference-scale runs: accuracy per epoch"))
    if fids:
        curves.append((_figure(out / "reference_scale_fid.png", fid), "Reference-scale GAN runs: FID during training"))
    return curves


def reference_scale_grids(results: dict[str, dict], root: Path) -> tuple[list[tuple[Path, str]], list[str]]:
    """The finished GAN runs' 10x10 grids, which `reference_scale.py record` keeps beside the JSON,
    and a note for each grid the JSON names that is not there (the page says so instead of leaving it out)."""
    grids, notes = [], []
    for m, label, r in reference_scale_runs(results):
        if m not in GANS or "grid" not in r:
            continue
        if (root / r["grid"]).exists():
            grids.append((root / r["grid"], f"{label} at reference scale: 100 samples after {r['epochs']} epochs"))
        else:
            notes.append(f"{r['grid']} is missing: no {label} grid (reference_scale.json names it; "
                         "`reference_scale.py record` keeps it there).")
    return grids, notes


# ---------------------------------------------------------------------------- assembling the page
def figure(path: Path, caption: str, reports: Path) -> dict:
    # Markdown links are relative to reports/, so they work in a checkout and on a forge.
    return {"path": path, "caption": caption, "rel": Path(os.path.relpath(path, reports)).as_posix()}


def sample_frames(folder: Path) -> list[Path]:
    frames = sorted(folder.glob("epoch_*.png"))
    if len(frames) <= MAX_FRAMES:
        return frames
    picks = {round(i * (len(frames) - 1) / (MAX_FRAMES - 1)) for i in range(MAX_FRAMES)}
    return [frames[i] for i in sorted(picks)]


def curves_section(root: Path, classifiers: dict, gans: dict) -> tuple[list[dict], list[str]]:
    """The curves drawn from the per-epoch histories, and a note for each one that can't be."""
    out, reports = root / CURVES, root / REPORTS
    curves, notes = [], []
    columns = ("epoch", "train_loss", "train_acc", "test_loss", "test_acc", "epoch_seconds")
    histories = {}
    for m in classifiers:
        path = metrics_dir(m) / "history.csv"
        if (history := read_csv(root / path, columns)) is None:
            notes.append(f"{path.as_posix()} is missing: no {LABELS[m]} curves.")
        else:
            histories[m] = history
    if histories:
        curves += [figure(p, c, reports) for p, c in classifier_curves(histories, out)]
    for g in gans:
        path = metrics_dir(g) / "history.csv"
        if (history := read_csv(root / path, ("epoch", "d_loss", "g_loss"))) is None:
            notes.append(f"{path.as_posix()} is missing: no {LABELS[g]} loss curve.")
        else:
            curves.append(figure(*gan_loss_curve(g, history, out), reports))
    fids = {}
    for g in gans:
        curve = read_csv(root / metrics_dir(g) / "fid.csv", ("epoch", "fid"))
        if curve is not None and not (curve := curve.dropna()).empty:
            fids[g] = curve
    if gans and not fids:
        notes.append(f"No FID curve: it was off (gan.fid_every = 0) or {GAN_METRICS.as_posix()}/<gan>/fid.csv is missing.")
    if fids:
        floors = {g: gans[g]["fid_floor"] for g in fids if isinstance(gans[g].get("fid_floor"), (int, float))}
        curves.append(figure(*gan_fid_curve(fids, floors, out), reports))
    return curves, notes


def evaluation_rows(root: Path) -> tuple[list[list[dict]], str | None]:
    """The evaluate stage's pictures that exist, row by row, and a note naming those that don't."""
    rows, missing = [], []
    for row in EVALUATION_FIGURES:
        present = [figure(root / FIGURES / n, caption, root / REPORTS) for n, caption in row if (root / FIGURES / n).exists()]
        missing += [name for name, _ in row if not (root / FIGURES / name).exists()]
        if present:
            rows.append(present)
    return rows, f"Not produced by the evaluate stage, so not shown: {', '.join(missing)}." if missing else None


def gan_pictures(root: Path, name: str) -> dict:
    folder, reports = root / model_dir(name), root / REPORTS
    label = LABELS[name]
    pictures = [
        (folder / "grid_10x10.png", f"{label}: 100 samples (10×10)"),
        (folder / "progression.gif", f"{label}: the same 100 noise vectors across training"),
        (folder / "nearest_neighbours.png", f"{label}: samples and their nearest training images"),
    ]
    return {
        "label": label,
        "pictures": [figure(p, c, reports) for p, c in pictures if p.exists()],
        "frames": [figure(p, f"epoch {int(p.stem.split('_')[1])}", reports) for p in sample_frames(folder / "samples")],
    }


def datasets(manifest: dict) -> list[dict]:
    return [
        {"name": name, "train": count(e.get("train")), "test": count(e.get("test")), "sha256": e.get("sha256", DASH),
         "files": e.get("files") or {}}
        for name, e in manifest.items()
    ]


SSL_SIZE_SERIES = {"probe_test": "SimCLR encoder, linear probe", "knn_test": "SimCLR encoder, k-NN",
                   "random_probe_test": "random weights, linear probe (floor)"}


def ssl_size_chart(rows: list[dict], path: Path) -> Path:
    """Test accuracy against the number of pre-training images, one line per SSL_SIZE_SERIES (the
    pre-training-set-size study: `reprovision study --ssl-size` draws it, the report too once recorded)."""
    table = pd.DataFrame(rows)
    long = table.melt(id_vars=["ssl_train_images"], value_vars=[k for k in SSL_SIZE_SERIES if k in table],
                      var_name="encoder", value_name="acc").dropna()
    long = long.assign(encoder=long["encoder"].map(SSL_SIZE_SERIES), acc=100 * long["acc"])

    def draw(ax):
        sns.lineplot(long, x="ssl_train_images", y="acc", hue="encoder", style="encoder", marker="o", ax=ax)
        ax.set(title="Test accuracy vs pre-training images", xlabel="images SimCLR pre-trained on", ylabel="test accuracy (%)")
        ax.legend(title=None)

    return _figure(path, draw)


def ssl_section(root: Path, params: Params, probe: dict | None, cnn: dict | None) -> dict | None:
    """R4's self-supervised experiment: the probe of the SimCLR encoder (`probe`, the linear-probe stage's
    summary) beside the from-scratch floor and the supervised CNN, and the pre-training loss curve; None
    when the SSL stages did not run."""
    pretrained = read_json(root / METRICS / "ssl" / SUMMARY)
    if probe is None or pretrained is None:
        return None
    s, full = params.ssl, Params().ssl
    arch = s.layout()
    reduced = s.train_fraction < 1 or s.epochs < full.epochs or params.data.train_fraction < 1 or params.data.test_fraction < 1
    val = "probe_val" in probe
    rows = [
        ["SimCLR encoder, frozen (pretrain-ssl → linear-probe)", pct(probe["probe_test"]), pct(probe["knn_test"]),
         *([pct(probe["probe_val"])] if val else [])],
        ["Same architecture, random weights, frozen (the from-scratch floor)", pct(probe["random_probe_test"]),
         pct(probe["random_knn_test"]), *([pct(probe["random_probe_val"])] if val else [])],
    ]
    counterpart = s.counterpart
    same = params.classifier(counterpart).layout() == s.layout()
    if cnn is not None:
        note = "same architecture" if same else f"a different architecture: set {counterpart}.arch (and widths) to match ssl's"
        rows.append([f"Supervised, trained end to end (train-{counterpart}, {note})", pct(cnn.get("test_acc")), DASH,
                     *([pct(cnn.get("val_acc"))] if val else [])])
    header = ["Encoder", "Linear probe, test", f"k-NN (k={params.probe.knn_k}), test", *(["Linear probe, validation"] if val else [])]
    history = read_csv(root / METRICS / "ssl" / "history.csv", ("epoch", "loss"))
    curve = None
    if history is not None:
        def draw(ax):
            sns.lineplot(data=history, x="epoch", y="loss", marker="o", ax=ax, color=COLOURS[LABELS[s.counterpart]])
            ax.set(title="SimCLR pre-training loss", ylabel="NT-Xent loss")

        curve = figure(_figure(root / CURVES / "ssl_loss.png", draw), "SimCLR pre-training loss (NT-Xent) per epoch", root / REPORTS)
    study = (read_json(root / SSL_SIZE_STUDY) or {}).get("runs", [])
    size_study = None
    if len(study) >= 2:
        chart = ssl_size_chart(study, root / CURVES / "ssl_size.png")
        size_study = figure(chart, f"Pre-training-set-size study: {len(study)} runs recorded in {SSL_SIZE_STUDY.as_posix()}", root / REPORTS)
    configuration = cell(
        f"{arch}, {pretrained.get('train_images', 0):,} pre-training images · {pretrained.get('epochs')}/{full.epochs} epochs · "
        f"batch {s.batch_size}, temperature {s.temperature}", badge="reduced" if reduced else None,
    )
    return {"table": table(header, rows), "curve": curve, "size_study": size_study, "configuration": configuration}


def context(root: Path, params: Params) -> tuple[dict, dict[str, float]]:
    """Everything both templates show, and the key numbers."""
    results_json = {m: metrics_dir(m) / SUMMARY for m in TRAINED}
    results = {m: j for m, path in results_json.items() if (j := read_json(root / path))}
    absent = [path.as_posix() for m, path in results_json.items() if m not in results]
    classifiers = {m: results[m] for m in CLASSIFIERS if m in results}
    gans = {g: results[g] for g in GANS if g in results}
    judge = results.get("judge")
    evaluation = read_json(root / EVAL_METRICS / SUMMARY) or {}
    probe = read_json(root / METRICS / "probe" / SUMMARY)
    runs = run_refs(root)

    rows, stores, any_reduced = summary_rows(params, results, runs)
    curves, curve_notes = curves_section(root, classifiers, gans)
    figure_rows, figure_note = evaluation_rows(root) if classifiers else ([], None)
    histograms = {g: m for g, m in gans.items() if len(m.get("class_histogram") or []) == 10}
    commit, dirty = track.git_state(root)
    cards = {LABELS[m]: path.read_text() for m in CLASSIFIERS if (path := root / model_dir(m) / "card.md").exists()}
    reference_runs = read_json(root / REFERENCE_SCALE) or {}
    grids, grid_notes = reference_scale_grids(reference_runs, root)
    ctx = {
        "commit": commit,
        "dirty": dirty,
        "dataset": params.data.classifier_dataset,
        "params_sha": params.digest()[:12],
        "any_reduced": any_reduced,
        "absent": absent,
        "summary": table(["Model", "Parameters", "Result", "Configuration", "Training time", "Device", "MLflow run"], rows),
        "stores": stores,
        "comparison": comparison_table(classifiers) if classifiers else None,
        "champion": read_champion(root),
        "no_champion": why_no_champion(read_records(root)[0]),
        "reference_scale": reference_scale_table(reference_runs),
        "reference_scale_epochs": reference_scale_epochs(reference_runs),
        "reference_scale_curves": [figure(p, c, root / REPORTS) for p, c in reference_scale_curves(reference_runs, root / CURVES)],
        "reference_scale_grids": [figure(p, c, root / REPORTS) for p, c in grids],
        "reference_scale_notes": grid_notes,
        # R3 trained its families' default architectures on CIFAR-10: other settings are not its comparison.
        "r3_mismatch": bool(classifiers) and (params.data.classifier_dataset != "cifar10" or any(
            params.classifier(m).architecture() != type(params.classifier(m))().architecture() for m in classifiers)),
        "curves": curves,
        "curve_notes": curve_notes,
        "evaluation_table": evaluation_table(evaluation),
        "evaluation_rows": figure_rows,
        "evaluation_note": figure_note,
        "gan_quality": gan_quality_table(gans) if gans else None,
        "histogram": figure(*class_histogram_chart(histograms, root / CURVES), root / REPORTS) if histograms else None,
        "gans": [gan_pictures(root, g) for g in gans],
        "ssl": ssl_section(root, params, probe, classifiers.get(params.ssl.counterpart)),
        "params_yaml": (root / PARAMS).read_text(),
        "datasets": datasets(read_json(root / MANIFEST) or {}),
        "versions": track.library_versions(),
        "cards": cards,
        "runs": {LABELS[m]: r for m, r in runs.items() if r},
        "max_frames": MAX_FRAMES,
    }
    ssl_numbers = {f"ssl.{k}": float(v) for k, v in (probe or {}).items() if k.endswith(("_test", "_val")) and isinstance(v, (int, float))}
    return ctx, {**key_numbers_of(classifiers, gans, judge, evaluation), **ssl_numbers}


# ---------------------------------------------------------------------------- rendering
def data_uri(path: Path) -> str:
    mime = mimetypes.guess_type(str(path))[0] or "application/octet-stream"
    return f"data:{mime};base64,{base64.b64encode(Path(path).read_bytes()).decode('ascii')}"


def md_cell(c: str | dict) -> str:
    if isinstance(c, str):
        return c
    text = f"`{c['text']}`" if c["code"] else c["text"]
    text = f"[{text}]({c['href']})" if c["href"] else text
    text += f" **{c['badge']}**" if c["badge"] else ""
    return text + (f" ({c['ref']})" if c["ref"] else "")


def html_cell(c: str | dict) -> Markup:
    if isinstance(c, str):
        return escape(c)
    text = Markup("<code>{}</code>").format(c["text"]) if c["code"] else escape(c["text"])
    if c["href"]:
        text = Markup('<a href="{}">{}</a>').format(c["href"], text)
    if c["badge"]:
        text += Markup(' <span class="badge">{}</span>').format(c["badge"])
    if c["ref"]:
        text += Markup('<span class="ref">{}</span>').format(c["ref"])
    return text


def markdown_to_html(text: str) -> Markup:
    """The model cards are Markdown; raw HTML in them is not passed through."""
    return Markup(MarkdownIt("commonmark", {"html": False}).enable("table").render(text))


def render(kind: str, ctx: dict) -> str:
    """The page from templates/report.<kind>.j2 ("md" or "html"); only HTML escapes what it inserts."""
    html = kind == "html"
    env = Environment(
        loader=FileSystemLoader(TEMPLATES), autoescape=html, trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True,
        undefined=StrictUndefined,  # a context key the templates expect but context() forgot fails loudly
    )
    env.filters.update(cell=html_cell if html else md_cell, data_uri=data_uri, markdown=markdown_to_html)
    return env.get_template(f"report.{kind}.j2").render(**ctx)


def build_report(root: Path = Path("."), params: Params | None = None) -> dict:
    """Write reports/report.md, reports/report.html and reports/curves/*.png; the key numbers shown.

    `params`: as the calling stage read them; by default root's params.yaml.
    """
    root = Path(root)
    params = load_params(root / PARAMS) if params is None else params
    ctx, key_numbers = context(root, params)
    (root / REPORTS).mkdir(parents=True, exist_ok=True)
    (root / REPORTS / "report.md").write_text(render("md", ctx))
    (root / REPORTS / "report.html").write_text(render("html", ctx))
    return key_numbers


def log_summary_run(root: Path, key_numbers: dict[str, float], params: Params | None = None) -> str:
    """One MLflow `report` run: the key numbers as metrics, the report as artifacts, links to the model runs.

    `params`: as for build_report().
    """
    import mlflow

    root = Path(root)
    pages = [root / REPORTS / "report.html", root / REPORTS / "report.md"]
    if missing := [str(p) for p in pages if not p.exists()]:
        raise ReportError(f"{', '.join(missing)} not found: call build_report() first")
    params = load_params(root / PARAMS) if params is None else params
    linked = {m: ref["run_id"] for m, ref in run_refs(root).items() if ref}
    tags = {
        "linked_runs": ",".join(linked.values()),
        **{f"linked_run.{m}": run_id for m, run_id in linked.items()},
        "params_sha256": params.digest(),
    }
    with track.stage_run("report", "summary", params.flat(), tags, params, root=track.project_root(root)) as run:
        mlflow.log_metrics({k: float(v) for k, v in key_numbers.items()})
        for page in pages:
            mlflow.log_artifact(str(page))
        if (root / CURVES).is_dir():
            mlflow.log_artifacts(str(root / CURVES), artifact_path="curves")
    return run.info.run_id
