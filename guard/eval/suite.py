"""`guard eval`: the protocol of EVALUATION.md, end to end, on models trained here on real Fashion-MNIST.

One *case* is an attack × architecture × seed: poison a training subset, train, export to ONNX, then measure on the
same model and the same images every defense in the report: no defense, fine-pruning, fine-tuning, STRIP, each of
guard's seed methods alone (ℓ∞-gap pruning from a synthesized trigger, benign-salience pruning, the consistency
check, AR repair, NONE training) and the default combination, plus PGD adversarial examples. Cases are independent, so they run in worker processes.
Thresholds come from the defender's clean set only; triggered images are used for measuring, never for choosing.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import platform
import signal
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from functools import cache
from importlib import import_module
from multiprocessing import get_context
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from guard.eval.metrics import at_least, at_most, auroc, roc_curve, share

if TYPE_CHECKING:
    from guard.eval.attacks import Attack

# torch and the attacks are imported where a case runs, so that `guard --help` and `guard serve` stay light.

log = logging.getLogger(__name__)

TARGET = 0
FASHION_TRAIN = 60_000  # images in the Fashion-MNIST training split, which each case samples its training set from


@dataclass(frozen=True)
class AttackSpec:
    """One row of EVALUATION.md's attack table."""

    name: str
    attack_class: str | None  # a class of guard.eval.attacks; None: the clean model
    rate: float

    def make(self) -> Attack | None:
        """A fresh attack object, or None for the clean model."""
        if self.attack_class is None:
            return None
        return getattr(import_module("guard.eval.attacks"), self.attack_class)()


ATTACKS: dict[str, AttackSpec] = {
    spec.name: spec
    for spec in (
        AttackSpec("badnets", "BadNets", 0.10),
        AttackSpec("badnets-1%", "BadNets", 0.01),
        AttackSpec("blend", "Blend", 0.10),
        # The rate is a share of the source class: 10% of it (about 200 images of 20k against 1,600 cover images)
        # left attack success near 0.5, so 50% (5% of the set) makes a backdoor worth defending against.
        AttackSpec("source-specific", "SourceSpecific", 0.50),
        AttackSpec("wanet", "WaNet", 0.10),
        AttackSpec("adaptive", "Adaptive", 0.005),
        AttackSpec("clean", None, 0.0),
    )
}
ARCHS = ("cnn", "resnet")


# `guard eval --quick` fails (exit 1) when its figures fall below these floors. They are floors for CI, well below
# the targets: the quick models are weak (6k images, CA about 0.78; measured guarded ASR 0.15, AUROC 0.993,
# FPR 0.04, accuracy loss up to 1.3 points), but far from what a guard that had stopped working would show
# (undefended ASR about 0.99, a blind check's AUROC about 0.5).
QUICK_FLOORS = {
    "badnets: attack success of the undefended model, at least": ("badnets", "none", "asr", ">=", 0.80),
    "badnets: attack success under guard, at most": ("badnets", "guard", "asr", "<=", 0.30),
    "badnets: detection AUROC, at least": ("badnets", "guard", "auroc", ">=", 0.95),
    "badnets: clean requests flagged, at most": ("badnets", "guard", "fpr", "<=", 0.10),
    "clean model: clean requests flagged, at most": ("clean", "guard", "fpr", "<=", 0.10),
    # AR repair with the scan's trigger: measured 0.028 on the quick model; fine-tuning alone leaves about 0.27.
    "badnets: attack success after AR repair, at most": ("badnets", "ar-repair", "asr", "<=", 0.15),
}
QUICK_MAX_ACCURACY_LOSS = 0.03  # clean accuracy guard may cost on either quick case


