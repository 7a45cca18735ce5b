"""The reference: a copy of the model fine-tuned on the clean set, whose firm disagreement overrules the model.

Triggers spread over the whole image (blend, warping) raise no unit past its clean range, so the consistency check
lets many through; but a backdoor learnt from poisoned data fades when the model is fine-tuned on clean data
(`guard repair --method finetune`), while what the model knows of the task stays. A request that the model answers
with a class its fine-tuned copy finds far less likely than its own answer is answered by the copy instead.

model + clean samples -> fine-tuning on all but a held-out share -> the held-out samples' disagreement -> the
threshold that about `rate` of them pass -> the changed weights and the threshold, stored in the profile.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from guard.model.graph import LoadedModel
from guard.repair.adaptive_reg import RepairSettings, repair
from guard.runtime.engine import PlainSession
from guard.runtime.reference import disagreement
from guard.samples import holdout_split


@dataclass
class ReferenceFit:
    """What calibration keeps of the reference, and how it was measured."""

    weights: dict[str, np.ndarray]  # the initializers fine-tuning changed, by name
    threshold: float  # overrule where the disagreement exceeds this
    holdout_samples: int
    holdout_accuracy: float  # of the reference on the held-out samples (against the labels, else the model's answers)
    overrule_rate: float  # share of the held-out samples past the threshold


def overrule_threshold(gaps: np.ndarray, rate: float) -> float:
    """The disagreement that about a share `rate` of clean samples exceed: of n samples, the (a + 1)-th highest with
    a = floor(rate (n + 1)). a of them lie above it, and a fresh clean request exceeds it with chance (a + 1) / (n + 1),
    above `rate` by less than 1 / (n + 1) (8.5% at 8% and n = 200). Never below 0, so an agreeing answer is never
    overruled."""
    allowed = int(np.floor(rate * (len(gaps) + 1)))
    ordered = np.sort(gaps)[::-1]
    return 0.0 if allowed >= len(ordered) else max(0.0, float(ordered[allowed]))


def fit_reference(loaded: LoadedModel, x: np.ndarray, y: np.ndarray | None, model_labels: np.ndarray, *,
                  rate: float, lr: float, seed: int) -> ReferenceFit:
    """Fine-tune a copy of `loaded` on `x` (labels `y`, else the model's answers) and set the threshold on the
    samples fine-tuning held out, against `model_labels` (the served model's answers to `x`)."""
    settings = RepairSettings(method="finetune", lr=lr, seed=seed)
    tuned, report = repair(loaded, x, y, settings=settings)
    hold, _ = holdout_split(len(x), settings.holdout, seed)  # the split repair made: not trained on (its back-off
    # measured accuracy on them)
    session = PlainSession(tuned.SerializeToString(), loaded.input_name, threads=1)
    gaps = disagreement(session.logits(np.ascontiguousarray(x[hold])), model_labels[hold])
    threshold = overrule_threshold(gaps, rate)
    return ReferenceFit(weights=changed_weights(loaded.proto, tuned), threshold=threshold,
                        holdout_samples=len(hold), holdout_accuracy=report.accuracy_after,
                        overrule_rate=float((gaps > threshold).mean()))


def changed_weights(original: onnx.ModelProto, tuned: onnx.ModelProto) -> dict[str, np.ndarray]:
    """The initializers of `tuned` whose values differ from `original`'s."""
    before = {init.name: numpy_helper.to_array(init) for init in original.graph.initializer}
    return {init.name: value for init in tuned.graph.initializer
            if not np.array_equal(value := numpy_helper.to_array(init), before[init.name])}
