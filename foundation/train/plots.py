"""Plots of a run, from its metrics.jsonl: training loss, the validation metric, and where the
step time goes (tokens/s, MFU, data waiting) over steps."""

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

    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(15, 3.6))
    steps = [r["step"] for r in train]
    left.plot(steps, [r["loss"] for r in train])
    left.set(title="training loss", xlabel="step")
    baseline = f"most_popular/{metric}"
    middle.plot([r["step"] for r in val], [r[metric] for r in val], marker="o", label="model")
    if val and baseline in val[0]:
        middle.plot([r["step"] for r in val], [r[baseline] for r in val], ls="--",
                    label="most popular")
    middle.set(title=f"validation {metric}", xlabel="step")
    middle.legend()
    _plot_speed(right, [r for r in train if "tokens_per_s" in r])
    fig.tight_layout()
    path = run_dir / "training.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _plot_speed(axis, rows: list[dict]) -> None:
    """Tokens/s on the left axis; MFU and the shares waiting for data and in collectives (%)
    on the right."""
    steps = [r["step"] for r in rows]
    axis.plot(steps, [r["tokens_per_s"] for r in rows], color="tab:blue")
    axis.set(title="speed", xlabel="step", ylabel="tokens/s")
    shares = axis.twinx()
    if rows and "mfu" in rows[-1]:
        shares.plot(steps, [100 * r.get("mfu", float("nan")) for r in rows], color="tab:green",
                    label="MFU %")
    shares.plot(steps, [100 * r["data_wait_share"] for r in rows], color="tab:red", ls=":",
                label="data wait %")
    if rows and "collective_wait_share" in rows[-1]:
        shares.plot(steps, [100 * r.get("collective_wait_share", float("nan")) for r in rows],
                    color="tab:purple", ls="--", label="collectives %")
    shares.set_ylabel("%")
    shares.legend(loc="lower right")
