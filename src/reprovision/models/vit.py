"""Vision Transformer for small images (R3, R4): patch embedding, [CLS] token, pre-norm blocks.

At the defaults (CIFAR-10, patch 4, embed 192, depth 12, heads 3) it has exactly the
5,362,762 parameters of R3's ViT. Attention runs through `F.scaled_dot_product_attention`
(fused kernels on GPU); `return_attention=True` instead computes softmax(QK^T / sqrt(d))
explicitly so that attention rollout can read every block's maps.

`arch: hybrid` swaps the patch embedding for a convolutional tokenizer (CCT, Hassani et al. 2021):
up to three Conv3x3-BN-GELU layers, each but the last halving the image, whose output pixels are
the tokens. Everything after the tokens ([CLS], position embeddings, blocks, head) is the same.
`pool: seq` reads the last block's tokens through CCT's sequence pooling instead of a [CLS] token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reprovision.models import ClassifierFamily


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, return_attention: bool = False) -> tuple[Tensor, Tensor | None]:
        batch, tokens, dim = x.shape
        # (B, T, 3*D) -> three (B, heads, T, D/heads)
        q, k, v = self.qkv(x).view(batch, tokens, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        dropout_p = self.dropout if self.training else 0.0
        attention = None
        if return_attention:
            attention = (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(dim=-1)
            out = F.dropout(attention, dropout_p, self.training) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
        out = out.transpose(1, 2).reshape(batch, tokens, dim)
        return self.proj_drop(self.proj(out)), attention


def drop_path(rate: float) -> nn.Module:
    """Stochastic depth (Huang et al. 2016) on a residual branch: torchvision's, per sample ("row")."""
    if rate == 0:
        return nn.Identity()  # no module with randomness: the model is exactly R3's
    from reprovision.compat import import_torchvision

    import_torchvision()
    from torchvision.ops import StochasticDepth

    return StochasticDepth(rate, mode="row")


class Block(nn.Module):
    """Pre-norm transformer block: x + Attn(LN(x)), then x + MLP(LN(x)), each branch dropped at `drop_rate`."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, dropout: float, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.drop_path = drop_path(drop_rate)
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim), nn.Dropout(dropout)
        )

    def forward(self, x: Tensor, return_attention: bool = False) -> tuple[Tensor, Tensor | None]:
        update, attention = self.attn(self.norm1(x), return_attention)
        x = x + self.drop_path(update)
        return x + self.drop_path(self.mlp(self.norm2(x))), attention


def conv_layer(c_in: int, c_out: int, *, pool: bool, pool_first: bool) -> list[nn.Module]:
    """Conv3x3-BN-GELU, then a 2x2 max-pool if `pool`; `pool_first` pools the convolution's output before BN
    and GELU instead (airbench's order: a quarter of their work, the same modules and initialisation)."""
    conv = nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=False)
    pools = [nn.MaxPool2d(2)] if pool else []
    norm_act = [nn.BatchNorm2d(c_out), nn.GELU()]
    return [conv, *pools, *norm_act] if pool_first else [conv, *norm_act, *pools]


