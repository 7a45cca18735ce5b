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


def test_serve_answers_then_drains_on_sigterm(backdoored: Backdoored) -> None:
    env = {**os.environ, "GUARD_POLICY": "monitor", "GUARD_METRICS_PORT": "0"}
    process = subprocess.Popen(
        [sys.executable, "-m", "guard", "serve", str(backdoored.model_path), "--profile",
         str(backdoored.profile_path), "--port", "0", "--model-name", "victim"],
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
