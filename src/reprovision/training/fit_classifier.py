"""The one classifier training loop, shared by the ViT and the CNN stages.

Fast path (airbench-style): the dataset lives on the device as uint8, batches are gathered by
index, augmentation runs as batched tensor ops, bf16 autocast where the device has it natively,
fused optimisers, and per-step metrics stay on the device: the host reads them once per epoch.

Every epoch ends with an atomic checkpoint (model, optimiser, scheduler, RNG states, history).
A run killed mid-way resumes from the last complete epoch and, on CPU, finishes with exactly
the metrics of an uninterrupted run. A checkpoint is only resumed when its fingerprint (the
params, data and code that produced it) matches, and never once it is marked complete.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from reprovision.config import TrainConfig
from reprovision.core.distributed import World, sum_over_ranks, sync_buffers, wrap
from reprovision.core.graphs import CapturedStep, capturable
from reprovision.core.runtime import attention_kernels, autocast_dtype, compiled_for_determinism
from reprovision.data.augment import BatchAugment
from reprovision.training.loop import Epochs
from reprovision.training.optim import SAM, Lookahead, build_optimizer, build_scheduler, clip_gradients
from reprovision.training.shipping import keep_best, restore_best, stops_early


@dataclass
class DeviceData:
    """A dataset split resident on the training device: uint8 images (N,C,H,W) and int64 labels."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)


def _autocast(device: torch.device, dtype: torch.dtype | None):
    # On CUDA without autocast's cache of cast weights, which a CUDA graph cannot hold (torch's
    # CUDA-graph notes); the cache saves work only when one weight is used twice in a forward.
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None, cache_enabled=device.type != "cuda")


@torch.no_grad()
def evaluate(
    model,
    data: DeviceData,
    augment: BatchAugment,
    batch_size: int,
    amp: torch.dtype | None,
    world: World = World(),
    cpu_attention: str = "default",
) -> dict[str, float]:
    """Mean loss and accuracy on `data`; with several ranks each evaluates its share and the sums are added."""
    model.eval()
    device = data.x.device
    mine = world.share(len(data))
    images, labels = data.x[mine], data.y[mine]
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    for start in range(0, len(labels), batch_size):
        x, _ = augment(images[start : start + batch_size], labels[start : start + batch_size], train=False)
        y = labels[start : start + batch_size]
        with _autocast(device, amp), attention_kernels(device, amp, cpu_attention):
            logits = model(x)
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum")
        correct += (logits.argmax(1) == y).sum()
    loss_sum, correct = sum_over_ranks(loss_sum, correct, world=world)
    return {"loss": loss_sum.item() / len(data), "acc": correct.item() / len(data)}


def eager_reason(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    cfg: TrainConfig,
    device: torch.device,
    world: World = World(),
    cuda_graphs: bool = True,
) -> str | None:
    """Why `fit_classifier` runs this training step eagerly instead of replaying it as a CUDA graph
    (graphs.py); None when it is captured. The recipe's own reasons come before the device's, so that a
    CPU names them too (benchmarks/gpu_check.py records the reason per option set)."""
    if not cuda_graphs:
        return "cuda_graphs off"
    if isinstance(optimizer, SAM):
        return "SAM's two passes per step"
    if cfg.compile:
        return "torch.compile"
    if getattr(model, "start_epoch", None) is not None:
        return "the model's start_epoch changes what trains"
    if world.size > 1:
        return "several ranks (DDP)"
    if device.type != "cuda":
        return f"no CUDA graphs on {device.type}"
    return capturable([optimizer])  # None: captured


