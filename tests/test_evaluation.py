"""Evaluation metrics, figures and heat-maps, on tiny hand-built models and inputs."""

from __future__ import annotations

import json
import warnings
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support
from torch import nn

from reprovision.measure.evaluation import (
    classification_metrics,
    confusion_records,
    misclassified_grid,
    plot_confusion,
    plot_confusions_side_by_side,
    plot_per_class_accuracy,
    predict,
)
from reprovision.measure.heatmaps import attention_rollout, grad_cam, rollout, save_heatmap_grid
from reprovision.models.cnn import RefCNN
from reprovision.models.resnet import resnet18_cifar
from reprovision.models.vit import ViT

CLASSES = ["cat", "dog", "bird", "fish"]
# "fish" is never a true label nor predicted: its scores must be 0, not a warning or NaN.
Y_TRUE = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2, 2])
Y_PRED = np.array([0, 0, 1, 2, 1, 1, 0, 2, 2, 2])


def assert_png(path) -> None:
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.width > 100 and image.height > 100


# ---------------------------------------------------------------- predictions and metrics


def test_predict_equals_one_big_forward_in_eval_mode():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 5), nn.Dropout(0.5))
    model.train()  # predict must switch dropout off
    x = torch.randn(10, 3, 2, 2)
    calls = []

    def batches(start: int, end: int) -> torch.Tensor:
        calls.append((start, end))
        return x[start:end]

    preds, probs = predict(model, batches, n=10, batch_size=4, device="cpu")
    assert calls == [(0, 4), (4, 8), (8, 10)]
    assert not model.training
    with torch.no_grad():
        expected = model(x).softmax(dim=1)
    assert preds.dtype == np.int64 and preds.shape == (10,)
    assert probs.dtype == np.float32 and probs.shape == (10, 5)
    np.testing.assert_allclose(probs, expected.numpy(), rtol=1e-6)
    np.testing.assert_array_equal(preds, expected.argmax(dim=1).numpy())
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-6)


def test_predict_rejects_a_wrong_slice():
    model = nn.Linear(2, 3)
    with pytest.raises(ValueError, match="exactly the slice"):
        predict(model, lambda start, end: torch.zeros(1, 2), n=4, batch_size=2, device="cpu")


def test_classification_metrics_equal_sklearn_and_numpy():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # zero_division must be handled, not warned about
        metrics = classification_metrics(Y_TRUE, Y_PRED, CLASSES)
    json.dumps(metrics)  # JSON-serialisable as written

    assert metrics["accuracy"] == pytest.approx(np.mean(Y_TRUE == Y_PRED)) == pytest.approx(0.7)
    labels = list(range(len(CLASSES)))
    precision, recall, f1, support = precision_recall_fscore_support(Y_TRUE, Y_PRED, labels=labels, zero_division=0)
    macro = precision_recall_fscore_support(Y_TRUE, Y_PRED, labels=labels, average="macro", zero_division=0)
    assert [metrics["macro_precision"], metrics["macro_recall"], metrics["macro_f1"]] == pytest.approx(macro[:3])
    for i, name in enumerate(CLASSES):
        row = metrics["per_class"][name]
        assert row["precision"] == pytest.approx(precision[i])
        assert row["recall"] == pytest.approx(recall[i])
        assert row["f1"] == pytest.approx(f1[i])
        assert row["support"] == support[i]
        # Per-class accuracy, computed independently: correct / images of that class.
        mask = Y_TRUE == i
        assert row["accuracy"] == pytest.approx(np.mean(Y_PRED[mask] == i) if mask.any() else 0.0)
    assert metrics["confusion_matrix"] == confusion_matrix(Y_TRUE, Y_PRED, labels=labels).tolist()
    assert metrics["per_class"]["cat"]["accuracy"] == pytest.approx(0.5)  # 2 of 4 cats right


def test_bad_labels_are_named():
    with pytest.raises(ValueError, match=r"labels must be integers in \[0, 3\]"):
        classification_metrics(Y_TRUE, Y_PRED + 2, CLASSES)
    with pytest.raises(ValueError, match="same length"):
        classification_metrics(Y_TRUE, Y_PRED[:-1], CLASSES)
    with pytest.raises(ValueError, match="duplicates"):
        classification_metrics(Y_TRUE, Y_PRED, ["a", "a", "b", "c"])


def test_confusion_records_count_every_image_once():
    records = confusion_records(Y_TRUE, Y_PRED, CLASSES)
    assert len(records) == len(Y_TRUE)
    assert records[3] == {"actual": "cat", "predicted": "bird"}
    counts = Counter((r["actual"], r["predicted"]) for r in records)
    cm = confusion_matrix(Y_TRUE, Y_PRED, labels=range(len(CLASSES)))
    for i, actual in enumerate(CLASSES):
        for j, predicted in enumerate(CLASSES):
            assert counts[(actual, predicted)] == cm[i, j]


