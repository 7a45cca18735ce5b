"""Run an ONNX graph node by node with torch functions.

Why this exists: guard needs what ONNX Runtime does not give, namely gradients of the model's output with
respect to intermediate activations, the activations themselves (read by their ONNX tensor name), and the
ability to mask channels of an activation before the rest of the graph sees it. onnx2torch cannot convert
the graphs that torch 2.13 exports (opset 20), so this module interprets the graph itself: each node is
compiled once into a small torch function, and :meth:`OnnxModule.run` evaluates them in graph order.

Only inference semantics are implemented (BatchNormalization uses running statistics, Dropout is the
identity; both refuse training mode). Shape arithmetic (Shape, Gather, Concat, Reshape, ...) runs on int64
tensors; values that torch needs as Python ints are read with ``tolist()``, so the module is not meant to be
traced or scripted.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper

from guard.errors import ModelError, UnsupportedOpError

__all__ = ["OnnxModule"]

Tensor = torch.Tensor
# A compiled node: tensors in (None for an omitted optional input), one tensor or a sequence out.
Kernel = Callable[[list[Any]], Any]
# Slice ends that ONNX Runtime reads as "through the end of the axis" (its first element, for a negative step).
_INT32_MAX, _INT64_MAX = 2**31 - 1, 2**63 - 1

_DTYPES: dict[int, torch.dtype] = {
    onnx.TensorProto.FLOAT: torch.float32,
    onnx.TensorProto.DOUBLE: torch.float64,
    onnx.TensorProto.FLOAT16: torch.float16,
    onnx.TensorProto.BFLOAT16: torch.bfloat16,
    onnx.TensorProto.INT8: torch.int8,
    onnx.TensorProto.INT16: torch.int16,
    onnx.TensorProto.INT32: torch.int32,
    onnx.TensorProto.INT64: torch.int64,
    onnx.TensorProto.UINT8: torch.uint8,
    onnx.TensorProto.UINT16: torch.uint16,
    onnx.TensorProto.UINT32: torch.uint32,
    onnx.TensorProto.UINT64: torch.uint64,
    onnx.TensorProto.BOOL: torch.bool,
}


@dataclass(frozen=True)
class _Node:
    """What a converter needs to know about one ONNX node."""

    name: str
    op_type: str
    attrs: dict[str, Any]
    opset: int
    n_inputs: int
    n_outputs: int

    def unsupported(self, what: str) -> UnsupportedOpError:
        return UnsupportedOpError(f"{self.op_type} node {self.name!r}: {what} is not supported by the torch bridge")


# ----------------------------------------------------------------------------------------------- helpers


def _to_torch(proto: onnx.TensorProto) -> Tensor:
    """An ONNX TensorProto as a (writable, owned) torch tensor."""
    if proto.data_type not in _DTYPES:
        name = onnx.TensorProto.DataType.Name(proto.data_type)
        raise ModelError(f"tensor {proto.name!r} has data type {name}, which the torch bridge cannot hold")
    if proto.data_type == onnx.TensorProto.BFLOAT16:
        arr = numpy_helper.to_array(proto)
        return torch.from_numpy(np.ascontiguousarray(arr).view(np.uint16).copy()).view(torch.bfloat16)
    return torch.from_numpy(np.array(numpy_helper.to_array(proto), copy=True))


def _ints(t: Tensor | None) -> list[int] | None:
    """An int tensor (shape, axes, pads, ...) as a flat Python list, or None."""
    return None if t is None else [int(v) for v in t.reshape(-1).tolist()]


def _opt(inputs: list[Any], i: int) -> Any:
    """The i-th input, or None when it is omitted."""
    return inputs[i] if i < len(inputs) else None


def _axes(inputs: list[Any], i: int, attr: Sequence[int] | None) -> list[int] | None:
    """Axes given as input i (newer opsets) or as an attribute (older opsets)."""
    given = _opt(inputs, i)
    return _ints(given) if given is not None else (list(attr) if attr is not None else None)


def _norm(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def _torch_pad(begins: Sequence[int], ends: Sequence[int]) -> list[int]:
    """ONNX per-axis begin/end pads (first axis first) as F.pad's list (last axis first)."""
    out: list[int] = []
    for b, e in zip(reversed(begins), reversed(ends)):
        out += [b, e]
    return out


