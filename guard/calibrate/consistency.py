"""Per-class consistency profiles and the check's thresholds, calibrated on clean data only."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from guard.runtime.checks import CheckResult, ConsistencyCheck, DistancePart, InputEnvelope, ScorePart

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


def out_of_fold(check: ConsistencyCheck, linf: list[np.ndarray], labels: np.ndarray, num_classes: int,
                folds: int, seed: int) -> CheckResult:
    """The check's result for every calibration sample against class profiles fit without it (K-fold cross-fitting).

    k and τ are then chosen on all the clean samples, on scores distributed like a fresh request's: a sample scored
    against profiles that include it looks cleaner than it is.
    """
    flat = np.concatenate(linf, axis=1)
    fold_of = _folds(len(labels), folds, seed)
    score, demote_score = np.empty(len(labels), dtype=np.float32), np.empty(len(labels), dtype=np.float32)
    z = np.empty(flat.shape, dtype=np.float32)
    for fold in range(folds):
        out = fold_of == fold
        mean, scale = class_profiles([tap[~out] for tap in linf], labels[~out], num_classes)
        part = replace(check, class_mean=mean, class_scale=scale)(flat[out], labels[out])
        score[out], demote_score[out], z[out] = part.score, part.demote_score, part.z
    return CheckResult(score=score, demote_score=demote_score, z=z, compromised=z > check.k)


def _folds(n: int, folds: int, seed: int) -> np.ndarray:
    """The fold of each of n samples: the same assignment for every cross-fitted quantity of one calibration."""
    return np.random.default_rng(seed).permutation(n) % folds


def part_scale(raw: np.ndarray, quantile: float = 0.95) -> tuple[float, float]:
    """A part's clean centre (median) and spread (the `quantile` minus the median; 1 where that is not positive, a
    part that never varies on clean data keeps its raw units)."""
    centre = float(np.median(raw))
    spread = float(np.quantile(raw, quantile)) - centre
    return centre, spread if spread > 1e-6 else 1.0


def fit_parts(z: np.ndarray, groups: list[np.ndarray], top_q: int) -> tuple[ScorePart, ...]:
    """Top-q score parts over the channel `groups`, each standardised on clean z (cross-fitted)."""
    parts = []
    for group in groups:
        channels = np.asarray(group, dtype=np.int64)
        parts.append(ScorePart(channels, *part_scale(ScorePart(channels).top_mean(z, top_q))))
    return tuple(parts)


def class_gaussian(values: np.ndarray, labels: np.ndarray, num_classes: int,
                   shrink: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-class means (K, D) and a whitening matrix (D, D) for the covariance the classes share.

    Class means borrow strength from the all-class mean like `class_profiles` does. The pooled within-class
    covariance is shrunk toward its average variance times the identity by `shrink` (a few hundred samples in tens of
    dimensions leave the smallest eigenvalues noisy, and the distance divides by them); whiten = L⁻ᵀ for its
    Cholesky factor L, so that ‖(x − μ) @ whiten‖² = (x − μ)ᵀ Σ⁻¹ (x − μ).
    """
    values = np.asarray(values, dtype=np.float64)
    overall = values.mean(axis=0)
    means = np.empty((num_classes, values.shape[1]))
    for cls in range(num_classes):
        rows = values[labels == cls]
        means[cls] = (rows.sum(axis=0) + _SHRINK * overall) / (len(rows) + _SHRINK)
    residual = values - means[labels]
    covariance = residual.T @ residual / max(len(values) - 1, 1)
    dim = covariance.shape[0]
    average = np.trace(covariance) / dim if dim else 0.0
    average = average if average > 1e-12 else 1.0  # a group that never varied: unit distances, still finite
    covariance = (1 - shrink) * covariance + (shrink * average + 1e-9 * average) * np.eye(dim)
    cholesky = np.linalg.cholesky(covariance)
    whiten = np.linalg.inv(cholesky).T
    return means.astype(np.float32), whiten.astype(np.float32)


