"""What the guard does with a flagged request: `monitor` reports it, `enforce` answers with the benign re-prediction."""

from __future__ import annotations

from enum import Enum

import numpy as np


class Policy(str, Enum):
    MONITOR = "monitor"  # answer as the (statically masked) model did; flag only
    ENFORCE = "enforce"  # flagged samples get the answer of the model restricted to their benign neurons


def apply_policy(policy: Policy, logits: np.ndarray, benign_logits: np.ndarray, flagged: np.ndarray) -> np.ndarray:
    """The logits to answer with, one row per sample."""
    if policy is Policy.MONITOR:
        return logits
    return np.where(flagged[:, None], benign_logits, logits)
