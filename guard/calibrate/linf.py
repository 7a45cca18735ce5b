"""ℓ∞ activation statistics (Cheng et al., arXiv 2002.12162).

A backdoor shows in the spatial maximum of a channel's activation map far more than in its mean, so the reference
for "normal" is the distribution of per-channel ℓ∞ on clean data.
"""

from __future__ import annotations

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