def fit_distance_part(flat: np.ndarray, labels: np.ndarray, channels: np.ndarray, num_classes: int, *,
                      shrink: float, folds: int, seed: int) -> tuple[DistancePart, np.ndarray]:
    """A distance part over `channels` of the flat ℓ∞, and its standardised cross-fitted score of every sample.

    The means and covariance come from all samples; the centre and spread, and the scores returned for choosing τ,
    from each sample's distance to a Gaussian fit on the other folds, as a fresh request's would be.
    """
    channels = np.asarray(channels, dtype=np.int64)
    values = flat[:, channels]
    fold_of = _folds(len(labels), folds, seed)
    raw = np.empty(len(labels), dtype=np.float32)
    for fold in range(folds):
        out = fold_of == fold
        means, whiten = class_gaussian(values[~out], labels[~out], num_classes, shrink)
        raw[out] = DistancePart(channels, means, whiten).distance(flat[out], labels[out])
    means, whiten = class_gaussian(values, labels, num_classes, shrink)
    part = DistancePart(channels, means, whiten, *part_scale(raw))
    return part, ((raw - np.float32(part.centre)) / np.float32(part.spread)).astype(np.float32)


_ENVELOPE_CHUNK = 1 << 14  # input elements per block of the leave-one-out scores


def fit_envelope(x: np.ndarray, *, quantile: float) -> tuple[InputEnvelope, np.ndarray]:
    """The input envelope of the samples `x` (bound: each element's largest value), and its standardised
    leave-one-out score of every sample: its excess over the bound of all the other samples, as a fresh request's is
    over the bound of all of them (against its own bound every sample scores 0). Its spread is its clean `quantile`
    minus its median.

    Leave-one-out rather than K folds: a sample exceeds the others' bound only on the elements where it alone is
    the largest, by its lead over the runner-up, so the scores are exact, need no fold assignment, and do not count
    against each other two lookalikes that K-fold cross-fitting happened to put in one fold (docs/design.md, "The
    envelope's clean scores leave one out")."""
    if len(x) < 2:
        raise ValueError(f"the input envelope needs at least 2 samples, got {len(x)}")
    flat = x.reshape(len(x), -1)
    raw = np.zeros(len(x), dtype=np.float32)
    bound = np.empty(flat.shape[1], dtype=x.dtype)
    for start in range(0, flat.shape[1], _ENVELOPE_CHUNK):  # a bounded copy for np.partition
        block = flat[:, start:start + _ENVELOPE_CHUNK]
        runner_up, largest = np.partition(block, len(x) - 2, axis=0)[-2:]
        np.add.at(raw, block.argmax(axis=0), largest - runner_up)
        bound[start:start + _ENVELOPE_CHUNK] = largest
    part = InputEnvelope(bound.reshape(x.shape[1:]), *part_scale(raw, quantile))
    return part, ((raw - np.float32(part.centre)) / np.float32(part.spread)).astype(np.float32)


def allowed_above(n: int, fpr: float, confidence: float) -> int:
    """How many of n clean calibration samples may lie above τ so that a fresh clean request is flagged with
    probability at most `fpr`, with chance `confidence` over the draw of the calibration samples.

    τ is then the (a + 1)-th highest clean score, and the fresh false-positive rate exceeds `fpr` exactly when at most
    a of the n samples lie above the clean (1 - fpr) quantile: a Binomial(n, fpr) event. The largest a whose
    probability is at most 1 - confidence is taken; 0 when even a = 0 is too likely (too few samples). At confidence
    0.5 the rate is about the target on average (a equals the split-conformal n - ceil((n + 1)(1 - fpr)) at
    n = 200, 300 and 1,000 for fpr = 5%); at 0.9 it is 4.1% on average at n = 1,000, and above 5% for one calibration
    in ten.
    """
    if not 0 < fpr < 1:
        raise ValueError(f"the target false-positive rate must lie in (0, 1), got {fpr}")
    if not 0 < confidence < 1:
        raise ValueError(f"the confidence must lie in (0, 1), got {confidence}")
    counts = np.arange(n + 1)
    log_pmf = (math.lgamma(n + 1) - np.array([math.lgamma(c + 1) + math.lgamma(n - c + 1) for c in counts])
               + counts * math.log(fpr) + (n - counts) * math.log1p(-fpr))
    cdf = np.cumsum(np.exp(log_pmf))
    within = np.flatnonzero(cdf <= 1 - confidence)
    return int(within[-1]) if within.size else 0


