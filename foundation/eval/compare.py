"""``foundation eval compare RUN_A RUN_B``: an offline A/B test of two evaluated runs.

Each run's ``eval-ranks.npz`` holds every user's target rank. Per metric, the difference
B − A is taken user by user (paired: the same users, the same targets), and a bootstrap over
users (resampled with replacement) gives its 95% confidence interval. The interval excluding
zero is the verdict "B better" or "B worse"; otherwise "no significant difference".

A side may name a baseline of a run instead of its model: ``RUN@most_popular``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from foundation.eval.run import RANKS_FILE
from foundation.metrics import per_user

log = logging.getLogger(__name__)

KS = [5, 10, 20]
GROUP_PREFIX = "group_"  # eval-ranks.npz entries naming each user's membership of a group


@dataclass
class Side:
    label: str
    sample_ids: np.ndarray
    ranks: np.ndarray
    split: str
    groups: dict[str, np.ndarray] = field(default_factory=dict)  # group → user in it

    def only(self, group: str) -> Side:
        """The users of ``group`` (e.g. ``cold``: those whose target is a cold item), with
        ``warm`` the complement of ``cold``."""
        name, negate = (group, False) if group in self.groups else ("cold", group == "warm")
        if name not in self.groups:
            raise KeyError(f"{self.label} has no group {group!r}: groups come from a build "
                           f"with cold_items (known: {sorted(self.groups) + ['warm'] * bool(self.groups)})")
        users = self.groups[name] != negate
        return Side(f"{self.label} [{group}]", self.sample_ids[users], self.ranks[users],
                    self.split, {})

def load_side(spec: str) -> Side:
    """``RUN`` (its model) or ``RUN@baseline``: the ranks of every user, by sample id."""
    run, _, scorer = spec.partition("@")
    path = Path(run) / RANKS_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: evaluate the run first "
                                f"(foundation eval run_dir={run} split=test)")
    with np.load(path, allow_pickle=False) as saved:
        scorer = scorer or "model"
        names = sorted(n for n in saved.files if n not in ("sample_id", "split")
                       and not n.startswith(GROUP_PREFIX))
        if scorer not in names:
            raise KeyError(f"{spec}: no scorer {scorer!r} in {path}; it has {names}")
        groups = {n[len(GROUP_PREFIX):]: saved[n].astype(bool) for n in saved.files
                  if n.startswith(GROUP_PREFIX)}
        return Side(spec, saved["sample_id"], saved[scorer], str(saved["split"]), groups)


def paired(a: Side, b: Side) -> tuple[np.ndarray, np.ndarray]:
    """Both sides' ranks over the same users, in the same order."""
    if a.split != b.split:
        raise ValueError(f"{a.label} was evaluated on {a.split!r}, {b.label} on {b.split!r}: "
                         f"evaluate both on the same split")
    common, ia, ib = np.intersect1d(a.sample_ids, b.sample_ids, return_indices=True)
    if len(common) != len(a.sample_ids) or len(common) != len(b.sample_ids):
        raise ValueError(f"{a.label} has {len(a.sample_ids)} users, {b.label} "
                         f"{len(b.sample_ids)}, {len(common)} in common: were they evaluated "
                         f"on the same data?")
    return a.ranks[ia], b.ranks[ib]


def compare(a: Side, b: Side, *, resamples: int = 2000, seed: int = 0,
            ks: list[int] = KS) -> dict[str, dict[str, float | str]]:
    ranks_a, ranks_b = paired(a, b)
    users_a, users_b = per_user(ranks_a, ks), per_user(ranks_b, ks)
    diffs = {metric: users_b[metric] - users_a[metric] for metric in users_a}
    boots: dict[str, list[np.ndarray]] = {metric: [] for metric in diffs}
    rng = np.random.default_rng(seed)
    for start in range(0, resamples, 100):  # chunks: one resample is as large as the split
        picks = rng.integers(0, len(ranks_a), (min(100, resamples - start), len(ranks_a)))
        for metric, diff in diffs.items():  # the same resamples for every metric
            boots[metric].append(diff[picks].mean(axis=1))
    out = {}
    for metric, diff in diffs.items():
        low, high = np.percentile(np.concatenate(boots[metric]), [2.5, 97.5])
        verdict = ("B better" if low > 0 else "B worse" if high < 0
                   else "no significant difference")
        out[metric] = {"a": float(users_a[metric].mean()), "b": float(users_b[metric].mean()),
                       "diff": float(diff.mean()), "ci_low": float(low), "ci_high": float(high),
                       "verdict": verdict}
    return out


def markdown(a: Side, b: Side, result: dict, users: int) -> str:
    lines = [f"A = {a.label}, B = {b.label}, split {a.split}, {users} users, paired bootstrap "
             f"95% CI of B − A", "",
             "| metric | A | B | B − A | 95% CI | verdict |", "|---|---|---|---|---|---|"]
    for metric, r in result.items():
        lines.append(f"| {metric} | {r['a']:.4f} | {r['b']:.4f} | {r['diff']:+.4f} | "
                     f"[{r['ci_low']:+.4f}, {r['ci_high']:+.4f}] | {r['verdict']} |")
    return "\n".join(lines) + "\n"


def run_compare(spec_a: str, spec_b: str, *, resamples: int = 2000, seed: int = 0,
                output: str | None = None, group: str | None = None) -> dict:
    a, b = load_side(spec_a), load_side(spec_b)
    if group:
        a, b = a.only(group), b.only(group)
    result = compare(a, b, resamples=resamples, seed=seed)
    print(markdown(a, b, result, len(a.ranks)), end="")
    headline = result["ndcg@10"]
    log.info(f"compare: ndcg@10 {headline['a']:.4f} → {headline['b']:.4f} "
             f"({headline['diff']:+.4f}, 95% CI [{headline['ci_low']:+.4f}, "
             f"{headline['ci_high']:+.4f}]): {headline['verdict']}")
    if output:
        Path(output).write_text(json.dumps({"a": spec_a, "b": spec_b, "split": a.split,
                                            "users": len(a.ranks), "metrics": result}, indent=2))
    return result
