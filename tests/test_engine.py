"""The fast path: one served graph with the static mask in its weights and the check inside, a tail run only for the
rows that need it, inputs to the tail left where the model ran, and the torch engine serving the same profile."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import onnx
import pytest
import torch

from conftest import TARGET, Backdoored
from guard.calibrate.activations import collect
from guard.calibrate.taps import OnnxTaps
from guard.errors import GuardError
from guard.model.bridge import OnnxModule
from guard.model.graph import load_model
from guard.model.serving import serving_graphs
from guard.runtime.checks import repredict_masks
from guard.runtime.guard import Guard, Result
from guard.runtime.policy import Policy, apply_policy, margin
from guard.runtime.reference import reference_model


@pytest.fixture(scope="module")
def guard(backdoored: Backdoored) -> Guard:
    return Guard.load(backdoored.model_path, backdoored.profile_path)


@pytest.fixture(scope="module")
def requests(backdoored: Backdoored) -> np.ndarray:
    triggered, _ = backdoored.triggered()
    return np.concatenate([backdoored.x_eval[:150], triggered[:150]])


def test_served_graph_is_the_model_plus_guard_nodes_only(guard: Guard, backdoored: Backdoored) -> None:
    """The static mask costs nothing at run time: every node that is not guard's own is the model's, in order."""
    profile = guard.profile
    loaded = load_model(backdoored.model_path)
    graphs = serving_graphs(loaded, profile.tap_names, profile.keep_masks(), profile.unit_bounds(), profile.check(),
                            guard.tau)
    original = loaded.proto.graph.node
    served = onnx.load_from_string(graphs.served).graph.node
    model_nodes = [n for n in served if not all(out.startswith("guard_") for out in n.output)]
    assert [(n.op_type, list(n.input), list(n.output)) for n in model_nodes] == \
        [(n.op_type, list(n.input), list(n.output)) for n in original]
    pruned = sum(int((~t.keep).sum()) for t in profile.taps)
    assert pruned > 0, "the profile must prune something for this test to mean much"
    extra = [n.op_type for n in served if n not in model_nodes]
    assert "Mul" not in extra, "a static-mask Mul slipped into the served graph"


def test_guard_equals_the_reference_composition(guard: Guard, backdoored: Backdoored, requests: np.ndarray) -> None:
    """Fused graph + tail + reference give what calibration's torch path and the numpy check give, step by step."""
    profile = guard.profile
    stamped = backdoored.x_eval[150:180].copy()
    stamped[:, :, :2, :2] = 1.0  # a corner dark in every clean image: outside the input envelope
    requests = np.concatenate([requests, stamped])
    loaded = load_model(backdoored.model_path)
    taps = OnnxTaps(loaded, profile.tap_names)
    keep = [t.keep for t in profile.taps]
    bounds = [t.unit_bound for t in profile.taps]
    with torch.no_grad():
        masked = collect(taps, requests, masks=[k.astype(np.float32)[None] for k in keep])
    check = profile.check()
    verdict = check(masked.linf, masked.predictions)
    in_graph = verdict.compromised.any(axis=1) | (verdict.score > guard.tau)  # what the served graph marks
    # the input envelope, scored beside the graph, raises the score, and past τ asks for a re-prediction too
    score = np.maximum(verdict.score, profile.envelope().standardised(requests))
    needs = in_graph | (score > guard.tau)
    benign_logits = masked.logits.copy()
    rows = np.flatnonzero(needs)
    with torch.no_grad():
        benign_logits[rows] = collect(taps, requests[rows], bounds=bounds,
                                      masks=repredict_masks(keep, bounds, verdict.z[rows], check.cut)).logits
    benign = benign_logits.argmax(axis=1)
    flagged = (score > guard.tau) | (benign != masked.predictions)
    top_two = np.sort(masked.logits, axis=1)[:, -2:]
    own = masked.predictions
    model_margin = top_two[:, 1] - top_two[:, 0]  # the model's answer is its top logit
    others = benign_logits.copy()
    others[np.arange(len(requests)), own] = -np.inf
    benign_margin = benign_logits[np.arange(len(requests)), own] - others.max(axis=1)
    # the reference: the model with the profile's weights, run in torch; a demotion is spared where it gives the
    # model's answer at least the confirming probability and the score is within the ceiling, and it answers where
    # it disagrees enough
    reference = OnnxModule(reference_model(loaded.proto, profile.reference)).eval()
    with torch.no_grad():
        log_probs = torch.log_softmax(reference.run(torch.as_tensor(requests))[0][loaded.output_name], dim=1).numpy()
    own_log_prob = log_probs[np.arange(len(requests)), own]
    log_confirm = math.log(profile.thresholds.confirm)
    eligible = (verdict.score > profile.thresholds.demote) & (benign == own) & (benign_margin < model_margin)
    # a ceiling halfway through the scores of the demotions the reference confirms, so both sides of it are tested
    ceiling = float(np.median(verdict.score[eligible & (own_log_prob >= log_confirm)]))
    ceiled = Guard(loaded, dataclasses.replace(profile, thresholds=dataclasses.replace(profile.thresholds,
                                                                                      confirm_ceiling=ceiling)))
    confirmed = (own_log_prob >= log_confirm) & (verdict.score <= ceiling)
    demoted = eligible & ~confirmed
    runner_up = benign_logits.copy()
    runner_up[np.arange(len(requests)), masked.predictions] = -np.inf
    expected = np.where(demoted, runner_up.argmax(axis=1), np.where(flagged, benign, masked.predictions))
    gap = log_probs.max(axis=1) - own_log_prob
    overruled = gap > profile.thresholds.overrule
    expected = np.where(overruled, log_probs.argmax(axis=1), expected)

    result = ceiled.predict(requests)
    assert 0 < rows.size < len(requests)
    assert demoted.any(), "some request must be demoted for this test to mean much"
    decided = ((np.abs(verdict.score - guard.tau) > 1e-3) & (np.abs(score - guard.tau) > 1e-3)
               & (np.abs(verdict.score - profile.thresholds.demote) > 1e-3)
               & (np.abs(benign_margin - model_margin) > 1e-3) & (np.abs(gap - profile.thresholds.overrule) > 1e-3)
               & (np.abs(own_log_prob - log_confirm) > 1e-4) & (np.abs(verdict.score - ceiling) > 1e-3))
    assert 0 < overruled.sum() < len(requests), "the reference must overrule some requests, not all"
    assert (eligible & confirmed)[decided].any(), "the reference must spare some demotion for this to mean much"
    assert (eligible & (own_log_prob >= log_confirm) & ~confirmed)[decided].any(), "and the ceiling refuse some"
    np.testing.assert_array_equal(ceiled.engine.run(requests).needs[decided], in_graph[decided])
    assert (needs & ~in_graph)[decided].any(), "the envelope must ask for some re-prediction the graph does not"
    np.testing.assert_allclose(result.score, score, atol=1e-4)
    np.testing.assert_array_equal(result.model_labels, masked.predictions)
    np.testing.assert_array_equal(result.flagged[decided], flagged[decided])
    np.testing.assert_array_equal(result.labels[decided], expected[decided])
    np.testing.assert_array_equal(result.demoted[decided], demoted[decided])
    np.testing.assert_array_equal(result.overruled[decided], overruled[decided])
    assert result.flagged[150:300].mean() > 0.8, "triggered requests must be flagged"


