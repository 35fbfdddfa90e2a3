"""Data-parallel training across processes: torchrun + DistributedDataParallel.

A classifier stage with `dist.nproc: N > 1` starts itself again under `torchrun --standalone`
(`relaunch`), so that its DVC command stays `python stages/train_<model>.py` whatever N is and a
run with N = 1 pays nothing for this module. Launched by torchrun by hand (multi-node: its c10d
rendezvous, README "Team setup"), the stage finds torchrun's RANK / WORLD_SIZE / LOCAL_RANK and
checks them against `dist.nnodes x dist.nproc`, so that params.yaml always says how the result was made.

How the ranks split the work (training/fit_classifier.py): every rank draws the same permutation and the same
augmentation from the same seeded generator, so each holds the global batch one process would
train on, and keeps its contiguous share of it. DDP averages the ranks' gradients; the loss of a
share is scaled so that the average is the gradient of the global batch's mean loss even when the
shares differ in size. Counts and sums are all-reduced; rank 0 alone writes outputs, checkpoints
and the MLflow run. NCCL on CUDA, gloo on CPU; SyncBatchNorm on CUDA only (it has no CPU kernel),
so on CPU each rank normalises its own share and BatchNorm models differ slightly from one process.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from reprovision.config import ConfigError

# What torchrun sets in every worker's environment.
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class World:
    """This process's place among the training processes; the default is training alone."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes outputs, checkpoints and the MLflow run."""
        return self.rank == 0

    def share(self, n: int) -> slice:
        """This rank's contiguous part of n items (sizes differ by at most one)."""
        return slice(n * self.rank // self.size, n * (self.rank + 1) // self.size)


def launched_by_torchrun() -> bool:
    return all(name in os.environ for name in TORCHRUN_ENV)


def relaunch(nproc: int) -> None:
    """Replace this process by `torchrun --standalone --nproc-per-node=nproc <this script>`, unless
    nproc is 1 or torchrun already started it. Returns only when no relaunch is needed."""
    if nproc == 1 or launched_by_torchrun():
        return
    # Standalone rendezvous on this machine: gloo talks over loopback, not whatever interface the
    # host name resolves to (a setting in the environment wins).
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *sys.argv]
    print(f"[dist] {nproc} processes: {' '.join(command[1:])}", flush=True)
    sys.stdout.flush()
    os.execv(sys.executable, command)


def join(nnodes: int, nproc: int, device: torch.device) -> tuple[World, torch.device]:
    """Join the process group torchrun set up (a no-op when training alone): the World, and the
    device of this rank (its own GPU on CUDA)."""
    if not launched_by_torchrun():
        return World(), device
    world = World(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"]))
    if world.size != nnodes * nproc:
        raise ConfigError(
            f"torchrun started {world.size} processes, but params.yaml says dist.nnodes x dist.nproc = "
            f"{nnodes} x {nproc}; set them to what you launch (the world size changes the result)"
        )
    if device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo", device_id=device if device.type == "cuda" else None
        )
    return world, device


def wrap(model: torch.nn.Module, world: World, device: torch.device) -> torch.nn.Module:
    """The module the training steps call: DDP over `model` when there is more than one rank."""
    if world.size == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    if device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def sum_over_ranks(*values: torch.Tensor, world: World) -> list[torch.Tensor]:
    """Each value summed over the ranks (one all-reduce for all of them); unchanged when alone."""
    if world.size == 1:
        return list(values)
    packed = torch.stack([v.detach().double() for v in values])
    dist.all_reduce(packed)
    return [packed[i].to(v.dtype) for i, v in enumerate(values)]


def sync_buffers(model: torch.nn.Module, world: World) -> None:
    """Rank 0's buffers (BatchNorm running statistics) on every rank, as DDP does before each
    forward: after the last step of an epoch each rank holds its own, and eval and the
    checkpoint must see one model."""
    if world.size == 1:
        return
    for buffer in model.buffers():
        dist.broadcast(buffer, 0)


def leave(world: World) -> None:
    if world.size > 1 and dist.is_initialized():
        dist.destroy_process_group()
