"""One batched pass over the calibration data that records what every scorer needs at each tap."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from guard.calibrate.taps import TapModel


@dataclass
class Activations:
    """Per-sample, per-channel summaries at each tap (lists are indexed like the model's taps)."""

    linf: list[np.ndarray]  # (N, C): spatial max, or the value itself for (N, C) taps
    mean: list[np.ndarray]  # (N, C): spatial mean
    salience: list[np.ndarray] | None  # (N, C): |sum over space of A * dL/dA|, the first-order loss change
    logits: np.ndarray  # (N, K)
    unit_max: list[np.ndarray | None] | None = None  # per conv tap (C, H, W): the largest value of each unit

    @property
    def predictions(self) -> np.ndarray:
        return self.logits.argmax(axis=1)


def channel_summaries(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(ℓ∞, mean) per sample and channel of an (N, C, ...) tensor."""
    if tensor.dim() == 2:
        return tensor, tensor
    flat = tensor.flatten(2)
    return flat.amax(dim=2), flat.mean(dim=2)


def collect(model: TapModel, x: np.ndarray, labels: np.ndarray | None = None, *,
            masks: list[np.ndarray] | None = None, bounds: list[np.ndarray | None] | None = None,
            with_salience: bool = False, with_unit_max: bool = False, batch_size: int = 256,
            on_batch: Callable[[int], None] | None = None) -> Activations:
    """Run `x` through `model` in batches; salience uses `labels`, or the model's own predictions without them.

    `masks` (per tap, (N, C) or (1, C)) multiply the taps; `bounds` (per tap, (C, H, W) or None) also zero every
    unit above its bound, as the benign re-prediction does.
    """
    taps = len(model.taps)
    linf: list[list[np.ndarray]] = [[] for _ in range(taps)]
    means: list[list[np.ndarray]] = [[] for _ in range(taps)]
    salience: list[list[np.ndarray]] = [[] for _ in range(taps)]
    logits_out = []
    unit_max: list[np.ndarray | None] = [None] * taps
    bound_tensors = None if bounds is None else [None if b is None else torch.as_tensor(b) for b in bounds]
    mask_tensors = None if masks is None else [torch.as_tensor(m, dtype=torch.float32) for m in masks]
    for start in range(0, len(x), batch_size):
        batch = torch.as_tensor(x[start:start + batch_size], dtype=torch.float32)
        batch_masks = None if mask_tensors is None else [
            m if m.shape[0] == 1 else m[start:start + batch_size] for m in mask_tensors
        ]
        with torch.set_grad_enabled(with_salience):
            logits, tapped = model.run(batch, batch_masks, bound_tensors)
            if with_salience:
                target = (torch.as_tensor(labels[start:start + batch_size]) if labels is not None
                          else logits.argmax(dim=1))
                loss = F.cross_entropy(logits, target, reduction="sum")
                grads = torch.autograd.grad(loss, tapped)
                for index, (act, grad) in enumerate(zip(tapped, grads, strict=True)):
                    taylor = (act * grad).flatten(2).sum(dim=2) if act.dim() > 2 else act * grad
                    salience[index].append(taylor.abs().detach().numpy())
        for index, act in enumerate(tapped):
            peak, mean = channel_summaries(act.detach())
            linf[index].append(peak.numpy())
            means[index].append(mean.numpy())
            if with_unit_max and act.dim() == 4:
                batch_max = act.detach().amax(dim=0).numpy()
                unit_max[index] = batch_max if unit_max[index] is None else np.maximum(unit_max[index], batch_max)
        logits_out.append(logits.detach().numpy())
        if on_batch is not None:
            on_batch(len(batch))
    return Activations(
        linf=[np.concatenate(parts) for parts in linf],
        mean=[np.concatenate(parts) for parts in means],
        salience=[np.concatenate(parts) for parts in salience] if with_salience else None,
        logits=np.concatenate(logits_out),
        unit_max=unit_max if with_unit_max else None,
    )
