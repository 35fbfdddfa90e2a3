"""SimCLR (Chen et al. 2020): self-supervised pre-training of an image encoder, for R4's linear probe.

Why SimCLR among the standard methods for small images: one network and one loss (no momentum
encoder as in BYOL, no stop-gradient asymmetry as in SimSiam), a loss that can be checked by hand
(NT-Xent is a cross-entropy over cosine similarities), and the CIFAR-10 recipe is published with it.

- `two_views`: two random views of each image, as batched tensor ops on the images' device (in the
  style of augment.py): random resized crop with a flip (one `grid_sample`), colour jitter and
  grayscale, every parameter drawn per image from one `torch.Generator`.
- `nt_xent`: the normalised-temperature cross-entropy over the 2N views of a batch.
- `fit_simclr`: the loop, checkpointed every epoch and resumed bit for bit (as fit_classifier).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from reprovision.config import SSLConfig
from reprovision.core.runtime import autocast_dtype
from reprovision.data.augment import Policy
from reprovision.training.loop import Epochs, load_into, state_of

# RGB -> YIQ: a hue shift is a rotation of the (I, Q) chroma plane, a linear op on the whole batch
# (the usual approximation of rotating H in HSV, e.g. Pillow's and TensorFlow's image ops differ too).
_RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_GRAY = (0.299, 0.587, 0.114)  # ITU-R 601 luma, as torchvision's rgb_to_grayscale


@dataclass(frozen=True)
class ViewParams:
    """SimCLR's CIFAR-10 augmentation (appendix B.9 of the paper), from the `ssl` section."""

    crop_scale_min: float = 0.2  # random resized crop: area fraction in [min, 1], aspect ratio in [3/4, 4/3]
    jitter: float = 0.4  # brightness, contrast and saturation factors in [1 - s, 1 + s]
    hue: float = 0.1  # hue shift in turns, in [-hue, hue]
    jitter_prob: float = 0.8
    grayscale_prob: float = 0.2

    @classmethod
    def of(cls, cfg: SSLConfig) -> ViewParams:
        return cls(cfg.crop_scale_min, cfg.jitter, cfg.hue, cfg.jitter_prob, cfg.grayscale_prob)


def _uniform(generator: torch.Generator, n: int, low: float, high: float, device: torch.device) -> torch.Tensor:
    return (torch.rand(n, generator=generator, device=generator.device) * (high - low) + low).to(device)


