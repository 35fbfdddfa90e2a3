"""DVC stage `check-params`: every param checked before any other stage runs.

DVC deletes a stage's outputs just before running it, so a bad value caught inside that stage
would already have cost the workspace its results. Every stage depends on this stage's output,
so a rejected params.yaml stops `dvc repro` / `dvc exp run` here, with everything in place.
The output's content never changes: passing the check re-runs nothing downstream.

The datasets the params select are checked here too, without reading or downloading them: each must be
already prepared, in the mirror REPROVISION_DATA_MIRROR names, or (no mirror set) downloadable. Otherwise
fetch-data would fail only after DVC had removed data/prepared.
"""

import sys
from pathlib import Path

# This checkout's library, also inside DVC's temporary experiment copies.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from reprovision.config import load_params  # noqa: E402
from reprovision.core.stage import main  # noqa: E402
from reprovision.data.datasets import check_available, mirror_from_env  # noqa: E402
from reprovision.layout import PARAMS_CHECKED, PREPARED  # noqa: E402


def check_params() -> None:
    params = load_params()
    if params.device not in ("auto", "cpu"):  # every machine has these two; asking torch costs ~1.3 s of CPU
        from reprovision.core.runtime import resolve_device

        resolve_device(params.device)  # `device: cuda` on a machine without one is a params mistake too
    datasets = {"data.classifier_dataset": params.data.classifier_dataset, "data.gan_dataset": params.data.gan_dataset}
    found = check_available(datasets, PREPARED, mirror_from_env())
    PARAMS_CHECKED.parent.mkdir(parents=True, exist_ok=True)
    PARAMS_CHECKED.write_text("params.yaml passed its checks (reprovision/config.py)\n")
    print(f"[check-params] params.yaml is valid; data: {', '.join(f'{n} from {w}' for n, w in found.items())}")


if __name__ == "__main__":
    main(check_params)
