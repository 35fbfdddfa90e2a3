"""DVC stage `fetch-data`: MNIST and the classifier dataset, checksum-verified, as uint8 arrays + manifest."""

import sys
from pathlib import Path

# Use this checkout's library, also inside DVC's temporary experiment copies.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from reprovision.pipeline import fetch_data, run_stage

if __name__ == "__main__":
    run_stage(fetch_data)
