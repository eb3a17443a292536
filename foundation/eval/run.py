"""``foundation eval run_dir=RUN [split=test]``: evaluate a run's checkpoint on a split.

Works on any world size (alone, or under torchrun): the sharded tables are resharded on load.
Rank 0 writes ``RUN/eval.json`` (``{"split", "metrics", "baselines"}``), ``RUN/eval.md`` and,
for ranking-by-catalogue recipes, ``RUN/eval-ranks.npz`` (each user's target rank under the
model and each baseline, by sample id) for ``foundation eval compare``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from foundation.distributed.env import init_distributed, seed_everything
from foundation.train import checkpoint
from foundation.train.model import ShardedModel
from foundation.train.stream import EpochStream

RANKS_FILE = "eval-ranks.npz"


def evaluate_run(cfg: DictConfig) -> dict[str, Any]:
    run_dir = Path(cfg.run_dir)
    if not (run_dir / "config.yaml").exists():
        raise FileNotFoundError(f"{run_dir}/config.yaml not found: run_dir must be a training "
                                f"run directory (the run_dir=... given to `foundation train`)")
    path = checkpoint.resolve(run_dir, cfg.checkpoint)
    train_cfg = OmegaConf.load(run_dir / "config.yaml")
    from foundation.train.trainer import build_task

    env = init_distributed()
    try:
        task = build_task(train_cfg)
        seed_everything(train_cfg.seed)
        model = ShardedModel(task, train_cfg, env, train=False)
        checkpoint.load_sparse(path, model.sparse)
        checkpoint.load_dense(path, model.dense_module)
        model.train(False)
        stream = EpochStream(train_cfg.data, mode=task.data_mode, seed=train_cfg.seed,
                             rank=env.rank, world_size=env.world_size)
        result = task.evaluate(model, stream.loader(cfg.split, batch_size=cfg.batch_size))
        ranks = result.pop("ranks", None)
        report = {"split": cfg.split, "run_dir": str(run_dir), "checkpoint": path.name,
                  "recipe": task.name, **result}
        if env.is_main:
            (run_dir / "eval.json").write_text(json.dumps(report, indent=2))
            if ranks is not None:  # every user's target rank: `foundation eval compare`
                np.savez(run_dir / RANKS_FILE, split=np.array(cfg.split),
                         **{k: v.astype(np.int64) for k, v in ranks.items()})
            (run_dir / "eval.md").write_text(markdown_report(report))
            print(one_line(report), flush=True)
        return report
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def one_line(report: dict[str, Any]) -> str:
    metrics = " ".join(f"{k} {v:.4f}" for k, v in report["metrics"].items()
                       if k in ("hr@10", "ndcg@10", "mrr", "auc", "log_loss"))
    base = report["baselines"].get("most_popular", {})
    base_text = " ".join(f"{k} {v:.4f}" for k, v in base.items() if k in ("hr@10", "ndcg@10", "auc"))
    return (f"eval {report['recipe']} [{report['split']}, {report['checkpoint']}]: {metrics} | "
            f"most-popular {base_text} | {report['run_dir']}/eval.json")


def markdown_report(report: dict[str, Any]) -> str:
    names = ["model", *report["baselines"]]
    rows = [report["metrics"], *report["baselines"].values()]
    keys = [k for k in report["metrics"] if all(k in r for r in rows)]
    lines = [f"# {report['recipe']}: {report['split']} split ({report['checkpoint']})", "",
             "| | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for name, row in zip(names, rows):
        lines.append(f"| {name} | " + " | ".join(f"{row[k]:.4f}" for k in keys) + " |")
    return "\n".join(lines) + "\n"
