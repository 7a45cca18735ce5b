"""Loading ONNX models and rewriting their graphs for guarded serving.

Everything that touches the ONNX graph lives here: reading and hashing the file, finding default taps, exposing the
per-channel ℓ∞ of each tap, folding the static mask into weights, and the rewrites
guard.model.serving builds the served and re-prediction graphs from. A layer is always named by its ONNX tensor
name.
"""

from __future__ import annotations

import copy
import hashlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
import onnxruntime as ort
from google.protobuf.message import DecodeError
from onnx import helper, numpy_helper, shape_inference
from onnx.external_data_helper import uses_external_data

from guard.errors import ModelError

LINF_PREFIX = "guard_linf_"

# Ops through which a zeroed channel stays zero and stays the same channel.
_ZERO_PRESERVING = {"Relu", "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "Identity", "Dropout"}
_ACTIVATIONS = {"Relu", "LeakyRelu", "Clip", "Gelu", "Sigmoid", "HardSwish", "Elu", "Selu", "Softplus", "Tanh"}

# Ops that pass their first input's values on unchanged in inference (reshaped at most).
_SHAPE_ONLY = {"Identity", "Flatten", "Reshape", "Squeeze", "Unsqueeze", "Dropout", "Cast"}

FoldMode = Literal["consumer", "producer", "mul"]


@dataclass(frozen=True)
class LoadedModel:
    """An ONNX model with what guard needs to know about it."""

    proto: onnx.ModelProto
    sha256: str
    path: Path | None
    input_name: str
    input_shape: tuple[int | None, ...]  # None for symbolic dims (the batch)
    output_name: str
    num_classes: int

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """Shape of one sample (without the batch axis); every non-batch dim must be fixed."""
        dims = self.input_shape[1:]
        if any(d is None for d in dims):
            raise ModelError(f"input {self.input_name!r} has symbolic non-batch dims {self.input_shape}")
        return tuple(int(d) for d in dims)  # type: ignore[arg-type]


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _refuse_what_onnxruntime_refuses(proto: onnx.ModelProto) -> None:
    """Nodes sharing a name, or in an operator domain other than the default one that the model does not import:
    ONNX Runtime refuses such a graph, and shape inference raises a traceback on the second; refused at load, not
    after a calibration. (Default-domain nodes without its import run, as opset 13 here: `opset_version`.)"""
    named = Counter(node.name for node in proto.graph.node if node.name)
    twice = sorted(name for name, count in named.items() if count > 1)
    if twice:
        raise ModelError(f"nodes share the name(s) {twice[:5]}; ONNX Runtime refuses such a model: give each node a "
                         "name of its own (or none)")

    def domain(name: str) -> str:
        return "" if name == "ai.onnx" else name  # two names of the default domain

    imported = {domain(opset.domain) for opset in proto.opset_import}
    missing = sorted({domain(node.domain) for node in proto.graph.node} - imported - {""})
    if missing:
        raise ModelError(f"the model's nodes use operator domain(s) {missing} that it does not import (opset_import); "
                         "export it again")


def load_model(source: str | Path | bytes | onnx.ModelProto) -> LoadedModel:
    """Read an ONNX image classifier: one input (N, C, H, W) and a first output (N, classes)."""
    path = None
    try:
        if isinstance(source, onnx.ModelProto):
            data = source.SerializeToString()
        elif isinstance(source, bytes):
            data = source
        else:
            path = Path(source)
            data = path.read_bytes()
        proto = onnx.load_from_string(data)
    except FileNotFoundError:
        raise ModelError(f"model file not found: {source}") from None
    except (OSError, ValueError, DecodeError) as exc:
        raise ModelError(f"cannot read ONNX model {path or '<bytes>'}: {exc}") from None
    if not proto.graph.node:  # an empty file parses as an empty model
        raise ModelError(f"{path or '<bytes>'} holds no ONNX graph: not a model file, or an empty one")
    initializers = {init.name for init in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise ModelError(f"guard serves models with exactly one input; this one has {[i.name for i in inputs]}")
    _refuse_what_onnxruntime_refuses(proto)
    if not proto.graph.output:
        raise ModelError("the model has no outputs")
    tensors = [*proto.graph.initializer, *(a.t for n in proto.graph.node for a in n.attribute if a.HasField("t"))]
    if any(uses_external_data(t) for t in tensors):  # the sha256 a profile checks would not cover those weights
        raise ModelError("the model keeps weights in external data files; guard reads self-contained models: save "
                         "it with onnx.save(model, path, save_as_external_data=False)")
    if opset_version(proto) < MIN_OPSET:  # refused here, not after a calibration whose profile could not be served
        raise ModelError(f"guard serves ONNX opset {MIN_OPSET} or later; this model uses opset {opset_version(proto)}: "
                         "export it again with a newer opset_version")
    # IR 3 wants every initializer listed as an input, and the served graph adds initializers; IR 4 reads the same
    # model the same way without that rule.
    proto.ir_version = max(proto.ir_version, 4)
    input_shape = _dims(inputs[0].type)
    if len(input_shape) != 4:
        raise ModelError(f"expected an image input (N, C, H, W); {inputs[0].name!r} has shape {input_shape}")
    second, third, last = input_shape[1:]
    if last in (1, 3, 4) and second is not None and second == third and second > 4:  # square H x W, C = 1, 3, 4
        # a mask, a trigger or a warp over (H, W, C) would run along the wrong axes: refused, not scanned as strips
        raise ModelError(f"the input {inputs[0].name!r} of shape {input_shape} looks channels-last (N, H, W, C); "
                         "guard reads (N, C, H, W) models: export a wrapper that takes (N, C, H, W) and permutes it, "
                         "forward(x) = model(x.permute(0, 2, 3, 1))")
    if inputs[0].type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
        raise ModelError(f"guard serves float32 inputs; {inputs[0].name!r} is "
                         f"{onnx.TensorProto.DataType.Name(inputs[0].type.tensor_type.elem_type)}")
    if input_shape[0] is not None:  # calibration and serving run batches
        raise ModelError(f"the input's batch dimension is fixed at {input_shape[0]}; export the model with a dynamic "
                         "batch dimension (torch.onnx.export(..., dynamic_shapes=...) or dynamic_axes)")
    output_type = proto.graph.output[0].type.tensor_type.elem_type
    if output_type not in (onnx.TensorProto.UNDEFINED, onnx.TensorProto.FLOAT):
        raise ModelError(f"guard checks float32 logits; {proto.graph.output[0].name!r} is "
                         f"{onnx.TensorProto.DataType.Name(output_type)}: export the model in float32 throughout")
    output_shape = _dims(proto.graph.output[0].type)
    if len(output_shape) != 2 or output_shape[1] is None:  # declared without its classes (tf2onnx's unk__N): inferred
        output_shape = tensor_dims(proto).get(proto.graph.output[0].name, output_shape)
    if len(output_shape) != 2 or output_shape[1] is None or output_shape[1] < 2:
        raise ModelError(f"expected a first output (N, classes) of at least 2 classes; {proto.graph.output[0].name!r} "
                         f"is {output_shape}")
    last = _producer(proto.graph, proto.graph.output[0].name)
    while last is not None and last.op_type in _SHAPE_ONLY:  # a Softmax behind a Flatten is as much the output
        last = _producer(proto.graph, last.input[0])
    if last is not None and last.op_type == "Softmax":
        # the scan, the repairs and the reference train through the output, and the guard's confirmations read its
        # softmax: a softmax of probabilities would flatten every one of them, silently
        raise ModelError(f"the model's output {proto.graph.output[0].name!r} is a Softmax of its logits; guard needs "
                         "the logits: export the model without the final Softmax (its answers, the argmax, are the "
                         "same)")
    return LoadedModel(
        proto=proto,
        sha256=sha256_bytes(data),
        path=path,
        input_name=inputs[0].name,
        input_shape=input_shape,
        output_name=proto.graph.output[0].name,
        num_classes=int(output_shape[1]),
    )


def _dims(type_proto: onnx.TypeProto) -> tuple[int | None, ...]:
    shape = type_proto.tensor_type.shape
    return tuple(d.dim_value if d.HasField("dim_value") else None for d in shape.dim)


def tensor_dims(proto: onnx.ModelProto) -> dict[str, tuple[int | None, ...]]:
    """Dims (None where symbolic) of every tensor the graph computes.

    Shape inference tells most; where it cannot (older exporters flatten with Shape, Gather, Concat and Reshape, and
    everything after is unknown, the penultimate features included), runs on zero batches of 1 and 2 tell the rest.
    """
    return dict(_tensor_info(proto)[0])


def tensor_types(proto: onnx.ModelProto) -> dict[str, int]:
    """ONNX element type (onnx.TensorProto.FLOAT, ...) of every tensor whose type inference can tell."""
    return dict(_tensor_info(proto)[1])


_TensorInfo = tuple[dict[str, tuple[int | None, ...]], dict[str, int]]
# By graph structure, the last few graphs': a command asks for one graph's shapes and types several times (its taps,
# their shapes and types, the served graph), and inference, let alone a run, is not to be repeated for each.
_INFO: dict[bytes, _TensorInfo] = {}
_INFO_KEPT = 4


def _tensor_info(proto: onnx.ModelProto) -> _TensorInfo:
    key = _structure(proto)
    if key not in _INFO:
        inferred = shape_inference.infer_shapes(proto)
        values = [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]
        dims = {value.name: _dims(value.type) for value in values if value.type.tensor_type.HasField("shape")}
        # missing, or known only in part: a Reshape to (x.size(0), -1) comes back as (None, None)
        unknown = [out for node in proto.graph.node for out in node.output
                   if out and (out not in dims or None in dims[out][1:])]
        if unknown:
            dims.update(_measured_dims(proto, unknown))
        types = {value.name: value.type.tensor_type.elem_type for value in values if value.type.tensor_type.elem_type}
        while len(_INFO) >= _INFO_KEPT:
            del _INFO[next(iter(_INFO))]
        _INFO[key] = dims, types
    return _INFO[key]


_FLOATS = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}


def _structure(proto: onnx.ModelProto) -> bytes:
    """What a graph's shapes and types depend on, and not its weights' values: opsets, inputs, nodes, the
    initializers' names, types and dims, and the values of those that are not floats (a Reshape's target shape).
    Hashing those is cheap on a model of any size; inferring, let alone running it, is not."""
    digest = hashlib.sha256()
    for part in (*proto.opset_import, *proto.graph.input, *proto.graph.node):
        digest.update(part.SerializeToString())
    for init in proto.graph.initializer:
        digest.update(init.SerializeToString() if init.data_type not in _FLOATS
                      else f"{init.name}:{init.data_type}:{list(init.dims)};".encode())
    return digest.digest()


def _measured_dims(proto: onnx.ModelProto, names: list[str]) -> dict[str, tuple[int | None, ...]]:
    """Dims of `names` from ONNX Runtime runs at batch 1 and 2 (a dim that differs is the batch's); empty where the
    model cannot be run so (the caller then treats those tensors as unknown, as before)."""
    initializers = {init.name for init in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in initializers]
    if len(inputs) != 1:
        return {}
    sample = _dims(inputs[0].type)[1:]
    if any(d is None for d in sample):
        return {}
    probe = copy.deepcopy(proto)
    probe.graph.output.extend(onnx.ValueInfoProto(name=name) for name in names)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    try:
        session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
        runs = [session.run(names, {inputs[0].name: np.zeros((batch, *sample), np.float32)}) for batch in (1, 2)]
    except Exception:  # noqa: BLE001 - a probe only; whatever stops it, shapes stay unknown as inference left them
        return {}
    return {name: tuple(a if a == b else None for a, b in zip(one.shape, two.shape, strict=True))
            for name, one, two in zip(names, *runs, strict=True) if one.ndim == two.ndim}


def tensor_ranks(proto: onnx.ModelProto) -> dict[str, int]:
    """Rank of every tensor that shape inference can tell."""
    return {name: len(dims) for name, dims in tensor_dims(proto).items()}


def default_taps(model: LoadedModel, conv_taps: int, first_conv: bool = False, repairable: bool = False) -> list[str]:
    """The last `conv_taps` conv activation outputs and the penultimate feature vector; with `first_conv`, the first
    conv activation too, where it is not among them.

    Conv activations are rank-4 outputs of activation nodes; the penultimate feature vector is the input of the
    linear layer that produces the logits (the rank-2 tensor feeding the last Gemm/MatMul). With `repairable` (AR and
    L2 penalise each tap's channels in the layer that computes them), the feature vector only where a layer computes
    it: not where it is a conv map flattened (conv -> relu -> flatten -> linear), whose features are positions.
    """
    ranks = tensor_ranks(model.proto)
    nodes = list(model.proto.graph.node)
    conv = [n.output[0] for n in nodes if n.op_type in _ACTIVATIONS and ranks.get(n.output[0]) == 4]
    taps = conv[max(0, len(conv) - conv_taps):]
    if first_conv and conv and conv[0] not in taps:
        taps.insert(0, conv[0])
    initializers = {init.name for init in model.proto.graph.initializer}
    for node in reversed(nodes):
        if node.op_type in {"Gemm", "MatMul"}:
            features = next((i for i in node.input if i not in initializers), None)
            if features is not None and ranks.get(features) == 2 and not (
                    repairable and unrepairable_taps(model.proto, [features])):
                taps.append(features)
            break
    if not taps:
        raise ModelError("found no conv activations or penultimate features to tap; name them with --layers")
    return taps


def validate_taps(model: LoadedModel, taps: list[str]) -> None:
    """Every tap must be a rank-4 or rank-2 tensor the graph computes: not its input, and not the logits, which the
    served graph's mask would rename (a profile tapping them calibrated, then never loaded). Another output, such
    as penultimate features a model also hands out, is tapped as any tensor."""
    produced = {out for node in model.proto.graph.node for out in node.output}
    ranks = tensor_ranks(model.proto)
    ends = [t for t in taps if t in (model.input_name, model.output_name)]
    if ends:
        raise ModelError(f"cannot tap the model's input or its logits {ends}: name a tensor the graph computes on "
                         "the way")
    missing = [t for t in taps if t not in produced]
    if missing:
        sample = [n.output[0] for n in model.proto.graph.node][-8:]
        raise ModelError(f"the model has no tensor named {missing}; the last tensors it computes are {sample}")
    bad_rank = {t: ranks.get(t) for t in taps if ranks.get(t) not in (2, 4)}
    if bad_rank:
        raise ModelError(f"taps must be (N, C, H, W) or (N, C) tensors; got ranks {bad_rank}")
    types = tensor_types(model.proto)
    bad_type = {t: onnx.TensorProto.DataType.Name(types[t]) for t in taps
                if types.get(t, onnx.TensorProto.FLOAT) != onnx.TensorProto.FLOAT}
    if bad_type:  # the served check computes in float32; a float16 tap calibrated, then failed to load in ONNX Runtime
        raise ModelError(f"guard checks float32 activations; taps {bad_type} are not: export the model in float32 "
                         "throughout")


def tap_shapes(model: LoadedModel, taps: list[str]) -> list[tuple[int | None, ...] | None]:
    """Each tap's dims after the batch ((C, H, W) or (C,), None where symbolic), or None where shape inference
    cannot tell."""
    dims = tensor_dims(model.proto)
    return [dims[t][1:] if t in dims and len(dims[t]) > 1 else None for t in taps]


MIN_OPSET = 10  # the served graph's TopK takes K as an input from opset 10


def opset_version(proto: onnx.ModelProto) -> int:
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 13)