# ---------------------------------------------------------------- figures


def random_confusion(num_classes: int) -> tuple[np.ndarray, list[str]]:
    rng = np.random.default_rng(0)
    names = [f"class_{i}" for i in range(num_classes)]
    y_true = rng.integers(0, num_classes, 500)
    y_pred = np.where(rng.random(500) < 0.6, y_true, rng.integers(0, num_classes, 500))
    return np.array(classification_metrics(y_true, y_pred, names)["confusion_matrix"]), names


def test_plots_write_pngs(tmp_path):
    cm, names = random_confusion(10)
    plot_confusion(cm, names, tmp_path / "raw.png", "ViT", normalize=False)
    plot_confusions_side_by_side({"ViT": cm, "CNN": cm.T}, names, tmp_path / "pair.png", normalize=True)
    per_class = {"ViT": np.linspace(0, 1, 10).tolist(), "CNN": np.linspace(1, 0, 10).tolist()}
    plot_per_class_accuracy(per_class, names, tmp_path / "sub" / "per_class.png")
    for name in ["raw.png", "pair.png", "sub/per_class.png"]:
        assert_png(tmp_path / name)


def test_confusion_plot_for_100_classes(tmp_path):
    cm, names = random_confusion(100)
    cm[3] = 0  # a class absent from the test set: normalising its row must not divide by zero
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        plot_confusion(cm, names, tmp_path / "norm.png", "CIFAR-100", normalize=True)
    assert_png(tmp_path / "norm.png")


def test_plots_reject_mismatched_inputs(tmp_path):
    with pytest.raises(ValueError, match=r"\(4, 4\) matrix"):
        plot_confusion(np.zeros((3, 3)), CLASSES, tmp_path / "x.png", "t", normalize=False)
    with pytest.raises(ValueError, match="one accuracy per class"):
        plot_per_class_accuracy({"ViT": [0.5]}, CLASSES, tmp_path / "x.png")


@pytest.mark.parametrize("layout", ["nhwc", "nchw", "gray"])
def test_misclassified_grid_accepts_common_layouts(tmp_path, layout):
    rng = np.random.default_rng(0)
    shape = {"nhwc": (10, 8, 8, 3), "nchw": (10, 3, 8, 8), "gray": (10, 8, 8)}[layout]
    x = rng.integers(0, 256, shape, dtype=np.uint8)
    misclassified_grid(x, Y_TRUE, Y_PRED, CLASSES, tmp_path / "wrong.png", n=2)
    assert_png(tmp_path / "wrong.png")


def test_misclassified_grid_without_mistakes_and_bad_pixels(tmp_path):
    x = np.zeros((10, 8, 8, 3), dtype=np.uint8)
    misclassified_grid(x, Y_TRUE, Y_TRUE, CLASSES, tmp_path / "none.png")
    assert_png(tmp_path / "none.png")
    with pytest.raises(ValueError, match="raw uint8"):
        misclassified_grid(x.astype(np.float32), Y_TRUE, Y_PRED, CLASSES, tmp_path / "bad.png")


# ---------------------------------------------------------------- Grad-CAM


class ColourDetector(nn.Module):
    """Class 0 = "red", class 1 = "blue": a 1x1 conv detects each colour, global pooling scores it.

    So class 0's logit depends only on where the image is red, class 1's only on where it is blue.
    """

    def __init__(self) -> None:
        super().__init__()
        conv = nn.Conv2d(3, 2, kernel_size=1, bias=False)
        with torch.no_grad():
            conv.weight.zero_()
            conv.weight[0, 0] = 1.0  # red channel -> map 0
            conv.weight[1, 2] = 1.0  # blue channel -> map 1
        self.features = nn.Sequential(conv, nn.ReLU(), nn.MaxPool2d(2))
        self.gradcam_layer = self.features
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def red_top_left_blue_bottom_right(batch: int = 2) -> torch.Tensor:
    x = torch.zeros(batch, 3, 16, 16)
    x[:, 0, 1:6, 1:6] = 1.0  # the larger patch: "red" is the predicted class
    x[:, 2, 10:14, 10:14] = 1.0
    return x


def quadrant_mass(maps: torch.Tensor, rows: slice, cols: slice) -> torch.Tensor:
    return maps[:, rows, cols].sum(dim=(1, 2)) / maps.sum(dim=(1, 2))


