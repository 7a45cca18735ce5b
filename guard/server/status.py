"""One mapping from guard's errors to gRPC status codes, shared by both protocol adapters."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from google.protobuf.message import DecodeError

from guard.errors import (
    CallerGoneError,
    DeadlineExceededError,
    OverloadedError,
    RequestError,
    UnavailableError,
)
from guard.server.dataplane import DataPlane, UnknownModelError
from guard.server.security import INFERENCE_METHODS

log = logging.getLogger("guard.server")
T = TypeVar("T")
# A status message travels as metadata, which gRPC refuses past 8 KiB (percent-encoded: up to 3 bytes per byte),
# turning the answer into RESOURCE_EXHAUSTED; callers' strings are already cut (`shown`), this holds for the rest.
MAX_MESSAGE_BYTES = 2048
# A call gRPC ended this close to its deadline ended by it (gRPC's core and Python's clock differ a little).
DEADLINE_SLACK = 0.01


def _fitted(message: str) -> str:
    data = message.encode()
    if len(data) <= MAX_MESSAGE_BYTES:
        return message
    return data[:MAX_MESSAGE_BYTES].decode(errors="ignore") + f"... ({len(data):,} bytes)"


def answer(plane: DataPlane, context: grpc.ServicerContext, handler: Callable[[], T], *, inference: bool = True) -> T:
    """Run `handler`; a bad request aborts with a status naming what was wrong, and the server keeps serving.

    Only inference calls count in guard_request_errors_total: the error share divides it by answered inference
    requests, and a readiness poll for a misspelt model would otherwise page for an error rate nobody served."""
    try:
        return handler()
    except UnknownModelError as exc:
        code, message = grpc.StatusCode.NOT_FOUND, str(exc)
    except RequestError as exc:
        code, message = grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    except UnavailableError as exc:
        code, message = grpc.StatusCode.UNAVAILABLE, str(exc)
    except DeadlineExceededError as exc:
        code, message = grpc.StatusCode.DEADLINE_EXCEEDED, str(exc)
    except CallerGoneError as exc:  # nobody hears it; counted, so that a dropped answer is not an answered one
        out_of_time = context.time_remaining() < DEADLINE_SLACK
        code, message = grpc.StatusCode.DEADLINE_EXCEEDED if out_of_time else grpc.StatusCode.CANCELLED, str(exc)
    except OverloadedError as exc:
        code, message = grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)
    except Exception as exc:
        log.exception("request failed")
        code, message = grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"
    if inference:
        plane.count_error(code.name)
    context.abort(code, _fitted(message))
    raise AssertionError("unreachable: context.abort raises")


@dataclass(frozen=True)
class Malformed:
    """What `tolerant` hands a handler in place of a request whose bytes do not parse."""

    reason: str

    @property
    def message(self) -> str:
        return _fitted(f"the request does not parse: {self.reason}")


def tolerant(parse: Callable[[bytes], object]) -> Callable[[bytes], object]:
    """`parse`, giving a Malformed where it fails, for the handler to refuse (gRPC's own failure is an INTERNAL with a
    traceback logged)."""

    def deserialize(data: bytes) -> object:
        try:
            return parse(data)
        except DecodeError as exc:
            return Malformed(str(exc) or type(exc).__name__)

    return deserialize


class MalformedRequests(grpc.ServerInterceptor):
    """A request whose bytes do not parse (a corrupt message, a string field that is not UTF-8) gets
    INVALID_ARGUMENT, counted as any bad inference request: gRPC's own deserializer answered INTERNAL, uncounted,
    and logged a traceback for each, which a caller could repeat at will. Streamed requests too (health Watch,
    reflection): after one such message on the reflection stream, the server's stop never returned."""

    def __init__(self, plane: DataPlane) -> None:
        self._plane = plane

    def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
                          handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        counted = handler_call_details.method in INFERENCE_METHODS

        def refuse(request: object, context: grpc.ServicerContext) -> None:
            if isinstance(request, Malformed):
                if counted:
                    self._plane.count_error(grpc.StatusCode.INVALID_ARGUMENT.name)
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)

        def one(behaviour: Callable[..., Any]) -> Callable[..., Any]:
            def run(request: object, context: grpc.ServicerContext, *callback: Any) -> object:
                refuse(request, context)
                return behaviour(request, context, *callback)
            # gRPC hands a health Watch marked non-blocking a callback for its answers; unmarked, it held a server
            # thread for the watch's life and kept only the latest of the statuses set meanwhile
            for mark in ("experimental_non_blocking", "experimental_thread_pool"):
                if hasattr(behaviour, mark):
                    setattr(run, mark, getattr(behaviour, mark))
            return run

        def stream(behaviour: Callable[..., Any]) -> Callable[..., Any]:
            def run(requests: Iterator[object], context: grpc.ServicerContext) -> object:
                def parsed() -> Iterator[object]:
                    for request in requests:
                        refuse(request, context)
                        yield request
                return behaviour(parsed(), context)
            return run

        kinds = {"unary_unary": (one, grpc.unary_unary_rpc_method_handler),
                 "unary_stream": (one, grpc.unary_stream_rpc_method_handler),
                 "stream_unary": (stream, grpc.stream_unary_rpc_method_handler),
                 "stream_stream": (stream, grpc.stream_stream_rpc_method_handler)}
        for kind, (wrap, build) in kinds.items():
            behaviour = getattr(handler, kind)
            if behaviour is not None:
                return build(wrap(behaviour), request_deserializer=tolerant(handler.request_deserializer),
                             response_serializer=handler.response_serializer)
        return handler