def below_floor(figures: dict[str, object]) -> list[str]:
    """The quick run's floors that `figures` break, each as a line naming the figure and its value; a floor whose
    attack has no case in the run is broken too (it was not checked)."""
    measured = {case["attack"] for case in figures["cases"]}  # type: ignore[union-attr]
    broken = [f"{text} {bound}: no {attack} case in the run" for text, (attack, *_, bound) in QUICK_FLOORS.items()
              if attack not in measured]
    for case in figures["cases"]:  # type: ignore[union-attr]
        methods = case["methods"]
        for text, (attack, method, key, op, bound) in QUICK_FLOORS.items():
            if case["attack"] != attack:
                continue
            value = methods.get(method, {}).get(key)
            if value is None or not np.isfinite(value):
                broken.append(f"{text} {bound}: no figure ({case['arch']}, seed {case['seed']})")
            elif not (at_least(value, bound) if op == ">=" else at_most(value, bound)):
                broken.append(f"{text} {bound}: got {value:.4f} ({case['arch']}, seed {case['seed']})")
        loss = methods["none"]["ca"] - methods["guard"]["ca"]
        if not at_most(loss, QUICK_MAX_ACCURACY_LOSS):  # NaN breaks the floor too
            broken.append(f"{case['attack']}: clean accuracy lost under guard, at most {QUICK_MAX_ACCURACY_LOSS}: "
                          f"got {loss:.4f} ({case['arch']}, seed {case['seed']})")
    return broken


@dataclass
class EvalSettings:
    """What one `guard eval` run covers; recorded in the report."""

    attacks: list[str] = field(default_factory=lambda: list(ATTACKS))
    archs: list[str] = field(default_factory=lambda: list(ARCHS))
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    n_train: int = 20_000  # training subset per case (full-suite time budget: 60 min on 2 cores)
    epochs: int = 3
    n_clean: int = 1000  # the defender's clean set: the first n_clean test images
    n_eval: int | None = None  # evaluation images after them (None: the rest of the test split)
    fpr: float = 0.05
    acc_budget: float = 0.01
    strip_samples: int = 400  # STRIP is 64 forwards per image: measured on this many clean and triggered
    adversarial_samples: int = 500
    scan_steps: int = 150
    workers: int = 2
    quick: bool = False

    @classmethod
    def quick_run(cls) -> EvalSettings:
        """A CI-sized subset: badnets and the clean model, small CNN, one seed, small data."""
        return cls(attacks=["badnets", "clean"], archs=["cnn"], seeds=[0], n_train=6000, epochs=3, n_clean=500,
                   n_eval=2000, strip_samples=300, adversarial_samples=200, scan_steps=100, quick=True)

    def validate(self) -> None:
        """Refuse a run that could not produce meaningful figures, before an hour is spent on it."""
        unknown = [a for a in self.attacks if a not in ATTACKS] + [a for a in self.archs if a not in ARCHS]
        if unknown:
            raise ValueError(f"unknown attack or architecture {unknown}: choose from {list(ATTACKS)} and {ARCHS}")
        for name, values in (("attacks", self.attacks), ("archs", self.archs), ("seeds", self.seeds)):
            if not values:
                raise ValueError(f"at least one of {name} is needed")
            if len(set(values)) != len(values):
                raise ValueError(f"{name} repeat a value ({values}): repeated cases are not independent runs")
        if min(self.seeds) < 0 or max(self.seeds) >= 2**32:  # numpy's generators take none, torch's no larger
            raise ValueError(f"seeds must lie in 0..2^32-1, got {self.seeds}")
        if not 100 <= self.n_train <= FASHION_TRAIN or self.epochs < 1 or self.workers < 1:
            raise ValueError(f"n_train must lie in 100..{FASHION_TRAIN:,} (the training split), epochs and workers "
                             "must be at least 1")
        if self.n_clean < 20:
            raise ValueError(f"the defender's clean set needs at least 20 images (calibration's minimum), "
                             f"got {self.n_clean}")
        if self.n_eval is not None and self.n_eval < 100:
            raise ValueError(f"at least 100 evaluation images are needed, got {self.n_eval}")


@dataclass(frozen=True)
class Case:
    """One attack × architecture × seed: one trained model and every defense measured on it."""

    attack: str
    arch: str
    seed: int


@cache
def _fashion() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from guard.eval.datasets import load_fashion_mnist

    x_train, y_train = load_fashion_mnist("train")
    x_test, y_test = load_fashion_mnist("test")
    return x_train, y_train, x_test, y_test


def _timed(fn: Callable[[], object]) -> tuple[object, float]:
    started = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - started


