"""Per-class consistency profiles and the check's thresholds, calibrated on clean data only."""

from __future__ import annotations

import math

import numpy as np

# Classes with few calibration samples borrow strength from the all-class statistics (pseudo-count).
_SHRINK = 5.0
# A channel's scale never drops below this share of its own clean std, nor below this share of its tap's typical std:
# a channel that never fired on clean data must not turn a faint activation into an enormous z.
_OWN_FLOOR = 0.1
_TAP_FLOOR = 0.05


def class_profiles(linf: list[np.ndarray], labels: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-class mean and scale of ℓ∞ for every tapped channel: two (K, C_total) arrays."""
    means, scales = [], []
    for tap in linf:
        global_mean, global_var = tap.mean(axis=0), tap.var(axis=0)
        floor = _OWN_FLOOR * np.sqrt(global_var) + _TAP_FLOOR * np.median(np.sqrt(global_var)) + 1e-6
        tap_mean = np.empty((num_classes, tap.shape[1]), dtype=np.float64)
        tap_var = np.empty_like(tap_mean)
        for cls in range(num_classes):
            rows = tap[labels == cls]
            n = len(rows)
            cls_mean = rows.mean(axis=0) if n else global_mean
            cls_var = rows.var(axis=0) if n else global_var
            tap_mean[cls] = (n * cls_mean + _SHRINK * global_mean) / (n + _SHRINK)
            tap_var[cls] = (n * cls_var + _SHRINK * global_var) / (n + _SHRINK)
        means.append(tap_mean)
        scales.append(np.sqrt(tap_var) + floor[None, :])
    return np.concatenate(means, axis=1).astype(np.float32), np.concatenate(scales, axis=1).astype(np.float32)


def compromise_threshold(z: np.ndarray, active: np.ndarray, quantile: float = 0.999, minimum: float = 3.0) -> float:
    """k: a channel is compromised above the `quantile` of clean z over active channels, and never below `minimum`."""
    values = z[:, active]
    return float(max(minimum, np.quantile(values, quantile))) if values.size else minimum


def score_threshold(scores: np.ndarray, disagree: np.ndarray, fpr: float) -> float:
    """τ: the lowest threshold at which a fresh clean request is flagged (score > τ or disagreement) with probability
    at most `fpr`.

    This is the split-conformal quantile: with n held-out samples, at most n - ceil((n + 1)(1 - fpr)) of them may
    lie above τ. Allowing floor(fpr * n), the plain empirical quantile, flags (floor(fpr * n) + 1) / (n + 1) of fresh
    requests on average, 5.3% instead of 5% at n = 300; guard's own eval saw 5.1-6.0% on clean models.
    """
    if not 0 < fpr < 1:
        raise ValueError(f"the target false-positive rate must lie in (0, 1), got {fpr}")
    n = len(scores)
    allowed = max(0, n - math.ceil((n + 1) * (1 - fpr) - 1e-9))
    always = int(disagree.sum())
    by_score = np.sort(scores[~disagree])[::-1]
    extra = max(0, allowed - always)  # how many agreeing samples may still be flagged by their score
    if extra >= len(by_score):
        return float(by_score[-1]) - 1e-6 if len(by_score) else 0.0
    return float(by_score[extra])