def _spatial_pads(node: _Node, x: Tensor, kernel: Sequence[int], strides: Sequence[int],
                  dilations: Sequence[int], pool: bool = False) -> tuple[list[int], list[int]]:
    """Begin and end pads of the spatial axes, resolving auto_pad against the input shape. Where SAME would need a
    negative pad (a stride above the kernel), ONNX Runtime pads a Conv by none and refuses a `pool` at run time."""
    nd = len(kernel)
    auto_pad = node.attrs.get("auto_pad", "NOTSET")
    if auto_pad in ("NOTSET", ""):
        pads = list(node.attrs.get("pads", [0] * (2 * nd)))
        return pads[:nd], pads[nd:]
    if auto_pad == "VALID":
        return [0] * nd, [0] * nd
    begins, ends = [], []
    for size, k, s, d in zip(x.shape[2:], kernel, strides, dilations):
        out = -(-size // s)
        total = (out - 1) * s + (k - 1) * d + 1 - size
        if total < 0 and pool:
            raise node.unsupported(f"auto_pad={auto_pad!r} on an input of size {size} with stride {s} above kernel "
                                   f"{k} (a negative pad)")
        total = max(total, 0)
        small, big = total // 2, total - total // 2
        begins.append(small if auto_pad == "SAME_UPPER" else big)
        ends.append(big if auto_pad == "SAME_UPPER" else small)
    return begins, ends


def _check_auto_pad(node: _Node) -> None:
    auto_pad = node.attrs.get("auto_pad", "NOTSET")
    if auto_pad not in ("NOTSET", "", "VALID", "SAME_UPPER", "SAME_LOWER"):
        raise node.unsupported(f"auto_pad={auto_pad!r}")
    # ONNX Runtime refuses Conv here and pads MaxPool as if the kernel were not dilated (not what the spec says).
    if auto_pad.startswith("SAME") and any(d != 1 for d in node.attrs.get("dilations", ())):
        raise node.unsupported(f"auto_pad={auto_pad!r} with dilations other than 1")


# -------------------------------------------------------------------------------------------- converters

_CONVERTERS: dict[str, Callable[[_Node], Kernel]] = {}


def _register(*op_types: str) -> Callable[[Callable[[_Node], Kernel]], Callable[[_Node], Kernel]]:
    def deco(fn: Callable[[_Node], Kernel]) -> Callable[[_Node], Kernel]:
        for op in op_types:
            _CONVERTERS[op] = fn
        return fn

    return deco


def _simple(op_type: str, fn: Callable[..., Tensor]) -> None:
    """Register an op whose inputs map one to one onto fn's positional arguments."""
    _CONVERTERS[op_type] = lambda node: lambda inputs: fn(*inputs)


for _op, _fn in {
    "Sqrt": torch.sqrt, "Neg": torch.neg, "Exp": torch.exp, "Log": torch.log, "Abs": torch.abs,
    "Erf": torch.erf, "Relu": torch.relu, "Sigmoid": torch.sigmoid, "Tanh": torch.tanh,
    "Reciprocal": torch.reciprocal, "Floor": torch.floor, "Ceil": torch.ceil, "Sign": torch.sign,
    "Not": torch.logical_not, "HardSwish": F.hardswish, "Softplus": F.softplus,
    "Add": torch.add, "Sub": torch.sub, "Mul": torch.mul, "MatMul": torch.matmul,
    "Equal": torch.eq, "Less": torch.lt, "LessOrEqual": torch.le, "Greater": torch.gt,
    "GreaterOrEqual": torch.ge, "And": torch.logical_and, "Or": torch.logical_or,
    "Identity": lambda x: x,
    "Where": lambda c, x, y: torch.where(c.bool(), x, y),
    "Pow": lambda x, y: torch.pow(x, y).to(x.dtype),
    "CastLike": lambda x, like: x.to(like.dtype),
}.items():
    _simple(_op, _fn)


@_register("Div")
def _div(node: _Node) -> Kernel:
    def run(inputs: list[Any]) -> Tensor:
        a, b = inputs
        if a.is_floating_point():
            return a / b
        return torch.div(a, b, rounding_mode="trunc")  # ONNX integer Div truncates like C

    return run


@_register("Max", "Min", "Sum", "Mean")
def _variadic(node: _Node) -> Kernel:
    pair = {"Max": torch.maximum, "Min": torch.minimum, "Sum": torch.add, "Mean": torch.add}[node.op_type]

    def run(inputs: list[Any]) -> Tensor:
        out = inputs[0]
        for t in inputs[1:]:
            out = pair(out, t)
        return out / len(inputs) if node.op_type == "Mean" else out

    return run


@_register("Dropout")
def _dropout(node: _Node) -> Kernel:
    # Inference: the identity. A requested mask output is all True (nothing dropped).
    def run(inputs: list[Any]) -> list[Tensor]:
        x, training = inputs[0], _opt(inputs, 2)
        if training is not None and bool(training):  # ONNX Runtime drops at random then
            raise node.unsupported("training mode (a training_mode input that is true)")
        return [x, torch.ones_like(x, dtype=torch.bool)][: node.n_outputs]

    return run


@_register("LeakyRelu")
def _leaky_relu(node: _Node) -> Kernel:
    alpha = float(node.attrs.get("alpha", 0.01))
    return lambda inputs: F.leaky_relu(inputs[0], alpha)


@_register("Elu")
def _elu(node: _Node) -> Kernel:
    alpha = float(node.attrs.get("alpha", 1.0))
    return lambda inputs: F.elu(inputs[0], alpha)


@_register("HardSigmoid")
def _hard_sigmoid(node: _Node) -> Kernel:
    alpha, beta = float(node.attrs.get("alpha", 0.2)), float(node.attrs.get("beta", 0.5))
    return lambda inputs: torch.clamp(inputs[0] * alpha + beta, 0.0, 1.0)


@_register("Gelu")
def _gelu(node: _Node) -> Kernel:
    approximate = node.attrs.get("approximate", "none")
    return lambda inputs: F.gelu(inputs[0], approximate=approximate)


@_register("Softmax", "LogSoftmax")
def _softmax(node: _Node) -> Kernel:
    fn = torch.softmax if node.op_type == "Softmax" else torch.log_softmax
    if node.opset >= 13:
        axis = int(node.attrs.get("axis", -1))
        return lambda inputs: fn(inputs[0], axis)
    axis = int(node.attrs.get("axis", 1))

    def run(inputs: list[Any]) -> Tensor:  # before opset 13: over all axes from `axis` on, as one
        x = inputs[0]
        a = _norm(axis, x.dim())
        return fn(x.reshape(math.prod(x.shape[:a]), -1), 1).reshape(x.shape)

    return run


@_register("Clip")
def _clip(node: _Node) -> Kernel:
    lo_attr, hi_attr = node.attrs.get("min"), node.attrs.get("max")  # attributes before opset 11

    def run(inputs: list[Any]) -> Tensor:
        x, lo, hi = inputs[0], _opt(inputs, 1), _opt(inputs, 2)
        lo = lo if lo is not None else lo_attr
        hi = hi if hi is not None else hi_attr
        if lo is None and hi is None:
            return x
        return torch.clamp(x, lo, hi)

    return run


@_register("Conv")
def _conv(node: _Node) -> Kernel:
    _check_auto_pad(node)
    group = int(node.attrs.get("group", 1))

    def run(inputs: list[Any]) -> Tensor:
        x, w, b = inputs[0], inputs[1], _opt(inputs, 2)
        nd = w.dim() - 2
        kernel = list(node.attrs.get("kernel_shape", w.shape[2:]))
        strides = list(node.attrs.get("strides", [1] * nd))
        dilations = list(node.attrs.get("dilations", [1] * nd))
        begins, ends = _spatial_pads(node, x, kernel, strides, dilations)
        conv = (F.conv1d, F.conv2d, F.conv3d)[nd - 1]
        if nd == 2:  # oneDNN's channels-last kernels: the scan 1.3x faster on the SmallResNet, same answers to rounding
            x, w = x.contiguous(memory_format=torch.channels_last), w.contiguous(memory_format=torch.channels_last)
        if begins == ends:
            return conv(x, w, b, strides, begins, dilations, group)
        return conv(F.pad(x, _torch_pad(begins, ends)), w, b, strides, 0, dilations, group)

    return run


@_register("ConvTranspose")
def _conv_transpose(node: _Node) -> Kernel:
    if node.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "", "VALID"):
        raise node.unsupported(f"auto_pad={node.attrs['auto_pad']!r}")
    if "output_shape" in node.attrs:
        raise node.unsupported("the output_shape attribute")
    group = int(node.attrs.get("group", 1))

    def run(inputs: list[Any]) -> Tensor:
        x, w, b = inputs[0], inputs[1], _opt(inputs, 2)
        nd = w.dim() - 2
        strides = list(node.attrs.get("strides", [1] * nd))
        dilations = list(node.attrs.get("dilations", [1] * nd))
        pads = list(node.attrs.get("pads", [0] * (2 * nd)))
        if node.attrs.get("auto_pad") == "VALID":
            pads = [0] * (2 * nd)
        extra = list(node.attrs.get("output_padding", [0] * nd))
        conv = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[nd - 1]
        # Full output, then crop the pads and append output_padding; the bias goes on everything.
        y = conv(x, w, None, strides, 0, 0, group, dilations)
        y = F.pad(y, _torch_pad([-p for p in pads[:nd]], [e - p for e, p in zip(extra, pads[nd:])]))
        return y if b is None else y + b.reshape(1, -1, *([1] * nd))

    return run


