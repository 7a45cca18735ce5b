"""The profile artifact end to end on a small real model: calibrate, save, load, guard; every malformed or mismatched
profile is refused with a ProfileError; the CLI reports such errors in one line; the torch-module path agrees with the
ONNX-only path.

The model is a SmallCNN trained for one epoch on 2,000 Fashion-MNIST images (Debian's files, or the bundled subset),
exported to ONNX once per module; calibration uses 300 test images.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from conftest import (
    TARGET,
    Backdoored,
    Scanned,
    as_format_8,
    raw_parts,
    run_cli,
    without_envelope,
    write_parts,
)
from guard.calibrate.activations import collect
from guard.calibrate.pipeline import CalibrationSettings, calibrate
from guard.calibrate.profile import FORMAT, Profile
from guard.calibrate.taps import OnnxTaps
from guard.cli import main
from guard.errors import GuardError, ModelError, ProfileError
from guard.eval.attacks import BadNets
from guard.eval.models import SmallCNN, export_onnx, load_eval_data, train
from guard.model.graph import load_model
from guard.runtime.guard import Guard
from guard.runtime.policy import margin
from guard.scan import ScanSettings

CALIBRATION_SAMPLES = 300


@dataclass
class Setup:
    workdir: Path
    module: SmallCNN
    model_path: Path
    other_path: Path  # the same architecture exported from another seed
    x_cal: np.ndarray
    y_cal: np.ndarray
    x_eval: np.ndarray
    profile: Profile
    profile_path: Path


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Setup:
    workdir = tmp_path_factory.mktemp("profile")
    x_train, y_train, x_test, y_test, _ = load_eval_data(2000, seed=0)
    torch.manual_seed(0)
    module = train(SmallCNN(), x_train, y_train, epochs=1, seed=0)
    sample = torch.as_tensor(x_train[:2])
    model_path = export_onnx(module, workdir / "model.onnx", sample)
    torch.manual_seed(1)
    other_path = export_onnx(SmallCNN(), workdir / "other.onnx", sample)
    x_cal, y_cal = x_test[:CALIBRATION_SAMPLES], y_test[:CALIBRATION_SAMPLES]
    profile = calibrate(model_path, x_cal, y_cal)
    profile_path = profile.save(workdir / "profile.safetensors")
    x_eval = x_test[CALIBRATION_SAMPLES:CALIBRATION_SAMPLES + 200]
    return Setup(workdir, module, model_path, other_path, x_cal, y_cal, x_eval, profile, profile_path)


# ---------------------------------------------------------------------------------------------- what it records


def test_profile_records_the_model_every_setting_and_the_figures(setup: Setup) -> None:
    profile = setup.profile
    assert profile.model_sha256 == hashlib.sha256(setup.model_path.read_bytes()).hexdigest()
    assert (profile.input_name, profile.output_name, profile.num_classes) == ("input", "logits", 10)
    assert set(profile.settings) == {f.name for f in dataclasses.fields(CalibrationSettings)}
    assert profile.settings["layers"] == profile.tap_names and len(profile.tap_names) >= 2
    assert profile.settings["fpr"] == CalibrationSettings().fpr
    figures = profile.figures
    assert figures["samples"] == CALIBRATION_SAMPLES
    assert figures["fit_samples"] + figures["holdout_samples"] == CALIBRATION_SAMPLES
    assert figures["labels_given"] is True
    assert figures["seconds"] > 0
    assert 0 <= figures["calibration_flag_rate"] <= max(profile.settings["fpr"],
                                                         figures["calibration_disagreement_rate"])
    assert figures["holdout_accuracy_unguarded"] - figures["holdout_accuracy_masked"] <= profile.settings["acc_budget"]
    assert figures["pruned_channels"] == {t.name: int((~t.keep).sum()) for t in profile.taps}
    total = sum(t.channels for t in profile.taps)
    assert profile.class_mean.shape == profile.class_scale.shape == (10, total)
    assert profile.thresholds.k >= profile.settings["k_min"]


def test_save_and_load_keep_every_array_threshold_setting_and_figure(setup: Setup) -> None:
    saved, loaded = setup.profile, Profile.load(setup.profile_path)
    for name in ("model_sha256", "input_name", "output_name", "num_classes", "thresholds", "settings", "figures",
                 "guard_version"):
        assert getattr(loaded, name) == getattr(saved, name), name
    assert loaded.tap_names == saved.tap_names
    for before, after in zip(saved.taps, loaded.taps, strict=True):
        assert (after.kind, after.fold) == (before.kind, before.fold)
        for field in ("linf_mean", "linf_std", "linf_p99", "linf_p999", "peakedness", "salience"):
            assert np.array_equal(getattr(after, field), getattr(before, field).astype(np.float32)), field
        for field in ("benign", "keep"):
            assert getattr(after, field).dtype == bool
            assert np.array_equal(getattr(after, field), getattr(before, field)), field
        if before.unit_bound is None:
            assert after.unit_bound is None
        else:
            assert np.array_equal(after.unit_bound, before.unit_bound.astype(np.float32))
    assert any(t.unit_bound is not None for t in loaded.taps)  # the conv taps carry their unit bounds
    assert np.array_equal(loaded.class_mean, saved.class_mean)
    assert np.array_equal(loaded.class_scale, saved.class_scale)
    assert saved.input_bound is not None and np.array_equal(loaded.input_bound, saved.input_bound)
    assert raw_parts(setup.profile_path)[1]["format"] == FORMAT
    again = loaded.save(setup.workdir / "again.safetensors")
    assert again.read_bytes() == setup.profile_path.read_bytes()  # saving is a pure function of the profile
    assert not list(setup.workdir.glob("*.tmp"))


def test_a_profile_is_saved_with_the_umasks_mode_and_only_if_it_loads_back(setup: Setup) -> None:
    """safetensors' writer made every profile 0600, unreadable by a server running as another user; data whose
    statistics overflowed float32 gave a profile every command refused, written over a good one."""
    import os

    path = setup.workdir / "moded.safetensors"
    umask = os.umask(0o022)
    try:
        setup.profile.save(path)
    finally:
        os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o644
    overflowed = dataclasses.replace(setup.profile, class_scale=np.full_like(setup.profile.class_scale, np.inf))
    with pytest.raises(ProfileError, match=r"would not load, so .*moded.safetensors is left as it was: .*finite"):
        overflowed.save(path)
    assert Profile.load(path).thresholds == setup.profile.thresholds and not list(setup.workdir.glob("*.tmp"))


def test_guard_loaded_from_files_answers_like_guard_built_in_memory(setup: Setup) -> None:
    from_files = Guard.load(setup.model_path, setup.profile_path)
    in_memory = Guard(load_model(setup.model_path), setup.profile)
    x = np.concatenate([setup.x_eval, BadNets(size=4).apply(setup.x_eval[:50])])
    a, b = from_files.predict(x), in_memory.predict(x)
    for field in ("labels", "logits", "flagged", "score", "model_labels", "demoted", "overruled", "spared"):
        assert np.array_equal(getattr(a, field), getattr(b, field)), field
    assert a.labels.shape == (len(x),) and a.logits.shape == (len(x), 10)
    assert np.array_equal(a.labels, a.logits.argmax(axis=1))
    assert a.flagged[: len(setup.x_eval)].mean() < 0.3  # clean data: about the calibrated 5%, not everything
    # without a flag or the reference's veto, the answer is the served model's own; with the veto, the reference's
    calm = ~a.flagged & ~a.overruled
    assert np.array_equal(a.labels[calm], a.model_labels[calm])
    assert a.overruled.any() and np.all(a.labels[a.overruled] != a.model_labels[a.overruled])


# ---------------------------------------------------------------------------------------------- refusals


def test_profile_for_a_different_model_is_refused(setup: Setup) -> None:
    with pytest.raises(ProfileError, match="different model") as info:
        Guard.load(setup.other_path, setup.profile_path)
    assert "sha256" in str(info.value)
    assert setup.profile.model_sha256[:12] in str(info.value)


def _truncated(setup: Setup, path: Path, keep: float) -> Path:
    data = setup.profile_path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def _edited(setup: Setup, path: Path, edit) -> Path:
    tensors, meta = raw_parts(setup.profile_path)
    edit(tensors, meta)
    return write_parts(path, tensors, meta)


def _set(mapping: dict, key: str, value: object) -> None:
    mapping[key] = value


def _without_reference_weights(tensors: dict[str, np.ndarray], meta: dict) -> None:
    for name in [name for name in tensors if name.startswith("reference/")]:
        tensors.pop(name)


def _no_reference(tensors: dict[str, np.ndarray], meta: dict) -> None:
    """A format-8 profile whose reference, weights and thresholds, is gone."""
    _without_reference_weights(tensors, meta)
    meta["thresholds"].update(overrule=None, confirm=None, confirm_ceiling=None)


def _without_reference(tensors: dict[str, np.ndarray], meta: dict) -> None:
    """As a profile written before format 6: no reference."""
    _without_reference_weights(tensors, meta)
    meta["thresholds"].pop("overrule")
    meta["thresholds"].pop("confirm")
    meta["thresholds"].pop("confirm_ceiling")
    _as_format_6(tensors, meta)


def _as_format_2(tensors: dict[str, np.ndarray], meta: dict) -> None:
    """As a profile written before format 3: no score parts (and none of the later thresholds)."""
    _without_reference(tensors, meta)
    meta["format"] = "guard.profile/2"
    for key in ("parts", "suspect", "suspect_demote"):
        meta["thresholds"].pop(key)
    for name in [name for name in tensors if name.startswith("parts.")]:
        tensors.pop(name)


def _as_format_6(tensors: dict[str, np.ndarray], meta: dict) -> None:
    """As a profile written before format 7: no warp class."""
    as_format_8(tensors, meta)
    meta["format"] = "guard.profile/6"
    for key in ("warp_class", "warp_overrule", "lean_class", "lean_centre", "lean_spread"):
        meta["thresholds"].pop(key)


def _with_warp_class(tensors: dict[str, np.ndarray], meta: dict, warp_class: object = 0,
                     warp_overrule: object = 0.0) -> None:
    meta["thresholds"].update(warp_class=warp_class, warp_overrule=warp_overrule)


def _with_lean(tensors: dict[str, np.ndarray], meta: dict, lean_class: object = 0, lean_centre: object = 0.0,
               lean_spread: object = 0.1) -> None:
    meta["thresholds"].update(lean_class=lean_class, lean_centre=lean_centre, lean_spread=lean_spread)


def _pad_channel(tensors: dict[str, np.ndarray], key: str) -> None:
    tensors[key] = np.concatenate([tensors[key], tensors[key][:1]], axis=0)


CORRUPTIONS = {
    "truncated-header": (lambda s, p: _truncated(s, p, 0.001), "not a readable profile"),
    "truncated-half": (lambda s, p: _truncated(s, p, 0.5), "not a readable profile"),
    "truncated-last-byte": (lambda s, p: _truncated(s, p, 0.99999), "not a readable profile"),
    "empty": (lambda s, p: _truncated(s, p, 0.0), "not a readable profile"),
    "random-bytes": (lambda s, p: (p.write_bytes(np.random.default_rng(0).bytes(4096)), p)[1],
                     "not a readable profile"),
    "no-guard-metadata": (lambda s, p: write_parts(p, {"weights": np.ones((2, 3), np.float32)}, None),
                          "not a guard profile"),
    "wrong-format": (lambda s, p: _edited(s, p, lambda t, m: _set(m, "format", "guard.profile/99")),
                     "unknown profile format 'guard.profile/99'"),
    "invalid-json": (lambda s, p: write_parts(p, raw_parts(s.profile_path)[0], "{not json"), "malformed"),
    "class-mean-shape": (lambda s, p: _edited(s, p, lambda t, m: _set(t, "class_mean", t["class_mean"][:, 1:])),
                         r"class_mean has shape"),
    "tap-array-shape": (lambda s, p: _edited(s, p, lambda t, m: _pad_channel(t, "taps.1.salience")),
                        r"tap '.*' has inconsistent array shapes"),
    "unit-bound-shape": (lambda s, p: _edited(s, p, lambda t, m: _pad_channel(t, "taps.0.unit_bound")),
                         r"unit bound of shape"),
    "unit-bound-nan": (lambda s, p: _edited(s, p, lambda t, m: t["taps.0.unit_bound"].__setitem__(0, np.nan)),
                       r"unit bound that is not finite"),
    "tap-unknown-kind": (lambda s, p: _edited(s, p, lambda t, m: _set(m["taps"][0], "kind", "pool")),
                         "has kind 'pool'"),
    "tap-unknown-fold": (lambda s, p: _edited(s, p, lambda t, m: _set(m["taps"][0], "fold", "magic")),
                         "fold 'magic'"),
    "num-classes-infinite": (lambda s, p: _edited(s, p, lambda t, m: _set(m, "num_classes", float("inf"))),
                             "num_classes must be an integer"),
    "num-classes-fractional": (lambda s, p: _edited(s, p, lambda t, m: _set(m, "num_classes", 10.7)),
                               "num_classes must be an integer"),
    "deeply-nested-metadata": (lambda s, p: write_parts(p, raw_parts(s.profile_path)[0],
                                                        '{"x": ' + "[" * 100_000 + "]" * 100_000 + "}"),
                               "malformed"),
    "missing-tensor": (lambda s, p: _edited(s, p, lambda t, m: t.pop("class_scale")), "class_scale"),
    "missing-key": (lambda s, p: _edited(s, p, lambda t, m: m.pop("thresholds")), "thresholds"),
    "zero-scale": (lambda s, p: _edited(s, p, lambda t, m: _set(t, "class_scale", 0 * t["class_scale"])),
                   "positive scales"),
    "infinite-scale": (lambda s, p: _edited(s, p, lambda t, m: _set(t, "class_scale", np.inf * t["class_scale"])),
                       "finite with positive scales"),
    "older-format": (lambda s, p: _edited(s, p, lambda t, m: _set(m, "format", "guard.profile/1")),
                     "older guard .* run `guard calibrate` again"),
    "cut-not-finite": (lambda s, p: _edited(s, p, lambda t, m: _set(m["thresholds"], "cut", float("nan"))),
                       "thresholds must be finite"),
    "tau-a-string": (lambda s, p: _edited(s, p, lambda t, m: _set(m["thresholds"], "tau", "1.5")),
                     "thresholds must be finite numbers"),
    "top-q-a-bool": (lambda s, p: _edited(s, p, lambda t, m: _set(m["thresholds"], "top_q", True)),
                     "integer top_q"),
    # finite and positive as stored, but not in float32, where the guard computes: the score would be NaN or inf
    "part-spread-underflows-float32": (lambda s, p: _edited(s, p, lambda t, m: _set(m["thresholds"]["parts"][0],
                                                                                    "spread", 1e-300)),
                                       "a score part needs a finite centre and a positive spread"),
    "class-scale-float64-underflows": (lambda s, p: _edited(s, p, lambda t, m: _set(
        t, "class_scale", t["class_scale"].astype(np.float64) * 1e-300)), "finite with positive scales"),
    "class-mean-float64-overflows": (lambda s, p: _edited(s, p, lambda t, m: _set(
        t, "class_mean", t["class_mean"].astype(np.float64) + 1e300)), "finite with positive scales"),
    "cut-missing": (lambda s, p: _edited(s, p, lambda t, m: m["thresholds"].pop("cut")), "cut"),
    "demote-below-tau": (lambda s, p: _edited(s, p, lambda t, m: _set(m["thresholds"], "demote",
                                                                       m["thresholds"]["tau"] - 1)),
                         "demote threshold must be null or a number at least tau"),
    "demote-nan": (lambda s, p: _edited(s, p, lambda t, m: _set(m["thresholds"], "demote", float("nan"))),
                   "demote threshold"),
    "demote-not-a-number": (lambda s, p: _edited(s, p, lambda t, m: _set(m["thresholds"], "demote", "high")),
                            "malformed"),
    "suspect-out-of-range": (lambda s, p: _edited(s, p, lambda t, m: _set(m["thresholds"], "suspect", 10)),
                             "suspect must be a class number below 10"),
    "suspect-not-an-integer": (lambda s, p: _edited(s, p, lambda t, m: _set(m["thresholds"], "suspect", 1.5)),
                               "suspect must be a class number"),
    "suspect-a-bool": (lambda s, p: _edited(s, p, lambda t, m: _set(m["thresholds"], "suspect", True)),
                       "suspect must be a class number"),
    "suspect-threshold-nan": (lambda s, p: _edited(s, p, lambda t, m: m["thresholds"].update(
        suspect=0, suspect_demote=float("nan"))), "suspect's demote threshold must be null or a number"),
    "suspect-threshold-a-string": (lambda s, p: _edited(s, p, lambda t, m: m["thresholds"].update(
        suspect=0, suspect_demote="5")), "suspect_demote threshold must be a number or null"),
    "suspect-in-format-4": (lambda s, p: _edited(s, p, lambda t, m: (_set(m, "format", "guard.profile/4"),
                                                                      _set(m["thresholds"], "suspect", 0))),
                            "only a format-5 profile or later may name a suspect"),
    "reference-in-format-5": (lambda s, p: _edited(s, p, lambda t, m: _set(m, "format", "guard.profile/5")),
                              "only a format-6 profile or later may carry a reference"),
    "reference-tensors-in-format-5": (lambda s, p: _edited(s, p, lambda t, m: (
        as_format_8(t, m), _set(m, "format", "guard.profile/5"), m["thresholds"].pop("overrule"))),
        "only a format-6 profile or later may carry a reference"),
    "warp-class-in-format-6": (lambda s, p: _edited(s, p, lambda t, m: (_as_format_6(t, m), _with_warp_class(t, m))),
                               "only a format-7 profile may name a warp class"),
    "warp-class-alone": (lambda s, p: _edited(s, p, lambda t, m: _with_warp_class(t, m, warp_overrule=None)),
                         "a warp class and its overrule threshold, at most the reference's, come together"),
    "warp-threshold-alone": (lambda s, p: _edited(s, p, lambda t, m: _with_warp_class(t, m, warp_class=None)),
                             "a warp class and its overrule threshold, at most the reference's, come together"),
    "warp-threshold-above-the-references": (lambda s, p: _edited(s, p, lambda t, m: _with_warp_class(
        t, m, warp_overrule=m["thresholds"]["overrule"] + 1)), "at most the reference's, come together"),
    "warp-threshold-negative": (lambda s, p: _edited(s, p, lambda t, m: _with_warp_class(t, m, warp_overrule=-1.0)),
                                "warp class's overrule threshold must be null or a number at least 0"),
    "warp-class-out-of-range": (lambda s, p: _edited(s, p, lambda t, m: _with_warp_class(t, m, warp_class=10)),
                                "warp class must be a class number below 10"),
    "warp-class-a-bool": (lambda s, p: _edited(s, p, lambda t, m: _with_warp_class(t, m, warp_class=True)),
                          "warp class must be a class number"),
    "warp-class-without-reference": (lambda s, p: _edited(s, p, lambda t, m: (_no_reference(t, m),
                                                                               _with_warp_class(t, m))),
                                     "a warp class's overrule threshold needs a reference"),
    "lean-in-format-7": (lambda s, p: _edited(s, p, lambda t, m: (_set(m, "format", "guard.profile/7"),
                                                                    _with_lean(t, m))),
                         "only a format-8 profile may score a warp's lean"),
    "lean-class-alone": (lambda s, p: _edited(s, p, lambda t, m: _with_lean(t, m, lean_centre=None, lean_spread=None)),
                         "the lean's part needs a finite centre and a positive spread"),
    "lean-scale-alone": (lambda s, p: _edited(s, p, lambda t, m: _with_lean(t, m, lean_class=None)),
                         "the lean's class must be a class number below 10"),
    "lean-zero-spread": (lambda s, p: _edited(s, p, lambda t, m: _with_lean(t, m, lean_spread=0.0)),
                         "positive spread"),
    "lean-nan-centre": (lambda s, p: _edited(s, p, lambda t, m: _with_lean(t, m, lean_centre=float("nan"))),
                        "finite centre"),
    "lean-spread-a-string": (lambda s, p: _edited(s, p, lambda t, m: _with_lean(t, m, lean_spread="0.1")),
                             "finite centre and a positive spread"),
    "lean-class-out-of-range": (lambda s, p: _edited(s, p, lambda t, m: _with_lean(t, m, lean_class=10)),
                                "the lean's class must be a class number below 10"),
    "lean-class-a-bool": (lambda s, p: _edited(s, p, lambda t, m: _with_lean(t, m, lean_class=False)),
                          "the lean's class must be a class number"),
    "lean-without-reference": (lambda s, p: _edited(s, p, lambda t, m: (_no_reference(t, m), _with_lean(t, m))),
                               "a warp's lean needs a reference"),
    "envelope-in-format-8": (lambda s, p: _edited(s, p, lambda t, m: _set(m, "format", "guard.profile/8")),
                             "only a format-9 profile may score the input envelope"),
    "envelope-bound-alone": (lambda s, p: _edited(s, p, lambda t, m: m["thresholds"].update(
        envelope_centre=None, envelope_spread=None, envelope_demote=None)),
                             "the input envelope's bound and its centre and spread come together"),
    "envelope-demote-without-envelope": (lambda s, p: _edited(s, p, lambda t, m: m["thresholds"].update(
        envelope_centre=None, envelope_spread=None)), "only a format-10 profile with an input envelope may demote"),
    "envelope-demote-in-format-9": (lambda s, p: _edited(s, p, lambda t, m: _set(m, "format", "guard.profile/9")),
                                    "only a format-10 profile with an input envelope may demote"),
    "envelope-demote-below-tau": (lambda s, p: _edited(s, p, lambda t, m: _set(
        m["thresholds"], "envelope_demote", m["thresholds"]["tau"] - 1)),
                                  "the input envelope's demote threshold must be null or a number at least tau"),
    "envelope-demote-a-string": (lambda s, p: _edited(s, p, lambda t, m: _set(m["thresholds"], "envelope_demote", "9")),
                                 "the envelope_demote threshold must be a number or null"),
    "envelope-scale-alone": (lambda s, p: _edited(s, p, lambda t, m: t.pop("input_bound")),
                             "the input envelope's bound and its centre and spread come together"),
    "envelope-zero-spread": (lambda s, p: _edited(s, p, lambda t, m: _set(m["thresholds"], "envelope_spread", 0.0)),
                             "input envelope's part needs a finite centre and a positive spread"),
    "envelope-centre-a-bool": (lambda s, p: _edited(s, p, lambda t, m: _set(m["thresholds"], "envelope_centre", True)),
                               "input envelope's part needs a finite centre"),
    "envelope-bound-nan": (lambda s, p: _edited(s, p, lambda t, m: t["input_bound"].__setitem__((0, 0, 0), np.nan)),
                           "the input envelope's bound must be finite with shape"),
    "envelope-bound-flat": (lambda s, p: _edited(s, p, lambda t, m: _set(t, "input_bound", t["input_bound"][0])),
                            "the input envelope's bound must be finite with shape"),
    "reference-weight-integer": (lambda s, p: _edited(s, p, lambda t, m: _set(t, "reference/fc2.bias",
                                                                              t["reference/fc2.bias"].astype(np.int32))),
                                 "must be named, floating-point and finite"),
    "reference-weight-inf": (lambda s, p: _edited(s, p, lambda t, m: _set(t, "reference/fc2.bias",
                                                                          t["reference/fc2.bias"] + np.inf)),
                             "must be named, floating-point and finite"),
    "reference-weights-alone": (lambda s, p: _edited(s, p, lambda t, m: _set(m["thresholds"], "overrule", None)),
                                "a reference's weights and its overrule threshold come together"),
    "overrule-threshold-alone": (lambda s, p: _edited(s, p, _without_reference_weights),
                                 "a reference's weights and its overrule threshold come together"),
    "overrule-negative": (lambda s, p: _edited(s, p, lambda t, m: _set(m["thresholds"], "overrule", -1.0)),
                          "overrule threshold must be null or a number at least 0"),
    "overrule-a-string": (lambda s, p: _edited(s, p, lambda t, m: _set(m["thresholds"], "overrule", "1")),
                          "overrule threshold must be a number or null"),
    "confirm-above-one": (lambda s, p: _edited(s, p, lambda t, m: _set(m["thresholds"], "confirm", 1.5)),
                          "confirming probability must be null or a number in \\[0.5, 1\\]"),
    "confirm-below-half": (lambda s, p: _edited(s, p, lambda t, m: _set(m["thresholds"], "confirm", 0.2)),
                           "confirming probability must be null or a number in \\[0.5, 1\\]"),
    "confirm-nan": (lambda s, p: _edited(s, p, lambda t, m: _set(m["thresholds"], "confirm", float("nan"))),
                    "confirming probability must be null or a number"),
    "confirm-a-bool": (lambda s, p: _edited(s, p, lambda t, m: _set(m["thresholds"], "confirm", True)),
                       "confirming probability must be null or a number"),
    "confirm-without-reference": (lambda s, p: _edited(s, p, lambda t, m: (
        _without_reference_weights(t, m), _set(m["thresholds"], "overrule", None))),
        "a confirming probability needs a reference"),
    "confirm-ceiling-below-tau": (lambda s, p: _edited(s, p, lambda t, m: _set(
        m["thresholds"], "confirm_ceiling", m["thresholds"]["tau"] - 1)),
        "confirmation's score ceiling must be null or a number at least tau"),
    "confirm-ceiling-nan": (lambda s, p: _edited(s, p, lambda t, m: _set(m["thresholds"], "confirm_ceiling",
                                                                         float("nan"))),
                            "confirmation's score ceiling must be null or a number at least tau"),
    "confirm-ceiling-alone": (lambda s, p: _edited(s, p, lambda t, m: _set(m["thresholds"], "confirm", None)),
                              "a confirming probability and its score ceiling come together"),
    "confirm-without-ceiling": (lambda s, p: _edited(s, p, lambda t, m: _set(m["thresholds"], "confirm_ceiling",
                                                                              None)),
                                "a confirming probability and its score ceiling come together"),
    "demote-a-bool": (lambda s, p: _edited(s, p, lambda t, m: _set(m["thresholds"], "demote", True)),
                      "demote threshold must be a number or null"),
    "suspect-threshold-alone": (lambda s, p: _edited(s, p, lambda t, m: _set(m["thresholds"], "suspect_demote",
                                                                              m["thresholds"]["tau"] + 1)),
                                "needs a suspect class"),
    "suspect-threshold-below-tau": (lambda s, p: _edited(s, p, lambda t, m: m["thresholds"].update(
        suspect=0, suspect_demote=m["thresholds"]["tau"] - 1)), "suspect's demote threshold must be null or a number"),
    "part-unknown-tap": (lambda s, p: _edited(s, p, lambda t, m: _set(m["thresholds"]["parts"][1], "taps", ["x"])),
                         "a score part must name distinct taps of the profile"),
    "part-no-taps": (lambda s, p: _edited(s, p, lambda t, m: _set(m["thresholds"]["parts"][0], "taps", [])),
                     "a score part must name distinct taps"),
    "no-taps": (lambda s, p: _edited(s, p, lambda t, m: _set(m, "taps", [])), "at least one tap, each named once"),
    "tap-named-twice": (lambda s, p: _edited(s, p, lambda t, m: _set(m["taps"][1], "name", m["taps"][0]["name"])),
                        "at least one tap, each named once"),
    "part-zero-spread": (lambda s, p: _edited(s, p, lambda t, m: _set(m["thresholds"]["parts"][0], "spread", 0)),
                         "positive spread"),
    "part-nan-centre": (lambda s, p: _edited(s, p, lambda t, m: _set(m["thresholds"]["parts"][1], "centre",
                                                                      float("nan"))), "finite centre"),
    "demote-key-lost": (lambda s, p: _edited(s, p, lambda t, m: m["thresholds"].pop("demote")),
                        r"thresholds of a format-10 profile lack key\(s\) \['demote'\]"),
    "parts-key-lost": (lambda s, p: _edited(s, p, lambda t, m: m["thresholds"].pop("parts")),
                       r"lack key\(s\) \['parts'\]"),
    "parts-empty": (lambda s, p: _edited(s, p, lambda t, m: _set(m["thresholds"], "parts", [])),
                    "scores at least one part; its thresholds have none"),
    "threshold-misspelt": (lambda s, p: _edited(s, p, lambda t, m: m["thresholds"].update(
        demtoe=m["thresholds"].pop("envelope_demote"))),
                           r"have unknown key\(s\) \['demtoe'\]; lack key\(s\) \['envelope_demote'\]"),
    "thresholds-not-an-object": (lambda s, p: _edited(s, p, lambda t, m: _set(m, "thresholds", [1])),
                                 "the thresholds must be a JSON object, got list"),
    "parts-not-a-list": (lambda s, p: _edited(s, p, lambda t, m: _set(m["thresholds"], "parts", "all")),
                         "malformed"),
    "part-unknown-kind": (lambda s, p: _edited(s, p, lambda t, m: _set(m["thresholds"]["parts"][1], "kind", "max")),
                          "kind must be one of"),
    "part-demotes-a-string": (lambda s, p: _edited(s, p, lambda t, m: _set(m["thresholds"]["parts"][1], "demotes",
                                                                            "no")), "demotes must be true or false"),
    "no-part-demotes": (lambda s, p: _edited(s, p, lambda t, m: [part.update(demotes=False)
                                                                  for part in m["thresholds"]["parts"]]),
                        "at least one score part must demote"),
    "distance-missing-whiten": (lambda s, p: _edited(s, p, lambda t, m: t.pop("parts.2.whiten")),
                                "distance part 2 has no whiten tensor"),
    "distance-mean-shape": (lambda s, p: _edited(s, p, lambda t, m: _set(t, "parts.2.class_mean",
                                                                         t["parts.2.class_mean"][:, 1:])),
                            "class_mean must be finite with shape"),
    "distance-whiten-nan": (lambda s, p: _edited(s, p, lambda t, m: t["parts.2.whiten"].__setitem__((0, 0), np.nan)),
                            "whiten must be finite"),
    "distance-on-a-top-q-part": (lambda s, p: _edited(s, p, lambda t, m: _set(m["thresholds"]["parts"][0], "kind",
                                                                               "distance")),
                                 "distance part 0 has no class_mean tensor"),
    "an-fp8-tensor": (lambda s, p: _with_raw_tensor(s, p, "F8_E4M3"),
                      r"holds tensors of a type a guard profile never has: \{'extra': 'F8_E4M3'\}"),
    "a-bf16-tensor": (lambda s, p: _with_raw_tensor(s, p, "BF16"), "'extra': 'BF16'"),
    # integers pass the finite and shape checks, and were served: every request flagged, or the envelope off
    "integer-class-mean": (lambda s, p: _edited(s, p, lambda t, m: _set(t, "class_mean",
                                                                        t["class_mean"].astype(np.int64))),
                           "class_mean must be floating-point, got int64"),
    "u8-input-bound": (lambda s, p: _edited(s, p, lambda t, m: _set(t, "input_bound",
                                                                    t["input_bound"].astype(np.uint8))),
                       "input_bound must be floating-point"),
    "benign-of-twos": (lambda s, p: _edited(s, p, lambda t, m: _set(t, "taps.0.benign", 2 * t["taps.0.benign"])),
                       r"taps.0.benign must be a set of channels"),
    "an-unknown-tensor": (lambda s, p: _edited(s, p, lambda t, m: _set(t, "padding", np.zeros(4, np.float32))),
                          r"tensors a profile does not have: \['padding'\]"),
}


def _with_raw_tensor(setup: Setup, path: Path, dtype: str) -> Path:
    """The profile with one more 4-byte tensor of a safetensors type numpy lacks, written at the byte level."""
    data = setup.profile_path.read_bytes()
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + size])
    end = max(entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__")
    header["extra"] = {"dtype": dtype, "shape": [4 // (1 if dtype.startswith("F8") else 2)],
                       "data_offsets": [end, end + 4]}
    encoded = json.dumps(header).encode()
    path.write_bytes(len(encoded).to_bytes(8, "little") + encoded + data[8 + size:8 + size + end] + bytes(4))
    return path


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_malformed_profile_is_refused_with_a_clear_profile_error(setup: Setup, tmp_path: Path, kind: str) -> None:
    make, message = CORRUPTIONS[kind]
    path = make(setup, tmp_path / f"{kind}.safetensors")
    with pytest.raises(ProfileError, match=message) as info:  # any other exception type fails the test
        Profile.load(path)
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_profile_file_is_a_profile_error(setup: Setup, tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match="profile not found"):
        Guard.load(setup.model_path, tmp_path / "nowhere.safetensors")
    with pytest.raises(ProfileError, match="is not a regular file"):  # it exists: "not found" would mislead
        Guard.load(setup.model_path, tmp_path)


@pytest.mark.parametrize("meta", ["[1, 2]", "null"])
def test_guard_metadata_that_is_not_an_object_is_a_profile_error(setup: Setup, tmp_path: Path, meta: str) -> None:
    path = write_parts(tmp_path / "list.safetensors", raw_parts(setup.profile_path)[0], meta)
    with pytest.raises(ProfileError, match="malformed"):
        Profile.load(path)


def test_profile_naming_a_tap_the_model_lacks_is_refused_naming_the_tap(setup: Setup, tmp_path: Path) -> None:
    forged = Profile.load(setup.profile_path)
    old_name, forged.taps[0].name = forged.taps[0].name, "no_such_tensor"
    for part in forged.thresholds.parts:  # a consistent profile: its score parts name the renamed tap too
        part.taps = ["no_such_tensor" if name == old_name else name for name in part.taps]
    forged.model_sha256 = hashlib.sha256(setup.model_path.read_bytes()).hexdigest()  # the sha256 check passes
    forged.save(tmp_path / "forged.safetensors")
    with pytest.raises(ProfileError, match="no_such_tensor"):
        Guard.load(setup.model_path, tmp_path / "forged.safetensors")


def test_profile_whose_tap_has_more_channels_than_the_model_is_refused(setup: Setup, tmp_path: Path) -> None:
    tensors, meta = raw_parts(setup.profile_path)
    for key in [k for k in tensors if k.startswith("taps.0.")]:
        _pad_channel(tensors, key)
    tensors["taps.0.keep"][-1] = 0  # the extra channel is pruned
    for key in ("class_mean", "class_scale"):
        tensors[key] = np.concatenate([tensors[key][:, :1], tensors[key]], axis=1)
    path = write_parts(tmp_path / "wide.safetensors", tensors, meta)
    profile = Profile.load(path)  # consistent in itself, with the model's sha256
    with pytest.raises(ProfileError, match="channels"):
        Guard(load_model(setup.model_path), profile)


def test_profile_whose_unit_bound_has_other_spatial_dims_than_the_model_is_refused(setup: Setup,
                                                                                   tmp_path: Path) -> None:
    """A bound of the right channels but the wrong height is consistent in itself; it is this model's profile that it
    does not fit, said before the engine is built rather than as a failed warm-up run."""
    tensors, meta = raw_parts(setup.profile_path)
    bound = tensors["taps.0.unit_bound"]
    tensors["taps.0.unit_bound"] = np.concatenate([bound, bound[:, :1]], axis=1)  # one row more
    profile = Profile.load(write_parts(tmp_path / "taller.safetensors", tensors, meta))
    with pytest.raises(ProfileError, match=r"unit bound of shape .* the model's tensor there is"):
        Guard(load_model(setup.model_path), profile)


def test_profile_whose_static_mask_folds_otherwise_in_the_model_is_refused(setup: Setup, tmp_path: Path) -> None:
    """The fold decides which channels the served graph reports; a profile that assumes another is not this model's."""
    tensors, meta = raw_parts(setup.profile_path)
    assert meta["taps"][0]["fold"] in ("consumer", "producer", "mul")
    meta["taps"][0]["fold"] = "mul" if meta["taps"][0]["fold"] != "mul" else "consumer"
    profile = Profile.load(write_parts(tmp_path / "refolded.safetensors", tensors, meta))  # valid in itself
    with pytest.raises(ProfileError, match="folds differently into this model"):
        Guard(load_model(setup.model_path), profile)


