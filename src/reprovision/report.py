"""The `report` stage: every result of the pipeline on one page, beside the reference figures.

Writes `reports/report.md` (terminal, pull request) and `reports/report.html`, one self-contained
file (images as base64 data URIs, CSS inline, no network) that opens from disk on a laptop. Both
are rendered from the same context by two Jinja templates, so a number reads the same in both.
Curves are drawn here into `reports/curves/`; the other pictures come from earlier stages.
Any input may be missing (a GAN-less or classifier-less run): its section says so and moves on.
"""

from __future__ import annotations

import base64
import json
import math
import mimetypes
import os
from pathlib import Path
from typing import Any

import pandas as pd
import seaborn as sns
from jinja2 import Environment, StrictUndefined
from markdown_it import MarkdownIt
from markupsafe import Markup, escape
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from . import track
from .config import Params, load_params

REPORTS = Path("reports")
CURVES = REPORTS / "curves"
FIGURES = REPORTS / "figures"

# What the source documents reported (../shared/SEEDS.md), shown beside our numbers.
# Ranges are (low, high); R1 and R2 reported no quality metric, only losses.
REFERENCE: dict[str, dict[str, Any]] = {
    "vit": {"source": "R3", "params": 5_362_762, "test_acc": (0.52, 0.55), "s_per_epoch": 14, "train_seconds": 420},
    "cnn": {"source": "R3", "params": 4_823_114, "test_acc": (0.65, 0.70), "s_per_epoch": (8, 10), "train_seconds": (240, 300)},
    "mlp": {"source": "R1", "g_params": 1_496_592, "d_params": 533_505, "d_loss": 0.347, "g_loss": 0.697, "at": "final"},
    "dcgan": {"source": "R2", "d_loss": 0.695, "g_loss": 0.728, "at": "epoch 35", "s_per_epoch": 63},
}

LABELS = {"vit": "ViT", "cnn": "CNN", "mlp": "MLP GAN", "dcgan": "DCGAN", "judge": "LeNet judge"}
CLASSIFIERS = ("vit", "cnn")
GANS = ("mlp", "dcgan")
RUN_REFS = {
    "vit": "models/vit/run.json",
    "cnn": "models/cnn/run.json",
    "mlp": "models/gan/mlp/run.json",
    "dcgan": "models/gan/dcgan/run.json",
    "judge": "models/judge/run.json",
}
# The evaluate stage's pictures, one list per row of the page.
EVALUATION_FIGURES = [
    [("confusion_raw.png", "Confusion matrices (counts)")],
    [("confusion_normalised.png", "Confusion matrices (each row: fraction of the true class)")],
    [("per_class_accuracy.png", "Per-class test accuracy")],
    [("misclassified_vit.png", "ViT: misclassified test images"), ("misclassified_cnn.png", "CNN: misclassified test images")],
    [("gradcam_cnn.png", "CNN: Grad-CAM heat maps"), ("rollout_vit.png", "ViT: attention rollout")],
]
MAX_FRAMES = 6  # sample-progression frames shown per GAN, evenly spaced, first and last included
COLOURS = dict(zip(("ViT", "CNN", "MLP GAN", "DCGAN"), sns.color_palette("deep")))
DASH = "—"


class ReportError(ValueError):
    """An input of the report exists but can't be used; the message names the file and the fix."""


