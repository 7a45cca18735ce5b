"""The typed `guard.v1.Guard/Predict` adapter over the same data plane."""

from __future__ import annotations

import time

import grpc

from guard.server import codecs
from guard.server._proto.guard.v1 import guard_pb2, guard_pb2_grpc
from guard.server.audit import caller_of
from guard.server.dataplane import DataPlane
from guard.server.status import answer


class GuardServicer(guard_pb2_grpc.GuardServicer):
    def __init__(self, plane: DataPlane) -> None:
        self.plane = plane

    def Predict(self, request: guard_pb2.PredictRequest, context: grpc.ServicerContext) -> guard_pb2.PredictResponse:
        def predict() -> guard_pb2.PredictResponse:
            started = time.perf_counter()
            name = self.plane.resolve(request.model)
            x = codecs.decode_predict(request, self.plane.guard.sample_shape)
            result = self.plane.infer(x, time.perf_counter() - started, context.time_remaining(),
                                      caller_of(context, "guard.v1"), context.add_callback)
            return codecs.encode_predict(result, name, self.plane.guard.policy.value)

        def admitted() -> guard_pb2.PredictResponse:
            with self.plane.request():  # refused at once beyond --max-inflight
                return predict()

        return answer(self.plane, context, admitted)