@_register("Gemm")
def _gemm(node: _Node) -> Kernel:
    alpha, beta = float(node.attrs.get("alpha", 1.0)), float(node.attrs.get("beta", 1.0))
    trans_a, trans_b = bool(node.attrs.get("transA", 0)), bool(node.attrs.get("transB", 0))

    def run(inputs: list[Any]) -> Tensor:
        a, b, c = inputs[0], inputs[1], _opt(inputs, 2)
        a = a.t() if trans_a else a
        if trans_b and alpha == 1.0 and beta == 1.0 and (c is None or c.dim() <= 1):
            return F.linear(a, b, c)
        y = a @ (b.t() if trans_b else b)
        y = y * alpha if alpha != 1.0 else y
        if c is not None and beta != 0.0:  # beta 0 leaves C out, as ONNX Runtime does: 0 * inf is NaN
            y = y + (c * beta if beta != 1.0 else c)
        return y

    return run


@_register("BatchNormalization")
def _batch_norm(node: _Node) -> Kernel:
    if int(node.attrs.get("training_mode", 0)) or node.n_outputs > 1:
        raise node.unsupported("training mode (batch statistics or running-stat outputs)")
    eps = float(node.attrs.get("epsilon", 1e-5))

    def run(inputs: list[Any]) -> Tensor:
        x, scale, bias, mean, var = inputs[:5]
        return F.batch_norm(x, mean, var, scale, bias, training=False, eps=eps)

    return run


