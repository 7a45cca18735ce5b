"""grpc.health.v1 on a port of its own (`--health-port`), served by grpc.aio on an event loop of its own.

gRPC gives a call its place when its headers arrive. A thread-pool server then holds a thread while the call's message
has not come, so four callers that never send it took the four threads of the earlier thread-pool health server, and
every probe after them waited out its deadline. An asyncio server holds no thread for such a call.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from guard.server.status import Malformed, tolerant

T = TypeVar("T")


class HealthPort:
    """The health server, its servicer and its event loop's thread; every method is called from other threads."""

    def __init__(self, options: list[tuple[str, Any]]) -> None:
        self._started = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="guard-health", daemon=True)
        self._thread.start()
        try:
            self.server, self.servicer = self._run(self._build(options))
        except BaseException:
            self._end_loop()
            raise

    @staticmethod
    async def _build(options: list[tuple[str, Any]]) -> tuple[grpc.aio.Server, HealthServicer]:
        server = grpc.aio.server(options=options, interceptors=[_MalformedChecks()])
        servicer = HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        return server, servicer

    def _run(self, work: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(work, self._loop).result()

    def on_loop(self, call: Callable[[], T]) -> T:
        """`call()` run on the server's loop (binding a port, say), its result or its exception here."""

        async def run() -> T:
            return call()

        return self._run(run())

    def start(self) -> None:
        self._run(self.server.start())
        self._started = True

    def set(self, service: str, status: int) -> None:
        self._run(self.servicer.set(service, status))

    def enter_graceful_shutdown(self) -> None:
        self._run(self.servicer.enter_graceful_shutdown())

    def stop(self) -> None:
        """Stop the server, then the loop and its thread; once."""
        if self._loop.is_closed():
            return
        try:
            if not self._started:  # gRPC keeps a bound port until a started server stops
                self._run(self.server.start())
            self._run(self.server.stop(0))
        finally:
            self._end_loop()

    def _end_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()


class _MalformedChecks(grpc.aio.ServerInterceptor):
    """A Check or Watch whose bytes do not parse gets INVALID_ARGUMENT: grpc.aio answered UNKNOWN naming the parser's
    exception, and logged its traceback, for any caller (the port needs no token), as often as sent."""

    async def intercept_service(
            self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
            handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        # the health service's two methods, both coroutines (Watch writes its answers through the context)
        for kind, build in (("unary_unary", grpc.unary_unary_rpc_method_handler),
                            ("unary_stream", grpc.unary_stream_rpc_method_handler)):
            behaviour = getattr(handler, kind)
            if behaviour is not None:
                return build(_refusing(behaviour), request_deserializer=tolerant(handler.request_deserializer),
                             response_serializer=handler.response_serializer)
        return handler


def _refusing(behaviour: Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]
              ) -> Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]:
    async def run(request: object, context: grpc.aio.ServicerContext) -> object:
        if isinstance(request, Malformed):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        return await behaviour(request, context)

    return run
