"""Typed Hydra schemas of the data commands, registered in the ConfigStore.

``configs/data_synth.yaml`` and ``configs/data_build.yaml`` name these in their defaults list
(``data_synth_schema`` / ``data_build_schema``), so a misspelled key or a wrong type fails at
compose time with the key's name.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from foundation.data.synthetic import SynthConfig
from foundation.data.writer import BuildConfig


@dataclass
class SynthCommandConfig:
    """``foundation data synth output=DIR [world.members=N ...]``."""

    # The world writes where the command writes; `output` stays the one required key.
    world: SynthConfig = field(default_factory=lambda: SynthConfig(output="${output}"))
    output: str = MISSING
    progress: bool = True


@dataclass
class BuildCommandConfig(BuildConfig):
    """``foundation data build source.format=F source.path=P output=DIR``."""

    progress: bool = True


def register_configs() -> None:
    store = ConfigStore.instance()
    store.store(name="data_synth_schema", node=SynthCommandConfig)
    store.store(name="data_build_schema", node=BuildCommandConfig)
