"""``foundation eval compare RUN_A RUN_B``: an offline A/B test of two evaluated runs.

Each run's ``eval-ranks.npz`` holds every user's target rank. Per metric, the difference
B − A is taken user by user (paired: the same users, the same targets), and a bootstrap over
users (resampled with replacement) gives its 95% confidence interval. The interval excluding
zero is the verdict "B better" or "B worse"; otherwise "no significant difference".

Recipes that score given candidates (ranking's impressions, notification's messages) write
``eval-scores.npz`` instead: every candidate's score and labels. Their metrics (AUC, Qini,
policy value) are not means over users, so each bootstrap resample draws members with all
their candidates and recomputes both sides' metrics on it.

A side may name a baseline of a run instead of its model: ``RUN@most_popular``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from foundation.metrics import ResampledAUC, per_user
from foundation.metrics.report import RANKS_FILE, SCORES_FILE
from foundation.metrics.uplift import uplift_metrics
from foundation.tasks import ROW_SLOTS

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

@dataclass
class ScoredSide:
    """Every candidate's score under one scorer, with the candidates' labels."""

    label: str
    row_ids: np.ndarray  # sample_id * ROW_SLOTS + the candidate's index in its row
    scores: np.ndarray
    split: str
    kind: str  # binary (labels) | uplift (sent, outcome[, uplift], budget)
    headline: str
    columns: dict[str, np.ndarray]

    @functools.cached_property
    def _auc(self) -> ResampledAUC:
        return ResampledAUC(self.scores, self.columns["label"])

    @functools.cached_property
    def _best_first(self) -> np.ndarray:
        return np.argsort(-self.scores, kind="stable")

    def metrics(self, rows: np.ndarray) -> dict[str, float]:
        """The kind's metrics over ``rows`` (indices into the candidates)."""
        if self.kind == "binary":
            return {"auc": self._auc(rows)}
        # The rows best first, by counting how often each was drawn: the uplift curves'
        # stable sorts of them then take linear time (a resample's rows come in random order).
        drawn = np.bincount(rows, minlength=len(self.scores))
        rows = np.repeat(self._best_first, drawn[self._best_first])
        c = {k: v[rows] for k, v in self.columns.items() if v.ndim}
        return uplift_metrics(self.scores[rows], c["sent"], c["outcome"],
                              float(self.columns["budget"]), c.get("uplift"))


def load_side(spec: str) -> Side | ScoredSide:
    """``RUN`` (its model) or ``RUN@baseline``: the ranks of every user, by sample id, or
    (recipes scoring given candidates) every candidate's score."""
    run, _, scorer = spec.partition("@")
    path = Path(run) / RANKS_FILE
    if not path.exists() and (Path(run) / SCORES_FILE).exists():
        return _load_scored(spec)
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


def _load_scored(spec: str) -> ScoredSide:
    run, _, scorer = spec.partition("@")
    with np.load(Path(run) / SCORES_FILE, allow_pickle=False) as saved:
        names = sorted(n[len("score_"):] for n in saved.files if n.startswith("score_"))
        if (scorer or "model") not in names:
            raise KeyError(f"{spec}: no scorer {scorer!r} in {run}/{SCORES_FILE}; it has {names}")
        columns = {n: saved[n] for n in saved.files if not n.startswith("score_")
                   and n not in ("row_id", "split", "kind", "headline")}
        return ScoredSide(spec, saved["row_id"], saved[f"score_{scorer or 'model'}"],
                          str(saved["split"]), str(saved["kind"]), str(saved["headline"]),
                          columns)


