"""Batched training-time augmentation of uint8 NCHW image batches.

Every op works on a whole mini-batch at once, on whatever device the batch lives on (in
the style of KellerJordan/cifar10-airbench): no per-image Python loop, so the augment step
costs a few kernel launches rather than a DataLoader worker pool. All randomness comes from
one `torch.Generator`, so the same seed gives the same augmentations, bit for bit on CPU.

The augment stage measures the channel statistics once and writes a `Policy` to
`data/augment/policy.json`; the training loop reads it back and wraps it in `BatchAugment`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from reprovision.compat import import_torchvision
from reprovision.config import AugmentConfig


@dataclass(frozen=True)
class Policy:
    """What the augment stage decides and the training loop applies."""

    dataset: str
    mean: tuple[float, ...]  # per channel, of the training images scaled to [0, 1]
    std: tuple[float, ...]
    crop_padding: int
    hflip: bool
    cutmix_prob: float
    cutmix_alpha: float
    mixup_prob: float
    mixup_alpha: float
    cutout_prob: float
    cutout_size: int
    pad_mode: str = "zeros"  # the crop's padding: zeros or reflect (airbench)
    alternate_flips: bool = False
    trivial_augment: bool = False
    erasing_prob: float = 0.0

    def __post_init__(self) -> None:
        if len(self.mean) != len(self.std) or not self.mean:
            raise ValueError(
                f"policy for {self.dataset}: mean has {len(self.mean)} channels and std {len(self.std)}; "
                "they must be equal and non-empty (re-run the augment stage: `dvc repro augment`)"
            )
        if min(self.std) <= 0:
            raise ValueError(
                f"policy for {self.dataset}: std {self.std} has a non-positive channel, which would divide "
                "by zero; the training images are constant in that channel (check the data stage)"
            )

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "mean": list(self.mean), "std": list(self.std)}

    def without_augmentation(self) -> Policy:
        """The same normalisation, no random transform (a classifier's `augment: false`)."""
        return dataclasses.replace(
            self,
            crop_padding=0,
            hflip=False,
            cutmix_prob=0.0,
            mixup_prob=0.0,
            cutout_prob=0.0,
            trivial_augment=False,
            erasing_prob=0.0,
        )

    @classmethod
    def from_json(cls, d: dict) -> Policy:
        expected = {f.name for f in dataclasses.fields(cls)}
        missing, unknown = expected - d.keys(), d.keys() - expected
        if missing or unknown:
            raise ValueError(
                f"policy.json does not match this code (missing keys: {sorted(missing)}, unknown keys: "
                f"{sorted(unknown)}); re-run the augment stage to rewrite it: `dvc repro augment`"
            )
        return cls(**{**d, "mean": tuple(d["mean"]), "std": tuple(d["std"])})


def _check_batch(x: torch.Tensor | np.ndarray, what: str) -> None:
    if x.ndim != 4:
        raise ValueError(f"{what}: expected a 4-D NCHW batch, got shape {tuple(x.shape)}")
    if x.shape[1] not in (1, 3) and x.shape[-1] in (1, 3):
        raise ValueError(
            f"{what}: shape {tuple(x.shape)} looks channels-last (NHWC); pass NCHW, "
            "e.g. x.permute(0, 3, 1, 2) or np.transpose(x, (0, 3, 1, 2))"
        )


def channel_stats(
    x_uint8: np.ndarray | torch.Tensor, chunk_size: int = 8192
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std of uint8 NCHW images scaled to [0, 1].

    A uint8 channel takes only 256 values, so a per-channel histogram, filled one chunk at a
    time, holds everything the statistics need: exact counts, no float copy of 50k images,
    and mean and std computed from it in float64 with no cancellation.
    """
    _check_batch(x_uint8, "channel_stats")
    x = torch.as_tensor(x_uint8)
    if x.dtype != torch.uint8:
        raise ValueError(f"channel_stats: expected uint8 images in [0, 255], got {x.dtype}")
    channels = x.shape[1]
    hist = torch.zeros(channels, 256, dtype=torch.int64)
    for chunk in x.split(chunk_size):
        chunk = chunk.cpu()  # torch flags CUDA bincount as nondeterministic; the CPU one is exact
        hist += torch.stack([torch.bincount(chunk[:, c].flatten(), minlength=256) for c in range(channels)])
    hist = hist.double()
    levels = torch.arange(256, dtype=torch.float64) / 255
    count = hist.sum(dim=1)
    mean = hist @ levels / count
    std = ((hist * (levels - mean[:, None]).square()).sum(dim=1) / count).sqrt()
    return tuple(mean.tolist()), tuple(std.tolist())


def make_policy(dataset: str, cfg: AugmentConfig, train_x_uint8: np.ndarray | torch.Tensor) -> Policy:
    mean, std = channel_stats(train_x_uint8)
    return Policy(
        dataset=dataset,
        mean=mean,
        std=std,
        crop_padding=cfg.crop_padding,
        hflip=cfg.hflip,
        cutmix_prob=cfg.cutmix_prob,
        cutmix_alpha=cfg.cutmix_alpha,
        mixup_prob=cfg.mixup_prob,
        mixup_alpha=cfg.mixup_alpha,
        cutout_prob=cfg.cutout_prob,
        cutout_size=cfg.cutout_size,
        pad_mode=cfg.pad_mode,
        alternate_flips=cfg.alternate_flips,
        trivial_augment=cfg.trivial_augment,
        erasing_prob=cfg.erasing_prob,
    )


def _channel_vectors(policy: Policy, x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    if x.shape[1] != len(policy.mean):
        raise ValueError(
            f"batch has {x.shape[1]} channels but the {policy.dataset} policy has {len(policy.mean)}; "
            "the policy was measured on another dataset: re-run `dvc repro augment`"
        )
    return _vectors(policy.mean, policy.std, dtype, x.device)


@functools.lru_cache(maxsize=16)
def _vectors(
    mean: tuple[float, ...], std: tuple[float, ...], dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """The (1, C, 1, 1) mean and std, made once per device: copying a Python list to a GPU waits for
    the GPU to finish its queue, which every training step would otherwise pay."""
    shape = (1, -1, 1, 1)
    return torch.tensor(mean, dtype=dtype, device=device).view(shape), torch.tensor(
        std, dtype=dtype, device=device
    ).view(shape)


def normalize(x_uint8: torch.Tensor, policy: Policy, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 NCHW in [0, 255] -> (x / 255 - mean) / std in `dtype`."""
    _check_batch(x_uint8, "normalize")
    if x_uint8.dtype != torch.uint8:
        raise ValueError(f"normalize: expected uint8 images, got {x_uint8.dtype}; normalise raw images only once")
    mean, std = _channel_vectors(policy, x_uint8, dtype)
    return (x_uint8.to(dtype) / 255 - mean) / std


def denormalize(x: torch.Tensor, policy: Policy) -> torch.Tensor:
    """The inverse of `normalize`, in [0, 1] (for display)."""
    mean, std = _channel_vectors(policy, x, x.dtype)
    return (x * std + mean).clamp(0, 1)


def _rand(generator: torch.Generator, *shape: int, like: torch.Tensor) -> torch.Tensor:
    """Uniforms from `generator` on its own device, moved to the batch's device."""
    return torch.rand(shape, generator=generator, device=generator.device).to(like.device)


def _randint(generator: torch.Generator, high: int, n: int, like: torch.Tensor) -> torch.Tensor:
    return torch.randint(high, (n,), generator=generator, device=generator.device).to(like.device)


def _scalar_rng(generator: torch.Generator) -> np.random.Generator:
    """A numpy RNG seeded from `generator`, for the few per-batch scalars (Beta-sampled λ, box centre).

    `torch.distributions.Beta` cannot take a generator; one seed drawn from it keeps the
    whole stream reproducible at the cost of one device sync per mixed batch.
    """
    seed = torch.randint(2**62, (1,), generator=generator, device=generator.device).item()
    return np.random.default_rng(seed)


def random_crop(x: torch.Tensor, padding: int, generator: torch.Generator, mode: str = "zeros") -> torch.Tensor:
    """Pad by `padding` (zeros, or `mode="reflect"`) then take a random H x W window per image, in one gather."""
    if padding == 0:
        return x
    n, c, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding), mode="constant" if mode == "zeros" else mode)
    top = _randint(generator, 2 * padding + 1, n, x)
    left = _randint(generator, 2 * padding + 1, n, x)
    rows = (top[:, None] + torch.arange(h, device=x.device))[:, None, :, None]  # (N, 1, H, 1)
    cols = (left[:, None] + torch.arange(w, device=x.device))[:, None, None, :]  # (N, 1, 1, W)
    images = torch.arange(n, device=x.device)[:, None, None, None]
    channels = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[images, channels, rows, cols]


