"""DVC stage `pretrain-ssl`: R4's self-supervised pre-training. SimCLR (training/fit_simclr.py) trains an encoder
(`ssl.arch`, the CIFAR stem) on `ssl.train_fraction` of the classifier dataset's training images,
without their labels and without the validation images; the linear-probe stage measures it.

Outputs, as dvc.yaml declares them: models/ssl/ (encoder weights, MLflow run reference),
metrics/ssl.json (headline figures), metrics/ssl/summary.json (the whole record) and
metrics/ssl/history.csv (the loss per epoch, for `dvc plots`).
"""

import sys
from pathlib import Path

# This checkout's library, also inside DVC's temporary experiment copies.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import json  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from reprovision.config import DATASET_SHAPES, SSLConfig  # noqa: E402
from reprovision.core import checkpoint, track_log, track_run  # noqa: E402
from reprovision.core.context import Context, run_tags, start  # noqa: E402
from reprovision.core.runtime import resolve_precision, seed_everything  # noqa: E402
from reprovision.core.stage import main, write_csv, write_json  # noqa: E402
from reprovision.data.augment import Policy  # noqa: E402
from reprovision.data.datasets import load_split, stratified_subset, validation_split  # noqa: E402
from reprovision.layout import CHECKPOINTS, METRICS, POLICY, PREPARED, SSL_ENCODER, SUMMARY  # noqa: E402
from reprovision.models import count_parameters  # noqa: E402
from reprovision.models.cnn import build_encoder  # noqa: E402
from reprovision.publish.serving import RawImageEncoder  # noqa: E402
from reprovision.training.fit_simclr import SimCLR, fit_simclr  # noqa: E402

HEADLINE = ("loss", "train_seconds")  # metrics/ssl.json: what `dvc exp show` shows


def pretraining_images(params, y: np.ndarray) -> np.ndarray:
    """Positions in the training split (labels `y`): `ssl.train_fraction` of it, stratified (labels pick
    nothing else), minus the validation images the classifiers and the probe hold out (data.val_fraction)."""
    data = params.data
    labelled = stratified_subset(y, data.train_fraction, params.seed)
    held_out = labelled[validation_split(y[labelled], data.val_fraction, params.seed)[1]]
    pool = np.setdiff1d(np.arange(len(y)), held_out)
    return pool[stratified_subset(y[pool], params.ssl.train_fraction, params.seed)]


def resume_fingerprint(ctx: Context, policy: Policy, data_sha256: str, precision: str) -> str:
    """Everything that shapes the result (checkpoint.py adds the code): the params this stage reads,
    the channel statistics, the data, the threads, the precision and the device."""
    params = ctx.params
    reads = {
        "seed": params.seed,
        "data": params.data.model_dump(exclude={"test_fraction"}),
        "ssl": params.ssl.model_dump(),
    }
    return checkpoint.fingerprint(
        json.dumps(reads, sort_keys=True),
        policy.mean,
        policy.std,
        data_sha256,
        ctx.threads,
        precision,
        ctx.device,
    )


def ssl_run_params(ctx: Context, precision: str, images: torch.Tensor, encoder: torch.nn.Module) -> dict:
    """The run's MLflow params: the ssl section, the run's setting, the images, the encoder's size."""
    params = ctx.params
    return {
        **params.ssl.model_dump(),
        "seed": params.seed,
        "threads": ctx.threads,
        "precision_resolved": precision,
        "dataset": params.data.classifier_dataset,
        "train_images": len(images),
        "params_count": count_parameters(encoder),
    }


def summary(
    history: list[dict],
    cfg: SSLConfig,
    *,
    images: torch.Tensor,
    encoder: torch.nn.Module,
    features: int,
    started: float,
    device: torch.device,
) -> dict:
    """The whole record of the pre-training (metrics/ssl/summary.json): the last epoch's figures, the
    time, the encoder's size."""
    final = history[-1]
    return {
        "loss": final["loss"],
        "pair_acc": final["pair_acc"],
        "train_seconds": sum(r["epoch_seconds"] for r in history),
        "epochs": cfg.epochs,
        "train_images": len(images),
        "arch": cfg.arch,
        "features": features,
        "params": count_parameters(encoder),
        "wall_seconds": time.perf_counter() - started,
        "device": str(device),
    }


