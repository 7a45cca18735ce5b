"""`guard scan`: is this model backdoored, towards which class, through which neurons?

model + clean samples -> a synthesised trigger per class (ALGORITHMS.md section 5) -> the class whose trigger is
anomalously small -> ℓ∞-gap pruning at the last conv tap against that trigger (section 1) -> a per-class table, a
picture of the suspected trigger, `scan.json` with every figure, and `trigger.npz` for later steps.

The clean data is split once: triggers and ℓ∞ gaps come from the fit part, while the pruning's stopping rule (the
trigger's success rate and the clean accuracy budget) is judged on the held-out part, so neither is graded on the
images it was fitted to.

What to expect (Fashion-MNIST, 500 clean images, defaults): the scan named the target of all 11 backdoored models
tried (BadNets and Blend; SmallCNN and the stride-1-stem SmallResNet before 6cd2142) and no class of 5 clean
SmallCNNs, but a natural small trigger class in 2 of 3 clean SmallResNets. Pruning at the last conv tap within the
1-point budget took real BadNets success from 0.94 to 0.02-0.07 on two SmallResNets, but only 0.95 -> 0.90 on
SmallCNNs, whose last conv layer carries the backdoor only in part; against Blend (whose synthesised trigger is a
patch, not the blend) it did not help. The pruning result is a lead to follow (`guard calibrate`, repair), not a
repair by itself.
"""

from __future__ import annotations

import json
import logging
import re
import struct
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from guard.calibrate.activations import collect
from guard.calibrate.blends import BlendScan, BlendSettings, scan_blends
from guard.calibrate.linf import (
    DEFAULT_ACC_BUDGET,
    DEFAULT_SUCCESS_BOUND,
    GapPruning,
    gap_order,
    linf_gap,
    prune_by_gap,
)
from guard.calibrate.synthesis import (
    DEFAULT_THRESHOLD,
    MIN_CLASSES_TO_JUDGE,
    MIN_SUSPECT_SUCCESS,
    BlendTrigger,
    IndexScale,
    ScanResult,
    SynthesisSettings,
    Trigger,
    save_trigger,
    scan_classes,
)
from guard.calibrate.taps import OnnxTaps
from guard.calibrate.warps import (
    AnyTrigger,
    WarpScan,
    WarpSettings,
    WarpTrigger,
    load_any_trigger,
    save_warp,
    scan_warps,
)
from guard.errors import GuardError
from guard.model.graph import LoadedModel, default_taps, load_model, tensor_ranks, validate_taps
from guard.samples import as_samples, check_samples, holdout_split, write_atomic, write_json

log = logging.getLogger(__name__)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TRIGGER_FILE = "trigger.npz"
REPORT_FILE = "scan.json"


