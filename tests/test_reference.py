"""The reference: a copy of the model fine-tuned on the clean set (unlearning the scan's candidate triggers where it is
given them), stored in the profile, that answers the requests it firmly disagrees with the model on. Its mechanics on
small data, its refusal of weights that do not fit the model, what unlearning a trigger adds, and what it does
against a blend backdoor the check alone lets through."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from onnx import numpy_helper

from conftest import (
    TARGET,
    Backdoored,
    as_format_8,
    poisoned_cnn,
    raw_parts,
    run_cli,
    without_envelope,
    write_parts,
)
from guard.calibrate.pipeline import CalibrationSettings, calibrate
from guard.calibrate.profile import Profile
from guard.calibrate.reference import fit_reference, overrule_threshold
from guard.calibrate.synthesis import Trigger
from guard.errors import GuardError, ProfileError
from guard.eval.attacks import BadNets, Blend
from guard.eval.models import export_onnx
from guard.model.graph import load_model
from guard.repair.adaptive_reg import RepairSettings, repair
from guard.runtime.engine import PlainSession
from guard.runtime.guard import Guard
from guard.runtime.policy import Policy
from guard.runtime.reference import confirms, disagreement, lean, reference_model, trained_initializers
from guard.samples import holdout_folds, holdout_split


def test_disagreement_is_the_log_probability_the_reference_prefers_its_own_answer_by() -> None:
    logits = np.array([[2.0, 0.5, -1.0], [0.0, 3.0, 1.0], [1.0, 1.0, 0.0]], dtype=np.float32)
    labels = np.array([0, 0, 1])
    log_probs = torch.log_softmax(torch.as_tensor(logits), dim=1).numpy()
    expected = log_probs.max(axis=1) - log_probs[np.arange(3), labels]
    np.testing.assert_allclose(disagreement(logits, labels), expected, atol=1e-6)
    assert disagreement(logits, labels)[0] == 0  # agreeing: nothing to overrule
    assert disagreement(logits, labels)[2] == 0  # a tie with the answer is no disagreement either


def test_lean_is_how_much_more_probability_the_model_gives_the_class_than_the_reference() -> None:
    model = np.array([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [np.nan, 0.0, 0.0]], dtype=np.float32)
    reference = np.array([[0.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]], dtype=np.float32)
    probs = torch.softmax(torch.as_tensor(model[:2]), dim=1).numpy()
    leaning = lean(model, reference, 0)
    np.testing.assert_allclose(leaning[:2], [probs[0, 0] - 1 / 3, 0.0], atol=1e-6)  # the same logits: no lean
    assert leaning[0] > 0 and np.isnan(leaning[2])  # an input the model overflows on stays NaN (flagged)
    assert lean(reference, model, 0)[0] == pytest.approx(-leaning[0])  # the reference leaning more: negative


def test_overrule_threshold_passes_about_the_rate_and_never_an_agreeing_answer() -> None:
    gaps = np.random.default_rng(0).exponential(size=999).astype(np.float32)
    threshold = overrule_threshold(gaps, 0.05)
    # floor(0.05 * 1000) = 50 above it: a fresh sample lies above the 51st highest of 999 with chance 51 / 1000
    assert (gaps > threshold).sum() == 50
    assert overrule_threshold(np.zeros(100, dtype=np.float32), 0.05) == 0.0  # agreement is never overruled
    mostly_agreeing = np.concatenate([np.zeros(97), [1.0, 2.0, 3.0]]).astype(np.float32)
    assert overrule_threshold(mostly_agreeing, 0.05) == 0.0  # fewer disagreements than the rate: all of them pass


def test_the_overrule_count_stops_where_the_reference_has_lost_as_often_as_it_won() -> None:
    gaps = np.random.default_rng(0).exponential(size=999).astype(np.float32)
    firmest = np.argsort(-gaps)
    gains = np.zeros(999, dtype=np.int64)
    gains[firmest[:20]], gains[firmest[20:60]] = 1, -1  # 20 won, then 40 lost: even after 40, 10 behind after 50
    assert (gaps > overrule_threshold(gaps, 0.05, gains)).sum() == 40
    gains[firmest[:60]] = 1
    assert (gaps > overrule_threshold(gaps, 0.05, gains)).sum() == 50  # never more than the rate lets through
    gains[firmest[0]] = -1  # the firmest disagreement lost, and the one after it won: even after 2
    assert (gaps > overrule_threshold(gaps, 0.05, gains)).sum() == 50
    gains[firmest[:60]] = -1
    assert (gaps > overrule_threshold(gaps, 0.05, gains)).sum() == 0
    # a tie at a cut lets none of the tied through: the net is counted over what passes, never below 0
    tied, won = np.array([4, 2, 2, 1, 0.5], dtype=np.float32), np.array([-1, 1, -1, 0, 0])
    assert overrule_threshold(tied, 0.5, won) == 4.0  # above 2 only the lost 4; above 1 the three: net -1
    assert overrule_threshold(tied, 0.5, np.array([1, 1, -1, 0, 0])) == 1.0  # above 1: net +1, the rate's three
    assert overrule_threshold(tied, 0.99, np.zeros(5, dtype=int)) == 0.0  # as many as there are: every positive one
    with pytest.raises(ValueError, match="4 gains for 5"):
        overrule_threshold(tied, 0.5, np.zeros(4, dtype=int))


def test_a_reference_that_wins_none_of_its_disagreements_is_not_kept(backdoored: Backdoored,
                                                                     tmp_path: Path) -> None:
    """Labelled with the model's own answers, the model is right wherever the reference disagrees: the reference has
    earned no overrule, so none is kept and the guard runs the model alone. Without labels the rate alone rules."""
    loaded = load_model(backdoored.model_path)
    x = backdoored.x_clean
    answers = Guard(loaded, Profile.load(backdoored.profile_path).without_reference()).predict(x).model_labels
    lost = fit_reference(loaded, x, answers, answers, rate=0.08, lr=2e-3, seed=0, folds=2)
    assert lost.weights == {} and lost.threshold == math.inf
    assert lost.overrule_rate == 0 and lost.net_gain == 0
    unlabelled = fit_reference(loaded, x, None, answers, rate=0.08, lr=2e-3, seed=0, folds=2)
    assert unlabelled.weights and unlabelled.net_gain is None and 0 < unlabelled.overrule_rate <= 0.08
    # the same through the command, unpruned so that the answers it measures against are the bare model's
    bare = PlainSession(loaded.proto.SerializeToString(), loaded.input_name).logits(x).argmax(axis=1)
    np.savez(tmp_path / "own.npz", x=x, y=bare)
    done = run_cli("calibrate", backdoored.model_path, "--data", "own.npz", "--out", "p.safetensors", "--quiet",
                   "--no-scan", "--no-prune", "--reference-folds", "2", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "no reference kept (it would answer none of the held-out samples" in done.stdout
    profile = Profile.load(tmp_path / "p.safetensors")
    assert not profile.reference and profile.thresholds.overrule == math.inf
    assert profile.figures["reference_overrule_rate"] == 0
    assert not Guard(loaded, profile).predict(backdoored.x_eval).overruled.any()


@pytest.mark.parametrize(("option", "message"), [
    ("--reference-unlearn", "--reference-unlearn is a share of each batch in [0, 1), got 1.5"),
    ("--warp-overrule-rate", "--warp-overrule-rate is a share in [0, 1], got 1.5"),
])
def test_cli_refuses_a_reference_share_outside_0_to_1(backdoored: Backdoored, tmp_path: Path, option: str,
                                                      message: str) -> None:
    np.savez(tmp_path / "clean.npz", x=backdoored.x_clean, y=backdoored.y_clean)
    done = run_cli("calibrate", backdoored.model_path, "--data", "clean.npz", "--out", "p.safetensors", "--quiet",
                   option, "1.5", cwd=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip() == f"guard: error: {message}"
    assert not (tmp_path / "p.safetensors").exists()


def test_impossible_reference_settings_are_refused() -> None:
    for fields, option in (({"reference_rate": 0.0}, "--reference-rate"), ({"reference_lr": 0.0}, "learning rate"),
                           ({"reference_lr": float("nan")}, "learning rate"), ({"reference_folds": 0}, "--reference-folds"),
                           ({"reference_folds": 6}, "--reference-folds"), ({"reference_folds": 2.5}, "--reference-folds"),
                           ({"reference_folds": 5.0}, "--reference-folds"), ({"reference_folds": True}, "--reference-folds"),
                           ({"reference_unlearn": 1.0}, "--reference-unlearn"),
                           ({"reference_unlearn": -0.1}, "--reference-unlearn"),
                           ({"demote_confirm": 0.3}, "--demote-confirm"), ({"demote_confirm": 1.01}, "--demote-confirm"),
                           ({"demote_confirm": True}, "--demote-confirm"),
                           ({"demote_confirm": float("nan")}, "--demote-confirm")):
        with pytest.raises(GuardError, match=option):
            CalibrationSettings(**fields).validate()


def test_calibration_stores_the_fine_tuned_weights_and_a_threshold_set_on_held_out_samples(
        backdoored: Backdoored, tmp_path: Path) -> None:
    profile = Profile.load(backdoored.profile_path)
    loaded = load_model(backdoored.model_path)
    own = {init.name: numpy_helper.to_array(init) for init in loaded.proto.graph.initializer}
    assert profile.reference and set(profile.reference) <= set(trained_initializers(loaded.proto))
    for name, value in profile.reference.items():
        assert value.shape == own[name].shape and value.dtype == own[name].dtype
        assert not np.array_equal(value, own[name]), f"{name} is stored but unchanged"
    assert 0 < profile.thresholds.overrule < math.inf
    figures = profile.figures
    # five fine-tunings, each holding out another fifth of the 500 clean samples: every sample is held out once
    assert figures["reference_folds"] == 5 and figures["reference_holdout_samples"] == 500
    assert 0 < figures["reference_overrule_rate"] <= 0.08  # the conformal count over 500: at most 40 of them
    assert profile.settings["reference"] is True and profile.settings["reference_rate"] == 0.08
    # fresh clean requests: about the rate overruled, and the answers no worse for it
    guard = Guard(loaded, profile)
    fresh = guard.predict(backdoored.x_eval)
    assert 0.01 < fresh.overruled.mean() < 0.2
    assert (fresh.labels == backdoored.y_eval).mean() >= (fresh.model_labels == backdoored.y_eval).mean() - 0.01


def test_the_threshold_is_set_on_the_held_out_samples_against_the_served_models_answers(
        backdoored: Backdoored) -> None:
    """Calibration hands fit_reference the masked model's answers in the samples' own order: refitting with the
    answers the guard serves gives the profile's threshold and weights."""
    profile = Profile.load(backdoored.profile_path)
    loaded = load_model(backdoored.model_path)
    x, y = backdoored.x_clean, backdoored.y_clean
    answers = Guard(loaded, profile.without_reference()).predict(x).model_labels
    fit = fit_reference(loaded, x, y, answers, rate=0.08, lr=2e-3, seed=0, folds=5)
    assert fit.threshold == pytest.approx(profile.thresholds.overrule, abs=1e-5)
    assert fit.weights.keys() == profile.reference.keys()
    assert all(np.array_equal(fit.weights[name], profile.reference[name]) for name in fit.weights)
    hold, _ = holdout_split(len(x), 0.2, 0)
    reference = PlainSession(reference_model(loaded.proto, fit.weights).SerializeToString(), loaded.input_name)
    gaps = disagreement(reference.logits(x[hold]), answers[hold])
    shuffled = np.roll(answers, 1)  # answers out of order disagree with the reference far more often
    assert (disagreement(reference.logits(x[hold]), shuffled[hold]) > fit.threshold).mean() > 3 * max(
        float((gaps > fit.threshold).mean()), 0.01)


