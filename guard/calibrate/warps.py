"""Warp synthesis: does a small smooth warp send most images to one class? (the warping backdoors of WaNet)

The patch synthesis of `synthesis.py` looks for a stamp. A warping trigger is no stamp: WaNet moves every pixel along
one fixed smooth field of about a pixel, so the patch scan names a natural class on such a model, or none, and the
reference has nothing of the trigger to unlearn. Here each class gets the smooth warp (a `grid_size` × `grid_size`
control grid of displacements, each at most `budget` pixels, upsampled bicubically to the image) that sends the most
images of other classes to it. On a clean model a warp that small moves few images anywhere; towards a warping
backdoor's target it moves most of them, because the model learnt a warp of that size as the trigger.

The anomaly index is the class's success rate in robust standard deviations (1.4826·MAD) above the classes' median,
and a class is named when its index exceeds `threshold` and its success reaches `min_success`. Measured on the tuning
models (seeds 10-12, docs/design.md): the wanet targets' success was 0.58-0.99 at index 9.6-74 (but for one CNN whose
warp had barely taken), while no class of a clean, BadNets, blend, source-specific or adaptive model went past a
success of 0.21 or an index of 2.9.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from guard.calibrate.synthesis import (
    MAD_CONSISTENCY,
    BlendTrigger,
    Trigger,
    check_trigger,
    class_groups,
    load_trigger,
    logits_of,
)
from guard.errors import GuardError
from guard.model.graph import LoadedModel
from guard.samples import TRIGGER_HINT, needed, npz_array, open_npz, write_atomic

MIN_SPREAD = 0.01  # the smallest MAD of success rates the index divides by: one image in a hundred


@dataclass
class WarpSettings:
    """Knobs of warp synthesis; the defaults scan a 10-class SmallCNN in about 16 s on one CPU thread."""

    steps: int = 150
    batch_size: int = 32
    lr: float = 0.1  # Adam on the unconstrained control points
    # The largest displacement of a control point, in pixels (WaNet's field at strength 1 reaches about 1); the
    # bicubic field between the points can overshoot it by up to a quarter.
    budget: float = 1.0
    grid_size: int = 4  # control points per axis, as WaNet's own field
    threshold: float = 5.0  # anomaly index above which a class is named
    min_success: float = 0.3  # ... if its warp also sends at least this share of other classes' images to it
    seed: int = 0

    def validate(self) -> None:
        """Refuse settings that would make the optimisation meaningless."""
        if self.steps < 1 or self.batch_size < 1:
            raise GuardError(f"warp synthesis needs positive steps and batch size, got {self.steps}, "
                             f"{self.batch_size}")
        if self.grid_size < 2:
            raise GuardError(f"a warp's control grid needs at least 2 points per axis, got {self.grid_size}")
        if not (np.isfinite(self.budget) and self.budget > 0):
            raise GuardError(f"the warp budget must be a positive number of pixels, got {self.budget}")
        if not (np.isfinite(self.threshold) and self.threshold > 0):
            raise GuardError(f"the warp threshold must be a finite anomaly index above 0, got {self.threshold}")
        if not 0 <= self.min_success <= 1:
            raise GuardError(f"the warp's minimum success must lie in [0, 1], got {self.min_success}")


@dataclass
class WarpTrigger:
    """The warp found for one class: where each output pixel samples the input."""

    target: int
    grid: np.ndarray  # (H, W, 2) float32, `grid_sample` coordinates in [-1, 1], (x, y) on the last axis
    success: float  # share of clean images of other classes that it sends to `target`

    def stamp(self, images: torch.Tensor) -> torch.Tensor:
        """The batch (N, C, H, W) warped, differentiably (what fine-tuning unlearns)."""
        return warp(images, torch.as_tensor(self.grid)[None])

    def apply(self, x: np.ndarray) -> np.ndarray:
        """The batch (N, C, H, W) warped, as float32."""
        with torch.no_grad():
            return self.stamp(torch.as_tensor(np.ascontiguousarray(x, dtype=np.float32))).numpy()


AnyTrigger = Trigger | WarpTrigger  # what fine-tuning can unlearn: a stamp (a blend is one too) or a warp


def split_targets(triggers: Sequence[AnyTrigger]) -> tuple[list[int], list[int], list[int]]:
    """The classes of the stamps, of the warps and of the blends (guard.calibrate.blends) among `triggers`, each in
    order."""
    stamps = [t.target for t in triggers if not isinstance(t, WarpTrigger | BlendTrigger)]
    warps = [t.target for t in triggers if isinstance(t, WarpTrigger)]
    return stamps, warps, [t.target for t in triggers if isinstance(t, BlendTrigger)]


def describe_targets(stamps: Sequence[int], warps: Sequence[int], blends: Sequence[int] = ()) -> str:
    """"the triggers of classes [8, 9] and the warp of class 0", for messages ("no trigger" for none)."""
    parts = [f"the triggers of classes {list(stamps)}"] if stamps else []
    parts += [f"the warp of class {k}" for k in warps]
    parts += [f"the blend of class {k}" for k in blends]
    return " and ".join(parts) or "no trigger"


def describe_triggers(triggers: Sequence[AnyTrigger]) -> str:
    """`describe_targets` of the classes of `triggers`."""
    return describe_targets(*split_targets(triggers))


def check_any_trigger(trigger: AnyTrigger, sample_shape: tuple[int, ...], num_classes: int,
                      source: str = "the trigger") -> None:
    """`check_trigger` for a stamp, `check_warp` for a warp."""
    if isinstance(trigger, WarpTrigger):
        check_warp(trigger, sample_shape, num_classes, source)
    else:
        check_trigger(trigger, sample_shape, num_classes, source)


def check_warp(trigger: WarpTrigger, sample_shape: tuple[int, ...], num_classes: int,
               source: str = "the warp") -> None:
    """Refuse a warp that does not fit the model: one class and a finite float32 grid (H, W, 2) in [-1, 1]."""
    target = trigger.target
    if isinstance(target, bool) or not isinstance(target, int | np.integer) or not 0 <= target < num_classes:
        raise GuardError(f"{source}'s target must be one class in [0, {num_classes}), got {target!r}")
    _, *space = sample_shape
    if trigger.grid.shape != (*space, 2) or trigger.grid.dtype != np.float32:
        raise GuardError(f"{source} must be a float32 grid of shape {(*space, 2)}, got a {trigger.grid.dtype} "
                         f"{trigger.grid.shape}")
    if not np.isfinite(trigger.grid).all() or np.abs(trigger.grid).max() > 1:
        raise GuardError(f"{source}'s grid must be finite and lie in [-1, 1]")


def save_warp(trigger: WarpTrigger, path: Path) -> None:
    """The file `load_any_trigger` reads back: grid and target in an .npz, written whole or not at all."""
    def write(tmp: Path) -> None:
        with tmp.open("wb") as file:
            np.savez(file, grid=trigger.grid, target=np.int64(trigger.target))

    write_atomic(path, write)


def load_any_trigger(path: str | Path, sample_shape: tuple[int, ...], num_classes: int) -> AnyTrigger:
    """A stamp (`guard scan`'s trigger.npz or candidate_K.npz) or a warp (its warp_K.npz: a `grid`), checked
    against the model. Loaded without pickle."""
    try:
        with open_npz(Path(path), TRIGGER_HINT) as data:
            warp = "grid" in data.files
            if warp:
                shapes = {"grid": (*sample_shape[1:], 2), "target": ()}
                grid, target = (npz_array(data, key, path, shapes[key]) for key in needed(data, tuple(shapes)))
    except GuardError as exc:
        raise GuardError(f"cannot read a trigger from {path} (expected an .npz of guard scan): {exc}") from None
    if not warp:
        return load_trigger(path, sample_shape, num_classes)
    if target.shape != () or not np.issubdtype(target.dtype, np.integer):
        raise GuardError(f"the warp's target in {path} must be one class, got {target!r}")
    if not np.issubdtype(grid.dtype, np.floating):
        raise GuardError(f"the warp in {path} must hold floating-point numbers, got {grid.dtype}")
    trigger = WarpTrigger(target=int(target), grid=grid.astype(np.float32), success=float("nan"))
    check_warp(trigger, sample_shape, num_classes, f"the warp in {path}")
    return trigger


@dataclass
class WarpScan:
    """Every class's warp and how far its success stands out."""

    triggers: list[WarpTrigger]
    anomaly_index: np.ndarray  # (K,) success in robust standard deviations above the median
    suspect: int | None  # the class with the largest index, if it is named (`WarpSettings.threshold`, `min_success`)
    settings: WarpSettings

    @property
    def success(self) -> np.ndarray:
        """(K,) the share of other classes' images each class's warp sends to it."""
        return np.array([t.success for t in self.triggers])


def warp(images: torch.Tensor, grids: torch.Tensor) -> torch.Tensor:
    """`images` (N, C, H, W) resampled bilinearly at `grids` (1 or N, H, W, 2), borders repeated, kept in [0, 1]
    as the images are."""
    grids = grids.expand(len(images), -1, -1, -1)
    return F.grid_sample(images, grids, mode="bilinear", padding_mode="border", align_corners=True)


def scan_warps(model: LoadedModel | torch.nn.Module, x: np.ndarray, y: np.ndarray,
               settings: WarpSettings | None = None) -> WarpScan:
    """The warp, within the budget, that sends the most other-class images to each class, and the class named.

    `y` are the labels of `x` (or the model's own answers); an image never counts towards its own class. Example::

        found = scan_warps(load_model("model.onnx"), x_clean, y_clean)
    """
    settings = settings or WarpSettings()
    settings.validate()
    forward, inputs, labels, num_classes = scan_inputs(model, x, y, "warp synthesis")
    grids = by_class_groups(_optimise, forward, inputs, num_classes, settings)
    success = success_rates(forward, inputs, labels, num_classes, lambda images, k: warp(images, grids[k:k + 1]))
    triggers = [WarpTrigger(target=k, grid=grids[k].numpy(), success=float(success[k])) for k in range(num_classes)]
    index, suspect = named_class(success.numpy(), settings.threshold, settings.min_success, counted(labels, num_classes))
    return WarpScan(triggers=triggers, anomaly_index=index, suspect=suspect, settings=settings)


def scan_inputs(model: LoadedModel | torch.nn.Module, x: np.ndarray, y: np.ndarray,
                what: str) -> tuple[Callable[[torch.Tensor], torch.Tensor], torch.Tensor, torch.Tensor, int]:
    """What a scan by success rates (the warp and blend scans) works on: the model's forward, differentiable in the
    input, the batch and its labels as tensors, and the number of classes; a batch it cannot use is refused."""
    forward = logits_of(model)
    inputs = torch.as_tensor(np.ascontiguousarray(x, dtype=np.float32))
    labels = torch.as_tensor(np.asarray(y, dtype=np.int64))
    if inputs.dim() != 4 or len(inputs) == 0 or len(labels) != len(inputs):
        raise GuardError(f"{what} needs a non-empty (N, C, H, W) batch with a label each, got "
                         f"{tuple(inputs.shape)} and {len(labels)} labels")
    with torch.no_grad():
        num_classes = int(forward(inputs[:1]).shape[1])
    return forward, inputs, labels, num_classes


def by_class_groups(optimise: Callable[..., torch.Tensor], forward, inputs: torch.Tensor, num_classes: int,
                    settings: Any) -> torch.Tensor:  # WarpSettings or BlendSettings
    """`optimise(forward, inputs, classes, settings)` run on `class_groups` of the classes, its results in class
    order: the warp and blend scans' one forward per step stays within STAMPED_VALUES."""
    groups = class_groups(num_classes, min(settings.batch_size, len(inputs)), inputs[0].numel())
    return torch.cat([optimise(forward, inputs, torch.arange(num_classes)[group], settings) for group in groups])


def counted(labels: torch.Tensor, num_classes: int) -> np.ndarray:
    """(K,) how many images each class's success rate counts: those of the other classes."""
    return len(labels) - np.bincount(labels.numpy(), minlength=num_classes)[:num_classes]


def named_class(success: np.ndarray, threshold: float, min_success: float,
                images: np.ndarray | None = None) -> tuple[np.ndarray, int | None]:
    """The classes' anomaly indices (`warp_index`), and the class named: the most anomalous, where its index exceeds
    `threshold` and its success reaches `min_success`."""
    index = warp_index(success, images)
    best = int(np.argmax(index))
    return index, best if index[best] > threshold and success[best] >= min_success else None


def warp_index(success: np.ndarray, images: np.ndarray | None = None) -> np.ndarray:
    """(success − median) / (1.4826·MAD) per class, the MAD floored at `MIN_SPREAD` so that classes a warp (or a
    blend, guard.calibrate.blends) cannot reach at all (success near 0 everywhere) do not turn a few images into a
    huge index; and at one image where `images`, the images each rate counts, are fewer than a hundred: on 10 fit
    images, 3 sent anywhere by chance read as index 20 and named a class of a clean model."""
    success = np.asarray(success, dtype=np.float64)
    median = np.median(success)
    floor = MIN_SPREAD if images is None or not len(images) else max(MIN_SPREAD, 1 / max(int(np.min(images)), 1))
    spread = MAD_CONSISTENCY * max(float(np.median(np.abs(success - median))), floor)
    return (success - median) / spread


def _fields(control: torch.Tensor, budget: float, height: int, width: int) -> torch.Tensor:
    """Sampling grids (K, H, W, 2) from unconstrained control points (K, 2, k, k): each point moves at most `budget`
    pixels (tanh), the field between them is bicubic, and the grid stays inside the image."""
    flow = F.interpolate(budget * torch.tanh(control), size=(height, width), mode="bicubic", align_corners=True)
    pixels = torch.tensor([2 / max(width - 1, 1), 2 / max(height - 1, 1)])  # one pixel in grid coordinates
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, height), torch.linspace(-1, 1, width), indexing="ij")
    identity = torch.stack((xs, ys), dim=-1)[None]
    return torch.clamp(identity + flow.permute(0, 2, 3, 1) * pixels, -1, 1)


