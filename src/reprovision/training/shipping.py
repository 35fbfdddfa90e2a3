"""What ships: which weights a classifier's training hands on, and the one line that says why.

With a validation split, the weights of the best validation epoch (the first of equals): `fit_classifier`
keeps them as the epochs go (`keep_best`), stops once `early_stop` epochs have passed without a better one
(`stops_early`) and ends holding them (`restore_best`). Without one, the last epoch's. The test split
decides nothing. The train-<family> stage then reads the shipped row of the history (`shipped_row`,
`why_row_ships`) and, when the recipe keeps a moving average of the weights, ships the average instead
only if it validates strictly better than that row (`ema_ships`, `why_ema_ships`).

`best` is the dict the classifier's checkpoint holds: {"epoch", "val_acc", "model"} (the weights), or None.
"""

from __future__ import annotations

import torch


def keep_best(best: dict | None, *, row: dict, model: torch.nn.Module) -> dict | None:
    """`best`, or this epoch's (a copy of the model's weights) if its validation accuracy is strictly higher:
    the first of equals stays. A row without `val_acc` (no validation split) changes nothing."""
    if "val_acc" not in row:
        return best
    if best is not None and not row["val_acc"] > best["val_acc"]:  # not `<=`: a NaN never takes over
        return best
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return {"epoch": row["epoch"], "val_acc": row["val_acc"], "model": weights}


def stops_early(best: dict | None, *, epoch: int, patience: int) -> bool:
    """Whether training stops after `epoch`: `patience` (> 0) epochs have passed since the best one.
    Never without a validation split (no `best`) or with `patience` 0."""
    return best is not None and patience > 0 and epoch - best["epoch"] >= patience


def restore_best(model: torch.nn.Module, best: dict | None) -> None:
    """Put the best validation epoch's weights back into `model` (nothing without a validation split)."""
    if best is not None:
        model.load_state_dict(best["model"])


def shipped_row(history: list[dict], *, validated: bool) -> dict:
    """The history row whose weights ship: the best validation epoch's (the first of equals), else the last."""
    return max(history, key=lambda row: row["val_acc"]) if validated else history[-1]


def why_row_ships(*, validated: bool) -> str:
    """Why `shipped_row` ships, as the summary's `shipped_why` says it."""
    return "the best validation accuracy" if validated else "the last epoch (no validation split)"


def ema_ships(ema_val: dict | None, *, shipped: dict) -> bool:
    """Whether the weights' moving average ships instead of the `shipped` row's: only when its validation
    score `ema_val` ({"acc", ...}, None without a validation split) is strictly better."""
    return ema_val is not None and ema_val["acc"] > shipped["val_acc"]


def why_ema_ships(*, ema_decay: float, epoch: int, ema_val_acc: float, best_val_acc: float) -> str:
    """Why the average after `epoch` ships, as the summary's `shipped_why` says it."""
    return (
        f"the weights' moving average (ema_decay {ema_decay}) after epoch {epoch}: "
        f"validation accuracy {ema_val_acc:.4f} against the best epoch's {best_val_acc:.4f}"
    )
