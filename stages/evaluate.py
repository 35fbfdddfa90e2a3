"""DVC stage `evaluate`: both classifiers on the test subset (accuracy, per-class precision/recall/F1,
confusion matrices, misclassified images, Grad-CAM and attention rollout) and the GANs' quality
figures collected into metrics/evaluate.json.
"""

import sys
from pathlib import Path

# This checkout's library, also inside DVC's temporary experiment copies.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import json  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from reprovision import evaluation as ev  # noqa: E402
from reprovision import track  # noqa: E402
from reprovision.augment import BatchAugment, Policy  # noqa: E402
from reprovision.config import DATASET_SHAPES  # noqa: E402
from reprovision.heatmaps import attention_rollout, grad_cam, save_heatmap_grid  # noqa: E402
from reprovision.layout import CLASSIFIERS, FIGURES, GANS, METRICS, MODELS, POLICY  # noqa: E402
from reprovision.models.cnn import build_cnn  # noqa: E402
from reprovision.models.vit import build_vit  # noqa: E402
from reprovision.runtime import seed_everything  # noqa: E402
from reprovision.stage import load_subset, main, start, write_json  # noqa: E402

BUILDERS = {"vit": build_vit, "cnn": build_cnn}
SUMMARY = ("accuracy", "macro_precision", "macro_recall", "macro_f1")


def evaluate() -> None:
    ctx = start("evaluate")
    params, device = ctx.params, ctx.device
    rng = seed_everything(params.seed, device)
    dataset = params.data.classifier_dataset
    channels, size, _, num_classes = DATASET_SHAPES[dataset]
    test_x, test_y, classes = load_subset(dataset, "test", params.data.test_fraction, params.seed, device)
    augmenter = BatchAugment(Policy.from_json(json.loads(POLICY.read_text())), num_classes, rng)

    def normalised(start: int, end: int) -> torch.Tensor:
        return augmenter(test_x[start:end], test_y[start:end], train=False)[0]

    x_host, y_host = test_x.cpu().numpy(), test_y.cpu().numpy()
    FIGURES.mkdir(parents=True, exist_ok=True)
    results, confusions, per_class = {}, {}, {}
    k = min(params.evaluate.heatmap_images, len(test_y))
    for name in CLASSIFIERS:
        cfg = params.classifier(name)
        model = BUILDERS[name](cfg, num_classes=num_classes, channels=channels, image_size=size)
        model.load_state_dict(torch.load(MODELS / name / "model.pt", map_location="cpu", weights_only=True))
        model = model.to(device).eval()
        preds, _ = ev.predict(model, normalised, len(test_y), cfg.eval_batch_size, device)
        metrics = ev.classification_metrics(y_host, preds, classes)
        write_json(METRICS / "eval" / f"{name}_confusion.json", ev.confusion_records(y_host, preds, classes))
        confusions[name] = np.array(metrics["confusion_matrix"])
        per_class[name] = [metrics["per_class"][c]["accuracy"] for c in classes]
        figures = [FIGURES / f"misclassified_{name}.png"]
        ev.misclassified_grid(x_host, y_host, preds, classes, figures[0], n=params.evaluate.misclassified_images)
        if name == "cnn":
            maps, figure = grad_cam(model, model.gradcam_layer, normalised(0, k)), FIGURES / "gradcam_cnn.png"
        else:
            maps, figure = attention_rollout(model, normalised(0, k)), FIGURES / "rollout_vit.png"
        labels = [f"{classes[t]} / {classes[p]}" for t, p in zip(y_host[:k], preds[:k])]
        save_heatmap_grid(x_host[:k], maps.cpu(), labels, figure)
        figures.append(figure)
        results[name] = {key: metrics[key] for key in SUMMARY}
        results[name]["per_class_accuracy"] = dict(zip(classes, per_class[name]))
        # Evaluation belongs to the training run that made the model: add it there.
        with track.resumed_run(json.loads((MODELS / name / "run.json").read_text())["run_id"]):
            track.log_metrics({f"eval_{key}": results[name][key] for key in SUMMARY})
            track.log_artifacts(*figures, folder="figures")
        print(f"[evaluate] {name}: accuracy {metrics['accuracy']:.4f}, macro F1 {metrics['macro_f1']:.4f}")

    ev.plot_confusions_side_by_side(confusions, classes, FIGURES / "confusion_raw.png", normalize=False)
    ev.plot_confusions_side_by_side(confusions, classes, FIGURES / "confusion_normalised.png", normalize=True)
    ev.plot_per_class_accuracy(per_class, classes, FIGURES / "per_class_accuracy.png")
    gans = {}
    for name in GANS:
        gan = json.loads((METRICS / "gan" / f"{name}.json").read_text())
        gans[name] = {key: gan[key] for key in ("fid", "fid_floor", "inception_score", "inception_score_real", "kl_uniform", "n")}
    write_json(METRICS / "evaluate.json", {"classifiers": results, "gans": gans})


if __name__ == "__main__":
    main(evaluate)
