"""DVC stage `evaluate`: every classifier family on the test subset (accuracy, per-class precision/recall/F1,
confusion matrices, misclassified images, the family's heat map: Grad-CAM or attention rollout), one MLflow
run per model.
"""

import sys
from pathlib import Path

# This checkout's library, also inside DVC's temporary experiment copies.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import json  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from reprovision.config import DATASET_SHAPES  # noqa: E402
from reprovision.core import track_log, track_run  # noqa: E402
from reprovision.core.context import load_subset, run_tags, start  # noqa: E402
from reprovision.core.runtime import seed_everything  # noqa: E402
from reprovision.core.stage import main, write_json  # noqa: E402
from reprovision.data.augment import BatchAugment, Policy  # noqa: E402
from reprovision.layout import EMA_WEIGHTS, EVAL_METRICS, FIGURES, METRICS, MODELS, POLICY, RUN_REF, SUMMARY  # noqa: E402
from reprovision.measure import evaluation as ev  # noqa: E402
from reprovision.measure.heatmaps import attention_rollout, grad_cam, save_heatmap_grid  # noqa: E402
from reprovision.measure.noise import accuracy_ci95  # noqa: E402
from reprovision.models.classifiers import FAMILIES  # noqa: E402
from reprovision.models.tta import for_inference  # noqa: E402

SCORES = ("accuracy", "macro_precision", "macro_recall", "macro_f1")
# metrics/evaluate.json, per model: the test accuracy of the pipeline (the shipped weights in fp32, as the
# logged model serves them; the training stage's test figures are monitoring), accuracy_ci95 half the width
# of its 95 % Wilson interval from the test images alone (one column; the interval is not symmetric around
# the accuracy, and the report prints its bounds: measure/noise.py), and the macro F1.
HEADLINE = ("accuracy", "accuracy_ci95", "macro_f1")


def evaluate() -> None:
    ctx = start("evaluate")
    params, device = ctx.params, ctx.device
    rng = seed_everything(params.seed, device, params.deterministic)
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
    heatmaps = {"gradcam": lambda model, x: grad_cam(model, model.gradcam_layer, x), "rollout": attention_rollout}
    for name, family in FAMILIES.items():
        cfg = params.classifier(name)
        model = family.build(cfg, num_classes=num_classes, channels=channels, image_size=size)
        model.load_state_dict(torch.load(MODELS / name / "model.pt", map_location="cpu", weights_only=True))
        model = model.to(device).eval()
        preds, _ = ev.predict(for_inference(model, cfg.tta), normalised, len(test_y), cfg.eval_batch_size, device)
        metrics = ev.classification_metrics(y_host, preds, classes)
        write_json(EVAL_METRICS / f"{name}_confusion.json", ev.confusion_records(y_host, preds, classes))
        confusions[name] = np.array(metrics["confusion_matrix"])
        per_class[name] = [metrics["per_class"][c]["accuracy"] for c in classes]
        figures = [FIGURES / f"misclassified_{name}.png"]
        ev.misclassified_grid(x_host, y_host, preds, classes, figures[0], n=params.evaluate.misclassified_images)
        if family.heatmap:
            maps, figure = heatmaps[family.heatmap](model, normalised(0, k)), FIGURES / f"{family.heatmap}_{name}.png"
            labels = [f"{classes[t]} / {classes[p]}" for t, p in zip(y_host[:k], preds[:k])]
            save_heatmap_grid(x_host[:k], maps.cpu(), labels, figure)
            figures.append(figure)
        results[name] = {key: metrics[key] for key in SCORES}
        results[name]["accuracy_ci95"] = accuracy_ci95(metrics["accuracy"], len(test_y))
        if cfg.ema_decay > 0:  # the weights' moving average, scored beside them
            averaged = family.build(cfg, num_classes=num_classes, channels=channels, image_size=size)
            averaged.load_state_dict(torch.load(MODELS / name / EMA_WEIGHTS, map_location="cpu", weights_only=True))
            ema_preds, _ = ev.predict(
                for_inference(averaged.to(device), cfg.tta), normalised, len(test_y), cfg.eval_batch_size, device
            )
            results[name]["ema_accuracy"] = float((ema_preds == y_host).mean())
        results[name]["per_class_accuracy"] = dict(zip(classes, per_class[name]))
        # A run of its own (this stage's code and params may change without the model changing),
        # naming the training run and the logged model it evaluated; the figures link to that model.
        trained = json.loads((MODELS / name / RUN_REF).read_text())
        tags = run_tags(ctx, dataset) | {
            "evaluated_run": trained["run_id"],
            "evaluated_model_id": trained.get("model_id", ""),
        }
        run_params = {
            "model": name,
            "test_fraction": params.data.test_fraction,
            "test_images": len(test_y),
            **params.evaluate.model_dump(),
        }
        with track_run.stage_run("evaluate", name, run_params, tags, params, run_name=f"evaluate-{name}"):
            test_set = track_log.log_datasets(Path.cwd(), dataset, tags["data_sha256"], {"test": len(test_y)})["test"]
            scores = {f"eval_{key}": results[name][key] for key in (*SCORES, "accuracy_ci95")}
            track_log.log_metrics(scores, model_id=trained.get("model_id"), dataset=test_set)
            track_log.log_artifacts(*figures, folder="figures")
        print(f"[evaluate] {name}: accuracy {metrics['accuracy']:.4f}, macro F1 {metrics['macro_f1']:.4f}")

    ev.plot_confusions_side_by_side(confusions, classes, FIGURES / "confusion_raw.png", normalize=False)
    ev.plot_confusions_side_by_side(confusions, classes, FIGURES / "confusion_normalised.png", normalize=True)
    ev.plot_per_class_accuracy(per_class, classes, FIGURES / "per_class_accuracy.png")
    # The whole record for the report; per model, the figures `dvc exp show` shows (per-class
    # figures are in the confusion files, which `dvc plots` draws).
    write_json(EVAL_METRICS / SUMMARY, {"classifiers": results, "test_images": len(test_y)})
    write_json(
        METRICS / "evaluate.json",
        {name: {key: results[name][key] for key in HEADLINE} for name in results},
        sort_keys=False,
    )


if __name__ == "__main__":
    main(evaluate)
