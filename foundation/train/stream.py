"""The training data stream: epoch after epoch of the streaming loader, with epoch-seeded order."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from foundation.data.batch import SequenceBatch
from foundation.data.item_loader import build_item_loader
from foundation.data.loader import DataConfig, build_loader

NONE = np.zeros(0, dtype=np.int64)  # no sample ids


class EpochStream:
    """Endless batches for one rank: epoch e reshuffles shards and samples with (seed, e).

    The order is a function of (seed, epoch, rank, workers), so the position ``(epoch,
    batches consumed in it)`` is all a checkpoint needs to continue on the same layout: a
    resumed stream replays the epoch's order and skips what was consumed. It also keeps the
    ids of the samples consumed in the epoch (``epoch_ids``): a checkpoint resumed on another
    layout of ranks or workers continues the epoch without them (``continue_elsewhere``), so
    no sample is seen twice and none is lost.
    """

    def __init__(self, cfg: DataConfig, *, mode: str, seed: int, rank: int, world_size: int,
                 options: dict[str, Any] | None = None):
        # options: what the task's loader needs besides DataConfig (Task.loader_options)
        self.cfg, self.mode, self.seed, self.options = cfg, mode, seed, options or {}
        self.rank, self.world_size = rank, world_size
        self.epoch, self.consumed = 0, 0
        self.skip = NONE  # the epoch's samples consumed under an earlier layout (every rank's)
        self.taken: list[np.ndarray] = []  # this rank's samples consumed in the epoch

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "consumed": self.consumed, "world_size": self.world_size,
                "num_workers": self.cfg.num_workers}

    def epoch_ids(self) -> dict[str, np.ndarray]:
        """The sample ids a checkpoint keeps: ``skip`` (the layout this epoch started on
        left out) and ``taken`` (this rank consumed)."""
        return {"skip": self.skip, "taken": np.concatenate([NONE, *self.taken])}

    def load_state(self, state: dict[str, int], ids: dict[str, np.ndarray] | None = None
                   ) -> None:
        """Continue on the layout that saved ``state`` (and ``epoch_ids``)."""
        self.epoch, self.consumed = state["epoch"], state["consumed"]
        self.skip = NONE if ids is None else ids["skip"]

    def continue_elsewhere(self, epoch: int, consumed: np.ndarray) -> None:
        """Continue ``epoch`` on this layout without the samples every earlier rank consumed."""
        self.epoch, self.consumed, self.skip, self.taken = epoch, 0, np.unique(consumed), []

    def __iter__(self) -> Iterator[SequenceBatch]:
        batches = self._epoch(self.epoch, self.skip)
        while True:
            empty, replayed, self.taken, upcoming = True, self.consumed, [], None
            for index, batch in enumerate(batches):
                if upcoming is None and self.cfg.num_workers:
                    # the next epoch's workers start now, so its first batches are waiting
                    # when this epoch ends instead of the shuffle buffer being filled then
                    upcoming = self._epoch(self.epoch + 1, NONE)
                empty = False
                self.taken.append(batch.sample_ids.numpy())
                if index < replayed:  # consumed before the checkpoint this run resumed from
                    continue
                self.consumed = index + 1
                yield batch
            if empty and not len(self.skip):
                raise RuntimeError(f"rank {self.rank} got no training batches from "
                                   f"{self.cfg.path}/{self.cfg.train_split}: write more shards "
                                   f"than ranks × workers, or lower data.batch_size")
            self.epoch, self.consumed, self.skip, self.taken = self.epoch + 1, 0, NONE, []
            batches = upcoming if upcoming is not None else self._epoch(self.epoch, NONE)

    def _epoch(self, epoch: int, skip: np.ndarray) -> Iterator[SequenceBatch]:
        """Epoch ``epoch``'s training batches; with workers, they start loading at once."""
        return iter(self.loader(self.cfg.train_split, epoch=epoch, shuffle=True, skip_ids=skip,
                                tokens_per_batch=self.cfg.tokens_per_batch))

    def loader(self, split: str, *, epoch: int = 0, shuffle: bool = False,
               batch_size: int | None = None, skip_ids: np.ndarray | None = None,
               tokens_per_batch: int = 0):
        if self.mode == "items":
            return build_item_loader(
                self.cfg.path, split, batch_size=batch_size or self.cfg.batch_size,
                seed=self.seed, epoch=epoch, rank=self.rank, world_size=self.world_size,
                num_workers=self.cfg.num_workers, shuffle=shuffle,
                shuffle_buffer=self.cfg.shuffle_buffer, on_error=self.cfg.on_error,
                skip_ids=skip_ids, **self.options)
        return build_loader(
            self.cfg.path, split, batch_size=batch_size or self.cfg.batch_size,
            max_len=self.cfg.max_len, seed=self.seed, epoch=epoch, rank=self.rank,
            world_size=self.world_size, num_workers=self.cfg.num_workers, shuffle=shuffle,
            shuffle_buffer=self.cfg.shuffle_buffer, mode=self.mode, on_error=self.cfg.on_error,
            skip_ids=skip_ids, tokens_per_batch=tokens_per_batch)
