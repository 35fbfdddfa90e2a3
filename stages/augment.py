"""DVC stage `augment`: the classifier augmentation policy (normalisation stats of the training
subset + the random transforms) and a preview grid. The transforms themselves run batched on the
device inside the training loop (reprovision/data/augment.py).
"""

import sys
from pathlib import Path

# This checkout's library, also inside DVC's temporary experiment copies.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from reprovision.config import load_params  # noqa: E402
from reprovision.core.stage import main, write_json  # noqa: E402
from reprovision.data.augment import make_policy, preview_grid  # noqa: E402
from reprovision.data.datasets import load_split, stratified_subset, validation_split  # noqa: E402
from reprovision.layout import POLICY, PREPARED, PREVIEW  # noqa: E402


def augment() -> None:
    params = load_params()
    dataset = params.data.classifier_dataset
    train = load_split(PREPARED, dataset, "train")
    idx = stratified_subset(train.y, params.data.train_fraction, params.seed)
    # Statistics of the images the classifiers train on: the validation split is held out of them too.
    idx = idx[validation_split(train.y[idx], params.data.val_fraction, params.seed)[0]]
    policy = make_policy(dataset, params.augment, train.x[idx])
    write_json(POLICY, policy.to_json())
    rng = torch.Generator().manual_seed(params.seed)
    preview = torch.from_numpy(np.ascontiguousarray(train.x[idx[: params.augment.preview_images]]))
    preview_grid(preview, policy, PREVIEW, nrow=8, generator=rng)
    print(f"[augment] {dataset}: mean {np.round(policy.mean, 4)} std {np.round(policy.std, 4)}; preview {PREVIEW}")


if __name__ == "__main__":
    main(augment)