@dataclass
class ScanSettings:
    """Every knob of `guard scan`; all of them are recorded in scan.json."""

    steps: int = SynthesisSettings.steps
    threshold: float = DEFAULT_THRESHOLD  # anomaly index above which the smallest-trigger class is named
    # Classes whose anomaly index reaches this are candidates: too few to name, but `guard repair --scan` and the
    # reference of `guard calibrate` unlearn all their triggers. A class with a natural small trigger can outrank the
    # real target (docs/design.md).
    candidate_index: float = 1.0
    # Where no class reaches `candidate_index` and none is named, the this-many most anomalous classes are the
    # candidates instead: a planted target can rank under the floor, and with no candidate the reference has nothing
    # to unlearn. On the tuning models' source-specific ResNets this cut attack success under the guard from 21/31/11%
    # to 7/12/0.3% (docs/design.md). 0 leaves such a model without candidates.
    fill_candidates: int = 2
    index_scale: IndexScale = "log"
    holdout: float = 0.5  # share of the clean data held out for the pruning's stopping rule
    success_bound: float = DEFAULT_SUCCESS_BOUND
    acc_budget: float = DEFAULT_ACC_BUDGET
    layers: list[str] | None = None  # taps to prune; None = the last conv activation
    png_scale: int = 8  # each trigger pixel becomes png_scale × png_scale pixels in the pictures
    batch_size: int = 256
    seed: int = 0
    # Torch threads while scanning (None: leave torch's setting). One by default: these small convolutions gain
    # little from more, and on a shared 2-core machine 2 threads made a scan 2.5x slower than 1 (65 s vs 25 s).
    num_threads: int | None = 1
    synthesis: dict[str, object] = field(default_factory=dict)  # extra SynthesisSettings fields
    # The warp scan (guard.calibrate.warps): a class that a small smooth warp reaches is a candidate too, its warp
    # unlearned beside the stamps. Off: a model whose inputs are not images, or to save its seconds.
    warp_scan: bool = True
    warps: dict[str, object] = field(default_factory=dict)  # extra WarpSettings fields
    # The blend scan (guard.calibrate.blends): a class that a faint pattern blended over the whole image reaches is a
    # candidate too, its pattern unlearned beside the stamps.
    blend_scan: bool = True
    blends: dict[str, object] = field(default_factory=dict)  # extra BlendSettings fields

    def synthesis_settings(self) -> SynthesisSettings:
        """The trigger synthesis's settings: the scan's steps and seed, then any extra fields."""
        return SynthesisSettings(**{"steps": self.steps, "seed": self.seed, **self.synthesis})

    def validate(self) -> None:
        """Refuse settings that cannot work, with the option's name."""
        try:
            synthesis = self.synthesis_settings()
        except TypeError as exc:
            raise GuardError(f"unknown synthesis setting: {exc}") from None
        if self.steps < synthesis.window:  # checked here, before the model is loaded, with the option's name
            raise GuardError(f"--steps must be at least {synthesis.window} (one window of the synthesis's cost "
                             f"schedule), got {self.steps}")
        synthesis.validate()
        if not 0 < self.holdout < 1:
            raise GuardError(f"holdout share must lie in (0, 1), got {self.holdout}")
        if not 0 <= self.acc_budget < 1:
            raise GuardError(f"accuracy budget must lie in [0, 1), got {self.acc_budget}")
        if not 1 <= self.png_scale <= 64:
            raise GuardError(f"png scale must lie in [1, 64], got {self.png_scale}")
        if not (np.isfinite(self.threshold) and self.threshold > 0):  # at or below 0 every model has a suspect
            raise GuardError(f"--threshold must be a finite anomaly index above 0, got {self.threshold}")
        if not np.isfinite(self.candidate_index):
            raise GuardError(f"the candidate index must be a finite number, got {self.candidate_index}")
        if self.fill_candidates < 0:
            raise GuardError(f"the candidates' fill must be zero or more classes, got {self.fill_candidates}")
        if self.num_threads is not None and self.num_threads < 1:
            raise GuardError(f"thread count must be positive, got {self.num_threads}")
        if self.warp_scan:  # before the patch scan's seconds are spent
            try:
                WarpSettings(**self.warps).validate()
            except TypeError as exc:
                raise GuardError(f"unknown warp setting: {exc}") from None
        if self.blend_scan:
            try:
                BlendSettings(**self.blends).validate()
            except TypeError as exc:
                raise GuardError(f"unknown blend setting: {exc}") from None


