"""The report's tables and numbers: how each figure is written (percent, counts, seconds, ranges
against the references) and the rows of the summary, comparison, evaluation, GAN-quality and
reference-scale tables, as cells the two templates lay out (report.py assembles them)."""

from __future__ import annotations

import math

from reprovision.config import Params
from reprovision.core import track_store
from reprovision.layout import CLASSIFIERS, GANS, LABELS
from reprovision.measure import ablation
from reprovision.measure.noise import Paired, accuracy_interval
from reprovision.publish.references import ARCHITECTURE_REFERENCE, REFERENCE

DASH = "—"


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


def test_noise(acc: float | None, n: int | None) -> str:
    """' [lo–hi]': the 95 % Wilson interval of an accuracy measured on n test images, in percent (not
    symmetric around it: noise.wilson_interval). Empty when n is unknown (results written before the
    stage recorded it)."""
    if acc is None or not n:
        return ""
    low, high = accuracy_interval(acc, n)
    return f" [{100 * low:.1f}–{100 * high:.1f}]"


def p_value(p: float) -> str:
    """A p-value as a sentence says it: `p < 0.001`, `p = 0.039`, `p = 1.000`."""
    return "p < 0.001" if p < 0.001 else f"p = {p:.3f}"


def paired_line(first: str, second: str, paired: Paired) -> str:
    """McNemar's exact test of two classifiers on the same test images, in one line."""
    return (
        f"{LABELS.get(first, first)} vs {LABELS.get(second, second)} on the same {paired.images:,} test images: "
        f"{paired.only_first:,} right only by the {LABELS.get(first, first)} against {paired.only_second:,} "
        f"right only by the {LABELS.get(second, second)}, {p_value(paired.p_value)} (McNemar, exact)."
    )


def cell(
    text: str, ref: str | None = None, href: str | None = None, code: bool = False, badge: str | None = None
) -> dict:
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
                n = r["fid_curve_n"]
                quality = f"FID {fixed(during['fid'])} at epoch {during['epoch']} (N = {n:,}, during training); "
            else:
                quality = ""
            result = cell(
                f"{quality}D {fixed(last['d_loss'], 3)} / G {fixed(last['g_loss'], 3)}",
                ref=f"{ref['source']}: D {ref['d_loss']} / G {ref['g_loss']} ({ref['at']}), no quality metric",
            )
        epochs = f"{r['epochs']}" + (
            f" of {r['epochs_planned']}" if r.get("epochs_planned", r["epochs"]) != r["epochs"] else ""
        )
        # A run under way (or stopped for good) has been paused and resumed: its wall time is no training time.
        seconds = r["status"] if r.get("status") in ("under way", "stopped") else f"{r['seconds'] / 60:.0f} min"
        rows.append(
            [
                label,
                epochs,
                count(r["train_images"]),
                r["precision"],
                str(r["threads"]),
                result,
                seconds,
                cell(r["git_commit"][:12], code=True),
            ]
        )
    rows += repeated_runs_rows(results)
    header = ["Model", "Epochs", "Train images", "Precision", "Threads", "Result", "Training time", "Commit"]
    return table(header, rows) if rows else None


def repeated_runs_rows(results: dict[str, dict]) -> list[list]:
    """An architecture run over several seeds (airbench94 as the CNN, the hybrid as the ViT): its mean and
    spread, and its time per seed (training plus the test-time-augmented evaluation), the median and the slowest."""
    rows = []
    for arch, entry in results.items():
        if "runs" not in entry:
            continue
        runs, ref = entry["runs"], ARCHITECTURE_REFERENCE.get(arch)
        n = len(runs)
        low, high, std = entry["test_acc_min"], entry["test_acc_max"], entry["test_acc_std"]
        spread = f" (min {pct(low)}, max {pct(high)}, std {100 * std:.2f} points)"
        theirs = f"{ref['source']}: {pct(ref['test_acc'])}, mean of {ref['runs']:,} runs" if ref else None
        rows.append(
            [
                f"{arch} as the {LABELS[runs[0]['family']]} ({n} seed{'s' * (n > 1)})",
                str(runs[0]["epochs"]),
                count(runs[0]["train_images"]),
                runs[0]["precision"],
                str(runs[0]["threads"]),
                cell(f"test acc {pct(entry['test_acc_mean'])} mean{spread * (n > 1)}, with TTA", ref=theirs),
                f"{entry['seconds_median'] / 60:.1f} min per seed (median; at most {entry['seconds_max'] / 60:.1f})",
                cell(runs[0]["git_commit"][:12], code=True),
            ]
        )
    return rows


def ablation_table(entries: list[dict]) -> dict | None:
    """What closes the gap (benchmarks/ablations.json): each variant's gain over its study's baseline."""
    rows = ablation.gap_rows(entries)
    return table(ablation.HEADER, [ablation.cells(row) for row in rows]) if rows else None


def size_study_table(entries: list[dict]) -> dict | None:
    """Accuracy against training-set size (benchmarks/ablations.json's study "size"), one row per size."""
    models = ablation.size_models(entries)
    rows = ablation.size_rows(entries) if models else []
    return table(ablation.size_header(models), [ablation.size_cells(r, models) for r in rows]) if rows else None


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
                ours, theirs = (
                    f"D {fixed(row['d_loss'], 3)} / G {fixed(row['g_loss'], 3)}",
                    f"D {figure[0]} / G {figure[1]}",
                )
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
    store = {
        "command": f"mlflow ui --backend-store-uri {uri}",
        "url": track_store.training_runs_url(track_store.LOCAL_UI, ref["experiment_id"]),
    }
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