def test_the_threshold_pools_each_folds_held_out_samples_against_that_folds_copy(backdoored: Backdoored) -> None:
    """With two folds: the kept copy is the one-fold fit, trained without the first held-out fifth; the threshold is
    the quantile of both fifths' disagreement, each with the copy that did not train on it."""
    loaded = load_model(backdoored.model_path)
    x, y = backdoored.x_clean, backdoored.y_clean
    answers = Guard(loaded, Profile.load(backdoored.profile_path).without_reference()).predict(x).model_labels
    one = fit_reference(loaded, x, y, answers, rate=0.08, lr=2e-3, seed=0, folds=1)
    two = fit_reference(loaded, x, y, answers, rate=0.08, lr=2e-3, seed=0, folds=2, class_target=TARGET,
                        class_rate=1.0)
    assert (one.folds, one.holdout_samples, two.folds, two.holdout_samples) == (1, 100, 2, 200)
    assert one.weights.keys() == two.weights.keys()
    assert all(np.array_equal(one.weights[name], two.weights[name]) for name in one.weights)
    gaps, gains = [], []
    for hold, fit in holdout_folds(len(x), 0.2, 0, 2):
        tuned, report = repair(loaded, x, y, settings=RepairSettings(method="finetune", lr=2e-3, seed=0),
                               split=(hold, fit))
        assert report.holdout_samples == len(hold)
        logits = PlainSession(tuned.SerializeToString(), loaded.input_name).logits(x[hold])
        gaps.append(disagreement(logits, answers[hold]))
        # +1 where the copy's answer is right and the model's wrong, -1 the other way round, where they disagree
        gains.append((gaps[-1] > 0) * ((logits.argmax(axis=1) == y[hold]).astype(int) - (answers[hold] == y[hold])))
    assert one.threshold == pytest.approx(overrule_threshold(gaps[0], 0.08, gains[0]), abs=1e-5)
    pooled, pooled_gains = np.concatenate(gaps), np.concatenate(gains)
    assert two.threshold == pytest.approx(overrule_threshold(pooled, 0.08, pooled_gains), abs=1e-5)
    assert two.overrule_rate == pytest.approx(float((pooled > two.threshold).mean()))
    assert two.net_gain == pooled_gains[pooled > two.threshold].sum() >= 0
    # the class's own threshold: the same rule on the held-out samples the model answers with it, never above
    answered = np.concatenate([answers[hold] for hold, _ in holdout_folds(len(x), 0.2, 0, 2)]) == TARGET
    assert answered.any() and one.class_threshold == math.inf  # no class named
    assert two.class_threshold == pytest.approx(min(two.threshold, overrule_threshold(
        pooled[answered], 1.0, pooled_gains[answered])), abs=1e-5)