@dataclass
class ScanReport:
    """What a scan found, ready to print or write."""

    model_sha256: str
    classes: ScanResult
    pruning: GapPruning | None  # None when no class is suspected
    taps: list[str]  # where the pruning looked
    settings: ScanSettings
    figures: dict[str, object]
    warps: WarpScan | None = None  # None when the warp scan is off
    blends: BlendScan | None = None  # None when the blend scan is off

    @property
    def suspect(self) -> Trigger | None:
        """The suspected target's trigger, if a class is suspected."""
        return None if self.classes.suspect is None else self.classes.triggers[self.classes.suspect]

    @property
    def candidates(self) -> list[AnyTrigger]:
        """The triggers that work of every class whose anomaly index reaches `candidate_index`, most anomalous first;
        the suspect's is always among them; where there are none, the `fill_candidates` most anomalous classes'. Then
        the warp of the class the warp scan names, and the blend of the class the blend scan names, if any."""
        named = [found for found in (self.warp, self.blend) if found is not None]
        return [*self._stamp_candidates(), *named]

    @property
    def warp(self) -> WarpTrigger | None:
        """The warp of the class the warp scan names, if it names one."""
        if self.warps is None or self.warps.suspect is None:
            return None
        return self.warps.triggers[self.warps.suspect]

    @property
    def blend(self) -> BlendTrigger | None:
        """The blended pattern of the class the blend scan names, if it names one."""
        if self.blends is None or self.blends.suspect is None:
            return None
        return self.blends.triggers[self.blends.suspect]

    def _stamp_candidates(self) -> list[Trigger]:
        """The patch scan's part of `candidates`: of the triggers that work (send at least MIN_SUSPECT_SUCCESS of the
        other classes' images to their class), as for the suspect. One that does not was cut short, not made small by
        a backdoor, and unlearning it costs clean accuracy for nothing."""
        works = np.array([t.success >= MIN_SUSPECT_SUCCESS for t in self.classes.triggers])
        index = np.where(works, self.classes.anomaly_index, -np.inf)
        ranked = [int(k) for k in np.argsort(-index, kind="stable") if works[k]]
        chosen = [k for k in ranked if index[k] >= self.settings.candidate_index]
        if self.classes.suspect is not None and self.classes.suspect not in chosen:
            chosen.insert(0, self.classes.suspect)
        if not chosen and len(index) >= MIN_CLASSES_TO_JUDGE:  # of 2 classes neither is more anomalous: both were
            chosen = ranked[:self.settings.fill_candidates]
        return [self.classes.triggers[int(k)] for k in chosen]


def _pruning_taps(model: LoadedModel, layers: list[str] | None) -> list[str]:
    """The given taps, or the last conv activation (the penultimate features where there is none)."""
    if layers:
        validate_taps(model, layers)
        return list(layers)
    taps = default_taps(model, conv_taps=1)
    ranks = tensor_ranks(model.proto)
    conv = [t for t in taps if ranks.get(t) == 4]
    return conv or taps[-1:]


def run_scan(model: str | Path | LoadedModel, x: np.ndarray, y: np.ndarray | None = None, *,
             settings: ScanSettings | None = None) -> ScanReport:
    """Scan `model` with clean samples `x` (N, C, H, W) and optional labels `y`. Example::

        report = run_scan("model.onnx", x_clean, y_clean)
        print(format_report(report))
        write_outputs(report, "scan-out")
    """
    settings = settings or ScanSettings()
    settings.validate()
    with _torch_threads(settings.num_threads):
        return _run_scan(model, x, y, settings)


@contextmanager
def _torch_threads(count: int | None) -> Iterator[None]:
    """Run the block on `count` intra-op threads, then restore the caller's setting."""
    previous = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _run_scan(model: str | Path | LoadedModel, x: np.ndarray, y: np.ndarray | None,
              settings: ScanSettings) -> ScanReport:
    started = time.perf_counter()
    loaded = model if isinstance(model, LoadedModel) else load_model(model)
    x, y = as_samples(x, y, "scan")
    check_samples(x, y, loaded.sample_shape, loaded.num_classes, "scan")
    if x.min() < 0 or x.max() > 1:  # the synthesised patterns lie in [0, 1]
        log.warning("scan: the clean images range over [%.3g, %.3g], the triggers it synthesises over [0, 1]: a "
                    "trigger of another range is searched for in the wrong place (scale the model's input to [0, 1] "
                    "inside it, or trust the scan less)", x.min(), x.max())
    taps = _pruning_taps(loaded, settings.layers)
    tap_model = OnnxTaps(loaded, taps)
    hold, fit = holdout_split(len(x), settings.holdout, settings.seed)
    timings: dict[str, float] = {}

    with torch.no_grad():
        labels = y if y is not None else collect(tap_model, x, batch_size=settings.batch_size).predictions
    synthesis = settings.synthesis_settings()
    log.info("scan: synthesising a trigger for each of %d classes on %d images (%d steps)", loaded.num_classes,
             len(fit), synthesis.steps)
    t0 = time.perf_counter()
    result = scan_classes(tap_model.module, x[fit], labels[fit], threshold=settings.threshold,
                          index_scale=settings.index_scale, settings=synthesis)
    timings["synthesis"] = round(time.perf_counter() - t0, 3)
    warps = None
    if settings.warp_scan:  # each step says it starts: the whole scan is a minute or more of silence otherwise
        log.info("scan: patches done in %.0f s; now a warp per class", timings["synthesis"])
        t0 = time.perf_counter()
        warps = scan_warps(tap_model.module, x[fit], labels[fit],
                           WarpSettings(**{"seed": settings.seed, **settings.warps}))
        timings["warps"] = round(time.perf_counter() - t0, 3)
    blends = None
    if settings.blend_scan:
        log.info("scan: now a blended pattern per class")
        t0 = time.perf_counter()
        blends = scan_blends(tap_model.module, x[fit], labels[fit],
                             BlendSettings(**{"seed": settings.seed, **settings.blends}))
        timings["blends"] = round(time.perf_counter() - t0, 3)

    pruning = None
    if result.suspect is not None:
        t0 = time.perf_counter()
        pruning = _prune(tap_model, result.triggers[result.suspect], x, labels, fit, hold, settings)
        timings["pruning"] = round(time.perf_counter() - t0, 3)
    figures = {
        "samples": len(x), "fit_samples": len(fit), "holdout_samples": len(hold), "labels_given": y is not None,
        "seconds": round(time.perf_counter() - started, 3), "step_seconds": timings,
    }
    return ScanReport(model_sha256=loaded.sha256, classes=result, pruning=pruning, taps=taps, settings=settings,
                      figures=figures, warps=warps, blends=blends)


