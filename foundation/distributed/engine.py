"""The dense engine: DeepSpeed ZeRO (stage 0-3) around the dense arch.

The trainer talks to a small protocol (forward, backward, step, state), so another engine
(Accelerate) can be added behind ``engine=`` without touching the loop.
"""

from __future__ import annotations

import math
import os
import pickle
import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from foundation.choices import Choice


class Bf16(Choice):
    """Mixed precision for the dense part: weights, optimizer and losses stay fp32, matrix
    products run in bf16 (DeepSpeed's ``torch_autocast``; FSDP's bf16 parameters)."""

    auto = "auto"  # on CUDA devices that support it; fp32 on CPU
    on = "on"  # also on CPU (no faster there for small trunks: docs/speed.md)
    off = "off"


class EngineName(Choice):
    deepspeed = "deepspeed"  # ZeRO stage engine.zero_stage
    fsdp = "fsdp"  # PyTorch FSDP2: weights, gradients and AdamW state sharded (distributed/fsdp.py)


@dataclass
class EngineConfig:
    name: EngineName = EngineName.deepspeed
    zero_stage: int = 2
    bf16: Bf16 = Bf16.auto
    offload_optimizer: bool = False


def sharding_stage(cfg: EngineConfig) -> int:
    """The ZeRO stage the dense state is split like (FSDP splits all of it, as stage 3)."""
    return 3 if cfg.name == EngineName.fsdp else cfg.zero_stage


