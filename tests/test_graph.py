"""Graph surgery: the static mask folded into weights, the check inside the served graph, the re-prediction tail;
each checked in real ONNX Runtime against guard's torch path and numpy check (the ones calibration uses)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from guard.calibrate.activations import collect
from guard.calibrate.consistency import fit_distance_part, fit_parts
from guard.calibrate.taps import OnnxTaps
from guard.errors import ModelError
from guard.eval.models import SmallCNN, SmallResNet, export_onnx
from guard.model.graph import default_taps, fold_static_mask, load_model, opset_version, validate_taps
from guard.model.serving import (
    CUT_PREFIX,
    DEMOTE_SCORE_OUTPUT,
    MASK_PREFIX,
    NEEDS_OUTPUT,
    ROWS_INPUT,
    SCORE_OUTPUT,
    serving_graphs,
)
from guard.runtime.checks import ConsistencyCheck, repredict_masks


class _ViewFlatten(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.size(0), -1)


@pytest.fixture(scope="module", params=["cnn", "resnet", "cnn-opset17", "cnn-opset11", "resnet-opset11", "cnn-opset10",
                                        "cnnview-opset12"])
def exported(request, tmp_path_factory):
    """The eval models as torch 2.13 exports them (opset 20), converted down to 17, and from the legacy exporter at
    opset 11 (where Unsqueeze and the reductions take attributes, not inputs) and 10, the oldest guard serves (TopK
    without its `largest` and `sorted`); and the CNN flattened with `x.view(x.size(0), -1)` at opset 12, which the
    legacy exporter builds from Shape, Gather and Concat, so that shape inference knows no shape after it."""
    import warnings

    from onnx import version_converter

    arch, _, opset = request.param.partition("-opset")
    torch.manual_seed(1)
    module = (SmallResNet() if arch == "resnet" else SmallCNN()).eval()
    if arch == "cnnview":
        module.flatten = _ViewFlatten()
    path = tmp_path_factory.mktemp(request.param) / "m.onnx"
    sample = torch.zeros(1, 1, 28, 28)
    if opset in ("10", "11", "12"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, (sample,), str(path), dynamo=False, opset_version=int(opset), input_names=["input"],
                              output_names=["logits"], dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}})
    else:
        export_onnx(module, path, sample)
        if opset:
            onnx.save(version_converter.convert_version(onnx.load(path), int(opset)), path)
    model = load_model(path)
    assert opset_version(model.proto) == int(opset or 20)
    return model


def random_keep(model, taps, rng) -> dict[str, np.ndarray]:
    channels = [a.shape[1] for a in collect(OnnxTaps(model, taps), np.zeros((1, 1, 28, 28), np.float32)).linf]
    return {tap: rng.random(c) > 0.3 for tap, c in zip(taps, channels, strict=True)}


def test_default_taps_are_last_conv_activations_and_penultimate_features(exported) -> None:
    taps = default_taps(exported, conv_taps=2)
    assert len(taps) == 3
    # calibration's default of four: the ResNet's last four of its seven, all of the CNN's two
    assert default_taps(exported, conv_taps=4)[-3:] == taps
    assert len(default_taps(exported, conv_taps=4)) == (5 if "resnet" in str(exported.path) else 3)
    probe = onnx.ModelProto()
    probe.CopyFrom(exported.proto)
    probe.graph.output.extend(onnx.ValueInfoProto(name=tap) for tap in taps)
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    ran = session.run(taps, {exported.input_name: np.zeros((2, 1, 28, 28), np.float32)})
    assert [a.ndim for a in ran] == [4, 4, 2]


def test_folded_mask_matches_masked_torch_and_adds_no_nodes_on_the_cnn(exported) -> None:
    rng = np.random.default_rng(0)
    taps = default_taps(exported, conv_taps=2)
    keep = random_keep(exported, taps, rng)
    folded, modes = fold_static_mask(exported, keep)
    x = rng.random((6, 1, 28, 28), dtype=np.float32)
    session = ort.InferenceSession(folded.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run([exported.output_name], {exported.input_name: x})[0]
    with torch.no_grad():
        want = collect(OnnxTaps(exported, taps), x, masks=[k.astype(np.float32)[None] for k in keep.values()]).logits
    np.testing.assert_allclose(got, want, atol=1e-4)
    if all(mode != "mul" for mode in modes.values()):
        assert len(folded.graph.node) == len(exported.proto.graph.node)
    if exported.proto.graph.node[0].op_type == "Conv" and modes[taps[-1]] == "consumer":
        # SmallCNN: the last tap feeds the head directly; its pruned features' columns are zero, the rest intact.
        head = folded.graph.node[-1]
        weight = onnx.numpy_helper.to_array(next(i for i in folded.graph.initializer if i.name == head.input[1]))
        pruned = ~keep[taps[-1]]
        assert np.all(weight[:, pruned] == 0) and np.all(np.abs(weight[:, ~pruned]).sum(axis=0) > 0)


def _graph(nodes: list, initializers: dict[str, np.ndarray], extra_outputs: tuple[str, ...] = ()) -> onnx.ModelProto:
    """A small (N, 2, 6, 6) -> (N, 3) model from ONNX nodes, its first output the logits."""
    from onnx import TensorProto, helper, numpy_helper

    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])]
    outputs += [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in extra_outputs]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 6, 6])],
                              outputs, [numpy_helper.from_array(v, k) for k, v in initializers.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _masked_at(proto: onnx.ModelProto, keep: dict[str, np.ndarray]) -> onnx.ModelProto:
    """The model with each tap multiplied by its keep mask: what calibration measured."""
    from guard.model.graph import insert_mul

    masked = onnx.ModelProto()
    masked.CopyFrom(proto)
    for index, (tap, mask) in enumerate(keep.items()):
        masked.graph.initializer.append(onnx.numpy_helper.from_array(
            mask.astype(np.float32).reshape(1, -1, 1, 1) if mask.size == 4 else mask.astype(np.float32)[None],
            f"mask{index}"))
        insert_mul(masked.graph, tap, f"mask{index}", f"{tap}__masked")
    return masked


def _tied_and_branched() -> dict[str, tuple[onnx.ModelProto, dict[str, np.ndarray]]]:
    from onnx import helper

    rng = np.random.default_rng(0)
    conv = lambda cin: rng.normal(size=(4, cin, 3, 3)).astype(np.float32)  # noqa: E731
    head = rng.normal(size=(3, 4 * 36)).astype(np.float32)
    node = helper.make_node
    models = {
        # one conv weight applied twice (a module called twice): the first use's pruned inputs must not be zeroed
        # in the weight the second use shares
        "shared weight": ([node("Conv", ["x", "w1"], ["c1"], pads=[1] * 4), node("Relu", ["c1"], ["a"]),
                           node("Conv", ["a", "w2"], ["c2"], pads=[1] * 4), node("Relu", ["c2"], ["b"]),
                           node("Conv", ["b", "w2"], ["c3"], pads=[1] * 4), node("Relu", ["c3"], ["t"]),
                           node("Flatten", ["t"], ["f"]), node("Gemm", ["f", "head"], ["logits"], transB=1)],
                          {"w1": conv(2), "w2": conv(4), "head": head}, ["a", "b"]),
        # a tap whose producer's output also feeds another branch (Relu(c) and Relu(-c), both kept): zeroing the
        # producer would take the channels from the other branch too
        "branched producer": ([node("Conv", ["x", "w1"], ["c"], pads=[1] * 4), node("Relu", ["c"], ["t"]),
                               node("Neg", ["c"], ["n"]), node("Relu", ["n"], ["u"]),
                               node("Concat", ["t", "u"], ["cat"], axis=1),
                               node("Conv", ["cat", "w3"], ["d"], pads=[1] * 4), node("Relu", ["d"], ["e"]),
                               node("Flatten", ["e"], ["f"]), node("Gemm", ["f", "head"], ["logits"], transB=1)],
                              {"w1": conv(2), "w3": conv(8), "head": head}, ["t"]),
        # a MatMul on (N, C, H, W) contracts W: zeroing its weight's rows by channel number zeroed widths instead
        "matmul on a conv tap": ([node("Conv", ["x", "w1"], ["c"], pads=[1] * 4), node("Relu", ["c"], ["t"]),
                                  node("MatMul", ["t", "wm"], ["m"]),
                                  node("ReduceMean", ["m"], ["r"], axes=[2, 3], keepdims=0),
                                  node("Gemm", ["r", "head4"], ["logits"], transB=1)],
                                 {"w1": conv(2), "wm": rng.normal(size=(6, 6)).astype(np.float32),
                                  "head4": rng.normal(size=(3, 4)).astype(np.float32)}, ["t"]),
        # Flatten(axis=2) gives (N·C, H·W), the channels in the rows: not the (N, C·H·W) a Gemm's columns can fold
        "flatten after the channels": ([node("Conv", ["x", "w1"], ["c"], pads=[1] * 4), node("Relu", ["c"], ["t"]),
                                        node("Flatten", ["t"], ["rows"], axis=2),
                                        node("Gemm", ["rows", "w36"], ["g"], transB=1),
                                        node("Reshape", ["g", "shape"], ["f"]),
                                        node("Gemm", ["f", "head20"], ["logits"], transB=1)],
                                       {"w1": conv(2), "w36": rng.normal(size=(5, 36)).astype(np.float32),
                                        "shape": np.array([-1, 20]), "head20": rng.normal(size=(3, 20)).astype(np.float32)},
                                       ["t"]),
    }
    out = {}
    for name, (nodes, inits, taps) in models.items():
        masks = (np.array([True, False, True, False]), np.array([True, True, False, True]))
        out[name] = (_graph(nodes, inits), dict(zip(taps, masks, strict=False)))
    return out


@pytest.mark.parametrize("case", ["shared weight", "branched producer", "matmul on a conv tap",
                                  "flatten after the channels"])
def test_the_fold_changes_nothing_but_the_masked_taps(case: str) -> None:
    """The static mask is folded into weights only where nothing else reads them; elsewhere a Mul keeps the served
    model the masked model calibration measured."""
    proto, keep = _tied_and_branched()[case]
    folded, _ = fold_static_mask(load_model(proto), keep)
    x = np.random.default_rng(1).random((8, 2, 6, 6), dtype=np.float32)
    run = lambda p: ort.InferenceSession(p.SerializeToString(), providers=["CPUExecutionProvider"]).run(  # noqa: E731
        ["logits"], {"x": x})[0]
    want = run(_masked_at(proto, keep))
    assert np.abs(want - run(proto)).max() > 1e-3  # the mask matters, so a wrong fold would show
    np.testing.assert_allclose(run(folded), want, atol=1e-5)


def test_a_producer_fold_leaves_a_broadcast_gemm_bias_alone() -> None:
    """A Gemm's C of shape (1, M) is valid ONNX: zeroing row `channels` of it failed (IndexError) or zeroed all."""
    from onnx import helper

    rng = np.random.default_rng(0)
    node = helper.make_node
    proto = _graph([node("Conv", ["x", "w"], ["c"], pads=[1] * 4), node("Relu", ["c"], ["r"]),
                    node("Flatten", ["r"], ["f"]), node("Gemm", ["f", "fw", "fb"], ["h"], transB=1),
                    node("Relu", ["h"], ["feat"]), node("Gemm", ["feat", "ow"], ["logits"], transB=1),
                    node("Identity", ["feat"], ["embedding"])],
                   {"w": rng.normal(size=(4, 2, 3, 3)).astype(np.float32),
                    "fw": rng.normal(size=(6, 144)).astype(np.float32), "fb": rng.normal(size=(1, 6)).astype(np.float32),
                    "ow": rng.normal(size=(3, 6)).astype(np.float32)}, extra_outputs=("embedding",))
    x = np.random.default_rng(1).random((8, 2, 6, 6), dtype=np.float32)
    for pruned in (0, 2):
        keep = {"feat": np.arange(6) != pruned}
        folded, _ = fold_static_mask(load_model(proto), keep)
        run = lambda p: ort.InferenceSession(p.SerializeToString(),  # noqa: E731
                                             providers=["CPUExecutionProvider"]).run(["logits"], {"x": x})[0]
        np.testing.assert_allclose(run(folded), run(_masked_at(proto, keep)), atol=1e-5)


