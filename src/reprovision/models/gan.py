"""The two reference GANs on MNIST: R1's MLP GAN and R2's (Keras) DCGAN, rebuilt in PyTorch.

Generators map noise (B, latent_dim) to images (B, 1, 28, 28) in [-1, 1] (Tanh). The
discriminators return LOGITS (B, 1), with no Sigmoid module: training applies
`BCEWithLogitsLoss`, which is the references' Sigmoid + BCE minimax loss computed in a
numerically stable form (log-sum-exp instead of log(sigmoid(x)), which underflows).
"""

from __future__ import annotations

import math
from functools import partial

from torch import Tensor, nn


class MLPGenerator(nn.Module):
    """R1: latent -> hidden... -> prod(out_shape), LeakyReLU(0.2), BatchNorm1d on all hidden layers but the first.

    At the defaults (latent 128 -> 128 -> 256 -> 512 -> 1024 -> 784, R1's layers as listed) it
    has 1,513,616 parameters. docs/references.md quotes 1,496,592 for "the layers as listed"; that figure is
    what the same network WITHOUT the 128-wide first hidden layer has (latent 128 -> 256 ->
    512 -> 1024 -> 784, i.e. hidden=(256, 512, 1024)); R1 itself states "~1.2M".
    """

    def __init__(
        self,
        latent_dim: int = 128,
        hidden: tuple[int, ...] = (128, 256, 512, 1024),
        out_shape: tuple[int, ...] = (1, 28, 28),
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.latent_dim = latent_dim
        self.out_shape = tuple(out_shape)
        layers: list[nn.Module] = []
        width = latent_dim
        for i, out in enumerate(hidden):
            layers.append(nn.Linear(width, out))
            if i > 0:  # R1 (like the common PyTorch-GAN MLP) leaves the first layer un-normalised
                layers.append(nn.BatchNorm1d(out))
            layers.append(nn.LeakyReLU(0.2, inplace=True))
            if dropout > 0:  # R1's variant: Dropout(0.3) in G's hidden layers
                layers.append(nn.Dropout(dropout))
            width = out
        layers += [nn.Linear(width, math.prod(out_shape)), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z).view(z.shape[0], *self.out_shape)


class MLPDiscriminator(nn.Module):
    """R1: flatten -> hidden... -> 1 logit, LeakyReLU(0.2) + Dropout; 533,505 parameters at the defaults."""

    def __init__(
        self, in_shape: tuple[int, ...] = (1, 28, 28), hidden: tuple[int, ...] = (512, 256), dropout: float = 0.6
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = math.prod(in_shape)
        for out in hidden:
            layers += [nn.Linear(width, out), nn.LeakyReLU(0.2, inplace=True), nn.Dropout(dropout)]
            width = out
        layers.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


# R2's DCGAN. Per-layer parameter counts in PyTorch vs the Keras summary R2 reports: dense,
# conv and transposed-conv layers match exactly; a BatchNorm layer has 2 trainable numbers per
# channel in PyTorch (weight, bias) where Keras's count is 4 (gamma, beta and the non-trainable
# moving mean and variance, which PyTorch keeps as buffers). So the generator's BNs count 25,088 /
# 256 / 128 here against Keras's 50,176 / 512 / 256, and the discriminator has 213,249 parameters
# against Keras's 213,633 (the difference, 384, is the running statistics of its 64 + 128 channels).


class DCGANGenerator(nn.Module):
    """noise -> Dense 7*7*256 -> BN -> ReLU -> (256, 7, 7) -> ConvT 128 (14x14) -> ConvT 64 (28x28) -> Conv 1, Tanh.

    `width` is the last transposed conv's channels (R2: 64); the layers before it have 2x and 4x.
    """

    def __init__(self, *, latent_dim: int = 100, width: int = 64) -> None:
        super().__init__()
        self.latent_dim = latent_dim
        self.width = width
        self.project = nn.Sequential(
            nn.Linear(latent_dim, 7 * 7 * 4 * width), nn.BatchNorm1d(7 * 7 * 4 * width), nn.ReLU(inplace=True)
        )
        # Keras's padding="same" with stride 2 doubles the size: PyTorch needs padding 2 plus
        # output_padding 1 for a 5x5 kernel ((7 - 1) * 2 - 2 * 2 + 5 + 1 = 14).
        self.upsample = nn.Sequential(
            nn.ConvTranspose2d(4 * width, 2 * width, 5, stride=2, padding=2, output_padding=1),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(inplace=True),
            nn.ConvTranspose2d(2 * width, width, 5, stride=2, padding=2, output_padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, 1, 5, padding=2),
            nn.Tanh(),
        )

    def forward(self, z: Tensor) -> Tensor:
        return self.upsample(self.project(z).view(-1, 4 * self.width, 7, 7))


class DCGANDiscriminator(nn.Module):
    """(1, 28, 28) -> Conv 64 s2 -> 14x14 -> Conv 128 s2 -> 7x7, each + BN + LeakyReLU(0.3) -> Dense 1 logit.

    `width` is the first conv's channels (R2: 64); the second has 2x.
    """

    def __init__(self, *, width: int = 64) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, width, 5, stride=2, padding=2),
            nn.BatchNorm2d(width),
            nn.LeakyReLU(0.3, inplace=True),
            nn.Conv2d(width, 2 * width, 5, stride=2, padding=2),
            nn.BatchNorm2d(2 * width),
            nn.LeakyReLU(0.3, inplace=True),
            nn.Flatten(),
            nn.Linear(2 * width * 7 * 7, 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def init_dcgan_weights(module: nn.Module, std: float = 0.02) -> None:
    """The DCGAN paper's init, for `model.apply`: weights ~ N(0, std), BN scale ~ N(1, std), biases 0."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
        nn.init.normal_(module.weight, 0.0, std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
        nn.init.normal_(module.weight, 1.0, std)
        nn.init.zeros_(module.bias)


def build_gan(name: str, cfg, image_shape: tuple[int, int, int]) -> tuple[nn.Module, nn.Module]:
    """(generator, discriminator) for "mlp" (R1, `cfg` = params.gan.mlp) or "dcgan" (R2, params.gan.dcgan)."""
    if name == "mlp":
        generator = MLPGenerator(
            latent_dim=cfg.latent_dim, hidden=tuple(cfg.g_hidden), out_shape=image_shape, dropout=cfg.g_dropout
        )
        return generator, MLPDiscriminator(in_shape=image_shape, hidden=tuple(cfg.d_hidden), dropout=cfg.d_dropout)
    if name == "dcgan":
        generator, discriminator = (
            DCGANGenerator(latent_dim=cfg.latent_dim, width=cfg.width),
            DCGANDiscriminator(width=cfg.width),
        )
        init = partial(init_dcgan_weights, std=cfg.init_std)
        return generator.apply(init), discriminator.apply(init)
    raise ValueError(f"unknown GAN {name!r}; allowed: 'mlp', 'dcgan'")
