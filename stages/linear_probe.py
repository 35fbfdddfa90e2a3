"""DVC stage `linear-probe`: R4's measure of the self-supervised encoder. The encoder pretrain-ssl
made, frozen, and the same architecture randomly initialised (the from-scratch floor) each get a
logistic-regression probe and a k-NN vote on the labelled training split, scored on the test split
(and on the validation split when one is held out: that one is for decisions).

The supervised row of the report's table is train-cnn's own model (same architecture when
`cnn.arch` matches `ssl.arch`); this stage does not read it, so training a classifier never re-runs it.

Outputs: metrics/probe.json (headline figures), metrics/probe/summary.json (the whole record).
"""

import sys
from pathlib import Path

# This checkout's library, also inside DVC's temporary experiment copies.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import json  # noqa: E402

import torch  # noqa: E402

from reprovision.config import DATASET_SHAPES  # noqa: E402
from reprovision.core import track_log, track_run  # noqa: E402
from reprovision.core.context import load_subset, run_tags, start  # noqa: E402
from reprovision.core.runtime import seed_everything  # noqa: E402
from reprovision.core.stage import main, write_json  # noqa: E402
from reprovision.data.augment import Policy  # noqa: E402
from reprovision.data.datasets import validation_split  # noqa: E402
from reprovision.layout import METRICS, POLICY, SSL_ENCODER, SUMMARY  # noqa: E402
from reprovision.measure.probe import extract_features, probe_accuracy  # noqa: E402
from reprovision.models.cnn import build_encoder  # noqa: E402

HEADLINE = ("probe_test", "knn_test", "random_probe_test", "random_knn_test")  # metrics/probe.json, in this order


def linear_probe() -> None:
    ctx = start("linear-probe")
    params, device = ctx.params, ctx.device
    seed_everything(params.seed, device, params.deterministic)  # the random encoder's initial weights come from it
    data = params.data
    channels = DATASET_SHAPES[data.classifier_dataset][0]
    x, y, _ = load_subset(data.classifier_dataset, "train", data.train_fraction, params.seed, device)
    test_x, test_y, _ = load_subset(data.classifier_dataset, "test", data.test_fraction, params.seed, device)
    labels, test_labels = y.cpu().numpy(), test_y.cpu().numpy()
    train_idx, val_idx = validation_split(labels, data.val_fraction, params.seed)
    policy = Policy.from_json(json.loads(POLICY.read_text()))
    random_encoder, _ = build_encoder(params.ssl, channels=channels)
    pretrained, features = build_encoder(params.ssl, channels=channels)
    pretrained.load_state_dict(torch.load(SSL_ENCODER, map_location="cpu", weights_only=True))
    ssl_run = json.loads((SSL_ENCODER.parent / "run.json").read_text())
    pretrained_on = json.loads((METRICS / "ssl" / SUMMARY).read_text())["train_images"]

    splits = {"train": train_idx, **({"val": val_idx} if len(val_idx) else {})}
    metrics: dict = {}
    for prefix, encoder in (("", pretrained), ("random_", random_encoder)):
        encoder = encoder.to(device)
        train_f = extract_features(encoder, x, policy)
        evaluated = {"test": (extract_features(encoder, test_x, policy), test_labels)}
        if "val" in splits:
            evaluated["val"] = (train_f[val_idx], labels[val_idx])
        found = probe_accuracy(train_f[train_idx], labels[train_idx], evaluated, params.probe)
        metrics.update({prefix + key: value for key, value in found.items()})
    metrics.update(
        arch=params.ssl.arch,
        features=features,
        train_images=len(train_idx),
        val_images=len(val_idx),
        test_images=len(test_y),
    )  # results only: the run ids are in MLflow (evaluated_run) and models/ssl/run.json

    tags = {**run_tags(ctx, data.classifier_dataset), "evaluated_run": ssl_run["run_id"]}
    # What `reprovision study --ssl-size` plots against: the pre-training-set size.
    run_params = {
        **params.probe.model_dump(),
        "arch": params.ssl.arch,
        "ssl_train_fraction": params.ssl.train_fraction,
        "ssl_train_images": pretrained_on,
        "ssl_epochs": params.ssl.epochs,
        "seed": params.seed,
        "threads": ctx.threads,
        "train_images": len(train_idx),
        "val_images": len(val_idx),
        "test_images": len(test_y),
    }
    with track_run.stage_run("linear-probe", "probe", run_params, tags, params):
        images = {"train": len(train_idx), **({"val": len(val_idx)} if len(val_idx) else {}), "test": len(test_y)}
        track_log.log_datasets(Path.cwd(), data.classifier_dataset, tags["data_sha256"], images)
        track_log.log_metrics({k: v for k, v in metrics.items() if isinstance(v, float)}, step=0)
    write_json(METRICS / "probe" / SUMMARY, metrics)
    write_json(METRICS / "probe.json", {k: metrics[k] for k in HEADLINE}, sort_keys=False)
    print(
        f"[linear-probe] test accuracy: probe {metrics['probe_test']:.4f} (random encoder "
        f"{metrics['random_probe_test']:.4f}), "
        f"k-NN {metrics['knn_test']:.4f} (random {metrics['random_knn_test']:.4f})"
    )


if __name__ == "__main__":
    main(linear_probe)
