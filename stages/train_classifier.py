"""The body of the train-vit and train-cnn stages: one classifier, trained by the library's loop.

Each `train-<family>` script (train_vit.py, train_cnn.py) passes its family (models/<family>.py,
`FAMILY`), so that a stage imports (and declares in dvc.yaml) only the architecture it trains.
Outputs, as dvc.yaml declares them:
models/<name>/ (weights, card, MLflow run reference), metrics/<name>.json (headline figures),
metrics/<name>/summary.json (the whole record) and metrics/<name>/history.csv.
"""

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from reprovision.config import Params, TrainConfig
from reprovision.core import checkpoint, distributed, track
from reprovision.core.context import Context, load_subset, run_tags, start
from reprovision.core.distributed import World
from reprovision.core.runtime import attention_backend, autocast_dtype, resolve_precision, seed_everything
from reprovision.core.stage import write_csv, write_json
from reprovision.data.augment import BatchAugment, Policy
from reprovision.layout import CHECKPOINTS, EMA_WEIGHTS, METRICS, MODELS, POLICY, REGISTERED_MODELS, SUMMARY
from reprovision.models import ClassifierFamily, count_parameters
from reprovision.models.tta import for_inference
from reprovision.publish import cards
from reprovision.publish.serving import RawImageClassifier
from reprovision.training.classifier_setup import setup
from reprovision.training.fit_classifier import DeviceData, evaluate, fit_classifier
from reprovision.training.optim import ema_of
from reprovision.training.shipping import ema_ships, shipped_row, why_ema_ships, why_row_ships

# metrics/<name>.json: what `dvc exp show` shows of this stage (val_acc only when a validation split is held
# out: the shipped weights', what the registry and tune decide on). No test figure: the test accuracy is the
# evaluate stage's (metrics/evaluate.json, the shipped weights in fp32 as the logged model serves them). This
# stage scores the test split after every epoch under its own precision (bf16 autocast where the device has
# it) for R3's learning curve: monitoring, kept in the history and summary.json as monitor_test_*.
HEADLINE = ("val_acc", "train_acc", "train_seconds")


@dataclass
class Run:
    """One classifier's training, set up: what every step below reads."""

    family: ClassifierFamily
    ctx: Context
    world: World
    device: torch.device
    rng: torch.Generator
    precision: str  # the resolved precision
    model: torch.nn.Module
    train: DeviceData
    val: DeviceData | None  # None: no validation split held out
    test: DeviceData
    classes: list[str]
    augmenter: BatchAugment
    policy: Policy
    lr: float
    tags: dict[str, str]
    fingerprint: str  # the resume fingerprint

    @property
    def name(self) -> str:
        return self.family.name

    @property
    def params(self) -> Params:
        return self.ctx.params

    @property
    def cfg(self) -> TrainConfig:
        return self.params.classifier(self.name)

    @property
    def amp(self) -> torch.dtype | None:
        return autocast_dtype(self.cfg.precision, self.device)


def train(family: ClassifierFamily) -> None:
    run = set_up(family)
    if not run.world.is_main:
        # The other ranks train beside rank 0 and leave outputs, checkpoint and MLflow run to it.
        fit(run, progress=False)
        distributed.leave(run.world)
        return

    name, cfg, data = run.name, run.cfg, run.params.data
    out = MODELS / name
    out.mkdir(parents=True, exist_ok=True)
    history_path = METRICS / name / "history.csv"
    rows: list[dict] = []

    def on_epoch(row: dict) -> None:
        rows.append(row)
        write_csv(history_path, rows)
        track.log_epoch(row, row["epoch"])

    logged_params = run_params(run)
    with track.stage_run(f"train-{name}", name, logged_params, run.tags, run.params, system_metrics=True) as tracked:
        images = {
            "train": len(run.train),
            **({"val": len(run.val)} if run.val is not None else {}),
            "test": len(run.test),
        }
        track.log_datasets(Path.cwd(), data.classifier_dataset, run.tags["data_sha256"], images)
        ema = ema_of(run.model, cfg.ema_decay)
        started = time.perf_counter()
        history = fit(run, on_epoch=on_epoch, ema=ema)
        distributed.leave(run.world)
        wall = time.perf_counter() - started
        metrics, inference = shipped_metrics(run, history, ema, out)
        train_seconds = sum(r["epoch_seconds"] for r in history)
        metrics.update(
            params=logged_params["params_count"],  # counted before training: airbench freezes a bias in it
            epochs=cfg.epochs,
            train_seconds=train_seconds,
            s_per_epoch=train_seconds / len(history),
            test_images=len(run.test),
            device=str(run.device),
        )
        write_metrics(run, metrics, wall)
        publish(run, metrics, inference, logged_params, out, history_path, tracked)
    print(
        f"[train-{name}] monitoring test accuracy {metrics['monitor_test_acc']:.4f} ({run.precision}; evaluate "
        f"scores the shipped weights) in {train_seconds:.1f} s"
    )


