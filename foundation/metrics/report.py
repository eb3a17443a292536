"""What an evaluation writes: ``RUN/eval.json`` (``{"split", "headline", "metrics",
"baselines"}``), ``RUN/eval.md``, and per user or candidate the detail that
``foundation eval compare`` resamples (``eval-ranks.npz``, ``eval-scores.npz``). Written by
``foundation eval`` and by a training run's final evaluation (``trainer.final_eval_split``)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

RANKS_FILE = "eval-ranks.npz"
SCORES_FILE = "eval-scores.npz"


def write_evaluation(run_dir: Path, result: dict[str, Any], *, split: str, checkpoint: str,
                     recipe: str, headline: str, is_main: bool) -> dict[str, Any]:
    """The report of ``result`` (a ``Task.evaluate``), written by the main rank; returns it."""
    ranks, scores = result.pop("ranks", None), result.pop("scores", None)
    report = {"split": split, "run_dir": str(run_dir), "checkpoint": checkpoint,
              "recipe": recipe, "headline": headline, **result}
    if not is_main:
        return report
    (run_dir / "eval.json").write_text(json.dumps(report, indent=2))
    if ranks is not None:  # every user's target rank: `foundation eval compare`
        np.savez(run_dir / RANKS_FILE, split=np.array(split),
                 **{k: v.astype(np.int64) for k, v in ranks.items()})
    if scores is not None:  # every candidate's score under each scorer: the same
        np.savez(run_dir / SCORES_FILE, split=np.array(split), headline=np.array(headline),
                 **scores)
    (run_dir / "eval.md").write_text(markdown_report(report))
    log.info(one_line(report))
    return report


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
