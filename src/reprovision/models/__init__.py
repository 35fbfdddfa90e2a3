"""The model zoo, one module per family, so that a stage imports only the architectures it runs:
vit.py (R3 ViT), cnn.py (R3 CNN) and resnet.py (R4 ResNet-18), gan.py (R1, R2), judge.py (LeNet).
Each family has a `build_*` that reads its params.yaml section.
"""

from torch import nn


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters (BatchNorm running statistics are buffers, not counted)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