@dataclass(frozen=True, eq=False)
class _Truth:
    """What every defense's answers are scored against: the evaluation images' labels and, on an attacked model,
    which of them are triggered (the attack's victims; the triggered batch holds them in the same order)."""

    labels: np.ndarray
    victims: np.ndarray | None  # (N,) bool over the evaluation images; None on the clean model

    def score(self, labels: np.ndarray, trig_labels: np.ndarray | None) -> dict[str, float | None]:
        """Clean accuracy, attack success and robust accuracy of one defense's answers, and `untouched`: the share
        of the victims answered with the target class without the trigger, the part of attack success the trigger
        does not account for (the same model's own confusions into the target)."""
        row: dict[str, float | None] = {"ca": share(labels == self.labels), "asr": None, "ra": None,
                                        "untouched": None}
        if trig_labels is not None and self.victims is not None:
            row["asr"] = share(trig_labels == TARGET)
            row["ra"] = share(trig_labels == self.labels[self.victims])
            row["untouched"] = share(labels[self.victims] == TARGET)
        return row


def _detection(clean_score: np.ndarray, clean_flag: np.ndarray, trig_score: np.ndarray | None,
               trig_flag: np.ndarray | None, took: np.ndarray | None = None) -> dict[str, object]:
    """FPR, TPR and AUROC of a per-request score; with `took` (the triggered images the undefended model answers
    with the target class) also TPR and AUROC on those alone, and how many there were: a trigger that did not take
    leaves the model much as a clean image does, and the protocol's AUROC mixes the two."""
    row: dict[str, object] = {"fpr": share(clean_flag), "tpr": None, "auroc": None, "roc": None,
                              "tpr_took": None, "auroc_took": None, "n_took": None}
    if trig_score is not None and trig_flag is not None:
        fpr, tpr = roc_curve(clean_score, trig_score, points=51)
        row.update(tpr=share(trig_flag), auroc=auroc(clean_score, trig_score),
                   roc={"fpr": fpr.round(4).tolist(), "tpr": tpr.round(4).tolist()})
        if took is not None:
            row.update(tpr_took=share(trig_flag[took]), auroc_took=auroc(clean_score, trig_score[took]),
                       n_took=int(took.sum()))
    return row


