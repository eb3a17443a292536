"""How a downstream recipe fine-tunes a pretrained model: ``recipe.mode``.

* ``full`` trains everything (the sharded tables too);
* ``freeze`` trains only the recipe's new head: every pretrained weight, tables included,
  stays bit-identical;
* ``partial`` trains the head and the dense weights matching ``recipe.partial.trainable``
  (fnmatch patterns over parameter names; the pattern ``tables`` trains the sharded tables);
* ``lora`` trains the head and a low-rank update ``alpha/rank · up @ down`` of each matrix
  matching ``recipe.lora.targets`` (a head's matrix too, which then trains only through
  its update); the pretrained matrices and tables stay frozen.

LoRA is a ``torch.nn.utils.parametrize`` parametrization, so every reader of a weight
(``nn.MultiheadAttention`` reads ``in_proj_weight`` directly) sees the adapted matrix, and
``merge_adapters`` folds the updates into plain weights for export.
"""

from __future__ import annotations

import fnmatch
import logging
import math
from dataclasses import dataclass, field
from enum import Enum

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

log = logging.getLogger(__name__)

TABLES = "tables"  # the partial-mode pattern that trains the sharded tables


class FinetuneMode(str, Enum):
    full = "full"
    freeze = "freeze"
    partial = "partial"
    lora = "lora"


@dataclass
class PartialConfig:
    trainable: list[str] = field(default_factory=lambda: ["encoder.layers.*"])


@dataclass
class LoraConfig:
    rank: int = 4
    alpha: float = 8.0
    targets: list[str] = field(default_factory=lambda: ["encoder.*"])  # matrices (2-D weights)


@dataclass
class FinetuneConfig:
    """The fields every downstream recipe shares (its config class inherits them)."""

    init_from: str | None = None  # a pretrain run dir (its newest checkpoint) or a checkpoint dir
    mode: FinetuneMode = FinetuneMode.full
    # The sharded tables' learning rate when warm-started: pretraining's sharding.lr would
    # move the pretrained rows far in the first steps and undo them.
    table_lr: float = 0.01
    partial: PartialConfig = field(default_factory=PartialConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)


class LowRankUpdate(nn.Module):
    """``weight + alpha/rank · up @ down``; ``up`` starts at zero, so training starts from the
    pretrained matrix exactly."""

    def __init__(self, shape: torch.Size, rank: int, alpha: float):
        super().__init__()
        self.down = nn.Parameter(torch.empty(rank, shape[1]))
        self.up = nn.Parameter(torch.zeros(shape[0], rank))
        nn.init.kaiming_uniform_(self.down, a=math.sqrt(5))
        self.scale = alpha / rank

    def forward(self, weight: Tensor) -> Tensor:
        return weight + self.scale * self.up @ self.down


@dataclass
class Tuning:
    """What a fine-tune trains: counts for the run's report, and whether the tables train."""

    mode: FinetuneMode
    trainable: int
    total: int
    tables_train: bool

    def describe(self) -> str:
        share = self.trainable / max(self.total, 1)
        return (f"recipe.mode={self.mode.value}: training {self.trainable:,} of {self.total:,} "
                f"parameters ({share:.2%}); sharded tables "
                f"{'trained' if self.tables_train else 'frozen'}")


def apply_finetune(dense: nn.Module, cfg: FinetuneConfig, heads: tuple[str, ...],
                   table_params: int) -> Tuning:
    """Set what ``dense`` trains under ``cfg.mode`` (adding LoRA adapters in ``lora``);
    ``heads``: prefixes of the recipe's new modules (always trained); ``table_params``:
    elements of the sharded tables (counted, trained in ``full`` only unless partial names
    them)."""
    mode = FinetuneMode(cfg.mode)
    if mode == FinetuneMode.lora:
        add_adapters(dense, cfg.lora)
    patterns = list(cfg.partial.trainable) if mode == FinetuneMode.partial else []
    for name, param in dense.named_parameters():
        head = name.startswith(heads) and not name.endswith(".original")  # adapted: frozen
        param.requires_grad_(mode == FinetuneMode.full or head or _is_adapter(name)
                             or any(fnmatch.fnmatchcase(name, p) for p in patterns))
    tables_train = mode == FinetuneMode.full or TABLES in patterns
    if mode == FinetuneMode.partial:
        _check_patterns_match(dense, patterns)
    trainable = sum(p.numel() for p in dense.parameters() if p.requires_grad)
    total = sum(p.numel() for name, p in dense.named_parameters() if not _is_adapter(name))
    return Tuning(mode, trainable + table_params * tables_train, total + table_params,
                  tables_train)


def add_adapters(dense: nn.Module, cfg: LoraConfig) -> list[str]:
    """A LoRA update on every matrix matching ``cfg.targets`` (not embedding tables)."""
    if cfg.rank < 1:
        raise ValueError(f"recipe.lora.rank={cfg.rank}: must be >= 1")
    chosen = [name for name, param in dense.named_parameters()
              if param.dim() == 2 and any(fnmatch.fnmatchcase(name, p) for p in cfg.targets)
              and not isinstance(_owner(dense, name), nn.Embedding | nn.EmbeddingBag)]
    if not chosen:
        raise ValueError(f"recipe.lora.targets={list(cfg.targets)} match no matrix of the "
                         f"model; matrices: {_matrices(dense)[:12]}")
    for name in chosen:
        owner, attr = _owner(dense, name), name.rpartition(".")[2]
        shape = getattr(owner, attr).shape
        parametrize.register_parametrization(owner, attr, LowRankUpdate(shape, cfg.rank,
                                                                         cfg.alpha))
    return chosen


def merge_adapters(dense: nn.Module) -> int:
    """Fold every LoRA update into its weight (plain parameters again); returns how many."""
    merged = 0
    for module in list(dense.modules()):
        if parametrize.is_parametrized(module):
            for attr in list(module.parametrizations):
                parametrize.remove_parametrizations(module, attr, leave_parametrized=True)
                merged += 1
    return merged


def _is_adapter(name: str) -> bool:
    return ".parametrizations." in name and not name.endswith(".original")


def _owner(module: nn.Module, name: str) -> nn.Module:
    return module.get_submodule(name.rpartition(".")[0]) if "." in name else module


def _matrices(dense: nn.Module) -> list[str]:
    return [n for n, p in dense.named_parameters() if p.dim() == 2]


def _check_patterns_match(dense: nn.Module, patterns: list[str]) -> None:
    names = [n for n, _ in dense.named_parameters()]
    unmatched = [p for p in patterns if p != TABLES
                 and not any(fnmatch.fnmatchcase(n, p) for n in names)]
    if unmatched:
        raise ValueError(f"recipe.partial.trainable: {unmatched} match no parameter; "
                         f"parameters: {names[:12]}{' …' if len(names) > 12 else ''} "
                         f"(or '{TABLES}' for the sharded tables)")
