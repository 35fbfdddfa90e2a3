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
import itertools
import json
import mimetypes
import os
from pathlib import Path

import pandas as pd
import seaborn as sns
from jinja2 import Environment, FileSystemLoader, StrictUndefined
from markdown_it import MarkdownIt
from markupsafe import Markup, escape

from reprovision.config import Params, load_params
from reprovision.core import track_run, track_store
from reprovision.layout import (
    ABLATIONS,
    CLASSIFIERS,
    CURVES,
    EVAL_METRICS,
    FIGURES,
    GAN_METRICS,
    GAN_MODELS,
    GANS,
    HEATMAPS,
    LABELS,
    MANIFEST,
    METRICS,
    MODELS,
    PARAMS,
    REFERENCE_SCALE,
    REPORTS,
    RUN_REF,
    SSL_SIZE_STUDY,
    SUMMARY,
)
from reprovision.measure.noise import mcnemar
from reprovision.models.classifiers import FAMILIES
from reprovision.publish.palette import COLOURS
from reprovision.publish.references import REFERENCE
from reprovision.publish.registry import read_champion, read_records, why_no_champion
from reprovision.publish.report_charts import (
    _figure,
    class_histogram_chart,
    classifier_curves,
    gan_fid_curve,
    gan_loss_curve,
    reference_scale_curves,
    reference_scale_grids,
    ssl_size_chart,
)
from reprovision.publish.report_tables import (
    DASH,
    ablation_table,
    cell,
    comparison_table,
    count,
    evaluation_table,
    gan_quality_table,
    key_numbers_of,
    paired_line,
    pct,
    reference_scale_epochs,
    reference_scale_table,
    size_study_table,
    summary_rows,
    table,
    test_noise,
)

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
    # Each family's heat map, of the kind its family names (models/<family>.py), if it names one.
    [(f"{f.heatmap}_{m}.png", f"{LABELS[m]}: {HEATMAPS[f.heatmap]}") for m, f in FAMILIES.items() if f.heatmap],
]
MAX_FRAMES = 6  # sample-progression frames shown per GAN, evenly spaced, first and last included


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
        raise ReportError(
            f"{path} holds a {type(obj).__name__}, expected a JSON object; re-run the stage that writes it"
        )
    return obj


def read_csv(path: Path, columns: tuple[str, ...]) -> pd.DataFrame | None:
    """The table at `path` with at least `columns`, or None when absent."""
    if not path.exists():
        return None
    try:
        table = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise ReportError(
            f"{path} is not a readable CSV ({err}); re-run the stage that writes it (`dvc repro`)"
        ) from None
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise ReportError(
            f"{path} lacks column(s) {', '.join(missing)} (has: {', '.join(table.columns)}); re-run "
            "the stage that writes it"
        )
    return table


def read_predictions(root: Path, model: str) -> list[dict] | None:
    """The evaluate stage's per-image record of `model` (EVAL_METRICS/<model>_confusion.json: each test
    image's actual and predicted class, in the test set's order), or None when it did not run."""
    path = root / EVAL_METRICS / f"{model}_confusion.json"
    if not path.exists():
        return None
    try:
        records = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ReportError(
            f"{path} is not valid JSON ({err}); re-run the evaluate stage (`dvc repro evaluate`)"
        ) from None
    if not isinstance(records, list) or not all(
        isinstance(r, dict) and {"actual", "predicted"} <= r.keys() for r in records
    ):
        raise ReportError(
            f"{path} is not a list of {{actual, predicted}} records, one per test image; re-run the evaluate stage"
        )
    return records


def run_refs(root: Path) -> dict[str, dict | None]:
    """The MLflow run that trained each model (None when its stage did not run)."""
    return {m: read_json(root / model_dir(m) / RUN_REF) for m in TRAINED}


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
        notes.append(
            f"No FID curve: it was off (gan.fid_every = 0) or {GAN_METRICS.as_posix()}/<gan>/fid.csv is missing."
        )
    if fids:
        floors = {g: gans[g]["fid_floor"] for g in fids if isinstance(gans[g].get("fid_floor"), (int, float))}
        curves.append(figure(*gan_fid_curve(fids, floors, out), reports))
    return curves, notes


