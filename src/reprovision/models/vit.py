"""Vision Transformer for small images (R3, R4): patch embedding, [CLS] token, pre-norm blocks.

At the defaults (CIFAR-10, patch 4, embed 192, depth 12, heads 3) it has exactly the
5,362,762 parameters of R3's ViT. Attention runs through `F.scaled_dot_product_attention`
(fused kernels on GPU); `return_attention=True` instead computes softmax(QK^T / sqrt(d))
explicitly so that attention rollout can read every block's maps.
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
    from reprovision.core.compat import import_torchvision

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
    ) -> None:
        super().__init__()
        if image_size % patch_size:
            raise ValueError(
                f"patch_size={patch_size} does not divide image_size={image_size}; pick a divisor of {image_size}"
            )
        if embed_dim % heads:
            raise ValueError(f"embed_dim={embed_dim} is not divisible by heads={heads}; pick heads dividing embed_dim")
        self.image_size = image_size
        num_patches = (image_size // patch_size) ** 2
        # A stride-patch conv is the linear projection of non-overlapping flattened patches.
        self.patch_embed = nn.Conv2d(channels, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))
        self.embed_drop = nn.Dropout(dropout)
        # Stochastic depth rises linearly with depth, from 0 at the first block to `drop_path` (DeiT).
        rates = [drop_path * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(Block(embed_dim, heads, mlp_ratio, dropout, rate) for rate in rates)
        self.norm = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes)
        # Small random embeddings (as in ViT/timm): zeros would make every position look the same at start.
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def no_weight_decay(self) -> set[str]:
        """Parameters that `decay_exempt` keeps out of weight decay besides biases and norms (timm's convention)."""
        return {"pos_embed", "cls_token"}

    def _encode(self, x: Tensor, return_attention: bool) -> tuple[Tensor, list[Tensor]]:
        """The normalised [CLS] embedding (B, D), and each block's attention when asked."""
        if x.ndim != 4 or x.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(
                f"ViT got input of shape {tuple(x.shape)}; it was built for (B, C, {self.image_size}, "
                f"{self.image_size}) images: build it with image_size matching the data"
            )
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, num_patches, D)
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        tokens = self.embed_drop(torch.cat([cls, tokens], dim=1) + self.pos_embed)
        attentions = []
        for block in self.blocks:
            tokens, attention = block(tokens, return_attention)
            if return_attention:
                attentions.append(attention)
        return self.norm(tokens[:, 0]), attentions

    def features(self, x: Tensor) -> Tensor:
        """The [CLS] token after the final LayerNorm: what the classifier head sees, (B, embed_dim)."""
        return self._encode(x, return_attention=False)[0]

    def forward(self, x: Tensor, return_attention: bool = False) -> Tensor | tuple[Tensor, list[Tensor]]:
        """Logits (B, classes); with `return_attention`, also one (B, heads, T, T) map per block, T = 1 + patches."""
        cls, attentions = self._encode(x, return_attention)
        logits = self.head(cls)
        return (logits, attentions) if return_attention else logits


def build_vit(cfg, *, num_classes: int, channels: int, image_size: int) -> ViT:
    """The ViT that the `vit` section of params.yaml describes."""
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
    )


def describe_vit(cfg, *, num_classes: int) -> str:
    return (
        f"Vision Transformer (R3): patch {cfg.patch_size}, embed {cfg.embed_dim}, depth {cfg.depth}, "
        f"heads {cfg.heads}, MLP ratio {cfg.mlp_ratio}, dropout {cfg.dropout}, learned position embeddings, [CLS] token"
        + (f", stochastic depth up to {cfg.drop_path}" if cfg.drop_path else "")
    )


FAMILY = ClassifierFamily(name="vit", build=build_vit, heatmap="rollout", channels_last=False, describe=describe_vit)