def samples_to_bound(rate: float, confidence: float) -> int:
    """The fewest clean samples with which `allowed_above` bounds `rate` at `confidence` at all; with fewer the
    threshold is the highest clean score, and the rate it gives is whatever that turns out to be."""
    return math.ceil(math.log1p(-confidence) / math.log1p(-rate))


def score_threshold(scores: np.ndarray, disagree: np.ndarray, fpr: float, confidence: float = 0.5) -> float:
    """τ: the lowest threshold at which a fresh clean request is flagged (score > τ or disagreement) with probability
    at most `fpr`, with chance `confidence` (see `allowed_above`).

    Disagreements count as above τ whatever their score. The plain empirical quantile, allowing ⌊fpr · n⌋ samples
    above, flags (⌊fpr · n⌋ + 1) / (n + 1) of fresh requests on average: 5.3% instead of 5% at n = 300.
    """
    allowed = allowed_above(len(scores), fpr, confidence)
    always = int(disagree.sum())
    by_score = np.sort(scores[~disagree])[::-1]
    extra = max(0, allowed - always)  # how many agreeing samples may still be flagged by their score
    if extra >= len(by_score):
        return float(by_score[-1]) - 1e-6 if len(by_score) else 0.0
    return float(by_score[extra])


def demote_threshold(scores: np.ndarray, disagree: np.ndarray, tau: float, rate: float,
                     confidence: float = 0.5) -> float:
    """The score above which the guard refuses a request's own class: the lowest threshold (never below τ) at which a
    fresh clean request is demoted with probability at most `rate`, with chance `confidence`; inf when `rate` is 0.

    Only requests whose benign re-prediction agrees with the model are demoted (the others are answered differently
    already), so only those count against the rate.
    """
    if rate == 0:
        return math.inf
    allowed = allowed_above(len(scores), rate, confidence)
    by_score = np.sort(scores[~disagree])[::-1]
    if allowed >= len(by_score):
        return tau
    return max(tau, float(by_score[allowed]))


def confirm_ceiling(scores: np.ndarray, disagree: np.ndarray, tau: float) -> float:
    """The score above which the reference's confirmation spares no demotion: the highest score of a clean request
    that agrees with its re-prediction (never below τ). Past it, the request is stranger than any clean one, and a
    trigger the reference did not unlearn is as likely a reason for its agreement as the answer being right."""
    agreeing = scores[~disagree & np.isfinite(scores)]
    return max(tau, float(agreeing.max())) if agreeing.size else tau


def suspect_threshold(scores: np.ndarray, disagree: np.ndarray, suspected: np.ndarray, tau: float, demote: float,
                      rate: float, confidence: float) -> float:
    """The demote threshold of the `suspected` samples' class (the scan's suspect): `demote_threshold` over them
    alone. Where too few of them agree with their re-prediction to bound `rate` with `confidence` (fewer than 45 at
    5% and 0.9), the general threshold `demote` stands, whose rate is bounded over all samples; inf when `demote` is
    (demotion off)."""
    if math.isinf(demote):
        return math.inf
    if (1 - rate) ** int((suspected & ~disagree).sum()) > 1 - confidence:
        return demote
    return demote_threshold(scores[suspected], disagree[suspected], tau, rate, confidence)
