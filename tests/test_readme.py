"""README.md's Python examples run as written: a user copies them first, and an example that fails teaches nothing."""

from __future__ import annotations

import contextlib
import io
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import Backdoored
from guard.calibrate.warps import split_targets
from guard.config import ServeSettings
from guard.scan import ScanSettings
from guard.server.app import GuardServer

README = Path(__file__).resolve().parents[1] / "README.md"


def python_example(containing: str) -> str:
    """The README's one ```python block that contains `containing`."""
    blocks = [b for b in re.findall(r"```python\n(.*?)```", README.read_text(), re.S) if containing in b]
    assert len(blocks) == 1, f"expected one Python example with {containing!r}, found {len(blocks)}"
    return blocks[0]


def test_the_calibration_example_builds_the_profile_the_cli_would(backdoored: Backdoored, tmp_path: Path,
                                                                 scan_once: list[ScanSettings],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    shutil.copy(backdoored.model_path, tmp_path / "model.onnx")
    monkeypatch.chdir(tmp_path)
    x, _ = backdoored.triggered()
    names = {"x_clean": backdoored.x_clean, "y_clean": backdoored.y_clean, "my_module": backdoored.module, "x": x}
    exec(python_example("calibrate("), names)
    profile, result, scan = names["profile"], names["result"], names["scan"]
    assert scan_once == [ScanSettings()]  # the scan `guard scan` runs (the suite's one, reused here)
    assert (tmp_path / "profile.safetensors").is_file()
    unlearned = [profile.figures[f"reference_unlearned{kind}"] for kind in ("", "_warps", "_blends")]
    assert unlearned == list(split_targets(scan.candidates)) and any(unlearned)
    assert profile.thresholds.suspect == scan.classes.suspect
    assert result.labels.shape == (len(x),) and result.flagged.mean() > 0.5  # BadNets-triggered images


def test_the_tritonclient_example_gets_answers_and_verdicts(backdoored: Backdoored, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the example reads clean.npz, as made by the quick start
    np.savez("clean.npz", x=backdoored.x_clean[:8], y=backdoored.y_clean[:8])
    server = GuardServer(ServeSettings(model=backdoored.model_path, profile=backdoored.profile_path, port=0,
                                       metrics_port=0, model_name="model"))
    server.start()
    try:
        example = python_example("tritonclient")
        assert "127.0.0.1:8001" in example  # the default port; the test's server has its own
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            exec(example.replace("127.0.0.1:8001", f"127.0.0.1:{server.port}"), {})
    finally:
        server.stop(grace=1)
    assert re.fullmatch(r"\[[\d ]+\] \[.*\] \[.*\]\n", printed.getvalue(), re.S), printed.getvalue()


def test_the_metrics_table_lists_every_metric_the_server_exports() -> None:
    """Dashboards and alerts are written from the README's table: a metric missing there is one nobody watches."""
    from guard.server.metrics import Metrics

    table = set(re.findall(r"^\| `(guard_\w+)` \|", README.read_text(), re.M))
    exported = {family.name for family in Metrics("m").registry.collect()}
    exported = {name if name in table else f"{name}_total" for name in exported}  # counters collect without _total
    assert table == exported
