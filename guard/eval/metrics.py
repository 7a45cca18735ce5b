"""The figures of the evaluation protocol (EVALUATION.md), as plain functions over labels and scores.

Every defense is measured by the same few functions so that rows of the report compare like with like.
"""

from __future__ import annotations

import numpy as np

__all__ = ["TOLERANCE", "at_least", "at_most", "auroc", "mean_spread", "roc_curve", "share"]

# Figures are ratios of image counts and means over seeds: a figure exactly on a target's bound (630 of 9,000 flagged
# against 5% ± 2 points) lands a rounding error past it, and meets the target. Checks compare with this much slack.
TOLERANCE = 1e-9


def at_most(value: float, bound: float) -> bool:
    """Whether a figure meets an upper bound, up to `TOLERANCE`; a NaN figure or bound never does."""
    return bool(value <= bound + TOLERANCE)


def at_least(value: float, bound: float) -> bool:
    """Whether a figure meets a lower bound, up to `TOLERANCE`; a NaN figure or bound never does."""
    return bool(value >= bound - TOLERANCE)


def share(mask: np.ndarray) -> float:
    """Share of True in a boolean array (NaN for an empty one, so a missing figure is never a silent 0)."""
    mask = np.asarray(mask, dtype=bool)
    return float(mask.mean()) if mask.size else float("nan")


def auroc(negative: np.ndarray, positive: np.ndarray) -> float:
    """Probability that a positive (triggered) sample outscores a negative (clean) one; ties count half. A NaN
    score ranks above every number, as the guard flags it (`Guard.predict`)."""
    negative, positive = _nan_highest(negative), _nan_highest(positive)
    if not negative.size or not positive.size:
        return float("nan")
    scores = np.concatenate([negative, positive])
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    # mid-rank of each distinct value: ranks below it plus the average position inside its tie group
    below = np.concatenate([[0], np.cumsum(counts)[:-1]])
    ranks = (below + (counts + 1) / 2)[inverse]
    positive_ranks = ranks[len(negative):].sum()
    return float((positive_ranks - len(positive) * (len(positive) + 1) / 2) / (len(negative) * len(positive)))


def _nan_highest(scores: np.ndarray) -> np.ndarray:
    scores = np.asarray(scores, np.float64)
    return np.where(np.isnan(scores), np.inf, scores)


def roc_curve(negative: np.ndarray, positive: np.ndarray, points: int = 101) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, TPR) at `points` thresholds spread over the finite scores' quantiles, from (1, 1) down to (0, 0); an
    infinite or NaN score (ranked as `auroc` ranks it) only moves the ends, where quantiles between infinities are
    NaN."""
    negative, positive = _nan_highest(negative), _nan_highest(positive)
    scores = np.concatenate([negative, positive])
    scores = scores[np.isfinite(scores)] if np.isfinite(scores).any() else np.zeros(1)
    thresholds = np.unique(np.quantile(scores, np.linspace(0, 1, points)))
    thresholds = np.concatenate([[-np.inf], thresholds, [np.inf]])
    fpr = np.array([(negative > t).mean() for t in thresholds])
    tpr = np.array([(positive > t).mean() for t in thresholds])
    return fpr, tpr


def mean_spread(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation over seeds (spread 0 for a single value; NaNs ignored)."""
    finite = np.asarray([v for v in values if v is not None and np.isfinite(v)], np.float64)
    if not finite.size:
        return float("nan"), float("nan")
    return float(finite.mean()), float(finite.std(ddof=1)) if finite.size > 1 else 0.0
