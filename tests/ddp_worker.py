"""Trainings by fit_classifier on a tiny synthetic task, alone or as torchrun's ranks (test_distributed.py).

    torchrun --nproc-per-node=2 ... tests/ddp_worker.py OUT --models vit,cnn [--checkpoints DIR] [--pause-after EPOCH]

Every rank writes OUT/<model>-rank<k>.pt: its model's state_dict and the history fit returned. With
--checkpoints, each model checkpoints to DIR/<model>.pt. With --pause-after E, rank 0 writes
OUT/paused after epoch E's checkpoint and waits there: the moment a kill test kills the ranks.
`train` is also called in the test's own process, for the run of one process.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from reprovision.config import CNNConfig, ViTConfig  # noqa: E402
from reprovision.core import distributed, runtime  # noqa: E402
from reprovision.core.distributed import World  # noqa: E402
from reprovision.data.augment import BatchAugment, Policy  # noqa: E402
from reprovision.models.cnn import RefCNN  # noqa: E402
from reprovision.models.vit import build_vit  # noqa: E402
from reprovision.training.fit_classifier import DeviceData, fit_classifier  # noqa: E402

CPU = torch.device("cpu")
POLICY = Policy("tiny", (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), 2, True, 0.0, 1.0, 0.0, 0.2, 0.0, 8)
# 100 training images: with batches of 16 the last batch has 4, split 2 + 2 over two ranks.
IMAGES, CLASSES, EPOCHS = 100, 4, 3


def task() -> tuple[DeviceData, DeviceData]:
    g = torch.Generator().manual_seed(1)
    y = torch.arange(IMAGES + 40) % CLASSES
    # Each class a brightness band plus noise: learnable in a few steps, so the losses move.
    x = (y.view(-1, 1, 1, 1) * 50 + torch.randint(0, 80, (IMAGES + 40, 3, 16, 16), generator=g)).to(torch.uint8)
    return DeviceData(x[:IMAGES], y[:IMAGES]), DeviceData(x[IMAGES:], y[IMAGES:])


def train(name: str, world: World, checkpoint: Path | None = None, on_epoch=None) -> dict:
    """The model `name` trained for EPOCHS by this process (as `world`'s rank): weights and history."""
    rng = runtime.seed_everything(0, CPU)
    if name == "vit":  # LayerNorm and no dropout: nothing depends on how a batch is split.
        # SGD, so that the rounding differences of another split stay rounding-sized (Adam divides by
        # the root of tiny second moments: a 1e-8 difference of a near-zero gradient becomes a step).
        cfg = ViTConfig(
            epochs=EPOCHS,
            batch_size=16,
            eval_batch_size=16,
            depth=1,
            embed_dim=32,
            heads=2,
            patch_size=4,
            dropout=0.0,
            precision="fp32",
            scheduler="cosine",
            optimizer="sgd",
        )
        model = build_vit(cfg, num_classes=CLASSES, channels=3, image_size=16)
    else:
        cfg = CNNConfig(epochs=EPOCHS, batch_size=16, eval_batch_size=16, widths=[8, 16], hidden=16, precision="fp32")
        model = RefCNN(channels=3, num_classes=CLASSES, widths=(8, 16), hidden=16, dropout=0.0)
    train_data, test = task()
    history = fit_classifier(
        model,
        train_data,
        None,
        test,
        BatchAugment(POLICY, CLASSES, rng),
        cfg,
        1e-3,
        rng,
        checkpoint=checkpoint,
        fingerprint="ddp-worker",
        on_epoch=on_epoch,
        progress=False,
        world=world,
    )
    return {"model": model.state_dict(), "history": history, "world_size": world.size}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--models", default="vit,cnn")
    parser.add_argument("--checkpoints", type=Path)
    parser.add_argument("--pause-after", type=int, default=0)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    runtime.apply_threads(1)
    world, _ = distributed.join(1, int(os.environ["WORLD_SIZE"]), CPU)

    def pause(row: dict) -> None:
        if row["epoch"] == args.pause_after:
            (args.out / "paused").write_text(str(row["epoch"]))
            time.sleep(600)  # killed here by the test

    for name in args.models.split(","):
        checkpoint = args.checkpoints / f"{name}.pt" if args.checkpoints else None
        result = train(name, world, checkpoint, on_epoch=pause if world.is_main else None)
        torch.save(result, args.out / f"{name}-rank{world.rank}.pt")
    distributed.leave(world)


if __name__ == "__main__":
    main()
