"""The training recipes, defined in src/reprovision/tools/recipes.py (`reprovision recipe <name>` runs one through the
pipeline); the benchmark scripts and tests import them from here. Run as a script, it prints each recipe as its
`dvc exp run -S ...` line."""

from __future__ import annotations

from reprovision.tools.recipes import (  # noqa: F401  (re-exported for the benchmark scripts and tests)
    AIRBENCH94,
    IMPROVED,
    MODELS,
    RECIPES,
    REFERENCE,
    VIT_HYBRID,
    VIT_LONG,
    VIT_MODERN,
    Recipe,
    dvc_command,
    dvc_set_args,
    get,
    hydra_value,
    nest,
    recipe_set_args,
)

if __name__ == "__main__":
    for recipe in RECIPES.values():
        print(f"# {recipe.name} ({', '.join(recipe.models)}): {recipe.why}\n{dvc_command(recipe)}\n")
