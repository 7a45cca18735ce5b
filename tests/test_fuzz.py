"""Hostile input against the real server: thousands of generated requests (random shapes, dtypes, byte lengths, NaN
and Inf, huge dims, mismatched raw contents, bogus parameters and names). Every answer is either a correct result or
a proper gRPC status with a message; nothing crashes, and the server answers correctly afterwards."""

from __future__ import annotations

from collections.abc import Callable

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import Backdoored
from guard.config import ServeSettings
from guard.runtime.guard import Guard
from guard.server._proto.guard.v1 import guard_pb2, guard_pb2_grpc
from guard.server._proto.inference import grpc_service_pb2 as oip
from guard.server._proto.inference import grpc_service_pb2_grpc as oip_grpc
from guard.server.app import GuardServer

MODEL = "badnets"
REFUSALS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.RESOURCE_EXHAUSTED}
EXAMPLES = 1500  # per protocol
tried = {"oip": 0, "guard.v1": 0, "refused": 0, "answered": 0}


@pytest.fixture(scope="module")
def stubs(backdoored: Backdoored):
    server = GuardServer(ServeSettings(model=backdoored.model_path, profile=backdoored.profile_path, port=0,
                                       metrics_port=0, max_batch=64, max_message_mb=1))
    server.start()
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield oip_grpc.GRPCInferenceServiceStub(channel), guard_pb2_grpc.GuardStub(channel), server.guard
    server.stop(grace=1)
    print(f"fuzz cases tried: {tried}")


dims = st.one_of(st.just([1, 1, 28, 28]), st.just([3, 1, 28, 28]),
                 st.lists(st.integers(min_value=-3, max_value=2**40), min_size=0, max_size=6),
                 st.lists(st.sampled_from([0, 1, 2, 27, 28, 29, 65]), min_size=1, max_size=5))
floats = st.sampled_from([0.0, 0.5, 1.0, -1.0, np.nan, np.inf, -np.inf, 1e38, -1e-45])
datatypes = st.sampled_from(["FP32", "FP64", "FP16", "INT32", "BYTES", "BOOL", "", "fp32", "FP32\x00"])


@st.composite
def raw_bytes(draw: st.DrawFn, shape: list[int]) -> bytes:
    """Contents that fit the shape, or a few bytes off, or nothing, filled with awkward values."""
    count = int(np.prod(shape)) if shape and all(0 <= d <= 10_000 for d in shape) and np.prod(shape) < 10**6 else 4
    data = np.full(max(count, 0), draw(floats), dtype=np.float32).tobytes()
    return draw(st.sampled_from([data, data[:-1], data + b"\x00", b"", data[: len(data) // 2]]))


@st.composite
def oip_requests(draw: st.DrawFn) -> oip.ModelInferRequest:
    shape = draw(dims)
    request = oip.ModelInferRequest(model_name=draw(st.sampled_from([MODEL, "", "nope", "../etc"])))
    tensor = request.inputs.add(name=draw(st.sampled_from(["input", "", "x", "logits"])),
                                datatype=draw(datatypes))
    tensor.shape.extend(shape)
    if draw(st.booleans()):
        request.raw_input_contents.append(draw(raw_bytes(shape)))
        if draw(st.integers(0, 5)) == 0:
            request.raw_input_contents.append(b"\x00\x00\x80\x3f")  # a second raw buffer for one input
    else:
        tensor.contents.fp32_contents.extend([draw(floats) for _ in range(draw(st.integers(0, 50)))])
    if draw(st.booleans()):
        request.parameters[draw(st.text(max_size=8))].string_param = draw(st.text(max_size=20))
    if draw(st.booleans()):
        request.outputs.add(name=draw(st.sampled_from(["logits", "guard_flagged", "guard_score", "nope", ""])))
    if draw(st.integers(0, 9)) == 0:
        request.inputs.add(name="input", datatype="FP32")
    return request


@st.composite
def predict_requests(draw: st.DrawFn) -> guard_pb2.PredictRequest:
    shape = draw(dims)
    return guard_pb2.PredictRequest(model=draw(st.sampled_from([MODEL, "", "other"])), shape=shape,
                                    data=draw(raw_bytes(shape)))


Request = oip.ModelInferRequest | guard_pb2.PredictRequest


def sent_array(request: Request) -> np.ndarray:
    """The tensor a request carried, as the server should have read it."""
    if isinstance(request, guard_pb2.PredictRequest):
        return np.frombuffer(request.data, "<f4").reshape(tuple(request.shape))
    tensor = request.inputs[0]
    data = (np.frombuffer(request.raw_input_contents[0], "<f4") if request.raw_input_contents
            else np.asarray(tensor.contents.fp32_contents, dtype=np.float32))
    return data.reshape(tuple(tensor.shape))


def answered_labels(reply: oip.ModelInferResponse | guard_pb2.PredictResponse) -> list[int]:
    if isinstance(reply, guard_pb2.PredictResponse):
        return [p.label for p in reply.predictions]
    index = next(i for i, o in enumerate(reply.outputs) if o.name == "logits")
    logits = np.frombuffer(reply.raw_output_contents[index], "<f4").reshape(tuple(reply.outputs[index].shape))
    return logits.argmax(axis=1).tolist()


def _check(call: Callable[..., object], request: Request, guard: Guard) -> None:
    """A refusal names a proper status and says why; an answer is exactly the in-process guard's, for finite data."""
    try:
        reply = call(request, timeout=30)
    except grpc.RpcError as exc:
        assert exc.code() in REFUSALS, f"{exc.code()}: {exc.details()} for {request}"
        assert exc.details() and len(exc.details()) > 10, "a refusal must say what was wrong"
        tried["refused"] += 1
        return
    tried["answered"] += 1
    x = sent_array(request)
    assert np.isfinite(x).all(), "NaN or Inf must be refused"
    if isinstance(request, oip.ModelInferRequest) and request.outputs and all(
            o.name != "logits" for o in request.outputs):
        return  # the caller asked for verdicts only
    assert answered_labels(reply) == guard.predict(x).labels.tolist()


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(request=oip_requests())
def test_oip_fuzz(stubs, request: oip.ModelInferRequest) -> None:
    tried["oip"] += 1
    _check(stubs[0].ModelInfer, request, stubs[2])


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(request=predict_requests())
def test_guard_v1_fuzz(stubs, request: guard_pb2.PredictRequest) -> None:
    tried["guard.v1"] += 1
    _check(stubs[1].Predict, request, stubs[2])


def test_server_answers_correctly_after_the_fuzzing(stubs, backdoored: Backdoored) -> None:
    x = backdoored.x_eval[:8]
    reply = stubs[1].Predict(guard_pb2.PredictRequest(model=MODEL, shape=list(x.shape), data=x.tobytes()),
                             timeout=30)
    want = Guard.load(backdoored.model_path, backdoored.profile_path).predict(x)
    assert [p.label for p in reply.predictions] == want.labels.tolist()
    assert tried["oip"] + tried["guard.v1"] >= 2 * EXAMPLES and tried["refused"] > 100 and tried["answered"] > 10
