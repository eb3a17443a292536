"""Uplift metrics on randomised sends: who to message, judged by the difference a message
makes (sent vs held out), not by who responds.

Every curve orders the candidates by a policy's score (highest first) and asks, for the top
fraction: how many more outcomes did sending cause? Observed data answers it from the two
randomised arms; a simulator's true uplift answers it exactly (``true_policy_value``).
"""

from __future__ import annotations

import numpy as np


def _ordered(scores: np.ndarray, *columns: np.ndarray) -> list[np.ndarray]:
    """``columns`` sorted by descending score (ties in a fixed, score-independent order)."""
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    return [np.asarray(c)[order] for c in columns]


def qini_curve(scores: np.ndarray, sent: np.ndarray, outcome: np.ndarray) -> np.ndarray:
    """``[N]``: incremental outcomes of sending to the top k (k = 1..N), estimated from the
    arms: outcomes among sent − outcomes among held out × (sent / held out) in the top k."""
    sent, outcome = _ordered(scores, sent.astype(bool), outcome.astype(np.float64))
    n_sent, n_held = np.cumsum(sent), np.cumsum(~sent)
    y_sent, y_held = np.cumsum(outcome * sent), np.cumsum(outcome * ~sent)
    return y_sent - y_held * n_sent / np.maximum(n_held, 1)


def qini_coefficient(scores: np.ndarray, sent: np.ndarray, outcome: np.ndarray) -> float:
    """Area between the Qini curve and random targeting's straight line, per candidate
    (0: no better than random; higher is better)."""
    curve = qini_curve(scores, sent, outcome)
    n = len(curve)
    if n == 0:
        return float("nan")
    random = curve[-1] * np.arange(1, n + 1) / n
    return float((curve - random).mean() / n)


def auuc(scores: np.ndarray, sent: np.ndarray, outcome: np.ndarray) -> float:
    """Area under the uplift curve, per candidate: at each k, the top k's difference in
    outcome rates between the arms × k / N, averaged over k."""
    sent, outcome = _ordered(scores, sent.astype(bool), outcome.astype(np.float64))
    n_sent, n_held = np.cumsum(sent), np.cumsum(~sent)
    rate_sent = np.cumsum(outcome * sent) / np.maximum(n_sent, 1)
    rate_held = np.cumsum(outcome * ~sent) / np.maximum(n_held, 1)
    n = len(sent)
    return float(((rate_sent - rate_held) * np.arange(1, n + 1) / n).mean()) if n else float("nan")


def _top(n: int, budget: float) -> int:
    if not 0 < budget <= 1:
        raise ValueError(f"a send budget is a fraction in (0, 1], got {budget}")
    return max(1, int(round(budget * n)))


def policy_value(scores: np.ndarray, sent: np.ndarray, outcome: np.ndarray,
                 budget: float) -> float:
    """Incremental outcomes per candidate of sending to the top ``budget`` fraction,
    estimated from the arms (the Qini curve at that point, over N)."""
    return float(qini_curve(scores, sent, outcome)[_top(len(scores), budget) - 1] / len(scores))


def true_policy_value(scores: np.ndarray, uplift: np.ndarray, budget: float) -> float:
    """The same from a simulator's true uplift: the top ``budget`` fraction's summed uplift
    over N (the oracle policy scores by ``uplift`` itself)."""
    (top,) = _ordered(scores, uplift)
    return float(top[:_top(len(scores), budget)].sum() / len(scores))


def uplift_metrics(scores: np.ndarray, sent: np.ndarray, outcome: np.ndarray,
                   budget: float, uplift: np.ndarray | None = None) -> dict[str, float]:
    """Qini, AUUC and policy value at ``budget`` of one policy's scores; with the true
    uplift also its true policy value and the share of the oracle policy's it captures."""
    out = {"qini": qini_coefficient(scores, sent, outcome), "auuc": auuc(scores, sent, outcome),
           "policy_value": policy_value(scores, sent, outcome, budget)}
    if uplift is not None:
        value, oracle = (true_policy_value(s, uplift, budget) for s in (scores, uplift))
        out |= {"true_policy_value": value, "oracle_share": value / oracle if oracle > 0
                else float("nan")}
    return out
