"""The report's charts, drawn with seaborn into reports/curves/ (and by `reprovision study`): the
classifiers' and GANs' curves, the reference-scale runs' curves and grids, the SSL size study."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from reprovision.layout import CLASSIFIERS, GANS, LABELS
from reprovision.publish.palette import COLOURS
from reprovision.publish.references import REFERENCE, midpoint
from reprovision.publish.report_tables import reference_scale_runs


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
        # The training stage's test figures after each epoch are monitoring (its precision); the
        # test accuracy is the evaluate stage's (report.evaluated).
        table["split"] = table["split"].str.removesuffix(f"_{metric}").replace({"test": "test (monitoring)"})
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

    versus = " vs ".join(LABELS[m] for m in histories)
    return [
        (_figure(out / "classifier_loss.png", loss), f"Loss per epoch, {versus}"),
        (_figure(out / "classifier_accuracy.png", accuracy), f"Accuracy per epoch, {versus}"),
        (_figure(out / "classifier_epoch_time.png", epoch_time), f"Seconds per epoch, {versus}"),
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
        curves = [
            (LABELS[g], COLOURS[LABELS[g]], curve["epoch"], curve["fid"], floors.get(g)) for g, curve in fids.items()
        ]
        fid_lines(ax, curves, "FID during training (dashed: real-vs-real floor)")

    return _figure(out / "gan_fid.png", draw), "FID (judge features) during training"


def class_histogram_chart(gans: dict[str, dict], out: Path) -> tuple[Path, str]:
    rows = [
        {"digit": str(d), "GAN": LABELS[g], "samples": c}
        for g, m in gans.items()
        for d, c in enumerate(m["class_histogram"])
    ]
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
            ax.plot(
                epochs,
                [100 * row["test_acc"] for row in r["history"]],
                marker="o",
                ms=3,
                label=f"{label} test",
                **style,
            )
            ax.plot(epochs, [100 * row["train_acc"] for row in r["history"]], ls=":", label=f"{label} train", **style)
        for m in models:
            if by_epoch := REFERENCE.get(m, {}).get("train_acc_by_epoch"):
                ax.plot(
                    list(by_epoch),
                    [100 * a for a in by_epoch.values()],
                    "x",
                    color="black",
                    label=f"R3 {LABELS[m]} train",
                )
        ax.set(
            title="Reference scale: accuracy per epoch (band: R3's final test)", xlabel="epoch", ylabel="accuracy (%)"
        )
        # Below the axes: inside, its many entries hid the curves wherever matplotlib put them.
        ax.figure.legend(loc="outside lower center", ncol=3)

    def fid(ax):
        curves = [
            (
                label,
                COLOURS[LABELS[m]],
                [p["epoch"] for p in r["fid_curve"]],
                [p["fid"] for p in r["fid_curve"]],
                r.get("fid_floor"),
            )
            for m, label, r in fids
        ]
        fid_lines(ax, curves, "Reference scale: FID during training (dashed: floor)")

    if classifiers:
        curves.append(
            (_figure(out / "reference_scale_accuracy.png", accuracy), "Reference-scale runs: accuracy per epoch")
        )
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
            notes.append(
                f"{r['grid']} is missing: no {label} grid (reference_scale.json names it; "
                "`reference_scale.py record` keeps it there)."
            )
    return grids, notes


SSL_SIZE_SERIES = {
    "probe_test": "SimCLR encoder, linear probe",
    "knn_test": "SimCLR encoder, k-NN",
    "random_probe_test": "random weights, linear probe (floor)",
}


def ssl_size_chart(rows: list[dict], path: Path) -> Path:
    """Test accuracy against the number of pre-training images, one line per SSL_SIZE_SERIES (the
    pre-training-set-size study: `reprovision study --ssl-size` draws it, the report too once recorded)."""
    table = pd.DataFrame(rows)
    long = table.melt(
        id_vars=["ssl_train_images"],
        value_vars=[k for k in SSL_SIZE_SERIES if k in table],
        var_name="encoder",
        value_name="acc",
    ).dropna()
    long = long.assign(encoder=long["encoder"].map(SSL_SIZE_SERIES), acc=100 * long["acc"])

    def draw(ax):
        sns.lineplot(long, x="ssl_train_images", y="acc", hue="encoder", style="encoder", marker="o", ax=ax)
        ax.set(
            title="Test accuracy vs pre-training images",
            xlabel="images SimCLR pre-trained on",
            ylabel="test accuracy (%)",
        )
        ax.legend(title=None)

    return _figure(path, draw)