def _prune(tap_model: OnnxTaps, trigger: Trigger, x: np.ndarray, labels: np.ndarray, fit: np.ndarray,
           hold: np.ndarray, settings: ScanSettings) -> GapPruning:
    """ℓ∞-gap pruning against the suspect's trigger: gaps on the fit part, stopping rule on the held-out part."""
    victims = hold[labels[hold] != trigger.target]
    x_hold, y_hold, x_attack = x[hold], labels[hold], trigger.apply(x[victims])

    def predictions(images: np.ndarray, keep: list[np.ndarray] | None = None) -> np.ndarray:
        masks = None if keep is None else [k.astype(np.float32)[None, :] for k in keep]
        with torch.no_grad():
            return collect(tap_model, images, masks=masks, batch_size=settings.batch_size).predictions

    def accuracy(keep: list[np.ndarray]) -> float:
        return float((predictions(x_hold, keep) == y_hold).mean())

    def success(keep: list[np.ndarray]) -> float:
        return float((predictions(x_attack, keep) == trigger.target).mean()) if len(x_attack) else 0.0

    with torch.no_grad():
        clean = collect(tap_model, x[fit], batch_size=settings.batch_size).linf
        stamped = collect(tap_model, trigger.apply(x[fit]), batch_size=settings.batch_size).linf
    gap = linf_gap(clean, stamped)
    return prune_by_gap(gap_order(gap, clean), [len(g) for g in gap], accuracy, success, gap=gap,
                        success_bound=settings.success_bound, budget=settings.acc_budget)


def report_dict(report: ScanReport) -> dict[str, object]:
    """Everything scan.json holds, as plain JSON types."""
    result = report.classes
    pruning = None
    if report.pruning is not None:
        p = report.pruning
        pruning = {
            "taps": report.taps,
            "pruned_channels": {t: np.flatnonzero(~k).tolist() for t, k in zip(report.taps, p.keep, strict=True)},
            "pruned": p.pruned, "stopped": p.stopped,
            "trigger_success_before": p.success_before, "trigger_success_after": p.success_after,
            "holdout_accuracy_before": p.accuracy_before, "holdout_accuracy_after": p.accuracy_after,
            "gap": {t: np.round(g, 5).tolist() for t, g in zip(report.taps, p.gap, strict=True)},
        }
    return {
        "model_sha256": report.model_sha256,
        "suspect": result.suspect,
        "threshold": result.threshold,
        "candidates": [t.target for t in report.candidates],
        "index_scale": result.index_scale,
        "classes": [
            {"class": t.target, "mask_l1": round(t.mask_l1, 4), "success": round(t.success, 4),
             "anomaly_index": round(float(a), 4)}
            for t, a in zip(result.triggers, result.anomaly_index, strict=True)
        ],
        "pruning": pruning,
        "warps": None if report.warps is None else {
            "suspect": report.warps.suspect,
            "classes": [{"class": t.target, "success": round(t.success, 4), "anomaly_index": round(float(a), 4)}
                        for t, a in zip(report.warps.triggers, report.warps.anomaly_index, strict=True)],
            "settings": asdict(report.warps.settings),
        },
        "blends": None if report.blends is None else {
            "suspect": report.blends.suspect,
            "classes": [{"class": t.target, "success": round(t.success, 4), "anomaly_index": round(float(a), 4)}
                        for t, a in zip(report.blends.triggers, report.blends.anomaly_index, strict=True)],
            "settings": asdict(report.blends.settings),
        },
        "settings": {**asdict(report.settings), "synthesis": result.settings},
        "figures": report.figures,
    }


