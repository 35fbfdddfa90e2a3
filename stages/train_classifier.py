"""The body of the train-vit and train-cnn stages: one classifier, trained by the library's loop.

Each `train-<family>` script (train_vit.py, train_cnn.py) passes its family (models/<family>.py,
`FAMILY`), so that a stage imports (and declares in dvc.yaml) only the architecture it trains.
Outputs, as dvc.yaml declares them:
models/<name>/ (weights, card, MLflow run reference), metrics/<name>.json (headline figures),
metrics/<name>/summary.json (the whole record) and metrics/<name>/history.csv.
"""

import json
import time
from pathlib import Path

import torch

from reprovision.core import checkpoint, distributed, track
from reprovision.core.context import load_subset, run_tags, start
from reprovision.core.runtime import attention_backend, autocast_dtype, resolve_precision, seed_everything
from reprovision.core.stage import write_csv, write_json
from reprovision.data.augment import Policy
from reprovision.layout import CHECKPOINTS, EMA_WEIGHTS, METRICS, MODELS, POLICY, REGISTERED_MODELS, SUMMARY
from reprovision.models import ClassifierFamily, count_parameters
from reprovision.models.tta import for_inference
from reprovision.publish import cards
from reprovision.publish.serving import RawImageClassifier
from reprovision.training.classifier_setup import setup
from reprovision.training.fit_classifier import DeviceData, evaluate, fit_classifier
from reprovision.training.optim import ema_of

# metrics/<name>.json: what `dvc exp show` shows of this stage (val_acc only when a validation split is held
# out: the shipped weights', what the registry and tune decide on). No test figure: the test accuracy is the
# evaluate stage's (metrics/evaluate.json, the shipped weights in fp32 as the logged model serves them). This
# stage scores the test split after every epoch under its own precision (bf16 autocast where the device has
# it) for R3's learning curve: monitoring, kept in the history and summary.json as monitor_test_*.
HEADLINE = ("val_acc", "train_acc", "train_seconds")