def summary_rows(
    params: Params, results: dict[str, dict], runs: dict[str, dict | None]
) -> tuple[list[list], list[str], bool]:
    """One row per model, the `mlflow ui` commands of local stores, and whether any run was reduced."""
    rows, stores, any_reduced = [], [], False
    for model, m in results.items():
        ref = REFERENCE.get(model, {})
        source = ref.get("source", "")
        if (
            model in CLASSIFIERS
        ):  # a family without a reference (README "Add a model family") shows its own numbers only
            size = cell(count(m.get("params")), ref=f"{source}: {count(ref['params'])}" if ref else None)
            result = cell(
                f"test acc {pct(m.get('test_acc'))}{test_noise(m.get('test_acc'), m.get('test_images'))}",
                ref=f"{source}: {approx(ref['test_acc'], 100, '%')}" if ref else None,
            )
            time = cell(
                f"{seconds(m.get('train_seconds'))} · {fixed(m.get('s_per_epoch'), 1)} s/epoch",
                ref=f"{source}: {approx(ref['train_seconds'], unit=' s')} · "
                f"{approx(ref['s_per_epoch'], unit=' s/epoch')}"
                if ref
                else None,
            )
        elif model in GANS:
            # No-break spaces keep "G 1,496,592" on one line when the cell wraps.
            size = cell(
                f"G\u00a0{count(m.get('g_params'))} · D\u00a0{count(m.get('d_params'))}",
                ref=f"{source}: G\u00a0{count(ref['g_params'])} · D\u00a0{count(ref['d_params'])}"
                if "g_params" in ref
                else None,
            )
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
        (
            "Test accuracy",
            lambda m: pct(m.get("test_acc")) + test_noise(m.get("test_acc"), m.get("test_images")),
            lambda r: approx(r["test_acc"], 100, "%"),
        ),
        ("Seconds / epoch", lambda m: fixed(m.get("s_per_epoch"), 1), lambda r: approx(r["s_per_epoch"])),
        (
            "Total training time",
            lambda m: seconds(m.get("train_seconds")),
            lambda r: approx(r["train_seconds"], unit=" s"),
        ),
    ]
    rows = []
    for name, ours, theirs in quantities:
        row = [name]
        for model, m in classifiers.items():
            row += [ours(m), theirs(REFERENCE[model]) if model in REFERENCE else DASH]
        rows.append(row)
    return table(header, rows)


def evaluation_table(evaluation: dict, test_images: int | None = None) -> dict | None:
    scores = {m: s for m, s in (evaluation.get("classifiers") or {}).items() if isinstance(s, dict)}
    if not scores:
        return None
    keys = {
        "accuracy": "Accuracy",
        "macro_precision": "Macro precision",
        "macro_recall": "Macro recall",
        "macro_f1": "Macro F1",
    }
    rows = [
        [
            LABELS.get(m, m),
            pct(s.get("accuracy")) + test_noise(s.get("accuracy"), test_images),
            *[pct(s.get(k)) for k in keys][1:],
        ]
        for m, s in scores.items()
    ]
    return table(["Model", *keys.values()], rows)


def gan_quality_table(gans: dict[str, dict]) -> dict:
    header = ["GAN", "FID ↓", "FID floor (real vs real)", "IS ↑", "IS of real images", "KL from uniform ↓", "n"]
    rows = [
        [
            LABELS[g],
            fixed(m.get("fid")),
            fixed(m.get("fid_floor")),
            f"{fixed(m.get('inception_score'))}\u00a0±\u00a0{fixed(m.get('inception_score_std'))}",
            fixed(m.get("inception_score_real")),
            fixed(m.get("kl_uniform"), 4),
            count(m.get("n")),
        ]
        for g, m in gans.items()
    ]
    return table(header, rows)


def key_numbers_of(classifiers: dict, gans: dict, judge: dict | None, evaluation: dict) -> dict[str, float]:
    """The headline numbers, flat (`vit.test_acc`): returned, and logged as MLflow metrics."""
    classifier_keys = ("test_acc", "val_acc", "best_val_acc", "params", "s_per_epoch", "train_seconds")
    gan_keys = (
        "fid",
        "fid_floor",
        "inception_score",
        "inception_score_real",
        "kl_uniform",
        "s_per_epoch",
        "total_seconds",
    )
    numbers = {f"{m}.{k}": metrics[k] for m, metrics in classifiers.items() for k in classifier_keys if k in metrics}
    numbers |= {f"{g}.{k}": metrics[k] for g, metrics in gans.items() for k in gan_keys if k in metrics}
    for m, scores in (evaluation.get("classifiers") or {}).items():
        if isinstance(scores, dict) and "macro_f1" in scores:
            numbers[f"{m}.macro_f1"] = scores["macro_f1"]
    if judge and "test_acc" in judge:
        numbers["judge.test_acc"] = judge["test_acc"]
    numeric = {k: v for k, v in numbers.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return {k: float(v) for k, v in numeric.items() if math.isfinite(v)}
