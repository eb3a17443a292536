"""Jagged batches: one row per member, values concatenated in time order, no padding."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:  # imported where batches become features: the CLI and configs stay light
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor


@dataclass
class SequenceBatch:
    sample_ids: Tensor  # [B] int64 (meta.json sample_id)
    lengths: Tensor  # [B] int64 events per row after truncation
    item: Tensor  # [sum(lengths)] int64 jagged values, time order within each row
    timestamp: Tensor  # [sum(lengths)] unix seconds
    # [sum(lengths)] ids of each event feature of the dataset's schema (data/schema.py), by name
    events: dict[str, Tensor]
    candidates: Tensor | None = None  # ranking mode: [sum(candidate_lengths)] impression items
    candidate_lengths: Tensor | None = None  # [B]
    labels: Tensor | None = None  # [sum(candidate_lengths)] float32 0/1
    # search mode: each row's searches after its history, in time order
    queries: list[str] | None = None  # [sum(query_lengths)] query texts
    query_items: Tensor | None = None  # [sum(query_lengths)] the title engaged after each query
    query_lengths: Tensor | None = None  # [B]
    # notification mode: candidates/labels are each row's candidate messages and their
    # outcomes; ``sent`` is the randomised arm (False: held out)
    sent: Tensor | None = None  # [sum(candidate_lengths)] bool
    true_uplift: Tensor | None = None  # [sum(candidate_lengths)] a simulator's, where known
    # data.on_error=skip: corrupt samples/shards the producing process (loader worker or main)
    # skipped since its previous batch, one per exception its ErrorPolicy saw. Summed over
    # batches it is the epoch's skip count. A plain int: moving the batch leaves it alone.
    skipped: int = 0

    def __len__(self) -> int:
        return int(self.lengths.numel())

    def offsets(self) -> Tensor:
        """[B+1] row starts into the jagged values (a zero, then the cumulative lengths)."""
        return torch.cat([self.lengths.new_zeros(1), torch.cumsum(self.lengths, 0)])

    def jagged(self, key: str) -> Tensor:
        """The jagged values of ``item``, ``timestamp`` or an event feature."""
        return self.events[key] if key in self.events else getattr(self, key)

    def kjt(self, keys: Sequence[str] | None = None) -> KeyedJaggedTensor:
        """Items and event features as one KeyedJaggedTensor; every key shares ``lengths``."""
        from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

        keys = list(keys) if keys is not None else ["item", *self.events]
        values = torch.cat([self.jagged(k) for k in keys])
        lengths = self.lengths.repeat(len(keys))
        return KeyedJaggedTensor.from_lengths_sync(keys=keys, values=values, lengths=lengths)

    def _map(self, fn) -> SequenceBatch:
        """``fn`` applied to every tensor (absent ones and counters stay as they are)."""
        changes = {f.name: fn(getattr(self, f.name)) for f in fields(self)
                   if isinstance(getattr(self, f.name), Tensor)}
        return replace(self, **changes, events={k: fn(v) for k, v in self.events.items()})

    def to(self, device: torch.device | str, non_blocking: bool = False) -> SequenceBatch:
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> SequenceBatch:
        """Called by DataLoader(pin_memory=True) for custom batch types."""
        return self._map(lambda t: t.pin_memory())

    def __reduce__(self):
        """From a loader worker to the trainer a batch travels as one buffer: torch shares
        each tensor through its own shared-memory handle, which takes about half a
        millisecond to open, time the training step would spend waiting."""
        tensors = {f.name: getattr(self, f.name) for f in fields(self)
                   if isinstance(getattr(self, f.name), Tensor)}
        tensors.update({f"events.{key}": value for key, value in self.events.items()})
        rest = {f.name: getattr(self, f.name) for f in fields(self)
                if f.name != "events" and f.name not in tensors}
        return _unpack_batch, (*_pack(tensors), rest)


def _pack(tensors: dict[str, Tensor]) -> tuple[Tensor, list]:
    """Tensors → one byte buffer (each part 8-byte aligned, so it views back in place) and
    the layout to find them in it."""
    layout, size = [], 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        layout.append((name, tensor.dtype, tuple(tensor.shape), size, nbytes))
        size += -(-nbytes // 8) * 8
    buffer = torch.empty(size, dtype=torch.uint8)
    for (_, _, _, start, nbytes), tensor in zip(layout, tensors.values()):
        buffer[start:start + nbytes] = tensor.detach().cpu().contiguous().view(-1).view(torch.uint8)
    return buffer, layout


def _unpack_batch(buffer: Tensor, layout: list, rest: dict) -> SequenceBatch:
    tensors = {name: buffer[start:start + nbytes].view(dtype).view(shape)
               for name, dtype, shape, start, nbytes in layout}
    events = {name.removeprefix("events."): tensors.pop(name) for name in list(tensors)
              if name.startswith("events.")}
    return SequenceBatch(**tensors, **rest, events=events)


@dataclass
class ItemBatch:
    """Items and their raw content (data/items.py): one row per item."""

    item: Tensor  # [B] int64 item ids
    content: dict[str, list]  # modality → B raw values, None where an item lacks it
    skipped: int = 0  # as SequenceBatch.skipped

    def __len__(self) -> int:
        return int(self.item.numel())

    @property
    def sample_ids(self) -> Tensor:
        return self.item

    @property
    def lengths(self) -> Tensor:
        """One item per row (what the trainer counts as the batch's events)."""
        return torch.ones_like(self.item)

    def has(self, modality: str) -> Tensor:
        """``[B]`` bool: which rows have ``modality``."""
        return torch.tensor([v is not None for v in self.content.get(modality, [None] * len(self))])

    def to(self, device: torch.device | str, non_blocking: bool = False) -> ItemBatch:
        return replace(self, item=self.item.to(device, non_blocking=non_blocking))
