"""A run's checkpoints as one component: which checkpoint to resume and restoring it (on its
own layout or resharded), saving (in the background if asked) and committing, the best
validation, retention. The trainer hands it the model, the data stream and its counters;
the file format is ``foundation.train.checkpoint``'s."""

from __future__ import annotations

import json
import logging
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from foundation.config import Reshard, config_changes, config_hash
from foundation.distributed.env import DistEnv, seed_everything
from foundation.models.finetune import FinetuneMode
from foundation.train import checkpoint
from foundation.train.model import ShardedModel
from foundation.train.stream import EpochStream

log = logging.getLogger(__name__)


class Checkpointer:
    def __init__(self, cfg: DictConfig, env: DistEnv):
        self.cfg, self.env, self.run_dir = cfg, env, Path(cfg.run_dir)
        self.pending: tuple[Path, Future] | None = None  # a checkpoint written in the background
        self.last_saved: int | None = None  # the step of the newest checkpoint this run wrote
        self.writer_group: dist.ProcessGroup | None = None

    def start_background_writes(self) -> None:
        """Background writes get their own gloo group: their collectives run beside
        training's (a collective: every rank calls it)."""
        if self.cfg.trainer.async_checkpoint:
            self.writer_group = dist.new_group(backend="gloo")

    # -- resuming --------------------------------------------------------------------
    def resume_path(self) -> Path | None:
        """``trainer.resume``: auto (newest committed checkpoint of the run, if any) | never |
        a checkpoint path."""
        choice = self.cfg.trainer.resume
        if choice == "never":
            return None
        if choice == "auto":
            found = checkpoint.committed_checkpoints(self.run_dir)
            return found[-1] if found else None
        return checkpoint.resolve(choice)

    @staticmethod
    def warm_start(source: str | None, resume: Path | None) -> Path | None:
        """The checkpoint a fine-tune starts from: for a checkpoint holding only what trained,
        the base it was trained from (the source run's newest may have moved on)."""
        return checkpoint.base_of(resume) or (checkpoint.resolve(source) if source else None)

    def restore(self, path: Path, model: ShardedModel, stream: EpochStream) -> dict[str, Any]:
        """Load ``path`` into the model and the stream; returns the trainer's saved state,
        with ``resharded_from`` (the old world size) when it was saved on another layout."""
        saved = checkpoint.read_state(path)
        layout = (saved["world_size"], saved.get("num_workers"))
        engine = saved.get("config", {}).get("engine", {}).get("name", "deepspeed")
        same_engine = engine == str(self.cfg.engine.name)
        if not same_engine and self.env.is_main:
            log.info(f"{path} was trained with engine={engine}: this engine="
                     f"{self.cfg.engine.name} loads its consolidated dense weights and moments")
        if layout == (self.env.world_size, self.cfg.data.num_workers):
            rank_state = checkpoint.restore(path, sparse=model.sparse, engine=model.engine,
                                            rank=self.env.rank, same_engine=same_engine)
            stream.load_state(rank_state["stream"], checkpoint.rank_ids(path, self.env.rank))
        else:
            self._restore_resharded(path, layout, int(saved["step"]), model, stream)
            saved["resharded_from"] = layout[0]
        if self.env.is_main:
            log.info(f"resumed from {path} at step {saved['step']}")
            if saved.get("config_hash", config_hash(self.cfg)) != config_hash(self.cfg):
                changes = config_changes(saved.get("config", {}),
                                         OmegaConf.to_container(self.cfg, resolve=True))
                log.info(f"note: the config differs from the checkpoint's: {'; '.join(changes)}")
        return saved

    def _restore_resharded(self, path: Path, layout: tuple[int, int], step: int,
                           model: ShardedModel, stream: EpochStream) -> None:
        """A checkpoint of another layout: tables and dense state reshard exactly; the data
        stream continues the epoch without the samples every old rank consumed
        (``trainer.reshard=continue_epoch``) or restarts it (``restart_epoch``)."""
        here = (self.env.world_size, self.cfg.data.num_workers)
        epoch = json.loads((path / "rank0.json").read_text())["stream"]["epoch"]
        how = Reshard(self.cfg.trainer.reshard)
        consumed = checkpoint.consumed_ids(path, layout[0])
        if how == Reshard.refuse or (how == Reshard.continue_epoch and consumed is None):
            missing = "" if how == Reshard.refuse else (
                " and it predates the record of consumed samples that continuing needs")
            raise checkpoint.CheckpointMismatch(
                f"{path} was saved by {layout[0]} ranks × {layout[1]} loader workers; this run "
                f"has {here[0]} × {here[1]}{missing}. Rerun with the same --nproc and "
                f"data.num_workers, or add trainer.reshard=restart_epoch to continue on this "
                f"layout from the start of epoch {epoch} (its samples consumed so far are seen "
                f"again)")
        checkpoint.restore_resharded(path, sparse=model.sparse, engine=model.engine)
        if how == Reshard.continue_epoch:
            stream.continue_elsewhere(epoch, consumed)
        else:
            stream.load_state({"epoch": epoch, "consumed": 0})
        seed_everything(self.cfg.seed + step, self.env.rank)  # the saved RNGs were per old rank
        if self.env.is_main:
            what = (f"continues epoch {epoch} without its {len(consumed):,} consumed samples"
                    if how == Reshard.continue_epoch else f"restarts epoch {epoch}")
            log.info(f"resharded {path}: {layout[0]} ranks × {layout[1]} workers → {here[0]} × "
                     f"{here[1]}; the data stream {what}")

    # -- saving ----------------------------------------------------------------------
    def save(self, step: int, model: ShardedModel, stream: EpochStream,
             counters: dict[str, Any], *, recipe: str, warm_start: Path | None,
             background: bool = False, keep_step: int | None = None) -> Path:
        """Checkpoint ``step`` with the trainer's ``counters``; in the background (committed
        later by ``commit_pending``) when asked and ``trainer.async_checkpoint`` is on.
        ``keep_step``: the best step, which retention keeps."""
        self.commit_pending(wait=True, keep_step=keep_step)  # one checkpoint in flight
        path, self.last_saved = checkpoint.checkpoint_dir(self.run_dir, step), step
        state = {"step": step, "recipe": recipe, "config_hash": config_hash(self.cfg),
                 "config": OmegaConf.to_container(self.cfg, resolve=True),
                 "world_size": self.env.world_size, "num_workers": self.cfg.data.num_workers,
                 **counters}
        # A warm-started fine-tune that freezes part of the model saves only what it trains,
        # and points at the checkpoint holding the rest.
        tuning = model.tuning
        trained_only = (tuning is not None and tuning.mode != FinetuneMode.full
                        and warm_start is not None)
        if trained_only:
            state[checkpoint.BASE] = checkpoint.base_pointer(warm_start)
        future = checkpoint.save(
            path, sparse=None if trained_only and model.tables_frozen else model.sparse,
            engine=model.engine, state=state, rank_state={"stream": stream.state()},
            rank_ids=stream.epoch_ids(), rank=self.env.rank, barrier=self.env.barrier,
            background=self.writer_group if background else None, trained_only=trained_only)
        if future is None:
            self._committed(keep_step)
        else:
            self.pending = (path, future)
        return path

    def commit_pending(self, wait: bool, keep_step: int | None = None) -> None:
        """Commit the checkpoint written in the background once every rank has finished it
        (``wait``: block until then). Ranks agree first, so all commit at the same step."""
        if self.pending is None:
            return
        path, future = self.pending
        done = torch.tensor([int(wait or future.done())], dtype=torch.int32)
        if self.env.world_size > 1:
            dist.all_reduce(done, op=dist.ReduceOp.MIN)
        if not done.item():
            return
        future.result()  # re-raises a failed write: the checkpoint then stays invisible
        checkpoint.commit(path, rank=self.env.rank, barrier=self.env.barrier)
        self.pending = None
        self._committed(keep_step)

    def mark_best(self, step: int, metric: str, value: float) -> None:
        if self.env.is_main:
            checkpoint.mark_best(self.run_dir, step, metric, value)

    def _committed(self, keep_step: int | None) -> None:
        if self.env.is_main:
            checkpoint.prune(self.run_dir, keep_last=self.cfg.trainer.keep_last,
                             keep_step=keep_step)