def evaluated(classifiers: dict[str, dict], evaluation: dict) -> dict[str, dict]:
    """Each classifier's record with `test_acc` the evaluate stage's accuracy: the one test accuracy the
    page shows, of the shipped weights in fp32 as the logged model serves them. The training stage's own
    test figures (`monitor_test_*`, the per-epoch curves) are monitoring under its precision and are not
    shown as the model's; without evaluate's record (the stage did not run) there is no test accuracy."""
    scores = evaluation.get("classifiers") or {}
    out = {}
    for m, record in classifiers.items():
        out[m] = {k: v for k, v in record.items() if k != "test_acc"}  # a record from before the split had one
        if isinstance(scores.get(m), dict) and isinstance(scores[m].get("accuracy"), (int, float)):
            out[m]["test_acc"] = scores[m]["accuracy"]
    return out


def test_noise_note(test_images: int | None) -> str | None:
    """What a test accuracy is, what the interval after it means, and what tells two classifiers apart instead."""
    if not test_images:
        return None
    widest = test_noise(0.5, test_images)  # at 50 % accuracy, where it is widest
    return (
        "Test accuracy: the evaluate stage's, of the shipped weights in fp32 as the logged model serves them "
        "(the training stage's per-epoch test figures, in the curves, are monitoring under its precision). "
        f"[low–high] after a test accuracy: its 95 % interval from the {test_images:,} test images alone "
        f"(Wilson score; at 50 %{widest}). Whether two classifiers differ is not read from their intervals "
        "(both are scored on the same images) but from McNemar's exact test on the images only one of them gets right."
    )


def paired_lines(root: Path) -> list[str]:
    """McNemar's exact test of every two classifiers the evaluate stage scored, on its per-image predictions."""
    records = {m: r for m in CLASSIFIERS if (r := read_predictions(root, m)) is not None}
    lines = []
    for first, second in itertools.combinations(records, 2):
        a, b = records[first], records[second]
        if [r["actual"] for r in a] != [r["actual"] for r in b]:
            raise ReportError(
                f"{EVAL_METRICS.as_posix()}/{first}_confusion.json and {second}_confusion.json are not of the same "
                "test images (their true classes differ); re-run the evaluate stage (`dvc repro evaluate`)"
            )
        paired = mcnemar(
            first_right=[r["actual"] == r["predicted"] for r in a],
            second_right=[r["actual"] == r["predicted"] for r in b],
        )
        lines.append(paired_line(first, second, paired))
    return lines


def evaluation_rows(root: Path) -> tuple[list[list[dict]], str | None]:
    """The evaluate stage's pictures that exist, row by row, and a note naming those that don't."""
    rows, missing = [], []
    for row in EVALUATION_FIGURES:
        present = [
            figure(root / FIGURES / n, caption, root / REPORTS) for n, caption in row if (root / FIGURES / n).exists()
        ]
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
        {
            "name": name,
            "train": count(e.get("train")),
            "test": count(e.get("test")),
            "sha256": e.get("sha256", DASH),
            "files": e.get("files") or {},
        }
        for name, e in manifest.items()
    ]


def ssl_table(params: Params, probe: dict, cnn: dict | None) -> dict:
    """The probe of the SimCLR encoder beside the from-scratch floor and, when it ran, the supervised
    counterpart (`cnn`, the record of train-<ssl.counterpart>); validation columns where the probe has them."""
    val = "probe_val" in probe
    rows = [
        [
            "SimCLR encoder, frozen (pretrain-ssl → linear-probe)",
            pct(probe["probe_test"]),
            pct(probe["knn_test"]),
            *([pct(probe["probe_val"])] if val else []),
        ],
        [
            "Same architecture, random weights, frozen (the from-scratch floor)",
            pct(probe["random_probe_test"]),
            pct(probe["random_knn_test"]),
            *([pct(probe["random_probe_val"])] if val else []),
        ],
    ]
    counterpart = params.ssl.counterpart
    same = params.classifier(counterpart).layout() == params.ssl.layout()
    if cnn is not None:
        note = (
            "same architecture"
            if same
            else f"a different architecture: set {counterpart}.arch (and widths) to match ssl's"
        )
        rows.append(
            [
                f"Supervised, trained end to end (train-{counterpart}, {note})",
                pct(cnn.get("test_acc")),
                DASH,
                *([pct(cnn.get("val_acc"))] if val else []),
            ]
        )
    header = [
        "Encoder",
        "Linear probe, test",
        f"k-NN (k={params.probe.knn_k}), test",
        *(["Linear probe, validation"] if val else []),
    ]
    return table(header, rows)


