"""The one place that works around the environment, used only when needed.

PyPI's torchvision wheel is built against CUDA torch; beside a CPU-only torch its compiled
`_C` library cannot load and `import torchvision` fails with
"operator torchvision::nms does not exist". Declaring the two operator schemas that
torchvision's Python code registers fakes for lets the pure-Python parts (datasets,
transforms, utils) import. `torchvision.ops` and `torchvision.io` stay unusable, so this
project reads image files with PIL and never calls torchvision ops.

It imports nothing of this project, so data/, models/ and measure/ use it from beneath them all
(tests/test_layers.py).
"""

from __future__ import annotations

import importlib

_patched_library = None  # keep a reference: the schemas live as long as this object


def import_torchvision():
    """`import torchvision`, declaring the missing operator schemas only if the import fails."""
    global _patched_library
    try:
        return importlib.import_module("torchvision")
    except RuntimeError as err:
        if "torchvision::nms" not in str(err):
            raise
    import sys

    import torch

    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]  # drop the half-imported package before trying again
    _patched_library = torch.library.Library("torchvision", "DEF")
    _patched_library.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _patched_library.define("qnms(Tensor qdets, Tensor qscores, float iou_threshold) -> Tensor")
    return importlib.import_module("torchvision")
