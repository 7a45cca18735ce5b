"""Access to the real server: TLS, mutual TLS and the bearer token, with certificates made here by openssl."""

from __future__ import annotations

import re
import shutil
import subprocess
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.utils import InferenceServerException

from conftest import Backdoored, log_messages
from guard.cli import main
from guard.config import ServeSettings
from guard.errors import GuardError
from guard.server.app import GuardServer

MODEL = "badnets"


def openssl(*args: str, cwd: Path) -> None:
    binary = shutil.which("openssl")
    if binary is None:
        pytest.fail("openssl is needed to make the test certificates")
    subprocess.run([binary, *args], cwd=cwd, check=True, capture_output=True)


SPIFFE_ID = "spiffe://prod.example/ns/payments/sa/checkout"


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """A CA, a server certificate for 127.0.0.1 and localhost, and a client certificate, all signed by the CA."""
    root = tmp_path_factory.mktemp("pki")
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
            "-subj", "/CN=guard test CA", cwd=root)
    (root / "server.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    (root / "spiffe.ext").write_text(f"subjectAltName=URI:{SPIFFE_ID}\n")
    for name, subject in (("server", "/CN=localhost"), ("client", "/CN=guard test client"), ("spiffe", "/O=payments")):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                "-subj", subject, cwd=root)
        extra = ["-extfile", f"{name}.ext"] if name in ("server", "spiffe") else []
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                "-out", f"{name}.pem", "-days", "2", *extra, cwd=root)
    (root / "token").write_text("s3cret-token\n")
    return root


def serve(backdoored: Backdoored, **settings: object) -> GuardServer:
    server = GuardServer(ServeSettings(model=backdoored.model_path, profile=backdoored.profile_path, port=0,
                                       metrics_port=0, **settings))
    server.start()
    return server


