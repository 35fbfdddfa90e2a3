"""Every classifier family, for the stages that handle them all (evaluate) and the benchmark.

The families are config.CLASSIFIERS: each is the module models/<name>.py, imported here by name, so
that adding one needs no line here. tools/deps.py knows this rule and lists those modules among the
deps of every stage that imports this one; a `train-<name>` stage imports only its own family's module.
"""

import importlib

from reprovision.config import CLASSIFIERS
from reprovision.models import ClassifierFamily


def _family(name: str) -> ClassifierFamily:
    family = importlib.import_module(f"reprovision.models.{name}").FAMILY
    if family.name != name:
        raise ValueError(
            f"models/{name}.py's FAMILY is named {family.name!r}: name it {name!r}, as its params.yaml section"
        )
    return family


FAMILIES: dict[str, ClassifierFamily] = {name: _family(name) for name in CLASSIFIERS}
