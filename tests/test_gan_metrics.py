import math

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from PIL import Image

from reprovision.config import JudgeConfig
from reprovision.data.pixels import to_pm1
from reprovision.measure.gan_metrics import (
    class_coverage,
    frechet_distance,
    gan_quality,
    inception_score,
    nearest_neighbours,
    save_grid,
    save_neighbour_grid,
    save_progression_gif,
)
from reprovision.models.judge import LeNet
from reprovision.training.fit_judge import fit_judge

CPU = torch.device("cpu")


def random_images(n: int, seed: int) -> torch.Tensor:
    return torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.fixture(scope="module")
def judge() -> LeNet:
    torch.manual_seed(0)
    return LeNet().eval()


class OracleJudge(LeNet):
    """A judge whose logits we control: an image of constant value -1 + 2k/9 is digit k, with certainty."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        digit = ((x.mean(dim=(1, 2, 3)) + 1) * 4.5).round().long()
        return 50.0 * F.one_hot(digit, 10).float()


def digit_images(digits: list[int]) -> torch.Tensor:
    return torch.tensor(digits, dtype=torch.float32).mul(2 / 9).sub(1).view(-1, 1, 1, 1).expand(-1, 1, 28, 28).clone()


def test_to_pm1_maps_the_byte_range_onto_minus_one_to_one():
    out = to_pm1(torch.tensor([0, 255], dtype=torch.uint8))
    assert out.dtype == torch.float32 and out.tolist() == [-1.0, 1.0]
    with pytest.raises(TypeError, match="uint8"):
        to_pm1(torch.zeros(2))


# ------------------------------------------------------------------------------- FID


def scipy_frechet(judge: LeNet, a: torch.Tensor, b: torch.Tensor) -> float:
    with torch.no_grad():
        fa, fb = (judge.features(x).double().numpy() for x in (a, b))
    mu_a, mu_b = fa.mean(0), fb.mean(0)
    cov_a, cov_b = np.cov(fa, rowvar=False), np.cov(fb, rowvar=False)
    covmean = scipy.linalg.sqrtm(cov_a @ cov_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * covmean))


def test_fid_of_a_set_with_itself_is_zero_and_grows_with_noise(judge):
    real = random_images(200, seed=1)
    noise = torch.randn(real.shape, generator=torch.Generator().manual_seed(2))
    slightly, heavily = ((real + s * noise).clamp(-1, 1) for s in (0.1, 0.5))
    same = frechet_distance(judge, real, real, batch_size=128)
    fid_slight = frechet_distance(judge, real, slightly)
    fid_heavy = frechet_distance(judge, real, heavily)
    fid_shift = frechet_distance(judge, real, (real - 0.5).clamp(-1, 1))
    assert abs(same) < 1e-6 * fid_slight
    assert 0 < fid_slight < fid_heavy
    assert fid_shift > fid_slight
    assert frechet_distance(judge, heavily, real) == pytest.approx(fid_heavy, rel=1e-6)


# The random judge has dead ReLU units, so both covariances are singular; sqrtm warns, yet agrees.
@pytest.mark.filterwarnings("ignore:Matrix is singular")
def test_fid_matches_a_direct_scipy_computation_on_the_judge_features(judge):
    real, fake = random_images(250, seed=3), random_images(200, seed=4) * 0.7
    ours = frechet_distance(judge, real, fake, batch_size=128)
    assert ours == pytest.approx(scipy_frechet(judge, real, fake), rel=1e-3)


def test_fid_rejects_uint8_images_and_names_the_fix(judge):
    with pytest.raises(ValueError, match="to_pm1"):
        frechet_distance(judge, torch.zeros(4, 1, 28, 28, dtype=torch.uint8), random_images(4, seed=0))
    with pytest.raises(ValueError, match=r"\(N, 1, 28, 28\)"):
        frechet_distance(judge, random_images(4, seed=0), torch.zeros(4, 3, 32, 32))


# ------------------------------------------------------------------------------- IS and coverage


def test_inception_score_is_one_for_a_single_digit_and_ten_for_all_digits_evenly():
    oracle = OracleJudge().eval()
    one_digit = digit_images([3] * 200)
    assert inception_score(oracle, one_digit)[0] == pytest.approx(1.0, abs=1e-6)
    all_digits = digit_images(list(range(10)) * 100)
    with pytest.warns(UserWarning, match="degrees of freedom"):  # one split: no spread to report
        assert inception_score(oracle, all_digits, splits=1)[0] == pytest.approx(10.0, rel=1e-6)
    mean, std = inception_score(oracle, all_digits, splits=10)  # random splits are only nearly balanced
    assert 9.0 < mean <= 10.0 and std >= 0


def test_inception_score_is_repeatable_and_leaves_the_global_rng_alone(judge):
    images = random_images(100, seed=5)
    state = torch.get_rng_state()
    first = inception_score(judge, images, splits=5)
    assert torch.equal(torch.get_rng_state(), state)
    assert inception_score(judge, images, splits=5) == first


def test_class_coverage_kl_is_zero_when_balanced_and_log10_for_one_digit():
    oracle = OracleJudge().eval()
    balanced = class_coverage(oracle, digit_images(list(range(10)) * 7))
    assert balanced["histogram"] == [7] * 10
    assert balanced["kl_uniform"] == pytest.approx(0.0, abs=1e-12)
    collapsed = class_coverage(oracle, digit_images([8] * 30))
    assert collapsed["histogram"] == [0] * 8 + [30, 0]
    assert collapsed["kl_uniform"] == pytest.approx(math.log(10))


# ------------------------------------------------------------------------------- neighbours


def test_nearest_neighbours_finds_exact_copies_and_chunking_changes_nothing():
    train = random_images(500, seed=6)
    copies = [7, 250, 499]
    fake = torch.cat([train[copies], random_images(20, seed=7)])
    chunked = nearest_neighbours(fake, train, batch_size=4)
    assert chunked[:3].tolist() == copies
    brute = ((fake.flatten(1)[:, None] - train.flatten(1)[None]) ** 2).sum(-1).argmin(1)
    assert torch.equal(chunked, brute)
    assert torch.equal(nearest_neighbours(fake, train, batch_size=1000), chunked)


# ------------------------------------------------------------------------------- gan_quality


def test_gan_quality_reports_every_score_and_is_repeatable(judge):
    real_train, real_test = random_images(200, seed=8), random_images(150, seed=9)
    fake = random_images(200, seed=10) * 0.3

    def run():
        return gan_quality(judge, fake, real_test, real_train, n=180, generator=torch.Generator().manual_seed(0))

    scores = run()
    assert scores["n"] == 150  # capped at the test set
    assert set(scores) == {
        "fid", "fid_floor", "inception_score", "inception_score_std", "inception_score_real",
        "kl_uniform", "class_histogram", "n",
    }  # fmt: skip
    assert sum(scores["class_histogram"]) == 150
    assert scores["fid"] > scores["fid_floor"] >= 0  # squashed images are further from real than real from real
    assert 1 <= scores["inception_score"] <= 10 and 1 <= scores["inception_score_real"] <= 10
    assert run() == scores
    with pytest.raises(ValueError, match="fake holds 50 images"):
        gan_quality(judge, fake[:50], real_test, real_train, n=150, generator=torch.Generator())


# ------------------------------------------------------------------------------- the judge


def striped_digits(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A learnable toy task: digit k is a bright band at rows 2k..2k+4 over uniform noise."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 10, (n,), generator=gen)
    x = torch.randint(0, 80, (n, 1, 28, 28), generator=gen, dtype=torch.uint8)
    for i, k in enumerate(y.tolist()):
        x[i, 0, 2 * k + 2 : 2 * k + 6] = 255
    return x, y


def test_train_judge_learns_a_toy_task_and_is_deterministic_given_the_generator():
    train_x, train_y = striped_digits(192, seed=0)
    test_x, test_y = striped_digits(64, seed=1)

    def run(seed: int, epochs: int = 3):
        gen = torch.Generator().manual_seed(seed)
        cfg = JudgeConfig(epochs=epochs, batch_size=32, lr=3e-3)
        return fit_judge(train_x, train_y, test_x, test_y, cfg, CPU, gen, progress=False)

    model, history = run(0)
    assert not model.training
    assert [row["epoch"] for row in history] == [1, 2, 3]
    keys = {"epoch", "train_loss", "train_acc", "test_loss", "test_acc", "epoch_seconds"}
    assert all(set(row) == keys for row in history)
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert history[-1]["test_acc"] > 0.5  # chance is 0.1

    again, history_again = run(0)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    assert [row["test_loss"] for row in history_again] == [row["test_loss"] for row in history]
    other, _ = run(1, epochs=1)
    assert not torch.equal(other.classifier.weight, model.classifier.weight)


def test_train_judge_rejects_scaled_images():
    x, y = striped_digits(10, seed=0)
    with pytest.raises(ValueError, match="uint8"):
        fit_judge(to_pm1(x), y, x, y, JudgeConfig(), CPU, torch.Generator(), progress=False)


# ------------------------------------------------------------------------------- pictures


def test_save_grid_writes_a_greyscale_png_of_the_right_size(tmp_path):
    path = tmp_path / "grids" / "grid.png"
    save_grid(random_images(12, seed=0), path, nrow=4)
    with Image.open(path) as image:
        assert image.mode == "L"
        assert image.size == (4 * 30 + 2, 3 * 30 + 2)  # 28-pixel tiles, 2-pixel separators


def test_progression_gif_has_one_frame_per_grid(tmp_path):
    frames = []
    for epoch in range(3):
        frames.append(tmp_path / f"epoch_{epoch}.png")
        save_grid(random_images(4, seed=epoch), frames[-1], nrow=2)
    save_progression_gif(frames, tmp_path / "progress.gif", duration_ms=100)
    with Image.open(tmp_path / "progress.gif") as gif:
        assert gif.n_frames == 3
    with pytest.raises(ValueError, match="at least one frame"):
        save_progression_gif([], tmp_path / "empty.gif")


def test_neighbour_grid_puts_each_fake_above_its_training_neighbour(tmp_path):
    train = random_images(40, seed=11)
    fake = random_images(7, seed=12)
    idx = nearest_neighbours(fake, train)
    save_neighbour_grid(fake, train, idx, tmp_path / "nn.png", per_row=4)
    pixels = np.asarray(Image.open(tmp_path / "nn.png"))
    assert pixels.shape == (4 * 30 + 2, 4 * 30 + 2)  # 2 fake rows + 2 neighbour rows, 4 per row

    def tile(row: int, col: int) -> np.ndarray:
        return pixels[2 + 30 * row : 30 * row + 30, 2 + 30 * col : 30 * col + 30].astype(int)

    def expected(image: torch.Tensor) -> np.ndarray:
        return image[0].add(1).div(2).mul(255).round().numpy().astype(int)

    for i in range(7):
        row, col = 2 * (i // 4), i % 4
        assert np.abs(tile(row, col) - expected(fake[i])).max() <= 1
        assert np.abs(tile(row + 1, col) - expected(train[idx[i]])).max() <= 1
    assert tile(2, 3).max() == 0  # the unused slot is blank