def infer(url: str, x: np.ndarray, headers: dict[str, str] | None = None, **tls: object) -> np.ndarray:
    with triton.InferenceServerClient(url, **tls) as client:
        tensor = triton.InferInput("input", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        return client.infer(MODEL, [tensor], headers=headers, client_timeout=10).as_numpy("guard_flagged")


def test_tls_serves_clients_that_trust_the_ca_only(backdoored: Backdoored, pki: Path) -> None:
    server = serve(backdoored, tls_cert=pki / "server.pem", tls_key=pki / "server.key")
    try:
        url = f"localhost:{server.port}"
        x = backdoored.x_eval[:4]
        assert len(infer(url, x, ssl=True, root_certificates=str(pki / "ca.pem"))) == 4
        with pytest.raises(InferenceServerException):  # plaintext against a TLS port
            infer(url, x)
        assert main(["health", "--host", "localhost", "--port", str(server.port), "--tls-ca",
                     str(pki / "ca.pem")]) == 0
        assert main(["health", "--host", "localhost", "--port", str(server.port), "--timeout", "1"]) == 1
    finally:
        server.stop(grace=1)


def test_a_bare_guard_health_probes_the_plaintext_health_port_of_a_tls_server(
        backdoored: Backdoored, pki: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An image's HEALTHCHECK is `guard health`, no flags: with TLS on it probed the main port in plaintext and the
    container stayed unhealthy, though GUARD_HEALTH_PORT had opened a plaintext health port for probes."""
    server = serve(backdoored, tls_cert=pki / "server.pem", tls_key=pki / "server.key", health_port=0)
    try:
        monkeypatch.delenv("GUARD_CONFIG", raising=False)
        monkeypatch.delenv("GUARD_HEALTH_PORT", raising=False)
        monkeypatch.setenv("GUARD_PORT", str(server.port))
        assert main(["health", "--timeout", "2"]) == 1  # no health port known: the main port, in plaintext
        monkeypatch.setenv("GUARD_HEALTH_PORT", str(server.health_port))
        assert main(["health", "--timeout", "2"]) == 0
        # a probe that speaks TLS itself still goes to the main port
        assert main(["health", "--host", "localhost", "--tls-ca", str(pki / "ca.pem"), "--timeout", "2"]) == 0
        monkeypatch.setenv("GUARD_HEALTH_PORT", "0")  # a free port, which only the server knows: the main port
        assert main(["health", "--timeout", "2"]) == 1
    finally:
        server.stop(grace=1)


def test_mutual_tls_refuses_clients_without_a_certificate(backdoored: Backdoored, pki: Path) -> None:
    server = serve(backdoored, tls_cert=pki / "server.pem", tls_key=pki / "server.key",
                   tls_client_ca=pki / "ca.pem")
    try:
        url = f"localhost:{server.port}"
        x = backdoored.x_eval[:2]
        with pytest.raises(InferenceServerException):
            infer(url, x, ssl=True, root_certificates=str(pki / "ca.pem"))
        flagged = infer(url, x, ssl=True, root_certificates=str(pki / "ca.pem"),
                        private_key=str(pki / "client.key"), certificate_chain=str(pki / "client.pem"))
        assert len(flagged) == 2
        assert main(["health", "--host", "localhost", "--port", str(server.port), "--tls-ca", str(pki / "ca.pem"),
                     "--tls-cert", str(pki / "client.pem"), "--tls-key", str(pki / "client.key")]) == 0
    finally:
        server.stop(grace=1)


def test_the_audit_log_names_a_client_by_its_certificate_common_name_or_else_its_spiffe_id(
        backdoored: Backdoored, pki: Path, tmp_path: Path) -> None:
    """A certificate with only subject alternative names (as SPIFFE issues them) was audited with no identity."""
    import json

    log = tmp_path / "audit.jsonl"
    server = serve(backdoored, tls_cert=pki / "server.pem", tls_key=pki / "server.key", tls_client_ca=pki / "ca.pem",
                   audit_log=str(log))
    triggered = backdoored.triggered()[0][:4]
    try:
        for name in ("client", "spiffe"):
            infer(f"localhost:{server.port}", triggered, ssl=True, root_certificates=str(pki / "ca.pem"),
                  private_key=str(pki / f"{name}.key"), certificate_chain=str(pki / f"{name}.pem"))
    finally:
        server.stop(grace=1)
    assert [json.loads(line)["identity"] for line in log.read_text().splitlines()] == ["guard test client", SPIFFE_ID]


def test_bearer_token_guards_everything_but_health(backdoored: Backdoored, pki: Path) -> None:
    server = serve(backdoored, auth_token_file=pki / "token")
    with log_messages("guard.server") as logged:
        try:
            url = f"127.0.0.1:{server.port}"
            x = backdoored.x_eval[:3]
            for given in (None, "Bearer wrong", "s3cret-token", "Basic s3cret-token", "Bearers3cret-token"):
                with pytest.raises(InferenceServerException, match=r"UNAUTHENTICATED|bearer"):
                    infer(url, x, headers=None if given is None else {"authorization": given})
            # RFC 7235: the scheme in any case, one or more spaces before the token
            for given in ("Bearer s3cret-token", "bearer s3cret-token", "BEARER  s3cret-token"):
                assert len(infer(url, x, headers={"authorization": given})) == 3
            with grpc.insecure_channel(url) as channel:  # probes carry no token
                reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
                watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""), timeout=5)
                with pytest.raises(grpc.RpcError) as refused:  # a stream would hold a slot: it needs the token
                    next(watch)
                assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            with triton.InferenceServerClient(url) as client, pytest.raises(InferenceServerException):
                client.get_model_metadata(MODEL)  # metadata needs the token too
            # one token header exactly: of two, the last one decided, in either order
            with grpc.insecure_channel(url) as channel:
                metadata = channel.unary_unary("/inference.GRPCInferenceService/ServerMetadata",
                                               request_serializer=bytes, response_deserializer=bytes)
                assert metadata(b"", metadata=[("authorization", "Bearer s3cret-token")], timeout=5) is not None
                for pair in (("Bearer wrong", "Bearer s3cret-token"), ("Bearer s3cret-token", "Bearer wrong"),
                             ("Bearer s3cret-token", "Bearer s3cret-token")):
                    with pytest.raises(grpc.RpcError) as refused:
                        metadata(b"", metadata=[("authorization", value) for value in pair], timeout=5)
                    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5) as response:
                text = response.read().decode()
            # the five inference calls; the refused Watch and metadata calls are not inference requests
            assert f'guard_request_errors_total{{code="UNAUTHENTICATED",model="{MODEL}"}} 5.0' in text
            # a refusal names its caller and method, at most one line per 10 s: eleven refusals do not make eleven lines
            refusals = [line for line in logged if "bearer token" in line]
            assert 1 <= len(refusals) < 11
            assert re.search(r"refused '/inference\.GRPCInferenceService/ModelInfer' from ipv[46]:.*127\.0\.0\.1",
                             refusals[0]), refusals[0]
            assert "s3cret" not in "".join(logged) and "Bearer" not in "".join(logged)  # no token given is written
        finally:
            server.stop(grace=1)


def test_a_refused_method_name_cannot_forge_a_log_line(backdoored: Backdoored, pki: Path) -> None:
    """The method is the caller's own text: a newline in it wrote a line of the caller's making into the log."""
    server = serve(backdoored, auth_token_file=pki / "token")
    with log_messages("guard.server") as logged:
        try:
            with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                forged = channel.unary_unary("/a/b\n2026-01-01 WARNING guard.server: forged", request_serializer=bytes,
                                             response_deserializer=bytes)
                with pytest.raises(grpc.RpcError) as refused:
                    forged(b"", timeout=5)
                assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        finally:
            server.stop(grace=1)
        refusals = [line for line in logged if "bearer token" in line]
        assert len(refusals) == 1 and "\n" not in refusals[0] and "'/a/b\\n2026" in refusals[0]


def test_callers_without_the_token_hold_no_place_on_the_port(backdoored: Backdoored, pki: Path) -> None:
    """A call without the token that never sends its message is refused as its headers arrive, so any number of them
    cannot fill the port's concurrent-call limit (--max-inflight plus the control calls) against those with it."""
    import threading

    server = serve(backdoored, auth_token_file=pki / "token", max_inflight=1)
    never = threading.Event()

    def silent():  # the headers go out; the message never does
        never.wait()
        yield b""

    try:
        url = f"127.0.0.1:{server.port}"
        with grpc.insecure_channel(url) as channel:
            calls = [channel.stream_unary("/guard.v1.Guard/Predict").future(silent(), timeout=30) for _ in range(40)]
            codes = {call.exception(timeout=20).code() for call in calls}  # each ends long before its deadline
            # refused by guard; on a loaded machine some arrive while gRPC still counts the refused ones as active,
            # and gRPC's own limit refuses those
            assert grpc.StatusCode.UNAUTHENTICATED in codes
            assert codes <= {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.RESOURCE_EXHAUSTED}
        assert len(infer(url, backdoored.x_eval[:3], headers={"authorization": "Bearer s3cret-token"})) == 3
    finally:
        never.set()
        server.stop(grace=1)


def test_with_a_health_port_the_token_guards_health_checks_on_the_main_port_too(
        backdoored: Backdoored, pki: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Callers without the token held every place of the main port with Check calls whose message never came; with
    a port of their own for the probes, the main port's checks need the token, and `guard health` probing it there
    says to probe the health port."""
    server = serve(backdoored, auth_token_file=pki / "token", health_port=0)
    request = health_pb2.HealthCheckRequest(service="")
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            with pytest.raises(grpc.RpcError) as refused:
                health_pb2_grpc.HealthStub(channel).Check(request, timeout=5)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            reply = health_pb2_grpc.HealthStub(channel).Check(
                request, metadata=[("authorization", "Bearer s3cret-token")], timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        with grpc.insecure_channel(f"127.0.0.1:{server.health_port}") as channel:  # probes carry no token
            assert health_pb2_grpc.HealthStub(channel).Check(request, timeout=5).status == reply.status
        capsys.readouterr()
        assert main(["health", "--port", str(server.port), "--timeout", "5"]) == 1
        refusal = capsys.readouterr().err
        assert "UNAUTHENTICATED" in refusal and "sends no token: probe the server's --health-port" in refusal
    finally:
        server.stop(grace=1)


@pytest.mark.parametrize("given, message", [
    ({"tls_cert": "server.pem"}, "--tls-cert and --tls-key go together"),
    ({"tls_client_ca": "ca.pem"}, "needs --tls-cert and --tls-key"),
    ({"tls_cert": "server.pem", "tls_key": "missing.key"}, "file not found"),
    ({"auth_token_file": "missing-token"}, "file not found"),
])
def test_incomplete_security_settings_refuse_to_start(backdoored: Backdoored, pki: Path, given: dict,
                                                      message: str) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=message):
        ServeSettings(model=backdoored.model_path, profile=backdoored.profile_path,
                      **{k: pki / v for k, v in given.items()})


@pytest.mark.parametrize("files, message", [
    ({"tls_cert": "garbage.pem", "tls_key": "server.key"}, "do not make a pair"),
    ({"tls_cert": "server.pem", "tls_key": "client.key"}, "key values mismatch"),  # the key of another certificate
    ({"tls_cert": "server.pem", "tls_key": "server.key", "tls_client_ca": "garbage.pem"}, "client CA"),
    ({"tls_cert": "server.pem", "tls_key": "encrypted.key"}, "is encrypted; gRPC takes no passphrase"),
])
def test_tls_files_that_cannot_serve_are_named(backdoored: Backdoored, pki: Path, files: dict, message: str) -> None:
    """gRPC itself only says it cannot bind the port; the refusal names the files and what is wrong with them (and
    an encrypted key is refused, not prompted for on the terminal)."""
    (pki / "garbage.pem").write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    openssl("pkey", "-in", "server.key", "-aes256", "-passout", "pass:secret", "-out", "encrypted.key", cwd=pki)
    with pytest.raises(GuardError, match=message) as refused:
        serve(backdoored, **{k: pki / v for k, v in files.items()})
    assert any(name in str(refused.value) for name in ("garbage.pem", "client.key", "encrypted.key"))


def test_the_tls_check_leaves_key_strength_to_grpc(backdoored: Backdoored, pki: Path) -> None:
    """A 1024-bit RSA certificate is below Python's default security level but gRPC serves it: still served."""
    openssl("req", "-x509", "-newkey", "rsa:1024", "-nodes", "-keyout", "weak.key", "-out", "weak.pem", "-days", "2",
            "-subj", "/CN=localhost", cwd=pki)
    server = serve(backdoored, tls_cert=pki / "weak.pem", tls_key=pki / "weak.key")
    server.stop(grace=0)


@pytest.mark.parametrize("text", ["\ufeffs3cret-token\n", "s3cret-token\nsecond-line\n", "two words\n"])
def test_a_token_no_client_could_send_refuses_to_start(backdoored: Backdoored, tmp_path: Path, text: str) -> None:
    """A byte-order mark, a second line, a space: the server would start and refuse every caller."""
    token = tmp_path / "token"
    token.write_text(text, encoding="utf-8")
    with pytest.raises(GuardError, match="one token of printable ASCII"):
        serve(backdoored, auth_token_file=token)


def test_defaults_listen_on_loopback_and_metrics_can_bind_elsewhere(backdoored: Backdoored) -> None:
    defaults = ServeSettings(model=backdoored.model_path, profile=backdoored.profile_path)
    assert defaults.host == defaults.metrics_host == "127.0.0.1"
    server = serve(backdoored, metrics_host="127.0.0.2")  # Linux routes all of 127/8 to loopback
    try:
        with urllib.request.urlopen(f"http://127.0.0.2:{server.metrics_port}/metrics", timeout=5) as response:
            assert b"guard_model_ready" in response.read()
        with pytest.raises(OSError):
            urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5)
        assert len(infer(f"127.0.0.1:{server.port}", backdoored.x_eval[:1])) == 1
    finally:
        server.stop(grace=1)


@pytest.mark.parametrize(("host", "metrics_host"), [("::1", "[::1]"), ("[::1]", "::1")])
def test_an_ipv6_host_is_taken_with_or_without_brackets_on_both_ports(backdoored: Backdoored, host: str,
                                                                     metrics_host: str) -> None:
    """gRPC refused `::1` ("misformatted domain name") and the metrics server `[::1]`: an IPv6-only cluster needed a
    different spelling for each flag."""
    server = serve(backdoored, host=host, metrics_host=metrics_host, health_port=0)
    try:
        with urllib.request.urlopen(f"http://[::1]:{server.metrics_port}/metrics", timeout=5) as response:
            assert b"guard_model_ready" in response.read()
        assert len(infer(f"[::1]:{server.port}", backdoored.x_eval[:1])) == 1
        assert main(["health", "--host", host, "--port", str(server.health_port)]) == 0
    finally:
        server.stop(grace=1)


def test_data_files_holding_pickles_are_refused(tmp_path: Path) -> None:
    from guard.errors import GuardError
    from guard.samples import load_samples

    path = tmp_path / "evil.npz"
    np.savez(path, x=np.array([{"run": "code"}], dtype=object))  # an object array is stored as a pickle
    with pytest.raises(GuardError):
        load_samples(path)


def test_idle_connections_to_the_metrics_port_hold_no_thread_for_long(monkeypatch: pytest.MonkeyPatch,
                                                                      capfd: pytest.CaptureFixture[str]) -> None:
    """prometheus_client's server gave each connection a thread until it closed: a thousand idle ones held a thousand
    threads in guard's process, where gRPC's own threads come from the same limit. A connection is now closed a
    while after it was accepted, however slowly it goes on sending, without a traceback."""
    import socket
    import threading
    import time

    from guard.server import metrics as metrics_module

    monkeypatch.setattr(metrics_module, "METRICS_TIMEOUT_SECONDS", 1.0)
    metrics = metrics_module.Metrics("m")
    port = metrics.serve("127.0.0.1", 0)
    before = threading.active_count()
    idle = [socket.create_connection(("127.0.0.1", port), timeout=30)
            for _ in range(metrics_module.METRICS_CONNECTIONS + 8)]
    slow = socket.create_connection(("127.0.0.1", port), timeout=30)
    try:
        time.sleep(0.5)
        assert threading.active_count() <= before + metrics_module.METRICS_CONNECTIONS
        started = time.monotonic()
        while time.monotonic() - started < 5:  # a byte every 0.2 s: the request never ends, the connection does
            try:
                slow.sendall(b"G")
            except OSError:
                break
            time.sleep(0.2)
        assert time.monotonic() - started < 5, "a slow sender held its connection past its time"
        for connection in idle:  # each closed: past its time, or at once past the places
            assert connection.recv(1) == b""
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            assert b"guard_build_info" in response.read()
    finally:
        for connection in [*idle, slow]:
            connection.close()
        metrics.close()
    assert "Traceback" not in capfd.readouterr().err