def test_held_out_folds_are_disjoint_and_as_many_as_the_data_holds() -> None:
    folds = holdout_folds(1000, 0.2, 3, 5)
    assert [(len(hold), len(fit)) for hold, fit in folds] == [(200, 800)] * 5
    assert len(np.unique(np.concatenate([hold for hold, _ in folds]))) == 1000
    assert all(np.array_equal(np.sort(np.concatenate(split)), np.arange(1000)) for split in folds)
    first = holdout_split(1000, 0.2, 3)  # the first fold is the default split, in the same order
    assert np.array_equal(folds[0][0], first[0]) and np.array_equal(folds[0][1], first[1])
    assert len(holdout_folds(30, 0.2, 0, 5)) == 3  # at least 10 held out each: three fit in 30
    assert len(holdout_folds(1000, 0.2, 0, 2)) == 2
    # a fifth of 999 rounds to 200: the fifth fold is the remainder, and every sample is still held out once
    odd = holdout_folds(999, 0.2, 0, 5)
    assert [len(hold) for hold, _ in odd] == [200, 200, 200, 200, 199]
    assert len(np.unique(np.concatenate([hold for hold, _ in odd]))) == 999
    for count, sizes in ((1002, [200] * 4 + [202]), (1004, [201] * 4 + [200]), (45, [10, 10, 10, 15]),
                         (30, [10, 10, 10])):
        folds = holdout_folds(count, 0.2, 0, 5)
        assert [len(hold) for hold, _ in folds] == sizes, count
        assert all(np.array_equal(np.sort(np.concatenate(split)), np.arange(count)) for split in folds)
        assert len(np.unique(np.concatenate([hold for hold, _ in folds]))) == count  # each held out once
    hold, fit = holdout_folds(18, 0.2, 0, 5)[0]  # one fold only, and it leaves its fit samples
    assert (len(hold), len(fit)) == (10, 8)


