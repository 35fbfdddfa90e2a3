"""GAN training: one loop for both reference GANs (R1 MLP GAN, R2 DCGAN).

Standard GAN objective with BCE on logits (numerically stable form of the sigmoid + BCE the
references used); the generator maximises log D(G(z)) (the non-saturating form, which is what
"BCE with real labels for G" computes). Like the classifier loop, images stay on the device as
uint8 and losses are accumulated on the device, read once per epoch.

Like the classifier loop (train.py), every epoch ends with an atomic checkpoint: both networks,
both optimisers, the data-order/noise generator, torch's global RNG (dropout draws from it), the
history so far and whatever per-epoch state the caller hands over (`extra`). A run killed mid-way
resumes from the last complete epoch and, on CPU, ends with exactly the weights and metrics of an
uninterrupted run. Only a checkpoint with the same fingerprint, not marked complete, is resumed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from reprovision.core.graphs import CapturedStep, capturable
from reprovision.data.pixels import to_pm1
from reprovision.training.loop import Epochs, load_into, state_of


def gan_optimizers(
    generator_net: torch.nn.Module, discriminator: torch.nn.Module, cfg, device: torch.device
) -> tuple[torch.optim.Adam, torch.optim.Adam]:
    """(opt_g, opt_d): Adam with the section's learning rates and betas (params.gan.<name>), fused on
    CUDA (one launch per update, and a step a CUDA graph can replay); torch's default elsewhere."""
    fast = {"fused": True} if device.type == "cuda" else {}
    betas = (cfg.beta1, cfg.beta2)
    return (
        torch.optim.Adam(generator_net.parameters(), lr=cfg.lr_g, betas=betas, **fast),
        torch.optim.Adam(discriminator.parameters(), lr=cfg.lr_d, betas=betas, **fast),
    )


def fit_gan(
    generator_net: torch.nn.Module,
    discriminator: torch.nn.Module,
    opt_g: torch.optim.Optimizer,
    opt_d: torch.optim.Optimizer,
    images: torch.Tensor,
    latent_dim: int,
    batch_size: int,
    epochs: int,
    rng: torch.Generator,
    on_epoch: Callable[[int, dict], None] | None = None,
    max_steps: int = 0,
    progress: bool = True,
    checkpoint: Path | None = None,
    fingerprint: str = "",
    extra: Callable[[], dict] | None = None,
    on_resume: Callable[[int, dict], None] | None = None,
    cuda_graphs: bool = True,
) -> list[dict]:
    """Train for `epochs` over the uint8 `images` (N,1,28,28) on their device; on_epoch(epoch, row) after each.

    With a `checkpoint` path, each epoch ends with a checkpoint written there, after on_epoch (so
    that what on_epoch adds to the row, and the caller's `extra()` state, are part of it). A
    resumable checkpoint (checkpoint.load: same `fingerprint`, not complete) is picked up first:
    on_resume(epoch, extra) hands the caller back its saved state, then the earlier rows are
    replayed through on_epoch (the caller tells a replayed epoch from a new one by on_resume's epoch).

    On CUDA the D + G update is replayed as one CUDA graph (graphs.py) unless `cuda_graphs` is False
    or an optimiser is one `graphs.capturable` refuses (e.g. not fused): then it runs eagerly.
    """
    device = images.device
    steps = len(images) // batch_size  # drop the ragged last batch: BatchNorm1d needs > 1 sample
    if max_steps:
        steps = min(steps, max_steps)
    parts = {"generator": generator_net, "discriminator": discriminator, "opt_g": opt_g, "opt_d": opt_d}
    loop = Epochs(
        epochs,
        checkpoint=checkpoint,
        fingerprint=fingerprint,
        generator=rng,
        device=device,
        on_epoch=(lambda row: on_epoch(row["epoch"], row)) if on_epoch is not None else None,
        hook_first=True,  # what on_epoch adds to the row is checkpointed
    )
    resumed = (lambda state: on_resume(state["epoch"], state.get("extra", {}))) if on_resume is not None else None
    loop.resume(lambda state: load_into(parts, state), resumed)
    checkpointed = lambda: state_of(parts) | {"extra": extra() if extra is not None else {}}  # noqa: E731
    eager_step = _gan_step(generator_net, discriminator, opt_g, opt_d)
    graphed = cuda_graphs and device.type == "cuda" and capturable([opt_g, opt_d]) is None
    captured = (
        CapturedStep(lambda real, z: (eager_step(real, z),), [generator_net, discriminator], [opt_g, opt_d])
        if graphed
        else None
    )
    for epoch in loop.epochs():
        generator_net.train()
        discriminator.train()
        started = time.perf_counter()
        sums = torch.zeros(4, device=device)  # d_loss, g_loss, D(x), D(G(z))
        perm = torch.randperm(len(images), device=device, generator=rng)
        for step in tqdm(range(steps), desc=f"epoch {epoch}/{epochs}", leave=False, disable=not progress):
            real = to_pm1(images[perm[step * batch_size : (step + 1) * batch_size]])
            z = torch.randn(batch_size, latent_dim, device=device, generator=rng)
            sums += captured(real, z)[0] if graphed else eager_step(real, z)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        means = (sums / steps).tolist()
        row = {"epoch": epoch, "d_loss": means[0], "g_loss": means[1], "d_real": means[2], "d_fake": means[3]}
        row["epoch_seconds"] = time.perf_counter() - started
        print(
            f"epoch {epoch:3d} | D loss {row['d_loss']:.4f} | G loss {row['g_loss']:.4f} | "
            f"D(x) {row['d_real']:.3f} D(G(z)) {row['d_fake']:.3f} | {row['epoch_seconds']:6.2f} s",
            flush=True,
        )
        loop.end_epoch(row, complete=epoch == epochs, state=checkpointed)
    return loop.history


def _gan_step(generator_net, discriminator, opt_g, opt_d) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """One D then one G update on (real images, z), on the device; returns (D loss, G loss, D(x), D(G(z)))."""

    def train_step(real: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        fake = generator_net(z)

        # Discriminator: real -> 1, fake -> 0.
        d_real = discriminator(real)
        d_fake = discriminator(fake.detach())
        d_loss = F.binary_cross_entropy_with_logits(
            d_real, torch.ones_like(d_real)
        ) + F.binary_cross_entropy_with_logits(d_fake, torch.zeros_like(d_fake))
        opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        opt_d.step()

        # Generator: make D call the fakes real.
        d_fake_for_g = discriminator(fake)
        g_loss = F.binary_cross_entropy_with_logits(d_fake_for_g, torch.ones_like(d_fake_for_g))
        opt_g.zero_grad(set_to_none=True)
        g_loss.backward()
        opt_g.step()

        with torch.no_grad():
            return torch.stack([d_loss, g_loss, torch.sigmoid(d_real).mean(), torch.sigmoid(d_fake).mean()])

    return train_step
