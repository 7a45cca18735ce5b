"""The gRPC server: both protocol adapters and grpc.health.v1 over one data plane, metrics on their own port.

Start-up: load and verify model + profile, warm the engine up, bind, then report SERVING. SIGTERM: report
NOT_SERVING at once (probes stop routing here), refuse new calls, finish the in-flight ones within the grace period.
"""

from __future__ import annotations

import logging
import signal
import socket
import sys
import threading
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from guard.config import ServeSettings, host_port
from guard.errors import GuardError
from guard.runtime.guard import Guard
from guard.server._proto.guard.v1 import guard_pb2_grpc
from guard.server._proto.inference import grpc_service_pb2_grpc as oip_grpc
from guard.server.audit import AuditLog
from guard.server.dataplane import DataPlane
from guard.server.guard_v1 import GuardServicer
from guard.server.health import HealthPort
from guard.server.metrics import Metrics
from guard.server.oip import InferenceServicer
from guard.server.security import OPEN_METHODS, BearerToken, read_secret, server_credentials
from guard.server.status import MalformedRequests

log = logging.getLogger("guard.server")
HEALTH_SERVICES = ("", "inference.GRPCInferenceService", "guard.v1.Guard")
CONTROL_CALLS = 16  # threads and gRPC slots beyond --max-inflight, kept for health checks and metadata
# gRPC binds with SO_REUSEPORT by default on Linux, so a second guard on a taken port would start and silently share
# its callers with the first (another model or profile, perhaps); without it the bind fails and says so.
NO_PORT_SHARING = ("grpc.so_reuseport", 0)


