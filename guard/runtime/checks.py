"""The per-request neuron consistency check (LinkBreaker-style; guard's reconstruction of Chen et al., TIFS 2022).

A request's per-channel ℓ∞ is compared with the clean profile of the class the model predicted: z_j = (ℓ∞_j − μ_ŷj)
/ s_ŷj. Channels with z above k form the compromised set C(x). The score looks at one or more parts (groups of
channels): each part's raw score is the mean of its q largest z, standardised by that part's clean median and
spread, and the score is the largest of them. Calibration calls this function; serving runs the same arithmetic as
ONNX ops inside the served graph (guard.model.serving), tested to agree with it, so the thresholds calibrated
offline mean the same online.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class CheckResult:
    """Per-sample outcome of the consistency check."""

    score: np.ndarray  # (N,) float32, higher = less like the clean profile of the predicted class
    z: np.ndarray  # (N, C_total) float32, per-channel z against the predicted class (0 where inactive)
    compromised: np.ndarray  # (N, C_total) bool, channels whose z exceeds k


@dataclass(frozen=True)
class ScorePart:
    """A group of channels the score looks at on its own. A trigger spread over the whole image barely moves single
    conv channels but shifts the penultimate features; in the top-q over all channels those shifts drown among the
    conv channels' clean outliers, so the dense taps also form a part of their own."""

    channels: np.ndarray  # (C_part,) int64 indices into the concatenated channels
    centre: float = 0.0  # median of the part's raw score on clean requests (cross-fitted)
    spread: float = 1.0  # 95th percentile minus that median: a part's score above 1 is rarer than 1 in 20 clean

    def raw(self, z: np.ndarray, top_q: int) -> np.ndarray:
        """(N,) mean of the part's top_q z values (all of them where the part has fewer)."""
        part = z[:, self.channels]
        q = min(top_q, part.shape[1])
        return np.partition(part, part.shape[1] - q, axis=1)[:, -q:].mean(axis=1, dtype=np.float32)

    def standardised(self, z: np.ndarray, top_q: int) -> np.ndarray:
        return ((self.raw(z, top_q) - np.float32(self.centre)) / np.float32(self.spread)).astype(np.float32)


@dataclass
class ConsistencyCheck:
    """Per-class ℓ∞ profiles over all tapped channels, concatenated across taps in tap order."""

    class_mean: np.ndarray  # (K, C_total)
    class_scale: np.ndarray  # (K, C_total), strictly positive
    active: np.ndarray  # (C_total,) bool: channels that take part (observable in the served graph)
    top_q: int
    k: float
    cut: float  # z above which the benign re-prediction zeroes a channel of a tap without unit bounds
    parts: tuple[ScorePart, ...] = ()  # () = one unstandardised part over all channels (profiles before parts)

    def score_parts(self) -> tuple[ScorePart, ...]:
        return self.parts or (ScorePart(np.arange(len(self.active), dtype=np.int64)),)

    def score(self, z: np.ndarray) -> np.ndarray:
        """(N,) the largest standardised part score of each sample's z."""
        return np.max([part.standardised(z, self.top_q) for part in self.score_parts()], axis=0)

    def z_scores(self, linf: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """(N, C_total) standardised ℓ∞ against each sample's predicted class; inactive channels are 0."""
        z = (linf - self.class_mean[labels]) / self.class_scale[labels]
        return np.where(self.active[None, :], z, 0.0).astype(np.float32)

    def __call__(self, linf: list[np.ndarray] | np.ndarray, labels: np.ndarray) -> CheckResult:
        flat = np.concatenate(linf, axis=1) if isinstance(linf, list) else linf
        z = self.z_scores(flat, labels)
        return CheckResult(score=self.score(z), z=z, compromised=z > self.k)


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
