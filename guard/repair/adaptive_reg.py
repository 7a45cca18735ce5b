"""`guard repair`: purify a backdoored ONNX model's weights with clean data (ALGORITHMS.md section 2).

model -> benign salience at the taps (on the clean data) -> infected channels (outside each tap's benign set) -> the
weights that compute them -> fine-tuning on the clean data with a penalty on those weights -> the same graph with
new initializers.

Methods, one call for all so the ablation compares like with like:
- `ar`: adaptive regularization (Fan et al.; the formula is guard's reconstruction): the penalty on an infected weight
  is (w / (|w0| + eps))^2, relative to its magnitude at the start, so small and large weights shrink alike.
- `l2`: the same infected weights under plain w^2.
- `finetune`: no penalty (the fine-tuning baseline).
- `prune`: no training; the static mask that `guard calibrate` would choose, folded into the weights.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn.functional as F

from guard.calibrate.activations import collect
from guard.calibrate.linf import linf_gap
from guard.calibrate.salience import benign_salience, benign_set
from guard.calibrate.taps import OnnxTaps
from guard.calibrate.warps import AnyTrigger
from guard.errors import GuardError, ModelError
from guard.model.bridge import OnnxModule
from guard.model.graph import (
    LoadedModel,
    channel_producers,
    default_taps,
    fold_static_mask,
    load_model,
    unrepairable_taps,
    validate_taps,
    with_initializers,
)
from guard.runtime.reference import refuse_untrainable, trained_initializers
from guard.samples import as_samples, check_samples, holdout_split, without_repeats

log = logging.getLogger("guard.repair")

METHODS = ("ar", "l2", "finetune", "prune")
SCHEDULES = ("constant", "cosine")


@dataclass
class RepairSettings:
    """Every knob of a repair; all are recorded in its report."""

    method: str = "ar"
    # ONNX tensor names whose channels are judged; None = the last `conv_taps` conv activations and the penultimate
    # features. Two, where calibration taps four: AR's rate, shares and back-off were tuned on two (docs/design.md).
    # `prune` takes calibration's own taps and held-out share, and so the mask `guard calibrate` would choose.
    layers: list[str] | None = None
    conv_taps: int = 2
    benign_share: float = 0.99  # share of a tap's benign salience the benign set covers
    holdout: float = 0.2  # share of the clean data kept out of training, to measure accuracy
    epochs: int = 10
    # Adam's starting rate, and "cosine" (decay to 0 over the run) or "constant". Measured with tools/tune_repair.py
    # (SmallCNN, seeds 10-12, training-split data outside the evaluation split; docs/design.md): a constant 3e-3
    # cost the clean model 1.4-3.4 points; cosine from 5e-3 cost it 0.1-0.5 and left BadNets and blend at 2.4-3.1%
    # attack success.
    lr: float = 5e-3
    schedule: str = "cosine"
    lr_floor: float = 0.0  # the cosine decays to this share of the starting rate
    # If the held-out accuracy falls by more than this, training restarts from the original weights at half the
    # rate, at most `backoffs` times: from 5e-3 the stride-1-stem SmallResNet lost 6-10 points, from 3e-3 none.
    max_accuracy_loss: float = 0.015
    backoffs: int = 2
    # ... and only if the fall is also this many standard errors of the paired difference above zero (held-out
    # samples it now gets wrong minus those it now gets right, against the square root of their sum): on a
    # 200-sample held-out set a 1.5-point fall is three samples, well within what a repair that costs nothing flips,
    # and each needless back-off halves the unlearning. Measured with tools/tune_repair.py (docs/design.md): the
    # three ResNet back-offs of seeds 10-11 stay, the one CNN back-off of seeds 10-14 goes (0.1 points more lost).
    backoff_z: float = 1.645
    # A fall past this share of the held-out samples is too costly whatever chance says: on a held-out set of a few
    # dozen no fall is beyond chance (10 samples going 0.70 -> 0.30 passed the z test), yet such a model is unfit.
    max_accuracy_fall: float = 0.05
    batch_size: int = 32
    strength: float = 1.0  # lambda: weight of the penalty (the mean over infected weights) against cross-entropy
    eps: float = 1e-3  # keeps the AR penalty finite for weights that start at zero
    acc_budget: float = 0.01  # prune only: clean accuracy the mask may cost
    # With candidate triggers (from `guard scan`): the channels with the largest ℓ∞ gap under each count as
    # infected too (0: none, and the gaps are not measured) ...
    gap_share: float = 0.1
    # ... and this share of each training batch is stamped with one of them, labels kept (unlearning the triggers).
    unlearn_share: float = 0.2
    seed: int = 0

    def validate(self) -> None:
        """Refuse settings that cannot repair, naming the option."""
        if self.method not in METHODS:
            raise GuardError(f"unknown repair method {self.method!r}: choose one of {', '.join(METHODS)}")
        if not 0 < self.holdout < 1:
            raise GuardError(f"holdout share must lie in (0, 1), got {self.holdout}")
        if isinstance(self.conv_taps, bool) or not isinstance(self.conv_taps, int) or self.conv_taps < 0:
            raise GuardError(f"conv taps must be a whole number >= 0, got {self.conv_taps!r}")
        if not 0 < self.benign_share <= 1:
            raise GuardError(f"benign share must lie in (0, 1], got {self.benign_share}")
        if self.schedule not in SCHEDULES:
            raise GuardError(f"unknown learning-rate schedule {self.schedule!r}: choose one of {', '.join(SCHEDULES)}")
        if not 0 <= self.lr_floor <= 1:
            raise GuardError(f"the learning rate's floor is a share of it in [0, 1], got {self.lr_floor}")
        if (not 0 <= self.max_accuracy_loss <= self.max_accuracy_fall <= 1 or self.backoffs < 0
                or not 0 <= self.backoff_z < math.inf):
            raise GuardError(f"the accuracy bound and the largest fall must lie in [0, 1], in that order, the "
                             f"back-offs be >= 0 and their z finite and >= 0, got {self.max_accuracy_loss}, "
                             f"{self.max_accuracy_fall}, {self.backoffs}, {self.backoff_z}")
        if not (0 <= self.gap_share <= 1 and 0 <= self.unlearn_share < 1):
            raise GuardError(f"the gap share must lie in [0, 1] and the unlearning share in [0, 1), got "
                             f"{self.gap_share}, {self.unlearn_share}")
        least = 0 if self.method == "prune" else 1  # a repair that trains for 0 epochs changes nothing
        if self.epochs < least or self.batch_size < 1:
            raise GuardError(f"--epochs must be >= {least}{'' if least == 0 else f' ({self.method} trains)'} and the "
                             f"batch size >= 1, got {self.epochs}, {self.batch_size}")
        for name in ("lr", "strength", "eps"):
            value = getattr(self, name)
            if not (np.isfinite(value) and value >= 0):
                raise GuardError(f"--{name} must be a finite number >= 0, got {value}")


@dataclass
class RepairReport:
    """What a repair did and what it cost, written next to the repaired model."""

    method: str
    infected: dict[str, int]  # per tap: channels outside the benign set (pruned channels, for `prune`)
    penalized_weights: int
    holdout_samples: int
    labelled: bool  # False: the accuracies are agreement with the model's own answers, 1.0 before by definition
    accuracy_before: float  # on the held-out clean samples (their labels, or the model's own answers)
    accuracy_after: float
    infected_norm_left: float | None  # ||infected weights|| after / before (None for `prune` and no infected)
    lr_used: float | None  # the starting rate of the kept run, after any back-off (None for `prune`)
    attempts: int  # training runs: 1, plus one per back-off
    # Whether the kept model's held-out accuracy stayed within the bound the back-off holds runs to (for every
    # method, prune included): False where even the last back-off cost too much, and the model is unfit to serve.
    within_bound: bool
    duplicates_dropped: int  # samples left out as repeats of an earlier one (the held-out part must be unseen)
    seconds: float
    settings: dict[str, object] = field(default_factory=dict)
    # Each training run's starting rate and held-out accuracy (agreement), the kept one last; none for `prune`.
    runs: list[dict[str, float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    @property
    def measure(self) -> str:
        """What the held-out figures are: accuracy against labels, or agreement with the model's own answers."""
        return _measure(self.labelled)

    def summary(self) -> str:
        norm = "" if self.infected_norm_left is None else f", infected weights' norm x{self.infected_norm_left:.3f}"
        measure = self.measure
        if self.attempts > 1:
            norm += f", lr backed off to {self.lr_used:g} after {self.attempts - 1} run(s) cost too much {measure}"
        if not self.within_bound:
            norm += f", past the {measure} bound: not fit to serve"
        return (f"{self.method}: {sum(self.infected.values())} infected channels {self.infected}, held-out {measure} "
                f"{self.accuracy_before:.3f} -> {self.accuracy_after:.3f} on {self.holdout_samples} samples"
                f"{norm}, {self.seconds:.1f} s")


