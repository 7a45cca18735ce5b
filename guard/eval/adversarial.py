"""Adversarial examples (PGD) for the evaluation's robustness check.

A backdoor guard watches for inputs that push a model somewhere unusual; ordinary adversarial examples do that
too, without any trigger. The evaluation reports how many PGD examples the guard flags and how accurate the
guarded model stays under them, so it needs a plain, reproducible PGD against the unguarded PyTorch model.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["pgd"]


def pgd(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    eps: float = 0.1,
    steps: int = 10,
    step_size: float | None = None,
    batch_size: int = 256,
    seed: int = 0,
) -> np.ndarray:
    """Untargeted ℓ∞ PGD (Madry et al., 2018) with a random start; returns float32 images in [0, 1].

    Each step moves by ``step_size`` (default ``2.5 * eps / steps``, so the walk can cross the ball and back)
    along the sign of the cross-entropy gradient, then projects onto the ``eps`` ball around ``x`` and onto
    [0, 1]. The random start is uniform in the ball, drawn from ``seed``, so results are reproducible. The
    model runs in eval mode (BatchNorm on its running statistics, as at inference) and is returned to its
    previous mode afterwards; its parameters get no gradients.
    """
    if x.ndim != 4:
        raise ValueError(f"expected a (N, C, H, W) batch, got shape {x.shape}")
    if len(x) != len(y):
        raise ValueError(f"x has {len(x)} samples but y has {len(y)}")
    if eps < 0.0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    alpha = 2.5 * eps / max(steps, 1) if step_size is None else step_size
    if steps and eps and alpha <= 0.0:
        raise ValueError(f"step_size must be > 0, got {alpha}")

    generator = torch.Generator().manual_seed(seed)
    inputs = torch.as_tensor(np.ascontiguousarray(x), dtype=torch.float32)
    labels = torch.as_tensor(np.asarray(y), dtype=torch.int64)
    out = np.empty(inputs.shape, dtype=np.float32)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(inputs), batch_size):
            clean = inputs[start : start + batch_size]
            target = labels[start : start + batch_size]
            lower, upper = (clean - eps).clamp(0.0, 1.0), (clean + eps).clamp(0.0, 1.0)
            noise = torch.rand(clean.shape, generator=generator) * (2 * eps) - eps
            adv = torch.minimum(torch.maximum(clean + noise, lower), upper)
            for _ in range(steps):
                adv.requires_grad_(True)
                loss = F.cross_entropy(model(adv), target, reduction="sum")
                (grad,) = torch.autograd.grad(loss, adv)
                with torch.no_grad():
                    adv = torch.minimum(torch.maximum(adv + alpha * grad.sign(), lower), upper)
            out[start : start + batch_size] = adv.detach().numpy()
    finally:
        model.train(was_training)
    return out
