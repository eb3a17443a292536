"""Ops with a PyTorch reference and a Triton implementation behind one dispatcher.

Each op takes ``kernel=pytorch|triton|auto`` (``Kernel``). ``auto`` picks Triton on a CUDA
device when Triton is installed, PyTorch otherwise. The Triton implementations are torch
custom ops (``torch.ops.foundation.*``) with fake implementations and registered autograd,
so ``torch.compile`` and ``torch.export`` trace through them; on CPU they run under
``TRITON_INTERPRET=1`` (slow: for tests).

- ``hstu_attention``: HSTU pointwise attention over jagged sequences (values + offsets),
  causal, with relative position and time biases (``kernels/hstu.py``).
- ``scores_logsumexp`` / ``catalogue_cross_entropy``: softmax cross-entropy over a catalogue
  (or sampled candidates with logQ) that never materialises the ``[tokens × items]`` logits
  (``kernels/softmax.py``).
"""

from foundation.kernels.dispatch import Kernel, resolve_kernel
from foundation.kernels.hstu import hstu_attention, hstu_attention_reference, time_bucket
from foundation.kernels.jagged import pad_jagged
from foundation.kernels.softmax import catalogue_cross_entropy, scores_logsumexp

__all__ = ["Kernel", "catalogue_cross_entropy", "hstu_attention", "hstu_attention_reference",
           "pad_jagged", "resolve_kernel", "scores_logsumexp", "time_bucket"]