def run_case(case: Case, settings: EvalSettings) -> dict[str, object]:
    """Train one backdoored model and measure every defense on it; returns the case's figures."""
    import torch

    from guard.calibrate.pipeline import CalibrationSettings, calibrate
    from guard.eval.adversarial import pgd
    from guard.eval.baselines import Strip, fine_prune
    from guard.eval.models import OrtClassifier, build_model, export_onnx, predict, train
    from guard.model.graph import load_model
    from guard.runtime.guard import Guard
    from guard.runtime.policy import Policy
    from guard.scan import ScanSettings, run_scan

    torch.set_num_threads(1)
    started = time.perf_counter()
    spec = ATTACKS[case.attack]
    attack = spec.make()
    x_train_all, y_train_all, x_test, y_test = _fashion()
    rng = np.random.default_rng(case.seed)
    subset = np.sort(rng.choice(len(x_train_all), size=min(settings.n_train, len(x_train_all)), replace=False))
    x_train, y_train = x_train_all[subset], y_train_all[subset]
    poisoned = np.zeros(len(x_train), dtype=bool)
    if attack is not None:
        x_train, y_train, index = attack.poison(x_train, y_train, spec.rate, TARGET, rng)
        poisoned = np.zeros(len(x_train), dtype=bool)
        poisoned[index] = True
    n_poisoned = int(poisoned.sum())
    torch.manual_seed(case.seed)
    module = build_model(case.arch)  # type: ignore[arg-type]
    _, train_seconds = _timed(lambda: train(module, x_train, y_train, epochs=settings.epochs, seed=case.seed))

    x_def, y_def = x_test[: settings.n_clean], y_test[: settings.n_clean]
    stop = None if settings.n_eval is None else settings.n_clean + settings.n_eval
    x_eval, y_eval = x_test[settings.n_clean : stop], y_test[settings.n_clean : stop]
    x_trig = None
    truth = _Truth(y_eval, None if attack is None else attack.victims(y_eval, TARGET))
    if attack is not None:
        x_trig = attack.apply(x_eval[truth.victims], np.random.default_rng(case.seed + 1))

    def both(fn: Callable[[np.ndarray], np.ndarray]) -> tuple[np.ndarray, np.ndarray | None]:
        return fn(x_eval), None if x_trig is None else fn(x_trig)

    figures: dict[str, object] = {
        "attack": case.attack, "arch": case.arch, "seed": case.seed, "rate": spec.rate,
        "n_train": len(x_train), "n_poisoned": n_poisoned, "n_clean": len(x_def), "n_eval": len(x_eval),
        "n_triggered": 0 if x_trig is None else len(x_trig), "train_seconds": round(train_seconds, 1),
    }
    methods: dict[str, dict[str, object]] = {}
    with tempfile.TemporaryDirectory(prefix="guard-eval-") as tmp:
        model_path = export_onnx(module, Path(tmp) / "model.onnx", torch.zeros(1, *x_def.shape[1:]))
        loaded = load_model(model_path)
        served = OrtClassifier.load(model_path.read_bytes())  # the forward-only passes, as the guard runs the model
        clean_labels, trig_labels = both(lambda x: predict(served, x))
        methods["none"] = truth.score(clean_labels, trig_labels)
        took = None if trig_labels is None else trig_labels == TARGET

        scan = run_scan(loaded, x_def, y_def, settings=ScanSettings(steps=settings.scan_steps,
                                                                     acc_budget=settings.acc_budget, seed=case.seed))
        # guard: the default combination (static mask, check, the scan's suspect, the reference), and the consistency
        # check alone
        for name, prune in (("guard", True), ("check", False)):
            cal = CalibrationSettings(fpr=settings.fpr, acc_budget=settings.acc_budget, prune=prune,
                                      suspect=scan.classes.suspect if prune else None, reference=prune,
                                      seed=case.seed)
            triggers = scan.candidates if prune else []
            profile, seconds = _timed(lambda cal=cal, triggers=triggers: calibrate(loaded, x_def, y_def, settings=cal,
                                                                                  triggers=triggers))
            guarded = Guard(loaded, profile, policy=Policy.ENFORCE, threads=1)  # type: ignore[arg-type]
            clean, trig = both(guarded.predict)
            row = truth.score(clean.labels, None if trig is None else trig.labels)
            row.update(_detection(clean.score, clean.flagged, None if trig is None else trig.score,
                                  None if trig is None else trig.flagged, took))
            row["calibration_seconds"] = round(seconds, 2)
            methods[name] = row
            if prune:
                # what the reference adds: the same profile without it
                plain = Guard(loaded, profile.without_reference(), policy=Policy.ENFORCE,  # type: ignore[arg-type]
                              threads=1)
                plain_clean, plain_trig = both(plain.predict)
                methods["guard-no-reference"] = truth.score(plain_clean.labels,
                                                            None if plain_trig is None else plain_trig.labels)
                row["overruled_clean"] = float(clean.overruled.mean())
                row["overruled_triggered"] = None if trig is None else float(trig.overruled.mean())
                # benign-salience pruning alone: the statically masked model's own answers (the monitor view)
                methods["salience-prune"] = truth.score(clean.model_labels,
                                                        None if trig is None else trig.model_labels)
                methods["salience-prune"]["pruned"] = sum(profile.figures["pruned_channels"].values())
                figures["overhead"] = _overhead(served, guarded, x_eval)
                figures["adversarial"] = _adversarial(module, guarded, x_eval, y_eval, settings, case.seed, pgd)

        pruning = fine_prune(module, x_def, y_def, budget=settings.acc_budget)
        pruned_clean, pruned_trig = both(lambda x: predict(pruning.model, x))
        methods["fine-pruning"] = truth.score(pruned_clean, pruned_trig)
        methods["fine-pruning"].update(pruned=len(pruning.pruned))  # type: ignore[arg-type]

        methods["strip"] = _strip(served, x_def, x_eval, x_trig, took, settings, case.seed, Strip)
        methods["linf-prune"], figures["scan"] = _linf_prune(loaded, scan, x_eval, x_trig, truth,
                                                            (clean_labels, trig_labels))
        methods.update(_repairs(loaded, scan.candidates, x_def, y_def, both, truth, case.seed))
        methods["none-train"] = _none_train(module, x_train, y_train, poisoned, settings, case.seed, both, truth)

    if attack is None:
        figures["trigger_floor"] = _trigger_floor(clean_labels, served, x_eval, y_eval, case.seed)
    figures["methods"] = methods
    figures["seconds"] = round(time.perf_counter() - started, 1)
    return figures


