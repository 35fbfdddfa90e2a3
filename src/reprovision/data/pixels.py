"""Pixel ranges: the uint8 images of the fetch-data stage, as the GANs and the judge see them."""

from __future__ import annotations

import torch


def to_pm1(x_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [-1, 1], the range of the generators' Tanh."""
    if x_uint8.dtype != torch.uint8:
        raise TypeError(f"to_pm1 expects uint8 pixels in [0, 255], got dtype {x_uint8.dtype}")
    return x_uint8.float().div_(127.5).sub_(1.0)