class ConvTokenizer(nn.Module):
    """Images (B, C, H, W) -> a map of tokens (B, D, H/2^k, W/2^k): len(widths) convolutions each followed
    by a 2x2 max-pool, then one to `embed_dim` at that resolution, pooled once more if `final_pool` (k counts
    the pools; `pool_first`: see conv_layer). Convolutions see the image in channels-last memory, where the CPU's
    convolution kernels are fastest; the map then flattens into tokens with no copy."""

    def __init__(
        self,
        *,
        channels: int,
        widths: tuple[int, ...],
        embed_dim: int,
        final_pool: bool = False,
        pool_first: bool = False,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for c_in, c_out in zip((channels, *widths[:-1]), widths):
            layers += conv_layer(c_in, c_out, pool=True, pool_first=pool_first)
        # A last pool quarters the tokens, and with them the transformer's cost, which on a CPU runs at a third
        # of the convolutions' rate (BENCHMARKS "ViT speed levers").
        layers += conv_layer(widths[-1] if widths else channels, embed_dim, pool=final_pool, pool_first=pool_first)
        self.convs = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.convs(x.contiguous(memory_format=torch.channels_last))


class SequencePool(nn.Module):
    """CCT's sequence pooling: tokens (B, T, D) -> their mean weighted by a learned softmax score, (B, D), and
    those weights (B, T): where the head reads from, for attention rollout."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.score = nn.Linear(dim, 1)

    def forward(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        weights = self.score(tokens).squeeze(-1).softmax(dim=-1)
        return (weights.unsqueeze(1) @ tokens).squeeze(1), weights


class ViT(nn.Module):
    def __init__(
        self,
        *,
        image_size: int = 32,
        channels: int = 3,
        num_classes: int = 10,
        patch_size: int = 4,
        embed_dim: int = 192,
        depth: int = 12,
        heads: int = 3,
        mlp_ratio: float = 4.0,
        dropout: float = 0.1,
        drop_path: float = 0.0,
        tokenizer_widths: tuple[int, ...] | None = None,
        tokenizer_final_pool: bool = False,
        tokenizer_pool_first: bool = False,
        pool: str = "cls",
    ) -> None:
        """`tokenizer_widths` None: R3's patch embedding of `patch_size`; else the convolutional tokenizer
        (ConvTokenizer) of those widths, whose stride 2^(pools) replaces `patch_size`. `pool`: "cls" reads a
        [CLS] token (R3), "seq" CCT's sequence pooling of the tokens (no [CLS])."""
        super().__init__()
        if tokenizer_widths is not None:
            patch_size = 2 ** (len(tokenizer_widths) + tokenizer_final_pool)
        if image_size % patch_size:
            raise ValueError(
                f"patch_size={patch_size} does not divide image_size={image_size}; pick a divisor of {image_size}"
            )
        if pool not in ("cls", "seq"):
            raise ValueError(f"pool={pool!r}; allowed: 'cls' ([CLS] token) or 'seq' (sequence pooling)")
        if embed_dim % heads:
            raise ValueError(f"embed_dim={embed_dim} is not divisible by heads={heads}; pick heads dividing embed_dim")
        self.image_size = image_size
        num_patches = (image_size // patch_size) ** 2
        # R3: a stride-patch conv is the linear projection of non-overlapping flattened patches.
        self.patch_embed = (
            nn.Conv2d(channels, embed_dim, kernel_size=patch_size, stride=patch_size)
            if tokenizer_widths is None
            else ConvTokenizer(
                channels=channels,
                widths=tuple(tokenizer_widths),
                embed_dim=embed_dim,
                final_pool=tokenizer_final_pool,
                pool_first=tokenizer_pool_first,
            )
        )
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if pool == "cls" else None
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + (pool == "cls"), embed_dim))
        self.embed_drop = nn.Dropout(dropout)
        # Stochastic depth rises linearly with depth, from 0 at the first block to `drop_path` (DeiT).
        rates = [drop_path * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(Block(embed_dim, heads, mlp_ratio, dropout, rate) for rate in rates)
        self.norm = nn.LayerNorm(embed_dim)
        self.sequence_pool = SequencePool(embed_dim) if pool == "seq" else None
        self.head = nn.Linear(embed_dim, num_classes)
        # Small random embeddings (as in ViT/timm): zeros would make every position look the same at start.
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.trunc_normal_(self.cls_token, std=0.02)

    def no_weight_decay(self) -> set[str]:
        """Parameters that `decay_exempt` keeps out of weight decay besides biases and norms (timm's convention)."""
        return {"pos_embed", "cls_token"}

    def _encode(self, x: Tensor, return_attention: bool) -> tuple[Tensor, list[Tensor], Tensor | None]:
        """What the head reads (B, D): the normalised [CLS] embedding or the sequence pool of the normalised
        tokens; each block's attention when asked, and the sequence pool's weights (B, T) (None with [CLS])."""
        if x.ndim != 4 or x.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(
                f"ViT got input of shape {tuple(x.shape)}; it was built for (B, C, {self.image_size}, "
                f"{self.image_size}) images: build it with image_size matching the data"
            )
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, num_patches, D)
        if self.cls_token is not None:
            tokens = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        tokens = self.embed_drop(tokens + self.pos_embed)
        attentions = []
        for block in self.blocks:
            tokens, attention = block(tokens, return_attention)
            if return_attention:
                attentions.append(attention)
        if self.sequence_pool is None:
            return self.norm(tokens[:, 0]), attentions, None
        pooled, weights = self.sequence_pool(self.norm(tokens))
        return pooled, attentions, weights

    def features(self, x: Tensor) -> Tensor:
        """What the classifier head sees, (B, embed_dim): the [CLS] token or the tokens' sequence pool, normalised."""
        return self._encode(x, return_attention=False)[0]

    def forward(
        self, x: Tensor, return_attention: bool = False
    ) -> Tensor | tuple[Tensor, list[Tensor]] | tuple[Tensor, list[Tensor], Tensor]:
        """Logits (B, classes); with `return_attention`, also one (B, heads, T, T) map per block (T = 1 + patches
        with [CLS] first; T = patches with sequence pooling, which adds its weights (B, T): the head's readout)."""
        features, attentions, readout = self._encode(x, return_attention)
        logits = self.head(features)
        if not return_attention:
            return logits
        return (logits, attentions) if readout is None else (logits, attentions, readout)


