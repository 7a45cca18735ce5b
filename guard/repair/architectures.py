"""Naming the architecture `guard train` builds and `guard export` exports: `cnn`, `resnet`, or
`package.module:factory` for the user's own.

NONE retrains a model from scratch, so it needs the architecture as code (an ONNX file holds a graph with batch norm
folded away, which does not train like the original). A factory is imported and called; importing it runs the
user's own code, which is theirs to trust.
"""

from __future__ import annotations

import importlib
import inspect
import os
import pickle
import sys
import warnings
import zipfile
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from guard.errors import GuardError

BUILT_IN = ("cnn", "resnet")


def build(spec: str, x: np.ndarray, y: np.ndarray) -> nn.Module:
    """An untrained module for data `x` (N, C, H, W) with labels `y`; its output must have a logit per class, no
    more (a class without samples is one the model never learns, and calibration then finds none of it)."""
    num_classes = int(y.max()) + 1
    model = make(spec, num_classes, int(x.shape[1]))
    classes = check_logits(model, spec, tuple(x.shape[1:]), num_classes)
    if classes != num_classes:
        raise GuardError(f"{spec} answers {classes} logits, but the labels name {num_classes} classes (a factory is "
                         "given num_classes only where it takes an argument of that name)")
    check_training_output(model, spec, tuple(x.shape[1:]), num_classes)
    check_channels_last(model, spec, tuple(x.shape[1:]))
    return model


def check_training_output(model: nn.Module, spec: str, sample_shape: tuple[int, ...], num_classes: int) -> None:
    """A GuardError unless `model` in training mode also answers (N, num_classes) logits: some answer a tuple there
    (an auxiliary head's logits beside the main ones), which the training's loss cannot take. The module's state is
    put back after, so that batch norm's running statistics stay untouched."""
    saved = {name: value.detach().clone() for name, value in model.state_dict().items()}
    try:
        with torch.no_grad():
            out = model.train()(torch.zeros(2, *sample_shape))
    except Exception as exc:  # noqa: BLE001 - the user's forward
        raise GuardError(f"{spec} cannot run in training mode on samples of shape {sample_shape} "
                         f"({type(exc).__name__}: {' '.join(str(exc).split())})") from None
    finally:  # batch norm's running statistics as they were
        model.load_state_dict(saved)
        model.eval()
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, num_classes):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise GuardError(f"{spec} answers {shape} in training mode; guard trains on (N, {num_classes}) logits: "
                         "return the logits alone there too")


def check_channels_last(model: nn.Module, spec: str, sample_shape: tuple[int, ...]) -> None:
    """A GuardError unless `model` runs on channels-last weights and inputs, the layout guard trains and records in
    (`guard.eval.models.channels_last`): `x.view(len(x), -1)` after a conv fails there, `x.flatten(1)` does not."""
    from guard.eval.models import channels_last

    try:
        with torch.no_grad(), channels_last(model):
            model.eval()(torch.zeros(2, *sample_shape).contiguous(memory_format=torch.channels_last))
    except Exception as exc:  # noqa: BLE001 - the user's forward
        raise GuardError(f"{spec} fails on channels-last tensors, the layout guard trains in "
                         f"({type(exc).__name__}: {' '.join(str(exc).split())}); flatten with x.flatten(1) or "
                         "x.reshape(len(x), -1) rather than x.view") from None


def make(spec: str, num_classes: int | None, in_channels: int) -> nn.Module:
    """The module `spec` names, built for `num_classes` (None: the factory's own default) and `in_channels`; a
    factory is given those of the two it takes."""
    if spec in BUILT_IN:
        from guard.eval.models import build_model

        return build_model(spec, num_classes=10 if num_classes is None else num_classes,  # type: ignore[arg-type]
                           in_channels=in_channels)
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise GuardError(f"the architecture must be {', '.join(BUILT_IN)} or package.module:factory, got {spec!r}")
    if "" not in sys.path and os.getcwd() not in sys.path:  # the installed `guard` script lacks what `python -m` has
        sys.path.append(os.getcwd())
    try:
        factory = getattr(importlib.import_module(module_name), attribute)
    except Exception as exc:  # noqa: BLE001 - the user's module may fail to import in any way
        raise GuardError(f"cannot import {spec!r}: {exc}") from None
    if not callable(factory):
        raise GuardError(f"{spec} is not callable (a {type(factory).__name__} object); name a function or class that "
                         "builds the module")
    try:
        accepted = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # a callable whose signature Python cannot tell: called with nothing
        accepted = {}
    kwargs = {k: v for k, v in (("num_classes", num_classes), ("in_channels", in_channels))
              if k in accepted and v is not None}
    try:
        model = factory(**kwargs)
    except Exception as exc:  # noqa: BLE001 - the user's code; a required argument it was not given is a TypeError
        raise GuardError(f"{spec}({', '.join(f'{k}={v}' for k, v in kwargs.items())}) failed "
                         f"({type(exc).__name__}): {exc}") from None
    if not isinstance(model, nn.Module):
        raise GuardError(f"{spec} returned {type(model).__name__}, not a torch nn.Module")
    return model


