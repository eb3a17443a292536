"""The typed schemas of the commands (train, eval, export, plan), and config identity.

A leaf: the components' own schemas are imported from next to the classes they configure;
nothing here imports the trainer, evaluation, export or the recipes. ``foundation.compose``
registers these with Hydra and composes them with the user's overrides.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf

from foundation.choices import Choice
from foundation.data.loader import DataConfig
from foundation.distributed.engine import EngineConfig, OptimConfig
from foundation.distributed.sharding import ShardingConfig, ShardingType
from foundation.launch.config import LauncherConfig
from foundation.models.losses import Loss
from foundation.models.member import MemberModelConfig
from foundation.telemetry import TelemetryConfig
from foundation.tracking import LoggerConfig


class OnNan(str, Enum):
    """A NaN/inf loss: ``stop`` (naming the step) or ``skip`` the step (counted)."""

    stop = "stop"
    skip = "skip"


class Reshard(str, Enum):
    """Resuming on other ranks or loader workers (tables and dense state reshard exactly):
    ``continue_epoch`` continues the checkpoint's epoch without the samples it consumed (each
    sample exactly once); ``restart_epoch`` restarts it (those samples are seen again);
    ``refuse``."""

    continue_epoch = "continue_epoch"
    restart_epoch = "restart_epoch"
    refuse = "refuse"


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
    reshard: Reshard = Reshard.continue_epoch
    # After the last step, evaluate the final model on this split (e.g. test) in the same
    # processes and write RUN/eval.json as `foundation eval` does ("": none; needs patience=0,
    # where the final model is the result).
    final_eval_split: str = ""
    optim: OptimConfig = field(default_factory=OptimConfig)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)


@dataclass
class TrainConfig:
    recipe: Any = MISSING
    model: MemberModelConfig = field(default_factory=MemberModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    sharding: ShardingConfig = field(default_factory=ShardingConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    seed: int = 0
    run_dir: str = MISSING


@dataclass
class EvalConfig:
    run_dir: str = MISSING
    split: str = "test"
    checkpoint: str = "auto"  # auto (best with early stopping, else latest) | latest | best | step-N
    batch_size: int = 256


class Device(Choice):
    cuda = "cuda"
    cpu = "cpu"


@dataclass
class TableSpec:
    rows: int = MISSING
    dim: int = 128


@dataclass
class PlanConfig:
    """``foundation plan``: a model's tables and dense state on a cluster (configs/plan.yaml)."""

    tables: dict[str, TableSpec] = field(
        default_factory=lambda: {"items": TableSpec(rows=1_000_000)})
    world_size: int = 8
    ranks_per_node: int = 8
    device: Device = Device.cuda
    device_memory_gb: float = 80.0
    batch_size: int = 128  # sequences per rank and step (data.batch_size)
    loss: Loss = Loss.sampled_softmax  # recipe.loss: what the scoring buffers hold
    num_negatives: int = 256  # recipe.num_negatives (sampled softmax)
    model: MemberModelConfig = field(default_factory=MemberModelConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    sharding: ShardingConfig = field(default_factory=lambda: ShardingConfig(
        types=[ShardingType.row_wise, ShardingType.table_wise, ShardingType.column_wise,
               ShardingType.table_row_wise]))


class Precision(Choice):
    fp32 = "fp32"
    fp16 = "fp16"
    int8 = "int8"


@dataclass
class ExportConfig:
    run_dir: str = MISSING
    checkpoint: str = "auto"  # auto (best with early stopping, else latest) | latest | best | step-N
    output: str = MISSING
    precisions: list[Precision] = field(default_factory=lambda: list(Precision))
    ann: bool = True  # a faiss HNSW index over the item vectors (ann/items.faiss)
    member_embeddings: str | None = None  # a split: its members' embeddings for a store
    parity_split: str = "val"
    parity_batches: int = 2  # per rank
    batch_size: int = 256
    max_abs_diff: float = 1e-4  # parity: largest score difference allowed (fp32)
    min_top10_agreement: float = 0.99  # parity: share of members with identical top-10
    overwrite: bool = False


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

