"""A recipe is one name (issue 45): `reprovision recipe <name>` runs `dvc exp run` with the recipe's `-S` overrides
and `-S recipe=<name>`. Here each recipe goes through DVC's own override code (what `dvc exp run -S` and
`dvc exp run --queue -S` do to params.yaml, without running a stage): params.yaml then holds exactly its values
on top of the committed file and its name, config.py accepts them, and the file's comments (the users'
documentation of every knob) stay, which DVC's Hydra composition would drop (docs/how-it-works.md, "Recipes")."""

from __future__ import annotations

import typing

import pytest
import yaml
from conftest import committed_params
from dvc.utils.hydra import apply_overrides

from reprovision.config import Params, RecipeName, load_params, parse_params
from reprovision.tools import cli
from reprovision.tools.recipes import RECIPES, nest, recipe_set_args


def set_values(recipe_name: str) -> list[str]:
    """The `key=value` strings of the recipe's `-S` arguments, as DVC receives them."""
    args = recipe_set_args(RECIPES[recipe_name])
    assert args[::2] == ["-S"] * (len(args) // 2)
    return args[1::2]


def merged(base: dict, patch: dict) -> dict:
    for key, value in patch.items():
        both_sections = isinstance(value, dict) and isinstance(base.get(key), dict)
        base[key] = merged(base[key], value) if both_sections else value
    return base


def test_config_names_exactly_the_recipes():
    """config.py lists the names without importing recipes.py (every stage imports config): the two agree."""
    assert typing.get_args(RecipeName) == ("none", *RECIPES)
    assert Params().recipe == "none" and yaml.safe_load(committed_params())["recipe"] == "none"


@pytest.mark.parametrize("name", list(RECIPES))
def test_dvc_writes_each_recipes_values_and_name_into_params_yaml(tmp_path, name):
    path = tmp_path / "params.yaml"
    path.write_text(committed_params())
    apply_overrides(path, set_values(name))  # dvc exp run -S ... (the queue applies the same function)
    expected = merged(yaml.safe_load(committed_params()), {**nest(RECIPES[name].overrides), "recipe": name})
    assert yaml.safe_load(path.read_text()) == expected
    params = load_params(path)
    assert params == parse_params(expected) and params.recipe == name
    flat = params.flat()
    assert all(flat[key] == value for key, value in RECIPES[name].overrides.items())
    comments = [line[line.index("#") :].strip() for line in committed_params().splitlines() if "#" in line]
    assert [line[line.index("#") :].strip() for line in path.read_text().splitlines() if "#" in line] == comments


def test_a_later_set_overrides_the_recipes_value(tmp_path):
    """`reprovision recipe airbench94 -S cnn.epochs=2`: the user's -S comes after the recipe's, and wins."""
    path = tmp_path / "params.yaml"
    path.write_text(committed_params())
    apply_overrides(path, [*set_values("airbench94"), "cnn.epochs=2", "seed=3"])
    params = load_params(path)
    assert (params.cnn.epochs, params.seed, params.cnn.arch, params.recipe) == (2, 3, "airbench94", "airbench94")


def test_an_unknown_recipe_name_in_params_yaml_gets_a_suggestion():
    with pytest.raises(ValueError, match=r"recipe = \"airbench\": .*; did you mean 'airbench94'\?"):
        parse_params({"recipe": "airbench"})


def test_the_command_prints_one_dvc_line_with_the_users_arguments_last(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no params.yaml here: nothing for the command's preflight to read
    assert cli.main(["recipe", "--print", "vit-hybrid", "-n", "h-s1", "-S", "seed=1", "train-vit"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("dvc exp run -S vit.arch=hybrid -S 'vit.tokenizer_widths=[64,256]' ")
    assert line.endswith(" -S recipe=vit-hybrid -n h-s1 -S seed=1 train-vit")
    assert cli.main(["recipe", "--print", "reference"]) == 0
    assert capsys.readouterr().out.strip() == "dvc exp run -S recipe=reference"
