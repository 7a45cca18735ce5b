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

from guard.errors import ProfileError
from guard.model.graph import LoadedModel
from guard.repair.adaptive_reg import RepairSettings, repair
from guard.runtime.engine import UnguardedModel
from guard.samples import holdout_split


@dataclass
class ReferenceFit:
    """What calibration keeps of the reference, and how it was measured."""

    weights: dict[str, np.ndarray]  # the initializers fine-tuning changed, by name
    threshold: float  # overrule where the disagreement exceeds this
    holdout_samples: int
    holdout_accuracy: float  # of the reference on the held-out samples (against the labels, else the model's answers)
    overrule_rate: float  # share of the held-out samples past the threshold
    seconds: float


def disagreement(reference_logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per row, how much more log-probability the reference gives its own answer than `labels` (the model's answer):
    0 where they agree."""
    logits = reference_logits.astype(np.float64)
    rows = np.arange(len(logits))
    return (logits.max(axis=1) - logits[rows, labels]).astype(np.float32)  # the softmax's normaliser cancels


def overrule_threshold(gaps: np.ndarray, rate: float) -> float:
    """The disagreement that about a share `rate` of clean samples exceed: of n samples, the (a + 1)-th highest with
    a = floor(rate (n + 1)), which a fresh clean request exceeds with chance a / (n + 1) <= `rate` (split-conformal).
    Never below 0, so an agreeing answer is never overruled."""
    allowed = int(np.floor(rate * (len(gaps) + 1)))
    ordered = np.sort(gaps)[::-1]
    return 0.0 if allowed >= len(ordered) else max(0.0, float(ordered[allowed]))


def fit_reference(loaded: LoadedModel, x: np.ndarray, y: np.ndarray | None, model_labels: np.ndarray, *,
                  rate: float, lr: float, seed: int) -> ReferenceFit:
    """Fine-tune a copy of `loaded` on `x` (labels `y`, else the model's answers) and set the threshold on the
    samples fine-tuning held out, against `model_labels` (the served model's answers to `x`)."""
    settings = RepairSettings(method="finetune", lr=lr, seed=seed)
    tuned, report = repair(loaded, x, y, settings=settings)
    hold, _ = holdout_split(len(x), settings.holdout, seed)  # the split repair made: these were not trained on
    session = UnguardedModel(tuned.SerializeToString(), loaded.input_name)
    gaps = disagreement(session.logits(np.ascontiguousarray(x[hold])), model_labels[hold])
    threshold = overrule_threshold(gaps, rate)
    return ReferenceFit(weights=changed_weights(loaded.proto, tuned), threshold=threshold,
                        holdout_samples=len(hold), holdout_accuracy=report.accuracy_after,
                        overrule_rate=float((gaps > threshold).mean()), seconds=report.seconds)


def changed_weights(original: onnx.ModelProto, tuned: onnx.ModelProto) -> dict[str, np.ndarray]:
    """The initializers of `tuned` whose values differ from `original`'s."""
    before = {init.name: numpy_helper.to_array(init) for init in original.graph.initializer}
    return {init.name: value for init in tuned.graph.initializer
            if not np.array_equal(value := numpy_helper.to_array(init), before[init.name])}


def reference_model(original: onnx.ModelProto, weights: dict[str, np.ndarray]) -> onnx.ModelProto:
    """`original` with the reference's weights in place of its own. The weights come from a profile (untrusted), so
    each must name a float initializer of the model and keep its shape and dtype."""
    out = onnx.ModelProto()
    out.CopyFrom(original)
    initializers = {init.name: init for init in out.graph.initializer}
    for name, value in weights.items():
        init = initializers.get(name)
        if init is None:
            raise ProfileError(f"the profile's reference changes {name!r}, which is not a weight of this model")
        own = numpy_helper.to_array(init)
        if value.shape != own.shape or value.dtype != own.dtype or not np.issubdtype(own.dtype, np.floating):
            raise ProfileError(f"the profile's reference weight {name!r} is {value.dtype}{list(value.shape)}; the "
                               f"model's is {own.dtype}{list(own.shape)}")
        if not np.isfinite(value).all():
            raise ProfileError(f"the profile's reference weight {name!r} is not finite")
        init.CopyFrom(numpy_helper.from_array(value, name))
    return out
