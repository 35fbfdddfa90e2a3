import json

import numpy as np
import pytest
import torch
from PIL import Image

from reprovision.config import AugmentConfig
from reprovision.data.augment import (
    BatchAugment,
    Policy,
    channel_stats,
    cutmix,
    cutout,
    make_policy,
    mixup,
    normalize,
    preview_grid,
    random_crop,
    random_hflip,
)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def distinct_images(n: int = 6, c: int = 3, h: int = 8, w: int = 8) -> torch.Tensor:
    """Every pixel value unique, so any crop/flip can be identified exactly."""
    return torch.arange(1, n * c * h * w + 1, dtype=torch.float32).view(n, c, h, w)


def constant_images(n: int, h: int = 16, w: int = 16) -> torch.Tensor:
    """Image i is filled with the value i: a pixel's value says which image it came from."""
    return torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 3, h, w).clone()


def make_test_policy(**overrides) -> Policy:
    fields = dict(
        dataset="cifar10", mean=(0.5, 0.4, 0.3), std=(0.25, 0.2, 0.2), crop_padding=2, hflip=True,
        cutmix_prob=0.0, cutmix_alpha=1.0, mixup_prob=0.0, mixup_alpha=0.2, cutout_prob=0.0, cutout_size=4,
    )  # fmt: skip
    return Policy(**{**fields, **overrides})


def test_random_crop_matches_a_per_image_reference_crop():
    x, padding = distinct_images(n=32), 2
    out = random_crop(x, padding, gen(1))
    padded = torch.nn.functional.pad(x, (padding,) * 4)
    offsets = set()
    for i in range(len(x)):  # slow reference: find the window of the padded image the output equals
        matches = [
            (top, left)
            for top in range(2 * padding + 1)
            for left in range(2 * padding + 1)
            if torch.equal(out[i], padded[i, :, top : top + 8, left : left + 8])
        ]
        assert len(matches) == 1, f"image {i} is not a crop of its padded self"
        offsets.add(matches[0])
    assert len(offsets) > 5  # offsets differ per image
    assert random_crop(x, 0, gen(1)) is x


def test_random_crop_works_on_uint8():
    x = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    out = random_crop(x, 4, gen(0))
    assert out.dtype == torch.uint8 and out.shape == x.shape


def test_hflip_flips_exactly_the_selected_images():
    x = distinct_images(n=32)
    out = random_hflip(x, gen(3))
    flipped = [torch.equal(o, xi.flip(-1)) for o, xi in zip(out, x)]
    kept = [torch.equal(o, xi) for o, xi in zip(out, x)]
    assert all(f != k for f, k in zip(flipped, kept))  # each image is exactly one of the two
    assert 0 < sum(flipped) < len(x)


def test_cutout_zeros_one_clipped_square_per_selected_image():
    size = 4
    x = torch.ones(64, 3, 10, 10)
    out = cutout(x, size, 1.0, gen(5))
    zero = out == 0
    assert torch.equal(zero.all(dim=1), zero.any(dim=1))  # same pixels in every channel
    counts = zero[:, 0].sum(dim=(1, 2))
    assert (counts > 0).all() and (counts <= size * size).all()
    assert (counts == size * size).any() and (counts < size * size).any()  # interior and border squares
    for mask in zero[:, 0]:  # the zeros form one rectangle
        rows, cols = mask.any(dim=1).nonzero(), mask.any(dim=0).nonzero()
        assert mask.sum() == len(rows) * len(cols)
        assert len(rows) == rows.max() - rows.min() + 1 and len(cols) == cols.max() - cols.min() + 1
    assert torch.equal(cutout(x, size, 0.0, gen(5)), x)
    half = (cutout(x, size, 0.5, gen(5)) == 0).flatten(1).any(dim=1)
    assert 0 < half.sum() < len(x)


@pytest.mark.parametrize("seed", range(12))
def test_cutmix_label_weight_is_the_exact_pasted_area(seed):
    n = 8
    x, y = constant_images(n), torch.eye(n)  # label i for image i
    out, y_mixed, lam = cutmix(x, y, alpha=1.0, generator=gen(seed))
    for i in range(n):
        donors = out[i].unique()
        donors = donors[donors != i]
        if len(donors) == 0:  # permuted onto itself (or an empty box): nothing foreign pasted
            assert y_mixed[i, i] == pytest.approx(1.0)
            continue
        (donor,) = donors.long().tolist()
        pasted = (out[i, 0] == donor).float().mean().item()
        assert y_mixed[i, donor].item() == pytest.approx(pasted, abs=1e-6)
        assert y_mixed[i, i].item() == pytest.approx(1 - pasted, abs=1e-6)
        assert lam == pytest.approx(1 - pasted)
    assert torch.allclose(y_mixed.sum(dim=1), torch.ones(n))
    assert torch.equal(x, constant_images(n))  # the input batch is left untouched


