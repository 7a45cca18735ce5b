"""Choosing the static mask: prune infected-looking channels while clean accuracy stays within a budget.

Candidates are channels outside each tap's benign set (low benign salience: the benign task barely uses them). They
are pruned in order of rising salience (share of their tap's total), and the longest prefix whose held-out accuracy
stays within `budget` of the unpruned model is kept.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


@dataclass
class MaskChoice:
    keep: list[np.ndarray]  # per tap, (C,) bool
    accuracy_before: float
    accuracy_after: float
    pruned: int
    candidates: int


def candidate_order(salience: list[np.ndarray], benign: list[np.ndarray],
                    peakedness: list[np.ndarray]) -> list[tuple[int, int]]:
    """(tap, channel) pairs outside the benign sets, least salient first; ties go to the more peaked channel."""
    pairs = []
    for tap, (bs, inside, peak) in enumerate(zip(salience, benign, peakedness, strict=True)):
        share = bs / bs.sum() if bs.sum() > 0 else np.zeros_like(bs)
        pairs += [(float(share[c]), -float(peak[c]), tap, int(c)) for c in np.flatnonzero(~inside)]
    return [(tap, channel) for _, _, tap, channel in sorted(pairs)]


def choose_static_mask(order: list[tuple[int, int]], channels: list[int], accuracy: Callable[[list[np.ndarray]], float],
                       budget: float) -> MaskChoice:
    """Binary search for the longest prefix of `order` whose accuracy drop is at most `budget`."""

    def keep_for(count: int) -> list[np.ndarray]:
        keep = [np.ones(c, dtype=bool) for c in channels]
        for tap, channel in order[:count]:
            keep[tap][channel] = False
        return keep

    before = accuracy(keep_for(0))
    scores = {0: before}
    low, high = 0, len(order)
    while low < high:
        middle = (low + high + 1) // 2
        scores[middle] = accuracy(keep_for(middle))
        if scores[middle] >= before - budget:
            low = middle
        else:
            high = middle - 1
    return MaskChoice(keep=keep_for(low), accuracy_before=before, accuracy_after=scores[low], pruned=low,
                      candidates=len(order))