@dataclass
class OptimConfig:
    lr: float = 2e-3
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.98
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """LR multiplier: linear warm-up to 1, then cosine decay to ``min_ratio``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


ADAM_MOMENTS = ("exp_avg", "exp_avg_sq")


def uses_bf16(cfg: EngineConfig, device: torch.device) -> bool:
    """Whether the dense part trains in bf16 (``engine.bf16``)."""
    return cfg.bf16 == Bf16.on or (cfg.bf16 == Bf16.auto and device.type == "cuda"
                                   and torch.cuda.is_bf16_supported())


def deepspeed_config(cfg: EngineConfig, optim: OptimConfig, *, micro_batch: int, grad_accum: int,
                     bf16: bool) -> dict[str, Any]:
    """DeepSpeed's config for the dense engine (also what launchers hand to ``accelerate``)."""
    ds_config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": optim.grad_clip,
        "zero_optimization": {"stage": cfg.zero_stage},
        "zero_allow_untested_optimizer": True,
        # fp32 weights under torch.autocast: TorchRec's fp32 embeddings enter the dense arch
        # as they are, and reductions (norms, log-sum-exps) stay fp32
        "torch_autocast": {"enabled": bf16, "dtype": "bfloat16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if cfg.offload_optimizer:
        ds_config["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
    return ds_config


class DeepSpeedDenseEngine:
    def __init__(self, module: nn.Module, cfg: EngineConfig, optim: OptimConfig, *,
                 micro_batch: int, grad_accum: int, total_steps: int, device: torch.device):
        if cfg.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"engine.zero_stage={cfg.zero_stage}: must be 0, 1, 2 or 3")
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if device.type == "cuda" else "cpu")
        import deepspeed  # after DS_ACCELERATOR is set

        self.cfg = cfg
        self.bf16 = uses_bf16(cfg, device)
        ds_config = deepspeed_config(cfg, optim, micro_batch=micro_batch, grad_accum=grad_accum,
                                     bf16=self.bf16)
        decay, no_decay = _decay_groups(module)
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": optim.weight_decay},
             {"params": no_decay, "weight_decay": 0.0}], lr=optim.lr, betas=(optim.beta1, optim.beta2))
        schedule = lambda opt: torch.optim.lr_scheduler.LambdaLR(  # noqa: E731
            opt, lambda s: warmup_cosine(s, optim.warmup_steps, total_steps, optim.min_lr_ratio))
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=module, optimizer=optimizer, lr_scheduler=schedule, config=ds_config,
            dist_init_required=False)

    @property
    def module(self) -> nn.Module:
        return self.engine.module

    @property
    def zero_stage(self) -> int:
        return self.engine.zero_optimization_stage()

    def __call__(self, *args, **kwargs):
        return self.engine(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self) -> None:
        self.engine.step()

    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def grad_norm(self) -> float | None:
        norm = self.engine.get_global_grad_norm()
        return None if norm is None else float(norm)

    def train(self, mode: bool = True) -> None:
        self.engine.train(mode)

    def optimizer_state_numel(self) -> int:
        """Elements of optimizer state this rank holds (halves per rank under ZeRO ≥ 1)."""
        inner = getattr(self.optimizer, "optimizer", self.optimizer)
        return sum(t.numel() for state in inner.state.values() for t in state.values()
                   if torch.is_tensor(t) and t.dim() > 0)

    def save(self, directory: str, trained_only: bool = False) -> None:
        """The engine's state; ``trained_only``: without frozen parameters (a fine-tune's)."""
        self.engine.save_checkpoint(directory, tag="engine", save_latest=False,
                                    exclude_frozen_parameters=trained_only)

    def load(self, directory: str, trained_only: bool = False) -> None:
        """Restore weights, ZeRO optimizer partitions and LR schedule from ``save`` (with
        ``trained_only``, over a module already holding the frozen weights)."""
        self.engine.checkpoint_engine = WeightsOnlyCheckpointEngine()
        path, _ = self.engine.load_checkpoint(directory, tag="engine",
                                              load_module_strict=not trained_only)
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed engine state in {directory}")

    def full_optimizer_state(self) -> dict[str, torch.Tensor]:
        """AdamW's moments per parameter name, unpartitioned fp32, and the step count: a
        layout-free copy of the optimizer that loads on any world size or ZeRO stage (a
        collective under ZeRO >= 1: every rank calls it)."""
        self._init_adam_state()  # before the first step AdamW has no state yet
        state = {"step": torch.tensor(self._adam_step(), dtype=torch.int64)}
        for name, param in self._trained_parameters():
            for key in ADAM_MOMENTS:
                state[f"{name}.{key}"] = self._full_moment(param, key).detach().float().cpu().clone()
        return state

    def load_full_state(self, weights: dict[str, torch.Tensor],
                        optimizer: dict[str, torch.Tensor]) -> None:
        """Load ``consolidated_state_dict`` + ``full_optimizer_state`` saved on any layout:
        every rank keeps its own partition. The LR schedule continues from the saved step."""
        import deepspeed

        step = int(optimizer["step"])
        self._init_adam_state()
        params = dict(self.module.named_parameters())
        with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=0,
                                               enabled=self.zero_stage == 3):
            missing, unexpected = self.module.load_state_dict(weights, strict=False)
            trained = {name for name, _ in self._trained_parameters()}
            if unexpected or trained & set(missing):  # frozen weights may come from a base
                raise KeyError(f"dense state does not fit: missing {sorted(trained & set(missing))}"
                               f", unexpected {sorted(unexpected)}")
        for name, param in self._trained_parameters():
            self._set_full(param, weights[name])  # ZeRO's fp32 master partition
            for key in ADAM_MOMENTS:
                self._set_full(param, optimizer[f"{name}.{key}"], key)
        for state in self._inner_optimizer().state.values():
            state["step"].fill_(step)
        self._set_schedule(step)
        self.engine.global_steps = step
        self.engine.micro_steps = step * self.engine.gradient_accumulation_steps()

    def _trained_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """The parameters the optimizer holds (a fine-tune freezes the others)."""
        return [(n, p) for n, p in self.module.named_parameters() if p.requires_grad]

    def _set_full(self, param: nn.Parameter, value: torch.Tensor, key: str | None = None) -> None:
        """Give this rank its part of a full fp32 master weight (``key`` None) or AdamW moment."""
        from deepspeed.utils import (
            safe_set_full_fp32_param,
            safe_set_full_optimizer_state,
            safe_set_local_fp32_param,
            safe_set_local_optimizer_state,
        )

        value = value.to(param.device)
        if self.zero_stage == 0:  # no master copy: AdamW updates the module's own weights
            if key is not None:
                self._inner_optimizer().state[param][key].copy_(value.view_as(param))
        elif hasattr(param, "ds_id"):
            # ZeRO-3: set this rank's slice ourselves; DeepSpeed's full setter slices without the
            # padding that tensors smaller than the world size get.
            size, rank = param.ds_tensor.numel(), dist.get_rank(param.ds_process_group)
            flat = torch.nn.functional.pad(value.flatten(), (0, size * (rank + 1)))
            local = flat.narrow(0, size * rank, size)
            if key is None:
                safe_set_local_fp32_param(param, local)
            else:
                safe_set_local_optimizer_state(param, local, key)
        elif key is None:
            safe_set_full_fp32_param(param, value)
        else:
            safe_set_full_optimizer_state(param, value, key)

    def _set_schedule(self, step: int) -> None:
        set_schedule(self.optimizer, self.scheduler, step)

    def _inner_optimizer(self) -> torch.optim.Optimizer:
        return getattr(self.optimizer, "optimizer", self.optimizer)

    def _init_adam_state(self) -> None:
        """AdamW creates its state lazily at the first step; create it now (zeros), as it would."""
        inner = self._inner_optimizer()
        # ZeRO-3 attaches its flat fp32 partitions to AdamW's groups only while stepping.
        flats = getattr(self.optimizer, "fp32_partitioned_groups_flat", None) or [
            p for group in inner.param_groups for p in group["params"]]
        for flat in flats:
            if not inner.state[flat]:
                inner.state[flat] = {"step": torch.tensor(0.0),
                                     **{k: torch.zeros_like(flat) for k in ADAM_MOMENTS}}
        if hasattr(self.optimizer, "_hp_optimizer_states_linked"):
            # ZeRO 1/2 links each parameter to its optimizer-state fragment once, after the
            # first group's first step: later groups (and our fresh state) stay unlinked.
            self.optimizer._hp_optimizer_states_linked = False
            self.optimizer._lazy_init_hp_params_optimizer_state()

    def _adam_step(self) -> int:
        steps = [int(s["step"]) for s in self._inner_optimizer().state.values() if "step" in s]
        return max(steps, default=0)

    def _full_moment(self, param: nn.Parameter, key: str) -> torch.Tensor:
        from deepspeed.utils import safe_get_full_optimizer_state

        if self.zero_stage == 0:
            return self._inner_optimizer().state[param][key]
        return safe_get_full_optimizer_state(param, key).view(getattr(param, "ds_shape", param.shape))

    def consolidated_state_dict(self) -> dict[str, torch.Tensor]:
        """Full fp32 weights of the dense arch on every rank (gathered under ZeRO-3)."""
        import deepspeed

        params = list(self.module.parameters())
        with deepspeed.zero.GatheredParameters(params, enabled=self.zero_stage == 3):
            return {k: v.detach().float().cpu().clone() for k, v in self.module.state_dict().items()}


