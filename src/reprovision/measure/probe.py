"""The linear probe: how much a frozen encoder's features know about the labels (R4's SSL evaluation).

Features are extracted once, in eval mode and without gradients (the encoder is never updated,
BatchNorm's running statistics included); scikit-learn then fits a logistic regression on the
standardised features of the labelled training split, and a k-nearest-neighbour vote (cosine
distance, the usual companion figure of SSL papers) needs no fitting at all.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from reprovision.config import ProbeConfig
from reprovision.data.augment import Policy, normalize


@torch.no_grad()
def extract_features(encoder: nn.Module, images: torch.Tensor, policy: Policy, batch_size: int = 500) -> np.ndarray:
    """(N, features) float32 of uint8 `images`, normalised as in training; `encoder` stays frozen."""
    was_training = encoder.training
    encoder.eval()
    try:
        rows = [
            encoder(normalize(images[i : i + batch_size], policy)).float().cpu()
            for i in range(0, len(images), batch_size)
        ]
    finally:
        encoder.train(was_training)
    return torch.cat(rows).numpy()


def probe_accuracy(
    train_features: np.ndarray,
    train_y: np.ndarray,
    evaluated: dict[str, tuple[np.ndarray, np.ndarray]],
    cfg: ProbeConfig,
) -> dict[str, float]:
    """Top-1 accuracy of the logistic-regression probe (`probe_<split>`) and of the k-NN vote
    (`knn_<split>`) on each of the `evaluated` splits ({split: (features, labels)})."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    linear = make_pipeline(StandardScaler(), LogisticRegression(C=cfg.c, max_iter=cfg.max_iter))
    linear.fit(train_features, train_y)
    knn = KNeighborsClassifier(n_neighbors=min(cfg.knn_k, len(train_y)), metric="cosine").fit(train_features, train_y)
    found = {}
    for split, (features, labels) in evaluated.items():
        found[f"probe_{split}"] = float((linear.predict(features) == labels).mean())
        found[f"knn_{split}"] = float((knn.predict(features) == labels).mean())
    return found