class GuardServer:
    """One guarded model behind gRPC. `start()` returns once it is ready; `stop()` drains."""

    def __init__(self, settings: ServeSettings, guard: Guard | None = None) -> None:
        self.settings = settings
        self.guard = guard or Guard.load(settings.model, settings.profile, device=settings.device,
                                         policy=settings.policy, engine=settings.engine, threads=settings.threads,
                                         on_failure=settings.on_check_failure,
                                         check_budget=settings.check_budget_ms / 1000 or None)
        self.metrics = Metrics(settings.served_name)
        self.plane = DataPlane(self.guard, settings.served_name, self.metrics, settings.max_batch,
                               settings.batch_size, settings.batch_delay_ms / 1000, settings.max_inflight,
                               settings.workers)
        limit = settings.max_message_mb * 1024 * 1024
        interceptors = []
        if settings.auth_token_file is not None:
            try:
                token = read_secret(settings.auth_token_file, "token file").decode().strip()
            except UnicodeDecodeError:
                raise GuardError(f"the token file {settings.auth_token_file} is not UTF-8 text") from None
            if not all("!" <= c <= "~" for c in token):  # a BOM, a second line: a token no client could send
                raise GuardError(f"the token file {settings.auth_token_file} must hold one token of printable ASCII "
                                 "without spaces (an HTTP header's value); it holds other characters")
            interceptors.append(BearerToken(token, lambda: self.plane.count_error("UNAUTHENTICATED"),
                                            open_methods=OPEN_METHODS if settings.health_port is None else ()))
        interceptors.append(MalformedRequests(self.plane))  # after the token's check: no parsing for the tokenless
        self.server = grpc.server(
            # A thread for every admitted request plus room for health checks and metadata, so nothing waits in
            # the executor's queue: inference beyond --max-inflight is refused by the data plane at once, engine
            # runs are limited to --workers there, and probes always find a thread.
            futures.ThreadPoolExecutor(max_workers=settings.max_inflight + CONTROL_CALLS, thread_name_prefix="guard-rpc"),
            options=[("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit),
                     NO_PORT_SHARING],
            maximum_concurrent_rpcs=settings.max_inflight + CONTROL_CALLS,  # gRPC refuses the rest before they queue
            interceptors=interceptors,
        )
        oip_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(self.plane), self.server)
        guard_pb2_grpc.add_GuardServicer_to_server(GuardServicer(self.plane), self.server)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        if settings.reflection:
            from guard.server.reflection import enable_reflection

            enable_reflection(self.server, ("inference.GRPCInferenceService", "guard.v1.Guard", health.SERVICE_NAME))
        # gRPC gives a call its slot when its headers arrive, so callers that never send their messages can hold
        # every slot of the main server, probes' included; --health-port answers probes from a server of their own.
        self.health_server: HealthPort | None = None  # made by start(), where --health-port is given
        self.port = 0
        self.metrics_port = 0
        self.health_port = 0
        self._stopped = threading.Event()
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)

    def _set_health(self, status: int) -> None:
        """What both health servicers answer for every service guard names."""
        for service in HEALTH_SERVICES:
            self.health.set(service, status)
            if self.health_server is not None:
                self.health_server.set(service, status)

    def start(self) -> None:
        if self._stopped.is_set():  # its data plane is closed: it would report SERVING and answer nothing
            raise GuardError("a stopped server cannot start again; make a new one")
        credentials = None if self.settings.tls_cert is None else server_credentials(
            self.settings.tls_cert, self.settings.tls_key, self.settings.tls_client_ca)
        try:
            self.port = _bind(self.server, self.settings.host, self.settings.port, credentials, "listen")
            if self.settings.health_port is not None:  # plaintext: it says SERVING or not, nothing else
                self.health_server = HealthPort(options=[NO_PORT_SHARING])
                self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
                server, host, port = self.health_server.server, self.settings.host, self.settings.health_port
                self.health_port = self.health_server.on_loop(
                    lambda: _bind(server, host, port, None, "answer health checks"))
            try:
                self.metrics_port = self.metrics.serve(self.settings.metrics_host, self.settings.metrics_port)
            except OSError as exc:
                raise GuardError(
                    f"cannot serve metrics on {host_port(self.settings.metrics_host, self.settings.metrics_port)}: "
                    f"{exc.strerror or exc}") from None
            if self.settings.audit_log is not None:  # opened last: the failures above leave no file behind
                self.plane.audit = AuditLog(self.settings.audit_log,
                                            dropped=self.metrics.audit_dropped.labels(model=self.plane.name).inc)
                self.metrics.audit_enabled.labels(model=self.plane.name).set(1)
            self.server.start()
            if self.health_server is not None:
                self.health_server.start()
        except BaseException:  # a failed start leaves nothing running, bound or open behind it
            self._stopped.set()
            try:
                if self.port:
                    self._let_go_of_port()
            finally:
                if self.health_server is not None:
                    self.health_server.stop()
                    self.health_server = None
                self.metrics.close()
                self.plane.close()
            raise
        self.plane.ready = True
        self.metrics.ready.labels(model=self.plane.name).set(1)
        self._set_health(health_pb2.HealthCheckResponse.SERVING)
        log.info("guard serving model %r on %s (metrics on %s, policy %s, providers %s)", self.plane.name,
                 host_port(self.settings.host, self.port), host_port(self.settings.metrics_host, self.metrics_port),
                 self.guard.policy.value, ",".join(self.guard.engine.providers))

    def _let_go_of_port(self) -> None:
        """Unbind the main port after a failed start. gRPC holds a bound port until a started server stops, and
        stopping one never started does nothing: start it and stop it at once, cancelling any call that came in
        between (nothing said SERVING)."""
        try:
            self.server.start()
        except ValueError:  # gRPC refuses a second start: the failure came after it, and stopping unbinds
            pass
        self.server.stop(None).wait()

    def stop(self, grace: float | None = None) -> None:
        """Stop taking calls, let in-flight ones finish (up to `grace` seconds), then close everything."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        self.plane.ready = False
        self.metrics.ready.labels(model=self.plane.name).set(0)
        self.health.enter_graceful_shutdown()
        if self.health_server is not None:
            self.health_server.enter_graceful_shutdown()
        self.plane.drain()  # an open batch runs now, within the grace period, not after its delay
        self.server.stop(self.settings.grace_seconds if grace is None else grace).wait()
        if self.health_server is not None:  # probes heard NOT_SERVING until the drain was over
            self.health_server.stop()
        self.plane.close()
        self.metrics.close()
        log.info("guard stopped")

    def wait(self) -> None:
        self.server.wait_for_termination()


def _bind(server: grpc.Server, host: str, port: int, credentials: grpc.ServerCredentials | None, what: str) -> int:
    """The port `server` is bound to on host:port (TLS with `credentials`), or a GuardError saying it cannot `what`
    there."""
    address = host_port(host, port)
    try:
        bound = (server.add_insecure_port(address) if credentials is None
                 else server.add_secure_port(address, credentials))
    except RuntimeError as exc:
        raise GuardError(f"cannot {what} on {address}: {_bind_refused(host, port) or exc}") from None
    if bound == 0:
        raise GuardError(f"cannot {what} on {address}: {_bind_refused(host, port) or 'gRPC could not bind it'}")
    return bound


def _bind_refused(host: str, port: int) -> str | None:
    """Why the system refuses host:port ("Address already in use"), asked with a plain socket: gRPC's own message says
    only that it failed to bind."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC binds: TIME_WAIT is no refusal
            probe.bind((host, port))
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def serve(settings: ServeSettings) -> None:
    """Run until SIGTERM or SIGINT, then drain and return; on SIGHUP reopen the audit log (log rotation)."""
    rotated = threading.Event()  # SIGHUP (log rotation) is only noted here: the reopen runs in the loop below
    if hasattr(signal, "SIGHUP"):  # not on Windows; set before the slow start, so an early HUP does not kill guard
        signal.signal(signal.SIGHUP, lambda *_: rotated.set())
    server = GuardServer(settings)
    server.start()
    status = sys.stderr if settings.audit_log == "-" else sys.stdout  # stdout is then the audit log's alone
    health = ("" if server.health_server is None
              else f", health checks also on {host_port(settings.host, server.health_port)}")
    print(f"guard: serving {server.plane.name!r} on {host_port(settings.host, server.port)}, "
          f"metrics on {host_port(settings.metrics_host, server.metrics_port)}{health}", file=status, flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(0.5):  # short waits keep the main thread responsive to signals
        if rotated.is_set():
            rotated.clear()
            if server.plane.audit is not None:
                server.plane.audit.reopen()
    print("guard: draining in-flight requests", file=status, flush=True)
    server.stop()
