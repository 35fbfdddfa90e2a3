"""Training recipes: each a name for a dict of params.yaml overrides, for `reprovision recipe` and the benchmark.

A recipe is a dict of dotted params.yaml keys and values, defined here once. The benchmark applies it on top
of `Params()`, the code defaults, which ARE the reference settings of docs/references.md (R1-R3).
`dvc_set_args` renders the very same dict as `dvc exp run -S key=value` arguments, plus `-S recipe=<name>`
(params.yaml's `recipe`, logged with every run), so `reprovision recipe <name>` runs any row of the
benchmark through the pipeline, tracked, with nothing translated by hand (docs/how-it-works.md, "Recipes").

The improved recipes keep every architecture exactly as the references built it (same layers,
widths, dropout) and change only how it is trained. What is measured (BENCHMARKS.md, "Recipes"):
`reference` on the CPU (CNN 91.32 %, ViT 70.08 %) and on one H200 (87.70 %, 70.16 %); `improved` on
one H200 (CNN 89.41 % after 30 epochs, ViT 76.84 % at epoch 22 of 30, not run to the end);
`airbench94` on the CPU (94.11 %, mean of 5 seeds). Unmeasured: the accuracies of `vit-long` and
`vit-modern` (hundreds of ViT epochs, a GPU's work).
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from typing import Any

MODELS = ("vit", "cnn", "dcgan", "mlp")


@dataclass(frozen=True)
class Recipe:
    name: str
    models: tuple[str, ...]  # the benchmark models it is meant for
    overrides: dict[str, Any]  # dotted params.yaml key -> value
    why: str


REFERENCE = Recipe(
    name="reference",
    models=MODELS,
    overrides={},  # params.yaml's defaults: R3 batch 128, 30 epochs; R1/R2 batch 64/32, 50 epochs
    why="R1-R3 exactly as published (the defaults of config.py and params.yaml)",
)

# ViT: R3 trained with AdamW lr 1e-3 from step 0, no warm-up. A transformer's Adam statistics are
# poor for the first few hundred steps, and a full-size step then throws the attention weights far
# off; a linear warm-up is what from-scratch ViT recipes (DeiT, timm's scripts) add.
# Label smoothing and gradient clipping are the other cheap, standard stabilisers. Batch 256 keeps
# ~5,900 steps in 30 epochs (enough for warm-up + cosine) while filling a GPU better than 128.
# No CutMix/MixUp at 30 epochs: mixing pays off once a run is long enough to overfit (DeiT trains
# 300 epochs); in 30 it mostly slows the fit. The long recipe below adds it.
_VIT_IMPROVED = {
    "vit.batch_size": 256,
    "vit.scheduler": "warmup_cosine",
    "vit.warmup_epochs": 5,
    "vit.label_smoothing": 0.1,
    "vit.grad_clip": 1.0,
    # unchanged from R3: AdamW, lr 1e-3 (lr x vit.lr_mult = 1e-3 x 1), weight decay 0.05, 30 epochs
}

# CNN: R3 used Adam lr 1e-3 + StepLR. For BatchNorm CNNs on CIFAR, SGD with Nesterov momentum and
# weight decay 5e-4 generalises better than Adam (Wilson et al. 2017) and is what every fast
# CIFAR-10 recipe uses (Page's ResNet-9 DAWNBench entry, Jordan's airbench). lr 0.2 at batch 512 sits
# between the classic 0.1 at batch 128 and the 0.4 Page used at batch 512 with a residual net (this
# one has none); it is the first knob to sweep on a GPU: `-S cnn.lr_mult=100,200,400`.
_CNN_IMPROVED = {
    "cnn.batch_size": 512,
    "cnn.optimizer": "sgd",  # nesterov, momentum 0.9: the config's defaults for sgd
    "cnn.lr_mult": 200.0,  # lr = 1e-3 x 200 = 0.2
    "cnn.weight_decay": 5e-4,
    "cnn.scheduler": "warmup_cosine",
    "cnn.warmup_epochs": 3,
    "cnn.label_smoothing": 0.1,
}

IMPROVED = Recipe(
    name="improved",
    models=("vit", "cnn"),
    overrides={**_VIT_IMPROVED, **_CNN_IMPROVED},
    why="same architectures, 30 epochs; ViT: warm-up + cosine, label smoothing, clipping, batch 256; "
    "CNN: SGD Nesterov lr 0.2, wd 5e-4, warm-up + cosine, label smoothing, batch 512",
)

# 200 epochs: long enough to overfit a 5M-parameter ViT on 50k images, so CutMix (R4) earns its cost.
# `augment` is one section shared by both classifiers: through `dvc exp run` the CNN retrains with
# CutMix too (under whatever cnn settings params.yaml holds).
VIT_LONG = Recipe(
    name="vit-long",
    models=("vit",),
    overrides={**_VIT_IMPROVED, "vit.epochs": 200, "vit.warmup_epochs": 10, "augment.cutmix_prob": 0.5},
    why="the improved ViT recipe for 200 epochs, plus CutMix on half the batches",
)

# R3's ViT (same 5,362,762 parameters) trained as small ViTs from scratch are (DeiT; Lee et al.'s SPT/LSA
# code; CCT): stochastic depth, TrivialAugment, random erasing, CutMix/MixUp, label smoothing, no weight
# decay on biases/norms/position embedding/[CLS], warm-up + cosine, and an EMA of the weights that
# evaluate scores beside them. Hundreds of epochs: its accuracy is for a GPU to measure (unmeasured so far).
VIT_MODERN = Recipe(
    name="vit-modern",
    models=("vit",),
    overrides={
        **_VIT_IMPROVED,
        "vit.epochs": 100,
        "vit.drop_path": 0.1,
        "vit.decay_exempt": True,
        "vit.ema_decay": 0.9998,
        "augment.trivial_augment": True,
        "augment.erasing_prob": 0.25,
        "augment.cutmix_prob": 0.5,
        "augment.mixup_prob": 0.5,
    },
    why="the improved ViT recipe for 100 epochs with drop-path 0.1, TrivialAugment, random erasing, CutMix/MixUp, "
    "no weight decay on biases/norms/embeddings, and a weight EMA",
)

# KellerJordan/cifar10-airbench's airbench94 (legacy/airbench94.py: 94.01 % mean of 1,000 runs), its
# hyper-parameters translated: it sums the loss over the batch and states lr 11.5 and weight decay
# 0.0153 per 1,024 images with momentum folded in (lr / (1024 (1 + 1 / (1 - 0.85)))); for the mean
# loss that is lr 1.5 (1e-3 x 1500) and SGD weight decay 0.0153 / 11.5. Its 9.9 epochs are 10 here
# and its last partial batch is kept (490 steps, not 476). `augment` is shared: through the whole DAG
# the ViT would train with translate 2 and alternating flips too; the reference runs target train-cnn.
AIRBENCH94 = Recipe(
    name="airbench94",
    models=("cnn",),
    overrides={
        "cnn.arch": "airbench94",
        "cnn.epochs": 10,
        "cnn.batch_size": 1024,
        "cnn.optimizer": "sgd",
        "cnn.momentum": 0.85,
        "cnn.nesterov": True,
        "cnn.lr_mult": 1500.0,
        "cnn.weight_decay": 0.0153 / 11.5,
        "cnn.norm_lr_mult": 64.0,
        "cnn.scheduler": "warmup_linear",
        "cnn.warmup_fraction": 0.23,
        "cnn.lr_start_factor": 0.2,
        "cnn.lr_end_factor": 0.07,
        "cnn.label_smoothing": 0.2,
        "cnn.lookahead_every": 5,
        "cnn.lookahead_decay": 0.95,
        "cnn.tta": "mirror_translate",
        "augment.crop_padding": 2,
        "augment.pad_mode": "reflect",
        "augment.alternate_flips": True,
    },
    why="airbench94 (KellerJordan/cifar10-airbench) as the CNN: 10 epochs, batch 1024, Nesterov SGD, "
    "lookahead, label smoothing 0.2, translate 2, alternating flips, test-time augmentation",
)

# A ViT for small data on a CPU budget (issue 43): `vit.arch: hybrid`, a three-convolution tokenizer (CCT) giving
# 8x8 tokens of 256 channels to a small transformer, trained the way airbench trains its CNN: a short schedule
# with warm-up and linear decay, label smoothing, translate with reflect padding, alternating flips and
# test-time augmentation; AdamW (a transformer's optimiser) with no decay on biases, norms and embeddings.
# The CPU's reference attention kernel ("math") is faster at 65 tokens (BENCHMARKS "ViT speed levers").
# The first recipe (widths 64/128, 3 blocks, batch 256, 13 epochs; commit 247840d) reached 88.02 % and still
# underfit (train 89.4 %); the second (widths 64/256, 2 blocks, batch 128, 15 epochs of 8x8 tokens; 36d340b) 89.28 %,
# its curve still climbing at the end. The transformer runs at a third of the convolutions' rate here, so this one
# pools once more (4x4 tokens: x1.8 img/s) and spends the time on 32 epochs; fused AdamW adds x1.11. Chosen on
# the validation split at equal training time (5-epoch-scale proxies, EPYC-512): 2 blocks for 8 epochs 84.7 %,
# 4 blocks for 6 epochs 81.7 % (docs/measurements.md, 2026-12-07).
VIT_HYBRID = Recipe(
    name="vit-hybrid",
    models=("vit",),
    overrides={
        "vit.arch": "hybrid",
        "vit.tokenizer_widths": [64, 256],
        "vit.tokenizer_final_pool": True,
        "vit.embed_dim": 256,
        "vit.depth": 2,
        "vit.heads": 4,
        "vit.mlp_ratio": 2.0,
        "vit.dropout": 0.0,
        "vit.epochs": 32,
        "vit.batch_size": 128,
        "vit.optimizer": "adamw",
        "vit.cpu_optimizer": "fused",
        "vit.lr_mult": 1.5,
        "vit.weight_decay": 0.05,
        "vit.decay_exempt": True,
        "vit.scheduler": "warmup_linear",
        "vit.warmup_fraction": 0.1,
        "vit.lr_start_factor": 0.1,
        "vit.lr_end_factor": 0.02,
        "vit.label_smoothing": 0.1,
        "vit.grad_clip": 1.0,
        "vit.tta": "mirror_translate",
        "vit.cpu_attention": "math",
        "augment.crop_padding": 4,
        "augment.pad_mode": "reflect",
        "augment.alternate_flips": True,
    },
    why="a hybrid ViT (3-conv tokenizer of 64/256 channels pooled to 4x4 tokens, 2 transformer blocks of 256) "
    "trained airbench-style: 32 epochs at batch 128, fused AdamW lr 1.5e-3 with warm-up and linear decay, label "
    "smoothing, translate 4, alternating flips, test-time augmentation",
)

RECIPES: dict[str, Recipe] = {r.name: r for r in (REFERENCE, IMPROVED, VIT_LONG, VIT_MODERN, AIRBENCH94, VIT_HYBRID)}


def get(name: str) -> Recipe:
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; allowed: {', '.join(RECIPES)}")
    return RECIPES[name]


def nest(overrides: dict[str, Any]) -> dict[str, Any]:
    """{"vit.epochs": 200} -> {"vit": {"epochs": 200}}: the shape of params.yaml."""
    tree: dict[str, Any] = {}
    for key, value in overrides.items():
        *sections, leaf = key.split(".")
        node = tree
        for section in sections:
            node = node.setdefault(section, {})
        node[leaf] = value
    return tree


def hydra_value(value: Any) -> str:
    """A value in the override grammar `dvc exp run -S` parses (Hydra's): true, 0.0005, [64,128], adamw."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    if isinstance(value, (int, float, str)):
        return repr(value) if isinstance(value, float) else str(value)
    raise TypeError(
        f"cannot render {value!r} ({type(value).__name__}) as a -S value; use bool, int, float, str or a list"
    )


def dvc_set_args(overrides: dict[str, Any]) -> list[str]:
    """Overrides as `dvc exp run` arguments: ["-S", "vit.batch_size=256", ...]."""
    return [arg for key, value in overrides.items() for arg in ("-S", f"{key}={hydra_value(value)}")]


def recipe_set_args(recipe: Recipe) -> list[str]:
    """The recipe as `dvc exp run` arguments: its overrides, then its name into params.yaml's `recipe`."""
    return [*dvc_set_args(recipe.overrides), "-S", f"recipe={recipe.name}"]


def dvc_command(recipe: Recipe) -> str:
    """A shell line that runs the recipe through the pipeline: `dvc exp run -n improved -S ... -S recipe=improved`."""
    return shlex.join(["dvc", "exp", "run", "-n", recipe.name, *recipe_set_args(recipe)])
