"""DVC stage `train-cnn`: R3's reference CNN (or R4's ResNet-18, `cnn.arch`), trained by the shared classifier loop."""

import sys
from pathlib import Path

# This checkout's library, also inside DVC's temporary experiment copies.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from train_classifier import train  # noqa: E402  (stages/train_classifier.py, beside this script)

from reprovision.core.stage import main  # noqa: E402
from reprovision.models.cnn import FAMILY  # noqa: E402

if __name__ == "__main__":
    main(train, FAMILY)
