"""One mapping from guard's errors to gRPC status codes, shared by both protocol adapters."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

import grpc

from guard.errors import (
    CallerGoneError,
    DeadlineExceededError,
    OverloadedError,
    RequestError,
    UnavailableError,
)
from guard.server.dataplane import DataPlane, UnknownModelError

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