def _trigger_floor(clean_labels: np.ndarray, module, x_eval: np.ndarray, y_eval: np.ndarray,
                   seed: int) -> dict[str, float]:
    """On the clean model: the share of each attack's triggered images it answers with the target class anyway, and
    (key "clean") the share of untouched non-target images it answers so. No backdoor is there to remove, so this
    is the attack success rate that even a perfect repair or guard leaves."""
    from guard.eval.models import predict

    floor = {"clean": float((clean_labels[y_eval != TARGET] == TARGET).mean())}
    for name, spec in ATTACKS.items():
        attack = spec.make()
        if attack is None:
            continue
        victims = attack.victims(y_eval, TARGET)
        triggered = attack.apply(x_eval[victims], np.random.default_rng(seed + 1))
        floor[name] = float((predict(module, triggered) == TARGET).mean())
    return floor


def _overhead(bare, guarded, x: np.ndarray, batch: int = 64) -> dict[str, float]:
    """Per-request cost of the guarded engine against the bare model (an `OrtClassifier`: its ONNX Runtime session
    on one thread), timed side by side at one batch size."""
    chunks = [x[i : i + batch] for i in range(0, min(len(x), 64 * batch), batch)]

    def run_bare() -> None:
        for chunk in chunks:
            bare.session.run(None, {bare.input_name: chunk})

    def run_guarded() -> None:
        for chunk in chunks:
            guarded.predict(chunk)

    run_bare(), run_guarded()  # warm both
    bare_seconds = min(_timed(run_bare)[1] for _ in range(3))
    guarded_seconds = min(_timed(run_guarded)[1] for _ in range(3))
    return {"batch": batch, "bare_ms_per_batch": 1e3 * bare_seconds / len(chunks),
            "guarded_ms_per_batch": 1e3 * guarded_seconds / len(chunks), "ratio": guarded_seconds / bare_seconds}


def _adversarial(module, guarded, x: np.ndarray, y: np.ndarray, settings: EvalSettings, seed: int, pgd,
                 ) -> dict[str, float]:
    """PGD (ℓ∞ 0.1, 10 steps) against the unguarded model: how many the guard flags, and accuracy under it."""
    from guard.eval.models import predict

    n = min(settings.adversarial_samples, len(x))
    index = np.random.default_rng(seed).choice(len(x), size=n, replace=False)
    x_adv = pgd(module, x[index], y[index], eps=0.1, steps=10, seed=seed)
    result = guarded.predict(x_adv)
    return {"samples": n, "accuracy_unguarded": share(predict(module, x_adv) == y[index]),
            "accuracy_guarded": share(result.labels == y[index]), "flagged": share(result.flagged)}


def _strip(module, x_def: np.ndarray, x_eval: np.ndarray, x_trig: np.ndarray | None, took: np.ndarray | None,
           settings: EvalSettings, seed: int, strip_cls) -> dict[str, object]:
    """STRIP on a subsample (64 forwards per image): threshold at the target FPR on the defender's set."""
    rng = np.random.default_rng(seed)
    half = len(x_def) // 2  # overlays from one half, threshold from the other (an image blended with itself
    strip = strip_cls(module, x_def[:half], n_overlays=64, alpha=0.5, seed=seed)  # is itself: confident)
    strip.fit_threshold(x_def[half:], settings.fpr)
    n = min(settings.strip_samples, len(x_eval))
    clean = x_eval[rng.choice(len(x_eval), size=n, replace=False)]
    clean_score = strip.score(clean)
    row = {"ca": None, "asr": None, "ra": None}
    trig_score = trig_flag = trig_took = None
    if x_trig is not None:
        picked = rng.choice(len(x_trig), size=min(n, len(x_trig)), replace=False)
        trig_score = strip.score(x_trig[picked])
        trig_flag = trig_score > strip.threshold
        trig_took = None if took is None else took[picked]
    row.update(_detection(clean_score, clean_score > strip.threshold, trig_score, trig_flag, trig_took))
    return row


