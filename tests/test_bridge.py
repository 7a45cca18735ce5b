"""The torch bridge against real ONNX Runtime, on models exported by torch's two exporters and on small
hand-built graphs that exercise the attribute and input forms of each op across opsets."""

from __future__ import annotations

import functools
import io
import warnings
from collections.abc import Iterator, Sequence

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from guard.errors import ModelError, UnsupportedOpError
from guard.model.bridge import OnnxModule

EXPORTS = [
    ("cnn", "dynamo"),
    ("cnn", "legacy"),
    ("resnet", "dynamo"),
    ("resnet", "legacy"),
    ("resnet", "dynamo-unoptimized"),  # keeps BatchNormalization, Constant, Shape, Expand and CastLike nodes
]
IDS = [f"{m}-{e}" for m, e in EXPORTS]


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.relu1 = nn.Conv2d(1, 8, 3, padding=1), nn.ReLU()
        self.conv2, self.relu2 = nn.Conv2d(8, 16, 3, padding=1), nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.fc1, self.relu3, self.fc2 = nn.Linear(16 * 7 * 7, 32), nn.ReLU(), nn.Linear(32, 10)
        self.first_relu = self.relu1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.relu1(self.conv1(x)))
        x = self.pool(self.relu2(self.conv2(x)))
        return self.fc2(self.relu3(self.fc1(torch.flatten(x, 1))))


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.relu1, self.relu2 = nn.ReLU(), nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(y + self.shortcut(x))


class SmallResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.layer1, self.layer2 = Block(8, 8, 1), Block(8, 16, 2)
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(16, 10)
        self.first_relu = self.stem[2]
        for m in self.modules():  # non-trivial running statistics, so BatchNorm matters
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.data.uniform_(0.5, 1.5)
                m.bias.data.uniform_(-0.5, 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


@functools.cache
def _exported(model: str, exporter: str) -> tuple[nn.Module, onnx.ModelProto]:
    """A seeded model in eval mode and its ONNX export (batch dimension dynamic)."""
    torch.manual_seed(0)
    module = (SmallCNN if model == "cnn" else SmallResNet)().eval()
    x = torch.randn(2, 1, 28, 28)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter.startswith("dynamo"):
            pytest.importorskip("onnxscript")
            program = torch.onnx.export(
                module, (x,), dynamo=True, input_names=["x"], output_names=["logits"],
                dynamic_shapes=({0: torch.export.Dim("batch")},), optimize=exporter == "dynamo", verbose=False,
            )
            proto = program.model_proto
        else:
            buf = io.BytesIO()
            torch.onnx.export(
                module, (x,), buf, dynamo=False, opset_version=13, input_names=["x"], output_names=["logits"],
                dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}},
            )
            proto = onnx.load_from_string(buf.getvalue())
    return module, proto


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """These models are tiny: intra-op threads cost more than they save (a lot, on a shared 2-core box)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _relu_outputs(proto: onnx.ModelProto) -> list[str]:
    return [n.output[0] for n in proto.graph.node if n.op_type == "Relu"]


def _with_outputs(proto: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """A copy of the model that also outputs the named intermediate tensors."""
    extended = onnx.ModelProto()
    extended.CopyFrom(proto)
    for name in names:
        extended.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    return extended


def _ort(proto: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))


def _batch(n: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------- exported models


@pytest.mark.parametrize(("model", "exporter"), EXPORTS, ids=IDS)
def test_outputs_match_onnxruntime_and_torch(model: str, exporter: str) -> None:
    module, proto = _exported(model, exporter)
    bridge = OnnxModule(proto)
    assert bridge.input_names == ["x"] and bridge.output_names == ["logits"]
    opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    assert opset == 13 if exporter == "legacy" else opset >= 18

    x = _batch(3)  # exported with batch 2: the batch dimension must be dynamic
    with torch.no_grad():
        out = bridge(x)
        expected = module(x)
    reference = _ort(proto, {"x": x.numpy()})["logits"]
    np.testing.assert_allclose(out.numpy(), reference, atol=1e-4, rtol=0)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize(("model", "exporter"), EXPORTS, ids=IDS)
def test_capture_matches_onnxruntime(model: str, exporter: str) -> None:
    _, proto = _exported(model, exporter)
    relus = _relu_outputs(proto)
    names = [relus[0], relus[-2]]
    x = _batch(2, seed=2)
    outputs, captured = OnnxModule(proto).run(x, capture=names)
    reference = _ort(_with_outputs(proto, names), {"x": x.numpy()})
    assert set(captured) == set(names)
    for name in names:
        np.testing.assert_allclose(captured[name].detach().numpy(), reference[name], atol=1e-4, rtol=0)
    np.testing.assert_allclose(outputs["logits"].detach().numpy(), reference["logits"], atol=1e-4, rtol=0)


@pytest.mark.parametrize(("model", "exporter"), EXPORTS, ids=IDS)
def test_mask_zeroes_channel_downstream_but_capture_shows_it(model: str, exporter: str) -> None:
    module, proto = _exported(model, exporter)
    bridge = OnnxModule(proto)
    name, channel = _relu_outputs(proto)[0], 3
    mask = torch.ones(1, 8, 1, 1)
    mask[:, channel] = 0
    x = _batch(2, seed=3)
    with torch.no_grad():
        (plain, plain_cap) = bridge.run(x, capture=[name])
        (masked, masked_cap) = bridge.run(x, capture=[name], masks={name: mask})
        hook = module.first_relu.register_forward_hook(lambda mod, args, out: out * mask)
        try:
            expected = module(x)
        finally:
            hook.remove()

    torch.testing.assert_close(masked["logits"], expected, atol=1e-4, rtol=0)
    assert (masked["logits"] - plain["logits"]).abs().max() > 1e-3  # the channel mattered
    # The capture is the value before the mask: the masked channel is still observable.
    torch.testing.assert_close(masked_cap[name], plain_cap[name])
    assert masked_cap[name][:, channel].abs().sum() > 0


@pytest.mark.parametrize(("model", "exporter"), EXPORTS, ids=IDS)
def test_gradient_wrt_capture_matches_torch(model: str, exporter: str) -> None:
    module, proto = _exported(model, exporter)
    name = _relu_outputs(proto)[0]
    x = _batch(2, seed=4)
    outputs, captured = OnnxModule(proto).run(x, capture=[name])
    (grad,) = torch.autograd.grad(outputs["logits"][:, 3].sum(), captured[name])

    acts: list[torch.Tensor] = []
    hook = module.first_relu.register_forward_hook(lambda mod, args, out: acts.append(out))
    try:
        loss = module(x)[:, 3].sum()
    finally:
        hook.remove()
    (expected,) = torch.autograd.grad(loss, acts[0])
    assert grad.abs().sum() > 0
    torch.testing.assert_close(grad, expected, atol=1e-5, rtol=1e-4)


def test_gradient_through_mask_and_input_that_requires_grad() -> None:
    _, proto = _exported("cnn", "legacy")
    bridge = OnnxModule(proto)
    name = _relu_outputs(proto)[0]
    x = _batch(1).requires_grad_(True)
    mask = torch.ones(1, 8, 1, 1)
    mask[:, 0] = 0
    outputs, captured = bridge.run({"x": x}, capture=[name, "x"], masks={name: mask})
    grad_act, grad_x = torch.autograd.grad(outputs["logits"].sum(), [captured[name], captured["x"]])
    assert grad_act[:, 0].abs().sum() == 0 and grad_act[:, 1:].abs().sum() > 0
    assert grad_x.abs().sum() > 0
    with torch.no_grad():  # without grad mode nothing is made to require grad
        _, captured = bridge.run(x.detach(), capture=[name])
    assert not captured[name].requires_grad


def test_initializers_are_frozen_parameters() -> None:
    _, proto = _exported("cnn", "dynamo")
    bridge = OnnxModule(proto)
    weight = bridge.initializer("fc2.weight")
    assert isinstance(weight, nn.Parameter) and not weight.requires_grad
    expected = next(numpy_helper.to_array(i) for i in proto.graph.initializer if i.name == "fc2.weight")
    np.testing.assert_array_equal(weight.detach().numpy(), expected)
    assert all("." not in key for key in bridge.params)
    assert not any(p.requires_grad for p in bridge.parameters())
    assert all(not b.is_floating_point() for b in bridge.buffers())  # the int64 Reshape shape
    with pytest.raises(ModelError, match=r"fc2\.wieght"):
        bridge.initializer("fc2.wieght")


def test_unknown_capture_or_mask_names_are_reported() -> None:
    _, proto = _exported("cnn", "legacy")
    bridge = OnnxModule(proto)
    with pytest.raises(ModelError, match="no_such_tensor") as info:
        bridge.run(_batch(1), capture=["no_such_tensor"])
    assert "valid names include" in str(info.value) and "'x'" in str(info.value)
    with pytest.raises(ModelError, match="/Relu_9_output_0"):
        bridge.run(_batch(1), masks={"/Relu_9_output_0": torch.ones(1)})
    with pytest.raises(ModelError, match="does not broadcast"):
        bridge.run(_batch(1), masks={_relu_outputs(proto)[0]: torch.ones(5)})


# ------------------------------------------------------------------------------------ hand-built graphs


def _model(nodes: list[onnx.NodeProto], feeds: dict[str, np.ndarray], outputs: dict[str, int],
           opset: int, inits: dict[str, np.ndarray] | None = None) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
         for k, v in feeds.items()],
        [helper.make_tensor_value_info(k, t, None) for k, t in outputs.items()],
        [numpy_helper.from_array(v, k) for k, v in (inits or {}).items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)


def _rand(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _i64(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.int64)


F, I64, B = TensorProto.FLOAT, TensorProto.INT64, TensorProto.BOOL
X4 = {"x": _rand(2, 4, 7, 6)}
N = helper.make_node

CASES: dict[str, tuple[list[onnx.NodeProto], dict[str, np.ndarray], dict[str, int], int, dict[str, np.ndarray]]] = {
    "conv-asym-pads-groups-dilation": (
        [N("Conv", ["x", "w", "b"], ["y"], group=2, pads=[0, 1, 2, 1], strides=[2, 1], dilations=[2, 1])],
        X4, {"y": F}, 11, {"w": _rand(6, 2, 3, 2, seed=1), "b": _rand(6, seed=2)}),
    "conv-same-upper": (
        [N("Conv", ["x", "w"], ["y"], auto_pad="SAME_UPPER", strides=[2, 2])],
        X4, {"y": F}, 20, {"w": _rand(3, 4, 4, 3, seed=1)}),
    "conv-same-lower-1d": (
        [N("Conv", ["x", "w"], ["y"], auto_pad="SAME_LOWER", strides=[2])],
        {"x": _rand(2, 3, 9)}, {"y": F}, 13, {"w": _rand(5, 3, 4, seed=1)}),
    "conv-transpose": (
        [N("ConvTranspose", ["x", "w", "b"], ["y"], strides=[2, 2], pads=[1, 0, 0, 1], output_padding=[1, 1])],
        X4, {"y": F}, 13, {"w": _rand(4, 3, 3, 3, seed=1), "b": _rand(3, seed=2)}),
    "gemm-trans-a-alpha-beta": (
        [N("Gemm", ["a", "b", "c"], ["y"], transA=1, alpha=0.5, beta=2.0)],
        {"a": _rand(5, 3)}, {"y": F}, 13, {"b": _rand(5, 4, seed=1), "c": _rand(3, 4, seed=2)}),
    "gemm-linear": (
        [N("Gemm", ["a", "b", "c"], ["y"], transB=1)],
        {"a": _rand(5, 3)}, {"y": F}, 11, {"b": _rand(4, 3, seed=1), "c": _rand(4, seed=2)}),
    "matmul-batched": ([N("MatMul", ["a", "b"], ["y"])], {"a": _rand(2, 3, 5), "b": _rand(5, 4)}, {"y": F}, 13, {}),
    "elementwise-chain": (
        [N("Abs", ["x"], ["a"]), N("Add", ["a", "one"], ["b"]), N("Sqrt", ["b"], ["c"]), N("Log", ["c"], ["d"]),
         N("Exp", ["d"], ["e"]), N("Neg", ["e"], ["f"]), N("Erf", ["f"], ["g"]), N("Tanh", ["g"], ["h"]),
         N("Sigmoid", ["h"], ["i"]), N("Sub", ["i", "x"], ["j"]), N("Mul", ["j", "x"], ["k"]),
         N("Div", ["k", "b"], ["m"]), N("Pow", ["b", "two"], ["n"]), N("Sum", ["m", "n", "x"], ["y"])],
        X4, {"y": F}, 13, {"one": np.float32([1.0]), "two": np.float32(2.0)}),
    "activations": (
        [N("LeakyRelu", ["x"], ["a"], alpha=0.1), N("HardSigmoid", ["x"], ["b"], alpha=0.3, beta=0.4),
         N("HardSwish", ["x"], ["c"]), N("Gelu", ["x"], ["d"], approximate="tanh"), N("Gelu", ["x"], ["e"]),
         N("Relu", ["x"], ["f"]), N("Elu", ["x"], ["g"], alpha=0.7), N("Softplus", ["x"], ["h"])],
        X4, dict.fromkeys("abcdefgh", F), 20, {}),
    "softmax-opset11-coerces-to-2d": (
        [N("Softmax", ["x"], ["a"], axis=2), N("LogSoftmax", ["x"], ["b"])], X4, {"a": F, "b": F}, 11, {}),
    "softmax-opset13-single-axis": (
        [N("Softmax", ["x"], ["a"], axis=1), N("LogSoftmax", ["x"], ["b"])], X4, {"a": F, "b": F}, 13, {}),
    "clip-inputs": (
        [N("Clip", ["x", "lo", "hi"], ["a"]), N("Clip", ["x", "", "hi"], ["b"]), N("Clip", ["x"], ["c"])],
        X4, {"a": F, "b": F, "c": F}, 13, {"lo": np.float32(-0.5), "hi": np.float32(0.7)}),
    "clip-attributes": ([N("Clip", ["x"], ["y"], min=-0.2, max=0.3)], X4, {"y": F}, 6, {}),
    "batchnorm": (
        [N("BatchNormalization", ["x", "s", "b", "m", "v"], ["y"], epsilon=1e-3)], X4, {"y": F}, 15,
        {"s": _rand(4, seed=1), "b": _rand(4, seed=2), "m": _rand(4, seed=3),
         "v": np.abs(_rand(4, seed=4)) + 0.5}),
    "layernorm": (
        [N("LayerNormalization", ["x", "s", "b"], ["y"], axis=-2)], X4, {"y": F}, 17,
        {"s": _rand(7, 6, seed=1), "b": _rand(7, 6, seed=2)}),
    "maxpool-ceil-pads": (
        [N("MaxPool", ["x"], ["y"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], ceil_mode=1)],
        X4, {"y": F}, 13, {}),
    "maxpool-asym-pads-dilation": (
        [N("MaxPool", ["x"], ["y"], kernel_shape=[3, 2], pads=[0, 1, 2, 0], dilations=[2, 1])],
        X4, {"y": F}, 13, {}),
    "avgpool-exclude-pad": (
        [N("AveragePool", ["x"], ["y"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])],
        X4, {"y": F}, 13, {}),
    "avgpool-include-pad": (
        [N("AveragePool", ["x"], ["y"], kernel_shape=[3, 2], pads=[1, 1, 1, 1], count_include_pad=1)],
        X4, {"y": F}, 11, {}),
    "pools-ceil-end-pad-above-begin-pad": (  # torch alone would add a last column of windows inside the end pad
        [N("MaxPool", ["x"], ["a"], kernel_shape=[2, 2], strides=[2, 2], pads=[0, 0, 1, 1], ceil_mode=1),
         N("AveragePool", ["x"], ["b"], kernel_shape=[2, 2], strides=[2, 2], pads=[0, 0, 1, 1], ceil_mode=1),
         N("AveragePool", ["x"], ["c"], kernel_shape=[3, 2], strides=[2, 2], pads=[0, 0, 2, 1], ceil_mode=1,
           count_include_pad=1),
         N("MaxPool", ["x"], ["d"], kernel_shape=[2, 2], strides=[3, 3], pads=[0, 0, 1, 1], ceil_mode=1,
           dilations=[2, 2])],
        X4, dict.fromkeys("abcd", F), 19, {}),
    "avgpool-asym-pads": (
        [N("AveragePool", ["x"], ["a"], kernel_shape=[3, 3], pads=[0, 2, 1, 0]),
         N("AveragePool", ["x"], ["b"], kernel_shape=[3, 3], pads=[0, 2, 1, 0], count_include_pad=1)],
        X4, {"a": F, "b": F}, 19, {}),
    "global-pools": (
        [N("GlobalAveragePool", ["x"], ["a"]), N("GlobalMaxPool", ["x"], ["b"])], X4, {"a": F, "b": F}, 13, {}),
    "reduce-attribute-axes": (
        [N("ReduceMean", ["x"], ["a"], axes=[1, -1], keepdims=0), N("ReduceMax", ["x"], ["b"], axes=[2]),
         N("ReduceSum", ["x"], ["c"], axes=[0, 3]), N("ReduceSumSquare", ["x"], ["d"], axes=[1], keepdims=0)],
        X4, {"a": F, "b": F, "c": F, "d": F}, 11, {}),
    "reduce-input-axes": (
        [N("ReduceMean", ["x", "ax"], ["a"]), N("ReduceMax", ["x"], ["b"], keepdims=0),
         N("ReduceSum", ["x", "ax"], ["c"], keepdims=0), N("ReduceMin", ["x", "ax"], ["d"]),
         N("ReduceSum", ["x", "none"], ["e"], noop_with_empty_axes=1), N("ReduceSumSquare", ["x", "ax"], ["f"])],
        X4, dict.fromkeys("abcdef", F), 18, {"ax": _i64(-1, 1), "none": _i64()}),
    "shape-arithmetic": (  # the pattern exporters emit for flatten with a dynamic batch
        [N("Shape", ["x"], ["s"]), N("Gather", ["s", "first"], ["n"], axis=0), N("Unsqueeze", ["n", "zero"], ["n1"]),
         N("Concat", ["n1", "minus1"], ["shape"], axis=0), N("Reshape", ["x", "shape"], ["y"]),
         N("Shape", ["x"], ["tail"], start=-2), N("Cast", ["tail"], ["tailf"], to=F)],
        X4, {"y": F, "tail": I64, "tailf": F}, 15, {"first": np.int64(0), "zero": _i64(0), "minus1": _i64(-1)}),
    "reshape-zero-and-flatten": (
        [N("Reshape", ["x", "shape"], ["a"]), N("Flatten", ["x"], ["b"], axis=2), N("Flatten", ["x"], ["c"], axis=0),
         N("Transpose", ["x"], ["d"], perm=[0, 2, 3, 1]), N("Transpose", ["x"], ["e"])],
        X4, dict.fromkeys("abcde", F), 14, {"shape": _i64(0, -1, 3)}),
    "squeeze-unsqueeze-attributes": (
        [N("Unsqueeze", ["x"], ["a"], axes=[0, -1]), N("Squeeze", ["a"], ["b"], axes=[0]), N("Squeeze", ["a"], ["c"])],
        X4, {"b": F, "c": F}, 11, {}),
    "squeeze-unsqueeze-inputs": (
        [N("Unsqueeze", ["x", "ax"], ["a"]), N("Squeeze", ["a", "ax"], ["b"])],
        X4, {"a": F, "b": F}, 13, {"ax": _i64(1, -1)}),
    "slice-inputs-negative-steps": (
        [N("Slice", ["x", "st", "en", "ax", "sp"], ["a"]), N("Slice", ["x", "st2", "en2"], ["b"])],
        X4, {"a": F, "b": F}, 13,
        {"st": _i64(-1, 1), "en": _i64(-(2**63), 2**63 - 1), "ax": _i64(3, 2), "sp": _i64(-2, 3),
         "st2": _i64(0, 1), "en2": _i64(1, -1)}),
    "slice-clamps-like-onnxruntime": (  # starts below -dim, INT_MAX ends (through index 0 for a negative step)
        [N("Slice", ["x", "st", "en", "ax", "sp"], ["a"]), N("Slice", ["x", "st2", "en2", "ax", "sp2"], ["b"]),
         N("Slice", ["x", "st3", "en3", "ax3", "sp3"], ["c"])],
        X4, {"a": F, "b": F, "c": F}, 13,
        {"st": _i64(-9, 4), "en": _i64(-9, 2**63 - 1), "ax": _i64(0, 2), "sp": _i64(-3, -1),
         "st2": _i64(1, 2**31 - 1), "en2": _i64(2**31 - 1, 1), "sp2": _i64(-1, -2),
         "st3": _i64(-(2**31), 1, 4), "en3": _i64(2, -(2**31), -(2**63)), "ax3": _i64(1, 2, 3), "sp3": _i64(1, 1, -1)}),
    "slice-attributes": ([N("Slice", ["x"], ["y"], starts=[1, -3], ends=[1000, -1], axes=[1, 3])], X4, {"y": F}, 9, {}),
    "split-attribute-and-equal": (
        [N("Split", ["x"], ["a", "b"], axis=1, split=[1, 3]), N("Split", ["x"], ["c", "d"], axis=-1)],
        X4, dict.fromkeys("abcd", F), 11, {}),
    "split-input": ([N("Split", ["x", "sizes"], ["a", "b", "c"], axis=2)], X4, dict.fromkeys("abc", F), 13,
                    {"sizes": _i64(2, 2, 3)}),
    "split-num-outputs": ([N("Split", ["x"], ["a", "b", "c"], axis=2, num_outputs=3)], X4, dict.fromkeys("abc", F), 18,
                          {}),
    "split-num-outputs-uneven": (  # ceil(6 / 4) = 2 per part, and the part past the end is empty
        [N("Split", ["x"], ["a", "b", "c", "d"], axis=-1, num_outputs=4)], X4, dict.fromkeys("abcd", F), 18, {}),
    "pad-inputs": (
        [N("Pad", ["x", "pads", "val"], ["a"]), N("Pad", ["x", "pads"], ["b"])], X4, {"a": F, "b": F}, 13,
        {"pads": _i64(0, 0, 1, 2, 0, 1, 0, -1), "val": np.float32(1.5)}),
    "pad-axes-input": ([N("Pad", ["x", "pads", "", "ax"], ["y"])], X4, {"y": F}, 18,
                       {"pads": _i64(1, 2, 3, 0), "ax": _i64(-1, 1)}),
    "pad-attributes": ([N("Pad", ["x"], ["y"], pads=[0, 1, 0, 0, 0, 0, 2, 1], value=-1.0)], X4, {"y": F}, 2, {}),
    "expand-where-equal": (
        [N("Expand", ["v", "shape"], ["e"]), N("Greater", ["x", "e"], ["g"]), N("Where", ["g", "x", "e"], ["a"]),
         N("Equal", ["k", "k2"], ["eq"]), N("Not", ["eq"], ["b"]), N("Max", ["x", "e"], ["c"]),
         N("Min", ["x", "e", "v"], ["d"])],
        {"x": _rand(2, 4, 7, 6), "v": _rand(4, 1, 1)}, {"a": F, "b": B, "c": F, "d": F}, 13,
        {"shape": _i64(1, 1, 7, 1), "k": _i64(1, 2, 3), "k2": _i64(1, 5, 3)}),
    "constants-range-constantofshape": (
        [N("Constant", [], ["c1"], value=numpy_helper.from_array(_rand(6, seed=5))),
         N("Constant", [], ["c2"], value_ints=[2, 3]),
         N("Constant", [], ["c3"], value_float=0.5),
         N("ConstantOfShape", ["c2"], ["z"], value=numpy_helper.from_array(np.float32([2.5]))),
         N("ConstantOfShape", ["c2"], ["zi"], value=numpy_helper.from_array(_i64(7))),
         N("Range", ["start", "limit", "delta"], ["r"]), N("Range", ["fs", "fl", "fd"], ["rf"]),
         N("Mul", ["x", "c1"], ["xc"]), N("Add", ["xc", "c3"], ["y"]), N("Dropout", ["y"], ["dy"])],
        X4, {"z": F, "zi": I64, "r": I64, "rf": F, "dy": F}, 13,
        {"start": np.int64(10), "limit": np.int64(-3), "delta": np.int64(-3),
         "fs": np.float32(0.5), "fl": np.float32(3.0), "fd": np.float32(0.75)}),
    "range-wrong-sign-is-empty": (
        [N("Range", ["a", "b", "c"], ["r"]), N("Range", ["fa", "fb", "fc"], ["rf"]), N("Range", ["a", "c", "b"], ["rg"])],
        X4, {"r": I64, "rf": F, "rg": I64}, 13,
        {"a": np.int64(0), "b": np.int64(5), "c": np.int64(-1),
         "fa": np.float32(1.0), "fb": np.float32(0.0), "fc": np.float32(0.3)}),
    "dropout-training-mode-false": (
        [N("Dropout", ["x", "ratio", "off"], ["y", "mask"])], X4, {"y": F, "mask": B}, 13,
        {"ratio": np.float32(0.5), "off": np.array(False)}),
    "initializer-names-that-are-module-attributes": (
        [N("Add", ["x", "keys"], ["a"]), N("Mul", ["a", "to"], ["b"]), N("Sub", ["b", "forward"], ["c"]),
         N("Add", ["c", "_parameters"], ["d"]), N("Mul", ["d", "training"], ["y"])],
        X4, {"y": F}, 13, {name: _rand(6, seed=i) for i, name in enumerate(["keys", "to", "forward", "_parameters",
                                                                            "training"])}),
    "reducesumsquare-without-axes-squares-all-the-same": (  # a no-op reduction still squares
        [N("ReduceSumSquare", ["x"], ["a"], noop_with_empty_axes=1), N("ReduceSumSquare", ["x", "none"], ["b"],
                                                                          noop_with_empty_axes=1)],
        X4, {"a": F, "b": F}, 18, {"none": _i64()}),
    "gemm-beta-zero-leaves-c-out": (  # C * 0 would be NaN where C is infinite
        [N("Gemm", ["a", "b", "c"], ["y"], beta=0.0)],
        {"a": _rand(5, 3)}, {"y": F}, 13, {"b": _rand(3, 4, seed=1), "c": np.full((5, 4), np.inf, np.float32)}),
    "integer-div-and-cast": (
        [N("Div", ["p", "q"], ["d"]), N("Cast", ["x"], ["c"], to=I64), N("CastLike", ["d", "x"], ["cl"])],
        {"x": _rand(2, 4) * 5, "p": _i64(7, -7, 9, -9)}, {"d": I64, "c": I64, "cl": F}, 15, {"q": _i64(2, 2, -4, 4)}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_op_matches_onnxruntime(case: str) -> None:
    nodes, feeds, outputs, opset, inits = CASES[case]
    proto = _model(nodes, feeds, outputs, opset, inits)
    reference = _ort(proto, feeds)
    bridge = OnnxModule(proto)
    assert bridge.input_names == list(feeds)
    got, _ = bridge.run({k: torch.from_numpy(v) for k, v in feeds.items()})
    for name in outputs:
        assert got[name].numpy().dtype == reference[name].dtype, name
        np.testing.assert_allclose(got[name].numpy(), reference[name], atol=1e-5, rtol=1e-5, err_msg=name)


def test_unsupported_ops_are_named_up_front() -> None:
    nodes = [N("Det", ["x"], ["d"], name="determinant"), N("Relu", ["d"], ["r"]),
             N("NonMaxSuppression", ["b", "s"], ["i"], name="nms")]
    feeds = {"x": _rand(2, 3, 3), "b": _rand(1, 4, 4), "s": _rand(1, 1, 4)}
    proto = _model(nodes, feeds, {"r": F, "i": I64}, 13)
    with pytest.raises(UnsupportedOpError) as info:
        OnnxModule(proto)
    message = str(info.value)
    for word in ("Det", "'determinant'", "NonMaxSuppression", "'nms'", "Supported", "Conv", "Gemm"):
        assert word in message
    assert isinstance(info.value, ModelError)


def test_unsupported_domain_and_forms_are_rejected() -> None:
    custom = _model([N("Gelu", ["x"], ["y"], domain="com.microsoft", name="ms_gelu")], X4, {"y": F}, 13)
    custom.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    with pytest.raises(UnsupportedOpError, match=r"com\.microsoft.*'ms_gelu'"):
        OnnxModule(custom)
    reflect = _model([N("Pad", ["x", "pads"], ["y"], mode="reflect", name="pad0")], X4, {"y": F}, 13,
                     {"pads": _i64(0, 0, 1, 1, 0, 0, 1, 1)})
    with pytest.raises(UnsupportedOpError, match=r"Pad node 'pad0'.*reflect"):
        OnnxModule(reflect)


def test_malformed_graphs_and_inputs_are_model_errors() -> None:
    unsorted = _model([N("Relu", ["a"], ["y"]), N("Neg", ["x"], ["a"], name="neg")], X4, {"y": F}, 13)
    with pytest.raises(ModelError, match="not topologically sorted"):
        OnnxModule(unsorted)
    two_inputs = OnnxModule(_model([N("Add", ["a", "b"], ["y"])], {"a": _rand(2), "b": _rand(2)}, {"y": F}, 13))
    with pytest.raises(ModelError, match="pass a mapping"):
        two_inputs.run(torch.ones(2))
    with pytest.raises(ModelError, match=r"missing \['b'\]"):
        two_inputs.run({"a": torch.ones(2)})


def test_range_matches_onnxruntime_bit_for_bit() -> None:
    """Counted in double and accumulated one delta at a time, as ONNX Runtime does (start + i * delta differs)."""
    for start, limit, delta in [(-1.7, 1.0, 0.1), (-1.7, 0.7, 0.1), (5.0, -2.0, -0.3), (0.0, 1.0, -0.1)]:
        feeds = {k: np.array(v, dtype=np.float32) for k, v in zip("sld", (start, limit, delta))}
        proto = _model([N("Range", ["s", "l", "d"], ["y"])], feeds, {"y": F}, 13)
        got, _ = OnnxModule(proto).run({k: torch.from_numpy(v) for k, v in feeds.items()})
        np.testing.assert_array_equal(got["y"].numpy(), _ort(proto, feeds)["y"], err_msg=str((start, limit, delta)))


def test_initializer_keys_never_clash_with_module_attributes() -> None:
    inits = {name: _rand(3, seed=i) for i, name in enumerate(["keys", "items", "pop", "type", "float", "eval"])}
    nodes = [N("Add", ["x", name], [f"y{i}"]) for i, name in enumerate(inits)]
    bridge = OnnxModule(_model(nodes, {"x": _rand(3)}, {f"y{i}": F for i in range(len(inits))}, 13, inits))
    for name, value in inits.items():
        np.testing.assert_array_equal(bridge.initializer(name).detach().numpy(), value)
    assert callable(bridge.params.keys) and len(list(bridge.parameters())) == len(inits)


def test_same_auto_pad_with_dilation_is_refused() -> None:
    """ONNX Runtime refuses it for Conv and pads MaxPool as if the kernel were not dilated."""
    conv = _model([N("Conv", ["x", "w"], ["y"], name="conv", auto_pad="SAME_LOWER", dilations=[2, 1])], X4, {"y": F},
                  13, {"w": _rand(3, 4, 3, 3)})
    with pytest.raises(UnsupportedOpError, match=r"Conv node 'conv'.*SAME_LOWER.*dilations"):
        OnnxModule(conv)
    pool = _model([N("MaxPool", ["x"], ["y"], name="pool", kernel_shape=[3, 3], auto_pad="SAME_UPPER",
                     dilations=[1, 2])], X4, {"y": F}, 12)
    with pytest.raises(UnsupportedOpError, match=r"MaxPool node 'pool'.*SAME_UPPER.*dilations"):
        OnnxModule(pool)


@pytest.mark.parametrize("op", ["MaxPool", "AveragePool", "Conv"])
def test_same_auto_pad_that_would_need_a_negative_pad_does_as_onnx_runtime(op: str) -> None:
    """Stride 3 above kernel 2 on a side of 6: SAME needs a pad of -1. ONNX Runtime pads a Conv by none and
    refuses a pool at run time, so the bridge refuses the pool rather than calibrate a model guard cannot serve."""
    feeds = {"x": _rand(1, 2, 6, 7)}  # a side of 7 needs a pad of 1: both run it
    inits = {"w": _rand(3, 2, 2, 2)} if op == "Conv" else {}
    proto = _model([N(op, ["x", *inits], ["y"], name="node", kernel_shape=[2, 2], strides=[3, 3],
                      auto_pad="SAME_UPPER")], feeds, {"y": F}, 13, inits)
    module = OnnxModule(proto)
    if op == "Conv":
        got, _ = module.run(torch.from_numpy(feeds["x"]))
        np.testing.assert_allclose(got["y"].numpy(), _ort(proto, feeds)["y"], atol=1e-6)
        return
    with pytest.raises(Exception, match="padding values must be non-negative"):
        _ort(proto, feeds)
    with pytest.raises(UnsupportedOpError, match=rf"{op} node 'node'.*size 6 with stride 3 above kernel 2"):
        module.run(torch.from_numpy(feeds["x"]))


def test_float16_layer_norm_keeps_its_statistics_in_float32() -> None:
    """stash_type 1 (the default): a row whose variance passes float16's 65504 normalised to the bias alone."""
    feeds = {"x": (_rand(2, 3, 16) * 300).astype(np.float16)}
    inits = {"scale": _rand(16, seed=1).astype(np.float16), "bias": _rand(16, seed=2).astype(np.float16)}
    proto = _model([N("LayerNormalization", ["x", "scale", "bias"], ["y"], axis=-1)], feeds,
                   {"y": TensorProto.FLOAT16}, 17, inits)
    got, _ = OnnxModule(proto).run(torch.from_numpy(feeds["x"]))
    want = _ort(proto, feeds)["y"]
    assert got["y"].dtype == torch.float16 and np.abs(want - inits["bias"]).max() > 0.5
    np.testing.assert_array_equal(got["y"].numpy(), want)  # scaled in float32, rounded once