def set_schedule(optimizer: torch.optim.Optimizer, scheduler, step: int) -> None:
    """Put a LambdaLR schedule (and every group's lr) at ``step``, as if it had stepped there."""
    lrs = [base * fn(step) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler.last_epoch, scheduler._last_lr = step, lrs


def WeightsOnlyCheckpointEngine():  # noqa: N802 - a class made lazily (deepspeed import)
    """DeepSpeed's checkpoint engine, but loading with ``weights_only=True``.

    DeepSpeed loads its own files with full unpickling; ours allow tensors, plain containers
    and the few DeepSpeed classes its files hold (loss scaler, ZeRO stage enum, fragment addresses), nothing else.
    """
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    allowed = [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]

    class _Engine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            try:
                with torch.serialization.safe_globals(allowed):
                    return torch.load(path, map_location=map_location, weights_only=True)
            except pickle.UnpicklingError as err:
                raise pickle.UnpicklingError(f"{path} holds more than tensor data "
                                             f"({_blocked_global(str(err))}); it was not "
                                             f"written by this framework or was altered") from None

    return _Engine()


def _blocked_global(message: str) -> str:
    found = re.search(r"(?:unsupported global: GLOBAL|unsupported GLOBAL) (\S+)", message, re.I)
    return f"blocked global {found.group(1)}" if found else "not plain tensor data"


def _decay_groups(module: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Weight decay on matrices only: not on biases, norms or embedding tables."""
    decay, no_decay = [], []
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        is_matrix = param.dim() >= 2 and not isinstance(_owner(module, name),
                                                          nn.Embedding | nn.EmbeddingBag)
        (decay if is_matrix else no_decay).append(param)
    return decay, no_decay


def _owner(module: nn.Module, param_name: str) -> nn.Module:
    return module.get_submodule(param_name.rpartition(".")[0]) if "." in param_name else module
