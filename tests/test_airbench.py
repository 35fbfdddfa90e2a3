"""airbench94 as `cnn.arch` with its recipe (benchmarks/recipes.py AIRBENCH94): the network, the whitening
layer from training images, the bias that freezes after 3 epochs, the lookahead, the schedule, the alternating
flips, the test-time augmentation, and a resume that ends bit for bit where an uninterrupted run does."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from reprovision.config import CNNConfig, parse_params
from reprovision.core import runtime
from reprovision.data.augment import BatchAugment, Policy, alternating_hflip, normalize
from reprovision.models import count_parameters
from reprovision.models.airbench import WHITEN_BIAS_EPOCHS, Airbench94
from reprovision.models.cnn import FAMILY
from reprovision.models.tta import AveragedViews, for_inference
from reprovision.training.fit_classifier import DeviceData, fit_classifier
from reprovision.training.optim import Lookahead, build_optimizer, warmup_linear

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from recipes import AIRBENCH94, nest  # noqa: E402

CPU = torch.device("cpu")
POLICY = Policy("tiny", (0.5,) * 3, (0.25,) * 3, 2, True, 0.0, 1.0, 0.0, 0.2, 0.0, 8, "reflect", True)
EPOCHS = 4


def recipe(**changes) -> CNNConfig:
    """The airbench94 recipe's cnn section, at a test's size."""
    section = {**nest(AIRBENCH94.overrides)["cnn"], "epochs": EPOCHS, "batch_size": 16, "precision": "fp32"}
    return CNNConfig(**{**section, **changes})


def images(n: int, seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 4
    x = (y.view(-1, 1, 1, 1) * 40 + torch.randint(0, 120, (n, 3, 32, 32), generator=g)).to(torch.uint8)
    return x, y


def train(*, checkpoint=None, on_epoch=None, **changes):
    torch.set_num_threads(1)
    rng = runtime.seed_everything(0, CPU)
    cfg = recipe(**changes)
    model = FAMILY.build(cfg, num_classes=4, channels=3, image_size=32)
    x, y = images(96)
    model.init_from_images(x[:64], lambda batch: normalize(batch, POLICY))
    snapshots = {}

    def record(row):
        snapshots[row["epoch"]] = {k: v.clone() for k, v in model.state_dict().items()}
        if on_epoch is not None:
            on_epoch(row)

    history = fit_classifier(
        model,
        DeviceData(x[:64], y[:64]),
        None,
        DeviceData(x[64:], y[64:]),
        BatchAugment(POLICY, 4, rng),
        cfg,
        1.5,
        rng,
        checkpoint=checkpoint,
        fingerprint="airbench",
        on_epoch=record,
        progress=False,
    )
    return model, history, snapshots


def test_the_network_is_airbench94s():
    model = Airbench94(channels=3, num_classes=10)
    # Trainable: convs 24x64x9 + 64x64x9 + 64x256x9 + 256x256x9 + 2 x 256x256x9, the linear 256x10, the BN
    # biases 2 x (64 + 256 + 256) and the whitening bias 24 (its weights and the BN weights are frozen).
    assert count_parameters(model) == 1_971_352
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    assert not model.whiten.weight.requires_grad
    assert all(not m.weight.requires_grad for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_whitening_from_training_images_whitens_them_and_is_deterministic():
    x, _ = images(64)
    first, second = Airbench94(), Airbench94()
    first.init_from_images(x, lambda batch: normalize(batch, POLICY))
    second.init_from_images(x, lambda batch: normalize(batch, POLICY))
    assert torch.equal(first.whiten.weight, second.whiten.weight)
    # The first half of the filters maps the 2x2 patches to coordinates of (near) unit variance, uncorrelated.
    with torch.no_grad():
        out = torch.nn.functional.conv2d(normalize(x, POLICY).double(), first.whiten.weight[:12].double())
    flat = out.permute(1, 0, 2, 3).reshape(12, -1)
    covariance = flat @ flat.T / flat.shape[1]
    assert torch.allclose(covariance, torch.eye(12, dtype=torch.float64), atol=0.05)
    assert torch.equal(first.whiten.weight[12:], -first.whiten.weight[:12])


def test_the_whitening_bias_trains_for_its_epochs_then_freezes():
    _, _, snapshots = train(lookahead_every=0)  # (the lookahead moves every weight, frozen or not, as airbench's)
    bias = {epoch: weights["whiten.bias"] for epoch, weights in snapshots.items()}
    assert not torch.equal(bias[1], bias[2])
    assert all(torch.equal(bias[WHITEN_BIAS_EPOCHS], bias[e]) for e in range(WHITEN_BIAS_EPOCHS + 1, EPOCHS + 1))


def test_a_resumed_airbench_run_ends_bit_for_bit_as_an_uninterrupted_one(tmp_path):
    uninterrupted, history, _ = train()

    def crash_after_epoch_2(row):
        if row["epoch"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(checkpoint=tmp_path / "cnn.pt", on_epoch=crash_after_epoch_2)
    resumed, resumed_history, _ = train(checkpoint=tmp_path / "cnn.pt")
    state, expected = resumed.state_dict(), uninterrupted.state_dict()
    assert all(torch.equal(state[k], expected[k]) for k in expected)
    timeless = [[{k: v for k, v in r.items() if k != "epoch_seconds"} for r in h] for h in (resumed_history, history)]
    assert timeless[0] == timeless[1]


def test_the_lookahead_pulls_the_weights_to_their_average_on_airbench94s_schedule():
    model = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    lookahead = Lookahead(model, every=5, decay=0.95, total_steps=10)
    with torch.no_grad():
        model.weight.fill_(1.0)
    lookahead.step(4)  # not a multiple of `every`: nothing happens
    assert model.weight.item() == 1.0
    lookahead.step(5)  # decay 0.95**5 * (5/10)**3: the average moves 1 - that towards 1, the weights follow
    decay = 0.95**5 * 0.5**3
    assert model.weight.item() == pytest.approx(1 - decay) and lookahead.average["weight"].item() == model.weight.item()
    with torch.no_grad():
        model.weight.fill_(3.0)
    lookahead.finish()  # the weights that ship are the average
    assert model.weight.item() == pytest.approx(1 - decay)


def test_the_recipe_trains_differently_with_and_without_the_lookahead():
    with_lookahead = train()[0].head.weight
    without = train(lookahead_every=0)[0].head.weight
    assert torch.isfinite(with_lookahead).all() and not torch.equal(with_lookahead, without)


def test_warmup_linear_rises_from_the_start_factor_and_ends_at_the_end_factor():
    factor = warmup_linear(recipe(), total=100)
    assert factor(0) == pytest.approx(0.2) and factor(23) == pytest.approx(1.0) and factor(100) == pytest.approx(0.07)
    assert factor(11) < factor(12) and factor(50) > factor(51)


def test_norm_lr_mult_raises_the_norm_layers_lr_and_keeps_their_decay_per_step():
    cfg = recipe()
    model = Airbench94()
    optimizer = build_optimizer(model, cfg, 1.5, CPU)
    others, norms = optimizer.param_groups
    bn_biases = [m.bias for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert {id(p) for p in norms["params"]} == {id(p) for p in bn_biases}
    assert norms["lr"] == 1.5 * 64 and norms["lr"] * norms["weight_decay"] == pytest.approx(1.5 * cfg.weight_decay)
    assert len(others["params"]) + len(norms["params"]) == len([p for p in model.parameters() if p.requires_grad])


def test_alternating_flips_mirror_each_image_once_every_two_epochs_whatever_the_batch():
    x = torch.arange(8 * 3 * 2 * 4, dtype=torch.uint8).view(8, 3, 2, 4)
    index = torch.arange(8)
    odd, even = alternating_hflip(x, index, 1, seed=0), alternating_hflip(x, index, 2, seed=0)
    flipped_odd = (odd != x).flatten(1).any(1)
    flipped_even = (even != x).flatten(1).any(1)
    assert torch.equal(flipped_odd, ~flipped_even)  # each image exactly once per pair of epochs
    assert 0 < int(flipped_odd.sum()) < 8
    # An image's flip depends on its index and the epoch, not on which batch it lands in.
    alone = alternating_hflip(x[5:6], index[5:6], 1, seed=0)
    assert torch.equal(alone[0], odd[5])


def test_tta_averages_airbench_views_and_leaves_training_alone():
    torch.manual_seed(0)
    model = Airbench94(num_classes=4).eval()
    x = torch.randn(3, 3, 32, 32)
    tta = for_inference(model, "mirror_translate")
    assert isinstance(tta, AveragedViews) and for_inference(model, "none") is model
    with torch.no_grad():
        padded = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="reflect")

        def mirror(v):
            return 0.5 * model(v) + 0.5 * model(v.flip(-1))

        expected = 0.5 * mirror(x) + 0.25 * mirror(padded[..., :32, :32]) + 0.25 * mirror(padded[..., 2:, 2:])
        assert torch.allclose(tta(x), expected, atol=1e-6)
        assert torch.allclose(for_inference(model, "mirror")(x), mirror(x))
    tta.train()
    assert torch.equal(tta(x), model(x))  # training mode: the model itself


def test_airbench94_needs_32x32_images():
    with pytest.raises(ValueError, match=r"cnn.arch = airbench94 is built for 32x32 images and mnist's are 28x28"):
        CNNConfig(arch="airbench94").check_images("cnn", 28, 28, "mnist")
    assert parse_params(nest(AIRBENCH94.overrides)).cnn.arch == "airbench94"


def test_the_augment_stages_preview_takes_alternating_flips_without_indices(tmp_path):
    from reprovision.data.augment import preview_grid

    preview_grid(images(8)[0], POLICY, tmp_path / "preview.png", generator=torch.Generator().manual_seed(0))
    assert (tmp_path / "preview.png").stat().st_size > 0
