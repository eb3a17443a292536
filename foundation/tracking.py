"""Run logging: metrics.jsonl always, wandb (offline unless a key is configured), a progress bar."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm


@dataclass
class LoggerConfig:
    wandb: bool = True
    project: str = "foundation"
    progress: bool = True
    log_every: int = 10


class RunLogger:
    """Rank 0 writes; other ranks hold a logger that does nothing."""

    def __init__(self, cfg: LoggerConfig, run_dir: Path, *, enabled: bool, total_steps: int,
                 config: dict[str, Any] | None = None, name: str = "train", initial: int = 0):
        self.enabled = enabled
        self.cfg = cfg
        self.path = run_dir / "metrics.jsonl"
        self.bar = tqdm(total=total_steps, initial=initial, desc=name, dynamic_ncols=True,
                        disable=not (enabled and cfg.progress))
        self.postfix: dict[str, float] = {}
        self.wandb_run = None
        if enabled and cfg.wandb:
            self.wandb_run = _start_wandb(cfg, run_dir, config, name)

    def log(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"time": round(time.time(), 3), **row}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in row.items() if isinstance(v, (int, float))},
                               step=row.get("step"))

    def advance(self, steps: int = 1, **postfix: float | None) -> None:
        self.bar.update(steps)
        if postfix:
            self.show(**postfix)

    def show(self, **postfix: float | None) -> None:
        """Keep these values beside the progress bar (None: not known yet)."""
        self.postfix.update({k: v for k, v in postfix.items() if v is not None})
        self.bar.set_postfix({k: f"{v:.4g}" for k, v in self.postfix.items()}, refresh=False)

    def close(self) -> None:
        self.bar.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


def _start_wandb(cfg: LoggerConfig, run_dir: Path, config: dict | None, name: str):
    import wandb

    # No network here by default: offline unless the user configured a key.
    mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
    os.environ.setdefault("WANDB_SILENT", "true")
    return wandb.init(project=cfg.project, dir=str(run_dir), config=config, mode=mode,
                      name=f"{run_dir.name}-{name}", reinit="finish_previous")


def best_validation(run_dir: Path) -> dict[str, Any]:
    """The logged validation row of a run's best checkpoint (``best.json``), else its last."""
    log = run_dir / "metrics.jsonl"
    if not log.is_file():
        raise FileNotFoundError(f"{run_dir} has no metrics.jsonl: pass the directory of a "
                                "finished training run")
    rows = [row for row in map(json.loads, log.read_text().splitlines()) if "split" in row]
    best = run_dir / "best.json"
    if best.is_file():
        step = json.loads(best.read_text())["step"]
        rows = [row for row in rows if row["step"] == step]
    if not rows:
        raise ValueError(f"{log} logs no validation{' at its best step' * best.is_file()}")
    return rows[-1]
