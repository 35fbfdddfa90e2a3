"""What a classifier looks at: Grad-CAM for CNNs, attention rollout for ViTs (R6's layer heat-maps).

Both return one map per image, (B, H, W) at the input resolution, scaled per image to [0, 1]
so that maps of different models and images share one colour scale when overlaid.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reprovision.measure.evaluation import images_hwc, new_figure, save_figure, show_image


def _check_images(x: Tensor) -> None:
    if x.ndim != 4:
        raise ValueError(f"x_norm has shape {tuple(x.shape)}; pass a normalised image batch (B, C, H, W)")


def _scale_each_to_unit(maps: Tensor) -> Tensor:
    """Min-max scale every map of a (B, H, W) batch to [0, 1]; a constant map becomes all zeros."""
    flat = maps.flatten(1)
    lo = flat.min(dim=1).values.view(-1, 1, 1)
    span = flat.max(dim=1).values.view(-1, 1, 1) - lo
    return (maps - lo) / span.where(span > 0, 1.0)


def _upsample(maps: Tensor, size: torch.Size) -> Tensor:
    """(B, h, w) -> (B, H, W), bilinear."""
    return F.interpolate(maps[:, None], size=tuple(size), mode="bilinear", align_corners=False)[:, 0]


def grad_cam(model: nn.Module, layer: nn.Module, x_norm: Tensor, target: Tensor | None = None) -> Tensor:
    """Grad-CAM (Selvaraju et al. 2017) of `target` (default: the predicted class) at `layer`'s output.

    With A_k the K feature maps `layer` outputs and y the target logit,
    map = ReLU(sum_k alpha_k A_k), alpha_k = spatial mean of dy/dA_k. The gradient is taken with
    `torch.autograd.grad` with respect to A only, so no parameter `.grad` is written; the hook is
    removed even on error and the model is left in eval mode. Works inside `torch.no_grad()`.
    """
    _check_images(x_norm)
    model.eval()
    captured: list[Tensor] = []
    handle = layer.register_forward_hook(lambda module, inputs, output: captured.append(output))
    try:
        with torch.enable_grad():
            # An input that requires grad puts A on the graph even if the weights are frozen.
            logits = model(x_norm.detach().requires_grad_(True))
            if len(captured) != 1:
                raise ValueError(
                    f"grad_cam: `layer` ran {len(captured)} times in one forward pass; pass a module that "
                    "runs exactly once, e.g. the model's `gradcam_layer` (its last conv block)"
                )
            activations = captured[0]
            if not isinstance(activations, Tensor) or activations.ndim != 4:
                got = tuple(activations.shape) if isinstance(activations, Tensor) else type(activations).__name__
                raise ValueError(
                    f"grad_cam: `layer` outputs {got}, not a (B, K, h, w) feature map; "
                    "pass a convolutional layer or block"
                )
            if target is None:
                target = logits.argmax(dim=1)
            target = torch.as_tensor(target, device=logits.device).long().view(-1)
            if target.shape[0] != logits.shape[0] or target.min() < 0 or target.max() >= logits.shape[1]:
                raise ValueError(
                    f"grad_cam: targets {target.tolist()} for {logits.shape[0]} images and {logits.shape[1]} "
                    "classes; pass one class index in [0, classes) per image, or None for the predicted class"
                )
            # Samples are independent in eval mode, so the gradient of the summed scores
            # with respect to image i's maps is the gradient of image i's own score.
            score = logits.gather(1, target[:, None]).sum()
            (grads,) = torch.autograd.grad(score, activations)
    finally:
        handle.remove()
    alpha = grads.mean(dim=(2, 3), keepdim=True)
    cam = F.relu((alpha * activations.detach()).sum(dim=1))
    return _scale_each_to_unit(_upsample(cam.float(), x_norm.shape[-2:]))


def _fuse_heads(attention: Tensor, discard_ratio: float) -> Tensor:
    """Head-averaged attention (B, T, T), with the lowest `discard_ratio` of weights per image zeroed.

    Dropping the weakest links (Gildenblat's variant of rollout) sharpens maps of deep models;
    the [CLS]->[CLS] weight is always kept.
    """
    fused = attention.float().mean(dim=1)
    if discard_ratio == 0:
        return fused
    flat = fused.flatten(1)
    lowest = flat.topk(int(flat.shape[1] * discard_ratio), dim=1, largest=False).indices
    drop = torch.zeros_like(flat, dtype=torch.bool).scatter_(1, lowest, True)
    drop[:, 0] = False
    return flat.masked_fill(drop, 0).view_as(fused)


def rollout(attentions: Sequence[Tensor], discard_ratio: float = 0.0) -> Tensor:
    """Attention rollout (Abnar & Zuidema 2020) through all blocks: (B, T, T), rows summing to 1.

    Each block's head-averaged attention gets the identity added (the residual path) and its
    rows renormalised; the blocks are then composed, last block leftmost.
    """
    if not 0 <= discard_ratio < 1:
        raise ValueError(f"discard_ratio = {discard_ratio}; allowed: 0 <= discard_ratio < 1 (0 keeps every weight)")
    if len(attentions) == 0:
        raise ValueError("rollout: no attention maps; the model must return one (B, heads, T, T) tensor per block")
    shape = attentions[0].shape
    for i, attention in enumerate(attentions):
        if attention.ndim != 4 or attention.shape[-1] != attention.shape[-2] or attention.shape != shape:
            raise ValueError(
                f"rollout: block {i} attention has shape {tuple(attention.shape)}; every block must give "
                f"(B, heads, T, T) of one shape (block 0: {tuple(shape)})"
            )
    identity = torch.eye(shape[-1], device=attentions[0].device)
    joint = None
    for attention in attentions:
        mixed = _fuse_heads(attention, discard_ratio) + identity
        mixed = mixed / mixed.sum(dim=-1, keepdim=True)
        joint = mixed if joint is None else mixed @ joint
    return joint


def _patch_grid(num_patches: int, height: int, width: int) -> tuple[int, int]:
    """(rows, cols) of the patch grid of a height x width image cut into `num_patches` patches."""
    rows = round(math.sqrt(num_patches * height / width))
    cols = num_patches // max(rows, 1)
    if rows * cols != num_patches:
        raise ValueError(
            f"attention covers {num_patches} patch tokens, which do not tile a {height}x{width} image; "
            "the model must return attention over [CLS] followed by every patch token (or, with readout "
            "weights, over every patch token)"
        )
    return rows, cols


@torch.no_grad()
def attention_rollout(model: nn.Module, x_norm: Tensor, discard_ratio: float = 0.0) -> Tensor:
    """Where a ViT's prediction draws its information from: (B, H, W) in [0, 1].

    `model(x, return_attention=True)` must return `(logits, [attention per block])`, each attention
    (B, heads, T, T) with T = 1 + num_patches and [CLS] first: the [CLS] row of the rollout; or, for a model
    that pools its tokens (sequence pooling), `(logits, [attention per block], readout)` with T = num_patches
    and the pool's weights (B, T): the rollout's rows mixed by those weights.
    """
    _check_images(x_norm)
    model.eval()
    output = model(x_norm, return_attention=True)
    if not (isinstance(output, tuple) and len(output) in (2, 3)):
        raise ValueError(
            "attention_rollout: model(x, return_attention=True) must return (logits, [attention per block]) "
            f"or (logits, [attention per block], readout weights); got {type(output).__name__}"
        )
    joint = rollout(output[1], discard_ratio)
    batch, tokens = joint.shape[0], joint.shape[-1]
    if len(output) == 3:
        readout = output[2].float()
        if readout.shape != (batch, tokens):
            raise ValueError(
                f"attention_rollout: readout weights of shape {tuple(readout.shape)}; the model must give one "
                f"weight per token, ({batch}, {tokens})"
            )
        to_patches = (readout.unsqueeze(1) @ joint).squeeze(1)
    else:
        tokens, to_patches = tokens - 1, joint[:, 0, 1:]
    rows, cols = _patch_grid(tokens, *x_norm.shape[-2:])
    return _scale_each_to_unit(_upsample(to_patches.reshape(batch, rows, cols), x_norm.shape[-2:]))


def save_heatmap_grid(x_uint8: np.ndarray, maps: Tensor, labels: Sequence[str], path: Path) -> None:
    """Each image above its heat-map overlay (jet, half transparent), captioned with its label."""
    images = images_hwc(x_uint8)
    maps = maps.detach().float().cpu().numpy()
    if maps.shape != images.shape[:3]:
        raise ValueError(
            f"maps have shape {maps.shape} but the images are {images.shape[:3]} (N, H, W); "
            "pass one input-sized map per image, e.g. from grad_cam or attention_rollout"
        )
    if len(labels) != len(images):
        raise ValueError(f"{len(labels)} labels for {len(images)} images; pass one caption per image")
    n = len(images)
    fig = new_figure(figsize=(1.8 * n, 4.0), layout="constrained")
    axes = fig.subplots(2, n, squeeze=False)
    for i in range(n):
        show_image(axes[0, i], images[i])
        axes[0, i].set_title(labels[i], fontsize=8)
        show_image(axes[1, i], images[i])
        axes[1, i].imshow(maps[i], cmap="jet", alpha=0.5, vmin=0, vmax=1)
    save_figure(fig, path)
