"""The skeleton every training loop shares (fit_classifier, fit_gan, fit_simclr): resume, history, checkpoint.

A loop builds its networks and optimisers, then

    loop = Epochs(epochs, checkpoint=..., fingerprint=..., generator=..., device=..., on_epoch=...)
    loop.resume(restore=lambda state: ...)  # put its own parts of a resumable checkpoint back
    for epoch in loop.epochs():
        row = ...  # train one epoch, score it, print it
        loop.end_epoch(row, complete=epoch == epochs, state=lambda: {...})  # its own parts to checkpoint

`resume` picks up a checkpoint that may be resumed (checkpoint.load: same fingerprint, not complete),
restores the loop's random streams (checkpoint.restore_rng) and replays the saved rows through `on_epoch`,
so that a new tracking run gets the whole metric history. `end_epoch` appends the row and writes the
atomic checkpoint: the loop's parts, its random streams and the history.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from reprovision.core import checkpoint as ckpt


class Epochs:
    """The epochs of one training run and what carries it across a kill: see the module's docstring.

    `main`: whether this process writes the checkpoint, speaks and calls `on_epoch` after an epoch
    (rank 0 of a distributed run; every rank resumes and replays). `hook_first`: call `on_epoch` before
    the checkpoint is written instead of after, so that what it adds to the row is checkpointed too.
    """

    def __init__(
        self,
        epochs: int,
        *,
        checkpoint: Path | None,
        fingerprint: str,
        generator: torch.Generator,
        device: torch.device,
        on_epoch: Callable[[dict], None] | None = None,
        main: bool = True,
        hook_first: bool = False,
    ):
        self.last = epochs
        self.checkpoint = checkpoint
        self.fingerprint = fingerprint
        self.generator = generator
        self.device = device
        self.on_epoch = on_epoch
        self.main = main
        self.hook_first = hook_first
        self.history: list[dict] = []
        self.first = 1

    def resume(self, restore: Callable[[dict], None], resumed: Callable[[dict], None] | None = None) -> None:
        """Pick up a resumable checkpoint, if any: `restore(state)` puts the loop's own parts back, then the
        random streams, the history and the next epoch; `resumed(state)` after the message, before the replay."""
        state = ckpt.load(self.checkpoint, self.fingerprint, main=self.main)
        if state is None:
            return
        restore(state)
        ckpt.restore_rng(state["rng"], self.generator, self.device)
        self.history = state["history"]
        self.first = state["epoch"] + 1
        if self.main:
            print(f"resuming from {self.checkpoint} after epoch {state['epoch']}", flush=True)
        if resumed is not None:
            resumed(state)
        for row in self.history:  # the new tracking run gets the whole metric history, not just the tail
            if self.on_epoch is not None:
                self.on_epoch(row)

    def epochs(self) -> range:
        """The epochs still to train, 1-based."""
        return range(self.first, self.last + 1)

    def end_epoch(self, row: dict, *, complete: bool, state: Callable[[], dict]) -> None:
        """Append `row` to the history; on the main process, checkpoint (`state()`: the loop's own parts,
        `complete`: the run ends here) and call `on_epoch`, in the order `hook_first` says."""
        self.history.append(row)
        if not self.main:
            return
        if self.hook_first and self.on_epoch is not None:
            self.on_epoch(row)
        if self.checkpoint is not None:
            ckpt.save(
                self.checkpoint,
                {
                    "fingerprint": self.fingerprint,
                    "epoch": row["epoch"],
                    "complete": complete,
                    **state(),
                    "rng": ckpt.capture_rng(self.generator, self.device),
                    "history": self.history,
                },
            )
        if not self.hook_first and self.on_epoch is not None:
            self.on_epoch(row)


def state_of(parts: dict) -> dict:
    """The state dicts of a loop's parts (networks, optimisers, schedulers), under their checkpoint keys."""
    return {key: part.state_dict() for key, part in parts.items()}


def load_into(parts: dict, state: dict) -> None:
    """Put what `state_of` saved back into the parts."""
    for key, part in parts.items():
        part.load_state_dict(state[key])
