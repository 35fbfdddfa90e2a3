"""Measuring a GAN with an MNIST judge instead of by eye.

The reference reports judged their GANs by looking at sample grids. Here a small LeNet trained
on MNIST ("the judge", >= 99 % test accuracy) plays the part Inception v3 plays for natural
images:

- Fréchet LeNet Distance: FID on the judge's 128-d penultimate features (lower is better),
  with the real-vs-real value at the same N as the floor a perfect generator would reach;
- classifier Inception Score on the judge's softmax (1 = one digit only, 10 = all ten digits,
  each drawn confidently);
- class coverage: the predicted-digit histogram and its KL divergence from uniform
  (mode collapse shows as a large KL);
- nearest training images in pixel space (a memorisation check).

FID and IS are torchmetrics' implementations with the judge plugged in as feature extractor.
Scores are comparable only between runs with the same judge and the same N (FID is biased by N).
All images here are float tensors in [-1, 1] of shape (N, 1, 28, 28), the range of the
generators' Tanh.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy.stats import entropy
from torch import Tensor, nn

from reprovision.compat import import_torchvision
from reprovision.models.judge import LeNet

import_torchvision()  # before torchmetrics too: its image package imports torchvision
from torchmetrics.image.fid import FrechetInceptionDistance  # noqa: E402
from torchmetrics.image.inception import InceptionScore  # noqa: E402
from torchvision.utils import make_grid  # noqa: E402

IMAGE_SHAPE = (1, 28, 28)
EVAL_BATCH = 1000


def _check_images(x: Tensor, name: str) -> None:
    if not isinstance(x, Tensor) or x.dim() != 4 or tuple(x.shape[1:]) != IMAGE_SHAPE or len(x) == 0:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name}: expected a batch of MNIST images of shape (N, 1, 28, 28), got {shape}")
    if not x.is_floating_point():
        raise ValueError(
            f"{name}: expected float images in [-1, 1], got dtype {x.dtype}; convert uint8 pixels with to_pm1(x)"
        )
    low, high = x.aminmax()
    if low < -1.001 or high > 1.001:
        raise ValueError(
            f"{name}: values span [{low:.3g}, {high:.3g}], expected [-1, 1]; "
            f"convert uint8 pixels with to_pm1(x), [0, 1] images with x * 2 - 1"
        )


class JudgeFeatures(nn.Module):
    """The judge as a torchmetrics feature extractor: float [-1, 1] images in, float64 CPU rows out.

    `output="features"` gives the penultimate activations (FID), `"logits"` the class logits (IS).
    Batches go to the judge's device; the result comes back to the CPU in float64, where
    torchmetrics accumulates its statistics (a 128x128 covariance: cheap, and MPS has no float64).
    float64 also keeps torchmetrics from rounding FID back to float32: it returns the features' dtype.
    """

    def __init__(self, judge: LeNet, output: str = "features") -> None:
        super().__init__()
        if output not in ("features", "logits"):
            raise ValueError(f"output={output!r}; allowed: 'features' (for FID) or 'logits' (for IS)")
        self.judge = judge
        self.output = output
        self.eval()
        # Declared, so torchmetrics does not probe the judge with a dummy image of its own (on the CPU,
        # where the judge may not be).
        self.num_features = self(torch.zeros(1, *IMAGE_SHAPE)).shape[-1]

    def train(self, mode: bool = True) -> JudgeFeatures:
        # Never leave eval mode: measuring must not update BatchNorm statistics or apply dropout.
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        images = images.to(next(self.judge.parameters()).device)
        out = self.judge.features(images) if self.output == "features" else self.judge(images)
        return out.to("cpu", torch.float64)


# ------------------------------------------------------------------------------- the scores


def frechet_distance(judge: LeNet, real: Tensor, fake: Tensor, batch_size: int = EVAL_BATCH) -> float:
    """Fréchet LeNet Distance between two image sets (torchmetrics' FID on the judge's features)."""
    _check_images(real, "real")
    _check_images(fake, "fake")
    if min(len(real), len(fake)) < 2:
        raise ValueError(f"FID needs at least 2 images per set, got {len(real)} real and {len(fake)} fake")
    # With a custom extractor `normalize` only declares float inputs; torchmetrics rescales nothing.
    fid = FrechetInceptionDistance(feature=JudgeFeatures(judge, "features"), normalize=True)
    for images, is_real in ((real, True), (fake, False)):
        for batch in images.split(batch_size):
            fid.update(batch, real=is_real)
    return float(fid.compute())


def inception_score(
    judge: LeNet, images: Tensor, splits: int = 10, batch_size: int = EVAL_BATCH
) -> tuple[float, float]:
    """Classifier Inception Score (mean, std over `splits`) with the judge's softmax: 1 (one digit) .. 10."""
    _check_images(images, "images")
    if len(images) < splits:
        raise ValueError(f"inception_score needs at least splits={splits} images, got {len(images)}")
    with warnings.catch_warnings():  # the logits of 10k images take 800 kB: the memory warning does not apply
        warnings.filterwarnings("ignore", message="Metric `InceptionScore` will save all extracted features")
        # normalize=False: True would turn our [-1, 1] floats into bytes (torchmetrics does it for any extractor).
        score = InceptionScore(feature=JudgeFeatures(judge, "logits"), splits=splits, normalize=False)
    for batch in images.split(batch_size):
        score.update(batch)
    # torchmetrics shuffles before splitting with the global RNG; a private fixed seed makes the score
    # a function of the images alone and leaves the caller's random stream untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        mean, std = score.compute()
    return float(mean), float(std)


