"""Naming the architecture `guard train` builds: `cnn`, `resnet`, or `package.module:factory` for the user's own.

NONE retrains a model from scratch, so it needs the architecture as code (an ONNX file holds a graph with batch norm
folded away, which does not train like the original). A factory is imported and called; importing it runs the
user's own code, which is theirs to trust.
"""

from __future__ import annotations

import importlib
import inspect

import numpy as np
import torch
from torch import nn

from guard.errors import GuardError

BUILT_IN = ("cnn", "resnet")


def build(spec: str, x: np.ndarray, y: np.ndarray) -> nn.Module:
    """An untrained module for data `x` (N, C, H, W) with labels `y`; its output must have a logit per class."""
    num_classes, in_channels = int(y.max()) + 1, int(x.shape[1])
    if spec in BUILT_IN:
        from guard.eval.models import build_model

        return build_model(spec, num_classes=num_classes, in_channels=in_channels)  # type: ignore[arg-type]
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise GuardError(f"--model takes {', '.join(BUILT_IN)} or package.module:factory, got {spec!r}")
    try:
        factory = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as exc:
        raise GuardError(f"cannot import {spec!r}: {exc}") from None
    accepted = inspect.signature(factory).parameters
    kwargs = {k: v for k, v in (("num_classes", num_classes), ("in_channels", in_channels)) if k in accepted}
    model = factory(**kwargs)
    if not isinstance(model, nn.Module):
        raise GuardError(f"{spec} returned {type(model).__name__}, not a torch nn.Module")
    with torch.no_grad():
        out = model.eval()(torch.as_tensor(x[:2]))
    if out.ndim != 2 or out.shape[1] < num_classes:
        raise GuardError(f"{spec}'s output has shape {tuple(out.shape)}; it needs (N, >= {num_classes}) logits")
    return model