# ---------------------------------------------------------------------------- reading inputs
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
def run_link(ref: dict | None) -> tuple[dict | str, str | None]:
    """The cell pointing at an MLflow run, and the `mlflow ui` command that opens a local store."""
    if ref is None:
        return DASH, None
    uri = ref.get("tracking_uri", "")
    if uri.startswith(("http://", "https://")):
        href = f"{uri.rstrip('/')}/#/experiments/{ref['experiment_id']}/runs/{ref['run_id']}"
        return cell(ref.get("run_name", "run"), href=href), None
    return cell(ref["run_id"], code=True), f"mlflow ui --backend-store-uri {uri}"


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
            row += [ours(m), theirs(REFERENCE[model])]
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
    classifier_keys = ("test_acc", "best_test_acc", "params", "s_per_epoch", "train_seconds")
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
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def classifier_curves(histories: dict[str, pd.DataFrame], out: Path) -> list[tuple[Path, str]]:
    """Loss, accuracy and seconds per epoch, ViT and CNN on each plot, as in R3."""
    long = pd.concat([h.assign(model=LABELS[m]) for m, h in histories.items()], ignore_index=True)
    palette = {LABELS[m]: COLOURS[LABELS[m]] for m in histories}

    def train_vs_test(metric: str, scale: float):
        table = long.melt(["epoch", "model"], [f"train_{metric}", f"test_{metric}"], var_name="split")
        table["split"] = table["split"].str.removesuffix(f"_{metric}")
        table["value"] *= scale
        return table

    def lines(table: pd.DataFrame, ax) -> None:
        sns.lineplot(table, x="epoch", y="value", hue="model", style="split", palette=palette, marker="o", ax=ax)

    def loss(ax):
        lines(train_vs_test("loss", 1), ax)
        ax.set(title="Loss (cross-entropy)", ylabel="loss")

    def accuracy(ax):
        for m in histories:
            lo, hi = REFERENCE[m]["test_acc"]
            ax.axhspan(100 * lo, 100 * hi, color=palette[LABELS[m]], alpha=0.15, label=f"R3 {LABELS[m]} test")
        lines(train_vs_test("acc", 100), ax)
        ax.set(title="Accuracy (band: R3's final test accuracy)", ylabel="accuracy (%)")

    def epoch_time(ax):
        sns.lineplot(long, x="epoch", y="epoch_seconds", hue="model", palette=palette, marker="o", ax=ax)
        for m in histories:
            ref = REFERENCE[m]["s_per_epoch"]
            middle = sum(ref) / 2 if isinstance(ref, tuple) else ref
            ax.axhline(middle, color=palette[LABELS[m]], ls=":", label=f"R3 {LABELS[m]}")
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
        for g, curve in fids.items():
            colour = COLOURS[LABELS[g]]
            ax.plot(curve["epoch"], curve["fid"], marker="o", color=colour, label=LABELS[g])
            if g in floors:
                ax.axhline(floors[g], color=colour, ls="--", lw=1, label=f"{LABELS[g]} floor")
        ax.set(title="FID during training (dashed: real-vs-real floor)", xlabel="epoch", ylabel="FID (LeNet features)")
        ax.legend()

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
    histories = {m: read_csv(root / "metrics" / m / "history.csv", columns) for m in classifiers}
    histories = {m: h for m, h in histories.items() if h is not None}
    notes += [f"metrics/{m}/history.csv is missing: no {LABELS[m]} curves." for m in classifiers if m not in histories]
    if histories:
        curves += [figure(p, c, reports) for p, c in classifier_curves(histories, out)]
    for g in gans:
        history = read_csv(root / "metrics" / "gan" / g / "history.csv", ("epoch", "d_loss", "g_loss"))
        if history is None:
            notes.append(f"metrics/gan/{g}/history.csv is missing: no {LABELS[g]} loss curve.")
        else:
            curves.append(figure(*gan_loss_curve(g, history, out), reports))
    fids = {}
    for g in gans:
        curve = read_csv(root / "metrics" / "gan" / g / "fid.csv", ("epoch", "fid"))
        if curve is not None and not (curve := curve.dropna()).empty:
            fids[g] = curve
    if gans and not fids:
        notes.append("No FID curve: it was off (gan.fid_every = 0) or metrics/gan/<gan>/fid.csv is missing.")
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
    folder, reports = root / "models" / "gan" / name, root / REPORTS
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