def test_repair_refuses_a_split_that_is_not_two_disjoint_sets_of_indices(backdoored: Backdoored) -> None:
    x, y = backdoored.x_clean, backdoored.y_clean
    settings = RepairSettings(method="finetune", epochs=1)
    rest = np.arange(3, len(x))
    for split in ((np.array([0, 0, 1]), rest), (np.array([len(x)]), rest), (np.array([0, 1, 3]), rest),
                  (np.array([-1]), rest), (np.array([], dtype=np.int64), rest), (np.array([0.0, 1.0, 2.0]), rest)):
        with pytest.raises(GuardError, match="held-out and fit samples"):
            repair(backdoored.model_path, x, y, settings=settings, split=split)
    with pytest.raises(GuardError, match="leaves none to train on"):
        repair(backdoored.model_path, x, y, settings=settings, split=(np.arange(len(x)), np.array([], dtype=np.int64)))


def test_fit_reference_refuses_folds_it_cannot_make(backdoored: Backdoored) -> None:
    loaded = load_model(backdoored.model_path)
    x, y = backdoored.x_clean, backdoored.y_clean
    for folds, data in ((0, x), (6, x), (1, x[:9])):
        with pytest.raises(GuardError, match="1 to 5 folds"):
            fit_reference(loaded, data, y[:len(data)], np.zeros(len(data), dtype=np.int64), rate=0.08, lr=2e-3,
                          seed=0, folds=folds)


def test_monitor_reports_the_overruled_requests_and_answers_as_the_model(backdoored: Backdoored) -> None:
    x = np.concatenate([backdoored.x_eval[:200], backdoored.triggered()[0][:100]])
    guard = Guard.load(backdoored.model_path, backdoored.profile_path)
    enforce = guard.predict(x)
    monitor = Guard.load(backdoored.model_path, backdoored.profile_path, policy=Policy.MONITOR).predict(x)
    assert np.array_equal(monitor.overruled, enforce.overruled) and enforce.overruled.any()
    assert np.array_equal(monitor.labels, monitor.model_labels)
    reference = PlainSession(reference_model(guard.model.proto, guard.profile.reference).SerializeToString(), "input")
    own = reference.logits(x).argmax(axis=1)
    assert np.array_equal(enforce.labels[enforce.overruled], own[enforce.overruled])  # the reference's answer