def check_logits(model: nn.Module, spec: str, sample_shape: tuple[int, ...], num_classes: int) -> int:
    """The number of logits `model` answers two zero samples of `sample_shape` with; a GuardError unless (N, K) with
    K >= `num_classes` (and at least 2)."""
    try:
        with torch.no_grad():
            out = model.eval()(torch.zeros(2, *sample_shape))
    except Exception as exc:  # noqa: BLE001 - the user's forward: a shape it cannot take, an assertion, ...
        raise GuardError(f"{spec} cannot run on samples of shape {sample_shape} ({type(exc).__name__}): "
                         f"{' '.join(str(exc).split())}") from None
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[1] < max(num_classes, 2):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise GuardError(f"{spec}'s output has shape {shape}; it needs (N, >= {max(num_classes, 2)}) logits")
    return int(out.shape[1])


def export_checked(model: nn.Module, spec: str, sample_shape: tuple[int, ...], path: Path) -> None:
    """Export `model` to the ONNX file guard reads, then check it: guard's own loader takes it (a Softmax output, an
    opset too old are refused there) and ONNX Runtime answers four random samples as the torch module does."""
    import onnxruntime as ort

    from guard.eval.models import export_onnx
    from guard.model.graph import load_model

    probe = np.random.default_rng(0).random((4, *sample_shape), dtype=np.float32)
    try:
        with torch.no_grad():
            expected = model.eval()(torch.as_tensor(probe)).numpy()
    except Exception as exc:  # noqa: BLE001 - the user's forward, which took a batch of 2 in check_logits
        raise GuardError(f"{spec} cannot run on a batch of 4 ({type(exc).__name__}: {' '.join(str(exc).split())}); "
                         "guard serves and calibrates batches of any size") from None
    try:
        export_onnx(model, path, torch.zeros(1, *sample_shape))
    except Exception as exc:  # noqa: BLE001 - the exporter raises many types; each means this module does not export
        stopped = _stop_within(exc)
        if stopped is not None:
            raise stopped from None
        raise GuardError(f"torch.onnx.export failed on {spec} ({type(exc).__name__}): "
                         f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}") from None
    exported = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim
    if exported and exported[0].HasField("dim_value"):
        raise GuardError(f"{spec} exported with its batch size fixed at {exported[0].dim_value}: its forward turns the "
                         "batch size into a number (int(x.shape[0]), a batch size written out); keep it symbolic, "
                         "as x.flatten(1) does")
    load_model(path)  # a file guard cannot read is not written
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: probe})[0]
    worst = float(np.abs(got - expected).max())
    if not worst <= 1e-3 * max(1.0, float(np.abs(expected).max())):
        raise GuardError(f"the exported graph answers differently from the torch module (max difference "
                         f"{worst:.3g}); export it yourself with torch.onnx.export")


def _stop_within(exc: BaseException) -> BaseException | None:
    """A Ctrl-C or SIGTERM (as SystemExit) inside the exporter's error: one that cut short a lazy import in
    torch.export came back as an AttributeError wrapped in TorchExportError, and was reported as a model that does
    not export."""
    seen = exc.__cause__ or exc.__context__
    while seen is not None and isinstance(seen, Exception):
        seen = seen.__cause__ or seen.__context__
    return seen


def load_weights(model: nn.Module, path: Path) -> None:
    """Load a state dict into `model`, strictly: `.safetensors`, or a torch file read with weights_only (no pickled
    code runs). Missing, unexpected and misshapen entries are a GuardError naming them."""
    if not path.is_file():
        raise GuardError(f"weights file not found: {path}")
    try:
        if _is_safetensors(path):
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            with warnings.catch_warnings():  # torch's own warnings about the file, ahead of guard's one error line
                warnings.simplefilter("ignore")
                state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch.save's zip archive, or its legacy format naming a global it may not load
        if not zipfile.is_zipfile(path) and "GLOBAL" not in str(exc):
            raise GuardError(f"cannot read weights from {path}: not a torch.save or .safetensors file") from None
        raise GuardError(f"{path} holds pickled objects besides tensors (a whole module?); guard loads weights "
                         "with weights_only, so no code from the file runs: save model.state_dict(), or "
                         ".safetensors") from None
    except Exception as exc:  # noqa: BLE001 - torch and safetensors raise many types; each means unreadable
        raise GuardError(f"cannot read weights from {path} ({type(exc).__name__}): {str(exc).splitlines()[0]}") \
            from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # a checkpoint that wraps its state dict
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise GuardError(f"{path} holds no state dict of tensors (save with torch.save(model.state_dict(), ...))")
    own = model.state_dict()
    kinds = {k: (v.dtype, own[k].dtype) for k, v in state.items()
             if k in own and _kind(v.dtype) != _kind(own[k].dtype)}
    if kinds:  # load_state_dict casts them: quantized int8 weights became float weights of -127..127
        named = ", ".join(f"{k} ({got} for {want})" for k, (got, want) in list(kinds.items())[:5])
        raise GuardError(f"the weights in {path} are not of the architecture's number kinds: {named}; give float "
                         "weights (dequantize a quantized model first)")
    broken = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v.float()).all())]
    if broken:
        raise GuardError(f"the weights in {path} hold NaN or Inf in {broken[:5]}")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise GuardError(f"the weights in {path} do not fit the architecture: {' '.join(str(exc).split())}") \
            from None


def _kind(dtype: torch.dtype) -> str:
    return "float" if dtype.is_floating_point else "complex" if dtype.is_complex else "bool" \
        if dtype == torch.bool else "integer"


def _is_safetensors(path: Path) -> bool:
    """By content, whatever the file's name: an 8-byte little-endian header length, then the JSON header."""
    with path.open("rb") as file:
        head = file.read(9)
    return len(head) == 9 and head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") <= path.stat().st_size