def ssl_loss_curve(root: Path, counterpart: str) -> dict | None:
    """The pre-training loss per epoch (metrics/ssl/history.csv), in the counterpart's colour; None without it."""
    history = read_csv(root / METRICS / "ssl" / "history.csv", ("epoch", "loss"))
    if history is None:
        return None

    def draw(ax):
        sns.lineplot(data=history, x="epoch", y="loss", marker="o", ax=ax, color=COLOURS[LABELS[counterpart]])
        ax.set(title="SimCLR pre-training loss", ylabel="NT-Xent loss")

    return figure(
        _figure(root / CURVES / "ssl_loss.png", draw),
        "SimCLR pre-training loss (NT-Xent) per epoch",
        root / REPORTS,
    )


def ssl_size_study(root: Path) -> dict | None:
    """The probe against the pre-training set's size, when SSL_SIZE_STUDY records two runs or more."""
    study = (read_json(root / SSL_SIZE_STUDY) or {}).get("runs", [])
    if len(study) < 2:
        return None
    chart = ssl_size_chart(study, root / CURVES / "ssl_size.png")
    return figure(
        chart,
        f"Pre-training-set-size study: {len(study)} runs recorded in {SSL_SIZE_STUDY.as_posix()}",
        root / REPORTS,
    )


def ssl_section(root: Path, params: Params, probe: dict | None, cnn: dict | None) -> dict | None:
    """R4's self-supervised experiment: the probe of the SimCLR encoder (`probe`, the linear-probe stage's
    summary) beside the from-scratch floor and the supervised CNN, and the pre-training loss curve; None
    when the SSL stages did not run."""
    pretrained = read_json(root / METRICS / "ssl" / SUMMARY)
    if probe is None or pretrained is None:
        return None
    s, full = params.ssl, Params().ssl
    reduced = (
        s.train_fraction < 1
        or s.epochs < full.epochs
        or params.data.train_fraction < 1
        or params.data.test_fraction < 1
    )
    probes = ssl_table(params, probe, cnn)
    curve = ssl_loss_curve(root, s.counterpart)
    size_study = ssl_size_study(root)
    configuration = cell(
        f"{s.layout()}, {pretrained.get('train_images', 0):,} pre-training images · "
        f"{pretrained.get('epochs')}/{full.epochs} epochs · "
        f"batch {s.batch_size}, temperature {s.temperature}",
        badge="reduced" if reduced else None,
    )
    return {"table": probes, "curve": curve, "size_study": size_study, "configuration": configuration}


def r3_mismatch(params: Params, classifiers: dict) -> bool:
    """Whether the classifiers differ from what R3 trained (its families' default architectures on
    CIFAR-10), so that R3's figures are not their comparison."""
    return bool(classifiers) and (
        params.data.classifier_dataset != "cifar10"
        or any(params.classifier(m).architecture() != type(params.classifier(m))().architecture() for m in classifiers)
    )


def ssl_key_numbers(probe: dict | None) -> dict[str, float]:
    """The linear-probe stage's test and validation accuracies, as key numbers `ssl.<name>`."""
    return {
        f"ssl.{k}": float(v)
        for k, v in (probe or {}).items()
        if k.endswith(("_test", "_val")) and isinstance(v, (int, float))
    }


