"""DVC stage `augment`: the augmentation policy (normalisation stats from the train split) and a preview grid."""

import sys
from pathlib import Path

# Use this checkout's library, also inside DVC's temporary experiment copies.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from reprovision.pipeline import augment, run_stage

if __name__ == "__main__":
    run_stage(augment)
