"""``foundation eval run_dir=RUN [split=test]``: evaluate a run's checkpoint on a split.

Works on any world size (alone, or under torchrun): the sharded tables are resharded on load.
Rank 0 writes ``RUN/eval.json`` (``{"split", "headline", "metrics", "baselines"}``: the
headline is the recipe's main metric), ``RUN/eval.md`` and,
for ranking-by-catalogue recipes, ``RUN/eval-ranks.npz`` (each user's target rank under the
model and each baseline, by sample id) and, for recipes scoring given candidates (ranking,
notification), ``RUN/eval-scores.npz`` (each candidate's score under the model and each
baseline, with its labels) for ``foundation eval compare``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch.distributed as dist
from omegaconf import DictConfig

from foundation.distributed.env import DistEnv, init_distributed, seed_everything
from foundation.recipes import build_task
from foundation.tasks import Task, read_run_config
from foundation.train import checkpoint
from foundation.train.model import ShardedModel
from foundation.train.stream import EpochStream

log = logging.getLogger(__name__)

RANKS_FILE = "eval-ranks.npz"
SCORES_FILE = "eval-scores.npz"


@dataclass
class TrainedRun:
    """A run's checkpoint loaded for inference on this process group (any world size)."""

    cfg: DictConfig  # the training config
    task: Task
    model: ShardedModel
    checkpoint: Path
    env: DistEnv

    def batches(self, split: str, batch_size: int):
        stream = EpochStream(self.cfg.data, mode=self.task.data_mode, seed=self.cfg.seed,
                             rank=self.env.rank, world_size=self.env.world_size,
                             options=self.task.loader_options())
        return stream.loader(split, batch_size=batch_size)


def load_run(run_dir: Path, which: str, env: DistEnv) -> TrainedRun:
    """Load ``run_dir``'s checkpoint ``which`` (latest | best | step-N), sharded over ``env``."""
    if not (run_dir / "config.yaml").exists():
        raise FileNotFoundError(f"{run_dir}/config.yaml not found: run_dir must be a training "
                                f"run directory (the run_dir=... given to `foundation train`)")
    path = checkpoint.resolve(run_dir, which)
    train_cfg = read_run_config(run_dir)
    task = build_task(train_cfg)
    seed_everything(train_cfg.seed)
    base = checkpoint.base_of(path)  # a fine-tune's checkpoint may hold only what it trained
    model = ShardedModel(task, train_cfg, env, train=False, warm_start=base)
    if (path / "sparse").exists():  # absent: the tables were frozen, the base's are loaded
        checkpoint.load_sparse(path, model.sparse)
    if base is None:
        checkpoint.load_dense(path, model.dense_module)
    else:
        checkpoint.load_trained(path, model.dense_module)
    model.train(False)
    return TrainedRun(train_cfg, task, model, path, env)


def evaluate_run(cfg: DictConfig) -> dict[str, Any]:
    run_dir = Path(cfg.run_dir)
    env = init_distributed()
    try:
        run = load_run(run_dir, cfg.checkpoint, env)
        task, path = run.task, run.checkpoint
        result = task.evaluate(run.model, run.batches(cfg.split, cfg.batch_size), split=cfg.split)
        ranks, scores = result.pop("ranks", None), result.pop("scores", None)
        report = {"split": cfg.split, "run_dir": str(run_dir), "checkpoint": path.name,
                  "recipe": task.name, "headline": task.eval_metric, **result}
        if env.is_main:
            (run_dir / "eval.json").write_text(json.dumps(report, indent=2))
            if ranks is not None:  # every user's target rank: `foundation eval compare`
                np.savez(run_dir / RANKS_FILE, split=np.array(cfg.split),
                         **{k: v.astype(np.int64) for k, v in ranks.items()})
            if scores is not None:  # every candidate's score under each scorer: the same
                np.savez(run_dir / SCORES_FILE, split=np.array(cfg.split),
                         headline=np.array(task.eval_metric), **scores)
            (run_dir / "eval.md").write_text(markdown_report(report))
            log.info(one_line(report))
        return report
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


SHOWN = ("hr@10", "ndcg@10", "mrr", "auc", "log_loss", "true_policy_value", "oracle_share")


def one_line(report: dict[str, Any]) -> str:
    headline = report["headline"]
    shown = [headline, *(k for k in SHOWN if k != headline)]
    metrics = " ".join(f"{k} {report['metrics'][k]:.4f}" for k in shown if k in report["metrics"])
    baselines = "".join(f" | {name} {headline} {b[headline]:.4f}"
                        for name, b in report["baselines"].items() if headline in b)
    groups = "".join(f" | {name} users ndcg@10 {g['metrics']['ndcg@10']:.4f}"
                     for name, g in report.get("groups", {}).items())
    return (f"eval {report['recipe']} [{report['split']}, {report['checkpoint']}]: {metrics}"
            f"{baselines}{groups} | {report['run_dir']}/eval.json")


def markdown_report(report: dict[str, Any]) -> str:
    lines = [f"# {report['recipe']}: {report['split']} split ({report['checkpoint']})", ""]
    lines += _table(report)
    for name, group in report.get("groups", {}).items():
        users = int(group["metrics"].get("users", 0))
        lines += ["", f"## users whose target is {name} ({users})", "", *_table(group)]
    return "\n".join(lines) + "\n"


def _table(report: dict[str, Any]) -> list[str]:
    names = ["model", *report["baselines"]]
    rows = [report["metrics"], *report["baselines"].values()]
    keys = [k for k in report["metrics"] if all(k in r for r in rows)]
    lines = ["| | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for name, row in zip(names, rows):
        lines.append(f"| {name} | " + " | ".join(f"{row[k]:.4f}" for k in keys) + " |")
    return lines
