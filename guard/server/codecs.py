"""Turning protocol messages into validated numpy batches and Results back into messages."""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from guard.errors import RequestError, shown
from guard.runtime.guard import Result
from guard.server._proto.guard.v1 import guard_pb2
from guard.server._proto.inference import grpc_service_pb2 as oip

FLAGGED_OUTPUT = "guard_flagged"
SCORE_OUTPUT = "guard_score"


def _shape(dims: list[int], sample_shape: tuple[int, ...]) -> tuple[int, ...]:
    shape = tuple(int(d) for d in dims)
    if len(shape) != 1 + len(sample_shape) or shape[1:] != sample_shape or shape[0] < 1:
        want = ", ".join(map(str, sample_shape))
        raise RequestError(f"expected shape [N, {want}] with N >= 1, got {shown(list(shape))}")
    return shape


def _from_bytes(data: bytes, shape: tuple[int, ...]) -> np.ndarray:
    expected = math.prod(shape) * 4  # Python ints: a hostile shape cannot wrap around as np.prod's int64 does
    if len(data) != expected:
        raise RequestError(f"raw contents hold {len(data)} bytes; shape {list(shape)} of FP32 needs {expected}")
    return np.frombuffer(data, dtype="<f4").reshape(shape)


def _refuse_shared_memory(kind: str, name: str, parameters: Mapping[str, oip.InferParameter]) -> None:
    """Tensors in a shared-memory region (Triton's extension) are not read or written: say so rather than answer
    from empty contents, or write an output the caller will not look for in the response."""
    if any(key.startswith("shared_memory_") for key in parameters):
        region = parameters["shared_memory_region"].string_param if "shared_memory_region" in parameters else "?"
        raise RequestError(f"{kind} {shown(name)} is in shared memory (region {shown(region)}); guard does not implement "
                           f"the shared-memory extension: send it in the message")


def decode_oip(request: oip.ModelInferRequest, input_name: str, sample_shape: tuple[int, ...]) -> np.ndarray:
    """The one FP32 input tensor of an Open Inference Protocol request, as (N, C, H, W)."""
    if len(request.inputs) != 1:
        raise RequestError(f"expected exactly one input tensor ({input_name!r}), got {len(request.inputs)}")
    tensor = request.inputs[0]
    if tensor.name != input_name:
        raise RequestError(f"unknown input {shown(tensor.name)}; the model's input is {input_name!r}")
    _refuse_shared_memory("input", tensor.name, tensor.parameters)
    if tensor.datatype != "FP32":
        raise RequestError(f"input {input_name!r} must be FP32, got {shown(tensor.datatype) if tensor.datatype else 'no datatype'}")
    shape = _shape(list(tensor.shape), sample_shape)
    if request.raw_input_contents:
        if len(request.raw_input_contents) != 1:
            raise RequestError(f"got {len(request.raw_input_contents)} raw_input_contents for one input")
        if tensor.contents.ByteSize():  # the protocol allows one or the other; which one was meant is unknowable
            raise RequestError(f"input {input_name!r} has both raw_input_contents and typed contents; send one")
        return _from_bytes(request.raw_input_contents[0], shape)
    values = tensor.contents.fp32_contents
    if len(values) != math.prod(shape):
        raise RequestError(f"fp32_contents holds {len(values)} values; shape {list(shape)} needs {math.prod(shape)}")
    return np.asarray(values, dtype=np.float32).reshape(shape)


def check_outputs(request: oip.ModelInferRequest, output_name: str) -> list[str]:
    """The outputs a request asks for (all of them where it names none), checked before the engine runs for it."""
    available = [output_name, FLAGGED_OUTPUT, SCORE_OUTPUT]
    wanted = [o.name for o in request.outputs] or available
    unknown = [name for name in wanted if name not in available]
    if unknown:
        raise RequestError(f"unknown output {shown(unknown)}; available outputs are {available}")
    if len(set(wanted)) != len(wanted):
        raise RequestError(f"an output is requested more than once: {shown(wanted)}")
    for output in request.outputs:
        _refuse_shared_memory("output", output.name, output.parameters)
        if "classification" in output.parameters:  # Triton answers top-k "score:index" strings, not the tensor
            raise RequestError(f"output {shown(output.name)} asks for classification (class_count="
                               f"{output.parameters['classification'].int64_param}); guard does not implement the "
                               f"classification extension: ask for the tensor and take its top classes")
    return wanted


def encode_oip(result: Result, model_name: str, version: str, request: oip.ModelInferRequest, wanted: list[str],
               output_name: str, policy: str) -> oip.ModelInferResponse:
    """The `wanted` outputs (`check_outputs`'s) of the logits under the model's output name and the per-sample
    verdict tensors, as raw little-endian bytes."""
    available = {
        output_name: ("FP32", result.logits.astype("<f4")),
        FLAGGED_OUTPUT: ("BOOL", result.flagged.astype(np.bool_)),
        SCORE_OUTPUT: ("FP32", result.score.astype("<f4")),
    }
    response = oip.ModelInferResponse(model_name=model_name, model_version=version, id=request.id)  # as Triton
    for name in wanted:
        datatype, array = available[name]
        response.outputs.add(name=name, datatype=datatype, shape=list(array.shape))
        response.raw_output_contents.append(array.tobytes())
    flagged = int(result.flagged.sum())
    response.parameters["guard_policy"].string_param = policy
    response.parameters["guard_flagged_count"].int64_param = flagged
    response.parameters["guard_samples"].int64_param = len(result.flagged)
    response.parameters["guard_unchecked"].bool_param = result.unchecked
    return response


def decode_predict(request: guard_pb2.PredictRequest, sample_shape: tuple[int, ...]) -> np.ndarray:
    return _from_bytes(request.data, _shape(list(request.shape), sample_shape))


def encode_predict(result: Result, model_name: str, policy: str) -> guard_pb2.PredictResponse:
    response = guard_pb2.PredictResponse(model=model_name, policy=policy, unchecked=result.unchecked)
    for label, flagged, score, model_label, logits in zip(
        result.labels.tolist(), result.flagged.tolist(), result.score.tolist(), result.model_labels.tolist(),
        result.logits, strict=True,
    ):
        response.predictions.add(label=label, flagged=flagged, score=score, model_label=model_label,
                                 logits=logits.tolist())
    return response
