"""The test set's noise: Wilson's score interval of one accuracy, McNemar's exact test of two classifiers
scored on the same images."""

from __future__ import annotations

import math

import pytest

from reprovision.measure import noise

Z = 1.959963984540054  # the normal's 97.5 % quantile


def wilson_by_hand(correct: int, n: int) -> tuple[float, float]:
    """Wilson's closed form, written out: the centre and half width of the score interval."""
    p = correct / n
    centre = (p + Z * Z / (2 * n)) / (1 + Z * Z / n)
    half = Z / (1 + Z * Z / n) * math.sqrt(p * (1 - p) / n + Z * Z / (4 * n * n))
    return centre - half, centre + half


def test_wilson_on_known_values():
    assert noise.wilson_interval(correct=50, n=100) == pytest.approx((0.4038, 0.5962), abs=1e-4)
    for correct, n in ((0, 10), (10, 10), (417, 1000), (3, 7), (9_387, 10_000)):
        assert noise.wilson_interval(correct=correct, n=n) == pytest.approx(wilson_by_hand(correct, n), abs=1e-12)


def test_wilson_has_width_at_none_and_all_right_and_leans_towards_one_half():
    low, high = noise.wilson_interval(correct=0, n=10)
    assert low == 0 and high == pytest.approx(0.2775, abs=1e-4)  # Wald's ± 1.96 sqrt(p(1-p)/n) would say 0
    low, high = noise.wilson_interval(correct=10, n=10)
    assert high == 1 and low == pytest.approx(0.7225, abs=1e-4)
    low, high = noise.wilson_interval(correct=90, n=100)
    assert 0.9 - low > high - 0.9  # not symmetric: the longer side faces 1/2


def test_test_acc_ci95_is_half_the_wilson_width():
    low, high = noise.wilson_interval(correct=14, n=100)
    assert noise.accuracy_ci95(0.14, 100) == pytest.approx((high - low) / 2, abs=1e-15)
    assert noise.accuracy_interval(0.14, 100) == (low, high)


def test_wilson_refuses_counts_that_are_no_accuracy():
    with pytest.raises(ValueError, match=r"11 correct of 10 images; need n > 0 and 0 <= correct <= n"):
        noise.wilson_interval(correct=11, n=10)


def test_mcnemar_exact_on_a_known_table():
    # b = 10, c = 2: 2 x P(X <= 2 | 12, 1/2) = 2 x (1 + 12 + 66) / 4096.
    assert noise.mcnemar_p(only_first=10, only_second=2) == pytest.approx(158 / 4096, abs=1e-15)
    assert noise.mcnemar_p(only_first=10, only_second=2) == pytest.approx(0.0386, abs=1e-4)
    assert noise.mcnemar_p(only_first=2, only_second=10) == noise.mcnemar_p(only_first=10, only_second=2)
    assert noise.mcnemar_p(only_first=6, only_second=6) == 1.0 and noise.mcnemar_p(only_first=0, only_second=0) == 1.0


def test_mcnemar_counts_only_the_images_one_of_the_two_gets_right():
    # 7 both right and 4 both wrong change nothing; 10 only the first, 2 only the second.
    first = [True] * 7 + [False] * 4 + [True] * 10 + [False] * 2
    second = [True] * 7 + [False] * 4 + [False] * 10 + [True] * 2
    paired = noise.mcnemar(first_right=first, second_right=second)
    assert (paired.only_first, paired.only_second, paired.images) == (10, 2, 23)
    assert paired.p_value == noise.mcnemar_p(only_first=10, only_second=2)


def test_mcnemar_needs_the_same_images():
    with pytest.raises(ValueError, match=r"3 and 2 images; both classifiers must be scored on the same images"):
        noise.mcnemar(first_right=[True, False, True], second_right=[True, True])
