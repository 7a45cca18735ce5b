"""The per-request neuron consistency check (LinkBreaker-style; guard's reconstruction of Chen et al., TIFS 2022).

A request's per-channel ℓ∞ is compared with the clean profile of the class the model predicted: z_j = (ℓ∞_j − μ_ŷj)
/ s_ŷj. Channels with z above k form the compromised set C(x). The score looks at one or more parts (groups of
channels): a part's raw score is the mean of its q largest z (all taps), or the Mahalanobis distance from the
class's mean (the penultimate features), standardised by that part's clean median and spread, and the score is the
largest of them. Calibration calls this function; serving runs the same arithmetic as ONNX ops inside the served graph
(guard.model.serving), tested to agree with it, so the thresholds calibrated offline mean the same online.

One part looks at the request itself rather than at the model: `InputEnvelope`, how far its pixels rise above the
largest value clean samples gave each of them. The guard scores it beside the served graph.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np


@dataclass
class CheckResult:
    """Per-sample outcome of the consistency check."""

    score: np.ndarray  # (N,) float32, higher = less like the clean profile of the predicted class
    demote_score: np.ndarray  # (N,) float32, the same over the parts that demote (the score itself where all do)
    z: np.ndarray  # (N, C_total) float32, per-channel z against the predicted class (0 where inactive)
    compromised: np.ndarray  # (N, C_total) bool, channels whose z exceeds k


class _Standardised(ABC):
    """A part's raw score in clean units: minus its clean median, over its clean spread (95th percentile minus the
    median), both cross-fitted. On this scale the parts' tails are alike, so the maximum over parts lets none of them
    dominate by its units alone.

    A part that does not demote only flags: the demote thresholds are quantiles of the score over the demoting parts,
    so that a part whose clean tail is long (the first conv layer's) adds detection without raising them."""

    centre: float
    spread: float
    demotes: bool

    @abstractmethod
    def raw(self, linf: np.ndarray, z: np.ndarray, labels: np.ndarray, top_q: int) -> np.ndarray:
        """(N,) the part's score in its own units, from the flat ℓ∞, its z and the predicted classes."""

    def standardised(self, linf: np.ndarray, z: np.ndarray, labels: np.ndarray, top_q: int) -> np.ndarray:
        raw = self.raw(linf, z, labels, top_q)
        return ((raw - np.float32(self.centre)) / np.float32(self.spread)).astype(np.float32)


@dataclass(frozen=True)
class ScorePart(_Standardised):
    """The mean of the q largest z over a group of channels: a trigger that drives a few channels far out of their
    class's profile."""

    channels: np.ndarray  # (C_part,) int64 indices into the concatenated channels
    centre: float = 0.0
    spread: float = 1.0
    demotes: bool = True

    def raw(self, linf: np.ndarray, z: np.ndarray, labels: np.ndarray, top_q: int) -> np.ndarray:
        return self.top_mean(z, top_q)

    def top_mean(self, z: np.ndarray, top_q: int) -> np.ndarray:
        """(N,) mean of the part's top_q z values (all of them where the part has fewer)."""
        part = z[:, self.channels]
        q = min(top_q, part.shape[1])
        return np.partition(part, part.shape[1] - q, axis=1)[:, -q:].mean(axis=1, dtype=np.float32)


@dataclass(frozen=True)
class DistancePart(_Standardised):
    """The Mahalanobis distance of a group of channels' ℓ∞ from the predicted class's mean, under a covariance the
    classes share. A trigger spread over the whole image (blend, warp) moves no single channel far; it shifts the
    penultimate features together, in a direction clean variation does not take, which per-channel z values miss and
    a distance that knows the features' correlations sees."""

    channels: np.ndarray  # (D,) int64 indices into the concatenated channels
    class_mean: np.ndarray  # (K, D) float32
    whiten: np.ndarray  # (D, D) float32: the distance is the norm of (ℓ∞ − μ_ŷ) @ whiten
    centre: float = 0.0
    spread: float = 1.0
    demotes: bool = True

    def raw(self, linf: np.ndarray, z: np.ndarray, labels: np.ndarray, top_q: int) -> np.ndarray:
        return self.distance(linf, labels)

    def distance(self, linf: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """(N,) the distance of each sample (flat ℓ∞) from its predicted class's mean."""
        centred = linf[:, self.channels].astype(np.float32) - self.class_mean[labels]
        return np.sqrt(np.square(centred @ self.whiten).sum(axis=1, dtype=np.float32)).astype(np.float32)


Part = ScorePart | DistancePart


@dataclass(frozen=True)
class InputEnvelope:
    """How far a request's pixels rise above the largest value each pixel took on the clean samples, summed. A stamp
    (a bright patch, a blended pattern) where clean images are dark lies outside that envelope whether or not it
    took, and before the model has mixed it with anything. Its clean tail is not the check's demote thresholds'
    business: past a threshold of its own (`Thresholds.envelope_demote`) it demotes an answer the re-prediction kept."""

    bound: np.ndarray  # (C, H, W) float32, the largest clean value of each input element
    centre: float = 0.0
    spread: float = 1.0

    def raw(self, x: np.ndarray) -> np.ndarray:
        """(N,) the sum of each sample's excess over the bound; inf for inputs near float32's limit (flagged)."""
        with np.errstate(over="ignore"):
            excess = np.maximum(x - self.bound[None], np.float32(0))
            return excess.reshape(len(x), -1).sum(axis=1, dtype=np.float32)

    def standardised(self, x: np.ndarray) -> np.ndarray:
        return ((self.raw(x) - np.float32(self.centre)) / np.float32(self.spread)).astype(np.float32)


@dataclass
class ConsistencyCheck:
    """Per-class ℓ∞ profiles over all tapped channels, concatenated across taps in tap order."""

    class_mean: np.ndarray  # (K, C_total)
    class_scale: np.ndarray  # (K, C_total), strictly positive
    active: np.ndarray  # (C_total,) bool: channels that take part (observable in the served graph)
    top_q: int
    k: float
    cut: float  # z above which the benign re-prediction zeroes a channel of a tap without unit bounds
    parts: tuple[Part, ...] = ()  # () = one unstandardised top-q part over all channels (profiles before parts)

    def score_parts(self) -> tuple[Part, ...]:
        return self.parts or (ScorePart(np.arange(len(self.active), dtype=np.int64)),)

    def score(self, linf: np.ndarray, z: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """(N,) the largest standardised part score of each sample (flat ℓ∞, its z, its predicted class)."""
        return np.max(self._part_scores(linf, z, labels), axis=0)

    def _part_scores(self, linf: np.ndarray, z: np.ndarray, labels: np.ndarray) -> list[np.ndarray]:
        return [part.standardised(linf, z, labels, self.top_q) for part in self.score_parts()]

    def z_scores(self, linf: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """(N, C_total) standardised ℓ∞ against each sample's predicted class; inactive channels are 0."""
        z = (linf - self.class_mean[labels]) / self.class_scale[labels]
        return np.where(self.active[None, :], z, 0.0).astype(np.float32)

    def __call__(self, linf: list[np.ndarray] | np.ndarray, labels: np.ndarray) -> CheckResult:
        flat = np.concatenate(linf, axis=1) if isinstance(linf, list) else linf
        z = self.z_scores(flat, labels)
        scores = self._part_scores(flat, z, labels)
        return CheckResult(score=np.max(scores, axis=0), demote_score=demoting_max(scores, self.score_parts()), z=z,
                           compromised=z > self.k)


def demoting_max(scores: list[np.ndarray], parts: tuple[Part, ...]) -> np.ndarray:
    """(N,) the largest of the standardised `scores` (one per part) of the parts that demote."""
    return np.max([score for score, part in zip(scores, parts, strict=True) if part.demotes], axis=0)


def repredict_masks(keep: list[np.ndarray], bounds: list[np.ndarray | None], z: np.ndarray,
                    cut: float) -> list[np.ndarray]:
    """Per-tap (N, C) float channel masks for the benign re-prediction of samples with z scores `z`.

    At conv taps with unit bounds the link is cut in the graph (units above their clean maximum are zeroed), so the
    mask there only repeats the static mask: zeroing high-z conv channels as well was measured to erase the true
    class's evidence too. At taps without unit bounds (the penultimate features) each sample's channels with z above
    `cut` are zeroed; the backdoor's features there sit well above the predicted class's profile.
    """
    masks, start = [], 0
    for tap_keep, bound in zip(keep, bounds, strict=True):
        stop = start + len(tap_keep)
        if bound is None:
            masks.append((tap_keep[None, :] & ~(z[:, start:stop] > cut)).astype(np.float32))
        else:
            masks.append(np.repeat(tap_keep[None, :].astype(np.float32), len(z), axis=0))
        start = stop
    return masks
