"""Differentiable views of a model that expose its taps by ONNX tensor name.

Calibration needs gradients (benign salience) and masked forwards (mask selection, benign re-prediction), so it runs
in torch: either on a module built from the ONNX graph (`OnnxTaps`), or on the user's own torch module (`ModuleTaps`),
whose submodule outputs are matched to the ONNX tap tensors by value so both paths speak the same layer names.
Both follow one rule: a mask multiplies the tap before anything downstream reads it, and the tap as recorded is the
value before the mask, exactly as the served graph (mask folded into the next layer's weights) behaves.
"""

from __future__ import annotations

import copy
from typing import Protocol

import numpy as np
import onnx
import torch

from guard.errors import ModelError
from guard.model.bridge import OnnxModule
from guard.model.graph import LoadedModel


class TapModel(Protocol):
    """A model that returns its logits and the tensors at `taps`, optionally with channel masks applied."""

    taps: list[str]

    def run(self, x: torch.Tensor, masks: list[torch.Tensor] | None = None,
            bounds: list[torch.Tensor | None] | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Logits (N, K) and one tensor per tap (before masking).

        `masks[i]` is (N, C) or (1, C) for tap i, 1 = keep; `bounds[i]` (C, H, W) or None also zeroes the units of
        tap i that exceed it.
        """
        ...


def _mask_for(activation: torch.Tensor, mask: torch.Tensor | None, bound: torch.Tensor | None) -> torch.Tensor:
    """The multiplier for one tap: channel mask broadcast over space, times 0 where a unit exceeds its bound."""
    keep = torch.ones((), dtype=activation.dtype)
    if mask is not None:
        keep = mask.reshape(*mask.shape, *([1] * (activation.dim() - 2))).to(activation.dtype)
    if bound is not None:
        keep = keep * (activation <= bound).to(activation.dtype)
    return keep


def _tap_masks(masks: list[torch.Tensor] | None, bounds: list[torch.Tensor | None] | None,
               count: int) -> list[tuple[torch.Tensor | None, torch.Tensor | None]] | None:
    if masks is None and (bounds is None or all(b is None for b in bounds)):
        return None
    return list(zip(masks or [None] * count, bounds or [None] * count, strict=True))


class OnnxTaps:
    """Taps of an ONNX model, run in torch by guard's own graph executor."""

    def __init__(self, model: LoadedModel, taps: list[str]) -> None:
        self.taps = list(taps)
        self.module = OnnxModule(model.proto).eval()
        self.output_name = model.output_name

    def run(self, x: torch.Tensor, masks: list[torch.Tensor] | None = None,
            bounds: list[torch.Tensor | None] | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        pairs = _tap_masks(masks, bounds, len(self.taps))
        tap_masks = None
        if pairs is not None:
            tap_masks = {
                tap: (lambda act, m=m, b=b: _mask_for(act, m, b)) for tap, (m, b) in zip(self.taps, pairs, strict=True)
            }
        outputs, captured = self.module.run(x, capture=self.taps, masks=tap_masks)
        return outputs[self.output_name], [captured[t] for t in self.taps]


class ModuleTaps:
    """Taps of the user's own torch module, located by matching submodule outputs to the ONNX tap tensors."""

    def __init__(self, module: torch.nn.Module, model: LoadedModel, taps: list[str], probe: np.ndarray) -> None:
        self.taps = list(taps)
        self.module = module.eval()
        self.submodules = _match_submodules(module, model, taps, probe)
        self._masks: list[tuple[torch.Tensor | None, torch.Tensor | None]] | None = None
        self._captured: list[torch.Tensor | None] = [None] * len(taps)

    def _hook(self, index: int):
        def hook(_module: torch.nn.Module, _inputs: object, output: torch.Tensor) -> torch.Tensor:
            self._captured[index] = output
            if self._masks is None:
                return output
            return output * _mask_for(output, *self._masks[index])

        return hook

    def run(self, x: torch.Tensor, masks: list[torch.Tensor] | None = None,
            bounds: list[torch.Tensor | None] | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        self._masks = _tap_masks(masks, bounds, len(self.taps))
        self._captured = [None] * len(self.taps)
        # Hooks live only for this call: the user's module is left as it was given.
        handles = [sub.register_forward_hook(self._hook(i)) for i, sub in enumerate(self.submodules)]
        try:
            logits = self.module(x)
        finally:
            self._masks = None
            for handle in handles:
                handle.remove()
        if any(c is None for c in self._captured):
            raise ModelError("a matched submodule did not run in forward; the module's graph depends on its input")
        return logits, list(self._captured)  # type: ignore[arg-type]


def _match_submodules(module: torch.nn.Module, model: LoadedModel, taps: list[str],
                      probe: np.ndarray) -> list[torch.nn.Module]:
    """For each ONNX tap, the deepest submodule whose output equals it on a probe batch."""
    import onnxruntime as ort

    proto = copy.deepcopy(model.proto)
    proto.graph.output.extend(onnx.helper.make_empty_tensor_value_info(t) for t in taps)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    expected = session.run(taps, {model.input_name: probe.astype(np.float32)})
    seen: list[tuple[str, torch.nn.Module, torch.Tensor]] = []
    handles = [
        sub.register_forward_hook(lambda m, _i, out, name=name: seen.append((name, m, out)))
        for name, sub in module.named_modules() if name
    ]
    try:
        with torch.no_grad():
            module.eval()(torch.from_numpy(probe.astype(np.float32)))
    finally:
        for handle in handles:
            handle.remove()
    matched = []
    for tap, value in zip(taps, expected, strict=True):
        candidates = [
            (name, sub) for name, sub, out in seen
            if isinstance(out, torch.Tensor) and tuple(out.shape) == value.shape
            and np.allclose(out.detach().numpy(), value, atol=1e-4, rtol=1e-3)
        ]
        if not candidates:
            raise ModelError(
                f"no submodule of the torch module outputs what ONNX tensor {tap!r} holds; "
                "is the ONNX file an export of this module with the same weights?"
            )
        # A module that runs more than once (torchvision's BasicBlock reuses its ReLU) would have its hook keep the
        # last call and mask every one; a parent that runs once and outputs the same tensor serves instead.
        once = [(name, sub) for name, sub in candidates if sum(sub is other for _, other, _ in seen) == 1]
        if not once:
            name = max(candidates, key=lambda c: c[0].count("."))[0]
            raise ModelError(f"submodule {name!r}, which outputs ONNX tensor {tap!r}, runs more than once per forward "
                             "(one module reused): its calls cannot be told apart; calibrate without torch_module, or "
                             "give each call its own module")
        matched.append(max(once, key=lambda c: c[0].count("."))[1])
    return matched
