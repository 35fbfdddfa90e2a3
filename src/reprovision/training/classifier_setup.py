"""How the train-<family> stages set a classifier up before its loop: the model, its training and
validation splits and its augmenter (stages/train_classifier.py). The benchmarks call it too, so
that what they time is the stage's own set-up, not a copy of it.
"""

from __future__ import annotations

import torch
from torch import nn

from reprovision.config import DATASET_SHAPES, Params
from reprovision.data.augment import BatchAugment, Policy, normalize
from reprovision.data.datasets import validation_split
from reprovision.models import ClassifierFamily
from reprovision.training.fit_classifier import DeviceData


def setup(
    family: ClassifierFamily,
    params: Params,
    device: torch.device,
    rng: torch.Generator,
    x: torch.Tensor,
    y: torch.Tensor,
    policy: Policy,
) -> tuple[nn.Module, DeviceData, DeviceData | None, BatchAugment]:
    """The model, training and validation splits and augmenter, exactly as the train-<family> stages train them.

    `x`, `y`: the training subset on `device`. The benchmarks (benchmarks/runs.py, speed_tables.py) call
    this too, so that they time the stage's own set-up."""
    cfg = params.classifier(family.name)
    channels, size, _, num_classes = DATASET_SHAPES[params.data.classifier_dataset]
    train_idx, val_idx = validation_split(y.cpu().numpy(), params.data.val_fraction, params.seed)
    train = DeviceData(x[train_idx], y[train_idx])
    val = DeviceData(x[val_idx], y[val_idx]) if len(val_idx) else None
    augmenter = BatchAugment(policy if cfg.augment else policy.without_augmentation(), num_classes, rng)
    model = family.build(cfg, num_classes=num_classes, channels=channels, image_size=size).to(device)
    init_from_images = getattr(model, "init_from_images", None)
    if init_from_images is not None:  # a layer set from the training images (airbench's whitening)
        init_from_images(train.x, lambda images: normalize(images, augmenter.policy))
    if family.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model, train, val, augmenter
