"""Open Inference Protocol (KServe v2 / Triton) adapter: stock clients such as tritonclient work unchanged."""

from __future__ import annotations

import time

import grpc

from guard._version import __version__
from guard.server import codecs
from guard.server._proto.inference import grpc_service_pb2 as oip
from guard.server._proto.inference import grpc_service_pb2_grpc as oip_grpc
from guard.server.audit import caller_of
from guard.server.dataplane import VERSION, DataPlane
from guard.server.status import answer

SERVER_NAME = "guard"
PLATFORM = "onnxruntime_onnx"


class InferenceServicer(oip_grpc.GRPCInferenceServiceServicer):
    def __init__(self, plane: DataPlane) -> None:
        self.plane = plane

    def ServerLive(self, request: oip.ServerLiveRequest, context: grpc.ServicerContext) -> oip.ServerLiveResponse:
        return oip.ServerLiveResponse(live=True)

    def ServerReady(self, request: oip.ServerReadyRequest, context: grpc.ServicerContext) -> oip.ServerReadyResponse:
        return oip.ServerReadyResponse(ready=self.plane.ready)

    def ModelReady(self, request: oip.ModelReadyRequest, context: grpc.ServicerContext) -> oip.ModelReadyResponse:
        return oip.ModelReadyResponse(ready=self.plane.serves(request.name, request.version) and self.plane.ready)

    def ServerMetadata(self, request: oip.ServerMetadataRequest,
                       context: grpc.ServicerContext) -> oip.ServerMetadataResponse:
        return oip.ServerMetadataResponse(name=SERVER_NAME, version=__version__, extensions=[])

    def ModelMetadata(self, request: oip.ModelMetadataRequest,
                      context: grpc.ServicerContext) -> oip.ModelMetadataResponse:
        def metadata() -> oip.ModelMetadataResponse:
            name = self.plane.resolve(request.name, request.version)
            model = self.plane.guard.model
            tensor = oip.ModelMetadataResponse.TensorMetadata
            return oip.ModelMetadataResponse(
                name=name, versions=[VERSION], platform=PLATFORM,
                inputs=[tensor(name=model.input_name, datatype="FP32", shape=[-1, *model.sample_shape])],
                outputs=[
                    tensor(name=model.output_name, datatype="FP32", shape=[-1, model.num_classes]),
                    tensor(name=codecs.FLAGGED_OUTPUT, datatype="BOOL", shape=[-1]),
                    tensor(name=codecs.SCORE_OUTPUT, datatype="FP32", shape=[-1]),
                ],
            )

        return answer(self.plane, context, metadata, inference=False)

    def ModelInfer(self, request: oip.ModelInferRequest, context: grpc.ServicerContext) -> oip.ModelInferResponse:
        def infer() -> oip.ModelInferResponse:
            started = time.perf_counter()
            name = self.plane.resolve(request.model_name, request.model_version)
            model = self.plane.guard.model
            x = codecs.decode_oip(request, model.input_name, model.sample_shape)
            wanted = codecs.check_outputs(request, model.output_name)
            result = self.plane.infer(x, time.perf_counter() - started, context.time_remaining(),
                                      caller_of(context, "oip", request.id), context.add_callback)
            return codecs.encode_oip(result, name, VERSION, request, wanted, model.output_name,
                                     self.plane.guard.policy.value)

        def admitted() -> oip.ModelInferResponse:
            with self.plane.request():  # refused at once beyond --max-inflight
                return infer()

        return answer(self.plane, context, admitted)