def build_vit(cfg, *, num_classes: int, channels: int, image_size: int) -> ViT:
    """The ViT that the `vit` section of params.yaml describes (`arch` vit: R3's; hybrid: a conv tokenizer)."""
    return ViT(
        image_size=image_size,
        channels=channels,
        num_classes=num_classes,
        patch_size=cfg.patch_size,
        embed_dim=cfg.embed_dim,
        depth=cfg.depth,
        heads=cfg.heads,
        mlp_ratio=cfg.mlp_ratio,
        dropout=cfg.dropout,
        drop_path=cfg.drop_path,
        tokenizer_widths=tuple(cfg.tokenizer_widths) if cfg.arch == "hybrid" else None,
        tokenizer_final_pool=cfg.tokenizer_final_pool,
        tokenizer_pool_first=cfg.tokenizer_pool_first,
        pool=cfg.pool,
    )


def tokenizer_and_transformer_cost(
    model: ViT, *, channels: int = 3, image_size: int = 32
) -> dict[str, tuple[int, int]]:
    """{"tokenizer": (parameters, forward FLOPs per image), "transformer": (...)}: FLOPs as torch's
    FlopCounterMode counts them (matrix products, convolutions, attention), of one image."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.eval()(torch.zeros(1, channels, image_size, image_size))
    flops = counter.get_flop_counts()
    tokenizer_flops = sum(flops.get(f"{type(model).__name__}.patch_embed", {}).values())
    total_flops = sum(flops.get("Global", {}).values())
    tokenizer_params = sum(p.numel() for p in model.patch_embed.parameters())
    total_params = sum(p.numel() for p in model.parameters())
    return {
        "tokenizer": (tokenizer_params, tokenizer_flops),
        "transformer": (total_params - tokenizer_params, total_flops - tokenizer_flops),
    }


def describe_vit(cfg, *, num_classes: int) -> str:
    drop = f", stochastic depth up to {cfg.drop_path}" if cfg.drop_path else ""
    readout = "[CLS] token" if cfg.pool == "cls" else "sequence pooling (no [CLS])"
    blocks = f"depth {cfg.depth}, heads {cfg.heads}, MLP ratio {cfg.mlp_ratio}, dropout {cfg.dropout}"
    if cfg.arch == "patch":
        return (
            f"Vision Transformer (R3): patch {cfg.patch_size}, embed {cfg.embed_dim}, {blocks}, "
            f"learned position embeddings, {readout}{drop}"
        )
    # The card's cost split, of a CIFAR-sized image (3x32x32: every classifier dataset's), from a model built
    # aside: its initialisation leaves the caller's random streams where they were.
    with torch.random.fork_rng(devices=[]):
        cost = tokenizer_and_transformer_cost(build_vit(cfg, num_classes=num_classes, channels=3, image_size=32))
    (tok_params, tok_flops), (tf_params, tf_flops) = cost["tokenizer"], cost["transformer"]
    convs = " -> ".join(str(w) for w in (*cfg.tokenizer_widths, cfg.embed_dim))
    stride = cfg.token_stride()
    pools = "each" if cfg.tokenizer_final_pool else "each but the last"
    order = " before BN and GELU" if cfg.tokenizer_pool_first else ""
    return (
        f"Hybrid ViT (a convolutional tokenizer, then a transformer; CCT-style): tokenizer of "
        f"{len(cfg.tokenizer_widths) + 1} Conv3x3-BN-GELU ({convs} channels, a 2x2 max-pool after {pools}{order}: "
        f"one token per {stride}x{stride} pixels), {tok_params:,} parameters and {tok_flops / 1e6:,.1f} MFLOPs per "
        f"32x32 image; transformer: embed {cfg.embed_dim}, {blocks}, learned position embeddings, {readout}{drop}, "
        f"{tf_params:,} parameters and {tf_flops / 1e6:,.1f} MFLOPs"
    )


FAMILY = ClassifierFamily(name="vit", build=build_vit, heatmap="rollout", channels_last=False, describe=describe_vit)
