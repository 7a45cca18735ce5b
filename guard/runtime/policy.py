"""What the guard does with a flagged request: `monitor` reports it, `enforce` answers with the benign re-prediction."""

from __future__ import annotations

from enum import Enum

import numpy as np


class Policy(str, Enum):
    MONITOR = "monitor"  # answer as the (statically masked) model did; flag only
    ENFORCE = "enforce"  # flagged samples get the answer of the model restricted to their benign neurons


class FailurePolicy(str, Enum):
    """What the guard does when its own check fails (an engine error, or the check over its time budget)."""

    CLOSED = "closed"  # refuse the request: nothing unchecked reaches the caller
    OPEN = "open"  # answer with the unguarded model, mark the answer unchecked, and count it


def apply_policy(policy: Policy, logits: np.ndarray, benign_logits: np.ndarray, flagged: np.ndarray) -> np.ndarray:
    """The logits to answer with, one row per sample."""
    if policy is Policy.MONITOR:
        return logits
    return np.where(flagged[:, None], benign_logits, logits)
