"""The test set's own noise: how far an accuracy measured on n images may lie from the model's true one."""

import math


def accuracy_ci95(acc: float, n: int) -> float:
    """Half the 95 % interval of an accuracy measured on n images (binomial, normal approximation): two
    accuracies closer than their two halves together are not told apart by that test set."""
    return 1.96 * math.sqrt(acc * (1 - acc) / n)