def fit_classifier(
    model: torch.nn.Module,
    train: DeviceData,
    val: DeviceData | None,
    test: DeviceData,
    augment: BatchAugment,
    cfg: TrainConfig,
    lr: float,
    generator: torch.Generator,
    checkpoint: Path | None = None,
    fingerprint: str = "",
    on_epoch: Callable[[dict], None] | None = None,
    progress: bool = True,
    world: World = World(),
    cuda_graphs: bool = True,
    ema: torch.optim.swa_utils.AveragedModel | None = None,
) -> list[dict]:
    """Train for cfg.epochs; return one dict per epoch (the columns of the per-epoch table).

    `val` (None when no validation split is held out) is what decisions read; `test` is evaluated
    every epoch for R3's learning curve, and only reported. With `val`, the model ends holding the
    weights of its best validation epoch (the first of equals), which are what ships, and training
    stops early once `cfg.early_stop` epochs (0: never) have passed without a better one.
    With several ranks (`world`, see distributed.py) each trains on its share of every global batch
    of cfg.batch_size images; only rank 0 writes the checkpoint and prints; every rank returns the same history.

    A model may define `start_epoch(epoch)`, called before each epoch (airbench freezes a layer
    with it). `cfg.lookahead_every` > 0 adds airbench's lookahead (optim.Lookahead). `ema` (torch's
    AveragedModel of `model`, see train_classifier.py) is updated after every step and checkpointed.

    On one CUDA device the step is replayed as a CUDA graph (graphs.py) unless `cuda_graphs` is
    False or the step cannot be captured (several ranks, SAM's two passes, torch.compile, an
    optimiser `graphs.capturable` refuses, a model whose `start_epoch` changes what trains: `eager_reason`):
    then it runs eagerly.
    """
    device = train.x.device
    run = _Training.build(model, train, augment, cfg, lr, generator, world, ema)
    loop = Epochs(
        cfg.epochs,
        checkpoint=checkpoint,
        fingerprint=fingerprint,
        generator=generator,
        device=device,
        on_epoch=on_epoch,
        main=world.is_main,
    )
    loop.resume(restore=run.load_state_dict)
    graphed = eager_reason(model, run.optimizer, cfg, device, world, cuda_graphs) is None
    train_step = _train_step(run)
    step_fn = CapturedStep(train_step, [model], [run.optimizer]) if graphed else train_step
    for epoch in loop.epochs():
        *totals, train_seconds = run.train_epoch(epoch, step_fn, graphed, progress=progress and world.is_main)
        row = run.score(epoch, totals, val, test)
        row.update(epoch_seconds=train_seconds, lr=run.optimizer.param_groups[0]["lr"])
        run.best = keep_best(run.best, row=row, model=model)
        stop = stops_early(run.best, epoch=epoch, patience=cfg.early_stop)
        if world.is_main:
            shown = " | ".join(
                f"{split} loss {row[f'{split}_loss']:.4f} acc {row[f'{split}_acc']:.4f}"
                for split in ("train", "val", "test")
                if f"{split}_acc" in row
            )
            print(f"epoch {epoch:3d} | {shown} | {train_seconds:6.2f} s | lr {row['lr']:.2e}", flush=True)
        loop.end_epoch(row, complete=epoch == cfg.epochs or stop, state=run.state_dict)
        if stop:
            if world.is_main:
                print(f"early stop after epoch {epoch}: no better validation accuracy since epoch {run.best['epoch']}")
            break
    restore_best(model, run.best)  # what ships: the best validation epoch
    return loop.history


