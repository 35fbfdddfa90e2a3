"""DVC stage `report`: every result on one page beside the reference figures (reports/report.html,
reports/report.md), and an MLflow summary run linked to the model runs (reprovision/report.py).
"""

import sys
from pathlib import Path

# This checkout's library, also inside DVC's temporary experiment copies.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from reprovision.report import build_report, log_summary_run  # noqa: E402
from reprovision.stage import main, start  # noqa: E402


def report() -> None:
    ctx = start("report")
    key_numbers = build_report(Path("."), ctx.params)
    run_id = log_summary_run(Path("."), key_numbers, ctx.params)
    print(f"[report] reports/report.html and reports/report.md; MLflow run {run_id}")


if __name__ == "__main__":
    main(report)