def test_the_warp_class_is_overruled_past_its_own_threshold(backdoored: Backdoored, tmp_path: Path) -> None:
    """A profile naming a warp class (format 7) overrules that class's answers past its lower threshold, and every
    other answer past the reference's own, as before."""
    profile = Profile.load(backdoored.profile_path)
    x = np.concatenate([backdoored.x_eval, backdoored.triggered()[0][:100]])
    plain = Guard(load_model(backdoored.model_path), profile).predict(x)
    named = dataclasses.replace(profile, thresholds=dataclasses.replace(profile.thresholds, warp_class=TARGET,
                                                                         warp_overrule=0.0))
    loaded_back = Profile.load(named.save(tmp_path / "warp.safetensors"))
    assert (loaded_back.thresholds.warp_class, loaded_back.thresholds.warp_overrule) == (TARGET, 0.0)
    guard = Guard(load_model(backdoored.model_path), loaded_back)
    result = guard.predict(x)
    reference = PlainSession(reference_model(guard.model.proto, profile.reference).SerializeToString(), "input")
    gap = disagreement(reference.logits(x), result.model_labels)
    expected = (gap > profile.thresholds.overrule) | ((result.model_labels == TARGET) & (gap > 0))
    assert np.array_equal(result.overruled, expected)
    assert result.overruled.sum() > plain.overruled.sum() and np.array_equal(plain.overruled & ~expected,
                                                                              np.zeros(len(x), dtype=bool))
    assert loaded_back.without_reference().thresholds.warp_class is None


def test_a_warps_lean_raises_the_score_to_it_and_flags_past_tau(backdoored: Backdoored, tmp_path: Path) -> None:
    """A profile scoring the warp's lean (format 8) scores a request by the larger of the check's score and the
    standardised lean, and flags past tau on it; the tail, demotion and the reference are untouched. A format-7
    profile, with no lean, reads and guards as before."""
    profile = without_envelope(Profile.load(backdoored.profile_path))  # the lean's part beside the check's alone
    x = np.concatenate([backdoored.x_eval, backdoored.triggered()[0][:100]])
    plain = Guard(load_model(backdoored.model_path), profile).predict(x)
    scored = dataclasses.replace(profile, thresholds=dataclasses.replace(profile.thresholds, lean_class=TARGET,
                                                                          lean_centre=0.01, lean_spread=0.05))
    loaded_back = Profile.load(scored.save(tmp_path / "lean.safetensors"))
    assert loaded_back.thresholds == scored.thresholds
    guard = Guard(load_model(backdoored.model_path), loaded_back)
    result = guard.predict(x)
    reference = PlainSession(reference_model(guard.model.proto, profile.reference).SerializeToString(), "input")
    leaning = lean(guard.engine.run(x, None).logits, reference.logits(x), TARGET)
    expected = np.maximum(plain.score, (leaning - 0.01) / 0.05)
    np.testing.assert_allclose(result.score, expected, rtol=1e-5)
    assert (result.score > plain.score).any() and (result.score == plain.score).any()
    assert np.array_equal(result.flagged, plain.flagged | (expected > profile.thresholds.tau))
    assert result.flagged.sum() > plain.flagged.sum()
    assert np.array_equal(result.overruled, plain.overruled)  # the lean flags; demotion stays the check's
    assert np.array_equal(result.demoted, plain.demoted) and np.array_equal(result.labels, plain.labels)
    assert loaded_back.without_reference().thresholds.lean_class is None
    tensors, meta = raw_parts(backdoored.profile_path)  # as written before format 8
    as_format_8(tensors, meta)
    meta["format"] = "guard.profile/7"
    for key in ("lean_class", "lean_centre", "lean_spread"):
        meta["thresholds"].pop(key)
    older = Profile.load(write_parts(tmp_path / "format7.safetensors", tensors, meta))
    assert older.thresholds == profile.thresholds
    again = Guard(load_model(backdoored.model_path), older).predict(x)
    assert np.array_equal(again.score, plain.score) and np.array_equal(again.labels, plain.labels)