@_register("LayerNormalization")
def _layer_norm(node: _Node) -> Kernel:
    if node.n_outputs > 1:
        raise node.unsupported("the Mean and InvStdDev outputs")
    axis, eps = int(node.attrs.get("axis", -1)), float(node.attrs.get("epsilon", 1e-5))
    stash_float32 = int(node.attrs.get("stash_type", 1)) == 1  # statistics in float32 for a float16 input

    def run(inputs: list[Any]) -> Tensor:
        x, scale, bias = inputs[0], inputs[1], _opt(inputs, 2)
        dims = list(range(_norm(axis, x.dim()), x.dim()))
        if stash_float32 and x.dtype in (torch.float16, torch.bfloat16):  # scaled in float32 too, as ORT's kernel
            wide, scale, bias = x.float(), scale.float(), None if bias is None else bias.float()
        else:
            wide = x
        var, mean = torch.var_mean(wide, dim=dims, correction=0, keepdim=True)
        y = (wide - mean) * torch.rsqrt(var + eps) * scale
        return (y if bias is None else y + bias).to(x.dtype)

    return run


def _pool_geometry(node: _Node) -> tuple[list[int], list[int], list[int]]:
    kernel = list(node.attrs["kernel_shape"])
    nd = len(kernel)
    return kernel, list(node.attrs.get("strides", [1] * nd)), list(node.attrs.get("dilations", [1] * nd))


