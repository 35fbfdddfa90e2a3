"""Training the judge: the LeNet MNIST classifier whose features measure GAN quality (gan_metrics.py)."""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from reprovision.config import JudgeConfig
from reprovision.data.pixels import to_pm1
from reprovision.models.judge import LeNet

IMAGE_SHAPE = (1, 28, 28)
EVAL_BATCH = 1000


def _check_uint8_split(x: Tensor, y: Tensor, name: str) -> None:
    if x.dtype != torch.uint8 or x.dim() != 4 or tuple(x.shape[1:]) != IMAGE_SHAPE:
        raise ValueError(
            f"{name}_x: expected uint8 MNIST images of shape (N, 1, 28, 28), got {x.dtype} {tuple(x.shape)}; "
            f"pass the arrays of the fetch-data stage unscaled"
        )
    if y.dim() != 1 or len(y) != len(x) or y.is_floating_point():
        raise ValueError(f"{name}_y: expected {len(x)} integer labels, got {y.dtype} {tuple(y.shape)}")


@torch.no_grad()
def _evaluate(model: LeNet, x: Tensor, y: Tensor) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of `model` on uint8 images `x`."""
    model.eval()
    sums = torch.zeros(2, device=x.device)  # summed loss, correct
    for images, labels in zip(x.split(EVAL_BATCH), y.split(EVAL_BATCH)):
        logits = model(to_pm1(images))
        sums += torch.stack([F.cross_entropy(logits, labels, reduction="sum"), (logits.argmax(1) == labels).sum()])
    loss, correct = sums.tolist()
    return loss / len(x), correct / len(x)


def fit_judge(
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    test_y: Tensor,
    cfg: JudgeConfig,
    device: torch.device,
    generator: torch.Generator,
    progress: bool = True,
) -> tuple[LeNet, list[dict]]:
    """Train the judge with Adam on uint8 (N, 1, 28, 28) MNIST; returns it in eval mode and per-epoch history."""
    _check_uint8_split(train_x, train_y, "train")
    _check_uint8_split(test_x, test_y, "test")
    # The whole data set fits on any device as uint8 (47 MB): batches are index gathers, no DataLoader.
    train_x, test_x = train_x.to(device), test_x.to(device)
    train_y, test_y = train_y.to(device, torch.int64), test_y.to(device, torch.int64)
    history = []
    # Weight initialisation draws from the global RNG: seeding it from `generator` makes the judge
    # a function of (data, cfg, generator); the fork leaves the caller's random stream as it was.
    seed = int(torch.randint(2**62, (1,), generator=generator, device=generator.device))
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LeNet().to(device)
        optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
        for epoch in range(1, cfg.epochs + 1):
            model.train()
            started = time.perf_counter()
            sums = torch.zeros(2, device=device)  # summed loss, correct; read once per epoch
            order = torch.randperm(len(train_x), generator=generator, device=generator.device).to(device)
            batches = order.split(cfg.batch_size)
            for idx in tqdm(batches, desc=f"judge {epoch}/{cfg.epochs}", leave=False, disable=not progress):
                labels = train_y[idx]
                logits = model(to_pm1(train_x[idx]))
                loss = F.cross_entropy(logits, labels)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                with torch.no_grad():
                    sums += torch.stack([loss * len(idx), (logits.argmax(1) == labels).sum()])
            train_loss, train_correct = sums.tolist()  # .tolist() waits for the device: the timing is honest
            seconds = time.perf_counter() - started
            test_loss, test_acc = _evaluate(model, test_x, test_y)
            row = {
                "epoch": epoch,
                "train_loss": train_loss / len(train_x),
                "train_acc": train_correct / len(train_x),
                "test_loss": test_loss,
                "test_acc": test_acc,
                "epoch_seconds": seconds,
            }
            history.append(row)
            if progress:
                print(
                    f"judge epoch {epoch} | train loss {row['train_loss']:.4f} acc {row['train_acc']:.4f} | "
                    f"test loss {test_loss:.4f} acc {test_acc:.4f} | {seconds:.1f} s",
                    flush=True,
                )
    return model.eval(), history