@dataclass
class _Training:
    """What one fit_classifier run steps, scores and checkpoints."""

    model: torch.nn.Module
    step_model: torch.nn.Module  # the model as a step runs it: wrapped for DDP, compiled
    train: DeviceData
    augment: BatchAugment
    cfg: TrainConfig
    generator: torch.Generator
    world: World
    amp: torch.dtype | None
    steps: int  # per epoch
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None
    lookahead: Lookahead | None
    ema: torch.optim.swa_utils.AveragedModel | None
    best: dict | None = None  # {"epoch", "val_acc", "model"}: the best validation epoch's weights (shipping.py)

    @classmethod
    def build(cls, model, train, augment, cfg, lr, generator, world, ema) -> _Training:
        device = train.x.device
        # A last batch that would leave a rank one image breaks BatchNorm's batch statistics; every
        # other remainder is used.
        steps = len(train) // cfg.batch_size + (len(train) % cfg.batch_size >= 2 * world.size)
        optimizer = build_optimizer(model, cfg, lr, device)
        scheduler = build_scheduler(optimizer, cfg, steps)
        lookahead = (
            Lookahead(model, every=cfg.lookahead_every, decay=cfg.lookahead_decay, total_steps=cfg.epochs * steps)
            if cfg.lookahead_every
            else None
        )
        step_model = wrap(model, world, device)
        step_model = compiled_for_determinism(step_model) if cfg.compile else step_model
        amp = autocast_dtype(cfg.precision, device)
        return cls(
            model, step_model, train, augment, cfg, generator, world, amp, steps, optimizer, scheduler, lookahead, ema
        )

    def state_dict(self) -> dict:
        """This run's part of the checkpoint (loop.py adds the random streams and the history)."""
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "best": self.best,
            "lookahead": self.lookahead.state_dict() if self.lookahead is not None else None,
            "ema": self.ema.state_dict() if self.ema is not None else None,
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.best = state["best"]
        if self.lookahead is not None:
            self.lookahead.load_state_dict(state["lookahead"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])

    def train_epoch(self, epoch: int, step_fn, graphed: bool, *, progress: bool) -> tuple:
        """One epoch of steps on this rank's shares: (summed loss, correct count, images seen, seconds)."""
        model, train, cfg, world, steps = self.model, self.train, self.cfg, self.world, self.steps
        device = train.x.device
        model.train()
        start_epoch = getattr(model, "start_epoch", None)
        if start_epoch is not None:
            start_epoch(epoch)
        started = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device)
        seen = 0
        perm = torch.randperm(len(train), device=device, generator=self.generator)
        bar = tqdm(range(steps), desc=f"epoch {epoch}/{cfg.epochs}", leave=False, disable=not progress)
        for step in bar:
            idx = perm[step * cfg.batch_size : (step + 1) * cfg.batch_size]
            y = train.y[idx]
            x, target = self.augment(train.x[idx], y, train=True, index=idx, epoch=epoch)  # the same on every rank
            weight = 1.0
            if world.size > 1:
                mine = world.share(len(idx))
                x, target, y = x[mine], target[mine], y[mine]
                # DDP averages the ranks' gradients: weighting each share's mean loss by its size
                # makes that average the gradient of the global batch's mean loss.
                weight = len(y) * world.size / len(idx)
            loss, hits = step_fn(x, target, y) if graphed else step_fn(x, target, y, weight)
            if self.scheduler is not None:
                self.scheduler.step()
            if self.lookahead is not None:
                self.lookahead.step((epoch - 1) * steps + step + 1)
            if self.ema is not None:
                self.ema.update_parameters(model)
            loss_sum += loss * len(y)
            correct += hits
            seen += len(y)
        if self.lookahead is not None and epoch == cfg.epochs:
            self.lookahead.finish()  # the weights that ship are the average (airbench)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return loss_sum, correct, seen, time.perf_counter() - started

    def score(self, epoch: int, totals: list, val: DeviceData | None, test: DeviceData) -> dict:
        """The epoch's row: the training figures (`totals` of train_epoch) summed over the ranks, then each
        split evaluated."""
        device = self.train.x.device
        loss_sum, correct, seen = totals
        loss_sum, correct, seen = sum_over_ranks(loss_sum, correct, torch.tensor(seen, device=device), world=self.world)
        sync_buffers(self.model, self.world)
        row = {"epoch": epoch, "train_loss": loss_sum.item() / seen.item(), "train_acc": correct.item() / seen.item()}
        splits = {"val": val, "test": test} if val is not None else {"test": test}
        for split, data in splits.items():
            cfg = self.cfg
            measured = evaluate(
                self.model, data, self.augment, cfg.eval_batch_size, self.amp, self.world, cfg.cpu_attention
            )
            row[f"{split}_loss"], row[f"{split}_acc"] = measured["loss"], measured["acc"]
        return row


def _train_step(run: _Training) -> Callable:
    """One update on the device, no host sync: (x, target, y, weight) -> the batch's mean loss and its correct
    count. `weight`: the share's part of the global batch's mean loss (1.0 alone)."""
    model, optimizer, cfg = run.model, run.optimizer, run.cfg
    device = run.train.x.device

    def loss_of(x, target):
        with _autocast(device, run.amp), attention_kernels(device, run.amp, cfg.cpu_attention):
            logits = run.step_model(x)
        return F.cross_entropy(logits.float(), target, label_smoothing=cfg.label_smoothing), logits

    def backward(loss, weight: float) -> None:
        (loss * weight if weight != 1.0 else loss).backward()

    def train_step(x, target, y, weight: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        loss, logits = loss_of(x, target)
        backward(loss, weight)
        if isinstance(optimizer, SAM):
            # SAM: ascend to w + e(w), take the gradient there, come back and step.
            clip_gradients(model, cfg.grad_clip)
            optimizer.first_step(zero_grad=True)
            backward(loss_of(x, target)[0], weight)
            clip_gradients(model, cfg.grad_clip)
            optimizer.second_step(zero_grad=True)
        else:
            clip_gradients(model, cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        # Accuracy against the original labels, also under CutMix/MixUp (the references' convention).
        return loss.detach(), (logits.detach().argmax(1) == y).sum()

    return train_step