def _check_for(linf: list[np.ndarray], rng) -> ConsistencyCheck:
    """A check with profiles near these activations, so some samples pass and some do not."""
    flat = np.concatenate(linf, axis=1)
    classes = 10
    mean = np.repeat(flat.mean(axis=0, keepdims=True), classes, axis=0) + rng.normal(0, 0.05, (classes, flat.shape[1]))
    scale = np.repeat(flat.std(axis=0, keepdims=True) + 0.05, classes, axis=0)
    return ConsistencyCheck(mean.astype(np.float32), scale.astype(np.float32), rng.random(flat.shape[1]) > 0.1,
                            top_q=3, k=1.0, cut=0.5)


def test_served_graph_computes_the_check_and_the_tail_the_masked_rest(exported) -> None:
    rng = np.random.default_rng(1)
    taps = default_taps(exported, conv_taps=2)
    keep = random_keep(exported, taps, rng)
    tap_model = OnnxTaps(exported, taps)
    x = rng.random((8, 1, 28, 28), dtype=np.float32)
    keep_rows = [k.astype(np.float32)[None] for k in keep.values()]
    with torch.no_grad():
        masked = collect(tap_model, x, masks=keep_rows, with_unit_max=True)
    bounds = {tap: 0.5 * b for tap, b in zip(taps, masked.unit_max, strict=True) if b is not None}
    folds = fold_static_mask(exported, keep)[1]
    # What the served graph's ℓ∞ shows: pruned channels folded into their producer read zero there.
    linf = [np.where(keep[t] | (folds[t] != "producer"), a, 0) for t, a in zip(taps, masked.linf, strict=True)]
    check = _check_for(linf, rng)
    z = check(linf, masked.predictions).z
    check.k = float(np.quantile(z.max(axis=1), 0.6))
    # Score parts as calibration makes them: the top-q z over every channel, and the last tap on its own, either as
    # its own top-q z or as a distance over its active channels. Each part must be the maximum for some sample.
    everything = np.arange(z.shape[1])
    last_tap = everything[-linf[-1].shape[1]:]
    every, last = fit_parts(z, [everything, last_tap], check.top_q)
    flat = np.concatenate(linf, axis=1)
    labels = masked.predictions
    distance, _ = fit_distance_part(flat, labels, last_tap[check.active[last_tap]], 10, shrink=0.1, folds=2, seed=0)
    # Eight samples cannot set a part's scale; put the distance above the other part where it is largest, below it
    # where it is smallest. On the CNN the top-q parts' raw scores can coincide; a narrower last part still wins some.
    raw, other = distance.distance(flat, labels), every.standardised(flat, z, labels, check.top_q)
    high, low = raw.argmax(), raw.argmin()
    spread = float(raw[high] - raw[low]) / float(other[high] - other[low] + 1)
    distance = replace(distance, centre=float(raw[high]) - (float(other[high]) + 0.5) * spread, spread=spread)
    # The second pair's last part only flags: the demote score is the part over every channel alone.
    for parts in ((every, distance), (every, replace(last, spread=last.spread / 2, demotes=False))):
        check.parts = parts
        want = check(linf, labels)
        tau = float(np.quantile(want.score, 0.8))
        graphs = serving_graphs(exported, taps, keep, bounds, check, tau)
        session = ort.InferenceSession(graphs.served, providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]
        out = dict(zip(names, session.run(None, {exported.input_name: x}), strict=True))
        np.testing.assert_allclose(out[exported.output_name], masked.logits, atol=1e-4)
        np.testing.assert_allclose(out[SCORE_OUTPUT], want.score, atol=1e-4)
        np.testing.assert_allclose(out[DEMOTE_SCORE_OUTPUT], want.demote_score, atol=1e-4)
        demoting = [part.standardised(flat, want.z, labels, check.top_q) for part in parts if part.demotes]
        np.testing.assert_allclose(want.demote_score, np.max(demoting, axis=0), atol=1e-6)
        by_part = np.stack([part.standardised(flat, want.z, labels, check.top_q) for part in parts])
        assert len(set(by_part.argmax(axis=0))) == 2, "each score part must be the maximum for some sample"
    # The ResNet's first tap is deep, so its tail is short; the CNN's is its first conv, so it re-runs from the input.
    cut_at_tap = "resnet" in str(exported.path)
    assert graphs.tail_from_input is not cut_at_tap
    assert graphs.cut[0] == (taps[0] if cut_at_tap else exported.input_name)
    decided = np.abs(want.score - tau) > 1e-3  # away from the threshold float32 and float64 agree
    needs = want.compromised.any(axis=1) | (want.score > tau)
    assert 0 < needs.sum() < len(x), "the planted profile must pass some samples and not others"
    np.testing.assert_array_equal(out[NEEDS_OUTPUT][decided], needs[decided])
    want_masks = repredict_masks(list(keep.values()), [bounds.get(t) for t in taps], want.z, check.cut)
    unbounded = [i for i, t in enumerate(taps) if t not in bounds]
    assert graphs.masks == [f"{MASK_PREFIX}{i}" for i in unbounded] and unbounded
    for index in unbounded:
        np.testing.assert_array_equal(out[f"{MASK_PREFIX}{index}"], want_masks[index])

    tail = ort.InferenceSession(graphs.tail, providers=["CPUExecutionProvider"])
    tail_outputs = {out for node in onnx.load_from_string(graphs.tail).graph.node for out in node.output}
    first_layer = next(n for n in exported.proto.graph.node if n.op_type == "Conv").output[0]
    assert (first_layer in tail_outputs) is not cut_at_tap, "a tail after the tap must not re-run the first layer"
    rows = np.array([0, 3, 4, 7])
    # Taps with unit bounds re-predict with their static mask; the others with whatever masks they are given.
    sample_masks = [np.tile(k, (len(x), 1)).astype(np.float32) if t in bounds else
                    (np.tile(k, (len(x), 1)) & (rng.random((len(x), len(k))) > 0.2)).astype(np.float32)
                    for t, k in keep.items()]
    feeds = {f"{CUT_PREFIX}{i}": (x if name == exported.input_name else out[name])
             for i, name in enumerate(graphs.cut)}
    feeds.update({f"{MASK_PREFIX}{i}": sample_masks[i] for i in unbounded})
    got = tail.run(None, {**feeds, ROWS_INPUT: rows})[0]
    with torch.no_grad():
        benign = collect(tap_model, x[rows], masks=[m[rows] for m in sample_masks],
                         bounds=[bounds.get(t) for t in taps]).logits
    np.testing.assert_allclose(got, benign, atol=1e-4)
    assert not np.allclose(benign, masked.logits[rows], atol=1e-3), "the masks and bounds must change something"


