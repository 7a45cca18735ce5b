"""Shared fixtures: a genuinely backdoored Fashion-MNIST model, trained here in seconds, and its profile."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import math
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from guard.calibrate.profile import Profile
from guard.eval.attacks import Attack, BadNets
from guard.eval.datasets import load_fashion_mnist
from guard.model.graph import LoadedModel, sha256_bytes
from guard.scan import ScanReport, ScanSettings

TARGET = 0


@dataclass
class Backdoored:
    model_path: Path
    profile_path: Path
    module: torch.nn.Module
    attack: BadNets
    x_clean: np.ndarray  # the defender's calibration set
    y_clean: np.ndarray
    x_eval: np.ndarray  # disjoint evaluation images
    y_eval: np.ndarray

    def triggered(self) -> tuple[np.ndarray, np.ndarray]:
        """Triggered evaluation images whose true class is not the target, with their true labels."""
        victims = self.y_eval != TARGET
        return self.attack.apply(self.x_eval[victims]), self.y_eval[victims]


def run_cli(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess:
    """`guard ARGS...` in a fresh interpreter, as a user runs it; on one torch thread, as the tests in this process
    run (on a 2-core machine a calibration took twice as long on torch's default two)."""
    return subprocess.run([sys.executable, "-m", "guard", *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"},
                          timeout=300, check=False)  # a hang guard: a scan and a calibration take ~1 min


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread() -> None:
    torch.set_num_threads(1)  # tiny convs run much faster single-threaded on a 2-core machine


@pytest.fixture(scope="session")
def fashion() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    try:
        x_train, y_train = load_fashion_mnist("train")
        x_test, y_test = load_fashion_mnist("test")
    except FileNotFoundError as exc:
        pytest.fail(f"Fashion-MNIST is needed: apt-get install dataset-fashion-mnist ({exc})")
    return x_train, y_train, x_test, y_test


def poisoned_cnn(x_train: np.ndarray, y_train: np.ndarray, attack: Attack, seed: int) -> torch.nn.Module:
    """A SmallCNN trained for 3 epochs on a 5k subset of which `attack` poisoned 10% (target class 0)."""
    from guard.eval.models import SmallCNN, train

    rng = np.random.default_rng(seed)
    subset = rng.choice(len(x_train), 5000, replace=False)
    x_poisoned, y_poisoned, _ = attack.poison(x_train[subset], y_train[subset], 0.1, TARGET, rng)
    torch.manual_seed(seed)
    return train(SmallCNN(), x_poisoned, y_poisoned, epochs=3, seed=seed).eval()


@pytest.fixture(scope="session")
def clean_model(fashion, tmp_path_factory) -> Path:
    """The backdoored fixture's recipe without poisoning: same 5k subset, 3 epochs."""
    from guard.eval.models import SmallCNN, export_onnx, train

    x_train, y_train, _, _ = fashion
    subset = np.random.default_rng(0).choice(len(x_train), 5000, replace=False)
    torch.manual_seed(0)
    module = train(SmallCNN(), x_train[subset], y_train[subset], epochs=3, seed=0)
    return export_onnx(module, tmp_path_factory.mktemp("clean") / "clean.onnx", torch.zeros(1, 1, 28, 28))


@pytest.fixture(scope="session")
def backdoored(fashion, tmp_path_factory) -> Backdoored:
    """BadNets 10% on a 5k subset, 3 epochs: clean accuracy about 0.75, attack success about 0.9."""
    from guard.calibrate.pipeline import calibrate
    from guard.eval.models import export_onnx

    x_train, y_train, x_test, y_test = fashion
    attack = BadNets()
    module = poisoned_cnn(x_train, y_train, attack, seed=0)
    root = tmp_path_factory.mktemp("backdoored")
    model_path = export_onnx(module, root / "badnets.onnx", torch.zeros(1, 1, 28, 28))
    x_clean, y_clean = x_test[:500], y_test[:500]
    profile = calibrate(model_path, x_clean, y_clean)
    profile_path = profile.save(root / "badnets.safetensors")
    return Backdoored(model_path, profile_path, module, attack, x_clean, y_clean, x_test[1000:2000],
                      y_test[1000:2000])


@dataclass
class Scanned:
    out: Path  # guard scan's --out folder: scan.json, trigger.npz, candidate_K.npz ...
    data: Path  # the clean .npz it scanned with (the backdoored fixture's calibration set)
    stdout: str
    report: ScanReport  # what run_scan returned inside the command
    settings: ScanSettings  # what the command asked run_scan for


@pytest.fixture(scope="session")
def scanned(backdoored: Backdoored, tmp_path_factory) -> Scanned:
    """One `guard scan` of the backdoored model at its defaults, run once for the suite: test_scan reads what it
    wrote, and the repair and calibration tests take its triggers (`--trigger`, `--scan-dir`) or its report
    (`scan_once`) instead of scanning again."""
    import guard.scan
    from guard.cli import main

    root = tmp_path_factory.mktemp("scan")
    data = root / "clean.npz"
    np.savez(data, x=backdoored.x_clean, y=backdoored.y_clean)
    out = root / "out"
    calls: list[tuple[ScanReport, ScanSettings]] = []
    real = guard.scan.run_scan

    def recorded(model: Path | LoadedModel, x: np.ndarray, y: np.ndarray | None = None, *,
                 settings: ScanSettings | None = None) -> ScanReport:
        calls.append((real(model, x, y, settings=settings), settings or ScanSettings()))
        return calls[-1][0]

    stdout = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(stdout):
        patch.setattr(guard.scan, "run_scan", recorded)
        code = main(["scan", str(backdoored.model_path), "--data", str(data), "--out", str(out)])
    assert code == 0 and len(calls) == 1
    return Scanned(out, data, stdout.getvalue(), *calls[0])


@pytest.fixture
def scan_once(scanned: Scanned, backdoored: Backdoored, monkeypatch: pytest.MonkeyPatch) -> list[ScanSettings]:
    """`run_scan` of the backdoored model, its calibration set and the settings `scanned` used answers with that
    scan's report instead of scanning again (a minute each); any other scan fails the test. The scan is seeded:
    test_scan checks that it repeats. Returns the settings of each call answered."""
    import guard.scan

    answered: list[ScanSettings] = []
    model_sha256 = sha256_bytes(backdoored.model_path.read_bytes())

    def again(model: str | Path | LoadedModel, x: np.ndarray, y: np.ndarray | None = None, *,
              settings: ScanSettings | None = None) -> ScanReport:
        sha256 = model.sha256 if isinstance(model, LoadedModel) else sha256_bytes(Path(model).read_bytes())
        settings = settings or ScanSettings()
        assert sha256 == model_sha256 and settings == scanned.settings, "not the scan `scanned` ran"
        assert np.array_equal(x, backdoored.x_clean) and np.array_equal(y, backdoored.y_clean), "other samples"
        answered.append(settings)
        return scanned.report

    monkeypatch.setattr(guard.scan, "run_scan", again)
    return answered


def raw_parts(path: Path) -> tuple[dict[str, np.ndarray], dict]:
    """A profile file's tensors and its decoded guard metadata."""
    with safe_open(str(path), framework="numpy") as handle:
        meta = json.loads(handle.metadata()["guard"])
    return load_file(str(path)), meta


def as_format_8(tensors: dict[str, np.ndarray], meta: dict) -> None:
    """A profile's parts as written before format 9: no input envelope."""
    meta["format"] = "guard.profile/8"
    tensors.pop("input_bound", None)
    for key in ("envelope_centre", "envelope_spread", "envelope_demote"):
        meta["thresholds"].pop(key, None)


def without_envelope(profile: Profile) -> Profile:
    """The same profile with no input envelope: the guard scores the check's parts alone."""
    return dataclasses.replace(profile, input_bound=None, thresholds=dataclasses.replace(
        profile.thresholds, envelope_centre=None, envelope_spread=None, envelope_demote=math.inf))


def write_parts(path: Path, tensors: dict[str, np.ndarray], meta: dict | str | None) -> Path:
    metadata = None if meta is None else {"guard": meta if isinstance(meta, str) else json.dumps(meta)}
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


@contextlib.contextmanager
def log_messages(name: str) -> Iterator[list[str]]:
    """The messages logged to the logger `name` while the block runs (the suite runs without pytest's caplog)."""
    messages: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger(name)
    logger.addHandler(handler)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)
