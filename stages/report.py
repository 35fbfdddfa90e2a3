"""DVC stage `report`: every result on one page beside the reference figures (reports/report.html,
reports/report.md), an MLflow summary run linked to the model runs (reprovision/publish/report.py), and the
registry alias `champion` moved to the better classifier by validation accuracy only through the gate of
reprovision/publish/registry.py (it must beat the alias's holder on the same split); without a validation
split no champion is named and the alias stays where it was.
"""

import sys
from pathlib import Path

# This checkout's library, also inside DVC's temporary experiment copies.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from reprovision.core.context import start  # noqa: E402
from reprovision.core.stage import main  # noqa: E402
from reprovision.publish.registry import promote, read_champion, read_records, why_no_champion  # noqa: E402
from reprovision.publish.report import build_report, log_summary_run  # noqa: E402


def report() -> None:
    ctx = start("report")
    champion, promotion = read_champion(Path(".")), None
    if champion is not None and champion.version:
        val_split = read_records(Path("."))[0][champion.model].get("val_split", "unrecorded")
        promotion = promote(champion, val_split, margin=ctx.params.registry.promote_margin)
        print(f"[report] champion of this run: {champion.sentence()} Registry: {promotion.why}.")
    elif reason := why_no_champion(read_records(Path("."))[0]):
        print(f"[report] {reason}")
    key_numbers = build_report(Path("."), ctx.params, promotion.why if promotion else None)
    run_id = log_summary_run(Path("."), key_numbers, ctx.params)
    print(f"[report] reports/report.html and reports/report.md; MLflow run {run_id}")


if __name__ == "__main__":
    main(report)
