"""Checkpoints that cannot be resumed cost a restart, never the file or the run: checkpoint.load moves a
truncated, random, foreign or old-layout file aside to `<name>.pt.corrupt`, says so in one line and
returns None; it loads with weights_only, so a pickled object that would run code is never built; a
stale fingerprint starts afresh and leaves the file where it is; save flushes the file and its folder."""

from __future__ import annotations

import os
import re
import stat

import pytest
import torch

from reprovision.core import checkpoint as ckpt


def a_checkpoint(fingerprint: str = "fp") -> dict:
    return {
        "fingerprint": fingerprint,
        "epoch": 2,
        "complete": False,
        "model": {"w": torch.randn(3, 3)},
        "rng": {"torch": torch.get_rng_state(), "cuda": None},
        "history": [{"epoch": 1, "loss": 0.5, "device": "cpu"}],
    }


def loaded_aside(path, capsys) -> str:
    """Load `path`, check it was moved aside and the stage told so in one line; that line."""
    assert ckpt.load(path, "fp") is None
    lines = capsys.readouterr().out.splitlines()
    aside = path.with_name(path.name + ".corrupt")
    assert not path.exists() and aside.exists()
    assert len(lines) == 1 and str(path) in lines[0] and str(aside) in lines[0] and "starts afresh" in lines[0]
    return lines[0]


def test_a_saved_checkpoint_loads_back_with_its_format(tmp_path):
    path, saved = tmp_path / "cnn.pt", a_checkpoint()
    ckpt.save(path, saved)
    state = ckpt.load(path, "fp")
    assert state["format"] == ckpt.FORMAT and state["epoch"] == 2 and state["history"] == saved["history"]
    assert torch.equal(state["model"]["w"], saved["model"]["w"]) and torch.equal(
        state["rng"]["torch"], saved["rng"]["torch"]
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cnn.pt"]  # no temporary file left


def test_save_flushes_the_file_and_then_its_folder(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        synced.append("folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    ckpt.save(tmp_path / "cnn.pt", a_checkpoint())
    assert synced == ["file", "folder"]


def test_a_stale_fingerprint_starts_afresh_and_leaves_the_file(tmp_path, capsys):
    path = tmp_path / "cnn.pt"
    ckpt.save(path, a_checkpoint("other params"))
    assert ckpt.load(path, "fp") is None
    assert path.exists() and not path.with_name("cnn.pt.corrupt").exists() and capsys.readouterr().out == ""


def test_a_truncated_checkpoint_is_moved_aside(tmp_path, capsys):
    path = tmp_path / "cnn.pt"
    ckpt.save(path, a_checkpoint())
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) // 2])  # a disk that filled mid-write, a copy cut short
    assert "truncated or corrupt" in loaded_aside(path, capsys)
    assert path.with_name("cnn.pt.corrupt").read_bytes() == whole[: len(whole) // 2]  # kept as it was


def test_random_bytes_are_moved_aside_replacing_an_older_corrupt_file(tmp_path, capsys):
    path = tmp_path / "cnn.pt"
    path.with_name("cnn.pt.corrupt").write_bytes(b"an older one")
    noise = torch.randint(0, 256, (4096,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    path.write_bytes(bytes(noise.tolist()))
    assert "truncated or corrupt" in loaded_aside(path, capsys)
    assert path.with_name("cnn.pt.corrupt").read_bytes() == bytes(noise.tolist())


@pytest.mark.parametrize(
    "other",
    [
        a_checkpoint(),  # the layout before `format`: torch.save of the bare dict
        {"format": ckpt.FORMAT + 1, **a_checkpoint()},  # a later version's
        [a_checkpoint()],  # not a dict at all
    ],
    ids=["no-format", "later-format", "a-list"],
)
def test_a_file_of_another_version_is_moved_aside(tmp_path, capsys, other):
    path = tmp_path / "cnn.pt"
    torch.save(other, path)  # a valid torch file, but not this version's checkpoint
    assert "not a checkpoint of this version" in loaded_aside(path, capsys)


class RunsCodeOnLoad:
    """What a malicious checkpoint holds: unpickling it calls open(marker, "w")."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_pickled_object_that_would_run_code_is_never_built(tmp_path, capsys):
    path, marker = tmp_path / "cnn.pt", tmp_path / "ran"
    torch.save({**a_checkpoint(), "format": ckpt.FORMAT, "payload": RunsCodeOnLoad(marker)}, path)
    assert re.search(r"holds a pickled object \([\w.]*open\)", loaded_aside(path, capsys))
    assert not marker.exists()
    torch.load(path.with_name("cnn.pt.corrupt"), weights_only=False)  # without weights_only the payload runs:
    assert marker.exists()  # so the file tested above was a live one


def test_other_ranks_start_afresh_without_moving_or_saying_anything(tmp_path, capsys):
    path = tmp_path / "cnn.pt"
    path.write_bytes(b"not a checkpoint")
    assert ckpt.load(path, "fp", main=False) is None
    assert path.exists() and capsys.readouterr().out == ""
