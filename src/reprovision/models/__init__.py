"""The model zoo, one module per family, so that a stage imports only the architectures it runs:
vit.py (R3 ViT), cnn.py (R3 CNN, R4 ResNet-18 from resnet.py), gan.py (R1, R2), judge.py (LeNet).

A classifier family is a module here holding a `FAMILY = ClassifierFamily(...)`: what the pipeline
asks of it. A model it builds may also define `init_from_images(images, normalize)` (called once with
the uint8 training images before training: airbench's whitening) and `start_epoch(epoch)` (called
before each epoch by training/fit_classifier.py). Its params are a TrainConfig section of config.py;
classifiers.py lists the families. README "Add a model family" walks through a new one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from torch import nn


@dataclass(frozen=True, kw_only=True)
class ClassifierFamily:
    name: str  # its params.yaml section, its `train-<name>` stage, models/<name>/
    # (section, *, num_classes, channels, image_size) -> the untrained model
    build: Callable[..., nn.Module]
    # The evaluate stage's heat map: "gradcam" reads the model's `gradcam_layer` (the last feature map);
    # "rollout" rolls out the attention maps that `model(x, return_attention=True)` returns; None: no heat map.
    heatmap: Literal["gradcam", "rollout"] | None
    channels_last: bool  # train and evaluate in channels-last memory format (convolutions run faster)
    describe: Callable[..., str]  # (section, *, num_classes) -> the model card's architecture sentence


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters (BatchNorm running statistics are buffers, not counted)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