def member_resamples(row_ids: np.ndarray, resamples: int, rng: np.random.Generator):
    """Row indices of ``resamples`` bootstrap resamples of members (each drawn member brings
    all its candidates)."""
    order = np.argsort(row_ids // ROW_SLOTS, kind="stable")
    _, starts, counts = np.unique(row_ids[order] // ROW_SLOTS, return_index=True,
                                  return_counts=True)
    for _ in range(resamples):
        pick = rng.integers(0, len(starts), len(starts))
        lengths = counts[pick]
        shift = np.repeat(starts[pick] - (np.cumsum(lengths) - lengths), lengths)
        yield order[shift + np.arange(lengths.sum())]


def compare_scored(a: ScoredSide, b: ScoredSide, *, resamples: int = 2000, seed: int = 0
                   ) -> dict[str, dict[str, float | str]]:
    """B − A of every metric of the kind, with a 95% CI from resampling members."""
    if a.split != b.split or a.kind != b.kind:
        raise ValueError(f"{a.label} ({a.kind}, {a.split!r}) and {b.label} ({b.kind}, "
                         f"{b.split!r}): compare runs of one kind of recipe on the same split")
    if len(a.row_ids) != len(b.row_ids) or not np.array_equal(np.sort(a.row_ids),
                                                              np.sort(b.row_ids)):
        raise ValueError(f"{a.label} has {len(a.row_ids)} candidates, {b.label} "
                         f"{len(b.row_ids)}, not the same ones: were they evaluated on the same data?")
    in_order = np.empty_like(b.scores)  # b's scores in a's candidate order
    in_order[np.argsort(a.row_ids)] = b.scores[np.argsort(b.row_ids)]
    b = dataclasses.replace(b, scores=in_order)
    everything = np.arange(len(a.row_ids))
    point_a, point_b = a.metrics(everything), b.metrics(everything)
    boots: dict[str, list[float]] = {metric: [] for metric in point_a}
    for rows in member_resamples(a.row_ids, resamples, np.random.default_rng(seed)):
        in_a, in_b = a.metrics(rows), b.metrics(rows)
        for metric in boots:
            boots[metric].append(in_b[metric] - in_a[metric])
    return {metric: _verdict(point_a[metric], point_b[metric], np.asarray(boots[metric]))
            for metric in boots}


def _verdict(a: float, b: float, diffs: np.ndarray) -> dict[str, float | str]:
    low, high = np.nanpercentile(diffs, [2.5, 97.5])
    verdict = "B better" if low > 0 else "B worse" if high < 0 else "no significant difference"
    return {"a": float(a), "b": float(b), "diff": float(b - a), "ci_low": float(low),
            "ci_high": float(high), "verdict": verdict}


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
    return {metric: _verdict(users_a[metric].mean(), users_b[metric].mean(),
                             np.concatenate(boots[metric])) for metric in diffs}


def markdown(a: Side | ScoredSide, b: Side | ScoredSide, result: dict, users: int) -> str:
    unit = "candidates (members resampled)" if isinstance(a, ScoredSide) else "users"
    lines = [f"A = {a.label}, B = {b.label}, split {a.split}, {users} {unit}, paired bootstrap "
             f"95% CI of B − A", "",
             "| metric | A | B | B − A | 95% CI | verdict |", "|---|---|---|---|---|---|"]
    for metric, r in result.items():
        lines.append(f"| {metric} | {r['a']:.4f} | {r['b']:.4f} | {r['diff']:+.4f} | "
                     f"[{r['ci_low']:+.4f}, {r['ci_high']:+.4f}] | {r['verdict']} |")
    return "\n".join(lines) + "\n"


def run_compare(spec_a: str, spec_b: str, *, resamples: int = 2000, seed: int = 0,
                output: str | None = None, group: str | None = None) -> dict:
    a, b = load_side(spec_a), load_side(spec_b)
    if type(a) is not type(b):
        raise ValueError(f"{spec_a} and {spec_b} come from different kinds of recipe (target "
                         f"ranks vs candidate scores): compare runs of one recipe")
    if isinstance(a, ScoredSide):
        if group:
            raise ValueError("--group needs target ranks (cold-start builds); "
                             f"{spec_a} scores candidates")
        result, name = compare_scored(a, b, resamples=resamples, seed=seed), a.headline
        size = len(a.row_ids)
    else:
        if group:
            a, b = a.only(group), b.only(group)
        result, name, size = compare(a, b, resamples=resamples, seed=seed), "ndcg@10", len(a.ranks)
    print(markdown(a, b, result, size), end="")
    headline = result[name]
    log.info(f"compare: {name} {headline['a']:.4f} → {headline['b']:.4f} "
             f"({headline['diff']:+.4f}, 95% CI [{headline['ci_low']:+.4f}, "
             f"{headline['ci_high']:+.4f}]): {headline['verdict']}")
    if output:
        Path(output).write_text(json.dumps({"a": spec_a, "b": spec_b, "split": a.split,
                                            "users": size, "metrics": result}, indent=2))
    return result
