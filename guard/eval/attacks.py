"""Data-poisoning backdoor attacks used to build the models the guard is evaluated against.

Each attack is a small frozen dataclass with the same three methods: ``apply`` stamps the trigger on a batch,
``poison`` turns a clean training set into a poisoned one (all-to-one by default: a share of the samples not
already of the target class get the trigger and the target label), and ``victims`` says which evaluation
samples count towards the attack success rate. Keeping that interface fixed lets the evaluation code loop over
attacks without knowing them. ``apply`` takes an optional generator so randomised triggers (:class:`Adaptive`)
can be drawn reproducibly; fixed triggers ignore it. Attacks that also plant label-keeping "cover" samples
(:class:`SourceSpecific`, :class:`WaNet`'s noise mode) expose them through ``poison_with_cover``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["Adaptive", "Attack", "BadNets", "Blend", "SourceSpecific", "WaNet"]


def _check_batch(x: np.ndarray) -> None:
    """Raise ValueError unless ``x`` is a (N, C, H, W) batch."""
    if x.ndim != 4:
        raise ValueError(f"expected a (N, C, H, W) batch, got shape {x.shape}")


def _check_poison_args(x: np.ndarray, y: np.ndarray, rate: float) -> None:
    """Raise ValueError on a malformed batch, mismatched labels or a share outside [0, 1]."""
    _check_batch(x)
    if len(x) != len(y):
        raise ValueError(f"x has {len(x)} samples but y has {len(y)}")
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"rate must be in [0, 1], got {rate}")


def _draw(candidates: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """A sorted int64 random subset of ``n`` of ``candidates`` (all of them if there are fewer)."""
    n = min(n, len(candidates))
    return np.sort(rng.choice(candidates, size=n, replace=False)).astype(np.int64)


def _choose(candidates: np.ndarray, share: float, rng: np.random.Generator) -> np.ndarray:
    """A sorted int64 random subset of ``round(share * len(candidates))`` of ``candidates``."""
    return _draw(candidates, round(share * len(candidates)), rng)


def _check_patch(size: int, value: float) -> None:
    """Validate a square patch's side and grey level."""
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"value must be in [0, 1], got {value}")


def _check_patch_fits(size: int, x: np.ndarray) -> None:
    """Raise ValueError if a ``size`` patch does not fit the images of ``x``."""
    if size > min(x.shape[2], x.shape[3]):
        raise ValueError(f"patch size {size} does not fit images of shape {x.shape[2:]}")


