"""Recipes: one module per job, a Task subclass decorated with ``register_recipe``, plus its
YAML ``configs/recipe/NAME.yaml``. ``RECIPES`` maps names to task classes; ``build_task``
makes a run's task (the trainer and the evaluation both start from it).

Recipes outside this package: set ``FOUNDATION_RECIPES`` to directories (``os.pathsep``
between them) holding ``NAME.py`` modules and their ``recipe/NAME.yaml``; each module is
imported and registers itself, and ``compose`` adds the directories to Hydra's search path.
"""

import importlib
import importlib.util
import os
import pkgutil
import sys
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from foundation.data.writer import load_manifest
from foundation.tasks import RECIPES, Task

RECIPE_DIRS_ENV = "FOUNDATION_RECIPES"


def recipe_dirs() -> list[Path]:
    """The user's recipe directories (``FOUNDATION_RECIPES``)."""
    return [Path(d) for d in os.environ.get(RECIPE_DIRS_ENV, "").split(os.pathsep) if d]


def _import_recipes() -> None:
    for module in pkgutil.iter_modules(__path__):  # every module of this package
        importlib.import_module(f"{__name__}.{module.name}")
    for directory in recipe_dirs():
        if not directory.is_dir():
            raise FileNotFoundError(f"{RECIPE_DIRS_ENV} names {directory}, which is not a "
                                    f"directory of recipe modules")
        for path in sorted(directory.glob("*.py")):
            name = f"foundation_user_recipes.{path.stem}"
            spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)


def build_task(cfg: DictConfig) -> Task:
    """The task of ``cfg.recipe.name`` on ``cfg.data.path``'s shards."""
    manifest = load_manifest(cfg.data.path)
    counts = np.load(Path(cfg.data.path) / "item_counts.npy", allow_pickle=False)
    return RECIPES[cfg.recipe.name](cfg, manifest, counts)


_import_recipes()
__all__ = ["RECIPES", "build_task", "recipe_dirs"]
