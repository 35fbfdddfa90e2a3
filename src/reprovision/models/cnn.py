"""The CNN baselines: R3's reference CNN here, R4's ResNet-18 with the CIFAR stem in resnet.py,
airbench94 (the fast CIFAR-10 network of KellerJordan/cifar10-airbench) in airbench.py.

All expose `gradcam_layer`, the module whose output is the last convolutional feature map
(before any pooling), which is where Grad-CAM reads activations and gradients.
"""

from __future__ import annotations

from torch import Tensor, nn

from reprovision.models import ClassifierFamily


def conv_bn_relu(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, kernel_size=3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


class RefCNN(nn.Module):
    """VGG-style: per block `convs_per_block` x (Conv3x3 + BN + ReLU), then MaxPool 2x2; GAP; MLP head.

    At the defaults this is R3's CNN with exactly its 4,823,114 parameters (two convs per
    block is the layout that reproduces that count; one conv per block gives 2,080,010).
    """

    def __init__(
        self,
        *,
        channels: int = 3,
        num_classes: int = 10,
        widths: tuple[int, ...] = (64, 128, 256, 512),
        convs_per_block: int = 2,
        hidden: int = 256,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        if not widths:
            raise ValueError("RefCNN needs at least one block width, e.g. widths=(64, 128, 256, 512)")
        blocks = []
        for c_in, c_out in zip((channels, *widths[:-1]), widths):
            layers = conv_bn_relu(c_in, c_out)
            for _ in range(convs_per_block - 1):
                layers += conv_bn_relu(c_out, c_out)
            blocks.append(nn.Sequential(*layers))
        self.blocks = nn.ModuleList(blocks)
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(widths[-1], hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )

    @property
    def gradcam_layer(self) -> nn.Module:
        # A property, not an attribute: assigning the block again would register it twice
        # and duplicate its weights in the state_dict.
        return self.blocks[-1]

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = self.pool(block(x))
        return self.head(x)


def build_cnn(cfg, *, num_classes: int, channels: int, image_size: int) -> nn.Module:
    """The CNN that the `cnn` section of params.yaml describes: `arch` refcnn (R3), resnet18 (R4) or airbench94."""
    if cfg.arch == "airbench94":
        from reprovision.models.airbench import Airbench94

        return Airbench94(channels=channels, num_classes=num_classes)
    if cfg.arch == "resnet18":
        from reprovision.models.resnet import resnet18_cifar  # torchvision is imported only when ResNet-18 is asked for

        return resnet18_cifar(num_classes=num_classes, channels=channels)
    # params.yaml's check (config.py) already matched len(widths) to image_size.
    return RefCNN(
        channels=channels,
        num_classes=num_classes,
        widths=tuple(cfg.widths),
        convs_per_block=cfg.convs_per_block,
        hidden=cfg.hidden,
        dropout=cfg.dropout,
    )


def build_encoder(cfg, *, channels: int) -> tuple[nn.Module, int]:
    """(encoder, feature size): the CNN that `cfg` (the `ssl` section: arch, widths, convs_per_block)
    describes, without its classifier: images in, globally pooled features out."""
    if cfg.arch == "resnet18":
        from reprovision.models.resnet import resnet18_cifar

        model = resnet18_cifar(channels=channels)
        features = model.fc.in_features
        model.fc = nn.Identity()  # ResNet's forward pools and flattens before fc
        return model, features
    model = RefCNN(channels=channels, widths=tuple(cfg.widths), convs_per_block=cfg.convs_per_block)
    model.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return model, cfg.widths[-1]


def describe_cnn(cfg, *, num_classes: int) -> str:
    if cfg.arch == "airbench94":
        return (
            "airbench94 (KellerJordan/cifar10-airbench): a frozen 2x2 patch-whitening conv from training images, "
            f"3 x (Conv3x3, MaxPool, BN, GELU, Conv3x3, BN, GELU) of widths 64/256/256, MaxPool 3, "
            f"linear 256->{num_classes} x 1/9"
        )
    if cfg.arch == "resnet18":
        return "ResNet-18 with a CIFAR stem (3x3 stride-1 first conv, no max-pool) (R4)"
    return (
        f"Reference CNN (R3): blocks {cfg.widths}, {cfg.convs_per_block} x (Conv3x3 + BN + ReLU) + MaxPool each, "
        f"global average pool, FC {cfg.widths[-1]}->{cfg.hidden}, dropout {cfg.dropout}, FC {cfg.hidden}->{num_classes}"
    )


FAMILY = ClassifierFamily(name="cnn", build=build_cnn, heatmap="gradcam", channels_last=True, describe=describe_cnn)