def _optimise(forward, inputs: torch.Tensor, classes: torch.Tensor, settings: WarpSettings) -> torch.Tensor:
    """Adam on the `classes`' control points at once (one batched forward pass); returns their grids (K, H, W, 2)."""
    generator = torch.Generator().manual_seed(settings.seed)
    height, width = inputs.shape[2:]
    k = settings.grid_size
    control = (0.01 * torch.randn(len(classes), 2, k, k, generator=generator)).requires_grad_(True)
    optimiser = torch.optim.Adam([control], lr=settings.lr)
    targets = classes.repeat_interleave(min(settings.batch_size, len(inputs)))
    for _ in range(settings.steps):
        rows = torch.randint(len(inputs), (min(settings.batch_size, len(inputs)),), generator=generator)
        grids = _fields(control, settings.budget, height, width)
        warped = torch.cat([warp(inputs[rows], grids[c:c + 1]) for c in range(len(classes))])
        loss = F.cross_entropy(forward(warped), targets)
        optimiser.zero_grad(set_to_none=True)
        loss.backward(inputs=[control])  # no gradients for the model's own weights
        optimiser.step()
    with torch.no_grad():
        return _fields(control, settings.budget, height, width)


@torch.no_grad()
def success_rates(forward, inputs: torch.Tensor, labels: torch.Tensor, num_classes: int,
                  perturb: Callable[[torch.Tensor, int], torch.Tensor], batch_size: int = 256) -> torch.Tensor:
    """(K,) the share of images of other classes that `perturb(images, k)` sends to class k, on all of `inputs`."""
    hits = torch.zeros(num_classes)
    seen = torch.zeros(num_classes)
    for start in range(0, len(inputs), batch_size):
        chunk, chunk_labels = inputs[start:start + batch_size], labels[start:start + batch_size]
        for target in range(num_classes):
            others = chunk_labels != target
            if not others.any():
                continue
            answers = forward(perturb(chunk[others], target)).argmax(1)
            hits[target] += (answers == target).sum()
            seen[target] += others.sum()
    return hits / seen.clamp(min=1)