def _ceil_crop(y: Tensor, sizes: Sequence[int], kernel: Sequence[int], strides: Sequence[int],
               dilations: Sequence[int], begins: Sequence[int], ends: Sequence[int]) -> Tensor:
    """An explicitly padded ceil_mode pool cropped to ONNX Runtime's output size.

    Torch keeps a last window that starts inside its (here already padded) input; ONNX Runtime keeps it only
    when it starts inside the input or the begin pad, so with an end pad larger than the begin pad torch has
    one more window on that axis (all pad: -inf for MaxPool, NaN or another mean for AveragePool).
    """
    index = [slice(None)] * (y.dim() - len(kernel))
    for size, k, s, d, b, e in zip(sizes, kernel, strides, dilations, begins, ends):
        out = -(-(size + b + e - (k - 1) * d - 1) // s) + 1  # ONNX Runtime's pool_attributes.h
        index.append(slice(0, out - 1 if (out - 1) * s >= size + b else out))
    return y[tuple(index)]


@_register("MaxPool")
def _max_pool(node: _Node) -> Kernel:
    _check_auto_pad(node)
    if node.n_outputs > 1:
        raise node.unsupported("the Indices output")
    kernel, strides, dilations = _pool_geometry(node)
    ceil_mode = bool(node.attrs.get("ceil_mode", 0))
    pool = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[len(kernel) - 1]

    def run(inputs: list[Any]) -> Tensor:
        x = inputs[0]
        begins, ends = _spatial_pads(node, x, kernel, strides, dilations, pool=True)
        if begins == ends and all(p <= k // 2 for p, k in zip(begins, kernel)):
            return pool(x, kernel, strides, begins, dilations, ceil_mode)
        y = pool(F.pad(x, _torch_pad(begins, ends), value=float("-inf")), kernel, strides, 0, dilations, ceil_mode)
        return _ceil_crop(y, x.shape[2:], kernel, strides, dilations, begins, ends) if ceil_mode else y

    return run


@_register("AveragePool")
def _avg_pool(node: _Node) -> Kernel:
    _check_auto_pad(node)
    kernel, strides, dilations = _pool_geometry(node)
    if any(d != 1 for d in dilations):
        raise node.unsupported("dilations other than 1")
    ceil_mode = bool(node.attrs.get("ceil_mode", 0))
    include_pad = bool(node.attrs.get("count_include_pad", 0))
    pool = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[len(kernel) - 1]

    def run(inputs: list[Any]) -> Tensor:
        x = inputs[0]
        begins, ends = _spatial_pads(node, x, kernel, strides, dilations, pool=True)
        if begins == ends and all(p <= k // 2 for p, k in zip(begins, kernel)):
            return pool(x, kernel, strides, begins, ceil_mode, include_pad)
        pads = _torch_pad(begins, ends)
        y = pool(F.pad(x, pads), kernel, strides, 0, ceil_mode)
        if not include_pad:  # divide by the share of each window's elements that were real (not padding)
            ones = torch.ones((1, 1, *x.shape[2:]), dtype=x.dtype, device=x.device)
            y = y / pool(F.pad(ones, pads), kernel, strides, 0, ceil_mode)
        return _ceil_crop(y, x.shape[2:], kernel, strides, dilations, begins, ends) if ceil_mode else y

    return run


@_register("GlobalAveragePool", "GlobalMaxPool")
def _global_pool(node: _Node) -> Kernel:
    fn = torch.mean if node.op_type == "GlobalAveragePool" else torch.amax
    return lambda inputs: fn(inputs[0], dim=tuple(range(2, inputs[0].dim())), keepdim=True)


@_register("Flatten")
def _flatten(node: _Node) -> Kernel:
    axis = int(node.attrs.get("axis", 1))

    def run(inputs: list[Any]) -> Tensor:
        x = inputs[0]
        a = _norm(axis, x.dim())
        return x.reshape(math.prod(x.shape[:a]), math.prod(x.shape[a:]))

    return run


@_register("Reshape")
def _reshape(node: _Node) -> Kernel:
    allow_zero = bool(node.attrs.get("allowzero", 0))

    def run(inputs: list[Any]) -> Tensor:
        x, shape = inputs[0], _ints(inputs[1])
        assert shape is not None
        if not allow_zero:
            shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
        return x.reshape(shape)

    return run


@_register("Transpose")
def _transpose(node: _Node) -> Kernel:
    perm = node.attrs.get("perm")
    return lambda inputs: inputs[0].permute(perm if perm is not None else list(range(inputs[0].dim()))[::-1])


@_register("Squeeze")
def _squeeze(node: _Node) -> Kernel:
    def run(inputs: list[Any]) -> Tensor:
        x, axes = inputs[0], _axes(inputs, 1, node.attrs.get("axes"))
        if axes is None:
            return x.squeeze()
        return x.squeeze(tuple(_norm(a, x.dim()) for a in axes))

    return run


@_register("Unsqueeze")
def _unsqueeze(node: _Node) -> Kernel:
    def run(inputs: list[Any]) -> Tensor:
        x, axes = inputs[0], _axes(inputs, 1, node.attrs.get("axes"))
        assert axes is not None
        rank = x.dim() + len(axes)
        for a in sorted(_norm(a, rank) for a in axes):
            x = x.unsqueeze(a)
        return x

    return run


@_register("Concat")
def _concat(node: _Node) -> Kernel:
    axis = int(node.attrs["axis"])
    return lambda inputs: torch.cat([t for t in inputs if t is not None], axis)


@_register("Split")
def _split(node: _Node) -> Kernel:
    axis = int(node.attrs.get("axis", 0))
    split_attr, num_outputs = node.attrs.get("split"), node.attrs.get("num_outputs")

    def run(inputs: list[Any]) -> Sequence[Tensor]:
        x, sizes = inputs[0], _axes(inputs, 1, split_attr)
        if sizes is None:
            dim = x.shape[axis]
            if num_outputs is None:  # before opset 18: equal parts, which ONNX Runtime requires to be whole
                if dim % node.n_outputs:
                    raise ValueError(f"an axis of {dim} does not split evenly into {node.n_outputs} outputs")
                return torch.split(x, dim // node.n_outputs, axis)
            # As ONNX Runtime: parts of ceil(dim / n) and the rest last, which may be empty (6 into 4: 2, 2, 2, 0)
            # but not negative (5 into 4 is refused).
            n = int(num_outputs)
            chunk = -(-dim // n)
            last = dim - (n - 1) * chunk
            if last < 0:
                raise ValueError(f"an axis of {dim} cannot split into {n} parts of {chunk}: the last would be {last}")
            sizes = [chunk] * (n - 1) + [last]
        return torch.split(x, sizes, axis)

    return run


def _slice_bounds(start: int, end: int, step: int, dim: int) -> tuple[int, int]:
    """Start and end of a Slice axis clamped as ONNX Runtime does; Python's slice clamps a start below -dim
    to -1 (nothing) for a negative step, and knows no INT_MAX end meaning "through the last element"."""
    start += dim if start < 0 else 0
    if end in (_INT32_MAX, _INT64_MAX):
        end = -1 if step < 0 else dim
    else:
        end += dim if end < 0 else 0
    if step < 0:  # max before min: an empty axis gives start = end = -1
        return min(max(start, 0), dim - 1), min(max(end, -1), dim - 1)
    return min(max(start, 0), dim), min(max(end, 0), dim)


@_register("Slice")
def _slice(node: _Node) -> Kernel:
    def run(inputs: list[Any]) -> Tensor:
        x = inputs[0]
        if len(inputs) > 1:  # opset 10 and later: inputs
            starts, ends = _ints(inputs[1]), _ints(inputs[2])
            axes, steps = _ints(_opt(inputs, 3)), _ints(_opt(inputs, 4))
        else:  # before opset 10: attributes
            starts, ends, axes, steps = (node.attrs.get(k) for k in ("starts", "ends", "axes", "steps"))
        assert starts is not None and ends is not None
        axes = list(axes) if axes is not None else list(range(len(starts)))
        steps = list(steps) if steps is not None else [1] * len(starts)
        index: list[slice] = [slice(None)] * x.dim()
        flips: list[tuple[int, range]] = []
        for start, end, axis, step in zip(starts, ends, axes, steps):
            a = _norm(axis, x.dim())
            start, end = _slice_bounds(start, end, step, x.shape[a])
            if step > 0:
                index[a] = slice(start, max(end, start), step)
            else:
                flips.append((a, range(start, end, step)))
        y = x[tuple(index)]
        for a, r in flips:  # torch indexing has no negative steps
            y = y.index_select(a, torch.tensor(list(r), dtype=torch.long, device=x.device))
        return y

    return run


@_register("Gather")
def _gather(node: _Node) -> Kernel:
    axis = int(node.attrs.get("axis", 0))

    def run(inputs: list[Any]) -> Tensor:
        x, idx = inputs
        a = _norm(axis, x.dim())
        idx = idx.long()
        idx = torch.where(idx < 0, idx + x.shape[a], idx)
        out = x.index_select(a, idx.reshape(-1))
        return out.reshape((*x.shape[:a], *idx.shape, *x.shape[a + 1:]))

    return run


@_register("Expand")
def _expand(node: _Node) -> Kernel:
    def run(inputs: list[Any]) -> Tensor:
        x, shape = inputs[0], _ints(inputs[1])
        assert shape is not None
        return x.expand(torch.broadcast_shapes(x.shape, tuple(shape)))

    return run


@_register("Cast")
def _cast(node: _Node) -> Kernel:
    to = int(node.attrs["to"])
    if to not in _DTYPES:
        raise node.unsupported(f"casting to {onnx.TensorProto.DataType.Name(to)}")
    dtype = _DTYPES[to]
    return lambda inputs: inputs[0].to(dtype)


@_register("Shape")
def _shape(node: _Node) -> Kernel:
    start, end = node.attrs.get("start", 0), node.attrs.get("end")

    def run(inputs: list[Any]) -> Tensor:
        x = inputs[0]
        return torch.tensor(list(x.shape)[start:end], dtype=torch.int64, device=x.device)

    return run


@_register("ConstantOfShape")
def _constant_of_shape(node: _Node) -> Kernel:
    value = node.attrs.get("value")
    fill = _to_torch(value).reshape(-1) if value is not None else torch.zeros(1, dtype=torch.float32)

    def run(inputs: list[Any]) -> Tensor:
        shape = _ints(inputs[0])
        assert shape is not None
        return torch.full(shape, fill.item(), dtype=fill.dtype, device=inputs[0].device)

    return run


@_register("Range")
def _range(node: _Node) -> Kernel:
    def run(inputs: list[Any]) -> Tensor:
        # As ONNX Runtime: ceil((limit - start) / delta) elements, counted in double, none (not torch.arange's
        # error) when delta has the wrong sign; each the previous plus delta in the input's type (not start + i *
        # delta, which differs in the last bits of float32).
        start, limit, delta = (t.detach().cpu().numpy() for t in inputs)
        if not delta:
            raise ValueError("delta is zero")
        n = max(math.ceil((float(limit) - float(start)) / float(delta)), 0)
        values = np.full(n, delta, dtype=start.dtype)
        values[:1] = start
        return torch.from_numpy(np.add.accumulate(values, dtype=start.dtype)).to(inputs[0].device)

    return run


@_register("Pad")
def _pad(node: _Node) -> Kernel:
    mode = node.attrs.get("mode", "constant")
    if mode != "constant":
        raise node.unsupported(f"mode={mode!r}")

    def run(inputs: list[Any]) -> Tensor:
        x = inputs[0]
        if len(inputs) > 1:  # opset 11 and later: pads, constant_value, axes as inputs
            pads, value, axes = _ints(inputs[1]), _opt(inputs, 2), _ints(_opt(inputs, 3))
            fill = float(value.item()) if value is not None else 0.0
        else:
            pads, fill, axes = node.attrs.get("pads"), float(node.attrs.get("value", 0.0)), None
        assert pads is not None
        axes = [_norm(a, x.dim()) for a in axes] if axes is not None else list(range(x.dim()))
        begins, ends = [0] * x.dim(), [0] * x.dim()
        for i, a in enumerate(axes):
            begins[a], ends[a] = pads[i], pads[i + len(axes)]
        return F.pad(x, _torch_pad(begins, ends), value=fill)

    return run


@_register("ArgMax")
def _argmax(node: _Node) -> Kernel:
    axis, keepdims = int(node.attrs.get("axis", 0)), bool(node.attrs.get("keepdims", 1))
    if node.attrs.get("select_last_index", 0):
        raise node.unsupported("select_last_index=1")

    def run(inputs: list[Any]) -> Tensor:
        x = inputs[0]
        return torch.argmax(x, dim=_norm(axis, x.dim()), keepdim=keepdims)  # first maximum, as ONNX says

    return run


@_register("TopK")
def _top_k(node: _Node) -> Kernel:
    axis, largest = int(node.attrs.get("axis", -1)), bool(node.attrs.get("largest", 1))
    is_sorted = bool(node.attrs.get("sorted", 1))

    def run(inputs: list[Any]) -> list[Tensor]:
        x, k = inputs
        values, indices = torch.topk(x, int(k.reshape(-1)[0]), dim=_norm(axis, x.dim()), largest=largest,
                                     sorted=is_sorted)
        return [values, indices]

    return run


def _sum_square(x: Tensor, dim: tuple[int, ...], keepdim: bool) -> Tensor:
    return torch.sum(x * x, dim=dim, keepdim=keepdim)


@_register("ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceMax", "ReduceMin")
def _reduce(node: _Node) -> Kernel:
    fn = {"ReduceMean": torch.mean, "ReduceSum": torch.sum, "ReduceSumSquare": _sum_square, "ReduceMax": torch.amax,
          "ReduceMin": torch.amin}[node.op_type]
    keepdims = bool(node.attrs.get("keepdims", 1))
    noop_empty = bool(node.attrs.get("noop_with_empty_axes", 0))

    def run(inputs: list[Any]) -> Tensor:
        x, axes = inputs[0], _axes(inputs, 1, node.attrs.get("axes"))
        if not axes:
            if noop_empty:  # no reduction; ReduceSumSquare still squares
                return x * x if node.op_type == "ReduceSumSquare" else x
            axes = list(range(x.dim()))
        return fn(x, dim=tuple(_norm(a, x.dim()) for a in axes), keepdim=keepdims)

    return run


def _constant_value(node: onnx.NodeProto, attrs: dict[str, Any]) -> Tensor:
    """The tensor a Constant node holds."""
    if "value" in attrs:
        return _to_torch(attrs["value"])
    if "value_float" in attrs:
        return torch.tensor(attrs["value_float"], dtype=torch.float32)
    if "value_floats" in attrs:
        return torch.tensor(list(attrs["value_floats"]), dtype=torch.float32)
    if "value_int" in attrs:
        return torch.tensor(attrs["value_int"], dtype=torch.int64)
    if "value_ints" in attrs:
        return torch.tensor(list(attrs["value_ints"]), dtype=torch.int64)
    raise UnsupportedOpError(
        f"Constant node {node.name!r}: only tensor, float(s) and int(s) values are supported, "
        f"not {sorted(attrs)}"
    )


# ---------------------------------------------------------------------------------------------- the module


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for a in node.attribute:
        value = onnx.helper.get_attribute_value(a)
        out[a.name] = value.decode() if isinstance(value, bytes) else value
    return out


def _default_opset(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    raise ModelError("the ONNX model imports no version of the default (ai.onnx) operator set")


class OnnxModule(torch.nn.Module):
    """An ONNX graph evaluated with torch, with access to any intermediate tensor by its ONNX name.

    Float initializers are ``nn.Parameter`` (``requires_grad=False``) in :attr:`params`; integer and bool
    initializers and the values of Constant nodes are buffers. :meth:`initializer` finds a parameter by its
    ONNX name.
    """

    def __init__(self, model: onnx.ModelProto) -> None:
        super().__init__()
        graph = model.graph
        opset = _default_opset(model)
        self._check_ops(graph)
        if len(graph.sparse_initializer):
            raise ModelError("sparse initializers are not supported by the torch bridge")

        self.params = torch.nn.ParameterDict()
        self.param_keys: dict[str, str] = {}  # ONNX initializer name -> key in self.params
        self._buffer_keys: dict[str, str] = {}  # ONNX tensor name -> buffer name (int inits, Constants)
        used: set[str] = set()
        for init in graph.initializer:
            value = _to_torch(init)
            key = self._sanitize(init.name, used)
            if value.is_floating_point():  # prefixed, so that no key is a ParameterDict attribute (keys, to, ...)
                self.params[f"p_{key}"] = torch.nn.Parameter(value, requires_grad=False)
                self.param_keys[init.name] = f"p_{key}"
            else:
                self.register_buffer(f"buf_{key}", value)
                self._buffer_keys[init.name] = f"buf_{key}"

        init_names = {i.name for i in graph.initializer}
        self.input_names: list[str] = [i.name for i in graph.input if i.name not in init_names]
        self.output_names: list[str] = [o.name for o in graph.output]

        # Compile every node; Constant nodes are folded into buffers up front.
        available = set(self.input_names) | init_names
        self._steps: list[tuple[onnx.NodeProto, Kernel, list[str], list[str]]] = []
        self._produced: list[str] = list(self.input_names)  # every tensor name run() can capture or mask
        for node in graph.node:
            missing = [n for n in node.input if n and n not in available]
            if missing:
                raise ModelError(
                    f"{node.op_type} node {node.name!r} uses {missing}, which no earlier node produces "
                    "(the graph is not topologically sorted, or is incomplete)"
                )
            attrs = _attrs(node)
            if node.op_type == "Constant":
                key = self._sanitize(node.output[0], used)
                self.register_buffer(f"const_{key}", _constant_value(node, attrs))
                self._buffer_keys[node.output[0]] = f"const_{key}"
            else:
                info = _Node(node.name, node.op_type, attrs, opset, len(node.input), len(node.output))
                self._steps.append((node, _CONVERTERS[node.op_type](info), list(node.input), list(node.output)))
            available.update(n for n in node.output if n)
            self._produced.extend(n for n in node.output if n)
        missing_outputs = [n for n in self.output_names if n not in available]
        if missing_outputs:
            raise ModelError(f"graph outputs {missing_outputs} are produced by no node")
        self._known = set(self._produced)

        # After its last use a tensor can be dropped (unless it is a graph output).
        self._last_use: dict[int, list[str]] = {}
        last: dict[str, int] = {}
        for i, (_, _, ins, _) in enumerate(self._steps):
            for name in ins:
                if name:
                    last[name] = i
        keep = set(self.output_names) | init_names | set(self._buffer_keys)
        for name, i in last.items():
            if name not in keep:
                self._last_use.setdefault(i, []).append(name)

    @staticmethod
    def _check_ops(graph: onnx.GraphProto) -> None:
        bad = [n for n in graph.node
               if n.domain not in ("", "ai.onnx") or (n.op_type not in _CONVERTERS and n.op_type != "Constant")]
        if bad:
            listed = ", ".join(
                f"{n.op_type}{f' (domain {n.domain})' if n.domain not in ('', 'ai.onnx') else ''} "
                f"(node {n.name!r})" for n in bad[:10]
            )
            more = f" and {len(bad) - 10} more" if len(bad) > 10 else ""
            raise UnsupportedOpError(
                f"the torch bridge cannot run {listed}{more}. "
                f"Supported ai.onnx ops: {', '.join(sorted([*_CONVERTERS, 'Constant']))}"
            )

    @staticmethod
    def _sanitize(name: str, used: set[str]) -> str:
        key = re.sub(r"\W", "_", name) or "_"
        base, i = key, 1
        while key in used:
            key, i = f"{base}_{i}", i + 1
        used.add(key)
        return key

    def initializer(self, onnx_name: str) -> torch.nn.Parameter:
        """The parameter holding the float initializer called ``onnx_name`` in the ONNX graph."""
        if onnx_name in self.param_keys:
            return self.params[self.param_keys[onnx_name]]
        if onnx_name in self._buffer_keys:
            raise ModelError(f"{onnx_name!r} is an integer/bool tensor (held as a buffer), not a parameter")
        close = difflib.get_close_matches(onnx_name, list(self.param_keys), n=5)
        raise ModelError(f"no float initializer named {onnx_name!r}; close matches: {close}")

    def _check_names(self, names: Sequence[str], what: str) -> None:
        unknown = [n for n in names if n not in self._known]
        if not unknown:
            return
        hints = sorted({m for n in unknown for m in difflib.get_close_matches(n, self._produced, n=3)})
        examples = hints or self._produced[:8]
        raise ModelError(
            f"unknown {what} tensor name(s) {unknown}; "
            f"{'close matches' if hints else 'valid names include'}: {examples}"
        )

    def _bind_inputs(self, inputs: Tensor | Mapping[str, Tensor]) -> dict[str, Tensor]:
        if isinstance(inputs, Tensor):
            if len(self.input_names) != 1:
                raise ModelError(f"the model has {len(self.input_names)} inputs {self.input_names}; pass a mapping")
            return {self.input_names[0]: inputs}
        missing = [n for n in self.input_names if n not in inputs]
        extra = [n for n in inputs if n not in self.input_names]
        if missing or extra:
            raise ModelError(f"inputs must be exactly {self.input_names}; missing {missing}, unknown {extra}")
        return dict(inputs)

    def run(
        self,
        inputs: Tensor | Mapping[str, Tensor],
        capture: Sequence[str] = (),
        masks: Mapping[str, Tensor | Callable[[Tensor], Tensor]] | None = None,
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Evaluate the graph; return (outputs by graph output name, captured tensors by name).

        ``masks[name]`` multiplies tensor ``name`` as soon as it is produced, before any consumer sees it; a
        callable mask is called with the tensor and returns the mask (a mask that depends on the activation).
        A captured tensor is the value before its mask. When grad mode is on, a float captured tensor that
        would not otherwise require grad is made a leaf that does, so ``torch.autograd.grad(loss,
        captured[name])`` works even though the parameters are frozen.
        """
        if isinstance(capture, str):
            capture = [capture]
        masks = dict(masks or {})
        self._check_names(list(capture), "capture")
        self._check_names(list(masks), "mask")
        want = set(capture)
        captured: dict[str, Tensor] = {}
        grad_on = torch.is_grad_enabled()

        def emit(name: str, value: Tensor) -> Tensor:
            if name in want:
                if grad_on and value.is_floating_point() and not value.requires_grad:
                    value = value.detach().requires_grad_(True)
                captured[name] = value
            if name in masks:
                given = masks[name]
                mask = (given(value) if callable(given) else given).to(device=value.device, dtype=value.dtype)
                try:
                    fits = torch.broadcast_shapes(mask.shape, value.shape) == value.shape
                except RuntimeError:
                    fits = False
                if not fits:
                    raise ModelError(
                        f"mask for {name!r} has shape {tuple(mask.shape)}, which does not broadcast to the "
                        f"tensor's shape {tuple(value.shape)}"
                    )
                value = value * mask
            return value

        env: dict[str, Tensor] = {name: self.params[key] for name, key in self.param_keys.items()}
        env.update((name, getattr(self, key)) for name, key in self._buffer_keys.items())
        for name, value in self._bind_inputs(inputs).items():
            env[name] = emit(name, value)
        for name in want.union(masks).intersection(self._buffer_keys):  # capturing/masking a Constant
            env[name] = emit(name, env[name])

        for i, (node, kernel, ins, outs) in enumerate(self._steps):
            args = [env[n] if n else None for n in ins]
            try:
                result = kernel(args)
            except (RuntimeError, ValueError, IndexError, TypeError) as exc:
                shapes = [tuple(a.shape) if a is not None else None for a in args]
                raise ModelError(
                    f"{node.op_type} node {node.name!r} failed on inputs of shapes {shapes}: {exc}"
                ) from exc
            results = [result] if isinstance(result, Tensor) else list(result)
            if len(results) < sum(1 for o in outs if o):
                raise ModelError(f"{node.op_type} node {node.name!r} produced {len(results)} outputs, "
                                 f"expected {len(outs)}")
            for name, value in zip(outs, results):
                if name:
                    env[name] = emit(name, value)
            for name in self._last_use.get(i, ()):
                env.pop(name, None)

        return {name: env[name] for name in self.output_names}, captured

    def forward(self, x: Tensor) -> Tensor:
        """The first graph output for the single input ``x``."""
        outputs, _ = self.run(x)
        return outputs[self.output_names[0]]
