"""The model zoo reproduces the references' architectures exactly, and each model runs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from reprovision.config import ConfigError, Params, parse_params
from reprovision.models import count_parameters
from reprovision.models.cnn import RefCNN, build_cnn
from reprovision.models.gan import DCGANDiscriminator, DCGANGenerator, MLPDiscriminator, MLPGenerator, build_gan
from reprovision.models.judge import LeNet
from reprovision.models.resnet import resnet18_cifar
from reprovision.models.vit import ViT, build_vit

MNIST_SHAPE = (1, 28, 28)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def images(channels: int = 3, size: int = 32) -> torch.Tensor:
    return torch.randn(2, channels, size, size)


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (ViT, 5_362_762),  # R3
        (RefCNN, 4_823_114),  # R3
        (MLPDiscriminator, 533_505),  # R1
        (MLPGenerator, 1_513_616),  # R1's layers as listed: latent 128 -> 128 -> 256 -> 512 -> 1024 -> 784
        (lambda: MLPGenerator(hidden=(256, 512, 1024)), 1_496_592),  # the figure docs/references.md quotes
        (DCGANGenerator, 2_318_209),  # R2, PyTorch counting (BN: 2 trainable per channel)
        (DCGANDiscriminator, 213_249),  # R2, PyTorch counting
    ],
)
def test_parameter_counts_match_the_references(make, expected: int) -> None:
    assert count_parameters(make()) == expected


def keras_counts(model: nn.Module) -> list[int]:
    """Per-layer parameter counts as Keras reports them: BatchNorm's moving mean/variance included."""
    counts = []
    for layer in model.modules():
        own = sum(p.numel() for p in layer.parameters(recurse=False))
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            own += layer.running_mean.numel() + layer.running_var.numel()
        if own:
            counts.append(own)
    return counts


def test_dcgan_layers_match_r2s_keras_summary() -> None:
    assert keras_counts(DCGANGenerator()) == [1_266_944, 50_176, 819_328, 512, 204_864, 256, 1_601]
    assert sum(keras_counts(DCGANDiscriminator())) == 213_633


def test_classifier_output_shapes() -> None:
    x = images()
    for model in (ViT(), RefCNN(), resnet18_cifar()):
        assert model(x).shape == (2, 10)
    assert ViT().features(x).shape == (2, 192)
    assert RefCNN(channels=1, num_classes=100)(images(1, 28)).shape == (2, 100)


def test_gan_and_judge_output_shapes() -> None:
    for generator, discriminator in ((MLPGenerator(), MLPDiscriminator()), (DCGANGenerator(), DCGANDiscriminator())):
        fake = generator(torch.randn(2, generator.latent_dim))
        assert fake.shape == (2, 1, 28, 28)
        assert fake.min() >= -1 and fake.max() <= 1  # Tanh range, what the judge and D expect
        assert discriminator(fake).shape == (2, 1)
    judge = LeNet()
    digits = torch.rand(2, 1, 28, 28) * 2 - 1
    assert judge(digits).shape == (2, 10)
    assert judge.features(digits).shape == (2, 128)


def test_vit_returns_each_blocks_attention_and_the_same_logits() -> None:
    model = ViT().eval()
    x = images()
    with torch.no_grad():
        fused = model(x)
        logits, attentions = model(x, return_attention=True)
    assert len(attentions) == 12
    assert all(a.shape == (2, 3, 65, 65) for a in attentions)  # heads 3, [CLS] + 64 patches
    for a in attentions:
        torch.testing.assert_close(a.sum(dim=-1), torch.ones(2, 3, 65))
    # The explicit softmax(QK^T / sqrt d) path computes what the fused kernel does.
    torch.testing.assert_close(logits, fused, atol=1e-5, rtol=1e-4)


def test_gradcam_layer_is_the_last_conv_map_before_pooling() -> None:
    for model in (RefCNN(), resnet18_cifar()):
        shapes = []
        model.gradcam_layer.register_forward_hook(lambda m, i, out, shapes=shapes: shapes.append(out.shape))
        model(images())
        assert shapes == [(2, 512, 4, 4)]  # the CIFAR stem keeps 32x32 until layer4's 4x4
    resnet = resnet18_cifar()
    assert isinstance(resnet.maxpool, nn.Identity)
    assert (resnet.conv1.kernel_size, resnet.conv1.stride, resnet.conv1.bias) == ((3, 3), (1, 1), None)
    # The property adds no second copy of the weights to the state_dict.
    assert not any(key.startswith("gradcam_layer") for key in resnet.state_dict())


