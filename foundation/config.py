"""Hydra composition with typed, validated configs.

Every command composes a primary config from ``foundation.configs`` with the user's
overrides. Structured dataclass schemas (one next to each component) are registered in
Hydra's ConfigStore, so a misspelled key or a wrong type fails at start with a message that
names the key, before any process group, model or data exists.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from hydra import compose as hydra_compose
from hydra import initialize_config_module
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from foundation.distributed.engine import EngineConfig, OptimConfig
from foundation.distributed.sharding import ShardingConfig
from foundation.models.member import MemberModelConfig
from foundation.train.logging import LoggerConfig
from foundation.train.stream import DataConfig


class OnNan(str, Enum):
    """A NaN/inf loss: ``stop`` (naming the step) or ``skip`` the step (counted)."""

    stop = "stop"
    skip = "skip"


class Reshard(str, Enum):
    """Resuming on other ranks or loader workers: ``refuse``, or ``restart_epoch`` (tables
    and dense state reshard exactly; the data stream restarts the checkpoint's epoch)."""

    refuse = "refuse"
    restart_epoch = "restart_epoch"


class ConfigError(ValueError):
    """A config that cannot run: the message names the key and the fix."""


@dataclass
class TrainerConfig:
    max_steps: int = 200
    grad_accum: int = 1
    eval_every: int = 100  # validation every N steps (0: only at the end)
    eval_batches: int = 0  # limit validation batches per rank (0: the whole split)
    checkpoint_every: int = 0  # also checkpoint every N steps (0: only at the end)
    keep_last: int = 0  # keep the newest N committed checkpoints (0: keep all)
    async_checkpoint: bool = False  # write periodic checkpoints' tables in the background
    sample_ledger: bool = False  # record the sample ids each rank trains on (RUN/ledger/)
    patience: int = 0  # stop after N validations without a better eval metric; keep the best
    on_nan: OnNan = OnNan.stop
    collective_timeout_s: float = 600.0  # a hung rank fails the job after this long
    resume: str = "auto"  # auto (newest committed checkpoint in run_dir) | never | a checkpoint path
    reshard: Reshard = Reshard.refuse
    optim: OptimConfig = field(default_factory=OptimConfig)


@dataclass
class TrainConfig:
    recipe: Any = MISSING
    model: MemberModelConfig = field(default_factory=MemberModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    sharding: ShardingConfig = field(default_factory=ShardingConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    seed: int = 0
    run_dir: str = MISSING


@dataclass
class EvalConfig:
    run_dir: str = MISSING
    split: str = "test"
    checkpoint: str = "auto"  # auto (best with early stopping, else latest) | latest | best | step-N
    batch_size: int = 256


def register_configs() -> None:
    from foundation.data.configs import register_configs as register_data_configs
    from foundation.recipes import RECIPES

    store = ConfigStore.instance()
    store.store(name="train_schema", node=TrainConfig)
    store.store(name="eval_schema", node=EvalConfig)
    from foundation.export.config import ExportConfig

    store.store(name="export_schema", node=ExportConfig)
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


def _compose(config_name: str, overrides: list[str] | tuple[str, ...]) -> DictConfig:
    from foundation.recipes import recipe_dirs

    dirs = [f"file://{d.resolve()}" for d in recipe_dirs()]  # the user's recipe YAMLs
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
        if line and line not in seen and not line.startswith(("object_type", "reference_type")):
            seen.add(line)
            lines.append(line)
    return "\n".join(lines)


def config_hash(cfg: DictConfig) -> str:
    import hashlib

    return hashlib.sha256(OmegaConf.to_yaml(cfg, resolve=True).encode()).hexdigest()[:16]


def config_changes(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """``key: old → new`` for every leaf that differs between two resolved configs."""
    changes = []
    for key in sorted(old.keys() | new.keys()):
        a, b, name = old.get(key), new.get(key), f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            changes += config_changes(a, b, f"{name}.")
        elif a != b:
            changes.append(f"{name}: {a} → {b}")
    return changes