# ---------------------------------------------------------------------------------------------- the CLI


def assert_one_line_error(done: subprocess.CompletedProcess, fragment: str) -> None:
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("guard: error: ")
    assert fragment in lines[0]


def test_cli_calibrate_writes_a_profile_that_inspect_and_guard_read(backdoored: Backdoored, scanned: Scanned,
                                                                    scan_once: list[ScanSettings], tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    np.savez("clean.npz", x=backdoored.x_clean, y=backdoored.y_clean)
    code = main(["calibrate", str(backdoored.model_path), "--data", "clean.npz", "--out", "p.safetensors", "--quiet"])
    stdout = capsys.readouterr().out
    assert code == 0 and "p.safetensors" in stdout
    assert scan_once == [ScanSettings()]  # calibrate ran the scan `guard scan` runs (the suite's one, reused here)
    profile = Profile.load(tmp_path / "p.safetensors")
    library = Profile.load(backdoored.profile_path)  # the library's calibrate, defaults, no scan
    assert profile.model_sha256 == library.model_sha256
    assert profile.tap_names == library.tap_names
    # the CLI runs guard scan first, takes its suspect (the BadNets target) and says what its reference unlearned
    candidates, warps, blends = (profile.figures[f"reference_unlearned{kind}"] for kind in ("", "_warps", "_blends"))
    assert candidates[0] == TARGET
    unlearned = " and ".join([f"the triggers of classes {candidates}", *(f"the warp of class {k}" for k in warps),
                              *(f"the blend of class {k}" for k in blends)])
    assert f"guard: scan suspects class {TARGET}; candidates: {unlearned}" in stdout
    assert f"unlearned {unlearned}" in stdout
    # ... and otherwise the library's defaults
    assert profile.settings == {**library.settings, "suspect": TARGET}
    assert profile.thresholds.suspect == TARGET
    np.testing.assert_allclose(profile.class_mean, library.class_mean, rtol=1e-4, atol=1e-5)
    Guard.load(backdoored.model_path, tmp_path / "p.safetensors").predict(backdoored.x_eval[:8])

    shown = run_cli("inspect", "p.safetensors", cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    summary = json.loads(shown.stdout)
    assert summary["model_sha256"] == library.model_sha256
    assert [t["name"] for t in summary["taps"]] == library.tap_names
    assert summary["thresholds"]["tau"] == profile.thresholds.tau
    assert summary["thresholds"]["overrule"] == profile.thresholds.overrule
    assert summary["reference"] == {"tensors": len(profile.reference), "names": sorted(profile.reference),
                                    "values": sum(v.size for v in profile.reference.values())}
    assert summary["reference"]["tensors"] > 0
    assert (summary["num_classes"], summary["input_name"], summary["output_name"]) == (10, "input", "logits")
    assert summary["input_envelope"] == (profile.input_bound is not None) and "model" not in summary
    # --model says whether a model is the profile's, and a model that is not fails the command
    shown = run_cli("inspect", "p.safetensors", "--model", backdoored.model_path, cwd=tmp_path)
    assert shown.returncode == 0 and json.loads(shown.stdout)["model"]["matches"] is True
    assert json.loads(shown.stdout)["model"]["serves"] is True
    # ... and whether guard serve would serve the two: a profile edited but for its sha256 matched, exit 0
    edited = Profile.load(tmp_path / "p.safetensors")
    first, *rest = edited.reference
    edited.reference = {"no_such_weight": edited.reference[first], **{name: edited.reference[name] for name in rest}}
    edited.save(tmp_path / "edited.safetensors")
    shown = run_cli("inspect", "edited.safetensors", "--model", backdoored.model_path, cwd=tmp_path)
    assert shown.returncode == 2 and json.loads(shown.stdout)["model"]["matches"] is True
    assert json.loads(shown.stdout)["model"]["serves"] is False
    assert "no_such_weight" in json.loads(shown.stdout)["model"]["refused"] and "no_such_weight" in shown.stderr
    other = tmp_path / "other.onnx"
    changed = onnx.load(backdoored.model_path)
    changed.doc_string = "another file of the same graph"
    onnx.save(changed, other)
    shown = run_cli("inspect", "p.safetensors", "--model", other, cwd=tmp_path)
    assert shown.returncode == 2 and json.loads(shown.stdout)["model"]["matches"] is False
    assert "calibrated for a different model" in shown.stderr
    # the calibration's printout says what the reference does, and what it won on the held-out samples
    assert "reference overrules" in stdout
    assert f"{profile.figures['reference_overrule_net']:+d} right answers on them" in stdout
    assert profile.figures["reference_overrule_net"] >= 0

    # guard scan's folder, given back with --scan-dir, gives the profile calibrate's own scan gave, without scanning
    code = main(["calibrate", str(backdoored.model_path), "--data", str(scanned.data), "--out", "q.safetensors",
                 "--quiet", "--scan-dir", str(scanned.out)])  # in this process as the first: the same torch threads
    again = capsys.readouterr().out
    assert code == 0 and scan_once == [ScanSettings()]  # read, not scanned
    assert f"guard: the scan in {scanned.out} suspects class {TARGET}; candidates: {unlearned}" in again
    reused = Profile.load(tmp_path / "q.safetensors")
    assert reused.settings == profile.settings and reused.thresholds == profile.thresholds
    assert {k: v for k, v in reused.figures.items() if "seconds" not in k} == {
        k: v for k, v in profile.figures.items() if "seconds" not in k}
    assert reused.reference.keys() == profile.reference.keys()
    for name, weights in profile.reference.items():
        np.testing.assert_array_equal(reused.reference[name], weights)


def test_cli_calibrate_with_a_named_suspect_skips_the_scan(setup: Setup, tmp_path: Path) -> None:
    np.savez(tmp_path / "clean.npz", x=setup.x_cal, y=setup.y_cal)
    done = run_cli("calibrate", setup.model_path, "--data", "clean.npz", "--out", "p.safetensors", "--quiet",
                   "--suspect", "3", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "scan suspects" not in done.stdout and "guard.scan" not in done.stderr
    assert "class 3's answers demoted at rate" in done.stdout
    profile = Profile.load(tmp_path / "p.safetensors")
    assert profile.thresholds.suspect == 3 and profile.settings["suspect"] == 3
    assert profile.figures["reference_unlearned"] == []  # no scan, no triggers to unlearn
    assert profile.thresholds.suspect_demote >= profile.thresholds.tau
    both = run_cli("calibrate", setup.model_path, "--data", "clean.npz", "--out", "q.safetensors", "--quiet",
                   "--suspect", "3", "--scan", cwd=tmp_path)
    assert both.returncode == 2 and "not allowed with argument" in both.stderr


def test_cli_calibrate_taps_as_many_conv_activations_as_asked(setup: Setup, tmp_path: Path) -> None:
    from guard.model.graph import default_taps, load_model

    model = load_model(setup.model_path)
    assert setup.profile.tap_names == default_taps(model, conv_taps=CalibrationSettings().conv_taps, first_conv=True)
    np.savez(tmp_path / "clean.npz", x=setup.x_cal, y=setup.y_cal)
    done = run_cli("calibrate", setup.model_path, "--data", "clean.npz", "--out", "p.safetensors", "--quiet",
                   "--suspect", "3", "--no-reference", "--conv-taps", "1", "--no-first-conv-part",
                   "--no-input-envelope", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    profile = Profile.load(tmp_path / "p.safetensors")
    assert profile.tap_names == default_taps(model, conv_taps=1) == setup.profile.tap_names[-2:]
    assert profile.settings["conv_taps"] == 1
    assert profile.settings["input_envelope"] is False and profile.envelope() is None
    assert profile.figures["calibration_envelope_flag_rate"] is None
    assert raw_parts(tmp_path / "p.safetensors")[1]["thresholds"]["envelope_centre"] is None


def test_cli_serve_with_a_corrupt_profile_fails_in_one_line(setup: Setup, tmp_path: Path) -> None:
    _truncated(setup, tmp_path / "corrupt.safetensors", 0.5)
    done = run_cli("serve", setup.model_path, "--profile", "corrupt.safetensors", "--port", "0", "--metrics-port",
                   "0", cwd=tmp_path)
    assert_one_line_error(done, "not a readable profile")


def test_cli_serve_with_a_corrupt_model_fails_in_one_line(setup: Setup, tmp_path: Path) -> None:
    data = Path(setup.model_path).read_bytes()
    (tmp_path / "corrupt.onnx").write_bytes(data[: len(data) // 3])
    done = run_cli("serve", "corrupt.onnx", "--profile", setup.profile_path, "--port", "0", "--metrics-port", "0",
                   cwd=tmp_path)
    assert_one_line_error(done, "cannot read ONNX model")


def test_cli_serve_with_another_models_profile_fails_in_one_line(setup: Setup, tmp_path: Path) -> None:
    done = run_cli("serve", setup.other_path, "--profile", setup.profile_path, "--port", "0", "--metrics-port", "0",
                   cwd=tmp_path)
    assert_one_line_error(done, "different model")


def test_cli_calibrate_with_a_missing_data_file_fails_in_one_line(setup: Setup, tmp_path: Path) -> None:
    done = run_cli("calibrate", setup.model_path, "--data", "missing.npz", "--out", "p.safetensors", "--quiet",
                   cwd=tmp_path)
    assert_one_line_error(done, "missing.npz")
    assert not (tmp_path / "p.safetensors").exists()


@pytest.mark.parametrize(("option", "value"), [("--fpr-confidence", "1"), ("--demote-rate", "-0.1"),
                                               ("--suspect", "10"), ("--reference-rate", "1"),
                                               ("--reference-folds", "0"), ("--conv-taps", "-1")])
def test_cli_calibrate_with_an_impossible_setting_fails_in_one_line(setup: Setup, tmp_path: Path, option: str,
                                                                   value: str) -> None:
    np.savez(tmp_path / "clean.npz", x=setup.x_cal[:40], y=setup.y_cal[:40])
    done = run_cli("calibrate", setup.model_path, "--data", "clean.npz", "--out", "p.safetensors", "--quiet",
                   option, value, cwd=tmp_path)
    assert_one_line_error(done, option)
    assert not (tmp_path / "p.safetensors").exists()


def test_settings_that_would_calibrate_nonsense_are_refused_and_numpy_numbers_are_plain() -> None:
    """A NaN k_min gave k = NaN (no channel ever compromised); the others failed deep inside with a traceback, or
    (a numpy number) when the finished profile's metadata was written."""
    for fields, fragment in (({"k_min": math.nan}, "k_min"), ({"k_quantile": 2.0}, "quantile"),
                             ({"top_q": 0}, "top_q"), ({"batch_size": 0}, "batch_size"), ({"seed": -1}, "--seed"),
                             ({"seed": 1.5}, "--seed"), ({"extra": {"when": object()}}, "extra"),
                             ({"extra": {"lock": threading.Lock()}}, "extra"),  # not even copied on the way
                             ({"layers": ["relu", ""]}, "empty tensor name")):
        with pytest.raises(GuardError, match=fragment):
            CalibrationSettings(**fields).validate()
    settings = CalibrationSettings(fpr=np.float32(0.05), seed=np.int64(3), top_q=np.int32(2))
    settings.validate()
    assert (type(settings.fpr), type(settings.seed), type(settings.top_q)) == (float, int, int)
    assert json.loads(json.dumps(dataclasses.asdict(settings)))["seed"] == 3


def test_a_profile_in_memory_with_nan_thresholds_is_not_served(setup: Setup) -> None:
    """The loader refuses NaN; a profile never saved (calibrate's own, or a caller's) is checked as Guard takes it."""
    loaded, profile = load_model(setup.model_path), setup.profile
    assert Guard(loaded, profile).predict(setup.x_cal[:2]).labels.shape == (2,)
    for changes in ({"tau": math.nan}, {"k": math.nan}, {"parts": [dataclasses.replace(profile.thresholds.parts[0],
                                                                                        spread=math.nan)]}):
        odd = dataclasses.replace(profile, thresholds=dataclasses.replace(profile.thresholds, **changes))
        with pytest.raises(ProfileError, match="hold NaN"):
            Guard(loaded, odd)
    with pytest.raises(ProfileError, match="hold NaN"):
        Guard(loaded, dataclasses.replace(profile, class_mean=profile.class_mean * math.nan))


def test_profile_without_a_demote_threshold_loads_with_demotion_off(setup: Setup, tmp_path: Path) -> None:
    """Profiles written before demotion existed (format 2, no parts) and those calibrated with --demote-rate 0 never
    demote; a later format that lost the key is refused (table above)."""
    assert np.isfinite(setup.profile.thresholds.demote)
    assert setup.profile.thresholds.demote >= setup.profile.thresholds.tau
    older = Profile.load(_edited(setup, tmp_path / "older.safetensors",
                                 lambda t, m: (_as_format_2(t, m), m["thresholds"].pop("demote"))))
    assert older.thresholds.demote == float("inf")
    assert older.thresholds.tau == setup.profile.thresholds.tau
    off = calibrate(setup.model_path, setup.x_cal, setup.y_cal,
                    settings=CalibrationSettings(demote_rate=0, reference=False))  # the reference: not the point
    assert off.thresholds.demote == float("inf") and off.figures["calibration_demote_rate"] == 0
    assert raw_parts(off.save(tmp_path / "off.safetensors"))[1]["thresholds"]["demote"] is None
    assert Profile.load(tmp_path / "off.safetensors").thresholds.demote == float("inf")
    shown = run_cli("inspect", "off.safetensors", cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr

    def refuse(constant: str) -> None:
        raise AssertionError(f"guard inspect printed {constant}, which is not JSON")

    assert json.loads(shown.stdout, parse_constant=refuse)["thresholds"]["demote"] is None
    # a profile written elsewhere may hold NaN among its figures: shown as null too, not as NaN
    _edited(setup, tmp_path / "nan.safetensors",
            lambda t, m: _set(m["figures"], "holdout_accuracy_unguarded", float("nan")))
    shown = run_cli("inspect", "nan.safetensors", cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout, parse_constant=refuse)["figures"]["holdout_accuracy_unguarded"] is None


def test_score_parts_cover_all_taps_and_the_dense_ones_and_older_profiles_score_as_before(
        setup: Setup, tmp_path: Path) -> None:
    """Calibration scores the top-q z over all taps, the first conv tap's (test_the_first_conv_part_...) and the
    distance of the penultimate features; a format-3 profile (a top-q dense part) and a format-2 profile (no parts:
    the raw top-q over all taps) score as they were calibrated, which is what their tau means."""
    parts = setup.profile.thresholds.parts
    dense = [tap.name for tap in setup.profile.taps if tap.kind == "dense"]
    assert [p.taps for p in parts] == [setup.profile.tap_names, setup.profile.tap_names[:1], dense]
    assert 0 < len(dense) < len(setup.profile.taps)
    assert [p.kind for p in parts] == ["top_q", "top_q", "distance"] and all(p.spread > 0 for p in parts)
    width = sum(t.channels for t in setup.profile.taps if t.kind == "dense")
    assert parts[2].class_mean.shape == (setup.profile.num_classes, width) and parts[2].whiten.shape == (width, width)
    np.savez(tmp_path / "clean.npz", x=setup.x_cal, y=setup.y_cal)
    done = run_cli("calibrate", setup.model_path, "--data", "clean.npz", "--out", "single.safetensors", "--quiet",
                   "--no-dense-part", "--no-first-conv-part", "--no-scan", "--no-reference", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    single = Profile.load(tmp_path / "single.safetensors")
    assert [p.taps for p in single.thresholds.parts] == [single.tap_names]
    assert single.settings["dense_part"] is False and single.settings["first_conv_part"] is False

    done = run_cli("calibrate", setup.model_path, "--data", "clean.npz", "--out", "top_q.safetensors", "--quiet",
                   "--dense-score", "top_q", "--no-first-conv-part", "--no-scan", "--no-reference", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    top_q = Profile.load(tmp_path / "top_q.safetensors")
    assert [p.kind for p in top_q.thresholds.parts] == ["top_q", "top_q"] and top_q.settings["dense_score"] == "top_q"
    tensors, meta = raw_parts(tmp_path / "top_q.safetensors")
    _without_reference(tensors, meta)
    meta["format"] = "guard.profile/3"
    for part in meta["thresholds"]["parts"]:
        assert part.pop("kind") == "top_q" and part.pop("demotes") is True  # format 3 had neither
    format_3 = Profile.load(write_parts(tmp_path / "format3.safetensors", tensors, meta))
    assert format_3.thresholds.parts == top_q.thresholds.parts and len(format_3.check().score_parts()) == 2
    older = Profile.load(_edited(setup, tmp_path / "format2.safetensors", _as_format_2))
    assert older.thresholds.parts == [] and len(older.check().score_parts()) == 1
    x = np.concatenate([setup.x_eval, BadNets(size=4).apply(setup.x_eval[:50])])
    taps = OnnxTaps(load_model(setup.model_path), setup.profile.tap_names)
    served = collect(taps, x, masks=[t.keep.astype(np.float32)[None] for t in setup.profile.taps])
    labels = served.logits.argmax(axis=1)
    flat = np.concatenate(served.linf, axis=1)
    scores = {}
    for name, profile in (("raw", older), ("top_q", format_3), ("distance", without_envelope(setup.profile))):
        scores[name] = Guard(load_model(setup.model_path), profile).predict(x).score
        np.testing.assert_allclose(scores[name], profile.check()(served.linf, labels).score, atol=1e-4)
    z = older.check().z_scores(flat, labels)
    np.testing.assert_allclose(scores["raw"], np.sort(z, axis=1)[:, -older.thresholds.top_q:].mean(axis=1), atol=1e-4)
    dense_z = format_3.check().z_scores(flat, labels)[:, -width:]
    every, last = format_3.thresholds.parts
    np.testing.assert_allclose(scores["top_q"], np.maximum(
        (np.sort(z, axis=1)[:, -3:].mean(axis=1) - every.centre) / every.spread,
        (np.sort(dense_z, axis=1)[:, -3:].mean(axis=1) - last.centre) / last.spread), atol=1e-4)
    centred = flat[:, -width:] - parts[2].class_mean[labels]
    distance = np.sqrt(np.einsum("nd,nd->n", centred @ parts[2].whiten, centred @ parts[2].whiten))
    assert np.all(scores["distance"] >= (distance - parts[2].centre) / parts[2].spread - 1e-4)
    assert not np.allclose(scores["raw"], scores["top_q"], atol=1e-2), "the parts must change the score"
    assert not np.allclose(scores["top_q"], scores["distance"], atol=1e-2), "the distance must change the score"


def test_the_first_conv_part_scores_the_first_tap_on_its_own(setup: Setup, tmp_path: Path) -> None:
    """By default (`--first-conv-part`) the score has a top-q part over the first conv tap alone, standardised like
    the others, between the part over all taps and the dense distance; the guard scores the maximum of the three, and
    a small patch lifts the new part above its clean values. The part only flags: the guard demotes on the other two,
    whose score the demote threshold bounds on the calibration set, and the profile keeps which parts demote."""
    assert setup.profile.settings["first_conv_part"] is True and len(setup.profile.thresholds.parts) == 3
    np.savez(tmp_path / "clean.npz", x=setup.x_cal, y=setup.y_cal)
    done = run_cli("calibrate", setup.model_path, "--data", "clean.npz", "--out", "first.safetensors", "--quiet",
                   "--no-scan", "--no-reference", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    profile = Profile.load(tmp_path / "first.safetensors")
    first, parts = profile.taps[0], profile.thresholds.parts
    dense = [tap.name for tap in profile.taps if tap.kind == "dense"]
    assert first.kind == "conv" and profile.settings["first_conv_part"] is True
    assert [p.taps for p in parts] == [profile.tap_names, [first.name], dense]
    assert [p.kind for p in parts] == ["top_q", "top_q", "distance"] and parts[1].spread > 0
    assert [p.demotes for p in parts] == [True, False, True]
    assert raw_parts(tmp_path / "first.safetensors")[1]["thresholds"]["parts"][1]["demotes"] is False
    profile = without_envelope(profile)  # the check's parts alone (the envelope: test_the_input_envelope_...)
    x = np.concatenate([setup.x_eval, BadNets(size=3).apply(setup.x_eval[:50])])
    served = collect(OnnxTaps(load_model(setup.model_path), profile.tap_names), x,
                     masks=[t.keep.astype(np.float32)[None] for t in profile.taps])
    labels = served.logits.argmax(axis=1)
    z = profile.check().z_scores(np.concatenate(served.linf, axis=1), labels)[:, :first.channels]
    own = (np.sort(z, axis=1)[:, -profile.thresholds.top_q:].mean(axis=1) - parts[1].centre) / parts[1].spread
    result, want = Guard(load_model(setup.model_path), profile).predict(x), profile.check()(served.linf, labels)
    score = result.score
    np.testing.assert_allclose(score, want.score, atol=1e-4)
    assert np.all(score >= own - 1e-4) and np.isclose(score, own, atol=1e-4).any(), "the part must set some scores"
    clean, patched = own[:len(setup.x_eval)], own[len(setup.x_eval):]
    assert patched.mean() > clean.mean() + 0.5
    # The part only flags: shifted above every other part, it flags every request and demotes none that the other
    # parts would not; shifted and demoting, it demotes more.
    demote = profile.thresholds.demote
    assert np.all(want.demote_score <= want.score + 1e-6)
    assert not result.demoted[want.demote_score < demote - 1e-3].any()
    shifted = copy.deepcopy(profile)
    shifted.thresholds.parts[1].centre -= 10 * parts[1].spread
    flagging = Guard(load_model(setup.model_path), shifted).predict(x)
    assert flagging.flagged.all() and not flagging.demoted[want.demote_score < demote - 1e-3].any()
    shifted.thresholds.parts[1].demotes = True
    assert Guard(load_model(setup.model_path), shifted).predict(x).demoted.sum() > flagging.demoted.sum()


def test_the_input_envelope_flags_requests_outside_the_clean_inputs(setup: Setup) -> None:
    """By default the profile keeps each input element's largest clean value, and the request's excess over it is a
    part of the score: the guard's score is the larger of the check's and the envelope's, and a request flagged by
    the envelope alone is re-predicted as one the check flags (with its demotion off: the next test). Without it the
    score is the check's; a profile whose bound does not fit the model's input is refused."""
    profile = _flags_only(setup.profile)
    thresholds = profile.thresholds
    envelope = profile.envelope()
    assert profile.settings["input_envelope"] is True and envelope is not None and envelope.spread > 0
    np.testing.assert_array_equal(profile.input_bound, setup.x_cal.max(axis=0))
    assert 0 <= profile.figures["calibration_envelope_flag_rate"] <= profile.figures["calibration_flag_rate"]
    stamped = setup.x_eval[:60].copy()
    stamped[:, :, :2, :2] = 1.0  # the top-left corner, dark in every clean image
    x = np.concatenate([setup.x_eval, stamped])
    served = collect(OnnxTaps(load_model(setup.model_path), profile.tap_names), x,
                     masks=[t.keep.astype(np.float32)[None] for t in profile.taps])
    check = profile.check()(served.linf, served.logits.argmax(axis=1))
    outside = envelope.standardised(x)
    guard = Guard(load_model(setup.model_path), profile)
    result = guard.predict(x)
    np.testing.assert_allclose(result.score, np.maximum(check.score, outside), atol=1e-4)
    alone = (outside > thresholds.tau) & (check.score <= thresholds.tau) & ~result.overruled
    assert alone[len(setup.x_eval):].sum() >= 10 and result.flagged[alone].all()
    assert not result.demoted[alone].any()
    run, rows = guard.engine.run(x), np.flatnonzero(alone)
    tail = guard.engine.repredict(run, rows)  # what a flagged request answers with: the tail's logits
    np.testing.assert_allclose(result.logits[rows], tail, atol=1e-5)
    assert not np.allclose(tail, run.logits[rows], atol=1e-3), "the stamp must change what the tail answers"
    plain = Guard(load_model(setup.model_path), without_envelope(profile)).predict(x)
    np.testing.assert_allclose(plain.score, check.score, atol=1e-4)
    wrong = dataclasses.replace(profile, input_bound=profile.input_bound[:, :-1])
    with pytest.raises(ProfileError, match="input envelope has shape"):
        Guard(load_model(setup.model_path), wrong)


def _flags_only(profile: Profile) -> Profile:
    """The same profile with the envelope's demotion off."""
    return dataclasses.replace(profile, thresholds=dataclasses.replace(profile.thresholds, envelope_demote=math.inf))


def test_far_outside_the_envelope_an_answer_the_tail_kept_is_demoted(setup: Setup, tmp_path: Path) -> None:
    """Past the envelope part's own demote threshold (the clean samples' but for `envelope_demote_rate`, never below
    τ), a request whose re-prediction kept the model's answer is demoted where cutting narrowed that answer's margin,
    as the check's demotions are; below it the guard answers as with the demotion off, and so does a profile
    calibrated with rate 0. The reference's confirmation spares such a demotion as it spares the check's."""
    profile, thresholds = setup.profile, setup.profile.thresholds
    assert thresholds.tau <= thresholds.envelope_demote < math.inf
    assert 0 <= profile.figures["calibration_envelope_demote_rate"] <= profile.figures["calibration_envelope_flag_rate"]
    stamped = setup.x_eval[:100].copy()
    stamped[:, :, :3, :3] = 1.0  # the top-left corner, dark in every clean image
    x = np.concatenate([setup.x_eval, stamped])
    far = profile.envelope().standardised(x) > thresholds.envelope_demote
    assert far[len(setup.x_eval):].all()
    model = load_model(setup.model_path)
    bare = profile.without_reference()
    guard = Guard(model, bare)
    on, off = guard.predict(x), Guard(model, _flags_only(bare)).predict(x)
    run, rows = guard.engine.run(x), np.flatnonzero(far)
    tail = guard.engine.repredict(run, rows)
    kept = tail.argmax(axis=1) == on.model_labels[rows]
    narrowed = margin(tail, on.model_labels[rows]) < margin(run.logits[rows], on.model_labels[rows])
    np.testing.assert_array_equal(on.demoted[rows], off.demoted[rows] | (kept & narrowed))
    assert (on.demoted & ~off.demoted).sum() >= 5, "the stamp must demote some answers the tail kept"
    assert (on.labels != on.model_labels)[on.demoted].all()
    np.testing.assert_array_equal(on.labels[~far], off.labels[~far])
    np.testing.assert_array_equal(on.demoted, off.demoted | far & on.demoted)
    # with the reference, a demotion it firmly confirms is spared, the envelope's like the check's
    referred = Guard(model, profile).predict(x)
    assert not (referred.demoted & referred.spared).any()
    np.testing.assert_array_equal(referred.demoted | referred.spared, on.demoted)
    # calibrated with rate 0, the profile has no envelope demotion
    never = calibrate(setup.model_path, setup.x_cal, setup.y_cal, settings=CalibrationSettings(envelope_demote_rate=0))
    assert never.thresholds.envelope_demote == math.inf and never.figures["calibration_envelope_demote_rate"] == 0
    assert raw_parts(never.save(tmp_path / "never.safetensors"))[1]["thresholds"]["envelope_demote"] is None
    with pytest.raises(GuardError, match="--envelope-demote-rate must lie in"):
        CalibrationSettings(envelope_demote_rate=1.0).validate()


def test_a_suspect_gets_its_own_demote_threshold_on_its_clean_answers(setup: Setup, tmp_path: Path) -> None:
    """Named as the likely backdoor target, a class's answers are demoted from a threshold that passes at most
    `suspect_rate` of its clean answers (bounded like the FPR), never below τ; the rest of the profile is the same.
    The profile keeps it, and a format-4 profile (before suspects) loads with none."""
    # the class the masked model answers most often, and a rate that 300 samples can bound below the general one
    suspect = int(np.bincount(_served(setup, setup.x_cal)[1], minlength=10).argmax())
    named = calibrate(setup.model_path, setup.x_cal, setup.y_cal,
                      settings=CalibrationSettings(suspect=suspect, suspect_rate=0.2))
    plain, thresholds = setup.profile.thresholds, named.thresholds
    assert (thresholds.suspect, plain.suspect) == (suspect, None) and plain.suspect_demote == float("inf")
    assert (thresholds.k, thresholds.tau, thresholds.demote) == (plain.k, plain.tau, plain.demote)
    assert plain.tau <= thresholds.suspect_demote < plain.demote
    assert 0 <= named.figures["calibration_suspect_demote_rate"] <= named.settings["suspect_rate"]
    assert setup.profile.figures["calibration_suspect_demote_rate"] is None
    loaded = Profile.load(named.save(tmp_path / "named.safetensors"))
    assert loaded.thresholds == thresholds
    raw = raw_parts(tmp_path / "named.safetensors")[1]["thresholds"]
    assert (raw["suspect"], raw["suspect_demote"]) == (suspect, thresholds.suspect_demote)

    def as_format_4(tensors: dict, meta: dict) -> None:
        _without_reference(tensors, meta)
        meta["format"] = "guard.profile/4"
        meta["thresholds"].pop("suspect")
        meta["thresholds"].pop("suspect_demote")

    older = Profile.load(_edited(setup, tmp_path / "format4.safetensors", as_format_4))
    assert older.thresholds == dataclasses.replace(plain, overrule=math.inf, confirm=None, confirm_ceiling=math.inf,
                                                   envelope_centre=None, envelope_spread=None,
                                                   envelope_demote=math.inf)
    assert not older.reference and older.input_bound is None
    with pytest.raises(GuardError, match="--suspect 10 is not a class of this model"):
        calibrate(setup.model_path, setup.x_cal, setup.y_cal, settings=CalibrationSettings(suspect=10))


def test_a_suspect_with_too_few_clean_answers_or_with_demotion_off(setup: Setup) -> None:
    """Fewer than 45 clean answers of a class cannot bound 5% with 90% confidence: the suspect is demoted from the
    general threshold. --demote-rate 0 demotes nothing, the suspect's answers included."""
    answers = np.bincount(_served(setup, setup.x_cal)[1], minlength=10)
    suspect = int(np.where(answers < 45, answers, 0).argmax())  # the class with the most answers short of 45
    assert answers[suspect] > 10
    few = calibrate(setup.model_path, setup.x_cal, setup.y_cal,
                    settings=CalibrationSettings(suspect=np.int64(suspect), reference=False))
    assert few.thresholds.suspect == suspect and type(few.settings["suspect"]) is int
    assert few.thresholds.suspect_demote == few.thresholds.demote == setup.profile.thresholds.demote
    off = calibrate(setup.model_path, setup.x_cal, setup.y_cal,
                    settings=CalibrationSettings(suspect=suspect, suspect_rate=0.2, demote_rate=0, reference=False))
    assert off.thresholds.suspect == suspect and off.thresholds.suspect_demote == float("inf")
    assert off.figures["calibration_suspect_demote_rate"] == 0


def _served(setup: Setup, x: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    """The statically masked model's ℓ∞ per tap and its answers, as the guard serves them."""
    taps = OnnxTaps(load_model(setup.model_path), setup.profile.tap_names)
    served = collect(taps, x, masks=[t.keep.astype(np.float32)[None] for t in setup.profile.taps])
    return served.linf, served.logits.argmax(axis=1)


def test_a_higher_fpr_confidence_never_lowers_tau(setup: Setup) -> None:
    """The same data, the same cross-fitted scores: only how many of them may lie above τ changes."""
    even = calibrate(setup.model_path, setup.x_cal, setup.y_cal,
                     settings=CalibrationSettings(fpr_confidence=0.5, prune=False, reference=False))
    sure = calibrate(setup.model_path, setup.x_cal, setup.y_cal,
                     settings=CalibrationSettings(fpr_confidence=0.99, prune=False, reference=False))
    assert sure.thresholds.k == even.thresholds.k
    assert sure.thresholds.tau > even.thresholds.tau
    assert sure.figures["calibration_flag_rate"] < even.figures["calibration_flag_rate"] <= 0.05
    assert sure.thresholds.demote >= even.thresholds.demote
    assert 0 < even.figures["calibration_demote_rate"] <= even.settings["demote_rate"]


# ---------------------------------------------------------------------------------------------- torch module path


def test_calibrating_from_the_torch_module_matches_the_onnx_path(setup: Setup) -> None:
    x = torch.as_tensor(setup.x_eval[:32])
    with torch.no_grad():
        before = setup.module(x)
    from_module = calibrate(setup.model_path, setup.x_cal, setup.y_cal, torch_module=setup.module)
    onnx_only = setup.profile
    assert from_module.tap_names == onnx_only.tap_names
    assert from_module.model_sha256 == onnx_only.model_sha256
    np.testing.assert_allclose(from_module.class_mean, onnx_only.class_mean, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(from_module.class_scale, onnx_only.class_scale, rtol=1e-3, atol=1e-4)
    for a, b in zip(from_module.taps, onnx_only.taps, strict=True):
        np.testing.assert_allclose(a.salience, b.salience, rtol=1e-3, atol=1e-6 * float(b.salience.max()))
        np.testing.assert_allclose(a.linf_mean, b.linf_mean, rtol=1e-4, atol=1e-5)
        assert np.array_equal(a.keep, b.keep)
    assert from_module.thresholds.k == pytest.approx(onnx_only.thresholds.k, rel=1e-3)
    with torch.no_grad():
        after = setup.module(x)
    assert torch.equal(before, after)  # the user's module answers as before


def test_calibrating_from_the_torch_module_leaves_no_hooks_behind(setup: Setup) -> None:
    module = SmallCNN()
    module.load_state_dict(setup.module.state_dict())
    calibrate(setup.model_path, setup.x_cal[:60], setup.y_cal[:60], torch_module=module)
    assert not [name for name, sub in module.named_modules() if sub._forward_hooks]


class _SharedReLU(torch.nn.Module):
    """A block with one ReLU module after both convs, as torchvision's BasicBlock reuses its own."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.Conv2d(8, 8, 3, padding=1)
        self.relu = torch.nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.conv2(self.relu(self.conv1(x))))


def test_a_torch_module_that_reuses_the_tapped_submodule_is_refused(setup: Setup, tmp_path: Path) -> None:
    """Its hook fired on both calls: the first conv's tap held the second's statistics, and the served guard flagged
    nearly every clean request. The block's output, which the reused ReLU gives last, is tapped at the block."""
    torch.manual_seed(0)
    module = torch.nn.Sequential(_SharedReLU(), torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten(),
                                 torch.nn.Linear(32, 10)).eval()
    path = export_onnx(module, tmp_path / "shared.onnx", torch.zeros(1, 1, 28, 28))
    first_relu, last_relu = (n.output[0] for n in onnx.load(path).graph.node if n.op_type == "Relu")
    x, y = setup.x_cal[:60], setup.y_cal[:60]
    settings = CalibrationSettings(layers=[first_relu], reference=False)
    with pytest.raises(ModelError, match=r"submodule '0.relu', which outputs ONNX tensor .* runs more than once"):
        calibrate(path, x, y, settings=settings, torch_module=module)
    assert calibrate(path, x, y, settings=settings).tap_names == [first_relu]
    block_out = CalibrationSettings(layers=[last_relu], reference=False)
    np.testing.assert_allclose(calibrate(path, x, y, settings=block_out, torch_module=module).class_mean,
                               calibrate(path, x, y, settings=block_out).class_mean, rtol=1e-3, atol=1e-4)


def test_served_guard_flags_fresh_clean_requests_at_about_the_target_rate(setup: Setup) -> None:
    """Calibration and the runtime apply one rule (check, re-prediction, flag) on cross-fitted scores: the served
    Guard flags fresh clean requests at about the rate calibration aimed for, not at a multiple of it (at 200 samples
    the binomial spread is 1.5 points; the 0.9 confidence aims at about 4%)."""
    flagged = Guard.load(setup.model_path, setup.profile_path).predict(setup.x_eval).flagged
    assert len(setup.x_eval) == 200
    assert 0.005 <= flagged.mean() <= setup.profile.settings["fpr"] + 0.045
