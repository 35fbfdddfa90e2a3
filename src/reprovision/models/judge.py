"""The judge: a LeNet-style MNIST classifier whose features and class posteriors score GANs.

FID and Inception Score need a network that knows digits; an ImageNet Inception does not
(and is not available offline), so FID/IS here are computed in this network's 128-d
penultimate space and softmax output. It sees images as the generators emit them: (B, 1, 28, 28)
in [-1, 1]. Adam 1e-3 takes it past 99% MNIST test accuracy in a few epochs.
"""

from __future__ import annotations

from torch import Tensor, nn


class LeNet(nn.Module):
    def __init__(self, num_classes: int = 10, feature_dim: int = 128) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 5), nn.ReLU(inplace=True), nn.MaxPool2d(2),  # 28 -> 24 -> 12
            nn.Conv2d(32, 64, 5), nn.ReLU(inplace=True), nn.MaxPool2d(2),  # 12 -> 8 -> 4
            nn.Flatten(),
            nn.Linear(64 * 4 * 4, feature_dim), nn.ReLU(inplace=True),
        )  # fmt: skip
        self.classifier = nn.Linear(feature_dim, num_classes)

    def features(self, x: Tensor) -> Tensor:
        """Penultimate activations (B, feature_dim), after the ReLU: the space FID is measured in."""
        if x.ndim != 4 or tuple(x.shape[1:]) != (1, 28, 28):
            raise ValueError(
                f"LeNet judge got input of shape {tuple(x.shape)}; "
                "pass MNIST-shaped images (B, 1, 28, 28) scaled to [-1, 1]"
            )
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))