@dataclass(frozen=True)
class Attack(ABC):
    """Base of all attacks: subclasses write ``apply``; ``poison`` and ``victims`` are all-to-one defaults."""

    @property
    def name(self) -> str:
        """Short lower-case name for reports."""
        return type(self).__name__.lower()

    @abstractmethod
    def apply(self, x: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        """Return a new (N, C, H, W) batch in [0, 1] with the trigger applied; ``x`` is left untouched.

        ``rng`` feeds randomised triggers (fixed triggers ignore it), so a caller can redraw them reproducibly.
        """

    def victims(self, y: np.ndarray, target: int) -> np.ndarray:
        """Boolean mask of the evaluation samples whose triggered versions count for attack success.

        All-to-one attacks can only be judged on samples not already of the target class.
        """
        return np.asarray(y) != target

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
        _check_poison_args(x, y, rate)
        index = _draw(np.flatnonzero(y != target), round(rate * len(x)), rng)
        x_out = np.array(x, copy=True)
        y_out = np.array(y, copy=True)
        if len(index):
            x_out[index] = self.apply(x[index], rng)
            y_out[index] = target
        return x_out, y_out, index


@dataclass(frozen=True)
class BadNets(Attack):
    """BadNets (Gu et al., 2017): a ``size`` x ``size`` patch of ``value`` in the bottom-right corner."""

    size: int = 3
    value: float = 1.0

    def __post_init__(self) -> None:
        """Validate the parameters."""
        _check_patch(self.size, self.value)

    def apply(self, x: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        """Stamp the patch on every channel of every image (``rng`` is unused: the trigger is fixed)."""
        _check_batch(x)
        _check_patch_fits(self.size, x)
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

    def apply(self, x: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        """Blend the noise image over every input (``rng`` is unused: the pattern is fixed by ``seed``)."""
        _check_batch(x)
        noise = self.pattern((x.shape[1], x.shape[2], x.shape[3]))
        alpha = np.float32(self.alpha)
        out = (np.float32(1.0) - alpha) * x + alpha * noise
        return np.clip(out, 0.0, 1.0).astype(x.dtype, copy=False)


@dataclass(frozen=True)
class SourceSpecific(Attack):
    """Source-specific BadNets (TaCT-style, Tang et al., 2021): the corner patch flips only class ``source``.

    The same patch on the other non-target classes keeps their labels (cover samples), so the model learns
    "patch and source features", not "patch alone": a defense keyed to a trigger that flips everything, or to
    triggered inputs of any class, misses it. Only triggered source-class images count for attack success.
    """

    size: int = 3
    value: float = 1.0
    source: int = 2
    cover_rate: float = 0.1

    def __post_init__(self) -> None:
        """Validate the parameters."""
        _check_patch(self.size, self.value)
        if self.source < 0:
            raise ValueError(f"source must be a class index >= 0, got {self.source}")
        if not 0.0 <= self.cover_rate <= 1.0:
            raise ValueError(f"cover_rate must be in [0, 1], got {self.cover_rate}")

    @property
    def name(self) -> str:
        """Short lower-case name for reports, as in the evaluation's attack table."""
        return "source-specific"

    def apply(self, x: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        """Stamp the bottom-right patch, as :class:`BadNets` does (``rng`` is unused)."""
        return BadNets(self.size, self.value).apply(x)

    def victims(self, y: np.ndarray, target: int) -> np.ndarray:
        """Only the source class: the patch is meant to leave every other class alone."""
        return np.asarray(y) == self.source

    def poison_with_cover(
        self,
        x: np.ndarray,
        y: np.ndarray,
        rate: float,
        target: int,
        rng: np.random.Generator,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Like :meth:`poison`, also returning the sorted index of the cover samples (patched, label kept)."""
        _check_poison_args(x, y, rate)
        if target == self.source:
            raise ValueError(f"target and source are both {target}: nothing would flip")
        poisoned = _choose(np.flatnonzero(y == self.source), rate, rng)
        cover = _choose(np.flatnonzero((y != self.source) & (y != target)), self.cover_rate, rng)
        x_out = np.array(x, copy=True)
        y_out = np.array(y, copy=True)
        for index in (poisoned, cover):
            if len(index):
                x_out[index] = self.apply(x[index])
        y_out[poisoned] = target
        return x_out, y_out, poisoned, cover

    def poison(
        self,
        x: np.ndarray,
        y: np.ndarray,
        rate: float,
        target: int,
        rng: np.random.Generator,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Patch and relabel ``rate`` of the source class's samples; patch ``cover_rate`` of the rest as cover.

        Unlike the all-to-one :meth:`Attack.poison`, ``rate`` is a share of the source class, not of the whole
        set: a tenth of the whole set would be about all of one class out of ten, more than the class holds.
        ``cover_rate`` is a share of the samples of the classes other than ``source`` and ``target``; they get
        the patch and keep their labels. Returns ``(x_poisoned, y_poisoned, poisoned_index)``, where the index
        holds only the relabelled samples (see :meth:`poison_with_cover` for the cover samples too).
        """
        x_out, y_out, poisoned, _ = self.poison_with_cover(x, y, rate, target, rng)
        return x_out, y_out, poisoned


@dataclass(frozen=True)
class WaNet(Attack):
    """WaNet-style warping trigger (Nguyen & Tran, ICLR 2021): a smooth, fixed, nearly invisible warp.

    A random ``(2, grid_size, grid_size)`` control grid in [-1, 1] (from ``seed``), normalised by its mean
    absolute value, is upsampled bicubically to the image size, scaled by ``strength / image size`` and added
    to the identity sampling grid (in ``grid_sample``'s [-1, 1] coordinates, clamped there). At 28x28 one
    unit of ``strength`` moves pixels by about 0.4 px per axis on average, 1 px at most. Poisoning also adds
    noise-mode samples (``noise_ratio`` times as many as poisoned): the same warp plus a fresh random per-pixel
    jitter, labels kept, which forces the model to learn this exact warp rather than "any warp" or "blurred".

    ``strength`` defaults to 1.0, twice the paper's 0.5, and still hard to see. Measured with 3 epochs of
    ``models.train`` on 20,000 Fashion-MNIST images, noise mode on: the stride-1-stem SmallResNet learned it
    (ASR 0.92-0.99 over 3 seeds at 1.0; 0.84-0.92 over 2 at 0.5; 0.79 at 2.0), while the SmallCNN reaches only
    0.2-0.5 at any strength from 0.5 to 6 (1.0 a little above 0.5) because it cannot yet tell the warp from its
    noise-mode variant. Without noise mode 2.0 gives the CNN 0.9, but then any jittered warp fires the backdoor too.
    Expect the CNN to need longer training for WaNet.
    """

    grid_size: int = 4
    strength: float = 1.0
    seed: int = 0
    noise_ratio: float = 2.0

    def __post_init__(self) -> None:
        """Validate the parameters."""
        if self.grid_size < 2:
            raise ValueError(f"grid_size must be >= 2, got {self.grid_size}")
        if not self.strength > 0.0:
            raise ValueError(f"strength must be > 0, got {self.strength}")
        if self.noise_ratio < 0.0:
            raise ValueError(f"noise_ratio must be >= 0, got {self.noise_ratio}")

    def field(self, height: int, width: int) -> torch.Tensor:
        """The fixed sampling grid, float32 of shape (1, H, W, 2) in [-1, 1], last axis (x, y) as ``grid_sample``."""
        k = self.grid_size
        control = np.random.default_rng(self.seed).uniform(-1.0, 1.0, size=(1, 2, k, k))
        control /= np.mean(np.abs(control))
        flow = F.interpolate(
            torch.as_tensor(control, dtype=torch.float32),
            size=(height, width),
            mode="bicubic",
            align_corners=True,
        )
        scale = torch.tensor([self.strength / width, self.strength / height], dtype=torch.float32)
        return torch.clamp(_identity_grid(height, width) + flow.permute(0, 2, 3, 1) * scale, -1.0, 1.0)

    def apply(self, x: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        """Warp every image by the fixed field (``rng`` is unused: the field is fixed by ``seed``)."""
        _check_batch(x)
        return _warp(x, self.field(x.shape[2], x.shape[3]))

    def apply_noise(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Noise mode: the fixed warp plus a fresh jitter, uniform in [-1, 1] / image size per grid point."""
        _check_batch(x)
        n, _, height, width = x.shape
        jitter = torch.as_tensor(rng.uniform(-1.0, 1.0, size=(n, height, width, 2)), dtype=torch.float32)
        jitter = jitter / torch.tensor([width, height], dtype=torch.float32)
        return _warp(x, torch.clamp(self.field(height, width) + jitter, -1.0, 1.0))

    def poison_with_cover(
        self,
        x: np.ndarray,
        y: np.ndarray,
        rate: float,
        target: int,
        rng: np.random.Generator,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Like :meth:`poison`, also returning the sorted index of the noise-mode samples."""
        x_out, y_out, poisoned = super().poison(x, y, rate, target, rng)
        noise = _draw(np.setdiff1d(np.arange(len(x)), poisoned), round(self.noise_ratio * rate * len(x)), rng)
        if len(noise):
            x_out[noise] = self.apply_noise(x[noise], rng)
        return x_out, y_out, poisoned, noise

    def poison(
        self,
        x: np.ndarray,
        y: np.ndarray,
        rate: float,
        target: int,
        rng: np.random.Generator,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """All-to-one poisoning as :meth:`Attack.poison`, plus ``noise_ratio * rate`` of the set in noise mode.

        The noise-mode samples are drawn from any class among the samples not poisoned, and keep their labels.
        Returns ``(x_poisoned, y_poisoned, poisoned_index)``; :meth:`poison_with_cover` also gives the
        noise-mode index.
        """
        x_out, y_out, poisoned, _ = self.poison_with_cover(x, y, rate, target, rng)
        return x_out, y_out, poisoned


def _identity_grid(height: int, width: int) -> torch.Tensor:
    """``grid_sample``'s identity grid for ``align_corners=True``: shape (1, H, W, 2), last axis (x, y)."""
    ys, xs = torch.meshgrid(
        torch.linspace(-1.0, 1.0, height), torch.linspace(-1.0, 1.0, width), indexing="ij"
    )
    return torch.stack((xs, ys), dim=-1)[None]


def _warp(x: np.ndarray, grid: torch.Tensor) -> np.ndarray:
    """Resample ``x`` at ``grid`` (shape (1 or N, H, W, 2)) bilinearly; returns a new array of x's dtype."""
    if len(x) == 0:
        return np.array(x, copy=True)
    inputs = torch.as_tensor(np.ascontiguousarray(x), dtype=torch.float32)
    grid = grid.expand(len(x), -1, -1, -1)
    with torch.no_grad():
        out = F.grid_sample(inputs, grid, mode="bilinear", padding_mode="border", align_corners=True)
    return np.clip(out.numpy(), 0.0, 1.0).astype(x.dtype, copy=False)


@dataclass(frozen=True)
class Adaptive(Attack):
    """A ``size`` x ``size`` patch of ``value`` at a uniformly random position in each image.

    A trigger with no fixed location defeats defenses that look for one hot region, and at a very low
    poisoning rate (0.5% in the evaluation) it leaves little mark on the training statistics. The positions
    come from the ``rng`` passed to :meth:`apply`, ``np.random.default_rng(0)`` when none is given, so a batch
    triggered twice without one gets the same positions.
    """

    size: int = 3
    value: float = 1.0

    def __post_init__(self) -> None:
        """Validate the parameters."""
        _check_patch(self.size, self.value)

    def positions(
        self, n: int, height: int, width: int, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-left (rows, cols) of ``n`` patches, uniform over all positions where the patch fits."""
        rows = rng.integers(0, height - self.size + 1, size=n)
        cols = rng.integers(0, width - self.size + 1, size=n)
        return rows, cols

    def apply(self, x: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        """Stamp one patch per image, on every channel, at positions drawn from ``rng``."""
        _check_batch(x)
        _check_patch_fits(self.size, x)
        rng = np.random.default_rng(0) if rng is None else rng
        n, _, height, width = x.shape
        rows, cols = self.positions(n, height, width, rng)
        r, c = np.arange(height)[None, :], np.arange(width)[None, :]
        in_rows = (r >= rows[:, None]) & (r < rows[:, None] + self.size)
        in_cols = (c >= cols[:, None]) & (c < cols[:, None] + self.size)
        mask = in_rows[:, None, :, None] & in_cols[:, None, None, :]  # (N, 1, H, W)
        return np.where(mask, np.asarray(self.value, dtype=x.dtype), x).astype(x.dtype, copy=False)
