"""Test-set predictions, the numbers that summarise them, and the figures that show them.

Metrics come from scikit-learn so that they mean exactly what the field means by them;
figures are drawn on bare `matplotlib.figure.Figure`s (no pyplot global state, so a long
evaluation stage neither leaks figures nor depends on a display backend).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import seaborn as sns
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.metrics import accuracy_score, classification_report, confusion_matrix
from torch import nn

# Up to this many classes a confusion matrix gets one number per cell; beyond, the colour alone.
ANNOTATE_MAX_CLASSES = 20


@torch.no_grad()
def predict(
    model: nn.Module,
    x_norm_batches_fn: Callable[[int, int], torch.Tensor],
    n: int,
    batch_size: int,
    device: torch.device | str,
) -> tuple[np.ndarray, np.ndarray]:
    """Class predictions (N,) int64 and softmax probabilities (N, C) float32 for N inputs.

    `x_norm_batches_fn(start, end)` returns the normalised inputs [start, end) on `device`;
    the caller owns data layout and normalisation. Logits stay on the device and are copied
    to the host once, so a GPU never waits on a per-batch synchronisation.
    """
    if n <= 0:
        raise ValueError(f"predict: n = {n}; pass the number of inputs to classify (> 0)")
    if batch_size <= 0:
        raise ValueError(f"predict: batch_size = {batch_size}; use a positive batch size, e.g. 1000")
    model.eval()
    device = torch.device(device)
    logits = []
    for start in range(0, n, batch_size):
        end = min(start + batch_size, n)
        x = x_norm_batches_fn(start, end)
        if x.shape[0] != end - start:
            raise ValueError(
                f"predict: x_norm_batches_fn({start}, {end}) returned {x.shape[0]} inputs, "
                f"expected {end - start}; it must return exactly the slice [start, end)"
            )
        # float() before softmax: under autocast the logits may be bf16.
        logits.append(model(x.to(device, non_blocking=True)).float())
    probs = torch.cat(logits).softmax(dim=1)
    preds = probs.argmax(dim=1)
    return preds.cpu().numpy().astype(np.int64), probs.cpu().numpy().astype(np.float32)


def _check_labels(y_true: np.ndarray, y_pred: np.ndarray, class_names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if y_true.shape != y_pred.shape or y_true.ndim != 1:
        raise ValueError(
            f"y_true has shape {y_true.shape} and y_pred {y_pred.shape}; "
            "pass two 1-D arrays of class indices of the same length"
        )
    if len(set(class_names)) != len(class_names):
        raise ValueError(f"class_names has duplicates: {list(class_names)}; every class needs its own name")
    for name, y in (("y_true", y_true), ("y_pred", y_pred)):
        if y.size and (y.min() < 0 or y.max() >= len(class_names)):
            raise ValueError(
                f"{name} holds class indices in [{y.min()}, {y.max()}] but there are {len(class_names)} "
                f"class_names; labels must be integers in [0, {len(class_names) - 1}]"
            )
    return y_true, y_pred


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, class_names: Sequence[str]) -> dict:
    """Accuracy, macro precision/recall/F1, per-class scores and the confusion matrix (JSON-ready).

    `per_class[name]["accuracy"]` is the fraction of that class's images classified correctly,
    which is its recall. Classes never predicted get precision 0 rather than a warning.
    """
    y_true, y_pred = _check_labels(y_true, y_pred, class_names)
    labels = list(range(len(class_names)))
    report = classification_report(
        y_true, y_pred, labels=labels, target_names=list(class_names), output_dict=True, zero_division=0
    )
    macro = report["macro avg"]
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_precision": float(macro["precision"]),
        "macro_recall": float(macro["recall"]),
        "macro_f1": float(macro["f1-score"]),
        "per_class": {
            name: {
                "precision": float(report[name]["precision"]),
                "recall": float(report[name]["recall"]),
                "f1": float(report[name]["f1-score"]),
                "support": int(report[name]["support"]),
                "accuracy": float(report[name]["recall"]),
            }
            for name in class_names
        },
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
    }


def confusion_records(y_true: np.ndarray, y_pred: np.ndarray, class_names: Sequence[str]) -> list[dict[str, str]]:
    """One {"actual", "predicted"} row per image: the input of DVC's `confusion` plot template."""
    y_true, y_pred = _check_labels(y_true, y_pred, class_names)
    return [{"actual": class_names[t], "predicted": class_names[p]} for t, p in zip(y_true.tolist(), y_pred.tolist())]


