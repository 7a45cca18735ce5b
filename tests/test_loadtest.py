"""`guard load` on a real server process: nothing fails below capacity; above it, the excess is refused with
RESOURCE_EXHAUSTED instead of queueing, and still nothing fails."""

from __future__ import annotations

import json

import numpy as np

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