def context(root: Path, params: Params) -> tuple[dict, dict[str, float]]:
    """Everything both templates show, and the key numbers."""
    classifiers = {m: j for m in CLASSIFIERS if (j := read_json(root / "metrics" / f"{m}.json"))}
    gans = {g: j for g in GANS if (j := read_json(root / "metrics" / "gan" / f"{g}.json"))}
    judge = read_json(root / "metrics" / "judge.json")
    evaluation = read_json(root / "metrics" / "evaluate.json") or {}
    runs = {m: read_json(root / path) for m, path in RUN_REFS.items()}
    absent = [f"metrics/{m}.json" for m in CLASSIFIERS if m not in classifiers]
    absent += [f"metrics/gan/{g}.json" for g in GANS if g not in gans] + ([] if judge else ["metrics/judge.json"])

    results = {**classifiers, **gans, **({"judge": judge} if judge else {})}
    rows, stores, any_reduced = summary_rows(params, results, runs)
    curves, curve_notes = curves_section(root, classifiers, gans)
    figure_rows, figure_note = evaluation_rows(root) if classifiers else ([], None)
    histograms = {g: m for g, m in gans.items() if len(m.get("class_histogram") or []) == 10}
    commit, dirty = track.git_state(root)
    cards = {LABELS[m]: path.read_text() for m in CLASSIFIERS if (path := root / "models" / m / "card.md").exists()}
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
        "r3_mismatch": bool(classifiers) and (params.data.classifier_dataset != "cifar10" or params.cnn.arch != "refcnn"),
        "curves": curves,
        "curve_notes": curve_notes,
        "evaluation_table": evaluation_table(evaluation),
        "evaluation_rows": figure_rows,
        "evaluation_note": figure_note,
        "gan_quality": gan_quality_table(gans) if gans else None,
        "histogram": figure(*class_histogram_chart(histograms, root / CURVES), root / REPORTS) if histograms else None,
        "gans": [gan_pictures(root, g) for g in gans],
        "params_yaml": (root / "params.yaml").read_text(),
        "datasets": datasets(read_json(root / "data" / "prepared" / "manifest.json") or {}),
        "versions": track.library_versions(),
        "cards": cards,
        "runs": {LABELS[m]: r for m, r in runs.items() if r},
        "max_frames": MAX_FRAMES,
    }
    return ctx, key_numbers_of(classifiers, gans, judge, evaluation)


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
    html = kind == "html"
    env = Environment(autoescape=html, trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True, undefined=StrictUndefined)
    env.filters.update(cell=html_cell if html else md_cell, data_uri=data_uri, markdown=markdown_to_html)
    return env.from_string(HTML if html else MARKDOWN).render(**ctx)


def build_report(root: Path = Path(".")) -> dict:
    """Write reports/report.md, reports/report.html and reports/curves/*.png; the key numbers shown."""
    root = Path(root)
    params = load_params(root / "params.yaml")
    ctx, key_numbers = context(root, params)
    (root / REPORTS).mkdir(parents=True, exist_ok=True)
    (root / REPORTS / "report.md").write_text(render("md", ctx))
    (root / REPORTS / "report.html").write_text(render("html", ctx))
    return key_numbers


def log_summary_run(root: Path, key_numbers: dict[str, float]) -> str:
    """One MLflow `report` run: the key numbers as metrics, the report as artifacts, links to the model runs."""
    import mlflow

    root = Path(root)
    pages = [root / REPORTS / "report.html", root / REPORTS / "report.md"]
    if missing := [str(p) for p in pages if not p.exists()]:
        raise ReportError(f"{', '.join(missing)} not found: call build_report() first")
    params = load_params(root / "params.yaml")
    linked = {m: ref["run_id"] for m, path in RUN_REFS.items() if (ref := read_json(root / path))}
    tags = {
        "linked_runs": ",".join(linked.values()),
        **{f"linked_run.{m}": run_id for m, run_id in linked.items()},
        "params_sha256": params.digest(),
    }
    with track.stage_run("report", "summary", params.flat(), tags, root=track.project_root(root)) as run:
        mlflow.log_metrics({k: float(v) for k, v in key_numbers.items()})
        for page in pages:
            mlflow.log_artifact(str(page))
        if (root / CURVES).is_dir():
            mlflow.log_artifacts(str(root / CURVES), artifact_path="curves")
    return run.info.run_id


