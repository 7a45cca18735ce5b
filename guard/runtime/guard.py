"""`Guard`: a model and its profile, answering guarded predictions in-process (the server calls the same object).

request x -> validate -> engine (masked model, ℓ∞ per tap and the consistency check, all in one graph) -> the score
raised to the input envelope's part, where the profile has one (the request's excess over the clean inputs' largest
values) -> the tail of the network re-run for the samples with compromised channels or a score above tau -> the score
raised to the warp's lean, where the profile has one (the model's lean towards the warp's class beyond the
reference's; it flags, and neither re-runs the tail nor demotes) -> verdict and policy (a score over the parts that
demote above the demote threshold, or above the suspect's for an answer of the class the scan suspects, or the
envelope's part above its own, refuses the model's own class, unless the reference, a fine-tuned copy, firmly
confirms it and the first score is within the clean calibration scores' range) -> the reference overrules the answers
it firmly disagrees with -> Result.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from enum import Enum
from numbers import Integral
from pathlib import Path
from typing import TypeVar

import numpy as np

from guard.calibrate.profile import Profile
from guard.config import MAX_THREADS
from guard.errors import CheckFailedError, GuardError, ModelError, ProfileError, RequestError
from guard.model.graph import LoadedModel, load_model, tap_shapes, validate_taps
from guard.model.serving import serving_graphs
from guard.runtime.engine import build_engine, plain_model
from guard.runtime.policy import FailurePolicy, Policy, apply_policy, demotions, overrule
from guard.runtime.reference import confirms, disagreement, lean, reference_model
from guard.sparselog import SparseLog

E = TypeVar("E", bound=Enum)

log = logging.getLogger("guard.runtime")


@dataclass
class Result:
    """One guarded answer per sample."""

    labels: np.ndarray  # (N,) int64, the answer under the policy
    logits: np.ndarray  # (N, K) float32, the logits behind `labels`
    flagged: np.ndarray  # (N,) bool
    # (N,) float32, the consistency score, or the input envelope's or the warp's lean where the profile scores them
    # and one is higher (flagged above the profile's tau)
    score: np.ndarray
    model_labels: np.ndarray  # (N,) int64, what the masked model answered before the check
    # (N,) bool: far enough outside its class's profile that the model's own class was refused (under `monitor`, the
    # answer is the model's all the same)
    demoted: np.ndarray
    # (N,) bool: the profile's reference firmly disagreed with the model's answer, and (under `enforce`) answered
    overruled: np.ndarray
    # (N,) bool: past a demote threshold, but the reference firmly confirmed the model's answer, which was kept
    spared: np.ndarray
    stage_seconds: dict[str, float] = field(default_factory=dict)
    unchecked: bool = False  # the check failed and the policy failed open: the unguarded model answered

    def rows(self, start: int, stop: int) -> Result:
        """Samples start..stop of this result (a dynamic batch split back into its requests)."""
        return Result(self.labels[start:stop], self.logits[start:stop], self.flagged[start:stop],
                      self.score[start:stop], self.model_labels[start:stop], self.demoted[start:stop],
                      self.overruled[start:stop], self.spared[start:stop], dict(self.stage_seconds), self.unchecked)


def _choice(kind: type[E], value: E | str, name: str) -> E:
    try:
        return kind(value)
    except ValueError:
        raise GuardError(f"{name} must be one of {[member.value for member in kind]}, got {value!r}") from None


FAILURE_LOG_SECONDS = 10.0  # a failed check is logged at most this often: a caller can fail it at will


class Guard:
    """A guarded model. Build once (`Guard.load`), then call `predict` for each batch.

    Example::

        guard = Guard.load("model.onnx", "profile.safetensors")
        result = guard.predict(x)  # x: (N, C, H, W) float32
        result.labels, result.flagged
    """

    def __init__(self, model: LoadedModel, profile: Profile, *, device: str = "cpu",
                 policy: Policy | str = Policy.ENFORCE, threads: int = 0, engine: str = "onnxruntime",
                 io_binding: bool | None = None, on_failure: FailurePolicy | str = FailurePolicy.CLOSED,
                 check_budget: float | None = None) -> None:
        """`on_failure`: what a failed check does (refuse, or answer unguarded); `check_budget`: seconds per sample
        the guarded run of a batch may take before it counts as failed (None: no limit; the ONNX Runtime engine
        only). Per sample, because a fixed budget per run would let a caller fail the check at will, by sending a
        batch large enough to outlast it, and under fail-open get the unguarded model's answers. A sample's cost
        still depends on what it holds (a flagged one is re-predicted, about 2.4 times a clean one's on a small
        CNN), so a budget must cover a batch of flagged samples, or a caller sending triggered ones fails it."""
        if check_budget is not None and (engine != "onnxruntime" or not 0 < check_budget < math.inf):
            raise GuardError("a check budget needs the onnxruntime engine and a positive, finite number of seconds")
        if isinstance(threads, bool) or not isinstance(threads, Integral) or not 0 <= threads <= MAX_THREADS:
            # ONNX Runtime starts as many as asked
            raise GuardError(f"threads must be a whole number in [0, {MAX_THREADS}] (0: one per core), got {threads!r}")
        threads = int(threads)
        policy, on_failure = _choice(Policy, policy, "policy"), _choice(FailurePolicy, on_failure, "on_failure")
        profile.validate()  # as the loader does: one built in memory was never loaded
        profile.verify_model(model.sha256)
        try:
            validate_taps(model, profile.tap_names)
        except ModelError as exc:
            raise ProfileError(f"the model does not have the profile's taps: {exc}") from None
        if (profile.input_name, profile.output_name) != (model.input_name, model.output_name):
            raise ProfileError("the profile names other input/output tensors than the model has")
        if profile.num_classes != model.num_classes:
            raise ProfileError(f"the profile is for {profile.num_classes} classes, the model has {model.num_classes}")
        shapes = tap_shapes(model, profile.tap_names)
        want = [tap.channels for tap in profile.taps]
        got = [None if shape is None else shape[0] for shape in shapes]
        if any(g is not None and g != w for g, w in zip(got, want, strict=True)):
            raise ProfileError(f"the model's taps have {got} channels, the profile expects {want}")
        for tap, shape in zip(profile.taps, shapes, strict=True):
            if tap.unit_bound is not None and shape is not None and (len(shape) != 3 or any(
                    d is not None and d != b for d, b in zip(shape, tap.unit_bound.shape, strict=True))):
                raise ProfileError(f"tap {tap.name!r} has a unit bound of shape {tap.unit_bound.shape}, but the "
                                   f"model's tensor there is {shape}")
        self.model = model
        self.profile = profile
        self.policy = Policy(policy)
        self.sample_shape = model.sample_shape
        self._envelope = profile.envelope()
        if self._envelope is not None and self._envelope.bound.shape != tuple(self.sample_shape):
            raise ProfileError(f"the profile's input envelope has shape {self._envelope.bound.shape}, the model's "
                               f"samples {tuple(self.sample_shape)}")
        graphs = serving_graphs(model, profile.tap_names, profile.keep_masks(), profile.unit_bounds(),
                                profile.check(), profile.thresholds.tau)
        misfolded = [tap.name for tap in profile.taps if graphs.folds[tap.name] != tap.fold]
        if misfolded:  # the profile's statistics assume channels the served graph would not report, or the reverse
            raise ProfileError(f"the profile's static mask folds differently into this model at {misfolded}; "
                               "run `guard calibrate` on this model again")
        self.tail_from_input = graphs.tail_from_input  # the graphs' bytes are not kept: the sessions hold them
        self.engine = build_engine(engine, graphs, model.input_name, model.output_name, device, threads, io_binding)
        self.on_failure = FailurePolicy(on_failure)
        self.check_budget = check_budget
        self._failures = SparseLog(FAILURE_LOG_SECONDS, log)
        # The reference runs beside the served graph, on the same engine: the model with the profile's weights.
        self._reference = (plain_model(engine, reference_model(model.proto, profile.reference).SerializeToString(),
                                       model.input_name, model.output_name, device, threads)
                           if profile.reference else None)
        self._warm_up()
        # Failing open answers with the model as it is, so it needs a session of its own, built before serving.
        self._unguarded = (plain_model(engine, model.proto.SerializeToString(), model.input_name, model.output_name,
                                       device, threads)
                           if self.on_failure is FailurePolicy.OPEN else None)

    @classmethod
    def load(cls, model: str | Path, profile: str | Path, *, device: str = "cpu",
             policy: Policy | str = Policy.ENFORCE, threads: int = 0, engine: str = "onnxruntime",
             io_binding: bool | None = None, on_failure: FailurePolicy | str = FailurePolicy.CLOSED,
             check_budget: float | None = None) -> Guard:
        """`threads`: intra-op threads (0 = the engine's default); `engine`: onnxruntime or torch; `io_binding`:
        ONNX Runtime's IOBinding (default: on CUDA only)."""
        return cls(load_model(model), Profile.load(profile), device=device, policy=policy, threads=threads,
                   engine=engine, io_binding=io_binding, on_failure=on_failure, check_budget=check_budget)

    @property
    def tau(self) -> float:
        return self.profile.thresholds.tau

    def _warm_up(self) -> None:
        """The served graph, the tail and the reference run once before serving (the first real request is not
        slow); a profile whose channel counts do not fit the model fails here rather than on a request."""
        x = np.zeros((1, *self.sample_shape), dtype=np.float32)
        try:
            run = self.engine.run(x)
            self.engine.repredict(run, np.zeros(1, dtype=np.int64))
            if self._reference is not None:
                self._reference.logits(x)
        except (ModelError, ProfileError):
            raise
        except Exception as exc:  # noqa: BLE001 - the engines raise their own types; all mean this pair is unusable
            raise ModelError(f"the guarded model failed its warm-up run ({type(exc).__name__}): {exc}") from None

    def validate(self, x: np.ndarray) -> np.ndarray:
        """The batch as float32 (N, C, H, W), or a RequestError saying what is wrong with it."""
        if not isinstance(x, np.ndarray):
            raise RequestError(f"expected a numpy array, got {type(x).__name__}")
        x = np.asarray(x)  # a plain array: a masked one hid its NaNs from the check below
        if not np.issubdtype(x.dtype, np.floating):
            raise RequestError(f"expected float32 input, got {x.dtype}")
        if x.ndim != 4 or tuple(x.shape[1:]) != self.sample_shape or x.shape[0] == 0:
            want = ", ".join(map(str, self.sample_shape))
            raise RequestError(f"expected shape (N, {want}) with N >= 1, got {tuple(x.shape)}")
        if not np.isfinite(x).all():
            raise RequestError("input contains NaN or Inf")
        if x.dtype != np.float32:
            if np.abs(x).max() > np.finfo(np.float32).max:  # checked before the cast, which would make them Inf
                raise RequestError("input holds values beyond float32's range (3.4e38)")
            x = x.astype(np.float32)
        return x

    def predict(self, x: np.ndarray) -> Result:
        """Guarded answers for a batch. A bad batch raises RequestError; a failure of the guard itself (an engine
        error, or the check over its budget) does what `on_failure` says."""
        x = np.ascontiguousarray(self.validate(x))
        started = time.perf_counter()
        try:
            return self._guarded(x)
        except Exception as exc:  # whatever broke inside the guard, the policy decides
            if self._unguarded is None:
                self._failures.warning(type(exc).__name__, "check failed, refused (fail-closed): %s: %s",
                                       type(exc).__name__, exc)
                raise CheckFailedError(f"the guard could not check this request ({type(exc).__name__}: {exc}); "
                                       "refused (fail-closed)") from exc
            self._failures.warning(type(exc).__name__, "check failed, answering unguarded (fail-open): %s: %s",
                                   type(exc).__name__, exc)
            failed = time.perf_counter()
            logits = self._unguarded.logits(x)
            labels = logits.argmax(axis=1).astype(np.int64)
            return Result(labels=labels, logits=logits.astype(np.float32, copy=False),
                          flagged=np.zeros(len(x), dtype=bool), score=np.full(len(x), np.nan, dtype=np.float32),
                          model_labels=labels, demoted=np.zeros(len(x), dtype=bool),
                          overruled=np.zeros(len(x), dtype=bool), spared=np.zeros(len(x), dtype=bool),
                          stage_seconds={"engine": failed - started, "unguarded": time.perf_counter() - failed},
                          unchecked=True)

    def _guarded(self, x: np.ndarray) -> Result:
        t0 = time.perf_counter()
        deadline = None if self.check_budget is None else t0 + self.check_budget * len(x)
        run = self.engine.run(x, deadline)
        t1 = time.perf_counter()
        seconds = {"engine": t1 - t0}
        reference_logits = None
        if self._reference is not None:  # before the tail: its firm agreement spares a demotion
            reference_logits = self._reference.logits(x, deadline)
            seconds["reference"] = time.perf_counter() - t1
        t2 = time.perf_counter()
        model_labels = run.logits.argmax(axis=1)
        thresholds = self.profile.thresholds
        # what τ flags on: the check's score, or the input envelope's or the warp's lean (parts outside the served
        # graph) where higher (a NaN stays NaN); the demote thresholds and the confirmation's ceiling stay on the
        # check's parts that demote, the envelope's own threshold on its part. A request outside the envelope is
        # re-predicted as one the check scores above τ is.
        flag_score, needs = run.score, run.needs
        outside = None
        if self._envelope is not None:
            outside = self._envelope.standardised(x)
            flag_score = np.maximum(flag_score, outside)
            needs = needs | (flag_score > self.tau)
        if reference_logits is not None and thresholds.lean_class is not None:
            leaning = lean(run.logits, reference_logits, thresholds.lean_class)
            flag_score = np.maximum(flag_score, (leaning - thresholds.lean_centre) / thresholds.lean_spread)
        # a NaN score (an input that overflows the model) is flagged, never clean
        flagged = ~(flag_score <= self.tau) | ~np.isfinite(run.logits).all(axis=1)
        labels, answer = model_labels, run.logits
        demoted, spared = np.zeros(len(x), dtype=bool), np.zeros(len(x), dtype=bool)
        if needs.any():  # most clean batches skip all of this
            rows = np.flatnonzero(needs)
            benign_logits = run.logits.copy()
            benign_logits[rows] = self.engine.repredict(run, rows, deadline)
            agree = benign_logits.argmax(axis=1) == model_labels
            flagged |= ~agree
            suspected = (agree & (model_labels == thresholds.suspect) & (run.demote_score > thresholds.suspect_demote)
                         if thresholds.suspect is not None else np.zeros(len(x), dtype=bool))
            extreme = run.demote_score > thresholds.demote
            if outside is not None:  # far outside the envelope: a patch the re-prediction did not undo
                extreme |= outside > thresholds.envelope_demote
            demoted = demotions(run.logits, benign_logits, model_labels, agree & extreme, suspected)
            if reference_logits is not None:  # never past every clean score: there the trigger may fool it too
                spared = (demoted & confirms(reference_logits, model_labels, thresholds.confirm)
                          & (run.demote_score <= thresholds.confirm_ceiling))
                demoted &= ~spared
            answer = apply_policy(self.policy, run.logits, benign_logits, flagged, demoted)
            labels = answer.argmax(axis=1)
        seconds["repredict"] = time.perf_counter() - t2
        overruled = np.zeros(len(x), dtype=bool)
        if reference_logits is not None:
            gap = disagreement(reference_logits, model_labels)
            overruled = (gap > thresholds.overrule) | ((model_labels == thresholds.warp_class)
                                                       & (gap > thresholds.warp_overrule))
            answer = overrule(self.policy, answer, reference_logits, overruled)
            labels = answer.argmax(axis=1)
        return Result(
            labels=labels.astype(np.int64, copy=False),
            logits=answer.astype(np.float32, copy=False),
            flagged=flagged,
            score=flag_score.astype(np.float32, copy=False),
            model_labels=model_labels.astype(np.int64, copy=False),
            stage_seconds=seconds,
            demoted=demoted,
            overruled=overruled,
            spared=spared,
        )
