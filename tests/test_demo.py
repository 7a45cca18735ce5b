"""`guard demo` works from the package alone: bundled data, no Debian dataset, loopback server, real verdicts."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from guard.cli import main


def test_demo_runs_on_bundled_data_and_flags_triggers(tmp_path) -> None:
    # A deployment's GUARD_* settings are for guard serve: the demo's own loopback server takes none of them (with
    # GUARD_MAX_BATCH=100 its 600-image request failed after the training, and GUARD_POLICY changed what it showed).
    env = {**os.environ, "GUARD_FASHION_MNIST_DIR": str(tmp_path / "absent"), "GUARD_MAX_BATCH": "100",
           "GUARD_POLICY": "monitor", "GUARD_HOST": "0.0.0.0"}
    done = subprocess.run([sys.executable, "-m", "guard", "demo", "--workdir", str(tmp_path / "work")],
                          check=False, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    clean = re.search(r"clean requests:\s+(\d+), flagged\s+([\d.]+)%", done.stdout)
    triggered = re.search(r"triggered requests:\s+(\d+), flagged\s+([\d.]+)%, answered '.+?' ([\d.]+)% "
                          r"\(unguarded ([\d.]+)%\)", done.stdout)
    assert clean and triggered, done.stdout
    assert "3. serving on 127.0.0.1:" in done.stdout and "(policy: enforce)" in done.stdout
    assert float(triggered.group(2)) > 5 * float(clean.group(2))
    assert float(triggered.group(3)) < float(triggered.group(4))  # fewer answers of the target under the guard
    assert (tmp_path / "work" / "demo.onnx").is_file() and (tmp_path / "work" / "demo.safetensors").is_file()


def test_demo_refuses_a_workdir_it_cannot_use_before_training(tmp_path, capsys) -> None:
    a_file = tmp_path / "taken"
    a_file.write_text("")
    for workdir in (a_file, a_file / "below"):
        assert main(["demo", "--workdir", str(workdir)]) == 2
        printed = capsys.readouterr()
        assert f"cannot keep the demo's files in {workdir}" in printed.err and "training" not in printed.out


def test_demo_refuses_fewer_than_one_epoch(capsys) -> None:
    for epochs in ("0", "-3"):
        assert main(["demo", "--epochs", epochs]) == 2
        printed = capsys.readouterr()
        assert f"--epochs must be at least 1, got {epochs}" in printed.err and "training" not in printed.out