def test_grad_cam_finds_the_evidence_for_each_class():
    model = ColourDetector().train()
    x = red_top_left_blue_bottom_right()
    assert (model(x).argmax(dim=1) == 0).all()

    predicted = grad_cam(model, model.gradcam_layer, x)  # target None: the predicted class, red
    assert predicted.shape == (2, 16, 16)
    assert predicted.min() >= 0 and predicted.max() <= 1
    assert torch.allclose(predicted.amax(dim=(1, 2)), torch.ones(2))
    assert (quadrant_mass(predicted, slice(0, 8), slice(0, 8)) > 0.95).all()

    blue = grad_cam(model, model.gradcam_layer, x, target=torch.tensor([1, 1]))
    assert (quadrant_mass(blue, slice(8, 16), slice(8, 16)) > 0.95).all()

    # Nothing left behind: no hooks, no parameter gradients, eval mode.
    layer = model.gradcam_layer
    assert not layer._forward_hooks and not layer._backward_hooks
    assert all(p.grad is None for p in model.parameters())
    assert not model.training


def test_grad_cam_under_no_grad_with_frozen_weights_is_per_image():
    model = ColourDetector().requires_grad_(False)
    x = red_top_left_blue_bottom_right()
    x[1] = x[1].flip(-1, -2)  # second image: red bottom-right
    with torch.no_grad():
        maps = grad_cam(model, model.gradcam_layer, x)
    assert (quadrant_mass(maps[:1], slice(0, 8), slice(0, 8)) > 0.95).all()
    assert (quadrant_mass(maps[1:], slice(8, 16), slice(8, 16)) > 0.95).all()
    torch.testing.assert_close(maps[1:], grad_cam(model, model.gradcam_layer, x[1:]))


def test_grad_cam_removes_its_hook_when_the_layer_is_unsuitable():
    shared = nn.Conv2d(3, 3, kernel_size=1)
    model = nn.Sequential(shared, shared, nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with pytest.raises(ValueError, match="ran 2 times"):
        grad_cam(model, shared, torch.randn(1, 3, 4, 4))
    assert not shared._forward_hooks
    model = ColourDetector()
    with pytest.raises(ValueError, match="one class index"):
        grad_cam(model, model.gradcam_layer, red_top_left_blue_bottom_right(), target=torch.tensor([0, 2]))
    assert not model.gradcam_layer._forward_hooks


@pytest.mark.parametrize(
    "build",
    [
        lambda: RefCNN(num_classes=5, widths=(8, 16), convs_per_block=1, hidden=16),
        lambda: resnet18_cifar(num_classes=5),
    ],
    ids=["refcnn", "resnet18"],
)
def test_grad_cam_on_the_real_cnns(build):
    torch.manual_seed(0)
    model = build().train()
    x = torch.randn(2, 3, 16, 16)
    maps = grad_cam(model, model.gradcam_layer, x, target=torch.tensor([0, 4]))
    assert maps.shape == (2, 16, 16)
    assert maps.min() >= 0 and maps.max() <= 1
    assert not model.gradcam_layer._forward_hooks
    assert all(p.grad is None for p in model.parameters())
    assert not model.training
    torch.testing.assert_close(maps, grad_cam(model, model.gradcam_layer, x, target=torch.tensor([0, 4])))


# ---------------------------------------------------------------- attention rollout


class FixedAttentionViT(nn.Module):
    """Stands in for a ViT: returns the attention maps it was built with (batch-expanded)."""

    def __init__(self, attentions: list[torch.Tensor], num_classes: int = 3) -> None:
        super().__init__()
        self.attentions = attentions  # each (heads, T, T)
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor, return_attention: bool = False):
        logits = torch.zeros(x.shape[0], self.num_classes)
        if not return_attention:
            return logits
        return logits, [a.expand(x.shape[0], *a.shape) for a in self.attentions]


def attend_to(rows: dict[int, list[float]], tokens: int = 5) -> torch.Tensor:
    """A (T, T) attention matrix: identity, except the given rows."""
    attention = torch.eye(tokens)
    for row, weights in rows.items():
        attention[row] = torch.tensor(weights)
    return attention


