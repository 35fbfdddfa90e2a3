"""What ships is the best validation epoch: fit_classifier ends holding its weights (the first of
equals), stops early after `early_stop` epochs without a better one, and a resumed run ends exactly
as an uninterrupted one; without a validation split, the last epoch, as before. A checkpoint that
cannot be read is moved aside and the run starts from epoch 1, ending as one that had none."""

from __future__ import annotations

import pytest
import torch

from reprovision.config import CNNConfig, ConfigError, parse_params
from reprovision.core import runtime
from reprovision.data.augment import BatchAugment, Policy
from reprovision.models.cnn import RefCNN
from reprovision.training.fit_classifier import DeviceData, evaluate, fit_classifier

CPU = torch.device("cpu")
POLICY = Policy("tiny", (0.5,) * 3, (0.25,) * 3, 2, True, 0.0, 1.0, 0.0, 0.2, 0.0, 8)
EPOCHS = 6


def splits() -> tuple[DeviceData, DeviceData, DeviceData]:
    g = torch.Generator().manual_seed(3)
    y = torch.arange(160) % 4
    # A brightness band per class plus heavy noise: learnable, with a validation accuracy that moves.
    x = (y.view(-1, 1, 1, 1) * 40 + torch.randint(0, 120, (160, 3, 8, 8), generator=g)).to(torch.uint8)
    return DeviceData(x[:96], y[:96]), DeviceData(x[96:128], y[96:128]), DeviceData(x[128:], y[128:])


def train(*, validate: bool = True, early_stop: int = 0, checkpoint=None, on_epoch=None, test_labels=None):
    """`test_labels`: a function of the test split's labels, the labels the test split is scored on instead."""
    torch.set_num_threads(1)
    rng = runtime.seed_everything(0, CPU)
    cfg = CNNConfig(epochs=EPOCHS, batch_size=16, widths=[8, 16], hidden=16, precision="fp32", early_stop=early_stop)
    model = RefCNN(channels=3, num_classes=4, widths=(8, 16), hidden=16)
    train_data, val, test = splits()
    if test_labels is not None:
        test = DeviceData(test.x, test_labels(test.y))
    snapshots = {}

    def record(row):
        snapshots[row["epoch"]] = {k: v.clone() for k, v in model.state_dict().items()}
        if on_epoch is not None:
            on_epoch(row)

    history = fit_classifier(
        model,
        train_data,
        val if validate else None,
        test,
        BatchAugment(POLICY, 4, rng),
        cfg,
        1e-2,
        rng,
        checkpoint=checkpoint,
        fingerprint="best-epoch",
        on_epoch=record,
        progress=False,
    )
    return model.state_dict(), history, snapshots


def same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def test_the_model_ends_with_its_best_validation_epoch_not_its_last():
    weights, history, snapshots = train()
    accs = [row["val_acc"] for row in history]
    best = accs.index(max(accs)) + 1  # the first of equals
    assert best < EPOCHS, f"this task must peak before its last epoch to test anything: {accs}"
    assert same(weights, snapshots[best]) and not same(weights, snapshots[EPOCHS])


def test_the_shipped_epoch_is_the_validation_peak_where_the_test_split_peaks_elsewhere():
    """The test split scored with each image labelled as the next class: its accuracy peaks at another epoch
    than the validation accuracy. The weights that ship are the validation peak's, scoring that epoch's
    figures on both splits; the test split's favourite epoch does not ship (the test split decides nothing)."""
    shifted = lambda y: (y + 1) % 4  # noqa: E731
    weights, history, snapshots = train(test_labels=shifted)
    val_accs, test_accs = [row["val_acc"] for row in history], [row["test_acc"] for row in history]
    val_best, test_best = val_accs.index(max(val_accs)) + 1, test_accs.index(max(test_accs)) + 1
    assert val_best != test_best, f"the two splits must disagree to test anything: {val_accs} vs {test_accs}"
    assert same(weights, snapshots[val_best]) and not same(weights, snapshots[test_best])

    model = RefCNN(channels=3, num_classes=4, widths=(8, 16), hidden=16)
    model.load_state_dict(weights)
    _, val, test = splits()
    scoring = BatchAugment(POLICY, 4, torch.Generator().manual_seed(0))  # evaluation only normalises
    shipped = {
        split: evaluate(model, data, scoring, 1000, None)["acc"]
        for split, data in (("val", val), ("test", DeviceData(test.x, shifted(test.y))))
    }
    assert shipped == {"val": max(val_accs), "test": test_accs[val_best - 1]}
    assert shipped["test"] < max(test_accs)


def test_without_a_validation_split_the_last_epoch_ships():
    weights, history, snapshots = train(validate=False)
    assert len(history) == EPOCHS and same(weights, snapshots[EPOCHS])


def test_early_stop_ends_after_patience_epochs_without_a_better_one():
    full = train()[1]
    accs = [row["val_acc"] for row in full]
    first_stall = next(e for e in range(2, EPOCHS + 1) if max(accs[: e - 1]) >= accs[e - 1])
    weights, history, snapshots = train(early_stop=1)
    assert len(history) == first_stall  # one epoch without improvement, then stop
    best = accs[:first_stall].index(max(accs[:first_stall])) + 1
    timeless = [[{k: v for k, v in row.items() if k != "epoch_seconds"} for row in h] for h in (history, full)]
    assert timeless[0] == timeless[1][:first_stall] and same(weights, snapshots[best])


def test_a_resumed_run_ships_what_an_uninterrupted_one_does(tmp_path):
    uninterrupted = train()[0]

    def crash_after_epoch_2(row):
        if row["epoch"] == 2:
            raise KeyboardInterrupt  # after epoch 2's checkpoint, as a kill would be

    with pytest.raises(KeyboardInterrupt):
        train(checkpoint=tmp_path / "cnn.pt", on_epoch=crash_after_epoch_2)
    resumed, history, _ = train(checkpoint=tmp_path / "cnn.pt")
    assert len(history) == EPOCHS and same(resumed, uninterrupted)


def test_a_corrupt_checkpoint_is_moved_aside_and_training_starts_from_epoch_1(tmp_path, capsys):
    uninterrupted, full, _ = train()
    capsys.readouterr()
    path = tmp_path / "cnn.pt"
    path.write_bytes(b"PK\x03\x04" + bytes(range(256)) * 4)  # the head of a zip, then nothing a torch file holds
    weights, history, _ = train(checkpoint=path)
    out = capsys.readouterr().out
    assert [row["epoch"] for row in history] == list(range(1, EPOCHS + 1)) and "resuming" not in out
    said = [line for line in out.splitlines() if str(path) in line]
    assert len(said) == 1 and f"moved to {path}.corrupt" in said[0] and "starts afresh" in said[0]
    assert path.with_name("cnn.pt.corrupt").read_bytes()[:4] == b"PK\x03\x04"
    timeless = [[{k: v for k, v in row.items() if k != "epoch_seconds"} for row in h] for h in (history, full)]
    assert timeless[0] == timeless[1] and same(weights, uninterrupted)
    assert torch.load(path, weights_only=True)["complete"]  # and a sound checkpoint took its place


def test_early_stop_without_a_validation_split_is_a_config_error():
    with pytest.raises(ConfigError, match=r"cnn.early_stop = 3 decides on a validation split.*data.val_fraction"):
        parse_params({"cnn": {"early_stop": 3}})
    assert parse_params({"cnn": {"early_stop": 3}, "data": {"val_fraction": 0.1}}).cnn.early_stop == 3
