"""The classifier-family protocol: one registry, one config section per family, and no branch on a
family's name anywhere else (README "Add a model family")."""

import ast
from pathlib import Path

import pytest
import torch

from reprovision.config import CLASSIFIERS, DATASET_SHAPES, Params
from reprovision.layout import GANS, HEATMAPS, LABELS, REGISTERED_MODELS
from reprovision.models.classifiers import FAMILIES

ROOT = Path(__file__).resolve().parents[1]


def test_the_registry_and_the_config_name_the_same_families():
    assert tuple(FAMILIES) == CLASSIFIERS
    for name, family in FAMILIES.items():
        assert family.name == name and family.heatmap in (*HEATMAPS, None)
        assert LABELS[name] and REGISTERED_MODELS[name] == f"reprovision-{name}"


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_every_family_builds_from_its_section_and_describes_itself(name):
    family, cfg = FAMILIES[name], Params().classifier(name)
    channels, size, _, classes = DATASET_SHAPES["cifar10"]
    model = family.build(cfg, num_classes=classes, channels=channels, image_size=size).eval()
    assert model(torch.zeros(2, channels, size, size)).shape == (2, classes)
    assert family.describe(cfg, num_classes=classes) and cfg.architecture()
    if family.heatmap == "gradcam":
        assert isinstance(model.gradcam_layer, torch.nn.Module)


def _name_branches(path: Path) -> list[str]:
    """Comparisons (==, !=, in) against a family's name (a classifier's or a GAN's) as a string constant."""
    families = {*CLASSIFIERS, *GANS}
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            names = [o.value for o in operands if isinstance(o, ast.Constant) and o.value in families]
            names += [
                e.value
                for o in operands
                if isinstance(o, (ast.Tuple, ast.List, ast.Set))
                for e in o.elts
                if isinstance(e, ast.Constant) and e.value in families
            ]
            if names:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} compares with {names}")
    return found


def test_no_branch_on_a_family_name_outside_the_family_modules():
    allowed = ROOT / "src" / "reprovision" / "models"
    files = [*(ROOT / "src").rglob("*.py"), *(ROOT / "stages").glob("*.py"), *(ROOT / "benchmarks").glob("*.py")]
    branches = [b for f in files if allowed not in f.parents for b in _name_branches(f)]
    assert not branches, "a family's behaviour belongs in its models/<family>.py (ClassifierFamily):\n" + "\n".join(
        branches
    )