def set_up(family: ClassifierFamily) -> Run:
    """Start the stage (and, with dist.nproc > 1, its ranks), seed, load the splits, build the model."""
    ctx = start(f"train-{family.name}")
    params = ctx.params
    distributed.relaunch(params.dist.nproc)  # dist.nproc > 1: this process becomes torchrun
    world, device = distributed.join(params.dist.nnodes, params.dist.nproc, ctx.device)
    rng = seed_everything(params.seed, device, params.deterministic)
    cfg = params.classifier(family.name)
    data = params.data
    precision = resolve_precision(cfg.precision, device)
    x, y, classes = load_subset(data.classifier_dataset, "train", data.train_fraction, params.seed, device)
    test = DeviceData(*load_subset(data.classifier_dataset, "test", data.test_fraction, params.seed, device)[:2])
    policy = Policy.from_json(json.loads(POLICY.read_text()))
    model, train, val, augmenter = setup(family, params, device, rng, x, y, policy)
    lr = params.learning_rate(family.name)
    tags = run_tags(ctx, data.classifier_dataset)
    # The resume fingerprint: everything that shapes the result (checkpoint.py adds the code).
    fingerprint = checkpoint.fingerprint(
        params.digest("seed", "lr", "data", family.name),
        policy.to_json(),
        tags["data_sha256"],
        ctx.threads,
        precision,
        world.size,
        params.deterministic,
    )
    return Run(
        family, ctx, world, device, rng, precision, model, train, val, test, classes, augmenter, policy, lr, tags,
        fingerprint,
    )  # fmt: skip


def fit(run: Run, *, on_epoch=None, ema=None, progress: bool = True) -> list[dict]:
    """The library's loop on this run, checkpointed to checkpoints/<name>.pt."""
    return fit_classifier(
        run.model,
        run.train,
        run.val,
        run.test,
        run.augmenter,
        run.cfg,
        run.lr,
        run.rng,
        checkpoint=CHECKPOINTS / f"{run.name}.pt",
        fingerprint=run.fingerprint,
        on_epoch=on_epoch,
        progress=progress,
        world=run.world,
        ema=ema,
    )


def run_params(run: Run) -> dict:
    """The MLflow run's params: the recipe and what it resolved to, the data and its sizes."""
    cfg, data, params = run.cfg, run.params.data, run.params
    return {
        **cfg.model_dump(),
        "model": run.name,
        "arch": cfg.architecture(),
        "lr": run.lr,
        "lr_base": params.lr,
        "seed": params.seed,
        "threads": run.ctx.threads,
        "world_size": run.world.size,
        "precision_resolved": run.precision,
        "deterministic": params.deterministic,
        "attention_kernel": attention_backend(run.device, run.amp, cfg.cpu_attention),
        "dataset": data.classifier_dataset,
        "train_fraction": data.train_fraction,
        "val_fraction": data.val_fraction,
        "test_fraction": data.test_fraction,
        "train_images": len(run.train),
        "val_images": len(run.val) if run.val is not None else 0,
        "test_images": len(run.test),
        "params_count": count_parameters(run.model),
        **{f"augment.{k}": v for k, v in run.augmenter.policy.to_json().items() if k != "dataset"},
    }


def shipped_metrics(run: Run, history: list[dict], ema, out: Path) -> tuple[dict, torch.nn.Module]:
    """The figures of the weights that ship (training/shipping.py: with a validation split, the best
    validation epoch's, which fit_classifier left the model holding; without one, the last; or the weights'
    average `ema`), and the model as evaluate and the served model run it. The test split only reports."""
    val = run.val
    shipped = shipped_row(history, validated=val is not None)
    metrics = {
        "monitor_test_acc": shipped["test_acc"],
        "monitor_test_loss": shipped["test_loss"],
        "train_acc": shipped["train_acc"],
        "train_loss": shipped["train_loss"],
    }
    inference = for_inference(run.model, run.cfg.tta)
    if run.cfg.tta != "none":
        metrics.update(tta_metrics(run, inference, shipped))
    if val is not None:
        metrics.update(
            val_acc=shipped["val_acc"],
            val_loss=shipped["val_loss"],
            best_val_acc=shipped["val_acc"],
            best_val_epoch=shipped["epoch"],
        )
    shipped_epoch, shipped_why = shipped["epoch"], why_row_ships(validated=val is not None)
    if ema is not None:  # the average after the last epoch, scored beside the weights that ship
        ema_shipped = score_ema(run, ema, shipped, metrics, out, len(history))
        if ema_shipped is not None:
            shipped_epoch, shipped_why = ema_shipped
    if val is not None:  # what the registry's gate compares scores on (registry.promote)
        data = run.params.data
        metrics["val_split"] = (
            f"{data.classifier_dataset} {run.tags['data_sha256'][:12]}, train_fraction {data.train_fraction}, "
            f"val_fraction {data.val_fraction}, seed {run.params.seed}"
        )
    metrics.update(shipped_epoch=shipped_epoch, shipped_why=shipped_why, epochs_trained=len(history))
    return metrics, inference