def log_encoder(
    encoder: torch.nn.Module,
    policy: Policy,
    images: torch.Tensor,
    *,
    dataset: str,
    features: int,
    cfg: SSLConfig,
    run_params: dict,
    tags: dict,
):
    """The encoder as an MLflow model (uint8 images in, features out); what log_model logged."""
    return track_log.log_model(
        RawImageEncoder(encoder, mean=policy.mean, std=policy.std),
        name="ssl-encoder",
        example=images[:2],
        description=f"SimCLR {cfg.arch} encoder, {cfg.epochs} epochs on {len(images)} {dataset} "
        "training images (no labels)",
        params=run_params,
        run_tags=tags,
        step=cfg.epochs,
        metadata={"input": "uint8 images (N, C, H, W) in [0, 255]", "output": f"features (N, {features})"},
    )


def pretrain_ssl() -> None:
    ctx = start("pretrain-ssl")
    params, device = ctx.params, ctx.device
    rng = seed_everything(params.seed, device, params.deterministic)
    cfg = params.ssl
    dataset = params.data.classifier_dataset
    channels = DATASET_SHAPES[dataset][0]
    train = load_split(PREPARED, dataset, "train")
    images = torch.from_numpy(np.ascontiguousarray(train.x[pretraining_images(params, train.y)])).to(device)
    policy = Policy.from_json(json.loads(POLICY.read_text()))  # the dataset's channel statistics
    encoder, features = build_encoder(cfg, channels=channels)
    model = SimCLR(encoder, features=features, hidden=cfg.proj_hidden, out=cfg.proj_dim).to(device)
    model = model.to(memory_format=torch.channels_last)  # as train-cnn's CNNs: measured 1.2-2x faster on CPU
    precision = resolve_precision(cfg.precision, device)
    tags = run_tags(ctx, dataset)
    fingerprint = resume_fingerprint(ctx, policy, tags["data_sha256"], precision)
    history_path = METRICS / "ssl" / "history.csv"
    rows: list[dict] = []

    def on_epoch(row: dict) -> None:
        rows.append(row)
        write_csv(history_path, rows)
        track_log.log_epoch({f"ssl_{k}": v for k, v in row.items() if k != "epoch"}, row["epoch"])

    run_params = ssl_run_params(ctx, precision, images, encoder)
    with track_run.stage_run("pretrain-ssl", "ssl", run_params, tags, params, system_metrics=True) as run:
        track_log.log_datasets(Path.cwd(), dataset, tags["data_sha256"], {"train": len(images)})
        started = time.perf_counter()
        history = fit_simclr(
            model,
            images,
            policy,
            cfg,
            rng,
            checkpoint=CHECKPOINTS / "ssl.pt",
            fingerprint=fingerprint,
            on_epoch=on_epoch,
        )
        metrics = summary(
            history, cfg, images=images, encoder=encoder, features=features, started=started, device=device
        )
        write_json(METRICS / "ssl" / SUMMARY, metrics)
        write_json(METRICS / "ssl.json", {k: metrics[k] for k in HEADLINE}, sort_keys=False)
        track_log.log_metrics({k: metrics[k] for k in ("train_seconds", "params")}, step=cfg.epochs)
        SSL_ENCODER.parent.mkdir(parents=True, exist_ok=True)
        torch.save(encoder.state_dict(), SSL_ENCODER)
        track_log.log_artifacts(history_path)
        logged = log_encoder(
            encoder, policy, images, dataset=dataset, features=features, cfg=cfg, run_params=run_params, tags=tags
        )
        track_log.write_run_ref(SSL_ENCODER.parent / "run.json", run, logged)
    print(
        f"[pretrain-ssl] NT-Xent {metrics['loss']:.4f}, pair accuracy {metrics['pair_acc']:.4f} "
        f"in {metrics['train_seconds']:.1f} s"
    )


if __name__ == "__main__":
    main(pretrain_ssl)
