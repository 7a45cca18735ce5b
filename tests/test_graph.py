"""Graph surgery: the static mask folded into weights, ℓ∞ taps as outputs, the re-prediction twin; each checked in
real ONNX Runtime against guard's torch path (the one calibration uses)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from guard.calibrate.activations import collect
from guard.calibrate.taps import OnnxTaps
from guard.eval.models import SmallCNN, SmallResNet, export_onnx
from guard.model.graph import (
    LINF_OUTPUT_PREFIX,
    MASK_INPUT_PREFIX,
    default_taps,
    fold_static_mask,
    load_model,
    serving_graphs,
)


@pytest.fixture(scope="module", params=["cnn", "resnet"])
def exported(request, tmp_path_factory):
    torch.manual_seed(1)
    module = (SmallCNN() if request.param == "cnn" else SmallResNet()).eval()
    path = export_onnx(module, tmp_path_factory.mktemp(request.param) / "m.onnx", torch.zeros(1, 1, 28, 28))
    return load_model(path)


def random_keep(model, taps, rng) -> dict[str, np.ndarray]:
    channels = [a.shape[1] for a in collect(OnnxTaps(model, taps), np.zeros((1, 1, 28, 28), np.float32)).linf]
    return {tap: rng.random(c) > 0.3 for tap, c in zip(taps, channels, strict=True)}


def test_default_taps_are_last_conv_activations_and_penultimate_features(exported) -> None:
    taps = default_taps(exported)
    assert len(taps) == 3
    ranks = {v.name: len(v.type.tensor_type.shape.dim)
             for v in onnx.shape_inference.infer_shapes(exported.proto).graph.value_info}
    assert [ranks[t] for t in taps] == [4, 4, 2]


def test_folded_mask_matches_masked_torch_and_adds_no_nodes_on_the_cnn(exported) -> None:
    rng = np.random.default_rng(0)
    taps = default_taps(exported)
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


def test_served_and_repredict_graphs_match_the_torch_path(exported) -> None:
    rng = np.random.default_rng(1)
    taps = default_taps(exported)
    keep = random_keep(exported, taps, rng)
    tap_model = OnnxTaps(exported, taps)
    x = rng.random((5, 1, 28, 28), dtype=np.float32)
    keep_rows = [k.astype(np.float32)[None] for k in keep.values()]
    with torch.no_grad():
        masked = collect(tap_model, x, masks=keep_rows, with_unit_max=True)
    bounds = {tap: 0.5 * b for tap, b in zip(taps, masked.unit_max, strict=True) if b is not None}
    served, repredict = serving_graphs(exported, taps, keep, bounds)
    session = ort.InferenceSession(served, providers=["CPUExecutionProvider"])
    outputs = session.run(None, {exported.input_name: x})
    linf_names = [o.name for o in session.get_outputs()][1:]
    assert linf_names == [f"{LINF_OUTPUT_PREFIX}{i}" for i in range(len(taps))]
    for tap, got, want in zip(taps, outputs[1:], masked.linf, strict=True):
        observable = keep[tap] | (fold_static_mask(exported, keep)[1][tap] != "producer")
        np.testing.assert_allclose(got[:, observable], want[:, observable], atol=1e-4)
    np.testing.assert_allclose(outputs[0], masked.logits, atol=1e-4)
    sample_masks = [(np.tile(k, (5, 1)) & (rng.random((5, len(k))) > 0.2)).astype(np.float32)
                    for k in keep.values()]
    twin = ort.InferenceSession(repredict, providers=["CPUExecutionProvider"])
    got = twin.run(None, {exported.input_name: x,
                          **{f"{MASK_INPUT_PREFIX}{i}": m for i, m in enumerate(sample_masks)}})[0]
    with torch.no_grad():
        want = collect(tap_model, x, masks=sample_masks, bounds=[bounds.get(t) for t in taps]).logits
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert not np.allclose(want, masked.logits, atol=1e-3), "the masks and bounds must change something"
