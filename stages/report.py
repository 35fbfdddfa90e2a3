"""DVC stage `report`: reports/report.md and a self-contained reports/report.html."""

import sys
from pathlib import Path

# Use this checkout's library, also inside DVC's temporary experiment copies.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from reprovision.pipeline import report, run_stage

if __name__ == "__main__":
    run_stage(report)
