"""Warp synthesis (guard.calibrate.warps): it names a warping backdoor's target on a real model, names nothing on the
clean one, and its warps travel through the scan's files and fine-tuning's unlearning."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TARGET
from guard.calibrate.synthesis import Trigger
from guard.calibrate.warps import (
    WarpSettings,
    WarpTrigger,
    describe_triggers,
    load_any_trigger,
    named_class,
    save_warp,
    scan_warps,
    split_targets,
    warp_index,
)
from guard.cli import main
from guard.errors import GuardError
from guard.eval.attacks import WaNet
from guard.eval.models import export_onnx
from guard.model.graph import load_model
from guard.repair.adaptive_reg import _unlearning_batch
from guard.scan import ScanSettings, run_scan, write_outputs


@pytest.fixture(scope="module")
def wanet_model(fashion, tmp_path_factory) -> Path:
    """A SmallCNN that learnt a warp: 30% of a 5k subset warped at the eval's strength without noise mode, 5
    epochs (attack success about 0.76; at the fixture's 10% and 3 epochs the warp does not take)."""
    from guard.eval.models import SmallCNN, train

    x_train, y_train, _, _ = fashion
    rng = np.random.default_rng(0)
    subset = rng.choice(len(x_train), 5000, replace=False)
    x_poisoned, y_poisoned, _ = WaNet(noise_ratio=0.0).poison(x_train[subset], y_train[subset], 0.3, TARGET, rng)
    torch.manual_seed(0)
    module = train(SmallCNN(), x_poisoned, y_poisoned, epochs=5, seed=0).eval()
    return export_onnx(module, tmp_path_factory.mktemp("wanet") / "wanet.onnx", torch.zeros(1, 1, 28, 28))


def identity_grid(height: int = 28, width: int = 28) -> np.ndarray:
    ys, xs = np.meshgrid(np.linspace(-1, 1, height), np.linspace(-1, 1, width), indexing="ij")
    return np.stack((xs, ys), axis=-1).astype(np.float32)


def test_warp_index_stands_out_only_for_the_outlier() -> None:
    success = np.array([0.02, 0.05, 0.01, 0.04, 0.03, 0.06, 0.02, 0.8, 0.05, 0.03])
    index = warp_index(success)
    assert int(np.argmax(index)) == 7 and index[7] > 20
    assert np.all(np.delete(index, 7) < 3)
    # Classes no warp reaches: the spread's floor keeps one image in a thousand from reading as an outlier.
    assert warp_index(np.array([0.0] * 9 + [0.001])).max() < 0.1


def test_on_few_images_the_spread_is_floored_at_one_image() -> None:
    """3 of 10 fit images sent to a class by chance read as index 20 and named a class of a clean model."""
    chance = np.array([0.0] * 9 + [0.3])
    assert warp_index(chance)[9] > 20 and named_class(chance, 5.0, 0.3)[1] == 9
    few = np.full(10, 9)  # each rate counts the 9 images of the other classes
    assert warp_index(chance, few)[9] == pytest.approx(0.3 / (1.4826 / 9))
    assert named_class(chance, 5.0, 0.3, few)[1] is None
    many = np.full(10, 450)  # the eval's 500 fit images: the one-in-a-hundred floor still binds
    np.testing.assert_array_equal(warp_index(chance, many), warp_index(chance))


def test_scan_names_the_warp_target_and_the_files_carry_it(wanet_model, fashion, tmp_path) -> None:
    _, _, x_test, y_test = fashion
    x, y = x_test[:500], y_test[:500]
    model = load_model(wanet_model)
    report = run_scan(model, x, y, settings=ScanSettings(steps=20))  # few patch steps: the warps are the point
    assert report.warps is not None and report.warps.suspect == TARGET
    warp = report.warp
    assert warp is not None and warp.success >= WarpSettings.min_success
    assert warp in report.candidates  # the reference and AR unlearn it beside the stamps
    stamps, warps, blends = split_targets(report.candidates)
    assert warps == [TARGET]
    assert describe_triggers(report.candidates) == " and ".join(
        [*([f"the triggers of classes {stamps}"] if stamps else []), f"the warp of class {TARGET}",
         *(f"the blend of class {k}" for k in blends)])
    # The found warp moves no pixel much past the budget (a pixel is 2/27 in grid coordinates; bicubic
    # interpolation between the control points overshoots them by at most a quarter).
    assert np.abs(warp.grid - identity_grid()).max() <= 1.25 * 2 / 27
    written = write_outputs(report, tmp_path)
    assert tmp_path / f"warp_{TARGET}.npz" in written
    loaded = load_any_trigger(tmp_path / f"warp_{TARGET}.npz", model.sample_shape, model.num_classes)
    assert isinstance(loaded, WarpTrigger) and loaded.target == TARGET
    np.testing.assert_array_equal(loaded.grid, warp.grid)


def test_warp_scan_names_no_class_of_a_clean_model(clean_model, fashion) -> None:
    _, _, x_test, y_test = fashion
    found = scan_warps(load_model(clean_model), x_test[:500], y_test[:500])
    assert found.suspect is None
    assert found.success.max() < WarpSettings.min_success


def test_identity_warp_leaves_images_and_stamp_matches_apply(fashion) -> None:
    x = fashion[2][:8]
    still = WarpTrigger(target=0, grid=identity_grid(), success=0.0)
    np.testing.assert_allclose(still.apply(x), x, atol=1e-5)  # the grid's float rounding
    moved = WarpTrigger(target=0, grid=np.clip(identity_grid() + 2 / 27, -1, 1).astype(np.float32), success=0.0)
    np.testing.assert_array_equal(moved.apply(x), moved.stamp(torch.as_tensor(x)).numpy())
    assert not np.allclose(moved.apply(x), x)


def test_unlearning_batch_stamps_and_warps_its_share() -> None:
    images = torch.rand(400, 1, 28, 28)
    stamp = Trigger(target=1, mask=np.zeros((1, 28, 28), np.float32), pattern=np.ones((1, 28, 28), np.float32),
                    success=1.0, mask_l1=1.0)
    stamp.mask[:, :3, :3] = 1.0  # a white 3x3 corner
    shifted = WarpTrigger(target=0, grid=np.clip(identity_grid() + 2 / 27, -1, 1).astype(np.float32), success=1.0)
    out = _unlearning_batch(images, [stamp, shifted], 0.5, torch.Generator().manual_seed(0))
    changed = ~torch.isclose(out, images).flatten(1).all(1)
    stamped = (out[:, :, :3, :3] == 1).flatten(1).all(1)
    warped = changed & ~stamped
    assert 0.35 < changed.float().mean() < 0.65  # about the share
    assert stamped.sum() > 50 and warped.sum() > 50  # both kinds drawn
    torch.testing.assert_close(out[warped], shifted.stamp(images[warped]))


def test_corrupt_warp_files_are_refused(tmp_path) -> None:
    outside = WarpTrigger(target=0, grid=identity_grid() * 3, success=0.0)
    save_warp(outside, tmp_path / "far.npz")
    with pytest.raises(GuardError, match=r"\[-1, 1\]"):
        load_any_trigger(tmp_path / "far.npz", (1, 28, 28), 10)
    save_warp(WarpTrigger(target=12, grid=identity_grid(), success=0.0), tmp_path / "class.npz")
    with pytest.raises(GuardError, match="one class"):
        load_any_trigger(tmp_path / "class.npz", (1, 28, 28), 10)
    save_warp(WarpTrigger(target=0, grid=identity_grid(14, 14), success=0.0), tmp_path / "small.npz")
    with pytest.raises(GuardError, match="shape"):
        load_any_trigger(tmp_path / "small.npz", (1, 28, 28), 10)
    (tmp_path / "cut.npz").write_bytes((tmp_path / "far.npz").read_bytes()[:100])
    with pytest.raises(GuardError, match="cannot read"):
        load_any_trigger(tmp_path / "cut.npz", (1, 28, 28), 10)


def test_warp_settings_are_validated() -> None:
    for bad in (WarpSettings(steps=0), WarpSettings(budget=0.0), WarpSettings(grid_size=1),
                WarpSettings(threshold=float("nan")), WarpSettings(min_success=1.5)):
        with pytest.raises(GuardError):
            bad.validate()
    with pytest.raises(GuardError, match="budget"):  # through the scan's own settings, before any work
        ScanSettings(warps={"budget": -1.0}).validate()
    with pytest.raises(GuardError, match="unknown warp setting"):
        ScanSettings(warps={"bugdet": 1.0}).validate()
    ScanSettings(warp_scan=False, warps={"bugdet": 1.0}).validate()  # no warp scan, nothing to check


def test_cli_scan_without_warps(wanet_model, fashion, tmp_path) -> None:
    _, _, x_test, y_test = fashion
    np.savez(tmp_path / "clean.npz", x=x_test[:100], y=y_test[:100])
    out = tmp_path / "out"
    assert main(["scan", str(wanet_model), "--data", str(tmp_path / "clean.npz"), "--out", str(out), "--steps", "5",
                 "--no-warps"]) == 0
    report = json.loads((out / "scan.json").read_text())
    assert report["warps"] is None and report["settings"]["warp_scan"] is False
    assert not list(out.glob("warp_*.npz"))


def test_calibrate_unlearns_a_warp_and_refuses_a_bad_one(clean_model, fashion) -> None:
    from guard.calibrate.pipeline import CalibrationSettings, calibrate

    x, y = fashion[2][:300], fashion[3][:300]
    shifted = WarpTrigger(target=3, grid=np.clip(identity_grid() + 2 / 27, -1, 1).astype(np.float32), success=1.0)
    profile = calibrate(clean_model, x, y, settings=CalibrationSettings(reference_folds=1), triggers=[shifted])
    assert profile.figures["reference_unlearned"] == [] and profile.figures["reference_unlearned_warps"] == [3]
    small = WarpTrigger(target=3, grid=identity_grid(14, 14), success=1.0)
    with pytest.raises(GuardError, match="trigger 0 must be a float32 grid of shape"):
        calibrate(clean_model, x, y, triggers=[small])
