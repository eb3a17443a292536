"""The dense engine: DeepSpeed ZeRO (stage 0-3) around the dense arch.

The trainer talks to a small protocol (forward, backward, step, state), so another engine
(Accelerate) can be added behind ``engine=`` without touching the loop.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass
class EngineConfig:
    name: str = "deepspeed"
    zero_stage: int = 2
    bf16: str = "auto"  # auto: bf16 on CUDA devices that support it, fp32 on CPU
    offload_optimizer: bool = False


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


class DeepSpeedDenseEngine:
    def __init__(self, module: nn.Module, cfg: EngineConfig, optim: OptimConfig, *,
                 micro_batch: int, grad_accum: int, total_steps: int, device: torch.device):
        if cfg.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"engine.zero_stage={cfg.zero_stage}: must be 0, 1, 2 or 3")
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if device.type == "cuda" else "cpu")
        import deepspeed  # after DS_ACCELERATOR is set

        self.cfg = cfg
        bf16 = cfg.bf16 == "on" or (cfg.bf16 == "auto" and device.type == "cuda"
                                     and torch.cuda.is_bf16_supported())
        ds_config: dict[str, Any] = {
            "train_micro_batch_size_per_gpu": micro_batch,
            "gradient_accumulation_steps": grad_accum,
            "gradient_clipping": optim.grad_clip,
            "zero_optimization": {"stage": cfg.zero_stage},
            "zero_allow_untested_optimizer": True,
            "bf16": {"enabled": bf16},
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }
        if cfg.offload_optimizer:
            ds_config["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
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

    def save(self, directory: str) -> None:
        self.engine.save_checkpoint(directory, tag="engine", save_latest=False)

    def load(self, directory: str) -> None:
        """Restore weights, ZeRO optimizer partitions and LR schedule from ``save``."""
        self.engine.checkpoint_engine = WeightsOnlyCheckpointEngine()
        path, _ = self.engine.load_checkpoint(directory, tag="engine", load_module_strict=True)
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed engine state in {directory}")

    def consolidated_state_dict(self) -> dict[str, torch.Tensor]:
        """Full fp32 weights of the dense arch on every rank (gathered under ZeRO-3)."""
        import deepspeed

        params = list(self.module.parameters())
        with deepspeed.zero.GatheredParameters(params, enabled=self.zero_stage == 3):
            return {k: v.detach().float().cpu().clone() for k, v in self.module.state_dict().items()}


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
            with torch.serialization.safe_globals(allowed):
                return torch.load(path, map_location=map_location, weights_only=True)

    return _Engine()


def _decay_groups(module: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Weight decay on matrices only: not on biases, norms or embedding tables."""
    decay, no_decay = [], []
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        is_matrix = param.dim() >= 2 and not isinstance(_owner(module, name), nn.Embedding)
        (decay if is_matrix else no_decay).append(param)
    return decay, no_decay


def _owner(module: nn.Module, param_name: str) -> nn.Module:
    return module.get_submodule(param_name.rpartition(".")[0]) if "." in param_name else module
