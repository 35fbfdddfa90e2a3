"""Every classifier family, for the stages that handle them all (evaluate) and the benchmark.

A `train-<name>` stage imports only its own family's module, so that its DVC deps stay narrow.
tests/test_families.py checks that this list and config.CLASSIFIERS name the same families.
"""

from reprovision.models import cnn, vit

FAMILIES = {family.name: family for family in (vit.FAMILY, cnn.FAMILY)}
