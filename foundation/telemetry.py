"""Where a training step's time goes: tokens/s, model FLOPs and MFU, the shares of the step
spent waiting for data and (on CPU) in collectives, and peak memory per rank.

Every step is timed; one step in ``trainer.telemetry.measure_every`` is also measured: its
FLOPs are counted op by op (``torch.utils.flop_counter``: the FLOPs the model really runs,
whatever the recipe). MFU is model FLOP/s per rank over the device's peak: the GPU's
dense spec for the training dtype, or on CPU a GEMM peak measured at start by all ranks at
once (so ranks sharing cores each get their share). On CPU the collectives' share is the
step time the thread running it spent neither computing (its CPU time) nor waiting for data:
blocked in collectives (or waiting for a core, where ranks share cores with other work).
"""

from __future__ import annotations

import logging
import resource
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

# Dense peak TFLOP/s by GPU name and training dtype (bf16; fp32 runs as TF32), from the specs.
GPU_PEAK_TFLOPS = {"H200": {"bf16": 989.0, "fp32": 494.0}, "H100": {"bf16": 989.0, "fp32": 494.0},
                   "A100": {"bf16": 312.0, "fp32": 156.0}, "L40S": {"bf16": 362.0, "fp32": 183.0},
                   "A10": {"bf16": 125.0, "fp32": 62.5}}


@dataclass
class TelemetryConfig:
    measure_every: int = 50  # one step in N also counts its FLOPs (0: none)


def measured_gemm_flops(device: torch.device, dtype: torch.dtype, seconds: float = 0.3) -> float:
    """FLOP/s of a square matmul on ``device``, the best of repeated timings."""
    size = 1024
    # A private generator: drawing from the global one would shift dropout and sampling
    # after a resume, and a resumed run must continue exactly as an uninterrupted one.
    generator = torch.Generator().manual_seed(0)
    a, b = (torch.randn(size, size, generator=generator).to(device, dtype) for _ in range(2))
    best, deadline = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        begin = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - begin)
    return 2 * size**3 / best


def peak_flops(device: torch.device, bf16: bool) -> tuple[float, str]:
    """The device's peak FLOP/s for the training dtype, and where the figure comes from."""
    dtype = "bf16" if bf16 else "fp32"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for model, peaks in GPU_PEAK_TFLOPS.items():
            if model in name:
                return peaks[dtype] * 1e12, f"{name} spec, {dtype}"
    flops = measured_gemm_flops(device, torch.bfloat16 if bf16 else torch.float32)
    return flops, f"measured {dtype} GEMM on {device.type}"


def peak_memory_mib(device: torch.device) -> float:
    """Peak memory of this rank: allocated on the GPU, resident on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return peak_resident_mib()


def peak_resident_mib() -> float:
    """This process's peak resident memory since it started its program (Linux: VmHWM, which
    exec resets; ru_maxrss would carry the RSS of the process it was forked from)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _count_accumulating_products() -> None:
    """``torch.utils.flop_counter`` knows ``addmm`` but not its in-place form nor ``addmv_``,
    which the tiled softmax's backward accumulates with: count them too (once a process)."""
    from torch.utils import flop_counter

    if torch.ops.aten.addmm_ in flop_counter.flop_registry:
        return

    @flop_counter.register_flop_formula(torch.ops.aten.addmm_)
    def _(self_shape, left_shape, right_shape, *args, out_shape=None, **kwargs) -> int:
        return 2 * left_shape[0] * left_shape[1] * right_shape[1]

    @flop_counter.register_flop_formula(torch.ops.aten.addmv_)
    def _(self_shape, matrix_shape, vector_shape, *args, out_shape=None, **kwargs) -> int:
        return 2 * matrix_shape[0] * matrix_shape[1]


class StepMeasurement:
    """Counts one step's FLOPs (a context manager)."""

    def __init__(self):
        from torch.utils.flop_counter import FlopCounterMode

        _count_accumulating_products()
        self.counter = FlopCounterMode(display=False)
        self.flops = 0

    def __enter__(self) -> StepMeasurement:
        self.counter.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.counter.__exit__(*exc)
        self.flops = self.counter.get_total_flops()


