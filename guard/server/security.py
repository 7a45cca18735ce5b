"""Who may talk to the server: TLS (and mutual TLS) for the gRPC port, and an optional bearer token.

Health checks (`Check`) stay open without a token, so that probes and `guard health` need no secret; everything
else (inference, metadata, guard.v1, and health `Watch`, a stream that would hold a slot for as long as it pleases)
needs `authorization: Bearer <token>` when a token is configured. The token is read once, at start-up.
"""

from __future__ import annotations

import hmac
import logging
import ssl
from collections.abc import Callable
from pathlib import Path

import grpc

from guard.errors import GuardError, shown
from guard.sparselog import SparseLog

OPEN_METHODS = ("/grpc.health.v1.Health/Check",)
# The calls guard_request_errors_total counts, against guard_requests_total's answered ones (the error share).
INFERENCE_METHODS = ("/inference.GRPCInferenceService/ModelInfer", "/guard.v1.Guard/Predict")
REFUSAL_LOG_SECONDS = 10.0  # a refused call is logged at most this often: anyone who can connect can repeat one


def read_secret(path: Path, what: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise GuardError(f"cannot read the {what} {path}: {exc.strerror or exc}") from None
    if not data.strip():
        raise GuardError(f"the {what} {path} is empty")
    return data


def server_credentials(cert: Path, key: Path, client_ca: Path | None) -> grpc.ServerCredentials:
    """TLS with this certificate chain and key; with `client_ca`, clients must present a certificate it signed."""
    pair = (read_secret(key, "TLS key"), read_secret(cert, "TLS certificate"))
    _check_pem(cert, key, client_ca)
    if client_ca is None:
        return grpc.ssl_server_credentials([pair])
    return grpc.ssl_server_credentials([pair], root_certificates=read_secret(client_ca, "client CA"),
                                       require_client_auth=True)


def _check_pem(cert: Path, key: Path, client_ca: Path | None) -> None:
    """gRPC reports a bad certificate, a bad key or a key of another certificate only as a port it cannot bind (the
    cause goes to its own log); Python's ssl reads the same PEM files and names the problem first."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.set_ciphers("ALL:@SECLEVEL=0")  # only what the files are, not how strong: that stays gRPC's to judge

    def no_passphrase() -> bytes:
        raise GuardError(f"the TLS key {key} is encrypted; gRPC takes no passphrase: give it the key decrypted")

    try:
        context.load_cert_chain(cert, key, password=no_passphrase)
    except (ssl.SSLError, ValueError, OSError) as exc:
        raise GuardError(f"the TLS certificate {cert} and key {key} do not make a pair gRPC can serve: {exc}") from None
    if client_ca is not None:
        try:
            context.load_verify_locations(cafile=client_ca)
        except (ssl.SSLError, ValueError, OSError) as exc:
            raise GuardError(f"the client CA {client_ca} holds no certificate TLS can use: {exc}") from None


class BearerToken(grpc.ServerInterceptor):
    """Refuses calls without the right `authorization: Bearer <token>` (UNAUTHENTICATED), `open_methods` excepted:
    health checks, where probes (which send no token) come to this port. A call holds one of the port's places
    while its message has not come, so open methods let callers without the token hold them all: with a health
    port of its own for the probes, nothing is open here."""

    def __init__(self, token: str, on_refused_inference: Callable[[], None],
                 open_methods: tuple[str, ...] = OPEN_METHODS) -> None:
        if not token:
            raise GuardError("the bearer token is empty")
        self._token = token.encode()
        self._open = open_methods
        self._on_refused_inference = on_refused_inference
        self._refused = SparseLog(REFUSAL_LOG_SECONDS, logging.getLogger("guard.server"))

    def _refusal(self, method: str) -> grpc.RpcMethodHandler:
        def refuse(_requests: object, context: grpc.ServicerContext) -> None:
            if method in INFERENCE_METHODS:
                self._on_refused_inference()
            # who tried, for a security team; the token given is not written, as it may be a near miss of the real one
            # the method is the caller's own text: quoted, so that a newline in it cannot forge a line of the log
            self._refused.warning("token", "refused %s from %s: missing or wrong bearer token", shown(method),
                                  context.peer())
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token (authorization metadata)")

        # Request-streaming, whatever the method: the refusal comes as the headers arrive, without waiting for a
        # message that a caller without the token need never send (holding one of the port's places meanwhile).
        return grpc.stream_unary_rpc_method_handler(refuse)

    def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
                          handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        if handler_call_details.method in self._open:
            return continuation(handler_call_details)
        # Exactly one: of two, the last decided, where a proxy in front reading the first would disagree on who called.
        given = [value for key, value in handler_call_details.invocation_metadata or () if key == "authorization"]
        # RFC 7235: the scheme is case-insensitive and one or more spaces follow it; the token is compared whole
        scheme, _, credentials = str(given[0] if len(given) == 1 else "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(credentials.lstrip(" ").encode(), self._token):
            return continuation(handler_call_details)
        return self._refusal(handler_call_details.method)
