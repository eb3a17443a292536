"""Plots of a run, from its metrics.jsonl: training loss and the validation metrics over steps."""

from __future__ import annotations

import json
from pathlib import Path


def plot_run(run_dir: Path, metric: str) -> Path | None:
    """Write ``RUN/training.png``; returns its path, or None when there is nothing to plot."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    train = [r for r in rows if "loss" in r]
    val = [r for r in rows if r.get("split") and metric in r]
    if not train:
        return None
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    left.plot([r["step"] for r in train], [r["loss"] for r in train])
    left.set(title="training loss", xlabel="step")
    baseline = f"most_popular/{metric}"
    right.plot([r["step"] for r in val], [r[metric] for r in val], marker="o", label="model")
    if val and baseline in val[0]:
        right.plot([r["step"] for r in val], [r[baseline] for r in val], ls="--",
                   label="most popular")
    right.set(title=f"validation {metric}", xlabel="step")
    right.legend()
    fig.tight_layout()
    path = run_dir / "training.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