@pytest.mark.parametrize("make", [RefCNN, resnet18_cifar])
def test_channels_last_gives_the_same_outputs(make) -> None:
    model = make().eval()
    x = images()
    with torch.no_grad():
        expected = model(x)
        model = model.to(memory_format=torch.channels_last)
        got = model(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_builders_follow_params() -> None:
    default = build_vit(Params().vit, num_classes=10, channels=3, image_size=32)
    assert count_parameters(default) == 5_362_762
    small = build_vit(Params.model_validate({"vit": {"depth": 2}}).vit, num_classes=100, channels=3, image_size=32)
    assert len(small.blocks) == 2
    assert small(images()).shape == (2, 100)
    cnn = build_cnn(
        Params.model_validate({"cnn": {"widths": [8, 16], "hidden": 32}}).cnn, num_classes=10, channels=3, image_size=32
    )
    assert isinstance(cnn, RefCNN) and len(cnn.blocks) == 2
    resnet = build_cnn(
        Params.model_validate({"cnn": {"arch": "resnet18"}}).cnn, num_classes=100, channels=3, image_size=32
    )
    assert resnet.fc.out_features == 100
    # Five halving blocks do not fit a 32x32 image: params.yaml's check says so before any model is built.
    with pytest.raises(ConfigError, match="at most 5 widths"):
        parse_params({"cnn": {"widths": [4, 4, 4, 4, 4, 4]}})


def test_build_gan_follows_params_and_applies_dcgan_init() -> None:
    generator, discriminator = build_gan(
        "mlp", Params.model_validate({"gan": {"mlp": {"g_dropout": 0.3}}}).gan.mlp, MNIST_SHAPE
    )
    assert any(isinstance(m, nn.Dropout) and m.p == 0.3 for m in generator.modules())
    assert count_parameters(discriminator) == 533_505
    generator, discriminator = build_gan(
        "dcgan", Params.model_validate({"gan": {"dcgan": {"init_std": 0.05}}}).gan.dcgan, MNIST_SHAPE
    )
    dense = generator.project[0]
    assert dense.weight.std().item() == pytest.approx(0.05, rel=0.02)
    assert torch.all(dense.bias == 0)
    bn = discriminator.net[1]
    assert bn.weight.mean().item() == pytest.approx(1.0, abs=0.02) and torch.all(bn.bias == 0)
    # gan.dcgan.width narrows every conv layer (the CPU-sized run's 32): counted by hand layer by layer.
    generator, discriminator = build_gan(
        "dcgan", Params.model_validate({"gan": {"dcgan": {"width": 32}}}).gan.dcgan, MNIST_SHAPE
    )
    assert count_parameters(generator) == 633_472 + 12_544 + 204_864 + 128 + 51_232 + 64 + 801
    assert count_parameters(discriminator) == 832 + 64 + 51_264 + 128 + 3_137
    fakes = generator(torch.randn(3, 100))
    assert fakes.shape == (3, 1, 28, 28) and discriminator(fakes).shape == (3, 1)
    with pytest.raises(ValueError, match="allowed: 'mlp', 'dcgan'"):
        build_gan("wgan", Params().gan.mlp, MNIST_SHAPE)


def test_bad_inputs_name_the_problem() -> None:
    with pytest.raises(ValueError, match="does not divide image_size"):
        ViT(patch_size=5)
    with pytest.raises(ValueError, match="not divisible by heads"):
        ViT(heads=5)
    with pytest.raises(ValueError, match="built for"):
        ViT(depth=1)(images(3, 28))
    with pytest.raises(ValueError, match=r"\(B, 1, 28, 28\)"):
        LeNet()(images(3, 32))


def test_judge_learns() -> None:
    """A tiny check that the judge can fit: it memorises a fixed batch in a few Adam steps."""
    judge = LeNet()
    x, y = torch.rand(10, 1, 28, 28) * 2 - 1, torch.arange(10)
    optimizer = torch.optim.Adam(judge.parameters(), lr=1e-3)
    start = nn.functional.cross_entropy(judge(x), y).item()
    for _ in range(15):
        loss = nn.functional.cross_entropy(judge(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert nn.functional.cross_entropy(judge(x), y).item() < start / 3
    assert torch.equal(judge(x).argmax(dim=1), y)


def test_the_dcgan_card_names_its_width() -> None:
    from reprovision.publish.cards import gan_card

    metrics = {"g_params": 1, "d_params": 1, "n": 2, "fid": 1.0}
    reference = gan_card("dcgan", Params(), metrics)
    assert "DCGAN (R2): noise 100, Dense 7x7x256, ConvTranspose 128/64, Conv 1; D Conv 64/128" in reference
    narrowed = gan_card("dcgan", Params.model_validate({"gan": {"dcgan": {"width": 32}}}), metrics)
    assert (
        "DCGAN (R2, narrowed to width 32): noise 100, Dense 7x7x128, ConvTranspose 64/32, Conv 1; D Conv 32/64"
        in narrowed
    )