def _measure(labelled: bool) -> str:
    return "accuracy" if labelled else "agreement with the model"


def penalty_coefficients(initial: torch.Tensor, infected: torch.Tensor, method: str, eps: float) -> torch.Tensor:
    """Per-weight c with penalty = sum c * w^2: 1/(|w0|+eps)^2 (ar) or 1 (l2) on infected weights, 0 elsewhere."""
    if method == "ar":
        return infected / (initial.abs() + eps) ** 2
    if method == "l2":
        return infected.clone()
    return torch.zeros_like(initial)


def _infected_masks(module: OnnxModule, proto: onnx.ModelProto,
                    benign: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Per initializer name, a 0/1 tensor marking the weights of channels outside their tap's benign set."""
    masks: dict[str, torch.Tensor] = {}
    for tap, inside in benign.items():
        outside = torch.as_tensor(np.flatnonzero(~inside))
        for layer in channel_producers(proto, tap):
            for name in (layer.weight, layer.bias):
                if name is None:
                    continue
                param = module.initializer(name)
                axis = layer.axis if name == layer.weight else 0
                if param.shape[axis] != len(inside):
                    raise ModelError(f"{name!r} has {param.shape[axis]} channels, tap {tap!r} has {len(inside)}")
                mask = masks.setdefault(name, torch.zeros_like(param))
                mask.index_fill_(axis, outside, 1.0)
    return masks


def _trainable(proto: onnx.ModelProto, module: OnnxModule) -> dict[str, torch.nn.Parameter]:
    """The float weights and biases of the linear layers and batch norms (not their running statistics)."""
    return {name: module.initializer(name) for name in trained_initializers(proto) if name in module.param_keys}


def _refuse_narrow_weights(params: dict[str, torch.nn.Parameter], method: str) -> None:
    """Training float16 weights in place fails quietly: Adam's eps is 0 there, so a weight with no gradient becomes
    0/0, and AR's 1/(|w0|+eps)^2 overflows; every weight ended NaN and the run blamed the learning rate."""
    narrow = {name: str(p.dtype).removeprefix("torch.") for name, p in params.items() if p.dtype != torch.float32}
    if narrow:
        names = ", ".join(f"{name} ({dtype})" for name, dtype in list(narrow.items())[:3])
        raise GuardError(f"--method {method} trains float32 weights; this model keeps {len(narrow)} as another type, "
                         f"e.g. {names}: repair the float32 model and convert the result")


def _predict(module: OnnxModule, output: str, x: np.ndarray, batch_size: int = 512) -> np.ndarray:
    with torch.no_grad():
        outs = [module.run(torch.as_tensor(x[i:i + batch_size]))[0][output] for i in range(0, len(x), batch_size)]
    return torch.cat(outs).argmax(dim=1).numpy()


def _fine_tune(module: OnnxModule, output: str, params: dict[str, torch.nn.Parameter],
               coefficients: dict[str, torch.Tensor], x: np.ndarray, y: np.ndarray,
               settings: RepairSettings, triggers: Sequence[AnyTrigger], lr: float) -> None:
    for param in params.values():
        param.requires_grad_(True)
    optimizer = torch.optim.Adam(params.values(), lr=lr)
    steps = settings.epochs * math.ceil(len(x) / settings.batch_size)
    decay = (torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(steps, 1), eta_min=settings.lr_floor * lr)
             if settings.schedule == "cosine" else None)
    count = sum(int(c.count_nonzero()) for c in coefficients.values())
    generator = torch.Generator().manual_seed(settings.seed)
    inputs, targets = torch.as_tensor(x), torch.as_tensor(y)
    for _ in range(settings.epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(order), settings.batch_size):
            batch = order[start:start + settings.batch_size]
            images = inputs[batch]
            if triggers and settings.unlearn_share > 0:
                images = _unlearning_batch(images, triggers, settings.unlearn_share, generator)
            logits = module.run(images)[0][output]
            loss = F.cross_entropy(logits, targets[batch])
            if count:
                penalty = sum((c * params[name] ** 2).sum() for name, c in coefficients.items())
                loss = loss + settings.strength * penalty / count
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if decay is not None:
                decay.step()
    for param in params.values():
        param.requires_grad_(False)