def test_calibrate_sets_the_warp_class_threshold_and_lean_only_for_an_unlearned_warp(backdoored: Backdoored) -> None:
    """With a warp among the unlearned triggers and a rate, the profile names its class with a threshold at most
    the reference's, and by default scores the model's lean towards it where every clean sample was held out once
    (five folds); at rate 0 and without the lean, with fewer folds (no lean), or with no warp unlearned (the fixture's
    profile), it names none."""
    from guard.calibrate.warps import WarpTrigger

    rows, cols = np.meshgrid(np.linspace(-1, 1, 28), np.linspace(-1, 1, 28), indexing="ij")
    shifted = np.stack([np.clip(cols + 2 / 27, -1, 1), rows], axis=-1).astype(np.float32)  # one pixel to the side
    warp = WarpTrigger(target=TARGET, grid=shifted, success=0.9)
    x, y = backdoored.x_clean, backdoored.y_clean
    asked = calibrate(backdoored.model_path, x, y, triggers=[warp], settings=CalibrationSettings(warp_overrule_rate=1.0))
    thresholds = asked.thresholds
    assert thresholds.warp_class == TARGET and 0 <= thresholds.warp_overrule <= thresholds.overrule < math.inf
    assert asked.figures["reference_warp_overrule"] == thresholds.warp_overrule
    assert asked.figures["reference_unlearned_warps"] == [TARGET]
    assert thresholds.lean_class == TARGET and math.isfinite(thresholds.lean_centre) and thresholds.lean_spread > 0
    off = calibrate(backdoored.model_path, x, y, triggers=[warp],
                    settings=CalibrationSettings(warp_overrule_rate=0.0, warp_lean=False))
    assert off.thresholds.warp_class is None and off.thresholds.lean_class is None
    assert off.figures["reference_unlearned_warps"] == [TARGET]
    few = calibrate(backdoored.model_path, x, y, triggers=[warp], settings=CalibrationSettings(reference_folds=2))
    assert few.thresholds.warp_class == TARGET and few.thresholds.lean_class is None  # 3 of 5 fifths never held out
    no_warp = Profile.load(backdoored.profile_path)
    assert CalibrationSettings().warp_overrule_rate > 0 and no_warp.thresholds.warp_class is None
    assert CalibrationSettings().warp_lean and no_warp.thresholds.lean_class is None
    assert no_warp.figures["reference_warp_overrule"] is None
    with pytest.raises(GuardError, match="--warp-overrule-rate is a share"):
        CalibrationSettings(warp_overrule_rate=1.5).validate()


@pytest.mark.parametrize(("edit", "message"), [
    (lambda weights, name: {**weights, "no_such_weight": weights[name]}, "not a trained weight of this model"),
    (lambda weights, name: {**weights, name: weights[name][..., :1]}, "the model's is float32"),
    (lambda weights, name: {**weights, name: weights[name].astype(np.float64)}, "the model's is float32"),
    (lambda weights, name: {**weights, name: np.full_like(weights[name], np.nan)}, "floating-point and finite"),
], ids=["unknown-name", "wrong-shape", "wrong-dtype", "nan"])
def test_reference_weights_that_do_not_fit_the_model_are_refused(backdoored: Backdoored, tmp_path: Path, edit,
                                                                 message: str) -> None:
    from safetensors import safe_open
    from safetensors.numpy import save_file

    profile = Profile.load(backdoored.profile_path)
    name = next(iter(profile.reference))
    edited = dataclasses.replace(profile, reference=edit(profile.reference, name))
    with safe_open(str(backdoored.profile_path), framework="numpy") as handle:  # tampered with outside guard,
        metadata = handle.metadata()  # whose own writer refuses a profile that would not load
        tensors = {key: handle.get_tensor(key) for key in handle.keys() if not key.startswith("reference/")}
    path = tmp_path / "edited.safetensors"
    save_file({**tensors, **{f"reference/{key}": value for key, value in edited.reference.items()}}, str(path),
              metadata=metadata)
    with pytest.raises(ProfileError, match=message):  # on reading the file, or on building the guard
        Guard.load(backdoored.model_path, path)
    with pytest.raises(ProfileError, match=message if "finite" not in message else "is not finite"):
        Guard(load_model(backdoored.model_path), edited)  # a profile built in memory is checked too


def test_a_reference_may_replace_trained_weights_only(backdoored: Backdoored) -> None:
    """A profile is untrusted: its reference may not rewrite a shape, a scale or anything but a layer's weights."""
    proto = load_model(backdoored.model_path).proto
    trained = set(trained_initializers(proto))
    assert trained == {f"{layer}.{kind}" for layer in ("conv1", "conv2", "fc1", "fc2") for kind in ("weight", "bias")}
    other = next(init for init in proto.graph.initializer if init.name not in trained)  # the flatten's shape
    with pytest.raises(ProfileError, match="not a trained weight of this model"):
        reference_model(proto, {other.name: numpy_helper.to_array(other).astype(np.float32)})


