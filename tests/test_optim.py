import io
import math

import pytest
import torch
from torch import nn

from reprovision.config import CNNConfig, ViTConfig
from reprovision.training.optim import SAM, build_optimizer, build_scheduler, clip_gradients

CPU = torch.device("cpu")


def tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))


def flat(params) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in params])


def set_grads(params, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)


def test_sam_first_step_moves_rho_along_the_normalised_gradient_and_second_step_restores():
    model = tiny_model()
    params = list(model.parameters())
    rho, lr = 0.3, 0.1
    sam = SAM(torch.optim.SGD(params, lr=lr), rho=rho)
    w = flat(params)
    set_grads(params, seed=1)
    g = torch.cat([p.grad.flatten() for p in params])
    sam.first_step()
    moved = flat(params) - w
    assert moved.norm().item() == pytest.approx(rho, rel=1e-5)
    assert torch.allclose(moved / rho, g / g.norm(), atol=1e-6)
    set_grads(params, seed=2)  # the gradients "at w + e"
    g_perturbed = torch.cat([p.grad.flatten() for p in params])
    sam.second_step()
    assert torch.allclose(flat(params), w - lr * g_perturbed, atol=1e-6)


def test_one_sam_step_on_a_quadratic_equals_the_manual_update():
    a = torch.tensor([[3.0, 0.5], [0.5, 1.0]])
    w0 = torch.tensor([1.0, -2.0])
    w = nn.Parameter(w0.clone())
    rho, lr = 0.05, 0.1
    sam = SAM(torch.optim.SGD([w], lr=lr), rho=rho)

    def loss_fn() -> torch.Tensor:
        loss = 0.5 * w @ a @ w
        loss.backward()
        return loss

    loss_fn()
    sam.step(loss_fn)

    g = a @ w0
    e = rho * g / g.norm()
    expected = w0 - lr * (a @ (w0 + e))
    assert torch.allclose(w.detach(), expected, atol=1e-6)


def test_asam_scales_the_perturbation_by_the_weights():
    w0 = torch.tensor([2.0, -0.5, 1.0, 0.1])
    g = torch.tensor([0.3, 1.0, -2.0, 4.0])
    w = nn.Parameter(w0.clone())
    w.grad = g.clone()
    rho = 0.5
    SAM(torch.optim.SGD([w], lr=0.1), rho=rho, adaptive=True).first_step()
    expected_e = rho * w0.square() * g / (w0.abs() * g).norm()
    assert torch.allclose(w.detach() - w0, expected_e, atol=1e-6)


def test_sam_step_requires_a_closure_and_gradients():
    w = nn.Parameter(torch.ones(2))
    sam = SAM(torch.optim.SGD([w], lr=0.1))
    with pytest.raises(ValueError, match="closure"):
        sam.step()
    with pytest.raises(RuntimeError, match="backward"):
        sam.first_step()


def test_sam_state_dict_round_trip():
    def train(model: nn.Module, opt: SAM, steps: int) -> None:
        x = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))
        for _ in range(steps):

            def closure() -> torch.Tensor:
                loss = model(x).square().mean()
                loss.backward()
                return loss

            closure()
            opt.step(closure)
            opt.zero_grad()

    cfg = CNNConfig(sam="sam", sam_rho=0.1)
    model = tiny_model()
    opt = build_optimizer(model, cfg, 1e-2, CPU)
    train(model, opt, 3)

    resumed = tiny_model(seed=1)
    resumed.load_state_dict(model.state_dict())
    opt_resumed = build_optimizer(resumed, cfg, 1e-2, CPU)
    checkpoint = io.BytesIO()  # through bytes, as a checkpoint on disk: no tensor shared with `opt`
    torch.save(opt.state_dict(), checkpoint)
    checkpoint.seek(0)
    opt_resumed.load_state_dict(torch.load(checkpoint))
    assert opt_resumed.param_groups is opt_resumed.base_optimizer.param_groups
    assert opt_resumed.param_groups[0]["rho"] == 0.1

    train(model, opt, 2)
    train(resumed, opt_resumed, 2)
    assert torch.equal(flat(model.parameters()), flat(resumed.parameters()))


def test_clip_gradients_bounds_large_and_keeps_small_gradients():
    model = tiny_model()
    params = list(model.parameters())
    for p in params:
        p.grad = torch.full_like(p, 10.0)
    before = torch.cat([p.grad.flatten() for p in params]).norm()
    total = clip_gradients(model, 1.0)
    assert total.item() == pytest.approx(before.item())
    assert torch.cat([p.grad.flatten() for p in params]).norm().item() <= 1.0 + 1e-6

    for p in params:
        p.grad = torch.full_like(p, 1e-3)
    small = [p.grad.clone() for p in params]
    clip_gradients(model, 1.0)
    assert all(torch.equal(p.grad, s) for p, s in zip(params, small))
    assert clip_gradients(model, 0.0) is None