def _row_normalised(cm: np.ndarray) -> np.ndarray:
    """Each row divided by its total; a class absent from the test set keeps a row of zeros."""
    totals = cm.sum(axis=1, keepdims=True)
    return np.divide(cm, totals, out=np.zeros(cm.shape, dtype=float), where=totals > 0)


def _check_cm(cm: np.ndarray, class_names: Sequence[str]) -> np.ndarray:
    cm = np.asarray(cm)
    k = len(class_names)
    if cm.shape != (k, k):
        raise ValueError(
            f"confusion matrix has shape {cm.shape} but there are {k} class_names; "
            f"pass the ({k}, {k}) matrix from classification_metrics(...)['confusion_matrix']"
        )
    return cm


def _draw_confusion(ax, cm: np.ndarray, class_names: Sequence[str], normalize: bool, vmax: float, title: str) -> None:
    k = len(class_names)
    annotate = k <= ANNOTATE_MAX_CLASSES
    shown = _row_normalised(cm) if normalize else cm
    sns.heatmap(
        shown,
        ax=ax,
        cmap="Blues",
        vmin=0,
        vmax=vmax,
        square=True,
        annot=annotate,
        fmt=".2f" if normalize else "d",
        annot_kws={"fontsize": 8},
        xticklabels=class_names,
        yticklabels=class_names,
        cbar_kws={"shrink": 0.7, "label": "fraction of true class" if normalize else "images"},
    )
    # With 100 classes every name still gets a tick, just in a small font.
    ticksize = 9 if k <= ANNOTATE_MAX_CLASSES else 7
    ax.tick_params(axis="both", labelsize=ticksize, length=0)
    ax.set_xticklabels(ax.get_xticklabels(), rotation=90)
    ax.set_yticklabels(ax.get_yticklabels(), rotation=0)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    ax.set_title(title)


def _panel_inches(k: int) -> float:
    """Side of one confusion-matrix panel: roomy for 10 classes, about 0.16 in per class for 100."""
    return min(max(6.0, 0.6 * k), 16.0)


