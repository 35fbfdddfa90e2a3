"""The trained models as people use them: raw pixels in, the preprocessing inside, answers out.

Each is logged in MLflow's pt2 format (a `torch.export` graph): `mlflow.pyfunc.load_model` and
`mlflow models serve` load it without this package and without unpickling code.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class RawImageClassifier(nn.Module):
    """uint8 images (N, C, H, W) in [0, 255] -> class probabilities (N, classes), float32.

    The normalisation the model was trained with is inside, as buffers: the arithmetic of
    augment.normalize, `(x / 255 - mean) / std`, so that it predicts what the pipeline predicts.
    """

    def __init__(self, model: nn.Module, *, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.to(torch.float32) / 255 - self.mean) / self.std
        return self.model(x).float().softmax(dim=-1)


class RawImageEncoder(RawImageClassifier):
    """uint8 images (N, C, H, W) in [0, 255] -> the encoder's features (N, features), float32."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model((images.to(torch.float32) / 255 - self.mean) / self.std).float()


class RawImageGenerator(nn.Module):
    """Latent vectors (N, latent_dim), float32 -> uint8 images (N, C, H, W) in [0, 255]."""

    def __init__(self, generator: nn.Module):
        super().__init__()
        self.generator = generator

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return ((self.generator(z).float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
