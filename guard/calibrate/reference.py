"""The reference: a copy of the model fine-tuned on the clean set, whose firm disagreement overrules the model.

Triggers spread over the whole image (blend, warping) raise no unit past its clean range, so the consistency check
lets many through; but a backdoor learnt from poisoned data fades when the model is fine-tuned on clean data
(`guard repair --method finetune`), while what the model knows of the task stays. A request that the model answers
with a class its fine-tuned copy finds far less likely than its own answer is answered by the copy instead.

Fine-tuning only fades a backdoor, so where `guard scan` has synthesised triggers for its candidate classes, the
fine-tuning also unlearns them: a share of each batch is stamped with one, true labels kept.

model + clean samples (+ the scan's candidate triggers, stamped on a share of each batch) -> fine-tuning on all but a
held-out fifth, once per fold (each holds out another fifth) ->
the held-out samples' disagreement with their fold's copy, pooled -> the threshold that about `rate` of them pass,
or fewer where overruling them cost right answers on balance -> the first fold's changed weights and the threshold,
stored in the profile.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from guard.calibrate.warps import AnyTrigger
from guard.errors import GuardError
from guard.model.graph import LoadedModel
from guard.repair.adaptive_reg import RepairSettings, repair
from guard.runtime.engine import PlainSession
from guard.runtime.reference import disagreement
from guard.samples import MIN_HELD_OUT, holdout_folds


@dataclass
class ReferenceFit:
    """What calibration keeps of the reference, and how it was measured."""

    weights: dict[str, np.ndarray]  # the initializers fine-tuning changed, by name
    threshold: float  # overrule where the disagreement exceeds this
    holdout_samples: int  # over all folds
    # of the kept copy on its own fold's held-out samples (the labels, else the model's answers)
    holdout_accuracy: float
    overrule_rate: float  # share of the held-out samples past the threshold
    folds: int  # fine-tunings whose held-out samples set the threshold
    # held-out answers the overrules corrected minus those they broke, at the threshold (None: no labels to tell)
    net_gain: int | None
    # (N, K): each sample's logits from the copy that held it out (NaN rows: no fold held it out), where a warp's
    # lean is measured against clean samples the reference did not train on
    holdout_logits: np.ndarray
    # overrule an answer of `class_target` (the warp scan's class) past this lower threshold (inf: no such class)
    class_threshold: float = math.inf


def overrule_threshold(gaps: np.ndarray, rate: float, gains: np.ndarray | None = None) -> float:
    """The disagreement that about a share `rate` of clean samples exceed: of n samples, the (a + 1)-th highest with
    a = floor(rate (n + 1)). a of them lie above it. Were the n exchangeable with a fresh clean request (one copy's
    own held-out samples), it would exceed it with chance (a + 1) / (n + 1), above `rate` by less than 1 / (n + 1);
    pooled over several copies' folds the bound is approximate (cross-conformal). Never below 0, so an agreeing
    answer is never overruled.

    `gains` (per sample: +1 where the reference's answer is right and the model's wrong, -1 the other way round, else
    0) may raise it: to the lowest of the candidates (the (b + 1)-th highest, b at most a) above which the reference
    has won at least as often as it lost. A reference worse than the model where they disagree most answers no more
    than it has earned."""
    order = np.argsort(-gaps, kind="stable")  # firmest first
    ordered = gaps[order]
    allowed = int(np.floor(rate * (len(gaps) + 1)))
    candidates = np.maximum(0.0, np.append(ordered, 0.0)[:min(allowed, len(gaps)) + 1])
    if gains is None:
        return float(candidates[-1])
    if len(gains) != len(gaps):
        raise ValueError(f"{len(gains)} gains for {len(gaps)} disagreements")
    # above each candidate: the firmest samples, as many as lie strictly above it (a tie at a cut passes none)
    running = np.concatenate([[0], np.cumsum(gains[order])])
    above = np.searchsorted(-ordered, -candidates, side="left")
    return float(candidates[np.flatnonzero(running[above] >= 0).max()])


# The share of each fine-tuning batch stamped with a candidate trigger. AR's fifth cost the tuning CNNs twice the clean
# accuracy for little more: docs/design.md, "The reference unlearns the scan's candidates".
UNLEARN_SHARE = 0.1

# The most folds: repair holds out a fifth of the samples, so five disjoint fifths hold out each sample once.
MAX_FOLDS = round(1 / RepairSettings.holdout)


def fit_reference(loaded: LoadedModel, x: np.ndarray, y: np.ndarray | None, model_labels: np.ndarray, *,
                  rate: float, lr: float, seed: int, folds: int, triggers: Sequence[AnyTrigger] = (),
                  unlearn_share: float = UNLEARN_SHARE, class_target: int | None = None,
                  class_rate: float = 0.0) -> ReferenceFit:
    """Fine-tune a copy of `loaded` on `x` (labels `y`, else the model's answers) and set the threshold on the
    samples fine-tuning held out, against `model_labels` (the served model's answers to `x`).

    With `folds` > 1 the fine-tuning runs again for each of up to `folds` disjoint held-out sets, and the threshold
    is set on all their samples, each against its own fold's copy; the first fold's copy is the one kept. One
    held-out fifth (200 of 1,000 samples) let the fresh overrule rate range from 4% to 11% around 8%; a quantile of
    the pooled samples is steadier, at one more fine-tuning per fold.

    With labels `y`, the threshold lets through no more of the firmest disagreements than the reference won on
    balance against the model (`overrule_threshold`'s gains); where that lets none through, no reference is kept
    (no weights, an infinite threshold) and the guard runs the model alone.

    `triggers` (the scan's candidates) are unlearned as `guard repair` does: `unlearn_share` of each batch is stamped
    with one of them under its true label. Fine-tuning alone only fades a backdoor; unlearning a trigger like the
    attacker's makes the copy disagree firmly with the target on triggered requests.

    With labels, `class_target` (the class whose warp the warp scan named) gets a threshold of its own, set by the
    same rule on the pooled held-out samples the model answers with it at `class_rate` (0: none): a warp trigger the
    check does not see leaves its answers to the reference, which disagrees, but not always past the general
    threshold (docs/design.md, "A reference threshold of its own for the warp's class")."""
    # fine-tuning penalises no channel, so the triggers' gap channels are not measured
    settings = RepairSettings(method="finetune", lr=lr, seed=seed, unlearn_share=unlearn_share, gap_share=0.0)
    splits = holdout_folds(len(x), settings.holdout, seed, folds)  # the first is repair's default split
    if not 1 <= folds <= MAX_FOLDS or not splits or not all(len(fit) for _, fit in splits):
        raise GuardError(f"the reference needs 1 to {MAX_FOLDS} folds of at least {MIN_HELD_OUT} held-out samples "
                         f"and some to train on; got {folds} fold(s) of {len(x)} samples")
    kept: onnx.ModelProto | None = None
    accuracy, gaps, gains = 0.0, [], []
    holdout_logits = np.full((len(x), loaded.num_classes), np.nan, dtype=np.float32)
    for hold, fit in splits:
        tuned, report = repair(loaded, x, y, settings=settings, split=(hold, fit), triggers=triggers)
        session = PlainSession(tuned.SerializeToString(), loaded.input_name, threads=1)
        logits = session.logits(np.ascontiguousarray(x[hold]))
        holdout_logits[hold] = logits
        gap = disagreement(logits, model_labels[hold])
        gaps.append(gap)
        if y is not None:
            won = logits.argmax(axis=1) == y[hold]
            gains.append(np.where(gap > 0, won.astype(np.int64) - (model_labels[hold] == y[hold]), 0))
        if kept is None:
            kept, accuracy = tuned, report.accuracy_after
    pooled = np.concatenate(gaps)
    pooled_gains = np.concatenate(gains) if y is not None else None
    threshold = overrule_threshold(pooled, rate, pooled_gains)
    passed = pooled > threshold
    net_gain = None if pooled_gains is None else int(pooled_gains[passed].sum())
    # a reference that answers none of the held-out samples it has earned, or that fine-tuning left as the model
    # was, is not kept: the guard runs the model alone
    weights = changed_weights(loaded.proto, kept) if passed.any() or pooled_gains is None else {}
    class_threshold = math.inf
    if not weights:
        threshold = math.inf
    elif pooled_gains is not None and class_target is not None and class_rate > 0:
        rows = np.concatenate([model_labels[hold] for hold, _ in splits]) == class_target  # pooled's order
        if rows.any():
            class_threshold = min(threshold, overrule_threshold(pooled[rows], class_rate, pooled_gains[rows]))
    return ReferenceFit(weights=weights, threshold=threshold, holdout_samples=len(pooled), holdout_accuracy=accuracy,
                        overrule_rate=float(passed.mean()), folds=len(gaps), net_gain=net_gain,
                        class_threshold=class_threshold, holdout_logits=holdout_logits)


def changed_weights(original: onnx.ModelProto, tuned: onnx.ModelProto) -> dict[str, np.ndarray]:
    """The initializers of `tuned` whose values differ from `original`'s."""
    before = {init.name: numpy_helper.to_array(init) for init in original.graph.initializer}
    return {init.name: value for init in tuned.graph.initializer
            if not np.array_equal(value := numpy_helper.to_array(init), before[init.name])}