def _linf_prune(loaded, scan, x_eval, x_trig, truth: _Truth, unguarded: tuple[np.ndarray, np.ndarray | None],
                ) -> tuple[dict[str, object], dict[str, object]]:
    """ℓ∞-gap pruning fed by trigger synthesis (ALGORITHMS.md sections 1 and 5): prune if the scan suspects a class;
    with no suspect nothing is pruned and the row equals no defense."""
    import torch

    from guard.calibrate.activations import collect
    from guard.calibrate.taps import OnnxTaps

    labels, trig_labels = unguarded
    pruned = 0
    if scan.pruning is not None:
        taps = OnnxTaps(loaded, scan.taps)
        masks = [k.astype(np.float32)[None, :] for k in scan.pruning.keep]
        with torch.no_grad():
            labels = collect(taps, x_eval, masks=masks).predictions
            trig_labels = None if x_trig is None else collect(taps, x_trig, masks=masks).predictions
        pruned = scan.pruning.pruned
    row = truth.score(labels, trig_labels)
    row["pruned"] = pruned
    index = scan.classes.anomaly_index
    return row, {"suspect": scan.classes.suspect, "candidates": [t.target for t in scan.candidates],
                 "anomaly_index": [round(float(v), 3) for v in index],
                 "warp_suspect": None if scan.warps is None else scan.warps.suspect,
                 "warp_index": None if scan.warps is None else [round(float(v), 3) for v in scan.warps.anomaly_index],
                 "warp_success": None if scan.warps is None else [round(float(v), 3) for v in scan.warps.success],
                 "blend_suspect": None if scan.blends is None else scan.blends.suspect,
                 "blend_index": None if scan.blends is None else [round(float(v), 3)
                                                                  for v in scan.blends.anomaly_index],
                 "blend_success": None if scan.blends is None else [round(float(v), 3) for v in scan.blends.success],
                 "seconds": scan.figures["seconds"]}


def _repairs(loaded, triggers: list, x_def: np.ndarray, y_def: np.ndarray, both, truth: _Truth,
             seed: int) -> dict[str, dict[str, object]]:
    """`guard repair` on the defender's clean set: plain fine-tuning (the baseline, no trigger), then AR on the
    infected weights, which also unlearns the triggers of the scan's candidate classes. (L2 is left out of
    the full run to keep it within its hour; `guard repair --method l2` measures it.)"""
    from guard.eval.models import OrtClassifier, predict
    from guard.repair.adaptive_reg import RepairSettings, repair

    rows: dict[str, dict[str, object]] = {}
    for name, method in (("fine-tuning", "finetune"), ("ar-repair", "ar")):
        unlearned = [] if method == "finetune" else triggers
        repaired, report = repair(loaded, x_def, y_def, settings=RepairSettings(method=method, seed=seed),
                                  triggers=unlearned)
        served = OrtClassifier.load(repaired.SerializeToString())
        clean, trig = both(lambda x, served=served: predict(served, x))
        rows[name] = truth.score(clean, trig)
        rows[name].update(seconds=report.seconds, infected=sum(report.infected.values()),
                          unlearned=[t.target for t in unlearned])
    return rows


def _none_train(module, x_train: np.ndarray, y_train: np.ndarray, poisoned: np.ndarray, settings: EvalSettings,
                seed: int, both, truth: _Truth) -> dict[str, object]:
    """NONE training. Its first step, normal training, is the undefended model's own (same data, seed and epochs),
    so the rounds start from a copy of it."""
    import copy

    from guard.eval.models import predict
    from guard.repair.none import NoneSettings, train_none

    model = copy.deepcopy(module)
    report = train_none(model, x_train, y_train, settings=NoneSettings(epochs=settings.epochs, seed=seed),
                        poisoned=poisoned if poisoned.any() else None, pretrained=True)
    clean, trig = both(lambda x: predict(model, x))  # exporting it for ONNX Runtime would cost what it saves
    row = truth.score(clean, trig)
    unlearned = [i for r in report.rounds for i in r.unlearned]
    row.update(seconds=report.seconds, drop=report.settings["drop"], removed=len(report.removed),
               precision=report.precision, recall=report.recall, unlearned=len(unlearned),
               unlearned_precision=float(poisoned[unlearned].mean()) if unlearned and poisoned.any() else None,
               split=[r.split for r in report.rounds], spread=[r.spread for r in report.rounds],
               agreement=[r.agreement for r in report.rounds],
               poisoned_classes=[r.poisoned_classes for r in report.rounds])
    return row