class Telemetry:
    """Accumulates step timings between log rows; ``row`` and ``summary`` are collectives
    (every rank calls them at the same steps)."""

    def __init__(self, cfg: TelemetryConfig, device: torch.device, world_size: int, bf16: bool):
        self.cfg, self.device, self.world_size = cfg, device, world_size
        if world_size > 1:
            dist.barrier()  # ranks that share cores measure the peak together
        self.peak, self.peak_source = peak_flops(device, bf16)
        self.flops_per_token: float | None = None
        self.window, self.total = self._empty(), self._empty()

    @staticmethod
    def _empty() -> dict[str, float]:
        return {"steps": 0, "tokens": 0, "seconds": 0.0, "data_wait": 0.0, "busy": 0.0}

    def measures(self, step: int) -> bool:
        every = self.cfg.measure_every
        return bool(every) and step % every == 1 % every  # the first step of each period

    def measure(self) -> StepMeasurement:
        return StepMeasurement()

    def record(self, tokens: int, seconds: float, data_wait: float,
               measured: StepMeasurement | None = None, local_tokens: int = 0,
               busy: float = 0.0) -> None:
        """One step: ``tokens`` over all ranks; ``data_wait``: this rank's seconds waiting for
        batches; ``measured``: this rank's measurement of the step, if it was measured;
        ``busy``: the CPU seconds of the thread that ran the step."""
        for totals in (self.window, self.total):
            totals["steps"] += 1
            totals["tokens"] += tokens
            totals["seconds"] += seconds
            totals["data_wait"] += data_wait
            totals["busy"] += busy
        if measured is not None and local_tokens:
            self.flops_per_token = measured.flops / local_tokens

    def _rates(self, totals: dict[str, float]) -> dict[str, float]:
        seconds = max(totals["seconds"], 1e-9)
        rates = {"tokens_per_s": totals["tokens"] / seconds,
                 "data_wait_share": totals["data_wait"] / seconds}
        if self.device.type == "cpu":  # on a GPU the host also waits for the device
            rates["collective_wait_share"] = max(
                0.0, 1.0 - (totals["busy"] + totals["data_wait"]) / seconds)
        if self.flops_per_token is not None:
            per_rank = self.flops_per_token * rates["tokens_per_s"] / self.world_size
            rates.update(flops_per_token=self.flops_per_token, tflops_per_rank=per_rank / 1e12,
                         mfu=per_rank / self.peak)
        return rates

    def _per_rank(self, *values: float) -> list[list[float]]:
        """Each rank's ``values``, gathered on every rank (a collective)."""
        local = torch.tensor(values, dtype=torch.float64)
        if self.world_size == 1:
            return [local.tolist()]
        gathered = [torch.zeros_like(local) for _ in range(self.world_size)]
        dist.all_gather(gathered, local)
        return [g.tolist() for g in gathered]

    def _across_ranks(self, rates: dict[str, float]) -> tuple[dict[str, float], list[float]]:
        """``rates`` with the shares over all ranks (data: the slowest rank's wait;
        collectives: the mean), and each rank's peak memory (collectives)."""
        collective = rates.get("collective_wait_share", float("nan"))
        ranks = self._per_rank(peak_memory_mib(self.device), rates["data_wait_share"], collective)
        rates = {**rates, "data_wait_share": max(r[1] for r in ranks)}
        if "collective_wait_share" in rates:
            rates["collective_wait_share"] = sum(r[2] for r in ranks) / len(ranks)
        return rates, [round(r[0], 1) for r in ranks]

    def row(self) -> dict[str, Any]:
        """The telemetry since the last row, and each rank's peak memory and shares."""
        rates, memory = self._across_ranks(self._rates(self.window))
        self.window = self._empty()
        return {**rates, "memory_mib": memory, "train_seconds": round(self.total["seconds"], 3)}

    def summary(self) -> dict[str, Any]:
        """The whole run's telemetry (for summary.json and the closing line)."""
        rates, memory = self._across_ranks(self._rates(self.total))
        return {**rates, "peak_memory_mib": memory, "peak_tflops_per_rank": self.peak / 1e12,
                "peak_source": self.peak_source}


def describe(telemetry: dict[str, Any]) -> str:
    """One line: tokens/s, MFU, data waiting, peak memory."""
    parts = [f"{telemetry['tokens_per_s']:,.0f} tokens/s"]
    if "mfu" in telemetry:
        parts.append(f"MFU {100 * telemetry['mfu']:.1f}%")
    parts.append(f"data wait {100 * telemetry['data_wait_share']:.1f}%")
    if "collective_wait_share" in telemetry:
        parts.append(f"collectives {100 * telemetry['collective_wait_share']:.1f}%")
    memory = telemetry.get("peak_memory_mib") or telemetry.get("memory_mib")
    if memory:
        parts.append(f"peak memory {max(memory) / 1024:.2f} GiB/rank")
    return ", ".join(parts)
