"""R4's ResNet-18: torchvision's ResNet with the CIFAR stem, and the layer Grad-CAM reads."""

from __future__ import annotations

from torch import nn

from reprovision.compat import import_torchvision

import_torchvision()
from torchvision.models.resnet import BasicBlock, ResNet  # noqa: E402


class CifarResNet(ResNet):
    """torchvision's ResNet, plus the `gradcam_layer` that heat maps read (its last stage)."""

    @property
    def gradcam_layer(self) -> nn.Module:
        return self.layer4


def resnet18_cifar(num_classes: int = 10, channels: int = 3) -> CifarResNet:
    """torchvision's ResNet-18 (the same BasicBlock x [2, 2, 2, 2] that `resnet18()` builds) with the CIFAR stem.

    The ImageNet stem (7x7 stride-2 conv + max-pool) would shrink a 32x32 image to 8x8 before
    the first stage; the CIFAR stem (3x3 stride-1 conv, no max-pool) keeps 32x32, so layer4
    sees 4x4 maps.
    """
    model = CifarResNet(BasicBlock, [2, 2, 2, 2], num_classes=num_classes)
    model.conv1 = nn.Conv2d(channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")  # as ResNet inits its convs
    model.maxpool = nn.Identity()
    return model
