"""Benign salience (Fan et al., arXiv 2208.06537; the formula here is guard's reconstruction).

BS_j = E |sum over space of A_j * dL/dA_j| estimates, to first order, how much the clean loss would change if channel
j were removed. Channels the benign task needs have high salience; a backdoor's channels, idle on clean data, low.
"""

from __future__ import annotations

import numpy as np


def benign_salience(per_sample: np.ndarray) -> np.ndarray:
    """Mean over samples of the per-sample first-order terms (N, C) -> (C,)."""
    return per_sample.mean(axis=0)


def benign_set(salience: np.ndarray, share: float = 0.99) -> np.ndarray:
    """The smallest set of channels whose salience covers `share` of the layer's total (bool mask, (C,))."""
    order = np.argsort(-salience, kind="stable")
    total = salience.sum()
    benign = np.zeros(salience.shape, dtype=bool)
    if total <= 0:
        return ~benign
    covered = np.cumsum(salience[order]) / total
    count = int(np.searchsorted(covered, share) + 1)
    # Rounding can leave the cumulative share a hair below 1.0: never let a channel without salience in.
    count = min(count, int((salience > 0).sum()))
    benign[order[:count]] = True
    return benign