def random_hflip(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Mirror each image left-right with probability 1/2."""
    flip = _rand(generator, x.shape[0], like=x) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def alternating_hflip(x: torch.Tensor, index: torch.Tensor, epoch: int, seed: int) -> torch.Tensor:
    """airbench's alternating flip: a fixed random half of the images is mirrored in odd epochs and the
    other half in even ones, so every image is seen both ways every two epochs. The half is a hash of
    the image's index in the training set and the seed: the same on any device and after a resume."""
    hashed = (index.to(torch.int64) * 2654435761 + seed * 40503) % 2**32  # Knuth's multiplicative hash
    flip = ((hashed >> 16) & 1) != (epoch % 2)
    return torch.where(flip.to(x.device)[:, None, None, None], x.flip(-1), x)


def trivial_augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """TrivialAugment (Müller & Hutter 2021, torchvision's TrivialAugmentWide) per image, on a uint8 batch:
    each image gets one op of torchvision's space, a magnitude bin and a sign drawn from `generator`,
    applied by torchvision's own op code to the images that drew the same (op, bin, sign) together."""
    import_torchvision()
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import TrivialAugmentWide

    policy = TrivialAugmentWide()
    space = list(policy._AUGMENTATION_SPACE.items())
    n, bins = x.shape[0], policy.num_magnitude_bins
    op = _randint(generator, len(space), n, x)
    level = _randint(generator, bins, n, x)
    negative = _rand(generator, n, like=x) <= 0.5
    out = x.clone()
    for key in torch.unique(torch.stack([op, level, negative.long()], 1), dim=0).tolist():
        name, (magnitudes_of, signed) = space[key[0]]
        magnitudes = magnitudes_of(bins, x.shape[-2], x.shape[-1])
        magnitude = 0.0 if magnitudes is None else float(magnitudes[key[1]]) * (-1 if signed and key[2] else 1)
        chosen = (op == key[0]) & (level == key[1]) & (negative.long() == key[2])
        out[chosen] = policy._apply_image_or_video_transform(
            x[chosen], name, magnitude, interpolation=InterpolationMode.NEAREST, fill=policy._fill
        )
    return out


def random_erasing(x: torch.Tensor, prob: float, generator: torch.Generator) -> torch.Tensor:
    """Random erasing (Zhong et al. 2020) per image with probability `prob`: a rectangle of 2-33 % of the
    image with aspect ratio in [0.3, 3.3] (log-uniform), clipped to the image, set to 0 (after
    normalisation: the mean colour), as torchvision's RandomErasing does for one image."""
    n, _, h, w = x.shape
    selected = _rand(generator, n, like=x) < prob
    area = (0.02 + 0.31 * _rand(generator, n, like=x)) * h * w
    aspect = torch.exp(math.log(0.3) + (math.log(3.3) - math.log(0.3)) * _rand(generator, n, like=x))
    eh = (area * aspect).sqrt().round().clamp(1, h).long()
    ew = (area / aspect).sqrt().round().clamp(1, w).long()
    top = (_rand(generator, n, like=x) * (h - eh + 1)).long()
    left = (_rand(generator, n, like=x) * (w - ew + 1)).long()
    rows, cols = torch.arange(h, device=x.device), torch.arange(w, device=x.device)
    in_rows = (rows >= top[:, None]) & (rows < (top + eh)[:, None])
    in_cols = (cols >= left[:, None]) & (cols < (left + ew)[:, None])
    mask = in_rows[:, :, None] & in_cols[:, None, :] & selected[:, None, None]
    return x.masked_fill(mask[:, None], 0)


def cutout(x: torch.Tensor, size: int, prob: float, generator: torch.Generator) -> torch.Tensor:
    """Zero a size x size square (clipped at the border) in each image with probability `prob`.

    As in DeVries & Taylor 2017 the centre is uniform over the image, so squares near an edge
    are partly outside it. Applied after normalisation, zero is the dataset's mean colour.
    """
    n, _, h, w = x.shape
    selected = _rand(generator, n, like=x) < prob
    top = _randint(generator, h, n, x) - size // 2
    left = _randint(generator, w, n, x) - size // 2
    rows = torch.arange(h, device=x.device)
    cols = torch.arange(w, device=x.device)
    in_rows = (rows >= top[:, None]) & (rows < top[:, None] + size)  # (N, H)
    in_cols = (cols >= left[:, None]) & (cols < left[:, None] + size)  # (N, W)
    mask = in_rows[:, :, None] & in_cols[:, None, :] & selected[:, None, None]
    return x.masked_fill(mask[:, None], 0)


def cutmix(
    x: torch.Tensor, y_onehot: torch.Tensor, alpha: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """CutMix (Yun et al. 2019): paste one box per mini-batch from a permuted copy of the batch.

    The box has area ratio 1 - λ with λ ~ Beta(alpha, alpha) and a uniform centre; after clipping
    it to the image the labels are mixed by the area actually pasted, returned as `lam`.
    """
    n, _, h, w = x.shape
    rng = _scalar_rng(generator)
    lam = rng.beta(alpha, alpha)
    cut = np.sqrt(1.0 - lam)
    cut_h, cut_w = int(h * cut), int(w * cut)
    cy, cx = int(rng.integers(h)), int(rng.integers(w))
    y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h - cut_h // 2, h)
    x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w - cut_w // 2, w)
    perm = torch.randperm(n, generator=generator, device=generator.device).to(x.device)
    mixed = x.clone()
    mixed[:, :, y0:y1, x0:x1] = x[perm, :, y0:y1, x0:x1]
    lam_effective = 1.0 - (y1 - y0) * (x1 - x0) / (h * w)
    return mixed, lam_effective * y_onehot + (1 - lam_effective) * y_onehot[perm], lam_effective


def mixup(
    x: torch.Tensor, y_onehot: torch.Tensor, alpha: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """MixUp (Zhang et al. 2018): one λ ~ Beta(alpha, alpha) per mini-batch, convex mix with a permuted batch."""
    lam = float(_scalar_rng(generator).beta(alpha, alpha))
    perm = torch.randperm(x.shape[0], generator=generator, device=generator.device).to(x.device)
    return lam * x + (1 - lam) * x[perm], lam * y_onehot + (1 - lam) * y_onehot[perm], lam


class BatchAugment:
    """uint8 images + integer labels -> normalised float images + soft targets, per mini-batch.

    Order: crop -> flip -> TrivialAugment -> normalise -> cutout -> random erasing -> (CutMix with
    cutmix_prob, else MixUp with mixup_prob).
    """

    def __init__(self, policy: Policy, num_classes: int, generator: torch.Generator):
        self.policy = policy
        self.num_classes = num_classes
        self.generator = generator

    def __call__(
        self,
        x_uint8: torch.Tensor,
        y: torch.Tensor,
        train: bool = True,
        index: torch.Tensor | None = None,
        epoch: int = 1,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`index`: the images' places in the training set (default: in this batch), for alternating flips."""
        p, g = self.policy, self.generator
        targets = F.one_hot(y.to(device=x_uint8.device, dtype=torch.long), self.num_classes).float()
        if not train:
            return normalize(x_uint8, p), targets
        x = random_crop(x_uint8, p.crop_padding, g, p.pad_mode)
        if p.hflip and p.alternate_flips:
            index = torch.arange(len(x), device=x.device) if index is None else index  # (a preview's batch)
            x = alternating_hflip(x, index, epoch, g.initial_seed())
        elif p.hflip:
            x = random_hflip(x, g)
        if p.trivial_augment:
            x = trivial_augment(x, g)
        x = normalize(x, p)
        if p.cutout_prob > 0:
            x = cutout(x, p.cutout_size, p.cutout_prob, g)
        if p.erasing_prob > 0:
            x = random_erasing(x, p.erasing_prob, g)
        if p.cutmix_prob > 0 or p.mixup_prob > 0:  # skip the draw (a device sync) when mixing is off
            use_cutmix, use_mixup = torch.rand(2, generator=g, device=g.device).tolist()
            if use_cutmix < p.cutmix_prob:
                x, targets, _ = cutmix(x, targets, p.cutmix_alpha, g)
            elif use_mixup < p.mixup_prob:
                x, targets, _ = mixup(x, targets, p.mixup_alpha, g)
        return x, targets


def preview_grid(
    images_uint8: torch.Tensor,
    policy: Policy,
    path: Path,
    nrow: int = 8,
    generator: torch.Generator | None = None,
) -> None:
    """Write a PNG grid of the images as training sees them (augmented, then de-normalised)."""
    import_torchvision()
    from torchvision.utils import make_grid

    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    labels = torch.zeros(images_uint8.shape[0], dtype=torch.long)  # mixing needs targets; one dummy class
    augmented, _ = BatchAugment(policy, num_classes=1, generator=generator)(images_uint8, labels)
    grid = make_grid(denormalize(augmented, policy), nrow=nrow)
    pixels = grid.mul(255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
