"""The two graphs guard serves: the guarded model with the consistency check inside it, and the re-prediction tail.

served: x -> the model (static mask folded into its weights) -> logits; per tap ℓ∞ -> z against the predicted
class's profile -> score, whether the sample needs a benign re-prediction, and its per-tap re-prediction masks.
The check is a dozen small ops at the end of the graph, so it runs wherever the model runs: on the GPU next to the
taps under the CUDA provider, and only (N,)-sized verdicts leave the device.

tail: the tensors that cross the cut before the first tap (that tap and, say, a residual shortcut), the rows that
need a re-prediction and the masks -> only the layers after the cut, only for those rows -> benign logits.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper, shape_inference

from guard.errors import ModelError
from guard.model.graph import (
    FoldMode,
    LoadedModel,
    add_linf,
    fold_static_mask,
    insert_mul,
    opset_version,
    tensor_dims,
    zero_above_bound,
)
from guard.runtime.checks import ConsistencyCheck, DistancePart

SCORE_OUTPUT = "guard_score"
DEMOTE_SCORE_OUTPUT = "guard_demote_score"
NEEDS_OUTPUT = "guard_needs"
ROWS_INPUT = "guard_rows"
MASK_PREFIX = "guard_mask_"
CUT_PREFIX = "guard_cut_"


@dataclass(frozen=True)
class ServingGraphs:
    """Serialized graphs plus the names that tie them together."""

    served: bytes
    tail: bytes
    cut: list[str]  # tensors of the served graph the tail starts from (served outputs, tail inputs `guard_cut_i`)
    masks: list[str]  # per tap without unit bounds, the served output and tail input holding its masks
    tail_from_input: bool  # True when the cut could not be placed after the model's input (the tail is everything)
    folds: dict[str, FoldMode]  # per tap, how its static mask was folded (which channels the served graph reports)


def serving_graphs(model: LoadedModel, taps: list[str], keep: dict[str, np.ndarray], bounds: dict[str, np.ndarray],
                   check: ConsistencyCheck, tau: float) -> ServingGraphs:
    """Fold the static mask, then build the served graph (check inside) and the re-prediction tail."""
    taken = sorted(name for name in _tensor_names(model.proto) if name.startswith("guard_") or "__guard" in name)
    if taken:
        raise ModelError(f"the model already has tensors named like guard's own ({taken[:5]}); rename them")
    folded, folds = fold_static_mask(model, keep)
    cut, from_input = cut_before(folded, taps, model.input_name)
    dims = tensor_dims(folded)  # folding changed weights only: the same shapes serve every graph built below
    served = copy.deepcopy(folded)
    linf = add_linf(served, taps, dims)
    del served.graph.output[1:]
    channels = [len(keep[tap]) for tap in taps]
    masks = _add_check(served, model.output_name, linf, channels, [tap in bounds for tap in taps],
                       [keep[tap] for tap in taps], check, tau)
    for name in cut:
        if name != model.input_name:
            served.graph.output.append(_batch_value(name, len(dims[name])))
    tail = tail_graph(folded, taps, cut, bounds, keep, dims)
    for proto in (served, tail):
        try:
            onnx.checker.check_model(proto)
        except onnx.checker.ValidationError as exc:
            raise ModelError(f"rewriting the graph produced an invalid model: {exc}") from None
    return ServingGraphs(served.SerializeToString(), tail.SerializeToString(), cut, masks, from_input, folds)


# ------------------------------------------------------------------------------------------------- the check


def _tensor_names(proto: onnx.ModelProto) -> set[str]:
    graph = proto.graph
    return ({i.name for i in graph.input} | {o.name for o in graph.output} | {i.name for i in graph.initializer}
            | {name for node in graph.node for name in node.output})


def _threshold(value: float) -> np.ndarray:
    """The largest float32 at or below `value`: for a float32 z, z > it exactly when z > value, as in numpy."""
    rounded = np.float32(value)
    return np.nextafter(rounded, np.float32(-np.inf)) if rounded > value else rounded


def _const(graph: onnx.GraphProto, name: str, value: np.ndarray) -> str:
    graph.initializer.append(numpy_helper.from_array(value, name))
    return name


def _reduce(proto: onnx.ModelProto, op: str, source: str, out: str, axis: int) -> onnx.NodeProto:
    """A keepdims=0 reduction over one axis, in the form the model's opset wants (axes became an input in 18; guard
    does not emit ReduceSum, whose axes moved in 13)."""
    if opset_version(proto) >= 18:
        axes = _const(proto.graph, f"{out}__axes", np.array([axis], dtype=np.int64))
        return helper.make_node(op, [source, axes], [out], keepdims=0)
    return helper.make_node(op, [source], [out], axes=[axis], keepdims=0)


def _at_most(proto: onnx.ModelProto, a: str, b: str, out: str) -> list[onnx.NodeProto]:
    """out = a <= b: one LessOrEqual from opset 12, Not(Greater) before."""
    if opset_version(proto) >= 12:
        return [helper.make_node("LessOrEqual", [a, b], [out])]
    return [helper.make_node("Greater", [a, b], [f"{out}__greater"]),
            helper.make_node("Not", [f"{out}__greater"], [out])]


def _score_nodes(proto: onnx.ModelProto, check: ConsistencyCheck) -> list[onnx.NodeProto]:
    """SCORE_OUTPUT from guard_z (top-q parts) or guard_linf_all and guard_label (distance parts): each part's raw
    score, standardised; then the maximum. DEMOTE_SCORE_OUTPUT: the maximum over the parts that demote."""
    g, nodes, scores = proto.graph, [], []
    for index, part in enumerate(check.score_parts()):
        name = f"guard_part_{index}"
        channels = _const(g, f"{name}__channels", part.channels.astype(np.int64))
        if isinstance(part, DistancePart):
            nodes += [
                helper.make_node("Gather", ["guard_linf_all", channels], [f"{name}__x"], axis=1),
                helper.make_node("Gather", [_const(g, f"{name}__class_mean", part.class_mean.astype(np.float32)),
                                            "guard_label"], [f"{name}__mean"], axis=0),
                helper.make_node("Sub", [f"{name}__x", f"{name}__mean"], [f"{name}__centred_x"]),
                helper.make_node("MatMul", [f"{name}__centred_x",
                                            _const(g, f"{name}__whiten", part.whiten.astype(np.float32))],
                                 [f"{name}__white"]),
                _reduce(proto, "ReduceSumSquare", f"{name}__white", f"{name}__sum", 1),
                helper.make_node("Sqrt", [f"{name}__sum"], [f"{name}__raw"]),
            ]
        else:
            q = min(check.top_q, len(part.channels))
            nodes += [
                helper.make_node("Gather", ["guard_z", channels], [f"{name}__z"], axis=1),
                helper.make_node("TopK", [f"{name}__z", _const(g, f"{name}__q", np.array([q], dtype=np.int64))],
                                 [f"{name}__top", f"{name}__top_index"], axis=1,
                                 # opset 10's TopK has neither attribute (it takes the largest, sorted)
                                 **({"largest": 1, "sorted": 0} if opset_version(proto) >= 11 else {})),
                _reduce(proto, "ReduceMean", f"{name}__top", f"{name}__raw", 1),
            ]
        nodes += [
            helper.make_node("Sub", [f"{name}__raw", _const(g, f"{name}__centre", np.float32([part.centre]))],
                             [f"{name}__centred"]),
            helper.make_node("Div", [f"{name}__centred", _const(g, f"{name}__spread", np.float32([part.spread]))],
                             [name]),
        ]
        scores.append(name)
    demoting = [name for name, part in zip(scores, check.score_parts(), strict=True) if part.demotes]
    return [*nodes, helper.make_node("Max", scores, [SCORE_OUTPUT]),
            helper.make_node("Identity", [SCORE_OUTPUT], [DEMOTE_SCORE_OUTPUT]) if demoting == scores
            else helper.make_node("Max", demoting, [DEMOTE_SCORE_OUTPUT])]


def _add_check(proto: onnx.ModelProto, logits: str, linf: list[str], channels: list[int], bounded: list[bool],
               keep: list[np.ndarray], check: ConsistencyCheck, tau: float) -> list[str]:
    """Append the consistency check (guard.runtime.checks, the same arithmetic in float32) and its outputs:
    score (N,), demote score (N,), needs (N,) = any z > k or score > tau, and for each tap without unit bounds the
    re-prediction mask (N, C) = keep and z <= cut. Returns the mask output names `guard_mask_<tap index>`."""
    g = proto.graph
    nodes = [
        helper.make_node("ArgMax", [logits], ["guard_label"], axis=1, keepdims=0),
        helper.make_node("Concat", linf, ["guard_linf_all"], axis=1),
        helper.make_node("Gather", [_const(g, "guard_class_mean", check.class_mean.astype(np.float32)),
                                    "guard_label"], ["guard_mean"], axis=0),
        helper.make_node("Gather", [_const(g, "guard_class_scale", check.class_scale.astype(np.float32)),
                                    "guard_label"], ["guard_scale"], axis=0),
        helper.make_node("Sub", ["guard_linf_all", "guard_mean"], ["guard_centred"]),
        helper.make_node("Div", ["guard_centred", "guard_scale"], ["guard_z_raw"]),
        helper.make_node("Where", [_const(g, "guard_active", check.active.astype(bool)[None]), "guard_z_raw",
                                   _const(g, "guard_zero", np.zeros(1, np.float32))], ["guard_z"]),
        *_score_nodes(proto, check),
        # any(z > k), as a max over 0/1 so that a NaN z cannot hide another channel's excess
        helper.make_node("Greater", ["guard_z", _const(g, "guard_k", _threshold(check.k))], ["guard_over"]),
        helper.make_node("Cast", ["guard_over"], ["guard_over_f"], to=onnx.TensorProto.FLOAT),
        _reduce(proto, "ReduceMax", "guard_over_f", "guard_any_over", 1),
        helper.make_node("Cast", ["guard_any_over"], ["guard_compromised"], to=onnx.TensorProto.BOOL),
        helper.make_node("Greater", [SCORE_OUTPUT, _const(g, "guard_tau", _threshold(tau))], ["guard_suspicious"]),
        helper.make_node("Or", ["guard_compromised", "guard_suspicious"], [NEEDS_OUTPUT]),
    ]
    masks, start = [], 0
    for index, (width, has_bound, tap_keep) in enumerate(zip(channels, bounded, keep, strict=True)):
        start += width
        if has_bound:  # cut in the tail graph itself, by the unit bounds; nothing per sample to pass on
            continue
        mask, z = f"{MASK_PREFIX}{index}", f"guard_z_{index}"
        nodes += [
            helper.make_node("Slice", ["guard_z", _const(g, f"{z}__start", np.array([start - width], np.int64)),
                                       _const(g, f"{z}__stop", np.array([start], np.int64)),
                                       _const(g, f"{z}__axis", np.array([1], np.int64))], [z]),
            *_at_most(proto, z, _const(g, f"{z}__cut", _threshold(check.cut)), f"{z}__low"),
            helper.make_node("And", [f"{z}__low", _const(g, f"{mask}__keep", tap_keep.astype(bool)[None])],
                             [f"{mask}__bool"]),
            helper.make_node("Cast", [f"{mask}__bool"], [mask], to=onnx.TensorProto.FLOAT),
        ]
        masks.append((mask, width))
    g.node.extend(nodes)
    g.output.extend([
        helper.make_tensor_value_info(SCORE_OUTPUT, onnx.TensorProto.FLOAT, ["batch"]),
        helper.make_tensor_value_info(DEMOTE_SCORE_OUTPUT, onnx.TensorProto.FLOAT, ["batch"]),
        helper.make_tensor_value_info(NEEDS_OUTPUT, onnx.TensorProto.BOOL, ["batch"]),
        *[helper.make_tensor_value_info(m, onnx.TensorProto.FLOAT, ["batch", w]) for m, w in masks],
    ])
    return [m for m, _ in masks]


# --------------------------------------------------------------------------------------------------- the tail


def _depends_on(graph: onnx.GraphProto, source: str) -> set[str]:
    """Every tensor computed from `source`."""
    reached = {source}
    for node in graph.node:  # ONNX graphs are topologically sorted
        if any(name in reached for name in node.input):
            reached.update(node.output)
    return reached


def cut_before(proto: onnx.ModelProto, taps: list[str], input_name: str) -> tuple[list[str], bool]:
    """The tensors the tail needs from the layers before the first tap: that tap, then anything else the rest of the
    graph reads from before it (a residual shortcut). Returns (cut, tail_from_input).

    The cut falls back to the model's input, and the tail is the whole graph, when a tensor crossing it does not have
    the batch first (a shape computed from the input: rows cannot be picked from it), or when the layers before it
    hold less than half the model's multiply-adds. Handing the cut tensors out costs every request a copy, and on
    ONNX Runtime's CPU provider a reorder out of its blocked conv layout: on the SmallCNN, whose first tap is its
    first conv, that cost 24% of the bare run to save a re-run of one small conv for the ~10% of rows that need it.
    """
    graph = proto.graph
    position = {out: i for i, node in enumerate(graph.node) for out in node.output}
    first = min(taps, key=lambda tap: position[tap])
    head = _ancestors(graph, first)
    from_input = _depends_on(graph, input_name)
    cut = [first]
    for index, node in enumerate(graph.node):
        if index in head:
            continue
        for name in node.input:
            if name and name not in cut and name in from_input and (name == input_name or position.get(name) in head):
                cut.append(name)
    inferred = shape_inference.infer_shapes(proto)
    values = {v.name: v.type.tensor_type for v in [*inferred.graph.value_info, *inferred.graph.input,
                                                    *inferred.graph.output]}
    batch = values[input_name].shape.dim[0]

    def batch_leading(name: str) -> bool:
        value = values.get(name)
        return (value is not None and value.elem_type == onnx.TensorProto.FLOAT and len(value.shape.dim) >= 1
                and batch.WhichOneof("value") is not None and value.shape.dim[0] == batch)

    macs = _macs(graph, values)
    head_share = sum(macs.get(i, 0) for i in head) / max(sum(macs.values()), 1)
    if all(batch_leading(name) for name in cut) and head_share >= 0.5:
        return cut, False
    return [input_name], True


def _macs(graph: onnx.GraphProto, values: dict[str, onnx.TypeProto.Tensor]) -> dict[int, float]:
    """Multiply-adds per sample of each Conv, Gemm and MatMul whose shapes inference could fix."""
    weights = {init.name: tuple(init.dims) for init in graph.initializer}
    macs: dict[int, float] = {}
    for index, node in enumerate(graph.node):
        if node.op_type not in ("Conv", "Gemm", "MatMul") or len(node.input) < 2 or node.input[1] not in weights:
            continue
        out = values.get(node.output[0])
        dims = [d.dim_value for d in out.shape.dim[1:]] if out is not None else []
        if not dims or 0 in dims:
            continue
        weight = weights[node.input[1]]
        if node.op_type == "Conv":  # each output element: Cin/groups x kernel
            macs[index] = float(np.prod(dims)) * float(np.prod(weight[1:]))
        else:  # each row of the output: the whole weight matrix
            macs[index] = float(np.prod(dims[:-1])) * float(np.prod(weight))
    return macs


def _ancestors(graph: onnx.GraphProto, tensor: str) -> set[int]:
    """Indices of the nodes `tensor` is computed from, its producer included."""
    producers = {out: i for i, node in enumerate(graph.node) for out in node.output}
    wanted, found = [tensor], set()
    while wanted:
        index = producers.get(wanted.pop())
        if index is None or index in found:
            continue
        found.add(index)
        wanted.extend(name for name in graph.node[index].input if name)
    return found


def _batch_value(name: str, rank: int) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, ["batch", *[None] * (rank - 1)])


def tail_graph(folded: onnx.ModelProto, taps: list[str], cut: list[str], bounds: dict[str, np.ndarray],
               keep: dict[str, np.ndarray], dims: dict[str, tuple[int | None, ...]]) -> onnx.ModelProto:
    """The layers after the cut as a graph of their own: inputs `guard_cut_i` (full batch), `guard_rows` (the rows
    to re-predict) and, per tap without unit bounds, its masks `guard_mask_<tap index>` (full batch, C); output the
    benign logits of those rows only. Taps with unit bounds get their static mask and bounds as constants."""
    proto = copy.deepcopy(folded)
    graph = proto.graph
    head = _ancestors(graph, cut[0])
    from_input = _depends_on(graph, next(i.name for i in graph.input if i.name not in
                                         {init.name for init in graph.initializer}))
    # Head nodes that do not read the input (constants, shape arithmetic on weights) are cheap: keep them.
    kept = [node for i, node in enumerate(graph.node) if i not in head or not set(node.output) & from_input]
    rows_input = helper.make_tensor_value_info(ROWS_INPUT, onnx.TensorProto.INT64, ["rows"])
    ranks = {name: len(d) for name, d in dims.items()}
    gathers, inputs, masks = [], [], []
    for index, tap in enumerate(taps):
        mask = f"{MASK_PREFIX}{index}"
        if tap in bounds:
            shape = (1, -1, 1, 1) if ranks.get(tap) == 4 else (1, -1)
            masks.append(_const(graph, f"{mask}__static", keep[tap].astype(np.float32).reshape(shape)))
            continue
        inputs.append(helper.make_tensor_value_info(mask, onnx.TensorProto.FLOAT, ["batch", None]))
        source = f"{mask}__rows"
        gathers.append(helper.make_node("Gather", [mask, ROWS_INPUT], [source], axis=0))
        if ranks.get(tap) == 4:
            if opset_version(proto) >= 13:
                axes = _const(graph, f"{mask}__axes", np.array([2, 3], dtype=np.int64))
                gathers.append(helper.make_node("Unsqueeze", [source, axes], [f"{mask}__4d"]))
            else:
                gathers.append(helper.make_node("Unsqueeze", [source], [f"{mask}__4d"], axes=[2, 3]))
            source = f"{mask}__4d"
        masks.append(source)
    for index, name in enumerate(cut):  # after the masks: a tap's Mul goes right after the Gather producing it
        source = f"{CUT_PREFIX}{index}"
        inputs.insert(index, _batch_value(source, ranks[name]))
        gathers.append(helper.make_node("Gather", [source, ROWS_INPUT], [name], axis=0))
    del graph.node[:]
    graph.node.extend([*gathers, *kept])
    del graph.input[:]
    graph.input.extend([*inputs, rows_input])
    del graph.output[1:]
    for index, (tap, source) in enumerate(zip(taps, masks, strict=True)):
        insert_mul(graph, tap, source, f"{tap}__guard_masked")
        if tap in bounds:
            zero_above_bound(graph, tap, f"{tap}__guard_masked", bounds[tap], index)
    used = {name for node in graph.node for name in node.input}
    kept_inits = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept_inits)
    del graph.value_info[:]
    return proto