def new_figure(**kwargs) -> Figure:
    """A figure on its own Agg canvas: its renderer is cached, so laying out hundreds of
    tick labels measures them once instead of building a new renderer per label."""
    fig = Figure(**kwargs)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, path: Path) -> None:
    """Write `fig` as an image (format from the suffix), creating the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")


def plot_confusion(cm: np.ndarray, class_names: Sequence[str], path: Path, title: str, normalize: bool) -> None:
    """A confusion-matrix heat-map PNG, raw counts or rows normalised to fractions of each true class."""
    cm = _check_cm(cm, class_names)
    side = _panel_inches(len(class_names))
    fig = new_figure(figsize=(side + 1.5, side), layout="constrained")
    _draw_confusion(fig.add_subplot(), cm, class_names, normalize, 1.0 if normalize else cm.max(), title)
    save_figure(fig, path)


def plot_confusions_side_by_side(
    cms: dict[str, np.ndarray], class_names: Sequence[str], path: Path, normalize: bool
) -> None:
    """One confusion matrix per model, side by side on a shared colour scale (R3's figure)."""
    if not cms:
        raise ValueError("plot_confusions_side_by_side: cms is empty; pass {model name: confusion matrix}")
    cms = {name: _check_cm(cm, class_names) for name, cm in cms.items()}
    vmax = 1.0 if normalize else max(cm.max() for cm in cms.values())
    side = _panel_inches(len(class_names))
    fig = new_figure(figsize=(len(cms) * (side + 1.5), side), layout="constrained")
    for ax, (name, cm) in zip(fig.subplots(1, len(cms), squeeze=False)[0], cms.items()):
        _draw_confusion(ax, cm, class_names, normalize, vmax, name)
    save_figure(fig, path)


def plot_per_class_accuracy(per_class: dict[str, Sequence[float]], class_names: Sequence[str], path: Path) -> None:
    """Grouped bars: accuracy of every class, one colour per model."""
    if not per_class:
        raise ValueError("plot_per_class_accuracy: per_class is empty; pass {model name: [accuracy per class]}")
    for model, accs in per_class.items():
        if len(accs) != len(class_names):
            raise ValueError(
                f"per_class[{model!r}] has {len(accs)} accuracies for {len(class_names)} class_names; "
                "pass one accuracy per class, in class order"
            )
    table = pd.DataFrame(
        [
            {"class": name, "model": model, "accuracy": float(acc)}
            for model, accs in per_class.items()
            for name, acc in zip(class_names, accs)
        ]
    )
    k = len(class_names)
    # Half an inch per bar for 10 classes, down to a quarter inch per class pair for 100.
    fig = new_figure(figsize=(min(max(8.0, 0.5 * k * len(per_class)), 24.0), 4.5), layout="constrained")
    ax = fig.add_subplot()
    sns.barplot(table, x="class", y="accuracy", hue="model", ax=ax)
    ax.set_ylim(0, 1)
    ax.set_xlabel("")
    ax.tick_params(axis="x", labelrotation=90 if k > 10 else 30, labelsize=9 if k <= 20 else 7)
    ax.set_title("per-class test accuracy")
    sns.move_legend(ax, "upper left", bbox_to_anchor=(1, 1), title="model")  # never over a bar
    save_figure(fig, path)


def images_hwc(x_uint8: np.ndarray) -> np.ndarray:
    """uint8 images as (N, H, W, C) with C in {1, 3}; accepts (N, H, W), (N, H, W, C) or (N, C, H, W)."""
    x = np.asarray(x_uint8)
    if x.dtype != np.uint8:
        raise ValueError(f"images have dtype {x.dtype}; pass the raw uint8 pixels (0..255), not normalised floats")
    if x.ndim == 3:
        return x[..., None]
    if x.ndim == 4 and x.shape[-1] in (1, 3):
        return x
    if x.ndim == 4 and x.shape[1] in (1, 3):
        return x.transpose(0, 2, 3, 1)
    raise ValueError(f"images have shape {x.shape}; expected (N, H, W), (N, H, W, C) or (N, C, H, W) with C = 1 or 3")


def show_image(ax, image_hwc: np.ndarray) -> None:
    """One uint8 (H, W, C) image on an axis without ticks; grey images in grey."""
    if image_hwc.shape[-1] == 1:
        ax.imshow(image_hwc[..., 0], cmap="gray", vmin=0, vmax=255)
    else:
        ax.imshow(image_hwc)
    ax.set_axis_off()


def misclassified_grid(
    x_uint8: np.ndarray,
    y_true: np.ndarray,
    y_pred: np.ndarray,
    class_names: Sequence[str],
    path: Path,
    n: int = 32,
) -> None:
    """The first `n` misclassified test images (in test-set order), captioned "true → predicted"."""
    y_true, y_pred = _check_labels(y_true, y_pred, class_names)
    images = images_hwc(x_uint8)
    if len(images) != len(y_true):
        raise ValueError(f"{len(images)} images but {len(y_true)} labels; pass the test images the labels belong to")
    wrong = np.flatnonzero(y_true != y_pred)[:n]
    cols = 8
    rows = max(1, math.ceil(len(wrong) / cols))
    fig = new_figure(figsize=(cols * 1.6, rows * 1.8), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes:
        ax.set_axis_off()
    for ax, i in zip(axes, wrong):
        show_image(ax, images[i])
        ax.set_title(f"{class_names[y_true[i]]} → {class_names[y_pred[i]]}", fontsize=7)
    title = f"first {len(wrong)} misclassified test images (true → predicted)"
    if len(wrong) == 0:
        title = "no misclassified test images"
    fig.suptitle(title)
    save_figure(fig, path)
