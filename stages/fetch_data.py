"""DVC stage `fetch-data`: MNIST and the classifier dataset as verified .npy arrays + manifest.json.

From the mirror named by REPROVISION_DATA_MIRROR (offline), else torchvision's downloaders;
every file md5-checked, the same bytes either way (see reprovision/data/datasets.py).
"""

import sys
from pathlib import Path

# This checkout's library, also inside DVC's temporary experiment copies.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from reprovision.config import load_params  # noqa: E402
from reprovision.core.stage import main  # noqa: E402
from reprovision.data.datasets import fetch_all, mirror_from_env  # noqa: E402
from reprovision.layout import PREPARED  # noqa: E402


def fetch_data() -> None:
    params = load_params()
    names = sorted({params.data.gan_dataset, params.data.classifier_dataset})
    manifest = fetch_all(names, PREPARED, mirror_from_env())
    for name, entry in manifest.items():
        print(
            f"[fetch-data] {name}: {entry['train']} train / {entry['test']} test, sha256 "
            f"{entry['sha256'][:12]} ({entry['source']})"
        )


if __name__ == "__main__":
    main(fetch_data)