def test_rollout_equals_a_hand_computation():
    # T = 5: [CLS] + a 2x2 grid of patches (tokens 1..4).
    everyone_to_token_2 = torch.zeros(5, 5)
    everyone_to_token_2[:, 2] = 1.0
    block1 = torch.stack([torch.eye(5), everyone_to_token_2])  # 2 heads, averaged: 0.5 I + 0.5 e2
    # +I and renormalised: row 0 = [0.75, 0, 0.25, 0, 0], row 3 = 0.75 e3 + 0.25 e2, row 4 = 0.75 e4 + 0.25 e2.
    cls_to_tokens_3_4 = attend_to({0: [0, 0, 0, 0.5, 0.5]})
    block2 = torch.stack([cls_to_tokens_3_4, cls_to_tokens_3_4])
    # +I and renormalised: row 0 = [0.5, 0, 0, 0.25, 0.25], the others identity. Composed row 0:
    # 0.5 * [0.75, 0, 0.25, 0, 0] + 0.25 * [0, 0, 0.25, 0.75, 0] + 0.25 * [0, 0, 0.25, 0, 0.75]
    expected_row0 = torch.tensor([0.375, 0.0, 0.25, 0.1875, 0.1875])

    one_block = rollout([block1[None]])
    torch.testing.assert_close(one_block[0, 0], torch.tensor([0.75, 0.0, 0.25, 0.0, 0.0]))
    two_blocks = rollout([block1[None], block2[None]])
    torch.testing.assert_close(two_blocks[0, 0], expected_row0)
    torch.testing.assert_close(two_blocks.sum(dim=-1), torch.ones(1, 5))

    # Patches 0..3 get [0, 0.25, 0.1875, 0.1875]; scaled to [0, 1] on the 2x2 grid (a 2x2 input: no resizing).
    maps = attention_rollout(FixedAttentionViT([block1, block2]), torch.zeros(2, 3, 2, 2))
    torch.testing.assert_close(maps, torch.tensor([[0.0, 1.0], [0.75, 0.75]]).expand(2, 2, 2))


def test_identity_attention_gives_an_empty_map_not_nan():
    model = FixedAttentionViT([torch.eye(5)[None]] * 3)
    torch.testing.assert_close(rollout(model(torch.zeros(1, 3, 2, 2), return_attention=True)[1])[0], torch.eye(5))
    maps = attention_rollout(model, torch.zeros(1, 3, 8, 8))
    assert maps.shape == (1, 8, 8) and torch.equal(maps, torch.zeros(1, 8, 8))


def test_rollout_shape_range_and_discard_ratio():
    torch.manual_seed(0)
    attentions = [torch.randn(2, 17, 17).softmax(dim=-1) for _ in range(3)]  # 4x4 patch grid
    model = FixedAttentionViT(attentions)
    x = torch.zeros(2, 3, 16, 16)
    maps = attention_rollout(model, x)
    assert maps.shape == (2, 16, 16)
    assert maps.min() >= 0 and maps.max() <= 1
    torch.testing.assert_close(maps.amax(dim=(1, 2)), torch.ones(2))

    blocks = model(x, return_attention=True)[1]
    sparse = rollout(blocks, discard_ratio=0.5)
    torch.testing.assert_close(sparse.sum(dim=-1), torch.ones(2, 17))
    assert not torch.allclose(sparse, rollout(blocks))
    with pytest.raises(ValueError, match="discard_ratio"):
        attention_rollout(model, x, discard_ratio=1.0)


def test_rollout_rejects_tokens_that_do_not_tile_the_image():
    model = FixedAttentionViT([torch.eye(4)[None]])  # 3 patch tokens
    with pytest.raises(ValueError, match="do not tile"):
        attention_rollout(model, torch.zeros(1, 3, 8, 8))


def test_save_heatmap_grid(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (3, 3, 16, 16), dtype=np.uint8)
    maps = torch.rand(3, 16, 16)
    save_heatmap_grid(x, maps, ["cat", "dog", "bird"], tmp_path / "maps.png")
    assert_png(tmp_path / "maps.png")
    with pytest.raises(ValueError, match="one input-sized map per image"):
        save_heatmap_grid(x, maps[:, :8], ["cat", "dog", "bird"], tmp_path / "bad.png")


def test_attention_rollout_on_the_real_vit():
    torch.manual_seed(0)
    model = ViT(image_size=16, num_classes=5, patch_size=4, embed_dim=16, depth=2, heads=2, dropout=0.5).train()
    x = torch.randn(3, 3, 16, 16)
    maps = attention_rollout(model, x)
    assert maps.shape == (3, 16, 16)
    assert maps.min() >= 0 and maps.max() <= 1
    assert not model.training
    torch.testing.assert_close(maps, attention_rollout(model, x))  # eval mode: dropout off, repeatable

    with torch.no_grad():
        _, attentions = model(x, return_attention=True)
    assert len(attentions) == 2 and attentions[0].shape == (3, 2, 17, 17)  # [CLS] + 4x4 patches
    joint = rollout(attentions)
    torch.testing.assert_close(joint.sum(dim=-1), torch.ones(3, 17))
