"""The modern ViT recipe's options (issue 35 item 3), each a param that is off by default: stochastic depth,
batched TrivialAugment and random erasing, no weight decay on biases/norms/position embedding/[CLS], and an
EMA of the weights. Off, each leaves R3's ViT exactly as it was; on, each does what its paper says."""

from __future__ import annotations

import pytest
import torch

from reprovision.config import ViTConfig
from reprovision.data.augment import BatchAugment, Policy, random_erasing, trivial_augment
from reprovision.models.vit import ViT
from reprovision.training.optim import build_optimizer, ema_of

CPU = torch.device("cpu")


def small_vit(**kwargs) -> ViT:
    torch.manual_seed(0)
    return ViT(image_size=8, patch_size=4, embed_dim=16, depth=3, heads=2, **kwargs)


def test_drop_path_off_is_r3s_vit_bit_for_bit_and_on_drops_only_in_training():
    x = torch.randn(4, 3, 8, 8)
    reference, off, on = small_vit(), small_vit(drop_path=0.0), small_vit(drop_path=0.5)
    assert all(torch.equal(a, b) for a, b in zip(reference.state_dict().values(), off.state_dict().values()))
    assert reference.state_dict().keys() == on.state_dict().keys()  # no weights of its own
    torch.manual_seed(1)
    trained_reference = reference.train()(x)
    torch.manual_seed(1)
    assert torch.equal(off.train()(x), trained_reference)  # same output, same draws from the RNG
    rates = [getattr(block.drop_path, "p", 0.0) for block in on.blocks]
    assert rates == [0.0, 0.25, 0.5]  # rising linearly with depth to `drop_path` (the first block: none)
    with torch.no_grad():
        assert torch.equal(on.eval()(x), reference.eval()(x))  # identity at inference
        torch.manual_seed(2)
        assert not torch.equal(on.train()(x), reference.train()(x))


def test_trivial_augment_and_random_erasing_are_reproducible_from_the_seed_and_change_images():
    x = torch.randint(0, 256, (32, 3, 16, 16), dtype=torch.uint8)
    same = [trivial_augment(x, torch.Generator().manual_seed(5)) for _ in range(2)]
    other = trivial_augment(x, torch.Generator().manual_seed(6))
    assert torch.equal(same[0], same[1]) and not torch.equal(same[0], other)
    assert same[0].dtype == torch.uint8 and (same[0] != x).flatten(1).any(1).sum() > 16  # most images changed
    z = torch.randn(32, 3, 16, 16)
    erased = [random_erasing(z, 1.0, torch.Generator().manual_seed(5)) for _ in range(2)]
    assert torch.equal(erased[0], erased[1])
    zeroed = (erased[0] == 0).all(1).flatten(1).float().mean(1)  # the share of each image erased
    assert ((zeroed >= 0.01) & (zeroed <= 0.5)).all()
    assert torch.equal(random_erasing(z, 0.0, torch.Generator().manual_seed(5)), z)


def test_the_policy_applies_them_in_training_only():
    policy = Policy("t", (0.5,) * 3, (0.25,) * 3, 0, False, 0.0, 1.0, 0.0, 0.2, 0.0, 4, "zeros", False, True, 0.5)
    x, y = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8), torch.arange(16) % 4
    augment = BatchAugment(policy, 4, torch.Generator().manual_seed(0))
    plain = BatchAugment(policy.without_augmentation(), 4, torch.Generator().manual_seed(0))
    assert not torch.equal(augment(x, y)[0], plain(x, y)[0])
    assert torch.equal(augment(x, y, train=False)[0], plain(x, y, train=False)[0])


def test_decay_exempt_spares_biases_norms_position_embedding_and_cls_only():
    model = small_vit()
    cfg = ViTConfig(decay_exempt=True, weight_decay=0.05)
    groups = build_optimizer(model, cfg, 1e-3, CPU).param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    spared = {names[id(p)] for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    decayed = {names[id(p)] for g in groups if g["weight_decay"] == 0.05 for p in g["params"]}
    assert {"pos_embed", "cls_token", "norm.weight", "norm.bias", "head.bias", "blocks.0.attn.qkv.bias"} <= spared
    assert {"head.weight", "patch_embed.weight", "blocks.0.attn.qkv.weight"} <= decayed
    assert spared | decayed == set(names.values()) and not spared & decayed
    default = build_optimizer(model, ViTConfig(weight_decay=0.05), 1e-3, CPU).param_groups
    assert len(default) == 1 and default[0]["weight_decay"] == 0.05  # off: one group, as before


def test_the_ema_of_a_constant_model_is_the_model_and_it_follows_a_moving_one():
    model = small_vit()
    ema = ema_of(model, 0.9)
    for _ in range(5):
        ema.update_parameters(model)
    assert all(torch.equal(a, b) for a, b in zip(ema.module.state_dict().values(), model.state_dict().values()))
    with torch.no_grad():
        model.head.weight.add_(1.0)
    ema.update_parameters(model)
    moved = ema.module.head.weight - (model.head.weight - 1.0)
    assert torch.allclose(moved, torch.full_like(moved, 0.1), atol=1e-6)  # (1 - decay) of the step
    assert ema_of(model, 0.0) is None


def test_the_vit_recipe_options_are_params_off_by_default():
    cfg = ViTConfig()
    assert (cfg.drop_path, cfg.decay_exempt, cfg.ema_decay, cfg.tta) == (0.0, False, 0.0, "none")
    with pytest.raises(ValueError, match="drop_path"):
        ViTConfig(drop_path=1.5)


def test_a_resumed_run_ends_with_the_same_ema_as_an_uninterrupted_one(tmp_path):
    from test_best_epoch import POLICY, splits

    from reprovision.core import runtime
    from reprovision.training.fit_classifier import fit_classifier

    def run(checkpoint=None, on_epoch=None):
        torch.set_num_threads(1)
        rng = runtime.seed_everything(0, CPU)
        model = ViT(image_size=8, patch_size=4, embed_dim=16, depth=2, heads=2, num_classes=4, drop_path=0.2)
        cfg = ViTConfig(epochs=3, batch_size=16, precision="fp32", ema_decay=0.9, decay_exempt=True)
        ema = ema_of(model, cfg.ema_decay)
        train, _, test = splits()
        augment = BatchAugment(POLICY, 4, rng)
        fit_classifier(model, train, None, test, augment, cfg, 1e-3, rng, checkpoint, "ema", on_epoch, False, ema=ema)
        return ema.module.state_dict()

    uninterrupted = run()

    def crash(row):
        if row["epoch"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "vit.pt", crash)
    resumed = run(tmp_path / "vit.pt")
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)