def _costly(right_before: np.ndarray, right: np.ndarray, settings: RepairSettings) -> bool:
    """Whether a run cost more held-out accuracy than allowed, by more than chance: the samples it now gets wrong
    outnumber those it now gets right by over `max_accuracy_loss` of the held-out set and by `backoff_z` standard
    errors of that paired difference; or, chance or not, by over `max_accuracy_fall` of it."""
    fall = int((right_before & ~right).sum()) - int((~right_before & right).sum())
    changed = int((right_before != right).sum())
    return (fall > settings.max_accuracy_fall * len(right)
            or (fall > settings.max_accuracy_loss * len(right) and fall > settings.backoff_z * math.sqrt(changed)))


def _unlearning_batch(images: torch.Tensor, triggers: Sequence[AnyTrigger], share: float,
                      generator: torch.Generator) -> torch.Tensor:
    """`images` with about `share` of them stamped (or warped), each with one of `triggers` drawn at random."""
    stamp = torch.rand(len(images), generator=generator) < share
    which = torch.randint(len(triggers), (len(images),), generator=generator)
    out = images.clone()
    for number, trigger in enumerate(triggers):
        rows = stamp & (which == number)
        if rows.any():
            out[rows] = trigger.stamp(images[rows])
    return out


def _write_weights(proto: onnx.ModelProto, params: dict[str, torch.nn.Parameter]) -> onnx.ModelProto:
    """A copy of `proto` whose initializers hold the trained values, in their own dtypes."""
    dtypes = {init.name: onnx.helper.tensor_dtype_to_np_dtype(init.data_type) for init in proto.graph.initializer}
    return with_initializers(proto, {name: param.detach().numpy().astype(dtypes[name])
                                     for name, param in params.items()})


