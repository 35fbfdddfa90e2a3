"""A whole training step (forward, backward, optimiser) captured once as a CUDA graph and replayed.

Eager PyTorch launches each of a step's hundreds of small kernels from Python; on a fast GPU the
step then waits on the host (BENCHMARKS.md, "GPU"). A captured step is one launch. PyTorch's own
recipe (torch.cuda.graphs docs, "Whole-network capture"), with three changes that keep a run exact:

- The warm-up steps that capture needs (they create the optimiser's state and the libraries'
  handles) are undone: parameters, buffers and optimiser state are copied back, state the warm-up
  created is zeroed (what Adam, AdamW and SGD start from), and the CUDA RNG is rewound. The first
  replayed step then starts from exactly the state an eager step would.
- The learning rate stays a Python float in the param groups, where schedulers and checkpoints
  expect it; the graph reads a device copy of it, refreshed before every replay.
- One graph per input shape: an epoch's last, smaller batch gets its own graph (and memory pool)
  instead of a recompile or padding.

Under deterministic algorithms torch fills every tensor made by `torch.empty` and its kin with NaN
(integers: their largest value), so that a kernel reading memory nothing wrote gives the same,
poisoned, bits every run (torch.utils.deterministic.fill_uninitialized_memory). In a captured step
those fills are hundreds of extra kernels, and they are left out (FILL_UNINITIALIZED_MEMORY). That
is safe only if no kernel of the step reads unwritten memory, which benchmarks/gpu_check.py proves
per model on the GPU at hand: a step captured with the fills gives the same bits as one without
(had a kernel read a NaN-filled buffer, the NaN would have reached the weights).

What the step reads (its inputs) is copied into the graph's own buffers before each replay; what it
returns lives in the graph's buffers too and is overwritten by the next replay: read it first.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

WARMUP_STEPS = 3  # PyTorch's recipe warms up on a side stream; 3 is its example's count
ABSENT = object()
FILL_UNINITIALIZED_MEMORY = False  # in captured steps only; gpu_check sets it True to prove it unneeded


def capturable(optimizers: Sequence[torch.optim.Optimizer]) -> str | None:
    """None when these optimisers can be replayed in a graph; else why not (a sentence)."""
    for opt in optimizers:
        if type(opt) not in (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD):
            return f"{type(opt).__name__} is not Adam, AdamW or SGD"
        if not all(group.get("fused") for group in opt.param_groups):
            return f"{type(opt).__name__} is not fused (its learning rate would be frozen into the graph)"
        if isinstance(opt, torch.optim.SGD) and any(group["dampening"] for group in opt.param_groups):
            return "SGD with dampening starts its momentum differently from zero"
    return None


class CapturedStep:
    """`step(*inputs) -> tuple of tensors`, captured per input shape and replayed.

    `step` must do the whole update on the device with no host synchronisation: forward, backward,
    `optimizer.step()` and `zero_grad(set_to_none=True)`. `modules` and `optimizers` are everything
    it changes (their parameters, buffers and optimiser state)."""

    def __init__(
        self,
        step: Callable[..., tuple[Tensor, ...]],
        modules: Sequence[nn.Module],
        optimizers: Sequence[torch.optim.Optimizer],
    ):
        why_not = capturable(optimizers)
        if why_not is not None:
            raise ValueError(f"cannot capture this training step as a CUDA graph: {why_not}")
        self.step, self.modules, self.optimizers = step, list(modules), list(optimizers)
        self.graphs: dict[
            tuple, tuple[torch.cuda.CUDAGraph, list[Tensor], tuple[Tensor, ...], list[tuple[Tensor, dict]]]
        ] = {}

    def __call__(self, *inputs: Tensor) -> tuple[Tensor, ...]:
        key = tuple((tuple(t.shape), t.dtype) for t in inputs)
        if key not in self.graphs:
            self.graphs[key] = self._capture(inputs)
        graph, static_inputs, outputs, lrs = self.graphs[key]
        for buffer, value in zip(static_inputs, inputs):
            buffer.copy_(value)
        for lr, group in lrs:
            lr.fill_(group["lr"])  # a kernel with the float as its argument: no host sync
        graph.replay()
        return outputs

    def _state(self) -> list[Tensor]:
        tensors = [t for m in self.modules for t in (*m.parameters(), *m.buffers())]
        for opt in self.optimizers:
            tensors += [v for state in opt.state.values() for v in state.values() if isinstance(v, Tensor)]
        return tensors

    def warm_up(self, inputs: Sequence[Tensor]) -> None:
        """Run the step WARMUP_STEPS times on `inputs` (on a side stream on CUDA, as capture needs),
        then put back every parameter, buffer, optimiser state and the RNG as they were: the state
        the warm-up created is zeroed, which is where Adam, AdamW and SGD (no dampening) start."""
        cuda = inputs[0].is_cuda
        with torch.no_grad():
            saved = {id(t): (t, t.detach().clone()) for t in self._state()}  # (t, ...) keeps each id alive
        rng = torch.cuda.get_rng_state() if cuda else torch.get_rng_state()
        side = torch.cuda.Stream() if cuda else None
        if cuda:
            side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side) if cuda else contextlib.nullcontext():
            for _ in range(WARMUP_STEPS):
                self.step(*inputs)
        if cuda:
            torch.cuda.current_stream().wait_stream(side)
        with torch.no_grad():
            for t in self._state():
                if id(t) in saved:
                    t.copy_(saved[id(t)][1])
                else:
                    t.zero_()
        (torch.cuda.set_rng_state if cuda else torch.set_rng_state)(rng)

    def _capture(self, inputs: Sequence[Tensor]):
        fill = torch.utils.deterministic.fill_uninitialized_memory
        torch.utils.deterministic.fill_uninitialized_memory = FILL_UNINITIALIZED_MEMORY
        try:
            return self._warm_up_and_capture(inputs)
        finally:
            torch.utils.deterministic.fill_uninitialized_memory = fill

    def _warm_up_and_capture(self, inputs: Sequence[Tensor]):
        static_inputs = [t.detach().clone() for t in inputs]
        self.warm_up(static_inputs)

        groups = [group for opt in self.optimizers for group in opt.param_groups]
        lrs = [(torch.tensor(float(group["lr"]), device=static_inputs[0].device), group) for group in groups]
        floats = [(group["lr"], group.get("capturable", ABSENT)) for group in groups]
        for lr, group in lrs:
            group["lr"], group["capturable"] = lr, True  # fused kernels ignore `capturable`; step()'s check reads it
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                outputs = self.step(*static_inputs)
        finally:
            for group, (lr, flag) in zip(groups, floats):
                group["lr"] = lr
                if flag is ABSENT:  # SGD has no such key
                    del group["capturable"]
                else:
                    group["capturable"] = flag
        return graph, static_inputs, outputs, lrs