def lr_trace(cfg, steps_per_epoch: int, lr: float = 1.0) -> list[float]:
    opt = build_optimizer(tiny_model(), cfg, lr, CPU)
    sched = build_scheduler(opt, cfg, steps_per_epoch)
    base = opt.base_optimizer if isinstance(opt, SAM) else opt  # no gradients here: only the lr matters
    lrs = []
    for _ in range(cfg.epochs * steps_per_epoch):
        lrs.append(opt.param_groups[0]["lr"])  # read through SAM's shared groups when wrapped
        base.step()
        sched.step()
    lrs.append(opt.param_groups[0]["lr"])  # after the last step
    return lrs


def test_step_scheduler_decays_every_step_size_epochs():
    lrs = lr_trace(CNNConfig(epochs=5, step_size=2, gamma=0.5), steps_per_epoch=3)
    assert lrs[:6] == [1.0] * 6
    assert lrs[6:12] == pytest.approx([0.5] * 6)
    assert lrs[12:15] == pytest.approx([0.25] * 3)


def test_warmup_rises_linearly_then_cosine_decays_to_zero():
    steps, warmup = 10, 10
    lrs = lr_trace(ViTConfig(epochs=5, scheduler="warmup_cosine", warmup_epochs=1), steps_per_epoch=steps)
    rise = [b - a for a, b in zip(lrs[: warmup + 1], lrs[1 : warmup + 1])]
    assert lrs[0] == pytest.approx(1 / warmup)
    assert rise == pytest.approx([rise[0]] * warmup)  # linear
    assert lrs[warmup] == pytest.approx(1.0)
    decay = lrs[warmup:]
    assert all(b < a for a, b in zip(decay, decay[1:]))
    assert decay[-1] == pytest.approx(0.0, abs=1e-9)
    mid = warmup + (len(decay) - 1) // 2
    assert lrs[mid] == pytest.approx(0.5 * (1 + math.cos(math.pi * 20 / 40)))


def test_cosine_ends_at_zero_and_none_is_none():
    lrs = lr_trace(ViTConfig(epochs=3), steps_per_epoch=4)
    assert lrs[0] == 1.0 and lrs[-1] == pytest.approx(0.0, abs=1e-9)
    opt = build_optimizer(tiny_model(), CNNConfig(), 1.0, CPU)
    assert build_scheduler(opt, CNNConfig(scheduler="none"), 4) is None
    with pytest.raises(ValueError, match="warmup_epochs"):
        build_scheduler(opt, ViTConfig(epochs=2, warmup_epochs=2, scheduler="warmup_cosine"), 4)


def test_scheduler_drives_the_sam_base_optimizer():
    cfg = ViTConfig(epochs=2, sam="asam")
    lrs = lr_trace(cfg, steps_per_epoch=2)
    assert lrs[0] == 1.0 and lrs[-1] == pytest.approx(0.0, abs=1e-9)


def test_build_optimizer_picks_class_and_hyper_parameters():
    vit = build_optimizer(tiny_model(), ViTConfig(), 1e-3, CPU)
    assert type(vit) is torch.optim.AdamW
    assert vit.defaults["lr"] == 1e-3 and vit.defaults["weight_decay"] == 0.05 and not vit.defaults["fused"]

    cnn = build_optimizer(tiny_model(), CNNConfig(), 2e-3, CPU)
    assert type(cnn) is torch.optim.Adam
    assert cnn.defaults["lr"] == 2e-3 and cnn.defaults["weight_decay"] == 1e-4

    sgd = build_optimizer(tiny_model(), CNNConfig(optimizer="sgd", momentum=0.8, nesterov=True), 0.1, CPU)
    assert type(sgd) is torch.optim.SGD
    assert sgd.defaults["momentum"] == 0.8 and sgd.defaults["nesterov"] is True

    sam = build_optimizer(tiny_model(), ViTConfig(sam="asam", sam_rho=2.0), 1e-3, CPU)
    assert isinstance(sam, SAM) and type(sam.base_optimizer) is torch.optim.AdamW
    assert sam.param_groups[0]["rho"] == 2.0 and sam.param_groups[0]["adaptive"] is True
    assert sam.param_groups is sam.base_optimizer.param_groups

    frozen = tiny_model()
    frozen[0].requires_grad_(False)
    partial = build_optimizer(frozen, CNNConfig(), 1e-3, CPU)
    assert sum(len(g["params"]) for g in partial.param_groups) == 2

    with pytest.raises(ValueError, match="nesterov"):
        build_optimizer(tiny_model(), CNNConfig(optimizer="sgd", momentum=0.0), 0.1, CPU)
