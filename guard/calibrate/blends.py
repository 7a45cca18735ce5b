"""Blend synthesis: does a faint pattern over the whole image send most images to one class? (blended backdoors)

The patch synthesis of `synthesis.py` looks for the smallest stamp. A blended trigger (Chen et al., 2017) is no
stamp: it mixes one fixed pattern into every pixel at a low weight, so its smallest mask is no smaller than a natural
class's, and the reference has nothing of it to unlearn. Here each class gets the pattern p that, blended as
(1 − s)·x + s·p at a small strength s, sends the most images of other classes to it. On a clean model a blend that
faint moves few images anywhere; towards a blended backdoor's target it moves most of them, because the model learnt
a pattern mixed in at about that weight as the trigger.

A class is named as the warp scan names one (`warp_index`: its success in robust standard deviations above the
median class's, and a floor on the success itself). Measured on the tuning models (seeds 10-11, docs/design.md): at
s = 0.05 the blend targets' success was 0.46-0.93 at index 13-21, while no class of a clean, BadNets,
source-specific or adaptive model went past an index of 3.0; a WaNet CNN's target reached 15.6 (success 0.31).
The named class's pattern is unlearned at `unlearn_strength`, three times the strength it was found at: found
faint, where a clean model resists, and unlearned at a weight where a trigger blended in takes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

from guard.calibrate.synthesis import BlendTrigger
from guard.calibrate.warps import by_class_groups, counted, named_class, scan_inputs, success_rates
from guard.errors import GuardError
from guard.model.graph import LoadedModel


@dataclass
class BlendSettings:
    """Knobs of blend synthesis; the defaults take the warp scan's steps and batch (one optimisation of every class at
    once), so the two scans cost about the same."""

    steps: int = 150
    batch_size: int = 32
    lr: float = 0.1  # Adam on the pattern's logits
    strength: float = 0.05  # the weight each class's pattern is blended in at while it is found
    unlearn_strength: float = 0.15  # ... and at which the fine-tunings stamp the named class's pattern
    threshold: float = 5.0  # anomaly index above which a class is named
    min_success: float = 0.2  # ... if its pattern also sends at least this share of other classes' images to it
    seed: int = 0

    def validate(self) -> None:
        """Refuse settings that would make the optimisation meaningless."""
        if self.steps < 1 or self.batch_size < 1:
            raise GuardError(f"blend synthesis needs positive steps and batch size, got {self.steps}, "
                             f"{self.batch_size}")
        for name in ("strength", "unlearn_strength"):
            value = getattr(self, name)
            if not 0 < value <= 1:
                raise GuardError(f"the blend's {name.replace('_', ' ')} must lie in (0, 1], got {value}")
        if not (np.isfinite(self.threshold) and self.threshold > 0):
            raise GuardError(f"the blend threshold must be a finite anomaly index above 0, got {self.threshold}")
        if not 0 <= self.min_success <= 1:
            raise GuardError(f"the blend's minimum success must lie in [0, 1], got {self.min_success}")


@dataclass
class BlendScan:
    """Every class's blended pattern and how far its success stands out."""

    triggers: list[BlendTrigger]
    anomaly_index: np.ndarray  # (K,) success in robust standard deviations above the median
    suspect: int | None  # the class with the largest index, if it is named (`BlendSettings.threshold`, `min_success`)
    settings: BlendSettings

    @property
    def success(self) -> np.ndarray:
        """(K,) the share of other classes' images each class's pattern sends to it."""
        return np.array([t.success for t in self.triggers])


def blend(images: torch.Tensor, patterns: torch.Tensor, strength: float) -> torch.Tensor:
    """(1 − strength)·images + strength·patterns, the patterns (1 or N, C, H, W) broadcast over the batch."""
    return (1 - strength) * images + strength * patterns


def scan_blends(model: LoadedModel | torch.nn.Module, x: np.ndarray, y: np.ndarray,
                settings: BlendSettings | None = None) -> BlendScan:
    """The pattern that, blended in at the settings' strength, sends the most other-class images to each class, and
    the class named.

    `y` are the labels of `x` (or the model's own answers); an image never counts towards its own class. Example::

        found = scan_blends(load_model("model.onnx"), x_clean, y_clean)
    """
    settings = settings or BlendSettings()
    settings.validate()
    forward, inputs, labels, num_classes = scan_inputs(model, x, y, "blend synthesis")
    patterns = by_class_groups(_optimise, forward, inputs, num_classes, settings)
    success = success_rates(forward, inputs, labels, num_classes,
                            lambda images, k: blend(images, patterns[k:k + 1], settings.strength))
    mask = np.full((1, *inputs.shape[2:]), settings.unlearn_strength, dtype=np.float32)
    triggers = [BlendTrigger(target=k, mask=mask.copy(), pattern=patterns[k].numpy(), success=float(success[k]),
                             mask_l1=float(mask.sum())) for k in range(num_classes)]
    index, suspect = named_class(success.numpy(), settings.threshold, settings.min_success, counted(labels, num_classes))
    return BlendScan(triggers=triggers, anomaly_index=index, suspect=suspect, settings=settings)


def _optimise(forward, inputs: torch.Tensor, classes: torch.Tensor, settings: BlendSettings) -> torch.Tensor:
    """Adam on the `classes`' patterns at once (one batched forward pass); returns their patterns (K, C, H, W) in
    [0, 1], as the images are."""
    generator = torch.Generator().manual_seed(settings.seed)
    logits = (0.01 * torch.randn(len(classes), *inputs.shape[1:], generator=generator)).requires_grad_(True)
    optimiser = torch.optim.Adam([logits], lr=settings.lr)
    size = min(settings.batch_size, len(inputs))
    targets = classes.repeat_interleave(size)
    for _ in range(settings.steps):
        rows = torch.randint(len(inputs), (size,), generator=generator)
        patterns = torch.sigmoid(logits)
        blended = torch.cat([blend(inputs[rows], patterns[c:c + 1], settings.strength) for c in range(len(classes))])
        loss = F.cross_entropy(forward(blended), targets)
        optimiser.zero_grad(set_to_none=True)
        loss.backward(inputs=[logits])  # no gradients for the model's own weights
        optimiser.step()
    with torch.no_grad():
        return torch.sigmoid(logits)
