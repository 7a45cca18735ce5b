"""Blend synthesis (guard.calibrate.blends): it names a blended backdoor's target on a real model, names nothing on
the clean one, and its pattern travels through the scan's files and fine-tuning's unlearning."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TARGET, poisoned_cnn
from guard.calibrate.blends import BlendSettings, blend, scan_blends
from guard.calibrate.synthesis import BlendTrigger, Trigger, save_trigger
from guard.calibrate.warps import describe_triggers, load_any_trigger, split_targets
from guard.cli import main
from guard.errors import GuardError
from guard.eval.attacks import Blend
from guard.eval.models import export_onnx
from guard.model.graph import load_model
from guard.scan import ScanSettings, format_report, run_scan, write_outputs


@pytest.fixture(scope="module")
def blend_model(fashion, tmp_path_factory) -> Path:
    """The backdoored fixture's recipe with the eval's blend (10% of a 5k subset, 3 epochs)."""
    x_train, y_train, _, _ = fashion
    module = poisoned_cnn(x_train, y_train, Blend(), seed=0)
    return export_onnx(module, tmp_path_factory.mktemp("blend") / "blend.onnx", torch.zeros(1, 1, 28, 28))


def test_scan_names_the_blend_target_and_the_files_carry_it(blend_model, fashion, tmp_path) -> None:
    _, _, x_test, y_test = fashion
    model = load_model(blend_model)
    # few patch steps and no warps: the blends are the point
    report = run_scan(model, x_test[:500], y_test[:500], settings=ScanSettings(steps=20, warp_scan=False))
    assert report.blends is not None and report.blends.suspect == TARGET
    found = report.blend
    assert isinstance(found, BlendTrigger) and found.success >= BlendSettings.min_success
    assert found in report.candidates  # the reference and AR unlearn it beside the stamps
    # unlearned at its own strength: a constant mask over the whole image
    np.testing.assert_array_equal(found.mask, np.full((1, 28, 28), BlendSettings.unlearn_strength, np.float32))
    assert found.pattern.shape == (1, 28, 28) and 0 <= found.pattern.min() and found.pattern.max() <= 1
    stamps, warps, blends = split_targets(report.candidates)
    assert warps == [] and blends == [TARGET] and len(stamps) == len(report.candidates) - 1
    assert describe_triggers(report.candidates) == f"the triggers of classes {stamps} and the blend of class {TARGET}"
    assert f"blend scan: class {TARGET} is the likely target of a blended trigger" in format_report(report)
    written = write_outputs(report, tmp_path)
    assert tmp_path / f"blend_{TARGET}.npz" in written
    assert json.loads((tmp_path / "scan.json").read_text())["blends"]["suspect"] == TARGET
    loaded = load_any_trigger(tmp_path / f"blend_{TARGET}.npz", model.sample_shape, model.num_classes)
    assert isinstance(loaded, BlendTrigger) and loaded.target == TARGET
    np.testing.assert_array_equal(loaded.pattern, found.pattern)
    np.testing.assert_array_equal(loaded.mask, found.mask)


def test_blend_scan_names_no_class_of_a_clean_model(clean_model, fashion) -> None:
    _, _, x_test, y_test = fashion
    found = scan_blends(load_model(clean_model), x_test[:500], y_test[:500])
    assert found.suspect is None
    assert found.success.max() < BlendSettings.min_success


def test_a_blend_stamps_as_the_blend_it_was_found_as() -> None:
    images, pattern = torch.rand(8, 1, 28, 28), torch.rand(1, 28, 28)
    found = BlendTrigger(target=2, mask=np.full((1, 28, 28), 0.15, np.float32), pattern=pattern.numpy(),
                         success=1.0, mask_l1=0.15 * 28 * 28)
    torch.testing.assert_close(found.stamp(images), blend(images, pattern[None], 0.15))
    np.testing.assert_allclose(found.apply(images.numpy()), 0.85 * images.numpy() + 0.15 * pattern.numpy(),
                               atol=1e-6)


def test_a_plain_stamp_file_stays_a_stamp(tmp_path) -> None:
    stamp = Trigger(target=1, mask=np.zeros((1, 28, 28), np.float32), pattern=np.ones((1, 28, 28), np.float32),
                    success=1.0, mask_l1=0.0)
    save_trigger(stamp, tmp_path / "candidate_1.npz")
    loaded = load_any_trigger(tmp_path / "candidate_1.npz", (1, 28, 28), 10)
    assert type(loaded) is Trigger and split_targets([loaded]) == ([1], [], [])


def test_blend_settings_are_validated() -> None:
    for bad in (BlendSettings(steps=0), BlendSettings(strength=0.0), BlendSettings(unlearn_strength=1.5),
                BlendSettings(threshold=float("nan")), BlendSettings(min_success=-0.1)):
        with pytest.raises(GuardError):
            bad.validate()
    with pytest.raises(GuardError, match="strength"):  # through the scan's own settings, before any work
        ScanSettings(blends={"strength": 2.0}).validate()
    with pytest.raises(GuardError, match="unknown blend setting"):
        ScanSettings(blends={"strenght": 0.1}).validate()
    ScanSettings(blend_scan=False, blends={"strenght": 0.1}).validate()  # no blend scan, nothing to check


def test_cli_scan_without_blends(blend_model, fashion, tmp_path) -> None:
    _, _, x_test, y_test = fashion
    np.savez(tmp_path / "clean.npz", x=x_test[:100], y=y_test[:100])
    out = tmp_path / "out"
    assert main(["scan", str(blend_model), "--data", str(tmp_path / "clean.npz"), "--out", str(out), "--steps", "5",
                 "--no-warps", "--no-blends"]) == 0
    report = json.loads((out / "scan.json").read_text())
    assert report["blends"] is None and report["settings"]["blend_scan"] is False
    assert not list(out.glob("blend_*.npz"))


def test_calibrate_records_an_unlearned_blend(clean_model, fashion) -> None:
    from guard.calibrate.pipeline import CalibrationSettings, calibrate

    x, y = fashion[2][:300], fashion[3][:300]
    pattern = np.random.default_rng(0).uniform(size=(1, 28, 28)).astype(np.float32)
    faint = BlendTrigger(target=4, mask=np.full((1, 28, 28), 0.15, np.float32), pattern=pattern, success=1.0,
                         mask_l1=0.15 * 28 * 28)
    profile = calibrate(clean_model, x, y, settings=CalibrationSettings(reference_folds=1), triggers=[faint])
    assert profile.figures["reference_unlearned"] == [] and profile.figures["reference_unlearned_blends"] == [4]
