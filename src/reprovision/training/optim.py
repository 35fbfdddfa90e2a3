"""Optimisers, learning-rate schedules, SAM/ASAM and gradient clipping for the classifiers.

Schedules are stepped once per optimisation step (not per epoch), so a warm-up or a cosine
decay is smooth whatever the batch size.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.optim.lr_scheduler import CosineAnnealingLR, LambdaLR, LinearLR, LRScheduler, SequentialLR, StepLR

from reprovision.config import TrainConfig

NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)  # norm_lr_mult's layers


class SAM(torch.optim.Optimizer):
    """Sharpness-Aware Minimisation (Foret et al. 2021) around any base optimiser.

    One update takes two forward-backward passes:
        loss_fn(model(x), y).backward(); opt.first_step(zero_grad=True)   # to w + e(w)
        loss_fn(model(x), y).backward(); opt.second_step(zero_grad=True)  # back to w, base step
    with e(w) = rho * g / ||g||. With `adaptive=True` it is ASAM (Kwon et al. 2021): the
    perturbation is scaled elementwise by |w| (so e(w) = rho * w^2 g / || |w| g ||), which makes
    it invariant to rescaling the weights. Follows the reference implementation davda54/sam.

    The param groups are the base optimiser's own list, so schedulers, lr logging and
    `state_dict()` (which is the base optimiser's) see one optimiser.
    """

    def __init__(self, base_optimizer: torch.optim.Optimizer, rho: float = 0.05, adaptive: bool = False):
        if rho <= 0:
            raise ValueError(f"SAM rho = {rho}: the neighbourhood radius must be > 0 (the papers use 0.05 to 2.0)")
        self.base_optimizer = base_optimizer
        super().__init__(base_optimizer.param_groups, dict(rho=rho, adaptive=adaptive))
        self.param_groups = base_optimizer.param_groups

    @torch.no_grad()
    def _grad_norm(self) -> torch.Tensor:
        """|| g || for SAM, || |w| * g || for ASAM, over all parameters together."""
        norms = [
            ((p.abs() if group["adaptive"] else 1.0) * p.grad).norm(p=2)
            for group in self.param_groups
            for p in group["params"]
            if p.grad is not None
        ]
        if not norms:
            raise RuntimeError("SAM.first_step() found no gradients: call loss.backward() before it")
        device = norms[0].device
        return torch.stack([n.to(device) for n in norms]).norm(p=2)

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """Move to the worst-case neighbour w + e(w), remembering w."""
        grad_norm = self._grad_norm()
        for group in self.param_groups:
            scale = group["rho"] / (grad_norm + 1e-12)
            for p in group["params"]:
                if p.grad is None:
                    continue
                self.state[p]["w"] = p.detach().clone()
                e_w = (p.square() if group["adaptive"] else 1.0) * p.grad * scale.to(p)
                p.add_(e_w)
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Restore w exactly, then let the base optimiser step with the gradients taken at w + e(w)."""
        for group in self.param_groups:
            for p in group["params"]:
                if "w" in self.state[p]:
                    p.copy_(self.state[p].pop("w"))
        self.base_optimizer.step()
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:
        """One SAM update; the gradients at w must already be there, `closure` recomputes loss and grads.

        Returns the closure's loss, i.e. the loss at the perturbed weights w + e(w).
        """
        if closure is None:
            raise ValueError(
                "SAM needs a second forward-backward pass: call loss.backward() then step(closure) with a "
                "closure that recomputes the loss, calls backward() on it and returns it, "
                "or call first_step() and second_step() yourself"
            )
        self.first_step(zero_grad=True)
        with torch.enable_grad():
            loss = closure()
        self.second_step()
        return loss

    def state_dict(self) -> dict:
        return self.base_optimizer.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.base_optimizer.load_state_dict(state_dict)
        self.param_groups = self.base_optimizer.param_groups


def build_optimizer(model: nn.Module, cfg: TrainConfig, lr: float, device: torch.device) -> torch.optim.Optimizer:
    """Adam, AdamW or SGD over the trainable parameters, wrapped in SAM/ASAM when `cfg.sam` asks.

    With `cfg.norm_lr_mult` != 1 the normalisation layers' parameters form a group with lr x norm_lr_mult
    and weight decay / norm_lr_mult, so their decay per step is unchanged (airbench's raised lr on
    BatchNorm biases); with `cfg.decay_exempt`, biases, norms and the model's `no_weight_decay()` names
    take no weight decay."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError(f"{type(model).__name__} has no trainable parameters (all have requires_grad=False)")
    params: list = trainable
    if cfg.norm_lr_mult != 1.0 or cfg.decay_exempt:
        norms = {id(p) for m in model.modules() if isinstance(m, NORMS) for p in m.parameters()}
        named = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
        exempt = {id(p) for name, p in model.named_parameters() if p.ndim <= 1 or name in named or id(p) in norms}
        groups: dict[tuple[bool, bool], list] = {}
        for p in trainable:
            groups.setdefault((id(p) in norms, cfg.decay_exempt and id(p) in exempt), []).append(p)
        params = [
            {
                "params": members,
                "lr": lr * (cfg.norm_lr_mult if norm else 1.0),
                "weight_decay": 0.0 if no_decay else cfg.weight_decay / (cfg.norm_lr_mult if norm else 1.0),
            }
            for (norm, no_decay), members in sorted(groups.items())
        ]
    # The fused kernels update every parameter in one launch on CUDA; on the CPU only when asked (other floats).
    fast = {"fused": True} if device.type == "cuda" or cfg.cpu_optimizer == "fused" else {}
    if cfg.optimizer == "adam":
        base = torch.optim.Adam(params, lr=lr, weight_decay=cfg.weight_decay, **fast)
    elif cfg.optimizer == "adamw":
        base = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay, **fast)
    else:
        if cfg.nesterov and cfg.momentum == 0:
            raise ValueError("sgd with nesterov = true needs momentum > 0: set momentum (e.g. 0.9) or nesterov: false")
        base = torch.optim.SGD(
            params, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay, **fast
        )
    if cfg.sam == "none":
        return base
    return SAM(base, rho=cfg.sam_rho, adaptive=cfg.sam == "asam")


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int) -> LRScheduler | None:
    """The learning-rate schedule, to be stepped once per optimisation step."""
    if steps_per_epoch <= 0:
        raise ValueError(f"steps_per_epoch = {steps_per_epoch}: must be > 0 (is the training set empty?)")
    if isinstance(optimizer, SAM):
        optimizer = optimizer.base_optimizer  # its step() is the one that runs once per update
    total = cfg.epochs * steps_per_epoch
    if cfg.scheduler == "none":
        return None
    if cfg.scheduler == "cosine":
        return CosineAnnealingLR(optimizer, T_max=total)
    if cfg.scheduler == "step":
        return StepLR(optimizer, step_size=cfg.step_size * steps_per_epoch, gamma=cfg.gamma)
    if cfg.scheduler == "warmup_linear":
        return LambdaLR(optimizer, warmup_linear(cfg, total))
    warmup = cfg.warmup_epochs * steps_per_epoch
    if cfg.warmup_epochs >= cfg.epochs:
        raise ValueError(
            f"warmup_epochs = {cfg.warmup_epochs} leaves no epochs for the cosine decay (epochs = {cfg.epochs}); "
            "set warmup_epochs < epochs"
        )
    if warmup == 0:
        return CosineAnnealingLR(optimizer, T_max=total)
    # Start at lr / warmup rather than 0 so the first step is not wasted.
    rise = LinearLR(optimizer, start_factor=1 / warmup, total_iters=warmup)
    decay = CosineAnnealingLR(optimizer, T_max=total - warmup)
    return SequentialLR(optimizer, [rise, decay], milestones=[warmup])


def warmup_linear(cfg: TrainConfig, total: int) -> Callable[[int], float]:
    """airbench's lr factor per step: linear from lr_start_factor to 1 over warmup_fraction of the
    steps, then linear to lr_end_factor at the last step."""
    warmup = int(total * cfg.warmup_fraction)

    def factor(step: int) -> float:
        if step < warmup:
            frac = step / warmup
            return cfg.lr_start_factor * (1 - frac) + frac
        frac = (step - warmup) / max(total - warmup, 1)
        return (1 - frac) + cfg.lr_end_factor * frac

    return factor


class Lookahead:
    """airbench's lookahead: every `every` steps the weights' moving average takes a step towards the
    weights, and the weights are set to it; the average's decay rises as decay**every * (step/total)**3,
    so it follows the weights early and holds them late. `finish()` after the last step sets the weights
    to the average. Floating state only (BatchNorm's running statistics too, as airbench)."""

    def __init__(self, model: nn.Module, *, every: int, decay: float, total_steps: int) -> None:
        self.model, self.every, self.decay, self.total = model, every, decay, total_steps
        self.average = {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def _pull(self, decay: float) -> None:
        current = self.model.state_dict()
        for key, average in self.average.items():
            average.lerp_(current[key], 1 - decay)
            current[key].copy_(average)

    def step(self, steps_done: int) -> None:
        if steps_done % self.every == 0:
            self._pull(self.decay**self.every * (steps_done / self.total) ** 3)

    def finish(self) -> None:
        self._pull(1.0)

    def state_dict(self) -> dict:
        return dict(self.average)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            self.average[key].copy_(value)


def ema_of(model: nn.Module, decay: float) -> torch.optim.swa_utils.AveragedModel | None:
    """torch's exponential moving average of `model`'s weights and buffers (None when `decay` is 0)."""
    if decay == 0:
        return None
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def clip_gradients(model: nn.Module, max_norm: float) -> torch.Tensor | None:
    """Clip the global gradient norm to `max_norm` (0 disables); returns the norm before clipping."""
    if max_norm < 0:
        raise ValueError(f"grad_clip = {max_norm}: must be >= 0 (0 disables clipping)")
    if max_norm == 0:
        return None
    return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