def test_demoted_rows_answer_the_runner_up_and_keep_the_other_classes_in_order() -> None:
    logits = np.array([[0.0, 3.0, 2.0, -1.0], [0.0, 3.0, 2.0, -1.0]], dtype=np.float32)
    benign = logits.copy()
    flagged, demoted = np.array([True, False]), np.array([True, False])
    answer = apply_policy(Policy.ENFORCE, logits, benign, flagged, demoted)
    assert answer.argmax(axis=1).tolist() == [2, 1]
    assert answer[0, 1] < answer[0, 3] and answer.dtype == np.float32
    assert np.array_equal(np.argsort(-answer[0])[:3], [2, 0, 3])
    two = np.array([[5.0, 1.0]], dtype=np.float32)  # two classes: the own class must not tie with the other
    assert apply_policy(Policy.ENFORCE, two, two, np.array([True]), np.array([True])).argmax() == 1
    assert np.array_equal(apply_policy(Policy.MONITOR, logits, benign, flagged, demoted), logits)


def test_margin_is_the_lead_over_the_best_other_class() -> None:
    logits = np.array([[3.0, 1.0, 2.0], [3.0, 1.0, 2.0]], dtype=np.float32)
    assert margin(logits, np.array([0, 1])).tolist() == [1.0, -2.0]


def test_profile_without_demotion_answers_every_agreeing_row_as_the_model(guard: Guard, backdoored: Backdoored,
                                                                         requests: np.ndarray) -> None:
    profile = guard.profile
    off = Guard(load_model(backdoored.model_path),
                dataclasses.replace(profile, thresholds=dataclasses.replace(profile.thresholds, demote=math.inf)))
    demoting, plain = guard.predict(requests), off.predict(requests)
    extreme = plain.score > profile.thresholds.demote + 1e-3
    agreeing = extreme & (plain.labels == plain.model_labels)
    assert np.array_equal(plain.labels[agreeing], plain.model_labels[agreeing])
    changed = demoting.labels != plain.labels
    assert changed.any()
    assert not changed[~agreeing].any()
    assert (demoting.labels[changed] != demoting.model_labels[changed]).all()