def context(root: Path, params: Params) -> tuple[dict, dict[str, float]]:
    """Everything both templates show, and the key numbers."""
    results_json = {m: metrics_dir(m) / SUMMARY for m in TRAINED}
    results = {m: j for m, path in results_json.items() if (j := read_json(root / path))}
    absent = [path.as_posix() for m, path in results_json.items() if m not in results]
    evaluation = read_json(root / EVAL_METRICS / SUMMARY) or {}
    classifiers = evaluated({m: results[m] for m in CLASSIFIERS if m in results}, evaluation)
    results |= classifiers
    test_images = evaluation.get("test_images") or next(
        (c["test_images"] for c in classifiers.values() if c.get("test_images")), None
    )
    gans = {g: results[g] for g in GANS if g in results}
    judge = results.get("judge")
    probe = read_json(root / METRICS / "probe" / SUMMARY)
    runs = run_refs(root)

    rows, stores, any_reduced = summary_rows(params, results, runs)
    curves, curve_notes = curves_section(root, classifiers, gans)
    figure_rows, figure_note = evaluation_rows(root) if classifiers else ([], None)
    histograms = {g: m for g, m in gans.items() if len(m.get("class_histogram") or []) == 10}
    commit, dirty = track_run.git_state(root)
    cards = {LABELS[m]: path.read_text() for m in CLASSIFIERS if (path := root / model_dir(m) / "card.md").exists()}
    reference_runs = read_json(root / REFERENCE_SCALE) or {}
    grids, grid_notes = reference_scale_grids(reference_runs, root)
    ablation_runs = (read_json(root / ABLATIONS) or {}).get("runs", [])
    ctx = {
        "commit": commit,
        "dirty": dirty,
        "dataset": params.data.classifier_dataset,
        "params_sha": params.digest()[:12],
        "any_reduced": any_reduced,
        "absent": absent,
        "summary": table(
            ["Model", "Parameters", "Result", "Configuration", "Training time", "Device", "MLflow run"], rows
        ),
        "stores": stores,
        "comparison": comparison_table(compared)
        if (compared := {m: c for m, c in classifiers.items() if m in REFERENCE})
        else None,
        "champion": read_champion(root),
        "no_champion": why_no_champion(read_records(root)[0]),
        "reference_scale": reference_scale_table(reference_runs),
        "reference_scale_epochs": reference_scale_epochs(reference_runs),
        "reference_scale_curves": [
            figure(p, c, root / REPORTS) for p, c in reference_scale_curves(reference_runs, root / CURVES)
        ],
        "reference_scale_grids": [figure(p, c, root / REPORTS) for p, c in grids],
        "reference_scale_notes": grid_notes,
        "ablations": ablation_table(ablation_runs),
        "size_study": size_study_table(ablation_runs),
        "r3_mismatch": r3_mismatch(params, classifiers),
        "curves": curves,
        "curve_notes": curve_notes,
        "evaluation_table": evaluation_table(evaluation, test_images),
        "test_noise": test_noise_note(test_images),
        "paired": paired_lines(root),
        "evaluation_rows": figure_rows,
        "evaluation_note": figure_note,
        "gan_quality": gan_quality_table(gans) if gans else None,
        "histogram": figure(*class_histogram_chart(histograms, root / CURVES), root / REPORTS) if histograms else None,
        "gans": [gan_pictures(root, g) for g in gans],
        "ssl": ssl_section(root, params, probe, classifiers.get(params.ssl.counterpart)),
        "params_yaml": (root / PARAMS).read_text(),
        "datasets": datasets(read_json(root / MANIFEST) or {}),
        "versions": track_run.library_versions(),
        "cards": cards,
        "runs": {LABELS[m]: r for m, r in runs.items() if r},
        "max_frames": MAX_FRAMES,
    }
    return ctx, {**key_numbers_of(classifiers, gans, judge, evaluation), **ssl_key_numbers(probe)}


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
        loader=FileSystemLoader(TEMPLATES),
        autoescape=html,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        undefined=StrictUndefined,  # a context key the templates expect but context() forgot fails loudly
    )
    env.filters.update(cell=html_cell if html else md_cell, data_uri=data_uri, markdown=markdown_to_html)
    return env.get_template(f"report.{kind}.j2").render(**ctx)


def build_report(root: Path = Path("."), params: Params | None = None, promotion: str | None = None) -> dict:
    """Write reports/report.md, reports/report.html and reports/curves/*.png; the key numbers shown.

    `params`: as the calling stage read them; by default root's params.yaml. `promotion`: what the
    registry's gate decided for this run's champion (registry.promote), said under it.
    """
    root = Path(root)
    params = load_params(root / PARAMS) if params is None else params
    ctx, key_numbers = context(root, params)
    ctx["promotion"] = promotion
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
    with track_run.stage_run(
        "report", "summary", params.flat(), tags, params, root=track_store.project_root(root)
    ) as run:
        mlflow.log_metrics({k: float(v) for k, v in key_numbers.items()})
        for page in pages:
            mlflow.log_artifact(str(page))
        if (root / CURVES).is_dir():
            mlflow.log_artifacts(str(root / CURVES), artifact_path="curves")
    return run.info.run_id
