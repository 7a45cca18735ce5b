"""Opt-in gRPC reflection: a generic client (grpc_reflection's own, as grpcurl does) lists and describes guard's
services when `--reflection` is on, gets UNIMPLEMENTED when it is off, and needs the bearer token where one is set."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pool
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from conftest import Backdoored
from guard.config import ServeSettings
from guard.server.app import GuardServer


def start(backdoored: Backdoored, **settings: object) -> GuardServer:
    server = GuardServer(ServeSettings(model=backdoored.model_path, profile=backdoored.profile_path, port=0,
                                       metrics_port=0, **settings))
    server.start()
    return server


def list_services(channel: grpc.Channel, metadata: tuple[tuple[str, str], ...] = ()) -> list[str]:
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    reply = next(reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(iter([request]),
                                                                                       metadata=metadata, timeout=5))
    return sorted(service.name for service in reply.list_services_response.service)


def test_reflection_lists_and_describes_every_service(backdoored: Backdoored) -> None:
    server = start(backdoored, reflection=True)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            database = ProtoReflectionDescriptorDatabase(channel)
            assert sorted(database.get_services()) == ["grpc.health.v1.Health",
                                                       "grpc.reflection.v1alpha.ServerReflection",
                                                       "guard.v1.Guard", "inference.GRPCInferenceService"]
            pool = descriptor_pool.DescriptorPool(database)
            infer = pool.FindServiceByName("inference.GRPCInferenceService").FindMethodByName("ModelInfer")
            assert infer.input_type.full_name == "inference.ModelInferRequest"
            assert "raw_input_contents" in infer.input_type.fields_by_name
            predict = pool.FindServiceByName("guard.v1.Guard").FindMethodByName("Predict")
            assert "flagged" in predict.output_type.fields_by_name["predictions"].message_type.fields_by_name
            assert pool.FindServiceByName("grpc.health.v1.Health").FindMethodByName("Check")
    finally:
        server.stop(grace=1)


def test_reflection_is_off_by_default_and_behind_the_token(backdoored: Backdoored, tmp_path: Path) -> None:
    server = start(backdoored)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel, pytest.raises(grpc.RpcError) as off:
            list_services(channel)
        assert off.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        server.stop(grace=1)
    (tmp_path / "token").write_text("s3cret\n")
    server = start(backdoored, reflection=True, auth_token_file=tmp_path / "token")
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            with pytest.raises(grpc.RpcError) as refused:
                list_services(channel)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "guard.v1.Guard" in list_services(channel, (("authorization", "Bearer s3cret"),))
    finally:
        server.stop(grace=1)


def test_streamed_and_health_port_messages_that_do_not_parse_are_invalid_and_the_server_still_stops(
        backdoored: Backdoored) -> None:
    """Only unary calls on the main port refused bytes that do not parse. On the reflection stream and a health Watch
    gRPC answered INTERNAL and logged a traceback; the health port (no token needed) answered UNKNOWN with the
    parser's exception, logged too; and after a garbled reflection message the server's stop never returned (most
    runs), so `guard serve` outlived its grace and SIGTERM."""
    import threading

    from conftest import log_messages

    garbled = b"\xff\xff\xff"
    server = start(backdoored, reflection=True, health_port=0)
    stopped, stopping = threading.Event(), None
    try:
        with log_messages("grpc") as logged:
            with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                calls = [channel.stream_stream("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"),
                         lambda request, timeout: list(channel.unary_stream("/grpc.health.v1.Health/Watch")(
                             next(request), timeout=timeout))]
                for call in calls:
                    with pytest.raises(grpc.RpcError) as refused:
                        list(call(iter([garbled]), timeout=5))
                    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                    assert "does not parse" in refused.value.details()
                assert list_services(channel)  # still serving
            with grpc.insecure_channel(f"127.0.0.1:{server.health_port}") as channel:
                for kind, method in (("unary_unary", "Check"), ("unary_stream", "Watch")):
                    with pytest.raises(grpc.RpcError) as refused:
                        reply = getattr(channel, kind)(f"/grpc.health.v1.Health/{method}")(garbled, timeout=5)
                        list(reply) if kind == "unary_stream" else reply
                    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, method
                    assert "does not parse" in refused.value.details()
        assert logged == []  # gRPC logs at WARNING and above: the tracebacks were errors
        stopping = threading.Thread(target=lambda: (server.stop(grace=0), stopped.set()), daemon=True)
        stopping.start()
        assert stopped.wait(20), "the server's stop did not return"
    finally:
        if stopping is None:  # a stop that hung is not called again
            server.stop(grace=0)


def test_a_health_watch_on_the_main_port_sees_every_status_change(backdoored: Backdoored) -> None:
    """The check for messages that do not parse wraps the health service's Watch; wrapped without gRPC's non-blocking
    mark, each watch held a server thread for its life and saw only the latest of statuses set in quick succession."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    server = start(backdoored)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""), timeout=3)
            seen = [next(watch).status]
            for status in (not_serving, serving, not_serving):
                server.health.set("", status)
            with pytest.raises(grpc.RpcError) as ended:
                for reply in watch:
                    seen.append(reply.status)
            assert ended.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert seen == [serving, not_serving, serving, not_serving]
    finally:
        server.stop(grace=1)