def _consumers(graph: onnx.GraphProto, tensor: str) -> list[onnx.NodeProto]:
    return [n for n in graph.node if tensor in n.input]


def _producer(graph: onnx.GraphProto, tensor: str) -> onnx.NodeProto | None:
    return next((n for n in graph.node if tensor in n.output), None)


class _Initializers:
    """Mutable numpy views of a graph's initializers, written back once at the end."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.graph = graph
        self.arrays = {init.name: numpy_helper.to_array(init).copy() for init in graph.initializer}
        self.changed: set[str] = set()
        self.uses = Counter(name for node in graph.node for name in node.input)
        self.uses.update(output.name for output in graph.output)

    def get(self, name: str) -> np.ndarray | None:
        """The initializer `name` if exactly one node input reads it, else None: zeroing weights that another layer
        shares (a module applied twice) would change that layer too, which calibration never measured."""
        return self.arrays.get(name) if self.uses[name] == 1 else None

    def mark(self, name: str) -> None:
        self.changed.add(name)

    def copy(self) -> _Initializers:
        twin = _Initializers.__new__(_Initializers)
        twin.graph = self.graph
        twin.arrays = {name: array.copy() for name, array in self.arrays.items()}
        twin.changed = set(self.changed)
        twin.uses = self.uses
        return twin

    def write_back(self) -> None:
        for init in self.graph.initializer:
            if init.name in self.changed:
                init.CopyFrom(numpy_helper.from_array(self.arrays[init.name], init.name))


def _zero_input_channels(node: onnx.NodeProto, channels: np.ndarray, block: int, inits: _Initializers) -> bool:
    """Zero the weights through which input channels `channels` (each `block` features wide) enter `node`."""
    weight_name = node.input[1] if len(node.input) > 1 else ""
    weight = inits.get(weight_name)
    if weight is None:
        return False
    features = (channels[:, None] * block + np.arange(block)[None, :]).ravel()
    if node.op_type == "Conv":
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        if group != 1 or block != 1:
            return False
        weight[:, channels] = 0
    elif node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        trans_a = next((a.i for a in node.attribute if a.name == "transA"), 0)
        if trans_a:
            return False
        if trans_b:
            weight[:, features] = 0
        else:
            weight[features, :] = 0
    elif node.op_type == "MatMul" and weight.ndim == 2:
        weight[features, :] = 0
    else:
        return False
    inits.mark(weight_name)
    return True


def _fold_into_consumers(graph: onnx.GraphProto, tensor: str, channels: np.ndarray, inits: _Initializers,
                         dims: dict[str, tuple[int | None, ...]], outputs: set[str]) -> bool:
    """Zero channel effects at every linear layer reached through zero-preserving ops; False if any path is not.

    `outputs` holds the graph outputs and the other taps: a path through one of them fails, because that tap
    would then show the pruned channels' effects, which calibration (masking the tap itself) never saw. A Gemm or
    MatMul folds only on an (N, C) input (a MatMul on (N, C, H, W) contracts W, not the channels), and an
    (N, C, H, W) tensor only through a channel-major flatten: a Flatten or Reshape to (N, C·H·W), static dims known.
    """
    if tensor in outputs:
        return False
    consumers = _consumers(graph, tensor)
    if not consumers:
        return False
    for node in consumers:
        if node.op_type == "Shape":  # reads the dims alone (x.view(x.size(0), -1)), which zeroed channels keep
            continue
        if node.input[0] != tensor:
            return False
        shape, out_shape = dims.get(tensor, ()), dims.get(node.output[0], ())
        if node.op_type in _ZERO_PRESERVING:
            if not _fold_into_consumers(graph, node.output[0], channels, inits, dims, outputs):
                return False
        elif node.op_type in {"Flatten", "Reshape"} and _channel_major_flatten(shape, out_shape):
            if node.output[0] in outputs or not _fold_flat(graph, node.output[0], channels, shape[2] * shape[3],
                                                           inits):
                return False
        elif node.op_type == "Conv" or (node.op_type in {"Gemm", "MatMul"} and len(shape) == 2):
            if not _zero_input_channels(node, channels, 1, inits):
                return False
        else:
            return False
    return True


def _channel_major_flatten(shape: tuple[int | None, ...], out_shape: tuple[int | None, ...]) -> bool:
    """(N, C, H, W) to (N, C·H·W): row-major, so feature c·H·W + i is channel c's. Flatten(axis=2) or a Reshape to
    (N·C, H·W) gives rank 2 too, with the channels in the rows."""
    return (len(shape) == 4 and len(out_shape) == 2 and None not in shape[1:] and out_shape[1] is not None
            and out_shape[1] == shape[1] * shape[2] * shape[3])


def _fold_flat(graph: onnx.GraphProto, tensor: str, channels: np.ndarray, block: int, inits: _Initializers) -> bool:
    consumers = _consumers(graph, tensor)
    return bool(consumers) and all(
        n.op_type in {"Gemm", "MatMul"} and n.input[0] == tensor and _zero_input_channels(n, channels, block, inits)
        for n in consumers
    )


def _fold_into_producer(graph: onnx.GraphProto, tensor: str, channels: np.ndarray, inits: _Initializers,
                        stops: set[str]) -> bool:
    """Make the layer that computes `tensor` output zero on `channels` (the tap then reads zero there).

    Only along a chain that nothing else reads: a tensor on the way back that feeds another node, is a graph output
    or is another tap (`stops`) would lose the channels too, where calibration masked the tap alone.
    """
    node = _producer(graph, tensor)
    while node is not None and node.op_type in {"Relu", "Identity", "Dropout", "MaxPool"}:
        source = node.input[0]
        if source in stops or len(_consumers(graph, source)) != 1:
            return False
        node = _producer(graph, source)
    if node is None:
        return False
    if node.op_type == "BatchNormalization":
        scale, bias = inits.get(node.input[1]), inits.get(node.input[2])
        if scale is None or bias is None or scale.ndim != 1 or bias.ndim != 1:
            return False
        scale[channels] = 0
        bias[channels] = 0
        inits.mark(node.input[1])
        inits.mark(node.input[2])
        return True
    if node.op_type in {"Conv", "Gemm"}:
        weight = inits.get(node.input[1])
        if weight is None or (node.op_type == "Gemm" and not any(a.name == "transB" and a.i for a in node.attribute)):
            return False
        weight[channels] = 0
        inits.mark(node.input[1])
        if len(node.input) > 2 and node.input[2]:
            bias = inits.get(node.input[2])
            if bias is None or bias.shape != (weight.shape[0],):  # a Gemm's C may broadcast from (1, M) or ()
                return False
            bias[channels] = 0
            inits.mark(node.input[2])
        return True
    return False


@dataclass(frozen=True)
class ChannelWeights:
    """Where a layer keeps the weights of each output channel: `weight` sliced along `axis`, and `bias`."""

    weight: str  # initializer name
    axis: int  # the weight's output-channel axis
    bias: str | None  # initializer name, or None for a layer without bias


# Ops a channel passes through unchanged in identity, walking back from a tap to the layer that computed it.
_SAME_CHANNEL = {"Identity", "Dropout", "MaxPool", "AveragePool", "Cast"}
_SPATIAL_REDUCE = {"ReduceMean", "ReduceMax", "GlobalAveragePool", "GlobalMaxPool"}


def channel_producers(proto: onnx.ModelProto, tensor: str) -> list[ChannelWeights]:
    """The linear layers whose output channel c becomes channel c of `tensor`: the neurons' own weights.

    Walks back through the activation, pooling, batch norm (whose scale and shift count too) and a spatial reduction
    with its flatten; at a residual
    Add both branches count, except a branch that is an earlier layer's activation (an identity shortcut).
    Raises ModelError when no such layer is found, since then there are no weights to repair.
    """
    graph = proto.graph
    initializers = {init.name for init in graph.initializer}
    found: list[ChannelWeights] = []

    def walk(name: str, after_add: bool) -> None:
        node = _producer(graph, name)
        if node is None:
            return
        op = node.op_type
        if op in _ACTIVATIONS:
            if not after_add:
                walk(node.input[0], after_add)
        elif op in _SAME_CHANNEL or op in _SPATIAL_REDUCE:
            walk(node.input[0], after_add)
        elif op == "BatchNormalization":
            if node.input[1] in initializers and node.input[2] in initializers:
                found.append(ChannelWeights(node.input[1], 0, node.input[2]))
            walk(node.input[0], after_add)
        elif op in {"Reshape", "Flatten"}:
            source = _producer(graph, node.input[0])
            if source is not None and source.op_type in _SPATIAL_REDUCE:
                walk(node.input[0], after_add)
        elif op == "Add":
            for branch in node.input:
                if branch not in initializers:
                    walk(branch, True)
        elif op in {"Conv", "Gemm", "MatMul"} and len(node.input) > 1 and node.input[1] in initializers:
            if op == "Gemm" and any(a.name == "transA" and a.i for a in node.attribute):
                return
            axis = 0 if op == "Conv" or any(a.name == "transB" and a.i for a in node.attribute) else 1
            bias = node.input[2] if len(node.input) > 2 and node.input[2] in initializers else None
            found.append(ChannelWeights(node.input[1], axis, bias))

    walk(tensor, False)
    if not found:
        raise ModelError(f"found no Conv/Gemm/MatMul layer that computes the channels of {tensor!r}")
    return found


def unrepairable_taps(proto: onnx.ModelProto, taps: list[str]) -> list[str]:
    """The taps whose channels no Conv/Gemm/MatMul layer computes (`channel_producers` finds none): AR and L2 have no
    weights to penalise there."""
    unrepairable = []
    for tap in taps:
        try:
            channel_producers(proto, tap)
        except ModelError:
            unrepairable.append(tap)
    return unrepairable


def insert_mul(graph: onnx.GraphProto, tensor: str, mask_name: str, new_name: str) -> None:
    """Route every consumer of `tensor` (and the graph output, if it is one) through `tensor * mask_name`."""
    for node in graph.node:
        for idx, name in enumerate(node.input):
            if name == tensor:
                node.input[idx] = new_name
    for out in graph.output:
        if out.name == tensor:
            out.name = new_name
    producer_index = next(i for i, n in enumerate(graph.node) if tensor in n.output)
    graph.node.insert(producer_index + 1, helper.make_node("Mul", [tensor, mask_name], [new_name]))


def with_initializers(proto: onnx.ModelProto, values: dict[str, np.ndarray]) -> onnx.ModelProto:
    """A copy of `proto` whose named initializers hold `values`; graph, names and everything else unchanged."""
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    for init in out.graph.initializer:
        if init.name in values:
            init.CopyFrom(numpy_helper.from_array(values[init.name], init.name))
    return out


def fold_static_mask(model: LoadedModel, keep: dict[str, np.ndarray]) -> tuple[onnx.ModelProto, dict[str, FoldMode]]:
    """Bake the static mask (per tap, True = keep) into a copy of the graph.

    Preferred: zero the pruned channels' input weights in the next linear layers, so the tap still shows them (the
    check keeps seeing a trigger that lights them up) at no runtime cost. Else zero the producing layer, also free,
    though the tap then reads zero there. Else, as a last resort, an explicit Mul by a constant mask.
    """
    proto = copy.deepcopy(model.proto)
    graph = proto.graph
    dims = tensor_dims(proto)
    inits = _Initializers(graph)
    outputs = {o.name for o in graph.output}
    modes: dict[str, FoldMode] = {}
    for tap, keep_mask in keep.items():
        pruned = np.flatnonzero(~keep_mask.astype(bool))
        if pruned.size == 0:
            modes[tap] = "consumer"
            continue
        consumer_fold, producer_fold = inits.copy(), inits.copy()
        stops = outputs | (set(keep) - {tap})
        if _fold_into_consumers(graph, tap, pruned, consumer_fold, dims, stops):
            modes[tap], inits = "consumer", consumer_fold
        elif _fold_into_producer(graph, tap, pruned, producer_fold, stops):
            modes[tap], inits = "producer", producer_fold
        else:
            modes[tap] = "mul"
            const_name = f"guard_static_mask_{len(modes)}"
            shape = (1, -1, 1, 1) if len(dims.get(tap, ())) == 4 else (1, -1)
            graph.initializer.append(numpy_helper.from_array(keep_mask.astype(np.float32).reshape(shape), const_name))
            insert_mul(graph, tap, const_name, f"{tap}__guard_static")
    inits.write_back()
    return proto, modes


def _spatial_max_nodes(proto: onnx.ModelProto, tap: str, out: str) -> list[onnx.NodeProto]:
    """(N, C, H, W) -> (N, C) spatial max as GlobalMaxPool + Flatten: ONNX Runtime can run GlobalMaxPool on its
    blocked conv layout, where a ReduceMax needs the activation reordered to NCHW first; only the (N, C, 1, 1)
    result is reordered."""
    return [helper.make_node("GlobalMaxPool", [tap], [f"{out}__pooled"]),
            helper.make_node("Flatten", [f"{out}__pooled"], [out], axis=1)]


def _covering_max_pool(proto: onnx.ModelProto, tap: str, dims: dict[str, tuple[int | None, ...]]) -> str | None:
    """The output of a MaxPool that reads `tap` and whose windows cover every position of it, if the model has one:
    its spatial max is the tap's, from a tensor a quarter the size or less (the SmallCNN's 2x2 pools)."""
    for node in _consumers(proto.graph, tap):
        if node.op_type != "MaxPool" or node.input[0] != tap or len(node.output) != 1:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        kernel = list(attrs.get("kernel_shape", []))
        strides = list(attrs.get("strides", [1] * len(kernel)))
        pads = list(attrs.get("pads", [0] * 2 * len(kernel)))
        if (len(kernel) != 2 or attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET")
                or any(d != 1 for d in attrs.get("dilations", [1, 1]))):
            continue
        size_in, size_out = dims.get(tap, ()), dims.get(node.output[0], ())
        if len(size_in) != 4 or len(size_out) != 4 or None in (*size_in[2:], *size_out[2:]):
            continue
        if all(k >= st and (o - 1) * st - pad + k >= h
               for k, st, pad, h, o in zip(kernel, strides, pads[:2], size_in[2:], size_out[2:], strict=True)):
            return node.output[0]
    return None


def add_linf(proto: onnx.ModelProto, taps: list[str], dims: dict[str, tuple[int | None, ...]]) -> list[str]:
    """The tensors holding each tap's per-channel ℓ∞: a spatial max added for (N, C, H, W) taps, the tap itself for
    (N, C) ones. `dims`: tensor_dims(proto), which the caller already has."""
    names = []
    for index, tap in enumerate(taps):
        if len(dims.get(tap, ())) == 4:
            out = f"{LINF_PREFIX}{index}"
            proto.graph.node.extend(_spatial_max_nodes(proto, _covering_max_pool(proto, tap, dims) or tap, out))
            names.append(out)
        else:
            names.append(tap)
    return names


def zero_above_bound(graph: onnx.GraphProto, tap: str, masked: str, bound: np.ndarray, index: int) -> None:
    """Rewrite `masked = tap * mask` into `tap * mask * (tap <= bound)`."""
    bound_name, over, within, within_f = (f"guard_bound_{index}", f"{tap}__guard_over", f"{tap}__guard_within",
                                          f"{tap}__guard_within_f")
    graph.initializer.append(numpy_helper.from_array(bound.astype(np.float32)[None], bound_name))
    mul_index = next(i for i, n in enumerate(graph.node) if masked in n.output)
    graph.node[mul_index].output[0] = f"{masked}__channels"
    graph.node.insert(mul_index + 1, helper.make_node("Greater", [tap, bound_name], [over]))
    graph.node.insert(mul_index + 2, helper.make_node("Not", [over], [within]))
    graph.node.insert(mul_index + 3, helper.make_node("Cast", [within], [within_f], to=onnx.TensorProto.FLOAT))
    graph.node.insert(mul_index + 4, helper.make_node("Mul", [f"{masked}__channels", within_f], [masked]))
