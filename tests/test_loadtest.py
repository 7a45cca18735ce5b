"""`guard load` on a real server process: nothing fails below capacity; above it, the excess is refused with
RESOURCE_EXHAUSTED instead of queueing, and still nothing fails."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import Backdoored
from guard.cli import main


def test_load_below_and_above_capacity(backdoored: Backdoored, tmp_path, capsys) -> None:
    data = tmp_path / "x.npz"
    np.savez(data, x=backdoored.x_eval[:64])
    common = [str(backdoored.model_path), "--profile", str(backdoored.profile_path), "--data", str(data),
              "--seconds", "2"]
    assert main(["load", *common, "--callers", "4", "--max-inflight", "16", "--out", str(tmp_path / "in.json")]) == 0
    within = json.loads((tmp_path / "in.json").read_text())
    assert within["answered"] > 20 and within["rejected"] == 0 and within["failed"] == 0
    assert within["sent"] == within["answered"]
    printed = capsys.readouterr().out  # no rejection has a latency, and a 2 s run has no reading at 10 s
    assert within["rss_mb"]["at_10s"] is None and "None" not in printed and "after 10 s" not in printed
    # Calls of 32 samples keep the server busy long enough for the callers to overlap on a loaded machine too (with
    # one sample each, a loaded machine once saw none refused)
    assert main(["load", *common, "--callers", "12", "--max-inflight", "2", "--batch", "32",
                 "--out", str(tmp_path / "over.json")]) == 0
    over = json.loads((tmp_path / "over.json").read_text())
    assert over["rejected"] > 0 and over["answered"] > 0 and over["failed"] == 0
    assert over["rss_mb"]["start"] > 10 and len(over["rss_mb"]["every_second"]) >= 3  # start, each second, end
    assert f"rejected {over['rejected']} (p50 {over['rejected_latency']['p50_ms']} ms" in capsys.readouterr().out


def test_load_refuses_an_output_that_is_an_input_before_starting(backdoored: Backdoored, capsys) -> None:
    """--out naming the profile being served replaced it with the run's figures."""
    before = backdoored.profile_path.read_bytes()
    assert main(["load", str(backdoored.model_path), "--profile", str(backdoored.profile_path), "--seconds", "1",
                 "--out", str(backdoored.profile_path)]) == 2
    assert "is one of this command's inputs" in capsys.readouterr().err
    assert backdoored.profile_path.read_bytes() == before


def test_load_past_the_servers_default_batch_limit_and_a_server_that_cannot_start(backdoored: Backdoored, tmp_path,
                                                                                   capsys) -> None:
    """A batch above serve's 1024 ended in a traceback from the warm-up call; the load's server now takes it. A
    server that exits at once was reported as not starting within 120 s."""
    data = tmp_path / "x.npz"
    np.savez(data, x=backdoored.x_eval[:64])
    assert main(["load", str(backdoored.model_path), "--profile", str(backdoored.profile_path), "--data", str(data),
                 "--seconds", "3", "--callers", "1", "--batch", "1100", "--out", str(tmp_path / "big.json")]) == 0
    figures = json.loads((tmp_path / "big.json").read_text())
    assert figures["answered"] >= 1 and figures["failed"] == 0
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a profile")
    assert main(["load", str(backdoored.model_path), "--profile", str(broken), "--seconds", "1"]) == 2
    assert "guard serve exited (code 2) before it was ready" in capsys.readouterr().err


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if entry.name.isdigit() and int(fields[1]) == pid:
            found.append(int(entry.name))
    return found


@pytest.mark.parametrize(("sent", "code"), [(signal.SIGTERM, 128 + 15), (signal.SIGINT, 130), (None, 2)])
def test_a_stopped_load_run_stops_its_server_and_its_callers(backdoored: Backdoored, sent: int | None,
                                                             code: int) -> None:
    """SIGTERM ended `guard load` at once and left its `guard serve` running, holding its port; Ctrl-C closed the
    server but waited for the callers until --seconds ran out. A server killed under it (`sent` None) was reported
    only once --seconds ran out, its callers failing against the closed port until then."""
    load = subprocess.Popen([sys.executable, "-m", "guard", "load", str(backdoored.model_path), "--profile",
                             str(backdoored.profile_path), "--seconds", "300", "--callers", "4"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={k: v for k, v in os.environ.items() if not k.startswith("GUARD_")})
    said: list[str] = []
    started = threading.Event()

    def read_stderr() -> None:
        for line in load.stderr:
            said.append(line)
            if line.startswith("guard load: 4 caller(s) sending batches of 1 to 127.0.0.1:"):
                started.set()

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    try:
        assert started.wait(180), "".join(said)  # the server answers and the callers start
        servers = _children(load.pid)
        assert servers, "guard load started no server"
        time.sleep(2)  # the callers are sending
        if sent is None:
            os.kill(servers[0], signal.SIGKILL)
        else:
            load.send_signal(sent)
        assert load.wait(timeout=60) == code, "".join(said)
        reader.join(10)
        if sent is None:
            assert "guard serve exited (killed by SIGKILL)" in "".join(said)
        # close() has waited for it; a zombie's /proc entry may outlive it for a moment
        deadline = time.monotonic() + 10
        while any(Path(f"/proc/{pid}").exists() for pid in servers) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(Path(f"/proc/{pid}").exists() for pid in servers), "guard serve was left running"
    finally:
        if load.poll() is None:
            load.kill()
            load.wait()
