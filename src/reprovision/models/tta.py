"""Test-time augmentation: what a classifier's `tta` param makes evaluate and the served model compute.

airbench's levels (legacy/airbench94.py, `infer`): "mirror" averages the logits of the image and its
mirror; "mirror_translate" averages that with the same over the image shifted one pixel up-left and
one pixel down-right (reflect padding), i.e. 6 forward passes per image. In training mode the model
is called as it is (training never sees this wrapper's views).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class AveragedViews(nn.Module):
    def __init__(self, model: nn.Module, *, views: str) -> None:
        super().__init__()
        if views not in ("mirror", "mirror_translate"):
            raise ValueError(f"tta = {views!r}: allowed none, mirror, mirror_translate")
        self.model, self.views = model, views

    def _mirror(self, x: Tensor) -> Tensor:
        return 0.5 * self.model(x) + 0.5 * self.model(x.flip(-1))

    def forward(self, x: Tensor) -> Tensor:
        if self.model.training:  # the wrapped model's mode, so that wrapping an evaluating model averages
            return self.model(x)
        logits = self._mirror(x)
        if self.views == "mirror":
            return logits
        h, w = x.shape[-2:]
        padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
        shifted = 0.5 * self._mirror(padded[..., :h, :w]) + 0.5 * self._mirror(padded[..., 2 : h + 2, 2 : w + 2])
        return 0.5 * logits + 0.5 * shifted


def for_inference(model: nn.Module, tta: str) -> nn.Module:
    """`model` as evaluate and the served model run it: wrapped in its test-time augmentation, if any."""
    return model if tta == "none" else AveragedViews(model, views=tta)
