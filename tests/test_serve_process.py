"""`guard serve` as users run it: a separate process, configured by flags and GUARD_* variables, stopped by SIGTERM."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

import grpc
import numpy as np

from conftest import Backdoored
from guard.server._proto.guard.v1 import guard_pb2, guard_pb2_grpc


def test_serve_answers_then_drains_on_sigterm(backdoored: Backdoored, tmp_path) -> None:
    """Configured from all three places: the settings file names the model, the profile and a policy, GUARD_POLICY
    overrides that policy, and the flags pick the ports. ONNX Runtime's telemetry stays off unasked: it would report
    to Microsoft's collector, and it keeps a device id under ~/.cache first."""
    config = tmp_path / "guard.toml"
    config.write_text(f'model = "{backdoored.model_path}"\nprofile = "{backdoored.profile_path}"\n'
                      f'model-name = "victim"\npolicy = "enforce"\n')
    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, "GUARD_POLICY": "monitor", "GUARD_CONFIG": str(config), "HOME": str(home)}
    env.pop("ORT_DISABLE_TELEMETRY", None)  # this process imported guard, which set it
    process = subprocess.Popen(
        [sys.executable, "-m", "guard", "serve", "--port", "0", "--metrics-port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )
    try:
        lines = []
        for line in process.stdout:
            lines.append(line)
            match = re.search(r"serving 'victim' on 127\.0\.0\.1:(\d+)", line)
            if match:
                break
        assert match, "".join(lines)
        port = int(match.group(1))
        x = backdoored.triggered()[0][:16].astype(np.float32)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            reply = guard_pb2_grpc.GuardStub(channel).Predict(
                guard_pb2.PredictRequest(model="victim", shape=list(x.shape), data=x.tobytes()))
        assert reply.policy == "monitor"  # taken from GUARD_POLICY
        # Under monitor, the answer is the masked model's own, flagged or not.
        assert [p.label for p in reply.predictions] == [p.model_label for p in reply.predictions]
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=30)
        assert process.returncode == 0, output
        assert "draining" in output and "guard stopped" in output
        assert not list(home.rglob("*")), "onnxruntime's telemetry wrote its device id"
    finally:
        if process.poll() is None:
            process.kill()


def test_serve_refuses_missing_profile_with_one_line(backdoored: Backdoored, tmp_path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "guard", "serve", str(backdoored.model_path), "--profile", str(tmp_path / "no.st")],
        check=False, capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 2
    assert "guard: error:" in done.stderr and "file not found" in done.stderr
    assert "Traceback" not in done.stderr


def test_sigterm_finishes_every_request_in_flight(backdoored: Backdoored) -> None:
    """Six requests are held in a slow dynamic batch when SIGTERM arrives: health watchers, on the main port and on
    the health port, see NOT_SERVING at once, all six are answered, then the process exits 0."""
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    from grpc_health.v1 import health_pb2, health_pb2_grpc

    process = subprocess.Popen(
        [sys.executable, "-m", "guard", "serve", str(backdoored.model_path), "--profile", str(backdoored.profile_path),
         "--port", "0", "--metrics-port", "0", "--health-port", "0", "--batch-size", "64", "--batch-delay-ms", "1500"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        match = None
        for line in process.stdout:
            match = re.search(r"serving '\w+' on 127\.0\.0\.1:(\d+),.*health checks also on 127\.0\.0\.1:(\d+)",
                              line)
            if match:
                break
        assert match
        target, health_target = (f"127.0.0.1:{port}" for port in match.groups())
        x = backdoored.x_eval[:2]
        statuses: dict[str, list[str]] = {target: [], health_target: []}

        def follow(watch, seen: list[str]) -> None:
            try:
                seen.extend(health_pb2.HealthCheckResponse.ServingStatus.Name(r.status) for r in watch)
            except grpc.RpcError:  # the stream ends when the server is gone
                pass

        with grpc.insecure_channel(target) as channel, grpc.insecure_channel(health_target) as health_channel:
            for watched, seen in zip((channel, health_channel), statuses.values(), strict=True):
                watch = health_pb2_grpc.HealthStub(watched).Watch(health_pb2.HealthCheckRequest(service=""))
                seen.append(health_pb2.HealthCheckResponse.ServingStatus.Name(next(watch).status))
                threading.Thread(target=follow, args=(watch, seen), daemon=True).start()
            stub = guard_pb2_grpc.GuardStub(channel)
            request = guard_pb2.PredictRequest(shape=list(x.shape), data=x.tobytes())
            with ThreadPoolExecutor(6) as callers:
                replies = [callers.submit(stub.Predict, request, timeout=30) for _ in range(6)]
                time.sleep(0.5)  # all six are waiting for their batch now
                process.send_signal(signal.SIGTERM)
                answered = [len(r.result().predictions) for r in replies]
        assert answered == [2] * 6, "every request in flight at SIGTERM must be answered"
        output, _ = process.communicate(timeout=30)
        assert process.returncode == 0, output
        for seen in statuses.values():
            assert seen[0] == "SERVING" and "NOT_SERVING" in seen[1:], statuses
    finally:
        if process.poll() is None:
            process.kill()


def test_sighup_reopens_the_audit_log_after_rotation(backdoored: Backdoored, tmp_path) -> None:
    """logrotate moves the file away, then sends SIGHUP: later lines go to a new file at the same path."""
    import json
    import time

    audit = tmp_path / "audit.jsonl"
    process = subprocess.Popen(
        [sys.executable, "-m", "guard", "serve", str(backdoored.model_path), "--profile", str(backdoored.profile_path),
         "--port", "0", "--metrics-port", "0", "--audit-log", str(audit)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        match = None
        for line in process.stdout:
            match = re.search(r"serving '\w+' on 127\.0\.0\.1:(\d+)", line)
            if match:
                break
        assert match
        x = backdoored.triggered()[0][:4].astype(np.float32)
        with grpc.insecure_channel(f"127.0.0.1:{match.group(1)}") as channel:
            stub = guard_pb2_grpc.GuardStub(channel)

            def predict() -> None:
                stub.Predict(guard_pb2.PredictRequest(shape=list(x.shape), data=x.tobytes()))

            predict()
            deadline = time.monotonic() + 10
            while not audit.read_text() and time.monotonic() < deadline:  # its writer's thread has written the line
                time.sleep(0.05)
            rotated = audit.rename(tmp_path / "audit.jsonl.1")
            process.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 10
            while not audit.exists() and time.monotonic() < deadline:  # the main loop reopens within half a second
                time.sleep(0.05)
            predict()
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=30)
        assert process.returncode == 0, output
        assert "audit log" in output and "reopened" in output
        for path in (rotated, audit):
            lines = [json.loads(line) for line in path.read_text().splitlines()]
            assert len(lines) == 1 and lines[0]["flagged"], path
    finally:
        if process.poll() is None:
            process.kill()
