"""What the guard does with a flagged request: `monitor` reports it, `enforce` answers with the benign re-prediction,
or, for a request far outside its class's profile, with the best class other than the model's own; and with a
request its reference firmly disagrees with: `enforce` answers with the reference."""

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


def margin(logits: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """Per row, how far the logit of `classes` lies above the best other class's."""
    rows = np.arange(len(logits))
    others = logits.copy()
    others[rows, classes] = -np.inf
    return logits[rows, classes] - others.max(axis=1)


def demotions(logits: np.ndarray, benign_logits: np.ndarray, labels: np.ndarray, extreme: np.ndarray,
              suspected: np.ndarray) -> np.ndarray:
    """The rows to demote. Of the `extreme` rows (past the demote threshold, re-prediction agreeing with the model's
    `labels`), those where cutting the out-of-profile features narrowed the answer's margin, so they were holding it
    up; where they pushed towards another class (a trigger that did not take), the runner-up is often the attacker's
    target, and the model's own answer is the safer one. The `suspected` rows (answered with the scan's suspected
    target, past its own threshold) are demoted whatever the margin: the class refused is the target itself."""
    demoted = extreme.copy()
    rows = np.flatnonzero(extreme)
    demoted[rows] = margin(benign_logits[rows], labels[rows]) < margin(logits[rows], labels[rows])
    return demoted | suspected


def apply_policy(policy: Policy, logits: np.ndarray, benign_logits: np.ndarray, flagged: np.ndarray,
                 demoted: np.ndarray) -> np.ndarray:
    """The logits to answer with, one row per sample. A demoted row's own class (the model's answer) gets a logit
    just below the row's smallest, so the answer is the runner-up and the other classes keep their order."""
    if policy is Policy.MONITOR:
        return logits
    answer = np.where(flagged[:, None], benign_logits, logits)
    rows = np.flatnonzero(demoted)
    if rows.size:
        own = logits[rows].argmax(axis=1)
        answer[rows, own] = np.nextafter(answer[rows].min(axis=1), -np.inf)
    return answer


def overrule(policy: Policy, answer: np.ndarray, reference_logits: np.ndarray, overruled: np.ndarray) -> np.ndarray:
    """Under `enforce`, the `overruled` rows answer with the reference's logits, whatever the check made of them: the
    reference has lost most of a backdoor that fine-tuning undoes, and a trigger the check missed is one of those."""
    if policy is Policy.MONITOR or not overruled.any():
        return answer
    out = answer.copy()
    out[overruled] = reference_logits[overruled]
    return out