def _cpu_model() -> str:
    """The processor's name: run times, and on CPU even the trained models (kernels differ by instruction set),
    depend on it."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


class CaseFailed(Exception):
    """A case's error, as its text: the exception a case raised in a worker may not unpickle in the parent (one
    whose constructor takes other arguments), and one that does not broke the whole pool, every case lost with it."""


def _run_case_in_worker(case: Case, settings: EvalSettings) -> dict[str, object]:
    try:
        return run_case(case, settings)
    except Exception as exc:  # the worker's traceback comes along as the remote one, chained
        raise CaseFailed(f"{type(exc).__name__}: {exc}") from exc


def _worker_init() -> None:
    import torch

    torch.set_num_threads(1)
    logging.getLogger("guard").setLevel(logging.WARNING)
    # A terminal's Ctrl-C reaches the whole process group: the parent decides (it stops the workers), rather than
    # each worker recording the interruption as its case's failure and taking the next case.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _stop_workers(pool: ProcessPoolExecutor, workers: list[multiprocessing.process.BaseProcess]) -> None:
    """Drop the cases not started and end the running ones now: leaving the pool's block waited for every queued
    case, and an interrupted run went on for an hour; a second Ctrl-C then hung joining the workers."""
    pool.shutdown(wait=False, cancel_futures=True)
    for worker in workers:
        worker.terminate()
    for worker in workers:
        worker.join(timeout=10)


def run_suite(settings: EvalSettings, on_case: Callable[[dict[str, object]], None] | None = None,
              checkpoint: Callable[[dict[str, object]], None] | None = None) -> dict[str, object]:
    """Run every case (in `settings.workers` processes) and return the raw figures of the whole run. `on_case` sees
    each finished case; `checkpoint` the figures so far after each case, so that a run cut short keeps them."""
    import torch

    settings.validate()
    cases = [Case(a, arch, s) for arch in settings.archs for a in settings.attacks for s in settings.seeds]
    order = {case: i for i, case in enumerate(cases)}
    started = time.perf_counter()
    results: list[dict[str, object]] = []
    failures: list[dict[str, object]] = []

    def figures() -> dict[str, object]:
        results.sort(key=lambda r: order[Case(r["attack"], r["arch"], r["seed"])])  # type: ignore[arg-type]
        return {
            "settings": asdict(settings),
            "machine": {"platform": platform.platform(), "cpu": _cpu_model(), "python": platform.python_version(),
                        "cpus": os.cpu_count(), "torch": torch.__version__},
            "seconds": round(time.perf_counter() - started, 1),
            "cases": list(results),
            "failures": list(failures),
        }

    def finished(case: Case, outcome: Callable[[], dict[str, object]]) -> None:
        """Keep going when one case fails: its error is recorded, the other cases' figures are kept."""
        try:
            results.append(outcome())
        except Exception as exc:  # any failure of one case is reported with the run, not raised
            log.exception("guard eval: case %s failed", case)
            error = str(exc) if isinstance(exc, CaseFailed) else f"{type(exc).__name__}: {exc}"
            failures.append({**asdict(case), "error": error})
        else:
            if on_case:
                on_case(results[-1])
        if checkpoint:
            checkpoint(figures())

    if settings.workers <= 1:
        for case in cases:
            finished(case, lambda case=case: run_case(case, settings))
    else:
        others = set(multiprocessing.active_children())
        pool = ProcessPoolExecutor(min(settings.workers, len(cases)), mp_context=get_context("spawn"),
                                   initializer=_worker_init)
        try:
            # The slower (later) architecture first, so that the workers finish together; results are sorted after.
            slow_first = sorted(cases, key=lambda c: -settings.archs.index(c.arch))
            futures = {pool.submit(_run_case_in_worker, case, settings): case for case in slow_first}
            for future in as_completed(futures):
                finished(futures[future], lambda future=future: _outcome(future))
        except BaseException:  # Ctrl-C, or SIGTERM as SystemExit: the finished cases are kept (checkpoint)
            _stop_workers(pool, [p for p in multiprocessing.active_children() if p not in others])
            raise
        pool.shutdown()
    return figures()


def _outcome(future: Future) -> dict[str, object]:
    """A worker's case, or why it has none: a worker that died (killed, out of memory) broke the pool, and every
    case not yet answered fails with it."""
    try:
        return future.result()
    except BrokenProcessPool:
        raise RuntimeError("a worker process died (killed, or out of memory?), and the run lost this case with it; "
                           "run it again, with fewer --workers if memory ran out") from None


__all__ = ["ARCHS", "ATTACKS", "QUICK_FLOORS", "AttackSpec", "Case", "EvalSettings", "below_floor", "run_case",
           "run_suite"]
