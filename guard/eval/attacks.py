"""Data-poisoning backdoor attacks used to build the models the guard is evaluated against.

Each attack is a small frozen dataclass with the same two methods: ``apply`` stamps the trigger on a batch and
``poison`` turns a clean training set into a poisoned one (all-to-one: a share of the samples not already of
the target class get the trigger and the target label). Keeping that interface fixed lets the evaluation code
loop over attacks without knowing them, and lets later attacks (WaNet, source-specific, adaptive) slot in by
subclassing :class:`Attack` and writing ``apply``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np

__all__ = ["Attack", "BadNets", "Blend"]


def _check_batch(x: np.ndarray) -> None:
    """Raise ValueError unless ``x`` is a (N, C, H, W) batch."""
    if x.ndim != 4:
        raise ValueError(f"expected a (N, C, H, W) batch, got shape {x.shape}")


@dataclass(frozen=True)
class Attack(ABC):
    """Base of all attacks: subclasses write ``apply``; ``poison`` is shared."""

    @property
    def name(self) -> str:
        """Short lower-case name for reports."""
        return type(self).__name__.lower()

    @abstractmethod
    def apply(self, x: np.ndarray) -> np.ndarray:
        """Return a new (N, C, H, W) batch in [0, 1] with the trigger applied; ``x`` is left untouched."""

    def poison(
        self,
        x: np.ndarray,
        y: np.ndarray,
        rate: float,
        target: int,
        rng: np.random.Generator,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """All-to-one poisoning: trigger ``rate`` of the samples whose label is not ``target``, relabel them.

        ``rate`` is a share of the whole set (``round(rate * len(x))`` samples, capped by how many non-target
        samples exist). Returns new arrays ``(x_poisoned, y_poisoned, poisoned_index)``, the index sorted.
        """
        _check_batch(x)
        if len(x) != len(y):
            raise ValueError(f"x has {len(x)} samples but y has {len(y)}")
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"rate must be in [0, 1], got {rate}")
        candidates = np.flatnonzero(y != target)
        n_poison = min(round(rate * len(x)), len(candidates))
        index = np.sort(rng.choice(candidates, size=n_poison, replace=False)).astype(np.int64)
        x_out = np.array(x, copy=True)
        y_out = np.array(y, copy=True)
        if n_poison:
            x_out[index] = self.apply(x[index])
            y_out[index] = target
        return x_out, y_out, index


@dataclass(frozen=True)
class BadNets(Attack):
    """BadNets (Gu et al., 2017): a ``size`` x ``size`` patch of ``value`` in the bottom-right corner."""

    size: int = 3
    value: float = 1.0

    def __post_init__(self) -> None:
        """Validate the parameters."""
        if self.size < 1:
            raise ValueError(f"size must be >= 1, got {self.size}")
        if not 0.0 <= self.value <= 1.0:
            raise ValueError(f"value must be in [0, 1], got {self.value}")

    def apply(self, x: np.ndarray) -> np.ndarray:
        """Stamp the patch on every channel of every image."""
        _check_batch(x)
        if self.size > min(x.shape[2], x.shape[3]):
            raise ValueError(f"patch size {self.size} does not fit images of shape {x.shape[2:]}")
        out = np.array(x, copy=True)
        out[:, :, -self.size :, -self.size :] = self.value
        return out


@dataclass(frozen=True)
class Blend(Attack):
    """Blended injection (Chen et al., 2017): ``(1 - alpha) * x + alpha * noise`` with a fixed noise image.

    The noise is uniform in [0, 1], drawn from ``seed`` for the input's (C, H, W) shape, so the same attack
    object always blends the same pattern.
    """

    alpha: float = 0.15
    seed: int = 0

    def __post_init__(self) -> None:
        """Validate the parameters."""
        if not 0.0 < self.alpha <= 1.0:
            raise ValueError(f"alpha must be in (0, 1], got {self.alpha}")

    def pattern(self, shape: tuple[int, int, int]) -> np.ndarray:
        """Return the fixed noise image of shape (C, H, W), float32 in [0, 1]."""
        return np.random.default_rng(self.seed).random(shape, dtype=np.float32)

    def apply(self, x: np.ndarray) -> np.ndarray:
        """Blend the noise image over every input."""
        _check_batch(x)
        noise = self.pattern((x.shape[1], x.shape[2], x.shape[3]))
        alpha = np.float32(self.alpha)
        out = (np.float32(1.0) - alpha) * x + alpha * noise
        return np.clip(out, 0.0, 1.0).astype(x.dtype, copy=False)
