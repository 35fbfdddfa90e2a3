"""The figures the source documents reported, the baseline our numbers are shown beside.

Transcribed from docs/references.md (R1: MLP GAN, R2: DCGAN, R3: ViT vs CNN on CIFAR-10); in code
they are stated only here: the report and benchmarks/benchmark.py read them from this module. Plain data,
no heavy imports, so that anything may import it cheaply.
"""

from __future__ import annotations

from typing import Any

# Ranges are (low, high), as the source gave them. R1 and R2 reported no quality metric, only
# losses ("at" says when), and R1 no timing.
REFERENCE: dict[str, dict[str, Any]] = {
    "vit": {
        "source": "R3",
        "params": 5_362_762,
        "test_acc": (0.52, 0.55),
        "s_per_epoch": 14,
        "train_seconds": 420,
        "train_acc_by_epoch": {1: 0.2939, 2: 0.3879, 3: 0.4403, 4: 0.4793, 5: 0.4852},
    },
    "cnn": {
        "source": "R3",
        "params": 4_823_114,
        "test_acc": (0.65, 0.70),
        "s_per_epoch": (8, 10),
        "train_seconds": (240, 300),
    },
    "mlp": {
        "source": "R1",
        "g_params": 1_496_592,
        "d_params": 533_505,
        "d_loss": 0.347,
        "g_loss": 0.697,
        "at": "final",
    },
    "dcgan": {
        "source": "R2",
        "d_loss": 0.695,
        "g_loss": 0.728,
        "at": "epoch 35",
        "s_per_epoch": 63,
        # (D loss, G loss) per epoch, as R2 printed them
        "losses_by_epoch": {
            1: (0.204, 1.833),
            5: (0.623, 0.923),
            10: (0.671, 0.816),
            20: (0.694, 0.738),
            35: (0.695, 0.728),
        },
    },
}

# Figures of architectures that the pipeline reproduces beside R1-R3 (benchmarks/reference_scale.json
# names their repeated runs by the architecture), as their sources published them.
ARCHITECTURE_REFERENCE: dict[str, dict[str, Any]] = {
    "airbench94": {
        "source": "KellerJordan/cifar10-airbench",
        "test_acc": 0.9401,  # mean of 1,000 runs, legacy/airbench94.py
        "runs": 1000,
        "seconds": 3.83,
        "hardware": "one NVIDIA A100",
    },
}


def midpoint(value: float | tuple[float, float] | None) -> float | None:
    """One number for a reference figure: a range counts as its middle (R3's CNN, 8–10 s: 9 s)."""
    if value is None:
        return None
    return (value[0] + value[1]) / 2 if isinstance(value, tuple) else float(value)
