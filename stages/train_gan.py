"""DVC stage `train-gan@<model>`: one reference GAN (mlp = R1, dcgan = R2) with its quality metrics."""

import sys
from pathlib import Path

# Use this checkout's library, also inside DVC's temporary experiment copies.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from reprovision.pipeline import run_stage, train_gan

if __name__ == "__main__":
    run_stage(train_gan, sys.argv[1] if len(sys.argv) > 1 else "")