def test_equal_split_that_does_not_divide_is_refused() -> None:
    """Before opset 18 ONNX Runtime refuses it (it does not drop the remainder)."""
    uneven = OnnxModule(_model([N("Split", ["x"], ["a", "b"], axis=2, name="split")], X4, {"a": F, "b": F}, 13))
    with pytest.raises(ModelError, match=r"Split node 'split'.*7 does not split evenly into 2"):
        uneven.run(torch.from_numpy(X4["x"]))
    # At opset 18 the last part may be empty but not negative: 5 into 4 (2, 2, 2, -1) is refused there too.
    four = OnnxModule(_model([N("Split", ["x"], ["a", "b", "c", "d"], axis=0, num_outputs=4, name="split")],
                             {"x": _rand(5, 2)}, dict.fromkeys("abcd", F), 18))
    with pytest.raises(ModelError, match=r"Split node 'split'.*axis of 5 cannot split into 4 parts of 2"):
        four.run(torch.from_numpy(_rand(5, 2)))


def test_dropout_in_training_mode_is_refused() -> None:
    """ONNX Runtime drops at random when training_mode is true; the bridge does not pretend to."""
    proto = _model([N("Dropout", ["x", "ratio", "training"], ["y"], name="drop")],
                   {"x": _rand(2, 3), "training": np.array(True)}, {"y": F}, 13, {"ratio": np.float32(0.5)})
    bridge = OnnxModule(proto)
    with pytest.raises(UnsupportedOpError, match=r"Dropout node 'drop'.*training mode"):
        bridge.run({"x": torch.ones(2, 3), "training": torch.tensor(True)})
    out, _ = bridge.run({"x": torch.ones(2, 3), "training": torch.tensor(False)})
    assert torch.equal(out["y"], torch.ones(2, 3))
