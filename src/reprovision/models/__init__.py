"""The model zoo: classifiers (ViT, reference CNN, ResNet-18), the two GANs and the MNIST judge.

Stages build models from `Params` through `build_classifier` / `build_gan`, so that
params.yaml is the one place an architecture is configured.
"""

from __future__ import annotations

from functools import partial

from torch import nn

from ..config import DATASET_SHAPES, Params
from .cnn import RefCNN, resnet18_cifar
from .gan import DCGANDiscriminator, DCGANGenerator, MLPDiscriminator, MLPGenerator, init_dcgan_weights
from .judge import LeNet
from .vit import ViT

__all__ = [
    "DCGANDiscriminator",
    "DCGANGenerator",
    "LeNet",
    "MLPDiscriminator",
    "MLPGenerator",
    "RefCNN",
    "ViT",
    "build_classifier",
    "build_gan",
    "count_parameters",
    "init_dcgan_weights",
    "resnet18_cifar",
]


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters (BatchNorm running statistics are buffers, not counted)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def build_classifier(name: str, params: Params, num_classes: int, channels: int, image_size: int) -> nn.Module:
    """"vit" from `params.vit`, or "cnn" from `params.cnn` (arch "refcnn" or "resnet18")."""
    if name == "vit":
        v = params.vit
        return ViT(
            image_size=image_size,
            channels=channels,
            num_classes=num_classes,
            patch_size=v.patch_size,
            embed_dim=v.embed_dim,
            depth=v.depth,
            heads=v.heads,
            mlp_ratio=v.mlp_ratio,
            dropout=v.dropout,
        )
    if name == "cnn":
        c = params.cnn
        if c.arch == "resnet18":
            return resnet18_cifar(num_classes=num_classes, channels=channels)
        if image_size < 2 ** len(c.widths):
            raise ValueError(
                f"cnn.widths has {len(c.widths)} blocks, each halving the image, but the images are only "
                f"{image_size}x{image_size}; use at most {image_size.bit_length() - 1} widths"
            )
        return RefCNN(
            channels=channels,
            num_classes=num_classes,
            widths=tuple(c.widths),
            convs_per_block=c.convs_per_block,
            hidden=c.hidden,
            dropout=c.dropout,
        )
    raise ValueError(f"unknown classifier {name!r}; allowed: 'vit', 'cnn'")


def build_gan(name: str, params: Params) -> tuple[nn.Module, nn.Module]:
    """(generator, discriminator) for "mlp" (R1, from `params.gan.mlp`) or "dcgan" (R2, from `params.gan.dcgan`)."""
    channels, height, width, _ = DATASET_SHAPES[params.data.gan_dataset]
    if name == "mlp":
        m = params.gan.mlp
        shape = (channels, height, width)
        generator = MLPGenerator(
            latent_dim=m.latent_dim, hidden=tuple(m.g_hidden), out_shape=shape, dropout=m.g_dropout
        )
        return generator, MLPDiscriminator(in_shape=shape, hidden=tuple(m.d_hidden), dropout=m.d_dropout)
    if name == "dcgan":
        d = params.gan.dcgan
        generator, discriminator = DCGANGenerator(latent_dim=d.latent_dim), DCGANDiscriminator()
        init = partial(init_dcgan_weights, std=d.init_std)
        return generator.apply(init), discriminator.apply(init)
    raise ValueError(f"unknown GAN {name!r}; allowed: 'mlp', 'dcgan'")