def main() -> None:
    key_numbers = build_report()
    run_id = log_summary_run(Path("."), key_numbers)
    print(f"[report] reports/report.html and reports/report.md; MLflow run {run_id}")


# ---------------------------------------------------------------------------- templates
MARKDOWN = """\
{% macro md_table(t) %}
| {{ t.header|join(" | ") }} |
|{% for _ in t.header %}---|{% endfor %}

{% for row in t.rows %}
| {% for c in row %}{{ c|cell }}{{ " | " if not loop.last }}{% endfor %} |
{% endfor %}
{% endmacro %}
# reprovision: results

Commit `{{ commit }}`{{ " (uncommitted changes)" if dirty }} · params sha256 `{{ params_sha }}` · classifier dataset {{ dataset }}.
The HTML version (`reports/report.html`) shows every figure.
{% if any_reduced %}

> **Reduced configuration**: some runs used less data or fewer epochs than the reference (see *Configuration*); their numbers are not one-to-one comparable with the reference figures.
{% endif %}
{% for path in absent %}
> Not run: `{{ path }}` is missing, its section is skipped.
{% endfor %}

## Summary

{{ md_table(summary) }}
{% for store in stores %}
Open local runs with `{{ store }}`.
{% endfor %}
{% if comparison %}

## ViT vs CNN, as in R3

{{ md_table(comparison) -}}
{% if r3_mismatch %}
> The reference is R3 (CIFAR-10, reference CNN); this run's dataset or CNN differs.
{% endif %}
{% endif %}

## Curves

{% for note in curve_notes %}
> {{ note }}
{% endfor %}
{% for f in curves %}
![{{ f.caption }}]({{ f.rel }})
{% endfor %}
{% if evaluation_table or evaluation_rows %}

## Evaluation

{% if evaluation_table %}
{{ md_table(evaluation_table) }}
{% endif %}
{% for row in evaluation_rows %}{% for f in row %}
![{{ f.caption }}]({{ f.rel }})
{% endfor %}{% endfor %}
{% if evaluation_note %}
> {{ evaluation_note }}
{% endif %}
{% endif %}
{% if gan_quality %}

## GANs

{{ md_table(gan_quality) }}
FID and IS use the LeNet judge's features on MNIST: lower FID is better, the floor is real-vs-real at the same n; a higher IS is better, the real-image IS is the ceiling.

{% if histogram %}
![{{ histogram.caption }}]({{ histogram.rel }})
{% endif %}
{% for g in gans %}
{% for f in g.pictures %}
![{{ f.caption }}]({{ f.rel }})
{% endfor %}
{% endfor %}
{% endif %}

## Provenance

- Git commit: `{{ commit }}`{{ " (uncommitted changes)" if dirty }}
{% for d in datasets %}
- Data `{{ d.name }}`: {{ d.train }} train / {{ d.test }} test, sha256 `{{ d.sha256 }}`
{% endfor %}
- Libraries: {% for name, version in versions.items() %}{{ name }} {{ version }}{{ ", " if not loop.last }}{% endfor %}


<details><summary>params.yaml</summary>

```yaml
{{ params_yaml }}
```
</details>
"""