def format_report(report: ScanReport) -> str:
    """The per-class table and the verdict, for a terminal."""
    return "\n".join([_format_stamps(report), *([] if report.warps is None else [_format_warps(report.warps)]),
                      *([] if report.blends is None else [_format_blends(report.blends)])])


def _format_warps(warps: WarpScan) -> str:
    return _format_named("warp", "a warping trigger", warps.anomaly_index, warps.success, warps.suspect,
                         f"its warp of at most {warps.settings.budget:g} px", warps.settings)


def _format_blends(blends: BlendScan) -> str:
    return _format_named("blend", "a blended trigger", blends.anomaly_index, blends.success, blends.suspect,
                         f"its pattern blended in at {blends.settings.strength:g}", blends.settings)


def _format_named(scan: str, trigger: str, index: np.ndarray, success: np.ndarray, suspect: int | None,
                  what: str, settings: WarpSettings | BlendSettings) -> str:
    """The verdict line of a scan that names a class by its success's anomaly index (the warp and blend scans)."""
    best = int(np.argmax(index))
    figures = (f"{what} sends {success[best]:.3f} of other classes' images there (anomaly index {index[best]:.2f}; "
               f"named above {settings.threshold:g} with at least {settings.min_success:g})")
    if suspect is None:
        return f"{scan} scan: no class is named; the nearest is class {best}: {figures}"
    return f"{scan} scan: class {best} is the likely target of {trigger}: {figures}"


def _format_stamps(report: ScanReport) -> str:
    result = report.classes
    lines = [f"{'class':>5}  {'mask l1':>8}  {'success':>7}  {'anomaly index':>13}"]
    for trigger, index in zip(result.triggers, result.anomaly_index, strict=True):
        mark = "  <- suspect" if trigger.target == result.suspect else ""
        lines.append(f"{trigger.target:>5}  {trigger.mask_l1:>8.1f}  {trigger.success:>7.3f}  {index:>13.2f}{mark}")
    best = int(np.argmax(result.anomaly_index))
    if len(result.triggers) < MIN_CLASSES_TO_JUDGE:
        lines.append(f"the scan cannot judge a model of {len(result.triggers)} classes: the anomaly index compares "
                     f"each trigger with the median of the others, and needs {MIN_CLASSES_TO_JUDGE} or more")
        return "\n".join(lines)
    unconverged = [t.target for t, index in zip(result.triggers, result.anomaly_index, strict=True)
                   if index > result.threshold and t.success < MIN_SUSPECT_SUCCESS]
    if unconverged:  # named or not, the verdict read small masks that an optimisation cut short leaves
        lines.append(f"class(es) {unconverged} have anomalously small triggers that send under "
                     f"{MIN_SUSPECT_SUCCESS} of the images to them, so none of them is named: they did not converge; "
                     "give the scan more --steps")
    if result.suspect is None:
        lines.append(f"no class is suspected: the largest anomaly index is {result.anomaly_index[best]:.2f} "
                     f"(class {best}), threshold {result.threshold}")
        return "\n".join(lines)
    lines.append(f"class {result.suspect} is the likely backdoor target: its trigger is "
                 f"{result.triggers[result.suspect].mask_l1:.1f} pixels against a median of "
                 f"{np.median(report.classes.mask_l1):.1f} (anomaly index {result.anomaly_index[result.suspect]:.2f} > "
                 f"{result.threshold})")
    p = report.pruning
    if p is not None:
        pruned = ", ".join(f"{t}: {np.flatnonzero(~k).tolist()}" for t, k in zip(report.taps, p.keep, strict=True))
        lines.append(f"ℓ∞-gap pruning ({p.stopped}): {p.pruned} channel(s) [{pruned}] take the trigger's success "
                     f"{p.success_before:.3f} -> {p.success_after:.3f}, held-out accuracy {p.accuracy_before:.3f} "
                     f"-> {p.accuracy_after:.3f}")
    return "\n".join(lines)


