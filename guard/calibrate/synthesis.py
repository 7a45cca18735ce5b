"""Trigger synthesis for scanning a model (ALGORITHMS.md section 5, in the spirit of Neural Cleanse).

A backdoored class is one that a *small* stamp sends almost any input to. For each class t we look for the smallest
mask m (1×H×W, values in [0, 1]) and a pattern p (C×H×W in [0, 1]) such that (1 − m)·x + m·p is classified as t for
most of the clean set D: minimise CE(f(stamped), t) + λ_t·‖m‖₁. The target of a real backdoor needs a far smaller mask
than the other classes, so its ℓ1 size is an outlier on the small side of the per-class distribution, measured with
the median absolute deviation (robust to that very outlier).

The anomaly index is taken on log sizes by default (a variant of Neural Cleanse's linear index, which stays
available). Natural trigger sizes spread multiplicatively: on Fashion-MNIST SmallCNNs the ten classes need masks of
about 50 to 400 pixels, so the linear MAD is about half the median and the linear index cannot exceed
median / (1.4826·MAD) ≈ 1.0-1.7 even for a zero-size mask. Measured with the defaults (scan of 250 images): on 7
backdoored SmallCNNs (BadNets and Blend, 3-4 seeds each) the linear index named no target (at most 1.65), the log
index named all of them (target 2.8-5.3); on 5 clean SmallCNNs the log index stayed at or below 1.7. Clean models
can still carry small *natural* triggers: 2 of 3 clean stride-1-stem SmallResNets (before 6cd2142) had a class
("bag") with a 20-45 pixel trigger and index 3.0-3.8, the false positive Neural Cleanse is known for.

The penalty weight λ_t adapts per class: it starts at 0 (first find *a* trigger), is set to `init_cost` once the
success rate first reaches `target_success`, then is multiplied up while success stays at the target (shrink the
mask) and divided down while it stays below (give the mask room again). The smallest mask seen at or above the target
success is kept. All classes are optimised together in one batched forward/backward pass: the model is shared, the
losses are independent, so summing them keeps each class's gradient its own.

Everything runs in torch, on the ONNX graph through `guard.model.bridge.OnnxModule` (gradients to the input, the
weights stay frozen).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch.nn import functional as F

from guard.errors import GuardError
from guard.model.bridge import OnnxModule
from guard.model.graph import LoadedModel
from guard.samples import TRIGGER_HINT, needed, npz_array, open_npz, write_atomic

MAD_CONSISTENCY = 1.4826  # makes the MAD an estimate of the standard deviation for normal data
DEFAULT_THRESHOLD = 2.0  # anomaly index above which a class is named (Neural Cleanse's choice)
# A class is named only if its trigger works: one that never converged (too few --steps) has a small mask because the
# optimisation stopped, not because a backdoor made it small (5 steps named a clean model's class at success 0.055).
MIN_SUSPECT_SUCCESS = 0.5
# The median and MAD of fewer sizes than this cannot single one out: with two classes every index is ±0.67.
MIN_CLASSES_TO_JUDGE = 3
# The smallest spread of mask sizes the index divides by, relative to the median (log scale: 0.01 is 1% of the size).
# Where half the classes share one size (the MAD is 0) a mask 2% smaller read as an outlier of index ~3,000.
MIN_RELATIVE_SPREAD = 0.01
# Stamped input values a scan aims to hand one forward pass. Every class is optimised at once (one forward per step
# over classes × batch images) where that fits, as for any 10-class model of the eval's size or CIFAR's; a model of
# many classes or large images is optimised a group of classes at a time (one class at least, whatever its size), or
# its memory grew with the classes (100 classes of 3x32x32: 5 GB).
STAMPED_VALUES = 1 << 21
SUCCESS_BATCH = 256  # images per forward when measuring the triggers' success

Logits = Callable[[torch.Tensor], torch.Tensor]
IndexScale = Literal["log", "linear"]


@dataclass
class SynthesisSettings:
    """Knobs of trigger synthesis; the defaults scan a 10-class SmallCNN in about 16 s on one CPU thread.

    Steps are the lever: at 100 steps the target's index on one BadNets model moved between 2.9 and 3.6 over
    three seeds, at 200 between 3.3 and 3.6; 60 steps left masks 2-3x too large to tell anything.
    """

    steps: int = 200  # optimisation steps; each sees `batch_size` images stamped with every class's trigger
    batch_size: int = 32
    lr: float = 0.2  # Adam on the unconstrained mask/pattern logits
    target_success: float = 0.99  # share of non-target images the trigger must send to the target
    init_cost: float = 1e-3  # ℓ1 weight once a class first reaches the target success
    cost_up: float = 1.5  # multiply the weight by this after `patience` windows at the target ...
    cost_down: float = 1.5 ** 1.5  # ... divide it by this after `patience` windows below (faster: recover)
    window: int = 5  # steps per success measurement (the cost adapts once per window)
    patience: int = 2
    mask_init: float = 0.1  # every mask starts as this uniform value
    seed: int = 0

    def validate(self) -> None:
        """Refuse settings that would make the optimisation meaningless."""
        if self.steps < self.window:
            raise GuardError(f"synthesis needs at least {self.window} steps, got {self.steps}")
        if self.batch_size < 1 or self.window < 1 or self.patience < 1:
            raise GuardError("batch size, window and patience must be positive")
        if not 0 < self.target_success <= 1:
            raise GuardError(f"target success must lie in (0, 1], got {self.target_success}")
        if not 0 < self.mask_init < 1:
            raise GuardError(f"mask_init must lie in (0, 1), got {self.mask_init}")


@dataclass
class Trigger:
    """The smallest trigger found for one class."""

    target: int
    mask: np.ndarray  # (1, H, W) in [0, 1]
    pattern: np.ndarray  # (C, H, W) in [0, 1]
    success: float  # share of clean images of other classes that it sends to `target`
    mask_l1: float  # ‖mask‖₁, the size the anomaly index compares

    def apply(self, x: np.ndarray) -> np.ndarray:
        """Stamp this trigger on a batch (N, C, H, W)."""
        return apply_trigger(x, self.mask, self.pattern)

    def stamp(self, images: torch.Tensor) -> torch.Tensor:
        """Stamp this trigger on a torch batch (N, C, H, W), differentiably (what fine-tuning unlearns)."""
        return (1 - torch.as_tensor(self.mask)) * images + torch.as_tensor(self.mask) * torch.as_tensor(self.pattern)


@dataclass
class BlendTrigger(Trigger):
    """A pattern blended over the whole image (guard.calibrate.blends): a stamp whose mask is one constant, the
    strength it is unlearnt at. `success` is the share of other classes' images it sent to `target` at the strength
    it was found at."""


def check_trigger(trigger: Trigger, sample_shape: tuple[int, ...], num_classes: int,
                  source: str = "the trigger") -> None:
    """Refuse a trigger that does not fit the model: one class, a mask (1, H, W) and a pattern (C, H, W) of its
    images, float32 and finite (stamping mixes them with the model's float32 inputs)."""
    target = trigger.target
    if isinstance(target, bool) or not isinstance(target, int | np.integer) or not 0 <= target < num_classes:
        raise GuardError(f"{source}'s target must be one class in [0, {num_classes}), got {target!r}")
    _, *space = sample_shape
    if trigger.pattern.shape != tuple(sample_shape):
        raise GuardError(f"{source} is for images {trigger.pattern.shape}, the model takes {tuple(sample_shape)}")
    if trigger.mask.shape != (1, *space):
        raise GuardError(f"{source} has a mask of shape {trigger.mask.shape}; its images need {(1, *space)}")
    if trigger.mask.dtype != np.float32 or trigger.pattern.dtype != np.float32:
        raise GuardError(f"{source} must be float32, got a {trigger.mask.dtype} mask and a {trigger.pattern.dtype} "
                         "pattern")
    if not (np.isfinite(trigger.mask).all() and np.isfinite(trigger.pattern).all()):
        raise GuardError(f"{source} holds NaN or Inf")
    if trigger.mask.min() < 0 or trigger.mask.max() > 1:  # a mask is a blend weight per pixel
        raise GuardError(f"{source}'s mask must lie in [0, 1], got [{trigger.mask.min()}, {trigger.mask.max()}]")


def save_trigger(trigger: Trigger, path: Path) -> None:
    """The file `load_trigger` reads: mask, pattern and target in an .npz (and `blend` for a BlendTrigger), written
    whole or not at all (through a file object, so numpy appends no second `.npz` to the name)."""
    def write(tmp: Path) -> None:
        with tmp.open("wb") as file:
            kind = {"blend": np.bool_(True)} if isinstance(trigger, BlendTrigger) else {}
            np.savez(file, mask=trigger.mask, pattern=trigger.pattern, target=np.int64(trigger.target), **kind)

    write_atomic(path, write)


def load_trigger(path: str | Path, sample_shape: tuple[int, ...], num_classes: int) -> Trigger:
    """A trigger that `guard scan` wrote (trigger.npz: mask (1, H, W), pattern (C, H, W), target), checked against
    the model's sample shape and classes. Loaded without pickle."""
    try:
        with open_npz(Path(path), TRIGGER_HINT) as data:
            shapes = {"mask": (1, *sample_shape[1:]), "pattern": sample_shape, "target": ()}
            mask, pattern, target = (npz_array(data, key, path, shapes[key]) for key in needed(data, tuple(shapes)))
            kind = BlendTrigger if "blend" in data else Trigger
    except GuardError as exc:
        raise GuardError(f"cannot read a trigger from {path} (expected guard scan's trigger.npz): {exc}") from None
    if not (np.issubdtype(mask.dtype, np.number) and np.issubdtype(pattern.dtype, np.number)) or (
            np.iscomplexobj(mask) or np.iscomplexobj(pattern)):  # float32 of a complex drops its imaginary part
        raise GuardError(f"the trigger in {path} must hold real numbers, got a {mask.dtype} mask and a "
                         f"{pattern.dtype} pattern")
    if target.shape != () or not np.issubdtype(target.dtype, np.integer) or not 0 <= int(target) < num_classes:
        raise GuardError(f"the trigger's target in {path} must be one class in [0, {num_classes}), got {target!r}")
    mask, pattern = mask.astype(np.float32), pattern.astype(np.float32)
    trigger = kind(target=int(target), mask=mask, pattern=pattern, success=float("nan"),
                   mask_l1=float(np.abs(mask).sum()))
    check_trigger(trigger, sample_shape, num_classes, f"the trigger in {path}")
    return trigger


@dataclass
class ScanResult:
    """Every class's trigger and how anomalous its size is."""

    triggers: list[Trigger]
    anomaly_index: np.ndarray  # (K,) signed: > 0 where the mask is smaller than the median
    suspect: int | None  # the class with the largest index, if it exceeds `threshold`
    threshold: float
    index_scale: IndexScale = "log"
    seconds: float = 0.0
    settings: dict[str, object] = field(default_factory=dict)

    @property
    def mask_l1(self) -> np.ndarray:
        """(K,) the ℓ1 size of each class's mask."""
        return np.array([t.mask_l1 for t in self.triggers])


def apply_trigger(x: np.ndarray, mask: np.ndarray, pattern: np.ndarray) -> np.ndarray:
    """(1 − m)·x + m·p, float32, broadcast over the batch."""
    x = np.asarray(x, dtype=np.float32)
    return ((1 - mask) * x + mask * pattern).astype(np.float32, copy=False)


def logits_of(model: LoadedModel | torch.nn.Module | Logits) -> Logits:
    """A function from an input batch to logits, differentiable in the input (an ONNX model runs on the bridge)."""
    if isinstance(model, LoadedModel):
        return OnnxModule(model.proto).eval()  # its parameters are frozen
    if isinstance(model, torch.nn.Module):
        model.eval()
    return model


def anomaly_index(l1: np.ndarray, scale: IndexScale = "log") -> np.ndarray:
    """(median − s_t) / (1.4826·MAD) per class, s = log ‖m‖₁ (or ‖m‖₁ with `scale="linear"`).

    How many robust standard deviations a class's mask lies *below* the median size. Signed, so a large mask reads
    negative; only positive values can name a suspect. The MAD is floored at `MIN_RELATIVE_SPREAD` of the median
    size: sizes that barely differ are not a spread a class can stand out of by a percent.
    """
    sizes = np.asarray(l1, dtype=np.float64)
    if scale == "log":
        sizes = np.log(np.maximum(sizes, 1e-6))
    elif scale != "linear":
        raise GuardError(f"index scale must be 'log' or 'linear', got {scale!r}")
    median = np.median(sizes)
    mad = np.median(np.abs(sizes - median))
    floor = MIN_RELATIVE_SPREAD if scale == "log" else MIN_RELATIVE_SPREAD * max(abs(median), 1e-6)
    spread = MAD_CONSISTENCY * max(mad, floor)
    return (median - sizes) / spread


def pick_suspect(index: np.ndarray, threshold: float = DEFAULT_THRESHOLD,
                 success: np.ndarray | None = None) -> int | None:
    """The class with the largest anomaly index among those whose trigger works (where `success` is given: it sends
    at least MIN_SUSPECT_SUCCESS of the other classes' images to it), if it exceeds the threshold; none for fewer
    than MIN_CLASSES_TO_JUDGE classes."""
    index = np.asarray(index, dtype=np.float64)
    if len(index) < MIN_CLASSES_TO_JUDGE:
        return None
    working = index if success is None else np.where(np.asarray(success) >= MIN_SUSPECT_SUCCESS, index, -np.inf)
    best = int(np.argmax(working))
    return best if working[best] > threshold else None


def synthesize_triggers(model: LoadedModel | torch.nn.Module | Logits, x: np.ndarray,
                        y: np.ndarray | None = None, *, classes: Sequence[int] | None = None,
                        settings: SynthesisSettings | None = None) -> list[Trigger]:
    """The smallest trigger per class that sends `target_success` of the other classes' images to it.

    `y` are the labels of `x` (the model's own predictions when None); an image never counts towards the success
    of its own class. Example::

        triggers = synthesize_triggers(load_model("model.onnx"), x_clean, y_clean)
    """
    settings = settings or SynthesisSettings()
    settings.validate()
    forward = logits_of(model)
    inputs = torch.as_tensor(np.ascontiguousarray(x, dtype=np.float32))
    if inputs.dim() != 4 or len(inputs) == 0:
        raise GuardError(f"synthesis needs a non-empty (N, C, H, W) batch, got shape {tuple(inputs.shape)}")
    with torch.no_grad():
        num_classes = int(forward(inputs[:1]).shape[1])
        labels = torch.as_tensor(y) if y is not None else _predict(forward, inputs)
    targets = torch.as_tensor(list(classes) if classes is not None else range(num_classes), dtype=torch.int64)
    if targets.numel() == 0 or targets.min() < 0 or targets.max() >= num_classes:
        raise GuardError(f"classes must lie in [0, {num_classes}), got {targets.tolist()}")

    values = inputs[0].numel()
    found = [_optimise(forward, inputs, labels, targets[group], settings)
             for group in class_groups(len(targets), min(settings.batch_size, len(inputs)), values)]
    mask, pattern = torch.cat([m for m, _ in found]), torch.cat([p for _, p in found])
    success = torch.cat([_success(forward, inputs, labels, targets[group], mask[group], pattern[group])
                         for group in class_groups(len(targets), SUCCESS_BATCH, values)])
    return [
        Trigger(target=int(t), mask=m.numpy(), pattern=p.numpy(), success=float(s), mask_l1=float(m.sum()))
        for t, m, p, s in zip(targets, mask, pattern, success, strict=True)
    ]


def scan_classes(model: LoadedModel | torch.nn.Module | Logits, x: np.ndarray, y: np.ndarray | None = None, *,
                 threshold: float = DEFAULT_THRESHOLD, index_scale: IndexScale = "log",
                 settings: SynthesisSettings | None = None) -> ScanResult:
    """Synthesise a trigger for every class and name the class whose trigger is anomalously small, if any.

    Example::

        result = scan_classes(load_model("model.onnx"), x_clean, y_clean)
        if result.suspect is not None:
            trigger = result.triggers[result.suspect]
    """
    settings = settings or SynthesisSettings()
    started = time.perf_counter()
    triggers = synthesize_triggers(model, x, y, settings=settings)
    index = anomaly_index(np.array([t.mask_l1 for t in triggers]), index_scale)
    suspect = pick_suspect(index, threshold, np.array([t.success for t in triggers]))
    return ScanResult(triggers=triggers, anomaly_index=index, suspect=suspect,
                      threshold=threshold, index_scale=index_scale, seconds=time.perf_counter() - started,
                      settings=vars(settings).copy())


def class_groups(count: int, batch: int, values: int) -> list[slice]:
    """The classes, in order, in groups whose stamped batch (classes × `batch` images of `values` each) stays within
    STAMPED_VALUES; one group of all where it fits."""
    size = max(1, STAMPED_VALUES // max(1, batch * values))
    return [slice(start, min(start + size, count)) for start in range(0, count, size)]


def _predict(forward: Logits, inputs: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    return torch.cat([forward(inputs[i:i + batch_size]).argmax(1) for i in range(0, len(inputs), batch_size)])


def _stamp(x: torch.Tensor, mask: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
    """Every image stamped with every trigger: (T, N, C, H, W) from x (N, C, H, W), masks (T, 1, H, W)."""
    return (1 - mask[:, None]) * x[None] + mask[:, None] * pattern[:, None]


def _optimise(forward: Logits, inputs: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor,
              settings: SynthesisSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """Adam on sigmoid-parametrised masks and patterns for all targets at once; returns the best (smallest) ones."""
    generator = torch.Generator().manual_seed(settings.seed)
    count, (channels, height, width) = len(targets), inputs.shape[1:]
    init = float(np.log(settings.mask_init / (1 - settings.mask_init)))
    mask_logit = torch.full((count, 1, height, width), init).add_(0.01 * torch.randn(count, 1, height, width,
                                                                                     generator=generator))
    pattern_logit = torch.randn(count, channels, height, width, generator=generator)
    mask_logit.requires_grad_(True)
    pattern_logit.requires_grad_(True)
    optimiser = torch.optim.Adam([mask_logit, pattern_logit], lr=settings.lr, betas=(0.5, 0.9))

    cost = torch.zeros(count)
    started = torch.zeros(count, dtype=torch.bool)  # has the class reached the target success yet?
    above = torch.zeros(count, dtype=torch.int64)
    below = torch.zeros(count, dtype=torch.int64)
    best_mask = torch.sigmoid(mask_logit.detach()).clone()
    best_pattern = torch.sigmoid(pattern_logit.detach()).clone()
    best_l1 = torch.full((count,), float("inf"))
    hits = torch.zeros(count)
    seen = torch.zeros(count)
    batch = min(settings.batch_size, len(inputs))
    for step in range(settings.steps):
        rows = torch.randint(len(inputs), (batch,), generator=generator)
        mask, pattern = torch.sigmoid(mask_logit), torch.sigmoid(pattern_logit)
        stamped = _stamp(inputs[rows], mask, pattern).reshape(count * batch, channels, height, width)
        logits = forward(stamped).reshape(count, batch, -1)
        wanted = targets[:, None].expand(count, batch)
        ce = F.cross_entropy(logits.reshape(count * batch, -1), wanted.reshape(-1), reduction="none")
        l1 = mask.reshape(count, -1).sum(1)
        loss = (ce.reshape(count, batch).mean(1) + cost * l1).sum()
        optimiser.zero_grad(set_to_none=True)
        loss.backward(inputs=[mask_logit, pattern_logit])  # no gradients for the model's own weights
        optimiser.step()

        with torch.no_grad():
            others = labels[rows][None, :] != targets[:, None]  # (T, B): an image does not count for its class
            hits += ((logits.argmax(2) == wanted) & others).sum(1)
            seen += others.sum(1)
            if (step + 1) % settings.window:
                continue
            rate = hits / seen.clamp(min=1)
            hits.zero_()
            seen.zero_()
            reached = rate >= settings.target_success
            # The rate covers the window's steps; the mask of its last step stands for them (Adam moves it
            # little per step), and the kept masks are measured once more on all of `inputs` at the end.
            better = reached & (l1.detach() < best_l1)
            best_l1 = torch.where(better, l1.detach(), best_l1)
            best_mask[better] = mask.detach()[better]
            best_pattern[better] = pattern.detach()[better]

            first = reached & ~started
            cost = torch.where(first, torch.full_like(cost, settings.init_cost), cost)
            started |= reached
            above = torch.where(reached, above + 1, torch.zeros_like(above))
            below = torch.where(reached, torch.zeros_like(below), below + 1)
            up = started & (above >= settings.patience)
            down = started & (below >= settings.patience)
            cost = torch.where(up, cost * settings.cost_up, torch.where(down, cost / settings.cost_down, cost))
            above = torch.where(up, torch.zeros_like(above), above)
            below = torch.where(down, torch.zeros_like(below), below)

    never = torch.isinf(best_l1)  # no window reached the target: report the last trigger, whatever its success
    if never.any():
        with torch.no_grad():
            best_mask[never] = torch.sigmoid(mask_logit)[never]
            best_pattern[never] = torch.sigmoid(pattern_logit)[never]
    return best_mask, best_pattern


@torch.no_grad()
def _success(forward: Logits, inputs: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor,
             mask: torch.Tensor, pattern: torch.Tensor, batch_size: int = SUCCESS_BATCH) -> torch.Tensor:
    """Share of images of other classes that each trigger sends to its target, on all of `inputs`."""
    hits = torch.zeros(len(targets))
    seen = torch.zeros(len(targets))
    for start in range(0, len(inputs), batch_size):
        chunk, chunk_labels = inputs[start:start + batch_size], labels[start:start + batch_size]
        stamped = _stamp(chunk, mask, pattern)
        predicted = forward(stamped.reshape(-1, *chunk.shape[1:])).argmax(1).reshape(len(targets), len(chunk))
        others = chunk_labels[None, :] != targets[:, None]
        hits += ((predicted == targets[:, None]) & others).sum(1)
        seen += others.sum(1)
    return hits / seen.clamp(min=1)