HTML = """\
<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>reprovision: results</title>
<style>
:root { --fg: #1f2328; --muted: #59636e; --line: #d1d9e0; --soft: #f6f8fa; --accent: #0969da; }
* { box-sizing: border-box; }
body { margin: 0; color: var(--fg); background: #fff; font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
header { background: var(--soft); border-bottom: 1px solid var(--line); }
header .wrap { padding-top: 20px; padding-bottom: 14px; }
.wrap { max-width: 1280px; margin: 0 auto; padding: 0 24px; }
h1 { font-size: 24px; margin: 0 0 2px; }
h2 { font-size: 19px; margin: 36px 0 12px; padding-bottom: 6px; border-bottom: 1px solid var(--line); }
h3 { font-size: 16px; margin: 22px 0 8px; }
.meta { color: var(--muted); font-size: 14px; }
nav { position: sticky; top: 0; z-index: 1; background: rgba(255, 255, 255, .94); border-bottom: 1px solid var(--line); }
nav a { display: inline-block; padding: 8px 14px 8px 0; color: var(--muted); text-decoration: none; font-size: 14px; }
nav a:hover, a { color: var(--accent); }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; width: 100%; font-size: 14px; font-variant-numeric: tabular-nums; }
th, td { padding: 7px 10px; border-bottom: 1px solid var(--line); text-align: left; vertical-align: top; }
th { background: var(--soft); font-weight: 600; white-space: nowrap; }
td:first-child { font-weight: 600; white-space: nowrap; }
.ref { display: block; color: var(--muted); font-size: 12.5px; }
.badge { display: inline-block; padding: 0 7px; border-radius: 10px; font-size: 12px; font-weight: 600; color: #7d4e00; background: #fff1c2; border: 1px solid #e8c35a; }
.note { margin: 10px 0; padding: 8px 12px; border-left: 3px solid #e8c35a; background: #fffbea; color: #4d3a00; font-size: 14px; }
.grid { display: grid; gap: 14px; margin: 12px 0; align-items: start; grid-template-columns: repeat(var(--cols), minmax(0, 1fr)); }
figure { margin: 0; padding: 8px; border: 1px solid var(--line); border-radius: 8px; background: #fff; }
figure img { display: block; max-width: 100%; max-height: 640px; height: auto; margin: 0 auto; }
figure.pixels img { width: 100%; max-height: none; image-rendering: pixelated; }
figcaption { margin-top: 4px; color: var(--muted); font-size: 13px; }
code, pre { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 12.5px; }
td code { font-size: 11.5px; }
pre { margin: 8px 0; padding: 12px; overflow: auto; background: var(--soft); border-radius: 6px; }
details { margin: 8px 0; padding: 6px 12px; border: 1px solid var(--line); border-radius: 6px; }
td details { margin: 2px 0 0; padding: 0; border: 0; } td summary { font-weight: normal; color: var(--muted); }
summary { cursor: pointer; font-weight: 600; }
.card h1 { font-size: 17px; } .card table { width: auto; }
footer { margin: 40px 0 24px; color: var(--muted); font-size: 13px; }
</style>
</head>
<body>
{% macro html_table(t) %}
<div class="scroll"><table>
<thead><tr>{% for h in t.header %}<th>{{ h }}</th>{% endfor %}</tr></thead>
<tbody>
{% for row in t.rows %}
<tr>{% for c in row %}<td>{{ c|cell }}</td>{% endfor %}</tr>
{% endfor %}
</tbody>
</table></div>
{% endmacro %}
{% macro figures(items, cols, pixels=false) %}
<div class="grid" style="--cols: {{ cols }}">
{% for f in items %}
<figure{{ ' class="pixels"'|safe if pixels }}><img src="{{ f.path|data_uri }}" alt="{{ f.caption }}"><figcaption>{{ f.caption }}</figcaption></figure>
{% endfor %}
</div>
{% endmacro %}
<header><div class="wrap">
<h1>reprovision: results</h1>
<div class="meta">commit <code>{{ commit[:12] }}</code>{{ " · uncommitted changes" if dirty }} · params sha256 <code>{{ params_sha }}</code> · classifiers on {{ dataset }} · GANs on MNIST</div>
</div></header>
<nav><div class="wrap">
<a href="#summary">Summary</a>{% if comparison %}<a href="#comparison">ViT vs CNN</a>{% endif %}<a href="#curves">Curves</a>{% if evaluation_rows or evaluation_table %}<a href="#evaluation">Evaluation</a>{% endif %}{% if gan_quality %}<a href="#gans">GANs</a>{% endif %}<a href="#provenance">Provenance</a>
</div></nav>
<main class="wrap">
{% if any_reduced %}
<p class="note"><b>Reduced configuration.</b> Runs marked <span class="badge">reduced</span> used less data or fewer epochs than the reference configuration; their numbers are not one-to-one comparable with the reference figures.</p>
{% endif %}
{% for path in absent %}
<p class="note">Not run: <code>{{ path }}</code> is missing, so its section is skipped.</p>
{% endfor %}

<h2 id="summary">Summary</h2>
{{ html_table(summary) }}
{% for store in stores %}
<p class="meta">Open local runs with <code>{{ store }}</code></p>
{% endfor %}

{% if comparison %}
<h2 id="comparison">ViT vs CNN, as in R3</h2>
{{ html_table(comparison) }}
{% if r3_mismatch %}<p class="note">The reference is R3 (CIFAR-10, reference CNN); this run's dataset or CNN differs.</p>{% endif %}
{% endif %}

<h2 id="curves">Curves</h2>
{% for note in curve_notes %}<p class="note">{{ note }}</p>{% endfor %}
{% if curves %}{{ figures(curves, 3) }}{% endif %}

{% if evaluation_rows or evaluation_table %}
<h2 id="evaluation">Evaluation on the test set</h2>
{% if evaluation_table %}{{ html_table(evaluation_table) }}{% endif %}
{% for row in evaluation_rows %}{{ figures(row, row|length) }}{% endfor %}
{% if evaluation_note %}<p class="note">{{ evaluation_note }}</p>{% endif %}
{% endif %}

{% if gan_quality %}
<h2 id="gans">GANs on MNIST</h2>
<div class="grid" style="--cols: 3">
<div style="grid-column: span 2">
{{ html_table(gan_quality) }}
<p class="meta">FID and IS use the LeNet judge's features. Lower FID is better; the floor is real test vs real train images at the same n, the best reachable. Higher IS is better; the IS of real images is the ceiling. KL from uniform measures how unevenly the generated digits cover the 10 classes (0: perfectly even).</p>
</div>
{% if histogram %}{{ figures([histogram], 1) }}{% endif %}
</div>
{% for g in gans %}
<h3>{{ g.label }}</h3>
{% if g.pictures %}{{ figures(g.pictures, 3, pixels=true) }}{% endif %}
{% if g.frames %}
<p class="meta">The same noise vectors at successive epochs:</p>
{{ figures(g.frames, max_frames) }}
{% endif %}
{% endfor %}
{% endif %}

<h2 id="provenance">Provenance</h2>
<div class="scroll"><table>
<tr><td>Git commit</td><td><code>{{ commit }}</code>{{ " (uncommitted changes)" if dirty else " (clean)" }}</td></tr>
{% for d in datasets %}
<tr><td>Data: {{ d.name }}</td><td>{{ d.train }} train / {{ d.test }} test · sha256 <code>{{ d.sha256 }}</code>
{% if d.files %}<details><summary>files</summary>{% for file, sha in d.files.items() %}<code>{{ sha }}  {{ file }}</code><br>{% endfor %}</details>{% endif %}</td></tr>
{% endfor %}
<tr><td>Libraries</td><td>{% for name, version in versions.items() %}{{ name }} <code>{{ version }}</code>{{ " · " if not loop.last }}{% endfor %}</td></tr>
{% for label, ref in runs.items() %}
<tr><td>MLflow: {{ label }}</td><td>run <code>{{ ref.run_id }}</code> · experiment {{ ref.experiment_id }} · {{ ref.tracking_uri }}</td></tr>
{% endfor %}
</table></div>
<details><summary>params.yaml</summary><pre>{{ params_yaml }}</pre></details>
{% for label, card in cards.items() %}
<details class="card"><summary>Model card: {{ label }}</summary>{{ card|markdown }}</details>
{% endfor %}
<footer>Generated by <code>dvc repro report</code> (src/reprovision/report.py). Self-contained: opens from disk, no network.</footer>
</main>
<script>
// Lets a headless browser check the page: how many pictures failed to decode.
window.addEventListener("load", () => {
  const images = Array.from(document.images);
  const ok = images.filter((img) => img.complete && img.naturalWidth > 0).length;
  document.body.dataset.imagesLoaded = ok;
  document.body.dataset.brokenImages = images.length - ok;
});
</script>
</body>
</html>
"""
