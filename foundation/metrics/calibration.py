"""Calibrating how items without a trained ID row (cold: never seen in training) rank against
warm ones. Training never shows a cold item as a target, so the weight of their content score
is fitted on validation's own cold items (a build with ``cold_val_items``), within a budget on
the warm users' NDCG."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from foundation.tracking import best_validation

COLD_SCALES = 2.0 ** (np.arange(-4, 17) / 8)  # 0.71 … 4 × the learned cold-item weight
CALIBRATION_K = 10  # the cold-item weight is fitted on NDCG@10


def choose_cold_scale(ndcg: np.ndarray, is_cold: np.ndarray, scales: np.ndarray,
                      budget: float, reference: float | None = None) -> int:
    """Of the candidate cold-item scales (columns of each user's NDCG ``[users, scales]``),
    the one best for users with a cold target among those that keep the other users' NDCG
    within ``budget`` (a fraction) of ``reference`` (default: their best over the scales);
    the one best for them if none does; scale 1 without both kinds of users."""
    if not is_cold.any() or is_cold.all():
        return int(np.flatnonzero(scales == 1)[0])
    warm, cold = ndcg[~is_cold].mean(0), ndcg[is_cold].mean(0)
    allowed = warm >= (1 - budget) * (warm.max() if reference is None else reference)
    if not allowed.any():
        return int(np.argmax(warm))
    return int(np.argmax(np.where(allowed, cold, -np.inf)))


def reference_warm_ndcg(run: Path, data_path: str) -> float:
    """The warm users' validation NDCG@K of ``run`` (``model.cold_reference``: a run on the
    build at ``data_path``, e.g. the ID-only incumbent) at its best checkpoint, from its log."""
    if not (run / "config.yaml").is_file():
        raise FileNotFoundError(f"model.cold_reference={run} is not a training run (no "
                                "config.yaml): pass the run_dir of a run on this build")
    theirs = OmegaConf.load(run / "config.yaml").data.path
    if Path(theirs).resolve() != Path(data_path).resolve():
        raise ValueError(f"model.cold_reference={run} was trained on {theirs}, not on "
                         f"{data_path}: its warm users are other users; pass a run on the "
                         "same build")
    key = f"warm/ndcg@{CALIBRATION_K}"
    value = best_validation(run).get(key)
    if value is None:
        raise ValueError(f"model.cold_reference={run} logs no {key}: train it on a build "
                         "with cold_val_items, whose validation has warm and cold users")
    return float(value)
