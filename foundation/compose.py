"""Hydra composition with typed, validated configs.

Every command composes a primary config from ``foundation.configs`` with the user's
overrides. Structured dataclass schemas (one next to each component, the commands' in
``foundation.config``, each recipe's next to its task) are registered in Hydra's
ConfigStore, so a misspelled key or a wrong type fails at start with a message that names
the key, before any process group, model or data exists.
"""

from __future__ import annotations

from hydra import compose as hydra_compose
from hydra import initialize_config_module
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from foundation.config import ConfigError, EvalConfig, ExportConfig, PlanConfig, TrainConfig
from foundation.data.configs import register_configs as register_data_configs
from foundation.recipes import RECIPES, recipe_dirs

__all__ = ["ConfigError", "compose"]


def register_configs() -> None:
    store = ConfigStore.instance()
    store.store(name="train_schema", node=TrainConfig)
    store.store(name="eval_schema", node=EvalConfig)
    store.store(name="export_schema", node=ExportConfig)
    store.store(name="plan_schema", node=PlanConfig)
    for name, recipe in RECIPES.items():
        store.store(group="recipe", name=f"{name}_schema", node=recipe.config_class)
    register_data_configs()


def compose(config_name: str, overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """Compose ``config_name`` with ``overrides``; raise ConfigError naming what is wrong
    (every override that is wrong, not only the first Hydra meets)."""
    register_configs()
    try:
        cfg = _compose(config_name, overrides)
        missing = sorted(OmegaConf.missing_keys(cfg))
        if missing:
            raise ConfigError(f"missing required value(s): {', '.join(missing)} "
                              f"(pass them as overrides, e.g. {missing[0]}=...)")
        OmegaConf.resolve(cfg)
        return cfg
    except (HydraException, OmegaConfBaseException) as err:
        problems = _wrong_overrides(config_name, overrides) or [_explain(err)]
        if len(problems) == 1:
            raise ConfigError(problems[0]) from None
        raise ConfigError(f"{len(problems)} problems:\n" + "\n".join(
            "- " + problem.replace("\n", "\n  ") for problem in problems)) from None


# Config groups of one command only (a group named like another command's, e.g. engine)
COMMAND_SEARCH_PATHS = {"data_build": ["pkg://foundation.data.build_configs"]}


def _compose(config_name: str, overrides: list[str] | tuple[str, ...]) -> DictConfig:
    dirs = [*COMMAND_SEARCH_PATHS.get(config_name, []),
            *(f"file://{d.resolve()}" for d in recipe_dirs())]  # the user's recipe YAMLs
    search = [f"hydra.searchpath=[{','.join(dirs)}]"] if dirs else []
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module("foundation.configs", version_base="1.3"):
            return hydra_compose(config_name, overrides=[*search, *overrides])
    finally:
        GlobalHydra.instance().clear()


def _wrong_overrides(config_name: str, overrides: list[str] | tuple[str, ...]) -> list[str]:
    """Each override that fails on its own (with the config-group choices, which decide what
    keys exist), explained. Hydra stops at the first; a user wants them all at once."""
    groups = [o for o in overrides if "." not in o.split("=")[0]]
    problems = []
    for override in overrides:
        try:
            _compose(config_name, [*groups, override] if override not in groups else groups)
        except (HydraException, OmegaConfBaseException) as err:
            if (problem := _explain(err)) not in problems:
                problems.append(problem)
    return problems


def _explain(err: Exception) -> str:
    """Hydra's message, shortened to the lines that name the key and the problem."""
    text = str(err)
    cause = err.__cause__
    while cause is not None:  # the innermost cause carries full_key
        text = f"{text}\n{cause}"
        cause = cause.__cause__
    seen, lines = set(), []
    for line in (ln.strip() for ln in text.splitlines()):
        if line and line not in seen and not line.startswith(
                ("object_type", "reference_type", "Config search path", "provider=")):
            seen.add(line)
            lines.append(line)
    return "\n".join(lines)
