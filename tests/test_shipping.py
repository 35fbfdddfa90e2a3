"""What ships (training/shipping.py), on made-up histories and a two-weight model: the best validation
epoch, the first of equals; the last epoch without a validation split; early stop after `patience`
epochs without a better one; the moving average only when it validates strictly better; the why."""

from __future__ import annotations

import math

import torch

from reprovision.training.shipping import (
    ema_ships,
    keep_best,
    restore_best,
    shipped_row,
    stops_early,
    why_ema_ships,
    why_row_ships,
)


def rows(val_accs: list[float]) -> list[dict]:
    return [{"epoch": e, "val_acc": acc, "test_acc": 1 - acc} for e, acc in enumerate(val_accs, start=1)]


def track(val_accs: list[float], *, patience: int = 0) -> tuple[torch.nn.Linear, dict | None, int]:
    """Run the epochs as fit_classifier does, the model's weight set to the epoch's number:
    (model restored to the best, best, the epoch training stopped after)."""
    model = torch.nn.Linear(1, 1, bias=False)
    best = None
    for row in rows(val_accs):
        with torch.no_grad():
            model.weight.fill_(row["epoch"])
        best = keep_best(best, row=row, model=model)
        if stops_early(best, epoch=row["epoch"], patience=patience):
            break
    restore_best(model, best)
    return model, best, row["epoch"]


def test_the_best_validation_epoch_ships_the_first_of_equals():
    history = rows([0.5, 0.7, 0.6, 0.7, 0.4])
    assert shipped_row(history, validated=True)["epoch"] == 2
    model, best, _ = track([0.5, 0.7, 0.6, 0.7, 0.4])
    assert best["epoch"] == 2 and best["val_acc"] == 0.7 and model.weight.item() == 2.0


def test_the_kept_weights_are_a_copy_not_the_live_ones():
    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    best = keep_best(None, row={"epoch": 1, "val_acc": 0.5}, model=model)
    with torch.no_grad():
        model.weight.fill_(9.0)
    assert best["model"]["weight"].item() == 1.0


def test_a_nan_never_takes_over_the_best():
    _, best, _ = track([0.5, math.nan, 0.4])
    assert best["epoch"] == 1


def test_without_a_validation_split_the_last_epoch_ships():
    history = [{"epoch": e, "test_acc": acc} for e, acc in enumerate([0.9, 0.2, 0.5], start=1)]
    assert shipped_row(history, validated=False)["epoch"] == 3
    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(3.0)
    best = None
    for row in history:
        best = keep_best(best, row=row, model=model)
        assert not stops_early(best, epoch=row["epoch"], patience=1)
    assert best is None
    restore_best(model, best)
    assert model.weight.item() == 3.0  # left as the last epoch left it


def test_early_stop_counts_epochs_since_the_best():
    # Best at 2; 3 and 4 (an equal) are not better: patience 2 stops after epoch 4, patience 1 after 3.
    accs = [0.5, 0.7, 0.6, 0.7, 0.9, 0.1]
    assert track(accs, patience=2)[2] == 4
    assert track(accs, patience=1)[2] == 3
    assert track(accs, patience=3)[2] == 6  # epoch 5 improves in time, and the run ends
    assert track(accs, patience=0)[2] == 6  # 0: never
    model, best, _ = track(accs, patience=2)
    assert best["epoch"] == 2 and model.weight.item() == 2.0


def test_the_average_ships_only_when_strictly_better_on_validation():
    shipped = {"epoch": 3, "val_acc": 0.75}
    assert ema_ships({"acc": 0.76, "loss": 1.0}, shipped=shipped)
    assert not ema_ships({"acc": 0.75, "loss": 0.1}, shipped=shipped)  # a tie keeps the epoch
    assert not ema_ships({"acc": 0.5, "loss": 0.1}, shipped=shipped)
    assert not ema_ships(None, shipped=shipped)  # no validation split: never


def test_the_why():
    assert why_row_ships(validated=True) == "the best validation accuracy"
    assert why_row_ships(validated=False) == "the last epoch (no validation split)"
    assert why_ema_ships(ema_decay=0.999, epoch=12, ema_val_acc=0.81234, best_val_acc=0.8) == (
        "the weights' moving average (ema_decay 0.999) after epoch 12: "
        "validation accuracy 0.8123 against the best epoch's 0.8000"
    )