# The per-class files a scan writes, by kind: each is named KIND_CLASS.SUFFIX.
_SCAN_FILES = {"candidate": "npz", "warp": "npz", "blend": "npz", "trigger": "png", "mask": "png"}
_SCAN_FILE = re.compile("|".join(rf"{kind}_\d+\.{suffix}" for kind, suffix in _SCAN_FILES.items()))


def scan_file(kind: str, target: int) -> str:
    return f"{kind}_{target}.{_SCAN_FILES[kind]}"


def earlier_scan_files(out_dir: str | Path) -> list[Path]:
    """The files an earlier scan wrote to `out_dir` (scan.json first), which the next scan there removes so that none
    is taken for its own. A file named as a scan names its files (`mask_0.png`, `trigger.npz`) that no earlier
    scan.json lists is someone else's: GuardError rather than remove or overwrite it."""
    out = Path(out_dir)
    if not out.is_dir():
        return []
    present = sorted(path.name for path in out.iterdir()
                     if path.name in (REPORT_FILE, TRIGGER_FILE) or _SCAN_FILE.fullmatch(path.name))
    listed = {REPORT_FILE}
    if REPORT_FILE in present:
        try:
            files = json.loads((out / REPORT_FILE).read_text())["files"]
            listed.update(files["candidates"], (files[key] for key in ("trigger", "trigger_png", "mask_png")
                                                if key in files))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise GuardError(f"{out / REPORT_FILE} is not a guard scan's report ({type(exc).__name__}: {exc}); a "
                             "scan would replace it: move it, or write the scan to another folder") from None
    foreign = [name for name in present if name not in listed]
    if foreign:
        raise GuardError(f"{out} holds {', '.join(foreign[:5])}{' …' if len(foreign) > 5 else ''}, named as a scan "
                         "names its files but listed by no earlier scan.json there (a scan cut short leaves its "
                         "files unlisted): a scan would remove or overwrite them; move them, or write the scan to "
                         "another folder")
    return [out / name for name in sorted(present, key=lambda name: name != REPORT_FILE)]


