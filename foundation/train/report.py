"""``foundation report RUN [RUN ...]``: what a run reached and what it cost.

One run: its validation (best checkpoint), the telemetry of the whole run (tokens/s, MFU,
data waiting, collectives, peak memory per rank) and ``RUN/training.png`` redrawn. Several
runs (a sweep): one table, a row each.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from foundation.telemetry import describe
from foundation.tracking import best_validation
from foundation.train.plots import plot_run

log = logging.getLogger(__name__)


def run_report(run: Path) -> dict[str, Any]:
    """A finished run's summary, best validation and telemetry."""
    summary_path = run / "summary.json"
    if not summary_path.is_file():
        raise FileNotFoundError(f"{run} has no summary.json: report reads finished training "
                                "runs (foundation train ... run_dir=RUN)")
    summary = json.loads(summary_path.read_text())
    best = best_validation(run)
    metric = summary.get("eval_metric")
    metrics = {k: v for k, v in best.items()
               if k not in ("time", "split", "users", "step") and "/" not in k}
    # The recipe's eval metric first, then the others as logged.
    metrics = dict(sorted(metrics.items(), key=lambda item: item[0] != metric))
    return {"run": str(run), "recipe": summary["recipe"], "steps": summary["steps"],
            "best_step": best["step"],
            "seconds": summary["seconds"], "validation": metrics,
            "telemetry": summary.get("telemetry", {})}


def sweep_members(runs: list[Path]) -> list[tuple[Path, dict[str, str]]]:
    """Each run with the overrides it was swept with; a sweep's directory (sweep.json, from
    ``foundation train -m``) stands for its runs."""
    members = []
    for run in runs:
        sweep = run / "sweep.json"
        if sweep.is_file():
            members += [(run / entry["dir"], entry["overrides"])
                        for entry in json.loads(sweep.read_text())["runs"]]
        else:
            members.append((run, {}))
    return members


def report(runs: list[Path]) -> list[dict[str, Any]]:
    """Print the report of ``runs`` (and redraw a single run's plots)."""
    members = sweep_members(runs)
    read = run_report if len(members) == 1 else _report_or_unfinished
    rows = [{**read(run), "swept": swept} for run, swept in members]
    if len(rows) == 1:
        row = rows[0]
        metric = next(iter(row["validation"]), None)
        plot = plot_run(Path(row["run"]), metric) if metric else None
        print(f"{row['run']}: {row['recipe']}, {row['steps']} steps in {row['seconds']:.0f} s")
        print(f"  validation (step {row['best_step']}): " + ", ".join(
            f"{k} {v:.4f}" for k, v in row["validation"].items()))
        if row["telemetry"]:
            telemetry = row["telemetry"]
            print(f"  speed: {describe(telemetry)}")
            if "flops_per_token" in telemetry:
                print(f"  model FLOPs/token {telemetry['flops_per_token']:,.0f}; peak "
                      f"{telemetry['peak_tflops_per_rank']:.3g} TFLOP/s per rank "
                      f"({telemetry['peak_source']})")
            print("  peak memory per rank (MiB): " + ", ".join(
                f"{m:,.0f}" for m in telemetry["peak_memory_mib"]))
        if plot:
            print(f"  plots: {plot}")
        return rows
    finished = [row for row in rows if "recipe" in row]
    keys = list(finished[0]["validation"])[:4] if finished else []
    swept = list(dict.fromkeys(key for row in rows for key in row["swept"]))
    header = ["run", *swept, "steps", *keys, "tokens/s", "MFU %", "data wait %"]
    table = [header] + [[row["run"], *(row["swept"].get(key, "") for key in swept),
                         str(row.get("steps", "unfinished")),
                         *(f"{row['validation'].get(k, float('nan')):.4f}" for k in keys),
                         f"{row['telemetry'].get('tokens_per_s', float('nan')):,.0f}",
                         f"{100 * row['telemetry'].get('mfu', float('nan')):.1f}",
                         f"{100 * row['telemetry'].get('data_wait_share', float('nan')):.1f}"]
                        for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    for line in table:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths)))
    return rows


def _report_or_unfinished(run: Path) -> dict[str, Any]:
    """A run's report; in a table, a run without a summary (failed, still running) is a row
    that says so rather than the end of the report."""
    try:
        return run_report(run)
    except FileNotFoundError:
        return {"run": str(run), "validation": {}, "telemetry": {}}
