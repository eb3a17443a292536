"""The training data stream: epoch after epoch of the streaming loader, with epoch-seeded order."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from foundation.data.batch import SequenceBatch
from foundation.data.item_loader import build_item_loader
from foundation.data.loader import DataConfig, build_loader


class EpochStream:
    """Endless batches for one rank: epoch e reshuffles shards and samples with (seed, e).

    The order is a function of (seed, epoch, rank, workers), so the position ``(epoch,
    batches consumed in it)`` is all a checkpoint needs: a resumed stream replays the epoch's
    order and skips what was consumed, continuing exactly where it stopped.
    """

    def __init__(self, cfg: DataConfig, *, mode: str, seed: int, rank: int, world_size: int,
                 options: dict[str, Any] | None = None):
        # options: what the task's loader needs besides DataConfig (Task.loader_options)
        self.cfg, self.mode, self.seed, self.options = cfg, mode, seed, options or {}
        self.rank, self.world_size = rank, world_size
        self.epoch, self.consumed = 0, 0

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "consumed": self.consumed, "world_size": self.world_size,
                "num_workers": self.cfg.num_workers}

    def load_state(self, state: dict[str, int]) -> None:
        self.epoch, self.consumed = state["epoch"], state["consumed"]

    def __iter__(self) -> Iterator[SequenceBatch]:
        while True:
            empty, skip = True, self.consumed
            for index, batch in enumerate(self.loader(self.cfg.train_split, epoch=self.epoch,
                                                      shuffle=True)):
                empty = False
                if index < skip:  # consumed before the checkpoint this run resumed from
                    continue
                self.consumed = index + 1
                yield batch
            if empty:
                raise RuntimeError(f"rank {self.rank} got no training batches from "
                                   f"{self.cfg.path}/{self.cfg.train_split}: write more shards "
                                   f"than ranks × workers, or lower data.batch_size")
            self.epoch, self.consumed = self.epoch + 1, 0

    def loader(self, split: str, *, epoch: int = 0, shuffle: bool = False,
               batch_size: int | None = None):
        if self.mode == "items":
            return build_item_loader(
                self.cfg.path, split, batch_size=batch_size or self.cfg.batch_size,
                seed=self.seed, epoch=epoch, rank=self.rank, world_size=self.world_size,
                num_workers=self.cfg.num_workers, shuffle=shuffle,
                shuffle_buffer=self.cfg.shuffle_buffer, on_error=self.cfg.on_error,
                **self.options)
        return build_loader(
            self.cfg.path, split, batch_size=batch_size or self.cfg.batch_size,
            max_len=self.cfg.max_len, seed=self.seed, epoch=epoch, rank=self.rank,
            world_size=self.world_size, num_workers=self.cfg.num_workers, shuffle=shuffle,
            shuffle_buffer=self.cfg.shuffle_buffer, mode=self.mode, on_error=self.cfg.on_error)
