"""Which implementation of an op runs: ``kernel=pytorch|triton|auto``."""

from __future__ import annotations

import importlib.util
import os

import torch

from foundation.choices import Choice, choice


class Kernel(Choice):
    """``pytorch``: the reference (any device). ``triton``: the Triton kernels (CUDA, or CPU
    under ``TRITON_INTERPRET=1``). ``auto``: Triton on CUDA when installed, else PyTorch."""

    pytorch = "pytorch"
    triton = "triton"
    auto = "auto"


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """Whether Triton runs its kernels in the CPU interpreter (read when a kernel is defined)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_kernel(kernel: Kernel | str, device: torch.device) -> Kernel:
    """``kernel`` made concrete for tensors on ``device``, or a ValueError naming the fix."""
    kernel = choice(Kernel, kernel, "kernel")
    if kernel == Kernel.auto:
        use_triton = device.type == "cuda" and triton_available()
        return Kernel.triton if use_triton else Kernel.pytorch
    if kernel == Kernel.triton:
        if not triton_available():
            raise ValueError("kernel=triton needs the triton package (`pip install triton`, "
                             "shipped with CUDA builds of torch); or use kernel=pytorch")
        if device.type != "cuda" and not interpreting():
            raise ValueError(f"kernel=triton runs on CUDA; for tensors on {device.type} use "
                             "kernel=pytorch, or set TRITON_INTERPRET=1 (slow, for tests)")
    return kernel
