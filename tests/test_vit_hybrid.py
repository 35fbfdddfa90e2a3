"""The hybrid ViT (issue 43): `vit.arch: hybrid`, a convolutional tokenizer (CCT) before R3's transformer, with
its recipe (benchmarks/recipes.py VIT_HYBRID): the tokenizer's shapes, the card's cost split, the CPU's math
attention kernel, a resume that ends bit for bit where an uninterrupted run does, and params that cannot be built."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from reprovision.config import ConfigError, ViTConfig, parse_params
from reprovision.core import runtime
from reprovision.data.augment import BatchAugment, Policy
from reprovision.models.vit import FAMILY, ConvTokenizer, ViT, describe_vit, tokenizer_and_transformer_cost
from reprovision.training.fit_classifier import DeviceData, fit_classifier

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from recipes import VIT_HYBRID, nest  # noqa: E402
from test_airbench import images  # noqa: E402  the same learnable 4-class toy images

CPU = torch.device("cpu")
POLICY = Policy("tiny", (0.5,) * 3, (0.25,) * 3, 4, True, 0.0, 1.0, 0.0, 0.2, 0.0, 8, "reflect", True)
EPOCHS = 3


def recipe(**changes) -> ViTConfig:
    """The recipe's vit section at a test's size: a narrow tokenizer and one block."""
    small = {"tokenizer_widths": [8, 16], "embed_dim": 32, "depth": 1, "heads": 2, "epochs": EPOCHS, "batch_size": 16}
    return ViTConfig(**{**nest(VIT_HYBRID.overrides)["vit"], **small, "precision": "fp32", **changes})


@pytest.mark.parametrize(
    "widths, final_pool, grid",
    [([], False, 32), ([16], False, 16), ([16, 24], False, 8), ([], True, 16), ([16, 24], True, 4)],
)
def test_the_tokenizer_gives_one_token_per_pooled_pixel_of_embed_dim_channels(widths, final_pool, grid):
    tokenizer = ConvTokenizer(channels=3, widths=tuple(widths), embed_dim=40, final_pool=final_pool)
    convs = [m for m in tokenizer.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == len(widths) + 1 <= 3 and [c.out_channels for c in convs] == [*widths, 40]
    tokens = tokenizer(torch.randn(2, 3, 32, 32))
    assert tokens.shape == (2, 40, grid, grid)
    model = ViT(tokenizer_widths=tuple(widths), tokenizer_final_pool=final_pool, embed_dim=40, depth=1, heads=2)
    assert model.pos_embed.shape == (1, 1 + grid * grid, 40)  # [CLS] and one per token
    logits, attentions = model(torch.randn(2, 3, 32, 32), return_attention=True)
    assert logits.shape == (2, 10) and attentions[0].shape == (2, 2, 1 + grid * grid, 1 + grid * grid)


def test_r3s_vit_is_untouched_by_the_hybrid_option():
    torch.manual_seed(0)
    model = FAMILY.build(ViTConfig(), num_classes=10, channels=3, image_size=32)
    assert sum(p.numel() for p in model.parameters()) == 5_362_762 and isinstance(model.patch_embed, torch.nn.Conv2d)
    assert describe_vit(ViTConfig(), num_classes=10).startswith("Vision Transformer (R3)")


def test_the_card_says_hybrid_and_splits_parameters_and_flops_between_tokenizer_and_transformer():
    cfg = ViTConfig(**nest(VIT_HYBRID.overrides)["vit"])
    model = FAMILY.build(cfg, num_classes=10, channels=3, image_size=32)
    cost = tokenizer_and_transformer_cost(model)
    (tok_params, tok_flops), (tf_params, tf_flops) = cost["tokenizer"], cost["transformer"]
    assert tok_params + tf_params == sum(p.numel() for p in model.parameters())
    # The tokenizer's convolutions by hand: 2 x H x W x C_in x C_out x 9 each, at 32, 16 and 8 pixels a side.
    w1, w2 = cfg.tokenizer_widths
    convs = [(32, 3, w1), (16, w1, w2), (8, w2, cfg.embed_dim)]
    assert tok_flops == sum(2 * side * side * c_in * c_out * 9 for side, c_in, c_out in convs)
    assert tf_flops > 0
    card = describe_vit(cfg, num_classes=10)
    assert (
        card.startswith("Hybrid ViT") and f"{tok_params:,} parameters" in card and f"{tf_params:,} parameters" in card
    )
    assert f"{tok_flops / 1e6:,.1f} MFLOPs" in card and f"{tf_flops / 1e6:,.1f} MFLOPs" in card


def test_the_math_attention_kernel_is_the_cpus_only_when_asked():
    assert runtime.attention_backend(CPU, torch.bfloat16) == "default"
    assert runtime.attention_backend(CPU, torch.bfloat16, "math") == "math"
    assert runtime.attention_backend(torch.device("cuda"), torch.bfloat16, "math") == "flash"  # CUDA chooses its own
    q = torch.randn(2, 2, 5, 8, requires_grad=True)
    with runtime.attention_kernels(CPU, None, "math"):
        math = torch.nn.functional.scaled_dot_product_attention(q, q, q)
    default = torch.nn.functional.scaled_dot_product_attention(q, q, q)
    assert torch.allclose(math, default, atol=1e-6)  # the same attention, another kernel


def test_the_fused_optimiser_is_the_cpus_only_when_asked_and_takes_the_same_step_to_rounding():
    from reprovision.training.optim import build_optimizer

    def steps(cpu_optimizer: str) -> tuple[torch.optim.Optimizer, list[torch.Tensor]]:
        torch.manual_seed(0)
        model = ViT(tokenizer_widths=(8,), embed_dim=16, depth=1, heads=2)
        cfg = recipe(cpu_optimizer=cpu_optimizer)
        optimizer = build_optimizer(model, cfg, 1e-3, CPU)
        torch.nn.functional.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.arange(4) % 2).backward()
        optimizer.step()  # one step: the same gradients into both kernels
        return optimizer, [p.detach().clone() for p in model.parameters()]

    default, plain = steps("default")
    fused, quick = steps("fused")
    assert not default.defaults["fused"] and fused.defaults["fused"]
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(plain, quick))  # the same AdamW, another kernel


def train(*, checkpoint=None, on_epoch=None):
    torch.set_num_threads(1)
    rng = runtime.seed_everything(0, CPU)
    cfg = recipe()
    model = FAMILY.build(cfg, num_classes=4, channels=3, image_size=32)
    x, y = images(80)
    history = fit_classifier(
        model,
        DeviceData(x[:48], y[:48]),
        DeviceData(x[48:64], y[48:64]),
        DeviceData(x[64:], y[64:]),
        BatchAugment(POLICY, 4, rng),
        cfg,
        2e-3,
        rng,
        checkpoint=checkpoint,
        fingerprint="hybrid",
        on_epoch=on_epoch,
        progress=False,
    )
    return model, history


def test_a_resumed_hybrid_run_ends_bit_for_bit_as_an_uninterrupted_one(tmp_path):
    uninterrupted, history = train()

    def crash_after_epoch_2(row):
        if row["epoch"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(checkpoint=tmp_path / "vit.pt", on_epoch=crash_after_epoch_2)
    resumed, resumed_history = train(checkpoint=tmp_path / "vit.pt")
    state, expected = resumed.state_dict(), uninterrupted.state_dict()
    assert all(torch.equal(state[k], expected[k]) for k in expected)
    timeless = [[{k: v for k, v in r.items() if k != "epoch_seconds"} for r in h] for h in (resumed_history, history)]
    assert timeless[0] == timeless[1] and len(history) == EPOCHS


def test_a_tokenizer_of_more_than_three_convolutions_or_one_that_overshrinks_is_refused_with_its_fix():
    with pytest.raises(ConfigError, match=r"vit\.tokenizer_widths.*at most 2 items"):
        parse_params({"vit": {"arch": "hybrid", "tokenizer_widths": [8, 16, 32]}})
    with pytest.raises(ConfigError, match="unknown key 'vit.tokenizer_width'; did you mean 'vit.tokenizer_widths'"):
        parse_params({"vit": {"tokenizer_width": [8]}})
    parse_params({"vit": {"arch": "hybrid", "tokenizer_widths": [8, 16], "patch_size": 3}})  # patch_size unused
    with pytest.raises(ConfigError, match=r"vit\.patch_size = 3 does not tile"):
        parse_params({"vit": {"patch_size": 3}})


def test_pooling_first_reorders_the_tokenizer_only_and_keeps_its_initialisation():
    def tokenizer(pool_first: bool) -> ConvTokenizer:
        torch.manual_seed(0)
        return ConvTokenizer(channels=3, widths=(8, 16), embed_dim=24, final_pool=True, pool_first=pool_first)

    usual, first = tokenizer(False), tokenizer(True)
    kinds = [[type(m).__name__ for m in t.convs] for t in (usual, first)]
    assert kinds[0] == ["Conv2d", "BatchNorm2d", "GELU", "MaxPool2d"] * 3  # the layout earlier runs trained
    assert kinds[1] == ["Conv2d", "MaxPool2d", "BatchNorm2d", "GELU"] * 3
    assert all(torch.equal(a, b) for a, b in zip(usual.parameters(), first.parameters()))
    x = torch.randn(2, 3, 32, 32)
    first.eval()
    expected = x
    for i in range(0, 12, 4):
        conv, pool, norm, act = first.convs[i : i + 4]
        expected = act(norm(pool(conv(expected))))
    torch.testing.assert_close(first(x), expected)
    assert first(x).shape == usual.eval()(x).shape == (2, 24, 4, 4)


def test_sequence_pooling_replaces_cls_and_gives_rollout_its_readout_weights():
    from reprovision.measure.heatmaps import attention_rollout

    torch.manual_seed(0)
    model = ViT(tokenizer_widths=(8, 16), embed_dim=32, depth=2, heads=2, pool="seq").eval()
    assert model.cls_token is None and model.pos_embed.shape == (1, 64, 32)  # one per token of the 8x8 map
    x = torch.randn(3, 3, 32, 32)
    logits, attentions, readout = model(x, return_attention=True)
    assert logits.shape == (3, 10) and attentions[0].shape == (3, 2, 64, 64) and readout.shape == (3, 64)
    torch.testing.assert_close(readout.sum(dim=1), torch.ones(3))
    # The head reads the readout-weighted mean of the last block's normalised tokens.
    tokens = model.patch_embed(x).flatten(2).transpose(1, 2) + model.pos_embed
    for block in model.blocks:
        tokens, _ = block(tokens)
    pooled = (readout.unsqueeze(1) @ model.norm(tokens)).squeeze(1)
    torch.testing.assert_close(model.features(x), pooled)
    torch.testing.assert_close(model.head(pooled), logits)
    heat = attention_rollout(model, x)
    assert heat.shape == (3, 32, 32) and heat.min() >= 0 and torch.allclose(heat.amax(dim=(1, 2)), torch.ones(3))
    card = describe_vit(recipe(pool="seq", tokenizer_pool_first=True), num_classes=10)
    assert "sequence pooling (no [CLS])" in card and "before BN and GELU" in card
    with pytest.raises(ValueError, match="pool='mean'; allowed"):
        ViT(pool="mean")