@pytest.mark.parametrize("seed", range(4))
def test_mixup_is_a_convex_combination_with_matching_weights(seed):
    n = 8
    x, y = constant_images(n), torch.eye(n)
    out, y_mixed, lam = mixup(x, y, alpha=0.4, generator=gen(seed))
    assert 0 <= lam <= 1
    assert torch.allclose(y_mixed.sum(dim=1), torch.ones(n))
    # image i is lam * i + (1 - lam) * j and its label row puts lam on i and 1 - lam on j
    expected = y_mixed @ torch.arange(n, dtype=torch.float32)
    assert torch.allclose(out[:, 0, 0, 0], expected, atol=1e-5)
    assert torch.allclose(out, out[:, :1, :1, :1].expand_as(out))


def test_channel_stats_equals_numpy():
    x = np.random.default_rng(0).integers(0, 256, (7, 3, 5, 4), dtype=np.uint8)
    scaled = x / 255.0
    for chunk_size in (2, 8192):
        mean, std = channel_stats(x, chunk_size=chunk_size)
        np.testing.assert_allclose(mean, scaled.mean(axis=(0, 2, 3)), rtol=1e-10)
        np.testing.assert_allclose(std, scaled.std(axis=(0, 2, 3)), rtol=1e-8)
    assert channel_stats(torch.from_numpy(x)) == channel_stats(x)


def test_channel_stats_rejects_bad_input():
    with pytest.raises(ValueError, match="NHWC"):
        channel_stats(np.zeros((2, 8, 8, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        channel_stats(np.zeros((2, 3, 8, 8), dtype=np.float32))


def test_make_policy_and_json_round_trip():
    x = np.random.default_rng(1).integers(0, 256, (4, 3, 6, 6), dtype=np.uint8)
    cfg = AugmentConfig(cutmix_prob=0.5, cutout_prob=0.25)
    policy = make_policy("cifar10", cfg, x)
    assert policy.mean == channel_stats(x)[0] and policy.cutmix_prob == 0.5 and policy.cutout_prob == 0.25
    assert Policy.from_json(json.loads(json.dumps(policy.to_json()))) == policy
    with pytest.raises(ValueError, match="dvc repro augment"):
        Policy.from_json({**policy.to_json(), "typo": 1})


def test_normalize_uses_policy_stats():
    policy = make_test_policy()
    x = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    out = normalize(x, policy)
    mean = torch.tensor(policy.mean).view(1, 3, 1, 1)
    std = torch.tensor(policy.std).view(1, 3, 1, 1)
    assert torch.allclose(out, (x.float() / 255 - mean) / std)
    with pytest.raises(ValueError, match="channels"):
        normalize(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), policy)


def test_batch_augment_eval_only_normalises():
    policy = make_test_policy(cutmix_prob=1.0, cutout_prob=1.0)
    x = torch.randint(0, 256, (5, 3, 8, 8), dtype=torch.uint8)
    y = torch.tensor([0, 3, 1, 9, 3])
    images, targets = BatchAugment(policy, 10, gen())(x, y, train=False)
    assert torch.equal(images, normalize(x, policy))
    assert torch.equal(targets, torch.nn.functional.one_hot(y, 10).float())


def test_batch_augment_is_deterministic_and_targets_are_soft_distributions():
    policy = make_test_policy(cutmix_prob=0.5, mixup_prob=0.5, cutout_prob=0.5)
    x = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8)
    y = torch.randint(0, 10, (16,))

    def run(seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        augment = BatchAugment(policy, 10, gen(seed))
        return [augment(x, y) for _ in range(6)]

    first, again, other = run(0), run(0), run(1)
    for (a_x, a_y), (b_x, b_y) in zip(first, again):
        assert torch.equal(a_x, b_x) and torch.equal(a_y, b_y)
    assert any(not torch.equal(a_x, o_x) for (a_x, _), (o_x, _) in zip(first, other))
    for images, targets in first:
        assert images.dtype == torch.float32 and images.shape == x.shape
        assert targets.shape == (16, 10) and (targets >= 0).all()
        assert torch.allclose(targets.sum(dim=1), torch.ones(16))
    assert any((targets.max(dim=1).values < 1).any() for _, targets in first)  # some batches were mixed


def test_preview_grid_writes_a_png(tmp_path):
    policy = make_test_policy(cutout_prob=0.5)
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    path = tmp_path / "preview" / "grid.png"
    preview_grid(images, policy, path, nrow=8)
    with Image.open(path) as img:
        assert img.format == "PNG"
        assert img.size == (8 * 34 + 2, 2 * 34 + 2)  # make_grid's 2-pixel padding around each image