def class_coverage(judge: LeNet, images: Tensor, batch_size: int = EVAL_BATCH) -> dict:
    """Histogram of the judge's predicted digits and its KL divergence from uniform (0: balanced; log 10: one digit)."""
    _check_images(images, "images")
    logits = JudgeFeatures(judge, "logits")
    predicted = torch.cat([logits(batch).argmax(1) for batch in images.split(batch_size)])
    histogram = torch.bincount(predicted, minlength=logits.num_features).numpy()
    uniform = np.full(len(histogram), 1 / len(histogram))
    kl_uniform = entropy(histogram, uniform)  # scipy normalises the counts to probabilities
    return {"histogram": histogram.tolist(), "kl_uniform": float(kl_uniform)}


@torch.no_grad()
def nearest_neighbours(fake: Tensor, train: Tensor, batch_size: int = 512) -> Tensor:
    """Index into `train` of each fake's nearest image (L2 in pixel space), on `train`'s device.

    Fakes go `batch_size` at a time against the whole training set: memory is one
    batch_size x len(train) distance block (512 x 60k floats = 123 MB).
    """
    _check_images(fake, "fake")
    _check_images(train, "train")
    train_flat = train.flatten(1)
    chunks = (chunk.flatten(1).to(train.device) for chunk in fake.split(batch_size))
    return torch.cat([torch.cdist(chunk, train_flat).argmin(1) for chunk in chunks])


def _subset(images: Tensor, n: int, generator: torch.Generator) -> Tensor:
    idx = torch.randperm(len(images), generator=generator, device=generator.device)[:n]
    return images[idx.to(images.device)]


def gan_quality(
    judge: LeNet, fake: Tensor, real_test: Tensor, real_train: Tensor, n: int, generator: torch.Generator
) -> dict:
    """Every score the report shows for one GAN, on n fakes vs n test images (n capped at the test set)."""
    n = min(n, len(real_test))
    for name, images in (("fake", fake), ("real_train", real_train)):
        if len(images) < n:
            raise ValueError(f"{name} holds {len(images)} images, fewer than n={n}: pass at least n, or lower n")
    fake, test, train = (_subset(images, n, generator) for images in (fake, real_test, real_train))
    is_mean, is_std = inception_score(judge, fake)
    coverage = class_coverage(judge, fake)
    return {
        "fid": frechet_distance(judge, test, fake),
        "fid_floor": frechet_distance(judge, test, train),  # real vs real at the same n: the best reachable
        "inception_score": is_mean,
        "inception_score_std": is_std,
        "inception_score_real": inception_score(judge, test)[0],
        "kl_uniform": coverage["kl_uniform"],
        "class_histogram": coverage["histogram"],
        "n": n,
    }


# ------------------------------------------------------------------------------- pictures


def save_grid(images: Tensor, path: Path, nrow: int) -> None:
    """[-1, 1] images (N, C, H, W) -> one PNG grid, `nrow` images per row, grey separators."""
    if images.dim() != 4 or not images.is_floating_point():
        raise ValueError(
            f"save_grid expects float images (N, C, H, W) in [-1, 1], got {images.dtype} {tuple(images.shape)}"
        )
    grid = make_grid(images.detach().cpu().add(1).div(2).clamp(0, 1), nrow=nrow, padding=2, pad_value=0.5)
    pixels = grid.mul(255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    if images.shape[1] == 1:  # make_grid repeats one channel to three: keep the PNG greyscale
        pixels = pixels[..., 0]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def save_progression_gif(frames: list[Path], path: Path, duration_ms: int = 600) -> None:
    """Animated, looping GIF of the per-epoch sample grids (Pillow merges identical consecutive frames)."""
    if not frames:
        raise ValueError("save_progression_gif needs at least one frame; pass the per-epoch sample grid PNGs")
    images = []
    for frame in frames:
        with Image.open(frame) as image:
            images.append(image.copy())
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    images[0].save(path, save_all=True, append_images=images[1:], duration=duration_ms, loop=0)


def save_neighbour_grid(fake: Tensor, train: Tensor, idx: Tensor, path: Path, per_row: int = 10) -> None:
    """Rows of fakes, each directly above a row of their nearest training images."""
    if len(idx) != len(fake):
        raise ValueError(f"idx holds {len(idx)} indices for {len(fake)} fakes; pass nearest_neighbours(fake, train)")
    neighbours = train[idx.to(train.device)].cpu()
    fake = fake.detach().cpu()
    per_row = min(per_row, len(fake))
    blank = torch.full((-len(fake) % per_row, *fake.shape[1:]), -1.0)  # black, like MNIST's background
    fake_rows = torch.cat([fake, blank]).split(per_row)
    neighbour_rows = torch.cat([neighbours, blank]).split(per_row)
    interleaved = torch.cat([row for pair in zip(fake_rows, neighbour_rows) for row in pair])
    save_grid(interleaved, path, nrow=per_row)
