"""`calibrate`: from a model and clean samples to a Profile.

model -> taps -> activations (ℓ∞, salience) -> benign sets -> static mask under the accuracy budget -> per-class
profiles of the masked model -> thresholds k and τ at the target false-positive rate, on cross-fitted scores of every
clean sample.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from guard.calibrate.activations import Activations, collect
from guard.calibrate.consistency import (
    class_profiles,
    compromise_threshold,
    confirm_ceiling,
    demote_threshold,
    fit_distance_part,
    fit_envelope,
    fit_parts,
    out_of_fold,
    part_scale,
    samples_to_bound,
    score_threshold,
    suspect_threshold,
)
from guard.calibrate.linf import linf_stats
from guard.calibrate.masking import candidate_order, choose_static_mask
from guard.calibrate.profile import (
    PartScale,
    Profile,
    TapProfile,
    Thresholds,
    confirming_probability,
    whole_number,
)
from guard.calibrate.reference import MAX_FOLDS, UNLEARN_SHARE, fit_reference
from guard.calibrate.salience import benign_salience, benign_set
from guard.calibrate.taps import ModuleTaps, OnnxTaps, TapModel
from guard.calibrate.warps import AnyTrigger, WarpTrigger, check_any_trigger, split_targets
from guard.errors import GuardError
from guard.model.graph import (
    LoadedModel,
    default_taps,
    fold_static_mask,
    load_model,
    tensor_ranks,
    validate_taps,
)
from guard.runtime.checks import Part, demoting_max, repredict_masks
from guard.runtime.reference import lean, refuse_untrainable
from guard.samples import as_samples, check_samples, holdout_split, without_repeats


@dataclass
class CalibrationSettings:
    """Every knob of calibration; all of them are recorded in the profile."""

    layers: list[str] | None = None  # ONNX tensor names to tap; None = the last conv activations + penultimate
    # How many of the last conv activations to tap, where `layers` is None (a model with fewer taps all it has). Four,
    # not two: on the SmallResNet (seven) they halved source-specific attack success under the guard on the tuning
    # models (training-split images, seeds 10-12) for 0.1 points of clean accuracy: docs/design.md, "Four conv taps".
    conv_taps: int = 4
    fpr: float = 0.05  # target share of clean requests flagged ...
    fpr_confidence: float = 0.9  # ... with this chance over the draw of the clean data (0.5: on average)
    # Share of clean requests (bounded with the same confidence) so far outside their class's profile that the guard
    # answers the best other class. Spread-out triggers (blend, warping) survive the benign re-prediction; refusing
    # the target outright for the most extreme requests is what undoes them. Tuned on training-split images (seed 10,
    # both architectures): docs/design.md.
    demote_rate: float = 0.015
    # The class `guard scan` named as the likely backdoor target, if any. A request the model answers with it is
    # demoted from a threshold of its own, which at most `suspect_rate` of the clean requests answered with it pass
    # (bounded like the FPR; usually below the general one): a request out of profile that claims the suspected
    # target is evidence twice over. Tuned on training-split images (seeds 10-14, both architectures): docs/design.md,
    # "The scan's suspect".
    suspect: int | None = None
    suspect_rate: float = 0.05
    # Fine-tune a copy of the model on the clean samples (the reference) and answer with it where it firmly
    # disagrees with the model: about `reference_rate` of clean requests, measured on samples the fine-tuning held
    # out. Spread-out triggers that the check lets through fade under fine-tuning. `reference_lr` is the fine-tuning's
    # starting rate (Adam, cosine decay, 10 epochs): 5e-3 faded backdoors a little more but cost a clean ResNet 2.4
    # points. Tuned on training-split images (seeds 10-12, both architectures): docs/design.md, "The reference".
    # The threshold pools the held-out samples of `reference_folds` fine-tunings, each holding out another fifth
    # (1: the kept copy's own fifth only; each fold more costs one fine-tuning).
    reference: bool = True
    reference_rate: float = 0.08
    reference_lr: float = 2e-3
    reference_folds: int = 5
    # Given the scan's candidate triggers (`calibrate(triggers=...)`), the reference's fine-tunings also unlearn them:
    # this share of each batch is stamped with one, true labels kept, as `guard repair` does (0: none).
    reference_unlearn: float = UNLEARN_SHARE
    # Where the reference unlearned a warp the warp scan named, the model's answers of its class get an overrule
    # threshold of their own: the same won-on-balance rule on the held-out samples answered with it, at this rate (0:
    # none). 0.5 took the wanet tuning models' attack success from 5.4-8.1% to 2.6-4.9% at under half a point of clean
    # accuracy, and named no warp on the other attacks' tuning models: docs/design.md, "A reference threshold of its
    # own for the warp's class".
    warp_overrule_rate: float = 0.5
    # Where the reference unlearned a warp the warp scan named (and every clean sample was held out by one of its
    # `reference_folds` fine-tunings, so all five), the score gains a part: how much more probability the model gives
    # the warp's class than the reference does, standardised like the other parts on those held-out samples. A warp
    # that did not take still pulls the model towards its class; the check's parts barely see a warp at all. On the
    # wanet tuning models that named a warp, detection AUROC rose from 0.60-0.89 to 0.88-0.97: docs/design.md, "The
    # warp's lean".
    warp_lean: bool = True
    # A request past a demote threshold (the general one or the suspect's) keeps the model's answer where the
    # reference gives that answer at least this probability (None: demoted all the same). Demoted clean requests are
    # mostly right, and the reference confirms most of them; it has unlearned or faded the triggers that took, and
    # confirms few of those. Chosen on training-split images (seeds 10-11, both architectures; checked on seed 12):
    # docs/design.md, "The reference spares the demotions it confirms". No request scoring above every clean
    # calibration request (that agrees with its re-prediction) is spared: a trigger the reference kept scores there.
    demote_confirm: float | None = 0.99
    acc_budget: float = 0.01  # clean accuracy the static mask may cost (absolute, on the held-out split)
    benign_share: float = 0.99  # share of a layer's benign salience the benign set covers
    holdout: float = 0.3  # share of the clean data held out for the static mask's accuracy
    folds: int = 5  # k and τ come from scores of each sample against class profiles fit on the other folds
    top_q: int = 3  # a score part is the mean of its top_q channel z values
    # The dense taps (the penultimate features) also form a score part of their own, next to the part over all taps.
    # Blend and warp triggers show there and nowhere else. Tuned on training-split images (seeds 10-12, both
    # architectures): detection AUROC on blend ResNet 0.955-0.995 -> 0.984-0.995 (docs/design.md, "Score parts").
    dense_part: bool = True
    # What that part scores: "distance", the Mahalanobis distance from the predicted class's mean (a covariance
    # shared by the classes, shrunk toward its average variance by `distance_shrink`), or "top_q", the mean of its
    # top-q z like the part over all taps. Tuned on the same models: docs/design.md, "The dense part is a distance".
    dense_score: str = "distance"
    distance_shrink: float = 0.1
    # The first conv activation is tapped and forms a score part of its own: a small patch that did not take (the
    # adaptive attack's, at a random position) still lights the first layer's units far outside their clean range,
    # where deeper taps and the penultimate features barely move. The part only flags: demoting on it too, its clean
    # tail raised the demote thresholds and let more of blend's hits through (docs/design.md, "The first conv part").
    first_conv_part: bool = True
    # The request itself is a part of the score too: how far its input elements rise above the largest value each took
    # on the clean samples (guard.runtime.checks.InputEnvelope). A stamp where clean images are dark shows there
    # whether or not it took; the model's taps see it only through what it learnt. It does not raise the demote
    # thresholds of the check's parts (docs/design.md, "The input envelope"). Its spread is its clean
    # `envelope_quantile` (the other parts': their 95th percentile) minus its median: a clean image often exceeds the
    # others' envelope somewhere (one time in eight against 800 others), and on the 95th percentile that tail took
    # so much of τ's budget that attack success rose. Its clean scores leave one sample out at a time.
    input_envelope: bool = True
    envelope_quantile: float = 0.99
    # A request whose envelope part alone lies above the clean samples' but for this share (bounded like the FPR)
    # and whose re-prediction still gives the model's answer is demoted, under the same proviso and confirmation as
    # the check's demotions (0: never). A patch the model learnt with its source class survives the re-prediction;
    # on the source-specific tuning ResNets this took attack success from 5.9 / 2.6% to 1.9 / 0.3% for at most a
    # tenth of a point of clean accuracy: docs/design.md, "The envelope demotes".
    envelope_demote_rate: float = 0.005
    k_quantile: float = 0.999  # k is this quantile of clean channel z values ...
    k_min: float = 3.0  # ... and never below this
    # The benign re-prediction zeroes penultimate features with z above this. Tuned on training-split images
    # outside the model's training data (BadNets, SmallCNN): 3.0 left 7% attack success, 2.0 1%, 1.5 cost
    # clean flagged samples half their accuracy.
    cut_z: float = 2.0
    prune: bool = True  # choose a static mask (False: keep every channel)
    batch_size: int = 256
    seed: int = 0
    extra: dict[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in (f.name for f in fields(self)):  # a number from numpy is still a number (and goes into the profile)
            if isinstance(value := getattr(self, name), np.generic):
                setattr(self, name, value.item())

    def validate(self) -> None:
        """Refuse settings that cannot calibrate, naming the option."""
        if not 0 < self.fpr < 1:
            raise GuardError(f"--fpr must lie in (0, 1), got {self.fpr}")
        if not 0.5 <= self.fpr_confidence < 1:
            raise GuardError(f"--fpr-confidence must lie in [0.5, 1), got {self.fpr_confidence}")
        if self.folds < 2:
            raise GuardError(f"cross-fitting needs at least 2 folds, got {self.folds}")
        if not 0 <= self.demote_rate < 1:
            raise GuardError(f"--demote-rate must lie in [0, 1), got {self.demote_rate}")
        if not 0 < self.reference_rate < 1:
            raise GuardError(f"--reference-rate must lie in (0, 1), got {self.reference_rate}")
        folds = self.reference_folds
        if isinstance(folds, bool) or not isinstance(folds, int) or not 1 <= folds <= MAX_FOLDS:
            raise GuardError(f"--reference-folds must be a whole number in 1..{MAX_FOLDS} (each holds out another "
                             f"fifth), got {folds!r}")
        if not (np.isfinite(self.reference_lr) and self.reference_lr > 0):
            raise GuardError(f"the reference's learning rate must be a positive number, got {self.reference_lr}")
        if self.demote_confirm is not None and not confirming_probability(self.demote_confirm):
            raise GuardError(f"--demote-confirm must be 0 (off; None in the settings) or a probability in [0.5, 1], "
                             f"got {self.demote_confirm!r}")
        if not 0 <= self.reference_unlearn < 1:
            raise GuardError(f"--reference-unlearn is a share of each batch in [0, 1), got {self.reference_unlearn}")
        if not 0 <= self.warp_overrule_rate <= 1:
            raise GuardError(f"--warp-overrule-rate is a share in [0, 1], got {self.warp_overrule_rate}")
        if not 0 < self.suspect_rate < 1:
            raise GuardError(f"the suspect's demote rate must lie in (0, 1), got {self.suspect_rate}")
        if self.suspect is not None and (isinstance(self.suspect, bool) or not isinstance(self.suspect, int)
                                         or self.suspect < 0):
            raise GuardError(f"the suspect must be a class number, got {self.suspect!r}")
        if not 0 <= self.acc_budget < 1:
            raise GuardError(f"--acc-budget must lie in [0, 1), got {self.acc_budget}")
        if not 0 < self.holdout < 1:
            raise GuardError(f"holdout share must lie in (0, 1), got {self.holdout}")
        if not 0 < self.benign_share <= 1:
            raise GuardError(f"benign share must lie in (0, 1], got {self.benign_share}")
        if self.dense_score not in ("distance", "top_q"):
            raise GuardError(f"the dense part scores 'distance' or 'top_q', got {self.dense_score!r}")
        if not 0 <= self.envelope_demote_rate < 1:
            raise GuardError(f"--envelope-demote-rate must lie in [0, 1), got {self.envelope_demote_rate}")
        if not 0.5 <= self.envelope_quantile < 1:
            raise GuardError(f"the input envelope's spread quantile must lie in [0.5, 1), got {self.envelope_quantile}")
        if not 0 < self.distance_shrink <= 1:
            raise GuardError(f"the distance's covariance shrinkage must lie in (0, 1], got {self.distance_shrink}")
        if not (np.isfinite(self.cut_z) and self.cut_z > 0):
            raise GuardError(f"the re-prediction's cut must be a positive z, got {self.cut_z}")
        if isinstance(self.conv_taps, bool) or not isinstance(self.conv_taps, int) or self.conv_taps < 0:
            raise GuardError(f"--conv-taps must be a whole number >= 0, got {self.conv_taps!r}")
        if self.layers is not None and not all(self.layers):
            raise GuardError(f"--layers names an empty tensor name: {self.layers}")
        if self.layers is not None and len(set(self.layers)) != len(self.layers):
            raise GuardError(f"--layers names a tensor twice: {self.layers}")
        if not (np.isfinite(self.k_min) and self.k_min > 0):  # a NaN k marks no channel, and nothing is re-predicted
            raise GuardError(f"the channel threshold's floor k_min must be a positive number, got {self.k_min}")
        if not 0 < self.k_quantile < 1:
            raise GuardError(f"the channel threshold's quantile must lie in (0, 1), got {self.k_quantile}")
        for name in ("top_q", "batch_size"):
            if not (whole_number(value := getattr(self, name)) and value >= 1):
                raise GuardError(f"{name} must be a whole number >= 1, got {value!r}")
        if not (whole_number(self.seed) and self.seed >= 0):
            raise GuardError(f"--seed must be a whole number >= 0, got {self.seed!r}")
        try:
            json.dumps(self.extra, allow_nan=False)
        except (TypeError, ValueError) as exc:  # it goes into the profile's metadata, after the calibration's work
            raise GuardError(f"the settings' extra must be plain JSON: {exc}") from None


def refuse_what_the_reference_cannot_fit(model: LoadedModel, x: np.ndarray, y: np.ndarray | None,
                                         settings: CalibrationSettings) -> None:
    """Refused before the scan's and the calibration's minutes (the reference's fine-tuning refused them after):
    a model whose weights are not initializers, and unlabelled samples the model answers none of some class with.
    The reference is fine-tuned on the model's own answers there and would forget the class; without the reference
    such a class only gets a note."""
    if not settings.reference:
        return
    refuse_untrainable(model.proto, "the reference (calibrate without it: --no-reference)")
    if y is not None:
        return
    with torch.no_grad():
        answers = collect(OnnxTaps(model, []), x, batch_size=settings.batch_size).predictions
    unanswered = np.flatnonzero(np.bincount(answers, minlength=model.num_classes) == 0).tolist()
    if unanswered:
        raise GuardError(f"the model answers none of the {len(x)} unlabelled calibration samples with class(es) "
                         f"{unanswered[:10]}: the reference, fine-tuned on the model's own answers, would forget "
                         "them; give the samples' labels y, or samples of every class, or calibrate with "
                         "--no-reference (the check then judges those classes by the others' statistics)")


def calibrate(model: str | Path | LoadedModel, x: np.ndarray, y: np.ndarray | None = None, *,
              settings: CalibrationSettings | None = None, torch_module: torch.nn.Module | None = None,
              progress: bool = False, triggers: Sequence[AnyTrigger] = ()) -> Profile:
    """Calibrate a profile for `model` from clean samples `x` (N, C, H, W) and optional labels `y`.

    Gradients come from `torch_module` when given (its submodules are matched to the ONNX taps by value), else from
    a torch module built from the ONNX graph. `triggers`: the candidate triggers of `guard scan`, which the reference
    unlearns (unless `settings.reference_unlearn` is 0). Example::

        profile = calibrate("model.onnx", x_clean, y_clean)
        profile.save("profile.safetensors")
    """
    settings = settings or CalibrationSettings()
    settings.validate()
    started = time.perf_counter()
    loaded = model if isinstance(model, LoadedModel) else load_model(model)
    x, y = as_samples(x, y, "calibration")
    check_samples(x, y, loaded.sample_shape, loaded.num_classes, "calibration", every_class=True)
    refuse_what_the_reference_cannot_fit(loaded, x, y, settings)
    given = len(x)
    x, y = without_repeats(x, y, loaded.sample_shape, loaded.num_classes, "calibration")
    if settings.suspect is not None and settings.suspect >= loaded.num_classes:
        raise GuardError(f"--suspect {settings.suspect} is not a class of this model ({loaded.num_classes} classes)")
    for number, trigger in enumerate(triggers):
        check_any_trigger(trigger, loaded.sample_shape, loaded.num_classes, f"trigger {number}")
    taps = list(settings.layers) if settings.layers else default_taps(loaded, conv_taps=settings.conv_taps,
                                                                      first_conv=settings.first_conv_part)
    validate_taps(loaded, taps)
    hold, fit = holdout_split(len(x), settings.holdout, settings.seed)
    timings: dict[str, float] = {}

    def timed(step: str, fn, *args, **kwargs):
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        timings[step] = round(time.perf_counter() - t0, 3)
        return out

    tap_model: TapModel
    if torch_module is not None:
        tap_model = ModuleTaps(torch_module, loaded, taps, x[fit[:16]])
    else:
        tap_model = OnnxTaps(loaded, taps)

    # The bar counts passes of a sample through the model (the fit samples go through twice), not samples.
    bar = tqdm(total=2 * len(fit) + (1 if y is not None else 2) * len(hold), desc="calibrate", unit="pass",
               disable=not progress)
    run = _Runner(tap_model, settings.batch_size, bar)
    base = timed("activations", run, x[fit], None if y is None else y[fit], with_salience=True)
    stats = [linf_stats(linf, mean) for linf, mean in zip(base.linf, base.mean, strict=True)]
    salience = [benign_salience(s) for s in base.salience or []]
    benign = [benign_set(s, settings.benign_share) for s in salience]
    channels = [len(s) for s in salience]

    truth = y[hold] if y is not None else run(x[hold]).predictions  # without labels, the model's own answers

    def accuracy(keep: list[np.ndarray]) -> float:
        return float((run.masked_predictions(x[hold], keep) == truth).mean())

    if settings.prune:
        order_ = candidate_order(salience, benign, [s.peakedness for s in stats])
        choice = timed("static_mask", choose_static_mask, order_, channels, accuracy, settings.acc_budget)
    else:
        choice = timed("static_mask", choose_static_mask, [], channels, accuracy, 0.0)
    keep = choice.keep
    _, graph_folds = fold_static_mask(loaded, dict(zip(taps, keep, strict=True)))

    guarded_fit = timed("profiles", run, x[fit], masks=keep, with_unit_max=True)
    guarded_hold = run(x[hold], masks=keep)
    order = np.concatenate([fit, hold])
    linf = [np.concatenate(pair) for pair in zip(guarded_fit.linf, guarded_hold.linf, strict=True)]
    labels = np.concatenate([guarded_fit.predictions, guarded_hold.predictions])
    bounds = guarded_fit.unit_max or [None] * len(taps)
    class_mean, class_scale = class_profiles(linf, labels, loaded.num_classes)
    ranks = tensor_ranks(loaded.proto)
    tap_profiles = [
        TapProfile(
            name=tap, kind="conv" if ranks.get(tap) == 4 else "dense", fold=graph_folds[tap],
            linf_mean=s.mean, linf_std=s.std, linf_p99=s.p99, linf_p999=s.p999, peakedness=s.peakedness,
            salience=bs, benign=b, keep=k, unit_bound=u,
        )
        for tap, s, bs, b, k, u in zip(taps, stats, salience, benign, keep, bounds, strict=True)
    ]
    draft = Profile(
        model_sha256=loaded.sha256, input_name=loaded.input_name, output_name=loaded.output_name,
        num_classes=loaded.num_classes, taps=tap_profiles, class_mean=class_mean, class_scale=class_scale,
        thresholds=Thresholds(k=settings.k_min, tau=0.0, top_q=settings.top_q, cut=settings.cut_z),
    )

    reference = None
    unlearned = list(triggers) if settings.reference and settings.reference_unlearn > 0 else []
    warp_class = next((t.target for t in unlearned if isinstance(t, WarpTrigger)), None)
    if settings.reference:  # the longest step, after the bar's passes: the bar says what it waits on
        bar.set_description(f"calibrate: fine-tuning the reference ({settings.reference_folds} times)")
        model_labels = np.empty(len(x), dtype=np.int64)
        model_labels[order] = labels
        reference = timed("reference", fit_reference, loaded, x, y, model_labels, rate=settings.reference_rate,
                          lr=settings.reference_lr, seed=settings.seed, folds=settings.reference_folds,
                          triggers=unlearned, unlearn_share=settings.reference_unlearn, class_target=warp_class,
                          class_rate=settings.warp_overrule_rate)
    kept = reference is not None and bool(reference.weights)

    t0 = time.perf_counter()
    check = draft.check()
    result = out_of_fold(check, linf, labels, loaded.num_classes, settings.folds, settings.seed)
    groups, first, dense = score_groups(tap_profiles, settings.dense_part, settings.first_conv_part)
    # With dense_score "top_q" the dense part is scored by its top-q z, like the others.
    if dense is not None and settings.dense_score != "distance":
        groups, dense = [*groups, dense], None
    flat = np.concatenate(linf, axis=1)
    # Every part's scale, and the scores τ is chosen on, are cross-fitted: z against profiles without the sample, a
    # distance to a Gaussian fit without it.
    parts: tuple[Part, ...] = fit_parts(result.z, [draft.channels_of(g) for g in groups], settings.top_q)
    if first is not None:  # it only flags: its long clean tail would raise the demote thresholds
        part = replace(fit_parts(result.z, [draft.channels_of(first)], settings.top_q)[0], demotes=False)
        groups, parts = [*groups, first], (*parts, part)
    scores = [part.standardised(flat, result.z, labels, settings.top_q) for part in parts]
    if dense is not None:
        channels = draft.channels_of(dense)
        part, crossed = fit_distance_part(flat, labels, channels[check.active[channels]], loaded.num_classes,
                                          shrink=settings.distance_shrink, folds=settings.folds, seed=settings.seed)
        groups, parts, scores = [*groups, dense], (*parts, part), [*scores, crossed]
    score = np.max(scores, axis=0)
    # The demote thresholds, the suspect's and the confirmation's ceiling are on the parts that demote.
    demote_score = demoting_max(scores, parts)
    # The warp's lean, each sample's against the reference copy that held it out (so only where all were held out),
    # is a part of the score τ flags on. The demote thresholds stay on the check's parts: the lean flags, and only
    # what the check re-predicts can be demoted, so a clean sample's lean must not raise them.
    lean_class, lean_centre, lean_spread = None, None, None
    flag_score = score
    if settings.warp_lean and warp_class is not None and kept and np.isfinite(reference.holdout_logits).all():
        leaning = lean(np.concatenate([guarded_fit.logits, guarded_hold.logits]), reference.holdout_logits[order],
                       warp_class)
        lean_class, (lean_centre, lean_spread) = warp_class, part_scale(leaning)
        flag_score = np.maximum(score, (leaning - lean_centre) / lean_spread)
    envelope, outside = None, None
    if settings.input_envelope:
        envelope, outside = fit_envelope(x[order], quantile=settings.envelope_quantile)
        flag_score = np.maximum(flag_score, outside)
    k = compromise_threshold(result.z, check.active, settings.k_quantile, settings.k_min)
    benign_labels = run.benign_repredict(x[order], keep, bounds, result.z, (result.z > k).any(axis=1),
                                         settings.cut_z, labels)
    disagree = benign_labels != labels
    tau = score_threshold(flag_score, disagree, settings.fpr, settings.fpr_confidence)
    flagged = (flag_score > tau) | disagree
    demote = demote_threshold(demote_score, disagree, tau, settings.demote_rate, settings.fpr_confidence)
    envelope_demote = (math.inf if outside is None else
                       demote_threshold(outside, disagree, tau, settings.envelope_demote_rate, settings.fpr_confidence))
    suspect_demote, suspect_rate = math.inf, None
    if settings.suspect is not None:
        suspected = labels == settings.suspect
        suspect_demote = suspect_threshold(demote_score, disagree, suspected, tau, demote, settings.suspect_rate,
                                           settings.fpr_confidence)
        suspect_rate = (float((~disagree & (demote_score > suspect_demote))[suspected].mean()) if suspected.any()
                        else 0.0)
    timings["thresholds"] = round(time.perf_counter() - t0, 3)
    bar.close()
    warp_overrule = reference.class_threshold if reference else math.inf  # inf unless kept and a warp was named
    confirm = settings.demote_confirm if kept else None
    draft.thresholds = Thresholds(k=k, tau=tau, top_q=settings.top_q, cut=settings.cut_z, demote=demote,
                                  parts=[PartScale.of(group, part) for group, part in zip(groups, parts, strict=True)],
                                  suspect=settings.suspect, suspect_demote=suspect_demote,
                                  overrule=math.inf if not kept else reference.threshold,
                                  confirm=confirm, confirm_ceiling=math.inf if confirm is None
                                  else confirm_ceiling(demote_score, disagree, tau),
                                  warp_class=warp_class if math.isfinite(warp_overrule) else None,
                                  warp_overrule=warp_overrule, lean_class=lean_class, lean_centre=lean_centre,
                                  lean_spread=lean_spread,
                                  envelope_centre=None if envelope is None else envelope.centre,
                                  envelope_spread=None if envelope is None else envelope.spread,
                                  envelope_demote=envelope_demote)
    draft.reference = reference.weights if reference else {}
    draft.input_bound = None if envelope is None else envelope.bound
    draft.settings = {**asdict(settings), "layers": taps}
    unlearned_stamps, unlearned_warps, unlearned_blends = split_targets(unlearned)
    draft.figures = {
        "samples": len(x), "fit_samples": len(fit), "holdout_samples": len(hold), "labels_given": y is not None,
        "duplicates_dropped": given - len(x),
        # the rates the clean samples are too few to bound at `fpr_confidence`, with the samples each needs
        "unbounded_rates": {name: needed for name, rate in (("fpr", settings.fpr), ("demote_rate", settings.demote_rate),
                                                            ("envelope_demote_rate", settings.envelope_demote_rate))
                            if rate > 0 and (name != "envelope_demote_rate" or envelope is not None)
                            and (needed := samples_to_bound(rate, settings.fpr_confidence)) > len(x)},
        # classes the model answers none of the clean samples with: their profile is the other classes', pooled
        "unanswered_classes": np.flatnonzero(np.bincount(labels, minlength=loaded.num_classes) == 0).tolist(),
        "holdout_accuracy_unguarded": choice.accuracy_before, "holdout_accuracy_masked": choice.accuracy_after,
        "pruned_channels": {tap: int((~k_).sum()) for tap, k_ in zip(taps, keep, strict=True)},
        "prune_candidates": choice.candidates,
        "calibration_flag_rate": float(flagged.mean()), "calibration_disagreement_rate": float(disagree.mean()),
        "calibration_demote_rate": float(((demote_score > demote) & ~disagree).mean()),
        # of the clean samples, the share whose input envelope part is past τ (None: no envelope)
        "calibration_envelope_flag_rate": None if outside is None else float((outside > tau).mean()),
        # ... and the share past its own demote threshold, re-prediction agreeing (None: no envelope)
        "calibration_envelope_demote_rate": (None if outside is None
                                             else float(((outside > envelope_demote) & ~disagree).mean())),
        # of the clean samples answered with the suspect, the share past its own threshold (None: no suspect)
        "calibration_suspect_demote_rate": suspect_rate,
        # the reference on the samples its fine-tuning held out (None: no reference)
        "reference_holdout_samples": reference.holdout_samples if reference else None,
        "reference_holdout_accuracy": reference.holdout_accuracy if reference else None,
        "reference_overrule_rate": reference.overrule_rate if reference else None,
        "reference_folds": reference.folds if reference else None,
        "reference_overrule_net": reference.net_gain if reference else None,
        # the overrule threshold of the warp's class (None: none; at most the reference's own)
        "reference_warp_overrule": warp_overrule if math.isfinite(warp_overrule) else None,
        # the classes whose candidate triggers it unlearned: stamps, warps (guard.calibrate.warps) and blends
        # (guard.calibrate.blends)
        "reference_unlearned": unlearned_stamps,
        "reference_unlearned_warps": unlearned_warps,
        "reference_unlearned_blends": unlearned_blends,
        "seconds": round(time.perf_counter() - started, 3), "step_seconds": timings,
    }
    return draft


def score_groups(taps: list[TapProfile], dense_part: bool,
                 first_conv_part: bool) -> tuple[list[list[str]], list[str] | None, list[str] | None]:
    """The taps of the top-q score parts that demote (all of them), the first conv part's (with `first_conv_part`,
    the first tap on its own where it is a conv tap and not the only one; None: no such part), and the dense part's
    (the dense taps, where there are both kinds; None: no such part)."""
    first = [taps[0].name] if first_conv_part and len(taps) > 1 and taps[0].kind == "conv" else None
    dense = [tap.name for tap in taps if tap.kind == "dense"]
    return [[tap.name for tap in taps]], first, dense if dense_part and 0 < len(dense) < len(taps) else None


class _Runner:
    """Batched calls into the tap model that feed the progress bar."""

    def __init__(self, model: TapModel, batch_size: int, bar: tqdm) -> None:
        self.model, self.batch_size, self.bar = model, batch_size, bar

    def __call__(self, x: np.ndarray, y: np.ndarray | None = None, *, masks: list[np.ndarray] | None = None,
                 with_salience: bool = False, with_unit_max: bool = False) -> Activations:
        mask_rows = None if masks is None else [m.astype(np.float32)[None, :] if m.ndim == 1 else m for m in masks]
        with torch.no_grad() if not with_salience else torch.enable_grad():
            return collect(self.model, x, y, masks=mask_rows, with_salience=with_salience,
                           with_unit_max=with_unit_max, batch_size=self.batch_size, on_batch=self.bar.update)

    def masked_predictions(self, x: np.ndarray, keep: list[np.ndarray]) -> np.ndarray:
        masks = [k.astype(np.float32)[None, :] for k in keep]
        with torch.no_grad():
            return collect(self.model, x, masks=masks, batch_size=self.batch_size).predictions

    def benign_repredict(self, x: np.ndarray, keep: list[np.ndarray], bounds: list[np.ndarray | None],
                         z: np.ndarray, needed: np.ndarray, cut: float, labels: np.ndarray) -> np.ndarray:
        """Benign re-prediction labels of the `needed` samples (out-of-bound units and high-z penultimate features
        zeroed); the others keep their label."""
        rows = np.flatnonzero(needed)
        out = labels.copy()
        if rows.size:
            masks = repredict_masks(keep, bounds, z[rows], cut)
            with torch.no_grad():
                out[rows] = collect(self.model, x[rows], masks=masks, bounds=bounds,
                                    batch_size=self.batch_size).predictions
        return out
