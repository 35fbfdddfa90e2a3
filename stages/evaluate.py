"""DVC stage `evaluate`: per-class metrics, confusion matrices, heat maps for every classifier; GAN quality collected."""

import sys
from pathlib import Path

# Use this checkout's library, also inside DVC's temporary experiment copies.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from reprovision.pipeline import evaluate, run_stage

if __name__ == "__main__":
    run_stage(evaluate)