def write_outputs(report: ScanReport, out_dir: str | Path) -> list[Path]:
    """scan.json always; candidate_K.npz for each candidate class K, warp_K.npz for the class the warp scan names
    and blend_K.npz for the class the blend scan names (what `guard repair --scan` and `guard calibrate` unlearn, so
    `guard repair --trigger` can be given the same); and trigger.npz and the two PNGs (mask·pattern, mask) when a
    class is suspected, each written whole or not at all. The earlier scan's files in the folder are removed first,
    so none is taken for this scan's; other files named as a scan names its own are refused (`earlier_scan_files`)."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        for path in earlier_scan_files(out):  # scan.json first: it never names files already removed
            path.unlink(missing_ok=True)
        written = []
        for candidate in report.candidates:
            if isinstance(candidate, WarpTrigger):
                written.append(out / scan_file("warp", candidate.target))
                save_warp(candidate, written[-1])
            else:
                kind = "blend" if isinstance(candidate, BlendTrigger) else "candidate"
                written.append(out / scan_file(kind, candidate.target))
                save_trigger(candidate, written[-1])
        files: dict[str, object] = {"candidates": [path.name for path in written]}
        trigger = report.suspect
        if trigger is not None:
            npz = out / TRIGGER_FILE
            save_trigger(trigger, npz)
            stamp = out / scan_file("trigger", trigger.target)
            mask = out / scan_file("mask", trigger.target)
            write_png(stamp, trigger_image(trigger.mask * trigger.pattern, report.settings.png_scale))
            write_png(mask, trigger_image(trigger.mask, report.settings.png_scale))
            written += [npz, stamp, mask]
            files.update(trigger=npz.name, trigger_png=stamp.name, mask_png=mask.name)
        summary = out / REPORT_FILE
        write_json(summary, {**report_dict(report), "files": files})  # last: a scan.json names only files written whole
    except OSError as exc:
        raise GuardError(f"cannot write the scan results to {out}: {exc}") from None
    return [summary, *written]


@dataclass
class EarlierScan:
    """What a `guard scan` folder hands on: its suspect and its candidates' triggers, in the scan's order."""

    suspect: int | None
    candidates: list[AnyTrigger]


def read_scan_dir(folder: str | Path, model: LoadedModel) -> EarlierScan:
    """The scan that `write_outputs` left in `folder`, checked against `model`: a scan of other weights names the
    wrong classes and synthesised the wrong triggers, so its `model_sha256` must be this model's. Loaded without
    pickle; every candidate file scan.json names must be there."""
    folder = Path(folder)
    try:
        report = json.loads((folder / REPORT_FILE).read_text())
        sha256, suspect, names = report["model_sha256"], report["suspect"], report["files"]["candidates"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise GuardError(f"cannot read a guard scan from {folder / REPORT_FILE}: {exc}") from None
    if sha256 != model.sha256:
        raise GuardError(f"the scan in {folder} is of another model (sha256 {str(sha256)[:12]}…, this model's "
                         f"{model.sha256[:12]}…): scan this model")
    if suspect is not None and not (isinstance(suspect, int) and not isinstance(suspect, bool)
                                    and 0 <= suspect < model.num_classes):
        raise GuardError(f"the scan's suspect in {folder / REPORT_FILE} must be a class in [0, {model.num_classes}) "
                         f"or null, got {suspect!r}")
    if not (isinstance(names, list) and all(isinstance(n, str) and Path(n).name == n for n in names)):
        raise GuardError(f"the scan's candidate files in {folder / REPORT_FILE} must be a list of file names")
    candidates = [load_any_trigger(folder / name, model.sample_shape, model.num_classes) for name in names]
    return EarlierScan(suspect=suspect, candidates=candidates)


def trigger_image(array: np.ndarray, scale: int = 1) -> np.ndarray:
    """(C, H, W) values in [0, 1] as an 8-bit (H·scale, W·scale) grey or (…, 3) RGB image; other C are averaged."""
    array = np.clip(np.asarray(array, dtype=np.float64), 0.0, 1.0)
    if array.ndim == 3 and array.shape[0] == 3:
        array = array.transpose(1, 2, 0)
    elif array.ndim == 3:
        array = array.mean(axis=0)
    image = np.rint(array * 255).astype(np.uint8)
    return image.repeat(scale, axis=0).repeat(scale, axis=1)


def encode_png(image: np.ndarray) -> bytes:
    """A minimal PNG: 8-bit greyscale (H, W) or RGB (H, W, 3), no filtering, one zlib stream."""
    image = np.ascontiguousarray(image, dtype=np.uint8)
    if image.ndim == 2:
        colour_type = 0
    elif image.ndim == 3 and image.shape[2] == 3:
        colour_type = 2
    else:
        raise ValueError(f"PNG images are (H, W) or (H, W, 3); got {image.shape}")
    height, width = image.shape[:2]
    rows = image.reshape(height, -1)
    raw = np.concatenate([np.zeros((height, 1), dtype=np.uint8), rows], axis=1)  # filter byte 0 per row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0)
    return (PNG_SIGNATURE + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw.tobytes(), 9))
            + chunk(b"IEND", b""))


def write_png(path: str | Path, image: np.ndarray) -> Path:
    """Write `image` (see `encode_png`) to `path`, whole or not at all; returns the path."""
    data = encode_png(image)
    return write_atomic(Path(path), lambda tmp: tmp.write_bytes(data))
