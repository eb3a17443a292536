"""``foundation demo`` (``make demo``): the paved path end to end on a synthetic world.

synthetic shards → pretrain on N ranks (torchrun) → ranking fine-tune warm-started from it
→ evaluation of both on held-out members → a short summary.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

WORLD = ["world.members=3000", "world.items=1000", "world.seed=0"]
COMMON = ["logger.log_every=20", "data.num_workers=1"]
PRETRAIN = ["recipe=pretrain_member_fm", "trainer.max_steps=300", "trainer.eval_every=100",
            "trainer.eval_batches=4"]
# Pretrained tables want a gentler sparse learning rate than tables learned from scratch.
FINETUNE = ["recipe=finetune_ranking", "trainer.max_steps=150", "trainer.eval_every=0",
            "trainer.optim.lr=0.0005", "sharding.lr=0.01"]


def run_demo(directory: str, nproc: int = 2) -> int:
    root = Path(directory)
    shards, pretrain = root / "shards", root / "runs/pretrain"
    finetune, scratch = root / "runs/finetune", root / "runs/finetune_scratch"
    start = time.perf_counter()
    steps = [
        ["data", "synth", f"output={shards}", *WORLD],
        ["train", f"--nproc={nproc}", *PRETRAIN, *COMMON, f"data.path={shards}",
         f"run_dir={pretrain}"],
        ["train", f"--nproc={nproc}", *FINETUNE, *COMMON, f"data.path={shards}",
         f"run_dir={finetune}", f"recipe.init_from={pretrain}"],
        # The same recipe from scratch, for the value of pretraining at equal steps.
        ["train", f"--nproc={nproc}", *FINETUNE, *COMMON, f"data.path={shards}",
         f"run_dir={scratch}"],
        ["eval", f"run_dir={pretrain}", "split=test"],
        ["eval", f"run_dir={finetune}", "split=test"],
        ["eval", f"run_dir={scratch}", "split=test"],
    ]
    for args in steps:
        print(f"\n$ foundation {' '.join(args)}", flush=True)
        code = subprocess.call([sys.executable, "-m", "foundation.cli", *args])
        if code != 0:
            print(f"demo failed at: foundation {' '.join(args)} (exit {code})", file=sys.stderr)
            return code
    pre = json.loads((pretrain / "eval.json").read_text())
    fine = json.loads((finetune / "eval.json").read_text())
    cold = json.loads((scratch / "eval.json").read_text())
    minutes = (time.perf_counter() - start) / 60
    print("\n== demo summary ==")
    print(f"pretrain  test hr@10 {pre['metrics']['hr@10']:.4f} ndcg@10 {pre['metrics']['ndcg@10']:.4f}"
          f" | most-popular hr@10 {pre['baselines']['most_popular']['hr@10']:.4f} | {pretrain}")
    print(f"finetune  test auc {fine['metrics']['auc']:.4f} log_loss {fine['metrics']['log_loss']:.4f}"
          f" | from scratch auc {cold['metrics']['auc']:.4f}"
          f" | most-popular auc {fine['baselines']['most_popular']['auc']:.4f} | {finetune}")
    print(f"plots: {pretrain}/training.png {finetune}/training.png")
    print(f"demo finished in {minutes:.1f} min; shards in {shards}")
    return 0