def _gap_infected(tap_model: OnnxTaps, x: np.ndarray, triggers: Sequence[AnyTrigger], share: float,
                  ) -> list[np.ndarray]:
    """Per tap, (C,) bool: for each trigger, the `share` of channels whose mean ℓ∞ it raises most (positive gaps
    only); the union over the triggers."""
    with torch.no_grad():
        clean = collect(tap_model, x).linf
        gaps = [linf_gap(clean, collect(tap_model, trigger.apply(x)).linf) for trigger in triggers]
    marked = [np.zeros(len(values), dtype=bool) for values in gaps[0]]
    for gap in gaps:
        for mask, values in zip(marked, gap, strict=True):
            top = np.argsort(-values, kind="stable")[: math.ceil(round(share * len(values), 9))]
            mask[top[values[top] > 0]] = True
    return marked


def repair(model: str | Path | LoadedModel, x: np.ndarray, y: np.ndarray | None = None, *,
           settings: RepairSettings | None = None, triggers: Sequence[AnyTrigger] = (),
           split: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[onnx.ModelProto, RepairReport]:
    """Purify `model` with clean samples `x` (and labels `y`, else the model's own answers); returns the repaired
    ONNX model (same inputs and outputs; recalibrate before serving it) and a report. `triggers` are candidate
    triggers (from `guard scan`) to unlearn; AR and L2 also penalise the channels they light up. `split`: indices of
    the samples that measure accuracy, kept out of training, and of those trained on (default: `holdout_split` with
    the settings' share and seed; `prune` calibrates on all of `x` and measures on the first).

    Example::

        repaired, report = repair("model.onnx", x_clean, y_clean, settings=RepairSettings(method="ar"))
        onnx.save(repaired, "repaired.onnx")
    """
    settings = settings or RepairSettings()
    settings.validate()
    started = time.perf_counter()
    torch.manual_seed(settings.seed)
    loaded = model if isinstance(model, LoadedModel) else load_model(model)
    x, y = as_samples(x, y, "repair")
    check_samples(x, y, loaded.sample_shape, loaded.num_classes, "repair", every_class=True)
    if triggers and settings.method == "prune":
        raise GuardError("--method prune folds the calibrated static mask in and trains nothing, so it has no use "
                         "for triggers: give them to ar, l2 or finetune")
    given = len(x)
    if split is None:  # (a given split indexes the data as it is)
        x, y = without_repeats(x, y, loaded.sample_shape, loaded.num_classes, "repair")
    if settings.method != "prune":
        refuse_untrainable(loaded.proto, f"--method {settings.method}")
    penalised = settings.method in ("ar", "l2")
    taps = list(settings.layers) if settings.layers else default_taps(loaded, conv_taps=settings.conv_taps,
                                                                      repairable=penalised)
    validate_taps(loaded, taps)
    unrepairable = unrepairable_taps(loaded.proto, taps)
    if unrepairable and penalised:
        raise ModelError(f"--method {settings.method} penalises the weights that compute each tap's channels; no "
                         f"Conv/Gemm/MatMul layer computes those of {unrepairable} (a flattened conv map, say): name "
                         "other --layers, such as the conv activation itself")
    hold, fit = split if split is not None else holdout_split(len(x), settings.holdout, settings.seed)
    if not len(fit):
        raise GuardError(f"holding out {len(hold)} of {len(x)} samples leaves none to train on")
    both = np.concatenate([hold, fit])
    if (not len(hold) or not np.issubdtype(both.dtype, np.integer) or len(np.unique(both)) != len(both)
            or not ((0 <= both) & (both < len(x))).all()):
        raise GuardError("the held-out and fit samples must be distinct integer indices into the data, some of each")
    module = OnnxModule(loaded.proto).eval()
    if settings.method != "prune":
        _refuse_narrow_weights(_trainable(loaded.proto, module), settings.method)
    output = loaded.output_name
    labels = y if y is not None else _predict(module, output, x)
    unanswered = sorted(set(range(loaded.num_classes)) - set(np.unique(labels).tolist()))
    if y is None and settings.method != "prune" and unanswered:  # labelled, check_samples refused it above
        raise GuardError(f"the model answers none of the {len(x)} unlabelled repair samples with class(es) "
                         f"{unanswered[:10]}: fine-tuned on its own answers it would forget them; give samples of "
                         "every class, or their labels y")
    right_before = _predict(module, output, x[hold]) == labels[hold]
    accuracy_before = float(right_before.mean())
    runs: list[dict[str, float]] = []
    if settings.method == "prune":
        from guard.calibrate.pipeline import CalibrationSettings, calibrate

        # calibrate's own taps and held-out share unless given: the mask `guard calibrate` would choose
        profile = calibrate(loaded, x, y, settings=CalibrationSettings(
            layers=settings.layers, acc_budget=settings.acc_budget, benign_share=settings.benign_share,
            seed=settings.seed, reference=False))  # the mask alone: no fine-tuned copy
        taps = profile.tap_names
        repaired, _ = fold_static_mask(loaded, profile.keep_masks())
        infected = {t.name: int((~t.keep).sum()) for t in profile.taps}
        penalized, norm_left, lr_used, attempts = 0, None, None, 0
    else:
        with torch.enable_grad():
            acts = collect(OnnxTaps(loaded, taps), x[fit], labels[fit], with_salience=True)
        benign = [benign_set(benign_salience(s), settings.benign_share) for s in acts.salience or []]
        if triggers and settings.gap_share > 0:
            gap = _gap_infected(OnnxTaps(loaded, taps), x[fit], triggers, settings.gap_share)
            benign = [inside & ~hit for inside, hit in zip(benign, gap, strict=True)]
        infected = {tap: int((~inside).sum()) for tap, inside in zip(taps, benign, strict=True)}
        # fine-tuning penalises nothing; it measures what is left of the weights it could have penalised
        masks = _infected_masks(module, loaded.proto, {tap: inside for tap, inside in zip(taps, benign, strict=True)
                                                       if tap not in unrepairable})
        params = _trainable(loaded.proto, module)
        initial = {name: p.detach().clone() for name, p in params.items()}
        coefficients = {name: penalty_coefficients(initial[name], m, settings.method, settings.eps)
                        for name, m in masks.items() if name in params}
        coefficients = {name: c for name, c in coefficients.items() if c.count_nonzero()}
        lr, attempts = settings.lr, 0
        while True:
            attempts += 1
            _fine_tune(module, output, params, coefficients, x[fit], labels[fit], settings, triggers, lr)
            right = _predict(module, output, x[hold]) == labels[hold]
            runs.append({"lr": lr, "accuracy_after": float(right.mean())})
            if not _costly(right_before, right, settings) or attempts > settings.backoffs:
                break
            log.info("repair: held-out %s %.3f -> %.3f at lr %g; retrying at %g", _measure(y is not None),
                     accuracy_before, right.mean(), lr, lr / 2)
            lr /= 2
            with torch.no_grad():
                for name, param in params.items():
                    param.copy_(initial[name])
        repaired = _write_weights(loaded.proto, params)
        penalized = sum(int(m.count_nonzero()) for m in masks.values())
        before = sum(float(((initial[n] * m) ** 2).sum()) for n, m in masks.items() if n in params)
        after = sum(float(((params[n].detach() * m) ** 2).sum()) for n, m in masks.items() if n in params)
        norm_left = float(np.sqrt(after / before)) if before > 0 else None
        lr_used: float | None = lr

    right_after = _predict(OnnxModule(repaired).eval(), output, x[hold]) == labels[hold]
    report = RepairReport(
        method=settings.method, infected=infected, penalized_weights=penalized, holdout_samples=len(hold),
        labelled=y is not None,
        accuracy_before=accuracy_before, accuracy_after=float(right_after.mean()), infected_norm_left=norm_left,
        lr_used=lr_used, attempts=attempts, within_bound=not _costly(right_before, right_after, settings),
        duplicates_dropped=given - len(x),
        seconds=round(time.perf_counter() - started, 3), settings={**asdict(settings), "layers": taps}, runs=runs,
    )
    return repaired, report