def test_the_reference_confirms_no_demotion_above_the_ceiling(guard: Guard, backdoored: Backdoored,
                                                              requests: np.ndarray) -> None:
    """The fixture's reference never unlearned the trigger (it was calibrated without a scan): with no ceiling it
    confirms the target on triggered requests past the demote threshold. The calibrated ceiling (the highest clean
    calibration score) spares none above it, and a ceiling at the lower demote threshold spares none at all."""
    profile, loaded = guard.profile, load_model(backdoored.model_path)
    thresholds = profile.thresholds

    def with_thresholds(**changes: object) -> Result:
        changed = dataclasses.replace(profile, thresholds=dataclasses.replace(thresholds, **changes))
        return Guard(loaded, changed).predict(requests)

    calibrated, unconfirmed = guard.predict(requests), with_thresholds(confirm=None, confirm_ceiling=math.inf)
    unbounded = with_thresholds(confirm_ceiling=math.inf)
    lowest = with_thresholds(confirm_ceiling=min(thresholds.demote, thresholds.suspect_demote))
    above = unconfirmed.score > thresholds.confirm_ceiling + 1e-3
    spared_unbounded = unconfirmed.demoted & ~unbounded.demoted
    assert spared_unbounded[len(requests) // 2:].sum() >= 3, "the reference must confirm triggered requests"
    assert (spared_unbounded & above).any()
    np.testing.assert_array_equal(calibrated.demoted[above], unconfirmed.demoted[above])
    np.testing.assert_array_equal(lowest.demoted, unconfirmed.demoted)
    np.testing.assert_array_equal(lowest.labels, unconfirmed.labels)
    # `spared` names exactly the demotions the confirmation cancelled
    np.testing.assert_array_equal(unbounded.spared, spared_unbounded)
    np.testing.assert_array_equal(calibrated.spared, unconfirmed.demoted & ~calibrated.demoted)
    assert not (calibrated.spared & calibrated.demoted).any() and not lowest.spared.any()
    assert not unconfirmed.spared.any()


def test_answers_of_the_suspect_are_refused_from_its_own_threshold(guard: Guard, backdoored: Backdoored,
                                                                   requests: np.ndarray) -> None:
    """A profile naming the backdoor's target as the suspect demotes the rows the model answers with it past the
    suspect's threshold (here τ itself, the lowest a profile allows), whatever the margin; every other row is
    answered as without a suspect."""
    profile = guard.profile.without_reference()  # the reference answers the target less
    plain_thresholds = dataclasses.replace(profile.thresholds, demote=math.inf)
    plain = Guard(load_model(backdoored.model_path), dataclasses.replace(profile, thresholds=plain_thresholds))
    named = Guard(load_model(backdoored.model_path), dataclasses.replace(profile, thresholds=dataclasses.replace(
        plain_thresholds, suspect=TARGET, suspect_demote=profile.thresholds.tau)))
    before, after = plain.predict(requests), named.predict(requests)
    suspected = ((before.model_labels == TARGET) & (before.labels == TARGET)
                 & (before.score > profile.thresholds.tau + 1e-3))
    decided = suspected | (before.score < profile.thresholds.tau - 1e-3) | (before.model_labels != TARGET)
    assert suspected[len(requests) // 2:].sum() > 10, "triggered requests must answer the target for this to test"
    np.testing.assert_array_equal(after.demoted[decided], suspected[decided])
    assert (after.labels[suspected] != TARGET).all()
    np.testing.assert_array_equal(after.labels[decided & ~suspected], before.labels[decided & ~suspected])


def test_io_binding_path_keeps_tail_inputs_in_the_engine(guard: Guard, backdoored: Backdoored,
                                                         requests: np.ndarray) -> None:
    """The CUDA path (IOBinding), run on CPU: the cut tensors and masks the tail reads stay ONNX Runtime values, never
    numpy copies, and the answers are the plain path's."""
    import onnxruntime as ort

    bound = Guard.load(backdoored.model_path, backdoored.profile_path, io_binding=True)
    assert bound.engine.io_binding and not guard.engine.io_binding
    run = bound.engine.run(np.ascontiguousarray(requests[:16]))
    assert run.carry and all(isinstance(v, ort.OrtValue) for v in run.carry.values())
    assert run.logits.shape == (16, 10) and run.score.shape == (16,) and run.needs.dtype == bool
    rows = np.array([1, 5])
    alone = bound.engine.repredict(bound.engine.run(np.ascontiguousarray(requests[[1, 5]])), np.arange(2))
    np.testing.assert_allclose(bound.engine.repredict(run, rows), alone, atol=1e-5)
    want, got = guard.predict(requests), bound.predict(requests)
    np.testing.assert_array_equal(got.labels, want.labels)
    np.testing.assert_array_equal(got.flagged, want.flagged)
    np.testing.assert_allclose(got.logits, want.logits, atol=1e-6)


def test_torch_engine_serves_the_same_profile(guard: Guard, backdoored: Backdoored, requests: np.ndarray) -> None:
    twin = Guard.load(backdoored.model_path, backdoored.profile_path, engine="torch")
    assert twin.engine.providers == ["torch:cpu"] and twin.profile.reference  # the reference runs in torch too
    want, got = guard.predict(requests), twin.predict(requests)
    assert want.overruled.any()
    np.testing.assert_array_equal(got.overruled, want.overruled)
    np.testing.assert_allclose(got.score, want.score, atol=1e-4)
    decided = np.abs(want.score - guard.tau) > 1e-3
    np.testing.assert_array_equal(got.flagged[decided], want.flagged[decided])
    np.testing.assert_array_equal(got.labels[decided], want.labels[decided])
    np.testing.assert_allclose(got.logits, want.logits, atol=1e-3)


def test_unknown_engine_and_missing_cuda_are_refused(backdoored: Backdoored) -> None:
    with pytest.raises(GuardError, match="unknown engine"):
        Guard.load(backdoored.model_path, backdoored.profile_path, engine="tensorrt")
    if not torch.cuda.is_available():
        with pytest.raises(GuardError, match="CUDA"):
            Guard.load(backdoored.model_path, backdoored.profile_path, engine="torch", device="cuda")


def test_a_cuda_torch_device_runs_float32_not_tf32(monkeypatch: pytest.MonkeyPatch) -> None:
    """cuDNN's convolutions default to TF32 on Ampere and later, about 1e-3 from the float32 calibration measured.
    No GPU here: this pins the switches the torch engine sets, not the GPU's numbers."""
    from guard.runtime.engine import _torch_device

    flags = (torch.backends.cudnn, torch.backends.cuda.matmul)  # torch's own setters, not plain attributes
    before = [flag.allow_tf32 for flag in flags]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    try:
        for flag in flags:
            flag.allow_tf32 = True
        assert _torch_device("cuda").type == "cuda"
        assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
    finally:
        for flag, value in zip(flags, before, strict=True):
            flag.allow_tf32 = value


def test_every_onnx_runtime_session_on_cuda_turns_tf32_off(monkeypatch: pytest.MonkeyPatch,
                                                           backdoored: Backdoored) -> None:
    """ONNX Runtime's CUDA provider defaults to TF32 too (its use_tf32 option). No GPU here: the sessions are made
    on the CPU and this pins the providers each was asked for, for the model, the tail and the reference."""
    import onnxruntime

    from guard.runtime import engine

    asked: list[list] = []
    real = onnxruntime.InferenceSession

    def session(model, options=None, providers=None):
        asked.append(providers)
        return real(model, options, providers=["CPUExecutionProvider"])

    monkeypatch.setattr(onnxruntime, "InferenceSession", session)
    monkeypatch.setattr(engine, "_require_cuda_provider", lambda *args: None)
    with pytest.raises(GuardError, match="warm-up"):  # made, then run on a device this onnxruntime lacks
        Guard.load(backdoored.model_path, backdoored.profile_path, device="cuda")
    assert len(asked) == 3 and all(p[0] == ("CUDAExecutionProvider", {"use_tf32": "0"}) for p in asked), asked


def test_in_process_batches_are_checked_before_any_cast(guard: Guard, backdoored: Backdoored) -> None:
    """A finite float64 beyond float32's range became Inf in the cast and was reported as NaN or Inf."""
    from guard.errors import RequestError

    x = backdoored.x_eval[:4]
    np.testing.assert_array_equal(guard.predict(x.astype(np.float64)).labels, guard.predict(x).labels)
    for bad, message in ((x.astype(np.int64), "expected float32 input, got int64"),
                         (x[:, :, 1:], r"expected shape \(N, 1, 28, 28\)"),
                         (np.where(x > 0.5, np.nan, x), "NaN or Inf"),
                         (x.astype(np.float64) * 1e39, "beyond float32's range")):
        with pytest.raises(RequestError, match=message):
            guard.predict(bad)
