"""airbench94: the network of KellerJordan/cifar10-airbench (legacy/airbench94.py), 94.01 % mean on CIFAR-10.

A frozen 2x2 patch-whitening convolution computed from training images, then three groups of
(Conv3x3, MaxPool, BN, GELU, Conv3x3, BN, GELU) of widths 64/256/256, MaxPool 3, a bias-free linear
layer and a fixed 1/9 scale. Its BatchNorms train only their biases (the weights stay 1). The rest
of its recipe (Nesterov SGD with a raised lr on BN biases, label smoothing 0.2, the lookahead, the
warm-up/decay schedule, alternating flips, translate 2, test-time augmentation) is params.yaml's
`airbench94` recipe for the shared loop; README "Recipes" names it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

WIDTHS = (64, 256, 256)
BATCHNORM_MOMENTUM = 0.6  # airbench's convention: the running statistics keep 0.6 of themselves
SCALING_FACTOR = 1 / 9
WHITEN_KERNEL = 2
WHITEN_EPS = 5e-4
WHITEN_IMAGES = 5000  # airbench whitens from the first 5,000 training images
WHITEN_BIAS_EPOCHS = 3  # the whitening layer's bias trains this many epochs, then freezes


class BatchNorm(nn.BatchNorm2d):
    def __init__(self, features: int) -> None:
        super().__init__(features, eps=1e-12, momentum=1 - BATCHNORM_MOMENTUM)
        self.weight.requires_grad = False  # stays 1: only the bias trains


class Conv(nn.Conv2d):
    """A bias-free 3x3 'same' convolution initialised partly as the identity (airbench's dirac init)."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__(c_in, c_out, kernel_size=3, padding="same", bias=False)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        torch.nn.init.dirac_(self.weight.data[: self.weight.size(1)])


class ConvGroup(nn.Module):
    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv1 = Conv(c_in, c_out)
        self.pool = nn.MaxPool2d(2)
        self.norm1 = BatchNorm(c_out)
        self.conv2 = Conv(c_out, c_out)
        self.norm2 = BatchNorm(c_out)
        self.activ = nn.GELU()

    def forward(self, x: Tensor) -> Tensor:
        x = self.activ(self.norm1(self.pool(self.conv1(x))))
        return self.activ(self.norm2(self.conv2(x)))


class Airbench94(nn.Module):
    def __init__(self, *, channels: int = 3, num_classes: int = 10) -> None:
        super().__init__()
        whiten_width = 2 * channels * WHITEN_KERNEL**2
        self.whiten = nn.Conv2d(channels, whiten_width, WHITEN_KERNEL, padding=0, bias=True)
        self.whiten.weight.requires_grad = False
        nn.init.zeros_(self.whiten.bias)
        self.groups = nn.Sequential(
            ConvGroup(whiten_width, WIDTHS[0]), ConvGroup(WIDTHS[0], WIDTHS[1]), ConvGroup(WIDTHS[1], WIDTHS[2])
        )
        self.pool = nn.MaxPool2d(3)
        self.head = nn.Linear(WIDTHS[2], num_classes, bias=False)
        self.activ = nn.GELU()

    @property
    def gradcam_layer(self) -> nn.Module:
        return self.groups[-1]

    def forward(self, x: Tensor) -> Tensor:
        x = self.groups(self.activ(self.whiten(x)))
        return self.head(self.pool(x).flatten(1)) * SCALING_FACTOR

    @torch.no_grad()
    def init_from_images(self, images: Tensor, normalize: Callable[[Tensor], Tensor]) -> None:
        """Set the whitening filters from the training images (uint8, N, C, H, W): the first WHITEN_IMAGES
        of them, normalised, in float64 on the CPU and in a fixed order, so every device gets the same bits."""
        images = normalize(images[:WHITEN_IMAGES]).to("cpu", torch.float64)
        c, k = images.shape[1], WHITEN_KERNEL
        covariance = torch.zeros(c * k * k, c * k * k, dtype=torch.float64)
        count = 0
        for chunk in images.split(500):
            patches = chunk.unfold(2, k, 1).unfold(3, k, 1).transpose(1, 3).reshape(-1, c * k * k)
            covariance += patches.T @ patches
            count += len(patches)
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance / count, UPLO="U")
        eigenvalues, eigenvectors = eigenvalues.flip(0).view(-1, 1, 1, 1), eigenvectors.T.reshape(-1, c, k, k).flip(0)
        scaled = eigenvectors / torch.sqrt(eigenvalues + WHITEN_EPS)
        self.whiten.weight.copy_(torch.cat((scaled, -scaled)).to(self.whiten.weight))

    def start_epoch(self, epoch: int) -> None:
        """The whitening bias trains in the first WHITEN_BIAS_EPOCHS epochs (1-based), then freezes."""
        self.whiten.bias.requires_grad = epoch <= WHITEN_BIAS_EPOCHS
