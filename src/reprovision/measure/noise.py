"""The test set's own noise: how far an accuracy measured on n images may lie from the model's true one
(Wilson's score interval), and whether two models scored on the same images differ (McNemar's exact test).

Two accuracies are never compared by their intervals: they are measured on the same images, so their
errors are correlated, and overlapping intervals do not mean "no difference" (nor the reverse). What
tells them apart is the images on which exactly one of the two is right (McNemar). Across seeds, with
no per-image predictions, `reprovision study` compares means with Student's t instead.

scipy is imported on first use: evaluate, which writes `accuracy_ci95`, pays for it once, at the end.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

CONFIDENCE = 0.95


def wilson_interval(*, correct: int, n: int) -> tuple[float, float]:
    """The 95 % Wilson score interval of an accuracy of `correct` out of `n` images, (low, high).

    Not centred on correct / n (it leans towards 1/2), never outside [0, 1], and of non-zero width at
    0/n and n/n, where the normal approximation (Wald's ± 1.96 sqrt(p(1-p)/n)) claims no noise at all.
    """
    from scipy.stats import binomtest

    if n <= 0 or not 0 <= correct <= n:
        raise ValueError(f"wilson_interval: {correct} correct of {n} images; need n > 0 and 0 <= correct <= n")
    ci = binomtest(correct, n).proportion_ci(confidence_level=CONFIDENCE, method="wilson")
    return float(ci.low), float(ci.high)


def accuracy_interval(acc: float, n: int) -> tuple[float, float]:
    """The 95 % Wilson interval of an accuracy `acc` measured on n images (acc x n is a whole count)."""
    return wilson_interval(correct=round(acc * n), n=n)


def accuracy_ci95(acc: float, n: int) -> float:
    """Half the width of the 95 % Wilson interval of an accuracy measured on n images: the one figure
    `accuracy_ci95` (metrics/evaluate.json) in `dvc exp show`. The interval is not symmetric around acc
    (see wilson_interval): the report prints its bounds (accuracy_interval), and this half width says
    only how wide it is."""
    low, high = accuracy_interval(acc, n)
    return (high - low) / 2


@dataclass(frozen=True)
class Paired:
    """Two classifiers on the same images: `only_first` images only the first gets right (McNemar's b),
    `only_second` only the second (c), and the exact two-sided p-value of so uneven a split were the
    two equally accurate (a binomial test of b in b + c at 1/2; 1.0 when they never disagree)."""

    only_first: int
    only_second: int
    p_value: float
    images: int


def mcnemar_p(*, only_first: int, only_second: int) -> float:
    """McNemar's exact two-sided p-value from the two discordant counts (b, c)."""
    from scipy.stats import binomtest

    if only_first < 0 or only_second < 0:
        raise ValueError(f"mcnemar_p: discordant counts {only_first}, {only_second}; they count images, so >= 0")
    if only_first + only_second == 0:
        return 1.0  # right and wrong on the same images: nothing tells them apart
    return float(binomtest(only_first, only_first + only_second, 0.5).pvalue)


def mcnemar(*, first_right: Sequence[bool], second_right: Sequence[bool]) -> Paired:
    """McNemar's exact test of two classifiers from whether each got each image right (the same images,
    in the same order)."""
    if len(first_right) != len(second_right):
        raise ValueError(
            f"mcnemar: {len(first_right)} and {len(second_right)} images; both classifiers must be scored "
            "on the same images, in the same order"
        )
    pairs = list(zip(map(bool, first_right), map(bool, second_right)))
    only_first = sum(a and not b for a, b in pairs)
    only_second = sum(b and not a for a, b in pairs)
    p_value = mcnemar_p(only_first=only_first, only_second=only_second)
    return Paired(only_first=only_first, only_second=only_second, p_value=p_value, images=len(pairs))