def test_default_taps_with_no_conv_taps_is_the_penultimate_features_alone(exported) -> None:
    every = default_taps(exported, conv_taps=100)
    assert default_taps(exported, conv_taps=0) == every[-1:]
    assert default_taps(exported, conv_taps=1) == every[-2:]


def test_default_taps_with_the_first_conv_add_it_once(exported) -> None:
    """`first_conv` puts the first conv activation in front of the last ones, unless it is among them already."""
    every = default_taps(exported, conv_taps=100)
    assert default_taps(exported, conv_taps=1, first_conv=True) == [every[0], *every[-2:]]
    assert default_taps(exported, conv_taps=100, first_conv=True) == every
    assert default_taps(exported, conv_taps=0, first_conv=True) == [every[0], every[-1]]


def test_tail_falls_back_to_the_whole_graph_when_a_shape_crosses_the_cut() -> None:
    """A shape computed from the input before the first tap and reused after it cannot be row-gathered."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(size=(16, 4)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.normal(size=(8, 3)).astype(np.float32), "w2"),
             numpy_helper.from_array(np.array([0], np.int64), "zero"),
             numpy_helper.from_array(np.array([-1], np.int64), "minus_one")]
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Gather", ["shape", "zero"], ["batch"], axis=0),
        helper.make_node("Concat", ["batch", "minus_one"], ["flat_shape"], axis=0),
        helper.make_node("Reshape", ["x", "flat_shape"], ["flat"]),
        helper.make_node("MatMul", ["flat", "w1"], ["h"]),
        helper.make_node("Relu", ["h"], ["tap"]),
        helper.make_node("Concat", ["tap", "tap"], ["wide"], axis=1),
        helper.make_node("Reshape", ["wide", "flat_shape"], ["wide_flat"]),  # the shape crosses the cut
        helper.make_node("MatMul", ["wide_flat", "w2"], ["logits"]),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 4, 4])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])], inits)
    model = load_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9))
    keep = {"tap": np.ones(4, dtype=bool)}
    check = ConsistencyCheck(np.zeros((3, 4), np.float32), np.ones((3, 4), np.float32), np.ones(4, dtype=bool),
                             top_q=1, k=100.0, cut=100.0)
    graphs = serving_graphs(model, ["tap"], keep, {}, check, tau=100.0)
    assert graphs.tail_from_input and graphs.cut == ["x"]
    x = rng.random((5, 1, 4, 4), dtype=np.float32)
    want = ort.InferenceSession(model.proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    tail = ort.InferenceSession(graphs.tail, providers=["CPUExecutionProvider"])
    rows = np.array([4, 1])
    got = tail.run(None, {f"{CUT_PREFIX}0": x, f"{MASK_PREFIX}0": np.ones((5, 4), np.float32), ROWS_INPUT: rows})[0]
    np.testing.assert_allclose(got, want[0][rows], atol=1e-5)


def test_a_model_that_computes_in_float16_is_refused_at_its_taps_and_logits() -> None:
    """float32 in and out, float16 inside (a converter's keep-io-types layout) calibrated, then failed to load in ONNX
    Runtime when serving: the served check computes in float32."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    node = helper.make_node
    half = {"w": rng.normal(size=(4, 2, 3, 3)).astype(np.float16), "fw": rng.normal(size=(3, 144)).astype(np.float16)}
    nodes = [node("Cast", ["x"], ["x16"], to=TensorProto.FLOAT16), node("Conv", ["x16", "w"], ["c"], pads=[1] * 4),
             node("Relu", ["c"], ["r"]), node("Flatten", ["r"], ["f"]), node("Gemm", ["f", "fw"], ["l16"], transB=1),
             node("Cast", ["l16"], ["logits"], to=TensorProto.FLOAT)]
    model = load_model(_graph(nodes, half))
    with pytest.raises(ModelError, match=r"float32 activations; taps \{'r': 'FLOAT16', 'f': 'FLOAT16'\}"):
        validate_taps(model, default_taps(model, conv_taps=1))
    half_logits = _graph([*nodes[:-1], node("Identity", ["l16"], ["logits"])], half)
    half_logits.graph.output[0].type.tensor_type.elem_type = TensorProto.FLOAT16
    with pytest.raises(ModelError, match="float32 logits; 'logits' is FLOAT16"):
        load_model(half_logits)


def test_an_ir3_model_whose_initializers_are_inputs_is_served() -> None:
    """IR 3 wants every initializer listed as a graph input; the served graph adds initializers of its own."""
    from onnx import helper

    rng = np.random.default_rng(0)
    node = helper.make_node
    weights = {"w": rng.normal(size=(4, 2, 3, 3)).astype(np.float32),
               "fw": rng.normal(size=(3, 144)).astype(np.float32)}
    proto = _graph([node("Conv", ["x", "w"], ["c"], pads=[1] * 4), node("Relu", ["c"], ["r"]),
                    node("Flatten", ["r"], ["f"]), node("Gemm", ["f", "fw"], ["logits"], transB=1)], weights)
    proto.graph.input.extend(helper.make_tensor_value_info(k, onnx.TensorProto.FLOAT, v.shape) for k, v in weights.items())
    proto.ir_version = 3
    onnx.checker.check_model(proto)
    model = load_model(proto)
    keep = {"r": np.array([True, False, True, True])}
    x = rng.random((8, 2, 6, 6), dtype=np.float32)
    linf = collect(OnnxTaps(model, ["r"]), x, masks=[keep["r"].astype(np.float32)[None]]).linf
    graphs = serving_graphs(model, ["r"], keep, {}, _check_for(linf, rng), 0.0)
    served = ort.InferenceSession(graphs.served, providers=["CPUExecutionProvider"])
    logits = served.run([model.output_name], {"x": x})[0]
    want = ort.InferenceSession(_masked_at(proto, keep).SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(logits, want.run(["logits"], {"x": x})[0], atol=1e-5)


def test_every_shape_past_the_batch_is_known_and_the_last_conv_folds_into_the_head(exported) -> None:
    """The legacy exporter's x.view(x.size(0), -1) left its flatten (None, None) by inference, which was taken as
    known: the last conv tap's mask then folded into the conv (the tap reads zero where the head's columns could be
    zeroed instead, and a trigger lighting those channels up went unseen)."""
    from guard.model.graph import tensor_dims

    assert {name: dims for name, dims in tensor_dims(exported.proto).items() if None in dims[1:]} == {}
    if "cnn" in str(exported.path):
        conv = default_taps(exported, conv_taps=1)[0]
        keep = random_keep(exported, [conv], np.random.default_rng(0))
        assert fold_static_mask(exported, keep)[1] == {conv: "consumer"}


def test_shapes_a_model_run_tells_are_measured_once_per_graph(exported, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 100 MB legacy export was run three times per command (taps, their shapes, the served graph): 2.4 s and
    300 MB more at its peak."""
    from guard.model import graph
    from guard.model.graph import tap_shapes, tensor_dims

    sessions = []
    real = ort.InferenceSession
    monkeypatch.setattr(ort, "InferenceSession", lambda *a, **k: sessions.append(1) or real(*a, **k))
    graph._INFO.clear()
    taps = default_taps(exported, conv_taps=2)
    validate_taps(exported, taps)
    assert all(shape is not None for shape in tap_shapes(exported, taps))
    tensor_dims(exported.proto)
    assert len(sessions) == (1 if "cnnview" in str(exported.path) else 0)  # the others' shapes inference tells