def resized_crop_flip(x: torch.Tensor, scale_min: float, generator: torch.Generator) -> torch.Tensor:
    """Per image: a window of area fraction U(scale_min, 1) and aspect ratio log-U(3/4, 4/3) at a uniform
    place, mirrored left-right with probability 1/2, resized back to H x W (bilinear), in one grid_sample."""
    n, device = x.shape[0], x.device
    area = _uniform(generator, n, scale_min, 1.0, device)
    log_ratio = _uniform(generator, n, math.log(3 / 4), math.log(4 / 3), device)
    # Width and height as fractions of the image's, clipped to it (torchvision retries instead).
    w = (area * log_ratio.exp()).sqrt().clamp(max=1.0)
    h = (area / log_ratio.exp()).sqrt().clamp(max=1.0)
    cx = _uniform(generator, n, -1.0, 1.0, device) * (1 - w)  # centre, in grid coordinates [-1, 1]
    cy = _uniform(generator, n, -1.0, 1.0, device) * (1 - h)
    flip = torch.where(_uniform(generator, n, 0.0, 1.0, device) < 0.5, -1.0, 1.0)
    zero = torch.zeros_like(w)
    theta = torch.stack([torch.stack([w * flip, zero, cx], 1), torch.stack([zero, h, cy], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def _gray(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(1)
    return (_GRAY[0] * r + _GRAY[1] * g + _GRAY[2] * b).unsqueeze(1)


def colour_jitter(x: torch.Tensor, p: ViewParams, generator: torch.Generator) -> torch.Tensor:
    """Brightness, contrast, saturation and hue, in that order (torchvision's ColorJitter shuffles the
    order per call), each factor drawn per image, applied to a `jitter_prob` share of the images; then
    grayscale for a `grayscale_prob` share. `x`: RGB floats in [0, 1]."""
    n, device = x.shape[0], x.device
    per_image = lambda t: t.view(n, 1, 1, 1)  # noqa: E731
    low, high = 1 - p.jitter, 1 + p.jitter
    brightness, contrast, saturation = (per_image(_uniform(generator, n, low, high, device)) for _ in range(3))
    hue = _uniform(generator, n, -p.hue, p.hue, device) * 2 * math.pi
    jittered = (x * brightness).clamp(0, 1)
    mean = _gray(jittered).mean(dim=(1, 2, 3), keepdim=True)
    jittered = ((jittered - mean) * contrast + mean).clamp(0, 1)
    gray = _gray(jittered)
    jittered = ((jittered - gray) * saturation + gray).clamp(0, 1)
    yiq = torch.einsum("ij,njhw->nihw", _RGB_TO_YIQ.to(x), jittered)
    cos, sin = per_image(hue.cos()), per_image(hue.sin())
    i, q = yiq[:, 1:2], yiq[:, 2:3]
    yiq = torch.cat([yiq[:, :1], cos * i - sin * q, sin * i + cos * q], 1)
    jittered = torch.einsum("ij,njhw->nihw", torch.linalg.inv(_RGB_TO_YIQ).to(x), yiq).clamp(0, 1)
    x = torch.where(per_image(_uniform(generator, n, 0.0, 1.0, device) < p.jitter_prob), jittered, x)
    to_gray = per_image(_uniform(generator, n, 0.0, 1.0, device) < p.grayscale_prob)
    return torch.where(to_gray, _gray(x).expand_as(x), x)


def view(x_uint8: torch.Tensor, policy: Policy, p: ViewParams, generator: torch.Generator) -> torch.Tensor:
    """One random view of each uint8 image, normalised with the dataset's statistics (as the classifiers see images)."""
    x = resized_crop_flip(x_uint8.float() / 255, p.crop_scale_min, generator).clamp(0, 1)
    if x.shape[1] == 3:  # colour ops need colour
        x = colour_jitter(x, p, generator)
    mean = torch.tensor(policy.mean, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(policy.std, device=x.device).view(1, -1, 1, 1)
    return (x - mean) / std


def two_views(x_uint8: torch.Tensor, policy: Policy, p: ViewParams, generator: torch.Generator) -> torch.Tensor:
    """(2N, C, H, W): rows i and N + i are two views of image i."""
    return torch.cat([view(x_uint8, policy, p, generator), view(x_uint8, policy, p, generator)])


def partners(n: int, device: torch.device) -> torch.Tensor:
    """For the 2N rows of two stacked views of N images, each row's partner: i <-> N + i."""
    return torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(device)


def nt_xent(z: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent over 2N projections, rows i and N + i the positive pairs: for each row, the cross-entropy of
    picking its partner among the 2N - 1 others by cosine similarity / temperature; the mean over rows."""
    n = z.shape[0] // 2
    z = F.normalize(z.float(), dim=1)
    logits = z @ z.T / temperature
    logits = logits.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    return F.cross_entropy(logits, partners(n, z.device))


class SimCLR(nn.Module):
    """Encoder (features of `features` dimensions) + SimCLR's projection head, Linear-BN-ReLU-Linear;
    the head is dropped after pre-training, the probe reads the encoder's features."""

    def __init__(self, encoder: nn.Module, *, features: int, hidden: int, out: int):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Sequential(
            nn.Linear(features, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


def build_optimizer(model: nn.Module, cfg: SSLConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
    optimizer = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return optimizer(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


def fit_simclr(
    model: SimCLR,
    images: torch.Tensor,
    policy: Policy,
    cfg: SSLConfig,
    generator: torch.Generator,
    checkpoint: Path | None = None,
    fingerprint: str = "",
    on_epoch: Callable[[dict], None] | None = None,
    progress: bool = True,
) -> list[dict]:
    """SimCLR on uint8 `images` (no labels) for cfg.epochs, cosine-decayed lr; one row per epoch:
    the NT-Xent loss and how often a view's nearest other view is its partner (`pair_acc`)."""
    device = images.device
    amp = autocast_dtype(cfg.precision, device)
    # Every batch full: NT-Xent's difficulty depends on the batch size (a short last batch would be easier).
    steps = max(len(images) // cfg.batch_size, 1)
    batch = min(cfg.batch_size, len(images))
    optimizer = build_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs * steps)
    params = ViewParams.of(cfg)
    loop = Epochs(
        cfg.epochs,
        checkpoint=checkpoint,
        fingerprint=fingerprint,
        generator=generator,
        device=device,
        on_epoch=on_epoch,
    )
    parts = {"model": model, "optimizer": optimizer, "scheduler": scheduler}
    loop.resume(lambda state: load_into(parts, state))
    for epoch in loop.epochs():
        model.train()
        started = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        hits = torch.zeros((), device=device)
        perm = torch.randperm(len(images), device=generator.device, generator=generator).to(device)
        for step in tqdm(range(steps), desc=f"epoch {epoch}/{cfg.epochs}", leave=False, disable=not progress):
            x = two_views(images[perm[step * batch : (step + 1) * batch]], policy, params, generator)
            x = x.contiguous(memory_format=torch.channels_last)  # as the encoder's weights (the stage): 1.2-2x on CPU
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                z = model(x)
            loss = nt_xent(z, cfg.temperature)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            with torch.no_grad():
                zn = F.normalize(z.detach().float(), dim=1)
                similarity = (zn @ zn.T).fill_diagonal_(-2)
                hits += (similarity.argmax(1) == partners(len(zn) // 2, device)).sum()
            loss_sum += loss.detach()
        seconds = time.perf_counter() - started
        row = {
            "epoch": epoch,
            "loss": loss_sum.item() / steps,
            "pair_acc": hits.item() / (2 * batch * steps),
            "epoch_seconds": seconds,
            "lr": optimizer.param_groups[0]["lr"],
        }
        print(
            f"epoch {epoch:3d} | nt-xent {row['loss']:.4f} | pair acc {row['pair_acc']:.4f} | {seconds:6.2f} s",
            flush=True,
        )
        loop.end_epoch(row, complete=epoch == cfg.epochs, state=lambda: state_of(parts))
    return loop.history
