"""ℓ∞ activation statistics (Cheng et al., arXiv 2002.12162).

A backdoor shows in the spatial maximum of a channel's activation map far more than in its mean, so the reference
for "normal" is the distribution of per-channel ℓ∞ on clean data.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

_EPS = 1e-6


@dataclass
class LinfStats:
    """Per-channel statistics of ℓ∞ over clean data, each of shape (C,)."""

    mean: np.ndarray
    std: np.ndarray
    p99: np.ndarray
    p999: np.ndarray
    peakedness: np.ndarray  # mean of ℓ∞ / spatial mean: high for channels that fire on small spots


def linf_stats(linf: np.ndarray, spatial_mean: np.ndarray) -> LinfStats:
    """Summarise per-sample ℓ∞ (N, C) and spatial means (N, C) of one tap."""
    return LinfStats(
        mean=linf.mean(axis=0),
        std=linf.std(axis=0),
        p99=np.quantile(linf, 0.99, axis=0),
        p999=np.quantile(linf, 0.999, axis=0),
        peakedness=(linf / (np.abs(spatial_mean) + _EPS)).mean(axis=0),
    )


# ℓ∞-gap pruning (section 1, [reconstructed]): with a candidate trigger, prune the channels it lifts most.

DEFAULT_SUCCESS_BOUND = 0.1  # stop once the candidate trigger sends fewer than this share of images to its target
DEFAULT_ACC_BUDGET = 0.01  # absolute clean accuracy the pruning may cost on the held-out split


@dataclass
class GapPruning:
    """Which channels the ℓ∞-gap pruning zeroes, and what it bought."""

    keep: list[np.ndarray]  # per tap, (C,) bool: False = pruned
    gap: list[np.ndarray]  # per tap, (C,): E ℓ∞(x ⊕ t) − E ℓ∞(x)
    pruned: int
    success_before: float
    success_after: float
    accuracy_before: float
    accuracy_after: float
    stopped: str  # "success": below the bound; "budget": the next channel cost too much; "exhausted"


def linf_gap(clean: list[np.ndarray], triggered: list[np.ndarray]) -> list[np.ndarray]:
    """Per tap, (C,) mean ℓ∞ with the trigger minus mean ℓ∞ without, from (N, C) summaries of each."""
    return [t.mean(axis=0) - c.mean(axis=0) for c, t in zip(clean, triggered, strict=True)]


def gap_order(gap: list[np.ndarray], clean: list[np.ndarray] | None = None) -> list[tuple[int, int]]:
    """(tap, channel) pairs with a positive gap, largest first.

    Taps differ in scale, so with several taps each gap is divided by its tap's mean clean ℓ∞ (from `clean`, the
    (N, C) summaries) before they are compared; the order within a tap is the raw gap's order either way.
    """
    pairs = []
    for tap, values in enumerate(gap):
        scale = 1.0
        if clean is not None and len(gap) > 1:
            scale = max(float(clean[tap].mean()), _EPS)
        pairs += [(-float(values[c]) / scale, tap, int(c)) for c in np.flatnonzero(values > 0)]
    return [(tap, channel) for _, tap, channel in sorted(pairs)]


def prune_by_gap(order: list[tuple[int, int]], channels: list[int],
                 accuracy: Callable[[list[np.ndarray]], float], success: Callable[[list[np.ndarray]], float], *,
                 gap: list[np.ndarray] | None = None, success_bound: float = DEFAULT_SUCCESS_BOUND,
                 budget: float = DEFAULT_ACC_BUDGET, max_pruned: int | None = None) -> GapPruning:
    """Zero channels one at a time in `order` until the trigger's success falls below `success_bound`.

    `accuracy(keep)` and `success(keep)` evaluate the model with per-tap keep masks (held-out clean accuracy and
    the candidate trigger's success rate). A channel whose pruning would cost more than `budget` of accuracy ends
    the search without being pruned: greedy and in order, so the result is the longest prefix of `order` that
    stays within the budget (or the shortest that defeats the trigger). `max_pruned` caps the prefix length.
    """
    keep = [np.ones(c, dtype=bool) for c in channels]
    accuracy_before = accuracy_now = accuracy(keep)
    success_before = success_now = success(keep)
    limit = len(order) if max_pruned is None else min(max_pruned, len(order))
    pruned, stopped = 0, "exhausted"
    for tap, channel in order[:limit]:
        if success_now < success_bound:
            break
        trial = [k.copy() for k in keep]
        trial[tap][channel] = False
        trial_accuracy = accuracy(trial)
        if trial_accuracy < accuracy_before - budget:
            stopped = "budget"
            break
        keep, accuracy_now, pruned = trial, trial_accuracy, pruned + 1
        success_now = success(keep)
    if success_now < success_bound:
        stopped = "success"
    return GapPruning(
        keep=keep, gap=gap if gap is not None else [np.zeros(c) for c in channels],
        pruned=pruned, success_before=success_before, success_after=success_now,
        accuracy_before=accuracy_before, accuracy_after=accuracy_now, stopped=stopped,
    )
