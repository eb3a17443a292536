"""The FSDP2 dense engine (``engine=fsdp``): the dense arch fully sharded with PyTorch's
``fully_shard`` (what Accelerate's FSDP2 path applies; Accelerate itself has no FSDP on CPU,
so the engine calls it directly and runs the same on gloo and nccl).

It speaks the DeepSpeed engine's protocol (forward, backward, step, state), and its
checkpoints carry the same layout-free dense weights and AdamW moments, so a run moves
between ``engine=deepspeed`` and ``engine=fsdp`` and continues.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from foundation.distributed.engine import (
    ADAM_MOMENTS,
    EngineConfig,
    OptimConfig,
    _decay_groups,
    set_schedule,
    uses_bf16,
    warmup_cosine,
)

FULL = StateDictOptions(full_state_dict=True)


class FsdpDenseEngine:
    def __init__(self, module: nn.Module, cfg: EngineConfig, optim: OptimConfig, *,
                 micro_batch: int, grad_accum: int, total_steps: int, device: torch.device):
        del micro_batch  # FSDP needs no batch size; kept for the engines' common signature
        from torch.distributed.device_mesh import init_device_mesh

        self.cfg, self.optim_cfg, self.grad_accum = cfg, optim, grad_accum
        self.bf16 = uses_bf16(cfg, device)
        self.module = module.to(device)
        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if self.bf16 else None,
                                      reduce_dtype=torch.float32)
        # Each child with parameters is its own unit (gathered just before it runs), then
        # the root takes what is left.
        for child in module.children():
            if any(p.numel() for p in child.parameters()):
                fully_shard(child, mesh=mesh, mp_policy=policy)
        fully_shard(module, mesh=mesh, mp_policy=policy)
        decay, no_decay = _decay_groups(module)
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": optim.weight_decay},
             {"params": no_decay, "weight_decay": 0.0}], lr=optim.lr,
            betas=(optim.beta1, optim.beta2))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda s: warmup_cosine(s, optim.warmup_steps, total_steps, optim.min_lr_ratio))
        self.micro_steps, self.last_grad_norm = 0, None

    @property
    def zero_stage(self) -> int:
        return 3  # weights, gradients and optimizer state all sharded

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.grad_accum).backward()  # as DeepSpeed: the mean over micro-batches

    def step(self) -> None:
        """At the end of each accumulation window: clip, AdamW, schedule."""
        self.micro_steps += 1
        if self.micro_steps % self.grad_accum:
            return
        params = [p for p in self.module.parameters() if p.grad is not None]
        clip = self.optim_cfg.grad_clip  # 0: no clipping (as DeepSpeed), the norm still logged
        norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"))
        self.last_grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def grad_norm(self) -> float | None:
        return self.last_grad_norm

    def train(self, mode: bool = True) -> None:
        """Evaluation calls the dense arch's methods, not only its forward: in eval mode every
        rank holds the whole weights (gathered once), in train mode only its shard."""
        self.module.train(mode)
        for unit in self._units():
            unit.set_reshard_after_forward(mode, recurse=False)
            unit.reshard() if mode else unit.unshard()

    def optimizer_state_numel(self) -> int:
        return sum(t.to_local().numel() if hasattr(t, "to_local") else t.numel()
                   for state in self.optimizer.state.values() for t in state.values()
                   if torch.is_tensor(t) and t.dim() > 0)

    # -- state ---------------------------------------------------------------------
    def save(self, directory: str, trained_only: bool = False) -> None:
        """Nothing of its own (no ``engine/``): the checkpoint's consolidated dense weights and
        moments (``consolidated_state_dict``, ``full_optimizer_state``) are this engine's
        state, and restoring loads them (``load_full_state``)."""
        del directory, trained_only

    def consolidated_state_dict(self) -> dict[str, torch.Tensor]:
        """Full fp32 weights of the dense arch on every rank (a collective: all ranks call)."""
        state = get_model_state_dict(self.module, options=FULL)
        return {k: v.detach().float().cpu().clone() for k, v in state.items()}

    def full_optimizer_state(self) -> dict[str, torch.Tensor]:
        """AdamW's moments per parameter name, full fp32, and the step count: the layout the
        DeepSpeed engine writes too (a collective)."""
        trained = self._trained_names()
        state = get_optimizer_state_dict(self.module, self.optimizer, options=FULL)["state"]
        step = max((int(s["step"]) for s in state.values() if "step" in s), default=0)
        out = {"step": torch.tensor(step, dtype=torch.int64)}
        for name in trained:
            for key in ADAM_MOMENTS:
                moment = state.get(name, {}).get(key)
                out[f"{name}.{key}"] = (
                    torch.zeros(self.module.get_parameter(name).shape) if moment is None
                    else moment.detach().float().cpu().clone())
        return out

    def load_full_state(self, weights: dict[str, torch.Tensor],
                        optimizer: dict[str, torch.Tensor]) -> None:
        """Load consolidated weights and moments saved by either engine on any layout."""
        trained = self._trained_names()
        missing = [n for n in trained if n not in weights]
        known = {n for n, _ in [*self.module.named_parameters(), *self.module.named_buffers()]}
        unexpected = sorted(set(weights) - known)
        if missing or unexpected:
            raise KeyError(f"dense state does not fit: missing {missing}, unexpected {unexpected}")
        set_model_state_dict(self.module, weights,
                             options=StateDictOptions(full_state_dict=True, strict=False))
        step = int(optimizer["step"])
        groups = get_optimizer_state_dict(self.module, self.optimizer, options=FULL)["param_groups"]
        state = {name: {"step": torch.tensor(float(step)),
                        **{key: optimizer[f"{name}.{key}"] for key in ADAM_MOMENTS}}
                 for name in trained}
        set_optimizer_state_dict(self.module, self.optimizer,
                                 {"state": state, "param_groups": groups}, options=FULL)
        set_schedule(self.optimizer, self.scheduler, step)
        self.micro_steps = step * self.grad_accum

    # -- helpers -------------------------------------------------------------------
    def _units(self) -> list[FSDPModule]:
        return [m for m in self.module.modules() if isinstance(m, FSDPModule)]

    def _trained_names(self) -> list[str]:
        return [n for n, p in self.module.named_parameters() if p.requires_grad]