def tta_metrics(run: Run, inference: torch.nn.Module, shipped: dict) -> dict:
    """What evaluate and the served model compute: the shipped weights under test-time augmentation."""
    cfg = run.cfg
    tta_started = time.perf_counter()
    measured = evaluate(
        inference, run.test, run.augmenter, cfg.eval_batch_size, run.amp, cpu_attention=cfg.cpu_attention
    )
    return dict(
        monitor_test_acc=measured["acc"],
        monitor_test_loss=measured["loss"],
        monitor_test_acc_plain=shipped["test_acc"],
        tta=cfg.tta,
        tta_seconds=time.perf_counter() - tta_started,
    )


def score_ema(
    run: Run, ema: torch.optim.swa_utils.AveragedModel, shipped: dict, metrics: dict, out: Path, epochs_trained: int
) -> tuple[int, str] | None:
    """Score the weights' average after the last epoch beside the `shipped` row's weights and save it; when
    it validates better than they did, ship it instead (into the model and `metrics`) and return its
    (shipped_epoch, shipped_why); None when the row's weights still ship."""
    cfg, val, test = run.cfg, run.val, run.test
    averaged = {
        split: evaluate(
            for_inference(ema.module, cfg.tta),
            images,
            run.augmenter,
            cfg.eval_batch_size,
            run.amp,
            cpu_attention=cfg.cpu_attention,
        )  # fmt: skip
        for split, images in (("val", val), ("test", test))
        if images is not None
    }
    if "val" in averaged:
        metrics["ema_val_acc"] = averaged["val"]["acc"]
    metrics["monitor_ema_test_acc"] = averaged["test"]["acc"]  # evaluate's is ema_accuracy
    torch.save(ema.module.state_dict(), out / EMA_WEIGHTS)
    # Judged as the epochs are (without test-time augmentation).
    plain = (
        averaged.get("val")
        if cfg.tta == "none" or val is None
        else evaluate(ema.module, val, run.augmenter, cfg.eval_batch_size, run.amp, cpu_attention=cfg.cpu_attention)
    )
    if not ema_ships(plain, shipped=shipped):
        return None
    run.model.load_state_dict(ema.module.state_dict())
    metrics.pop("monitor_test_acc_plain", None)
    metrics.update(
        monitor_test_acc=averaged["test"]["acc"],
        monitor_test_loss=averaged["test"]["loss"],
        val_acc=plain["acc"],
        val_loss=plain["loss"],
    )
    why = why_ema_ships(
        ema_decay=cfg.ema_decay, epoch=epochs_trained, ema_val_acc=plain["acc"], best_val_acc=shipped["val_acc"]
    )
    return epochs_trained, why


def write_metrics(run: Run, metrics: dict, wall: float) -> None:
    """The whole record for the report and the card; the few numbers a person compares across experiments
    (`dvc exp show`, `dvc metrics diff`) in the stage's metrics file; the run-level figures to MLflow."""
    write_json(METRICS / run.name / SUMMARY, metrics)
    write_json(METRICS / f"{run.name}.json", {k: metrics[k] for k in HEADLINE if k in metrics}, sort_keys=False)
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
    if run.cfg.tta != "none":  # the per-epoch test_acc is without it
        run_level["monitor_tta_test_acc"] = metrics["monitor_test_acc"]
    track.log_metrics({"wall_seconds": wall, **run_level}, step=run.cfg.epochs)


def publish(run, metrics, inference, logged_params, out: Path, history_path: Path, tracked) -> None:
    """The shipped weights, their card, and the served model logged and registered in MLflow."""
    name, classes = run.name, run.classes
    torch.save(run.model.state_dict(), out / "model.pt")
    card = cards.classifier_card(
        name, run.params, metrics, classes, run.family.describe(run.cfg, num_classes=len(classes))
    )
    (out / "card.md").write_text(card)
    track.log_artifacts(out / "card.md", history_path)
    served = RawImageClassifier(inference, mean=run.policy.mean, std=run.policy.std)
    registered = REGISTERED_MODELS[name]
    logged = track.log_model(
        served,
        name=name,
        example=run.test.x[:2],
        description=card,
        params=logged_params,
        step=metrics["shipped_epoch"],  # the model's metrics: those of the epoch whose weights ship
        run_tags=run.tags,
        metadata={
            "classes": classes,
            "input": "uint8 images (N, C, H, W) in [0, 255]",
            "output": "class probabilities (N, classes)",
        },
        registered_model_name=registered,
    )
    track.write_run_ref(out / "run.json", tracked, logged, registered)