def test_a_profile_without_a_reference_runs_the_model_only(backdoored: Backdoored, tmp_path: Path) -> None:
    np.savez(tmp_path / "clean.npz", x=backdoored.x_clean, y=backdoored.y_clean)
    done = run_cli("calibrate", backdoored.model_path, "--data", "clean.npz", "--out", "plain.safetensors", "--quiet",
                   "--no-scan", "--no-reference", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "reference" not in done.stdout
    plain = Profile.load(tmp_path / "plain.safetensors")
    assert not plain.reference and plain.thresholds.overrule == math.inf
    assert plain.figures["reference_overrule_rate"] is None
    result = Guard.load(backdoored.model_path, tmp_path / "plain.safetensors").predict(backdoored.x_eval)
    assert not result.overruled.any() and "reference" not in result.stage_seconds
    with_reference = Profile.load(backdoored.profile_path)
    expected = dataclasses.replace(with_reference.thresholds, overrule=math.inf, confirm=None, confirm_ceiling=math.inf)
    # to float rounding: the fixture calibrated on one torch thread, the command on the machine's default
    assert_same_figures(plain.thresholds.as_json(), expected.as_json())


def assert_same_figures(got: object, want: object, where: str = "thresholds") -> None:
    """`got` is `want` with every float equal to a relative 1e-5."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys(), where
        for key in want:
            assert_same_figures(got[key], want[key], f"{where}.{key}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), where
        for index, (item, wanted) in enumerate(zip(got, want, strict=True)):
            assert_same_figures(item, wanted, f"{where}[{index}]")
    elif isinstance(want, float):
        assert got == pytest.approx(want, rel=1e-5), where
    else:
        assert got == want, where


def test_cli_reference_folds_set_how_many_fine_tunings_the_threshold_pools(backdoored: Backdoored,
                                                                        tmp_path: Path) -> None:
    np.savez(tmp_path / "clean.npz", x=backdoored.x_clean, y=backdoored.y_clean)
    done = run_cli("calibrate", backdoored.model_path, "--data", "clean.npz", "--out", "two.safetensors", "--quiet",
                   "--no-scan", "--reference-folds", "2", "--demote-confirm", "0", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "of 200 held-out samples of 2 fine-tuning(s)" in done.stdout
    assert "unlearned no trigger)" in done.stdout  # no scan, no triggers
    two = Profile.load(tmp_path / "two.safetensors")
    assert two.settings["reference_folds"] == two.figures["reference_folds"] == 2
    assert two.reference and 0 <= two.thresholds.overrule < math.inf
    assert two.thresholds.confirm is None and two.settings["demote_confirm"] is None  # 0: demote all the same
    assert two.thresholds.confirm_ceiling == math.inf
    default = Profile.load(backdoored.profile_path).thresholds
    assert default.confirm == 0.99 and default.tau <= default.confirm_ceiling < math.inf


def test_the_reference_confirms_an_answer_it_gives_at_least_the_probability() -> None:
    logits = np.array([[3.0, 0.0, 0.0], [3.0, 0.0, 0.0], [0.0, 0.0, 0.0], [50.0, -50.0, 0.0]], dtype=np.float32)
    labels = np.array([0, 1, 0, 0])
    probability = torch.softmax(torch.as_tensor(logits, dtype=torch.float64), dim=1).numpy()[np.arange(4), labels]
    assert confirms(logits, labels, 0.9).tolist() == (probability >= 0.9).tolist() == [True, False, False, True]
    assert confirms(logits, labels, float(probability[0]) * 0.999).tolist()[0]
    assert not confirms(logits, labels, float(probability[0]) * 1.001).tolist()[0]
    assert confirms(logits, labels, 1.0).tolist() == [False, False, False, True]  # certain, to float precision
    assert not confirms(logits, labels, None).any()


def badnets_trigger(attack: BadNets) -> Trigger:
    """The fixture's own BadNets patch as a `Trigger` (what the attack stamps on a blank image, and where): the best
    case a synthesised trigger can approach."""
    blank = np.zeros((1, 1, 28, 28), dtype=np.float32)
    mask = (attack.apply(blank) == attack.apply(blank + 0.5))[0].astype(np.float32)  # where it stamps
    return Trigger(target=TARGET, mask=mask, pattern=attack.apply(blank)[0], success=1.0,
                   mask_l1=float(mask.sum()))


def test_a_reference_that_unlearns_the_trigger_disagrees_firmly_with_the_target(backdoored: Backdoored) -> None:
    """Fine-tuning alone fades a backdoor; unlearning the trigger (stamped on a share of each batch, true labels
    kept) takes it out of the reference, so the reference overrules more triggered requests, at no cost in clean
    accuracy."""
    loaded = load_model(backdoored.model_path)
    plain = PlainSession(loaded.proto.SerializeToString(), loaded.input_name)
    x_clean = backdoored.x_clean
    triggered, _ = backdoored.triggered()
    answers = plain.logits(triggered).argmax(axis=1)
    measured = {}
    for name, triggers in (("plain", ()), ("unlearned", (badnets_trigger(backdoored.attack),))):
        fit = fit_reference(loaded, x_clean, backdoored.y_clean, plain.logits(x_clean).argmax(axis=1), rate=0.08,
                            lr=2e-3, seed=0, folds=1, triggers=triggers, unlearn_share=0.1)
        reference = PlainSession(reference_model(loaded.proto, fit.weights).SerializeToString(), loaded.input_name)
        logits = reference.logits(triggered)
        measured[name] = {
            "asr": float((logits.argmax(axis=1) == TARGET).mean()),
            "overruled": float((disagreement(logits, answers) > fit.threshold).mean()),
            "ca": float((reference.logits(backdoored.x_eval).argmax(axis=1) == backdoored.y_eval).mean()),
        }
    plain_fit, unlearned = measured["plain"], measured["unlearned"]
    assert unlearned["asr"] < 0.15 and unlearned["asr"] < plain_fit["asr"] - 0.2, measured  # measured: 0.39 -> 0.05
    assert unlearned["overruled"] > plain_fit["overruled"] + 0.2, measured  # measured: 0.47 -> 0.83
    assert unlearned["ca"] >= plain_fit["ca"] - 0.02, measured  # measured: 0.788 -> 0.791


def test_calibrate_records_the_triggers_its_reference_unlearned(backdoored: Backdoored) -> None:
    loaded = load_model(backdoored.model_path)
    x, y = backdoored.x_clean, backdoored.y_clean
    trigger = badnets_trigger(backdoored.attack)
    given = calibrate(loaded, x, y, settings=CalibrationSettings(reference_folds=1), triggers=[trigger])
    assert given.figures["reference_unlearned"] == [TARGET] and given.reference
    # the same seed without triggers: they alone changed the reference
    plain = calibrate(loaded, x, y, settings=CalibrationSettings(reference_folds=1))
    assert set(given.reference) == set(plain.reference)
    assert any(not np.array_equal(given.reference[name], plain.reference[name]) for name in plain.reference)
    # a share of 0 is no unlearning at all
    off = calibrate(loaded, x, y, settings=CalibrationSettings(reference_folds=1, reference_unlearn=0),
                    triggers=[trigger])
    assert off.figures["reference_unlearned"] == [] and off.settings["reference_unlearn"] == 0
    assert all(np.array_equal(off.reference[name], plain.reference[name]) for name in plain.reference)
    without = calibrate(loaded, x, y, settings=CalibrationSettings(reference=False), triggers=[trigger])
    assert without.figures["reference_unlearned"] == [] and not without.reference
    for wrong, message in ((dataclasses.replace(trigger, pattern=np.ones((3, 28, 28), dtype=np.float32)),
                            r"trigger 1 is for images \(3, 28, 28\), the model takes \(1, 28, 28\)"),
                           (dataclasses.replace(trigger, mask=np.ones((1, 14, 14), dtype=np.float32)),
                            r"trigger 1 has a mask of shape \(1, 14, 14\)"),
                           (dataclasses.replace(trigger, target=10), r"trigger 1's target must be one class in \[0, 10\)"),
                           (dataclasses.replace(trigger, target=2.0), "trigger 1's target must be one class"),
                           (dataclasses.replace(trigger, pattern=trigger.pattern.astype(np.float64)),
                            "trigger 1 must be float32"),
                           (dataclasses.replace(trigger, mask=np.full((1, 28, 28), np.nan, dtype=np.float32)),
                            "trigger 1 holds NaN or Inf")):
        with pytest.raises(GuardError, match=message):  # refused before any work, with or without a reference
            calibrate(loaded, x, y, settings=CalibrationSettings(reference=False), triggers=[trigger, wrong])


def test_the_reference_answers_blended_requests_the_check_lets_through(fashion, tmp_path: Path) -> None:
    """A blend backdoor raises no unit past its clean range, so the check alone answers the target for many blended
    requests; fine-tuning on the clean set fades the backdoor, and the reference answers them."""
    x_train, y_train, x_test, y_test = fashion
    blend = Blend()
    module = poisoned_cnn(x_train, y_train, blend, seed=3)
    loaded = load_model(export_onnx(module, tmp_path / "blend.onnx", torch.zeros(1, 1, 28, 28)))
    profile = calibrate(loaded, x_test[:500], y_test[:500], settings=CalibrationSettings(seed=3))
    without = profile.without_reference()
    x_eval, y_eval = x_test[1000:2000], y_test[1000:2000]
    victims = y_eval != TARGET
    triggered = blend.apply(x_eval[victims], np.random.default_rng(4))
    asr = {name: float((Guard(loaded, p).predict(triggered).labels == TARGET).mean())
           for name, p in (("with", profile), ("without", without))}
    clean = {name: float((Guard(loaded, p).predict(x_eval).labels == y_eval).mean())
             for name, p in (("with", profile), ("without", without))}
    assert asr["without"] > 0.1, f"the check alone must leave the blend backdoor some success for this to test: {asr}"
    assert asr["with"] < asr["without"] - 0.2, asr  # measured: 0.93 -> 0.55
    assert clean["with"] >= clean["without"] - 0.01, clean
