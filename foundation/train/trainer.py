"""The training loop every recipe shares. Read it top to bottom: set-up, step, validate, save."""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from foundation.compose import ConfigError
from foundation.data.batch import SequenceBatch
from foundation.distributed.collectives import global_mean_weight
from foundation.distributed.engine import uses_bf16
from foundation.distributed.env import DistEnv, init_distributed, seed_everything
from foundation.launch.config import LaunchError, check_run_batch
from foundation.metrics.report import write_evaluation
from foundation.recipes import build_task
from foundation.telemetry import Telemetry, describe
from foundation.tracking import RunLogger
from foundation.train import checkpoint
from foundation.train.checkpointer import Checkpointer
from foundation.train.ledger import SampleLedger
from foundation.train.model import ShardedModel
from foundation.train.plots import plot_run
from foundation.train.preemption import PreemptionFlag, requeue_on_preemption
from foundation.train.stream import EpochStream

log = logging.getLogger(__name__)


class RankStep(NamedTuple):
    """One optimizer step on this rank: mean loss, tokens (events) trained on, corrupt
    samples skipped, seconds spent waiting for batches."""

    loss: float
    tokens: int
    skipped: int
    data_wait: float


class Trainer:
    def __init__(self, cfg: DictConfig, env: DistEnv | None = None):
        self.cfg = cfg
        self.env = env or init_distributed(timeout_s=cfg.trainer.collective_timeout_s)
        self.preemption, self.skipped_steps = PreemptionFlag(), 0
        self.skipped_data = 0  # corrupt samples/shards skipped (data.on_error=skip), all ranks
        self.resharded_from: int | None = None  # the world size of a resharded checkpoint
        # Early stopping: the best validation so far ({"step", "value"}) and how many
        # validations since it; ``stopped_early`` marks a run that is finished.
        self.best: dict[str, float] | None = None
        self.stale, self.stopped_early = 0, False
        self.run_dir = Path(cfg.run_dir)
        self.checkpoints = Checkpointer(cfg, self.env)
        self.task = build_task(cfg)
        self.token_batches = bool(cfg.data.tokens_per_batch)
        if self.token_batches and not (self.task.token_batches
                                       and self.task.data_mode == "sequence"):
            raise ConfigError(f"data.tokens_per_batch={cfg.data.tokens_per_batch}: recipe "
                             f"{self.task.name} does not average its loss over next-item "
                             f"pairs, so its batches cannot be sized by cost; use "
                             f"data.batch_size")
        if cfg.trainer.final_eval_split and cfg.trainer.patience:
            raise ConfigError(f"trainer.final_eval_split={cfg.trainer.final_eval_split} "
                              f"evaluates the final model, but with trainer.patience the result "
                              f"is the best checkpoint: evaluate it with `foundation eval "
                              f"run_dir=RUN split={cfg.trainer.final_eval_split}`")
        self.check_global_batch()
        seed_everything(cfg.seed)  # the same initial weights on every rank
        resume_path = self.checkpoints.resume_path()
        self.warm_start = self.checkpoints.warm_start(self.task.init_from(), resume_path)
        self.model = ShardedModel(self.task, cfg, self.env, train=True,
                                  total_steps=cfg.trainer.max_steps, warm_start=self.warm_start)
        seed_everything(cfg.seed, self.env.rank)  # from here ranks differ: dropout, negatives
        self.stream = EpochStream(cfg.data, mode=self.task.data_mode, seed=cfg.seed,
                                  rank=self.env.rank, world_size=self.env.world_size,
                                  options=self.task.loader_options())
        self.ledger = SampleLedger(self.run_dir, self.env.rank) if cfg.trainer.sample_ledger else None
        self.start_step = self.resume(resume_path)
        self.checkpoints.start_background_writes()
        if self.env.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        self.telemetry = Telemetry(cfg.trainer.telemetry, self.env.device, self.env.world_size,
                                   bf16=uses_bf16(cfg.engine, self.env.device))
        self.logger = RunLogger(cfg.logger, self.run_dir, enabled=self.env.is_main,
                                total_steps=cfg.trainer.max_steps, name=self.task.name,
                                initial=self.start_step,
                                config=OmegaConf.to_container(cfg, resolve=True))

    def fit(self) -> dict[str, Any]:
        cfg, batches = self.cfg.trainer, iter(self.stream)
        if self.start_step >= cfg.max_steps or self.stopped_early:
            if self.env.is_main:
                log.info(f"{self.task.name}: nothing to do, {self.run_dir} is at step "
                         f"{self.start_step} ≥ trainer.max_steps={cfg.max_steps}")
            self.logger.close()
            return {"recipe": self.task.name, "steps": 0, "run_dir": str(self.run_dir)}
        if self.resharded_from is not None:  # show that the reloaded model is the saved one
            self.validate(self.start_step, resharded_from=self.resharded_from)
        start, losses = time.perf_counter(), []
        for step in range(self.start_step + 1, cfg.max_steps + 1):
            loss = self.train_step(batches, step)
            losses.append(loss)
            if step % self.cfg.logger.log_every == 0 or step == cfg.max_steps:
                telemetry = self.telemetry.row()
                self.logger.log({"step": step, "loss": loss, "lr": self.model.engine.lr(),
                                 "skipped_steps": self.skipped_steps,
                                 "skipped_data": self.skipped_data, **telemetry,
                                 "epoch": self.stream.epoch})
                self.logger.show(tok_s=telemetry["tokens_per_s"], mfu=telemetry.get("mfu"),
                                 data=telemetry["data_wait_share"])
            self.logger.advance(loss=loss)
            if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.max_steps:
                result = self.validate(step)
                if self.patience_exhausted(step, result):
                    return self.stop_early(step, losses, time.perf_counter() - start, result)
            self.checkpoints.commit_pending(wait=False, keep_step=self.best_step)
            if (cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < cfg.max_steps
                    and self.checkpoints.last_saved != step):  # not again after a new best
                self.save(step, background=True)
            if step < cfg.max_steps and self.preemption.requested(self.env.world_size):
                return self.stop_preempted(step)
        final = self.validate(cfg.max_steps)
        self.track_best(cfg.max_steps, final)  # the last validation may be the best
        if self.checkpoints.last_saved != cfg.max_steps:
            self.save(cfg.max_steps)
        self.logger.close()
        summary = self.summarise(losses, time.perf_counter() - start, final)
        if cfg.final_eval_split:
            self.evaluate_final(cfg.final_eval_split, cfg.max_steps)
        return summary

    def evaluate_final(self, split: str, step: int) -> dict[str, Any]:
        """The final model on the whole ``split``: what `foundation eval run_dir=RUN
        split=SPLIT checkpoint=step-N` reports, without loading it again."""
        self.model.train(False)
        loader = self.stream.loader(split, batch_size=self.cfg.data.eval_batch_size)
        result = self.task.evaluate(self.model, loader, split=split)
        return write_evaluation(self.run_dir, result, split=split, checkpoint=f"step-{step}",
                                recipe=self.task.name, headline=self.task.eval_metric,
                                is_main=self.env.is_main)

    def track_best(self, step: int, result: dict[str, Any]) -> bool:
        """Whether this validation is the best so far; with ``trainer.patience`` > 0 each new
        best is checkpointed (``RUN/best.json`` points at it)."""
        value = result["metrics"].get(self.task.eval_metric, float("nan"))
        if self.best is not None and not value > self.best["value"]:
            return False
        self.best, self.stale = {"step": step, "value": value}, 0
        if self.cfg.trainer.patience:
            self.save(step)
            self.checkpoints.mark_best(step, self.task.eval_metric, value)
        return True

    def patience_exhausted(self, step: int, result: dict[str, Any]) -> bool:
        """Track the best validation and say when ``patience`` validations brought none."""
        if self.track_best(step, result):
            return False
        self.stale += 1
        return 0 < self.cfg.trainer.patience <= self.stale

    def stop_early(self, step: int, losses: list[float], seconds: float,
                   result: dict[str, Any]) -> dict[str, Any]:
        self.stopped_early = True
        self.save(step)  # the run is complete: a rerun has nothing to do
        self.logger.close()
        if self.env.is_main:
            log.info(f"{self.task.name}: stopped early at step {step}: no better validation "
                     f"{self.task.eval_metric} in {self.stale} evaluations; the best, "
                     f"{self.best['value']:.4f} at step {self.best['step']}, is checkpoint=best")
        return self.summarise(losses, seconds, result)

    def check_global_batch(self) -> None:
        """The launcher's promise (launcher.global_batch_size) against the world that started."""
        try:
            check_run_batch(self.cfg, self.env.world_size)
        except LaunchError as err:
            raise ConfigError(str(err)) from None

    def stop_preempted(self, step: int) -> dict[str, Any]:
        path = self.save(step)
        self.logger.close()
        if self.env.is_main:
            log.info(f"{self.task.name}: preempted, checkpoint committed at {path}; run the same "
                     f"command again to resume")
            if self.preemption.slurm_warning and requeue_on_preemption(self.cfg):
                log.info("requeued the Slurm job: it resumes from that checkpoint")
        return {"recipe": self.task.name, "preempted": True, "step": step,
                "run_dir": str(self.run_dir)}

    def resume(self, path: Path | None) -> int:
        """Continue from ``path`` (None: a fresh run); returns the step to continue after."""
        if self.ledger is not None:
            self.ledger.truncate(0 if path is None else checkpoint.step_of(path))
        if path is None:
            return 0
        saved = self.checkpoints.restore(path, self.model, self.stream)
        self.skipped_steps = saved.get("skipped_steps", 0)
        self.skipped_data = saved.get("skipped_data", 0)
        self.best, self.stale = saved.get("best"), saved.get("stale", 0)
        self.stopped_early = saved.get("stopped_early", False)
        self.resharded_from = saved.get("resharded_from")
        return int(saved["step"])

    def train_step(self, batches: Iterator[SequenceBatch], step: int) -> float:
        """One optimizer step (timed, and on some steps measured); returns the mean loss."""
        begin, busy = time.perf_counter(), time.thread_time()
        measured = self.telemetry.measure() if self.telemetry.measures(step) else None
        with measured or contextlib.nullcontext():
            done = self.optimizer_step(batches, step)
        stats = torch.tensor([done.loss, float(done.tokens), float(done.skipped)],
                             dtype=torch.float64)
        if self.env.world_size > 1:
            dist.all_reduce(stats)
        self.skipped_data += int(stats[2])
        self.telemetry.record(int(stats[1]), time.perf_counter() - begin, done.data_wait,
                              measured, local_tokens=done.tokens,
                              busy=time.thread_time() - busy)
        return stats[0].item() / self.env.world_size

    def optimizer_step(self, batches: Iterator[SequenceBatch], step: int) -> RankStep:
        """``grad_accum`` micro-batches, sparse rows updated in backward."""
        self.model.train()
        self.model.schedule_tables(step)
        losses, tokens, wait, skipped = [], 0, 0.0, 0
        for _ in range(self.cfg.trainer.grad_accum):
            waiting = time.perf_counter()
            batch = next(batches).to(self.env.device)
            wait += time.perf_counter() - waiting
            skipped += batch.skipped
            if self.ledger is not None:
                self.ledger.record(step, self.stream.epoch, batch.sample_ids.tolist())
            features, extra = self.task.features(batch)
            loss = self.model.dense(batch, self.model.embed(features), **extra)
            if self.token_batches:  # ranks' batches differ: weight to the global mean
                loss = loss * global_mean_weight(self.task.loss_terms(batch))
            if not self.all_finite(loss):
                if self.cfg.trainer.on_nan == "stop":
                    raise FloatingPointError(
                        f"loss is {loss.item()} at step {step} on rank {self.env.rank}: lower "
                        f"trainer.optim.lr or check the data (trainer.on_nan=skip skips such "
                        f"steps); the last committed checkpoint is kept")
                self.skipped_steps += 1  # no backward: nothing is updated on any rank
                continue
            self.model.engine.backward(loss)
            self.model.engine.step()
            losses.append(loss.detach())
            tokens += int(batch.lengths.sum())
        mean = torch.stack(losses).mean().item() if losses else float("nan")
        return RankStep(mean, tokens, skipped, wait)

    def all_finite(self, loss: torch.Tensor) -> bool:
        """Whether every rank's loss is finite: ranks must agree before a collective backward."""
        finite = torch.tensor([int(bool(torch.isfinite(loss)))], dtype=torch.int32)
        if self.env.world_size > 1:
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        return bool(finite.item())

    def validate(self, step: int, **note: Any) -> dict[str, Any]:
        self.model.train(False)
        limit = self.cfg.trainer.eval_batches or None
        loader = self.stream.loader(self.cfg.data.val_split, batch_size=self.cfg.data.eval_batch_size)
        result = self.task.evaluate(self.model, itertools.islice(loader, limit),
                                    split=self.cfg.data.val_split, calibrate=True)
        for detail in ("ranks", "scores"):  # per-user detail is for `foundation eval`, not the log
            result.pop(detail, None)
        row = {"step": step, "split": self.cfg.data.val_split, **note, **result["metrics"]}
        for name, metrics in result["baselines"].items():
            row.update({f"{name}/{k}": v for k, v in metrics.items()})
        for name, group in result.get("groups", {}).items():  # e.g. cold/hr@10
            row.update({f"{name}/{k}": v for k, v in group["metrics"].items()})
        self.logger.log(row)
        return result

    @property
    def best_step(self) -> int | None:
        return self.best["step"] if self.best else None

    def save(self, step: int, background: bool = False) -> Path:
        """Checkpoint ``step`` with the trainer's counters (``background``: commit later)."""
        counters = {"skipped_steps": self.skipped_steps, "skipped_data": self.skipped_data,
                    "best": self.best, "stale": self.stale, "stopped_early": self.stopped_early}
        return self.checkpoints.save(step, self.model, self.stream, counters,
                                     recipe=self.task.name, warm_start=self.warm_start,
                                     background=background, keep_step=self.best_step)

    def summarise(self, losses: list[float], seconds: float,
                  final: dict[str, Any]) -> dict[str, Any]:
        metric = self.task.eval_metric
        value = final["metrics"].get(metric, float("nan"))
        name, scores = next(iter(final["baselines"].items()), ("baseline", {}))
        baseline = scores.get(metric, float("nan"))  # the task's first (most-popular, chance)
        telemetry = self.telemetry.summary()
        summary = {"recipe": self.task.name, "eval_metric": metric, "steps": len(losses),
                   "seconds": round(seconds, 1),
                   "first_loss": losses[0], "last_loss": float(np.mean(losses[-10:])),
                   "telemetry": telemetry, "val": final, "run_dir": str(self.run_dir)}
        if self.model.tuning is not None:  # a fine-tune: what its mode trained
            tuning = self.model.tuning
            summary["parameters"] = {"mode": tuning.mode.value, "trainable": tuning.trainable,
                                     "total": tuning.total, "tables_train": tuning.tables_train}
        if self.env.is_main:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
            plot_run(self.run_dir, metric)
            log.info(f"{self.task.name}: {len(losses)} steps in {seconds:.0f}s | loss "
                     f"{losses[0]:.3f} → {summary['last_loss']:.3f} | {describe(telemetry)} | "
                     f"val {metric} {value:.4f} ({name.replace('_', '-')} {baseline:.4f}) | "
                     f"run {self.run_dir}")
        return summary
