"""DVC stage `train-cnn`: the R3 CNN (or ResNet-18), through the shared classifier loop."""

import sys
from pathlib import Path

# Use this checkout's library, also inside DVC's temporary experiment copies.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from reprovision.pipeline import train_classifier, run_stage

if __name__ == "__main__":
    run_stage(train_classifier, "cnn")