def train(family: ClassifierFamily) -> None:
    name = family.name
    ctx = start(f"train-{name}")
    params = ctx.params
    distributed.relaunch(params.dist.nproc)  # dist.nproc > 1: this process becomes torchrun
    world, device = distributed.join(params.dist.nnodes, params.dist.nproc, ctx.device)
    rng = seed_everything(params.seed, device, params.deterministic)
    cfg = params.classifier(name)
    data = params.data
    precision = resolve_precision(cfg.precision, device)
    x, y, classes = load_subset(data.classifier_dataset, "train", data.train_fraction, params.seed, device)
    test = DeviceData(*load_subset(data.classifier_dataset, "test", data.test_fraction, params.seed, device)[:2])
    policy = Policy.from_json(json.loads(POLICY.read_text()))
    model, train, val, augmenter = setup(family, params, device, rng, x, y, policy)
    lr = params.learning_rate(name)
    tags = run_tags(ctx, data.classifier_dataset)
    # The resume fingerprint: everything that shapes the result (checkpoint.py adds the code).
    fingerprint = checkpoint.fingerprint(
        params.digest("seed", "lr", "data", name),
        policy.to_json(),
        tags["data_sha256"],
        ctx.threads,
        precision,
        world.size,
        params.deterministic,
    )
    if not world.is_main:
        # The other ranks train beside rank 0 and leave outputs, checkpoint and MLflow run to it.
        fit_classifier(
            model,
            train,
            val,
            test,
            augmenter,
            cfg,
            lr,
            rng,
            checkpoint=CHECKPOINTS / f"{name}.pt",
            fingerprint=fingerprint,
            progress=False,
            world=world,
        )
        distributed.leave(world)
        return

    out = MODELS / name
    out.mkdir(parents=True, exist_ok=True)
    history_path = METRICS / name / "history.csv"
    rows: list[dict] = []

    def on_epoch(row: dict) -> None:
        rows.append(row)
        write_csv(history_path, rows)
        track.log_epoch(row, row["epoch"])

    run_params = {
        **cfg.model_dump(),
        "model": name,
        "arch": cfg.architecture(),
        "lr": lr,
        "lr_base": params.lr,
        "seed": params.seed,
        "threads": ctx.threads,
        "world_size": world.size,
        "precision_resolved": precision,
        "deterministic": params.deterministic,
        "attention_kernel": attention_backend(device, autocast_dtype(cfg.precision, device), cfg.cpu_attention),
        "dataset": data.classifier_dataset,
        "train_fraction": data.train_fraction,
        "val_fraction": data.val_fraction,
        "test_fraction": data.test_fraction,
        "train_images": len(train),
        "val_images": len(val) if val is not None else 0,
        "test_images": len(test),
        "params_count": count_parameters(model),
        **{f"augment.{k}": v for k, v in augmenter.policy.to_json().items() if k != "dataset"},
    }
    with track.stage_run(f"train-{name}", name, run_params, tags, params, system_metrics=True) as run:
        images = {"train": len(train), **({"val": len(val)} if val is not None else {}), "test": len(test)}
        track.log_datasets(Path.cwd(), data.classifier_dataset, tags["data_sha256"], images)
        ema = ema_of(model, cfg.ema_decay)
        started = time.perf_counter()
        history = fit_classifier(
            model,
            train,
            val,
            test,
            augmenter,
            cfg,
            lr,
            rng,
            checkpoint=CHECKPOINTS / f"{name}.pt",
            fingerprint=fingerprint,
            on_epoch=on_epoch,
            world=world,
            ema=ema,
        )
        distributed.leave(world)
        wall = time.perf_counter() - started
        train_seconds = sum(r["epoch_seconds"] for r in history)
        # What ships: with a validation split, the best validation epoch (fit_classifier left the
        # model holding its weights; the first of equals); without one, the last. The test split only reports.
        shipped = max(history, key=lambda r: r["val_acc"]) if val is not None else history[-1]
        metrics = {
            "monitor_test_acc": shipped["test_acc"],
            "monitor_test_loss": shipped["test_loss"],
            "train_acc": shipped["train_acc"],
            "train_loss": shipped["train_loss"],
        }
        inference = for_inference(model, cfg.tta)
        if cfg.tta != "none":
            # What evaluate and the served model compute: the shipped weights under test-time augmentation.
            tta_started = time.perf_counter()
            amp = autocast_dtype(cfg.precision, device)
            measured = evaluate(inference, test, augmenter, cfg.eval_batch_size, amp, cpu_attention=cfg.cpu_attention)
            metrics.update(
                monitor_test_acc=measured["acc"],
                monitor_test_loss=measured["loss"],
                monitor_test_acc_plain=shipped["test_acc"],
                tta=cfg.tta,
                tta_seconds=time.perf_counter() - tta_started,
            )
        if val is not None:
            metrics.update(
                val_acc=shipped["val_acc"],
                val_loss=shipped["val_loss"],
                best_val_acc=shipped["val_acc"],
                best_val_epoch=shipped["epoch"],
            )
        shipped_epoch = shipped["epoch"]
        shipped_why = "the best validation accuracy" if val is not None else "the last epoch (no validation split)"
        if ema is not None:  # the average after the last epoch, scored beside the weights that ship
            amp = autocast_dtype(cfg.precision, device)
            averaged = {
                split: evaluate(
                    for_inference(ema.module, cfg.tta),
                    images,
                    augmenter,
                    cfg.eval_batch_size,
                    amp,
                    cpu_attention=cfg.cpu_attention,
                )
                for split, images in (("val", val), ("test", test))
                if images is not None
            }
            if "val" in averaged:
                metrics["ema_val_acc"] = averaged["val"]["acc"]
            metrics["monitor_ema_test_acc"] = averaged["test"]["acc"]  # evaluate's is ema_accuracy
            torch.save(ema.module.state_dict(), out / EMA_WEIGHTS)
            # With a validation split the average ships if it validates better than the best epoch did,
            # judged as the epochs are (without test-time augmentation).
            plain = (
                averaged.get("val")
                if cfg.tta == "none" or val is None
                else evaluate(ema.module, val, augmenter, cfg.eval_batch_size, amp, cpu_attention=cfg.cpu_attention)
            )
            if plain is not None and plain["acc"] > shipped["val_acc"]:
                model.load_state_dict(ema.module.state_dict())
                metrics.pop("monitor_test_acc_plain", None)
                metrics.update(
                    monitor_test_acc=averaged["test"]["acc"],
                    monitor_test_loss=averaged["test"]["loss"],
                    val_acc=plain["acc"],
                    val_loss=plain["loss"],
                )
                shipped_epoch = len(history)
                shipped_why = (
                    f"the weights' moving average (ema_decay {cfg.ema_decay}) after epoch {shipped_epoch}: "
                    f"validation accuracy {plain['acc']:.4f} against the best epoch's {shipped['val_acc']:.4f}"
                )
        if val is not None:  # what the registry's gate compares scores on (registry.promote)
            metrics["val_split"] = (
                f"{data.classifier_dataset} {tags['data_sha256'][:12]}, train_fraction {data.train_fraction}, "
                f"val_fraction {data.val_fraction}, seed {params.seed}"
            )
        metrics.update(shipped_epoch=shipped_epoch, shipped_why=shipped_why, epochs_trained=len(history))
        metrics.update(
            params=run_params["params_count"],  # counted before training: airbench freezes a bias in it
            epochs=cfg.epochs,
            train_seconds=train_seconds,
            s_per_epoch=train_seconds / len(history),
            test_images=len(test),
            device=str(device),
        )
        # The whole record for the report and the card; the few numbers a person compares across
        # experiments (`dvc exp show`, `dvc metrics diff`) in the stage's metrics file.
        write_json(METRICS / name / SUMMARY, metrics)
        write_json(METRICS / f"{name}.json", {k: metrics[k] for k in HEADLINE if k in metrics}, sort_keys=False)
        # Per-epoch metrics are already logged with their step; add only the run-level figures.
        run_level = {
            k: metrics[k]
            for k in (
                "params",
                "train_seconds",
                "s_per_epoch",
                "best_val_acc",
                "best_val_epoch",
                "tta_seconds",
                "ema_val_acc",
                "monitor_ema_test_acc",
            )
            if k in metrics
        }
        if cfg.tta != "none":  # the per-epoch test_acc is without it
            run_level["monitor_tta_test_acc"] = metrics["monitor_test_acc"]
        track.log_metrics({"wall_seconds": wall, **run_level}, step=cfg.epochs)
        torch.save(model.state_dict(), out / "model.pt")
        card = cards.classifier_card(name, params, metrics, classes, family.describe(cfg, num_classes=len(classes)))
        (out / "card.md").write_text(card)
        track.log_artifacts(out / "card.md", history_path)
        served = RawImageClassifier(inference, mean=policy.mean, std=policy.std)
        registered = REGISTERED_MODELS[name]
        logged = track.log_model(
            served,
            name=name,
            example=test.x[:2],
            description=card,
            params=run_params,
            step=metrics["shipped_epoch"],  # the model's metrics: those of the epoch whose weights ship
            run_tags=tags,
            metadata={
                "classes": classes,
                "input": "uint8 images (N, C, H, W) in [0, 255]",
                "output": "class probabilities (N, classes)",
            },
            registered_model_name=registered,
        )
        track.write_run_ref(out / "run.json", run, logged, registered)
    print(
        f"[train-{name}] monitoring test accuracy {metrics['monitor_test_acc']:.4f} ({precision}; evaluate scores "
        f"the shipped weights) in {train_seconds:.1f} s"
    )
