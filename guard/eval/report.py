"""The evaluation report: raw figures as JSON, Markdown tables, PNG plots, and the check against the targets.

Tables show the mean and spread over seeds per attack and architecture; every target of the default policy is
checked here, in one place, and each miss is named in the report rather than hidden in an average.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from guard.errors import GuardError
from guard.eval.metrics import at_least, at_most, mean_spread
from guard.samples import write_json
from guard.scan import ScanSettings

# Rows of the "what each part adds" table, in the order a reader builds up the defense.
METHODS = ("none", "fine-pruning", "linf-prune", "salience-prune", "check", "guard-no-reference", "guard")
# Rows of the model-repair table (issue 4): models cleaned offline, served as they are.
REPAIRS = ("none", "fine-pruning", "fine-tuning", "salience-prune", "ar-repair", "none-train")
# Rows of the table of the victims' untouched answers: the undefended model and what each way out leaves.
UNTOUCHED = ("none", "guard", "fine-tuning", "ar-repair", "none-train")
METHOD_TITLES = {
    "none": "no defense", "fine-pruning": "fine-pruning", "strip": "STRIP", "linf-prune": "ℓ∞-gap pruning (scan)",
    "salience-prune": "benign-salience pruning", "check": "consistency check",
    "guard-no-reference": "guard without the reference", "guard": "guard (default)",
    "fine-tuning": "fine-tuning", "ar-repair": "AR repair", "none-train": "NONE training",
}
# Issue 4's targets for the repaired models.
AR_MAX_ASR = 0.02  # on badnets, blend and source-specific
AR_ATTACKS = ("badnets", "blend", "source-specific")
AR_MAX_ACCURACY_LOSS = 0.015
NONE_MIN_ASR_REDUCTION = 20.0  # undefended ASR / NONE's, on average over the suite
NONE_MAX_ACCURACY_LOSS = 0.02
REPAIR_MAX_ACCURACY_LOSS_CLEAN_MODEL = 0.01
# The default policy's targets (issue 3; EVALUATION.md's "ASR under 2%" with the 5% for wanet and adaptive).
MAX_ACCURACY_LOSS = 0.01  # points of clean accuracy, on an attacked model
MAX_ACCURACY_LOSS_CLEAN_MODEL = 0.002  # "no accuracy lost" on the clean model: at most 0.2 points of sampling noise
MAX_ASR = 0.02
MAX_ASR_LOOSE = {"wanet": 0.05, "adaptive": 0.05}
MIN_AUROC = 0.98
MAX_FPR_DEVIATION = 0.02  # observed FPR within this of the configured target (on the clean model: at most the target)


@dataclass
class Miss:
    """One target a (attack, architecture) group misses, with the value it got."""

    attack: str
    arch: str
    target: str
    value: str


def _cases(figures: dict) -> list[dict]:
    return list(figures["cases"])


def _groups(figures: dict) -> list[tuple[str, str, list[dict]]]:
    """(attack, arch, cases over seeds), in the order of the run's settings (attacks, then architectures)."""
    out: dict[tuple[str, str], list[dict]] = {}
    for case in _cases(figures):
        out.setdefault((case["attack"], case["arch"]), []).append(case)
    attacks, archs = figures["settings"]["attacks"], figures["settings"]["archs"]
    keys = sorted(out, key=lambda k: (attacks.index(k[0]) if k[0] in attacks else len(attacks),
                                      archs.index(k[1]) if k[1] in archs else len(archs)))
    return [(attack, arch, out[(attack, arch)]) for attack, arch in keys]


def _metric(cases: list[dict], method: str, key: str) -> tuple[float, float]:
    """Mean and spread over seeds, or NaN (a table's "–", a target's miss) if any seed lacks the figure: a seed that
    failed to measure cannot drop out of the average and leave the others to pass, and a cell shows what is
    checked."""
    values = [c["methods"].get(method, {}).get(key) for c in cases]
    if any(v is None or not np.isfinite(v) for v in values):
        return float("nan"), float("nan")
    return mean_spread(values)


def _checked_mean(cases: list[dict], method: str, key: str) -> float:
    """The mean a target is checked on (NaN, a miss, if any seed lacks the figure)."""
    return _metric(cases, method, key)[0]


def _coverage_misses(figures: dict) -> list[Miss]:
    """Each attack and architecture of the run's settings measured on fewer seeds than asked (a case failed)."""
    settings, cases = figures["settings"], _cases(figures)
    seeds = len(settings["seeds"])
    measured = [(attack, arch, sum(c["attack"] == attack and c["arch"] == arch for c in cases))
                for attack in settings["attacks"] for arch in settings["archs"]]
    return [Miss(attack, arch, f"measured on all {seeds} seeds", f"{count} of {seeds}")
            for attack, arch, count in measured if count < seeds]


def _fmt(value: tuple[float, float], percent: bool = True, digits: int = 1) -> str:
    mean, spread = value
    if not np.isfinite(mean):
        return "–"
    scale = 100 if percent else 1
    text = f"{scale * mean:.{digits}f}"
    return text + (f" ± {scale * spread:.{digits}f}" if spread > 0 else "")


def check_targets(figures: dict) -> list[Miss]:
    """Every target of the default policy (issue 3) that the run's means miss, per attack and architecture."""
    target_fpr = figures["settings"]["fpr"]
    return _coverage_misses(figures) + [miss for attack, arch, cases in _groups(figures)
                                        for miss in _group_misses(attack, arch, cases, target_fpr)]


def _group_misses(attack: str, arch: str, cases: list[dict], target_fpr: float) -> list[Miss]:
    misses: list[Miss] = []

    def mean(method: str, key: str) -> float:
        return _checked_mean(cases, method, key)

    def require(ok: bool, target: str, value: float, percent: bool = True, reference: float = 0.0,
                note: str = "", unit: str = "%") -> None:
        """A non-finite value or reference (a figure that is missing) is a miss, never a silent pass. `unit`: "%"
        for a rate, " points" for a difference of rates."""
        if not (np.isfinite(value) and np.isfinite(reference)):
            misses.append(Miss(attack, arch, target, "no figure"))
        elif not ok:
            misses.append(Miss(attack, arch, target, (f"{100 * value:.2f}{unit}" if percent else f"{value:.3f}")
                               + note))

    ca_loss = mean("none", "ca") - mean("guard", "ca")
    fpr = mean("guard", "fpr")
    if attack == "clean":
        require(at_most(fpr, target_fpr), f"clean model flagged ≤ {100 * target_fpr:g}%", fpr)
        require(at_most(ca_loss, MAX_ACCURACY_LOSS_CLEAN_MODEL),
                f"clean model: no accuracy lost (≤ {100 * MAX_ACCURACY_LOSS_CLEAN_MODEL:g} points)", ca_loss,
                unit=" points")
        return misses
    require(at_most(ca_loss, MAX_ACCURACY_LOSS), f"clean accuracy within {100 * MAX_ACCURACY_LOSS:g} point",
            ca_loss, unit=" points")
    asr_bound = MAX_ASR_LOOSE.get(attack, MAX_ASR)
    asr = mean("guard", "asr")
    require(at_most(asr, asr_bound), f"ASR ≤ {100 * asr_bound:g}%", asr, note=_untouched_note(cases, "guard"))
    auroc = mean("guard", "auroc")
    require(at_least(auroc, MIN_AUROC), f"AUROC ≥ {MIN_AUROC}", auroc, percent=False)
    require(at_most(abs(fpr - target_fpr), MAX_FPR_DEVIATION),
            f"FPR within {100 * MAX_FPR_DEVIATION:g} points of {100 * target_fpr:g}%", fpr)
    fine_pruning = mean("fine-pruning", "asr")
    require(at_most(asr, fine_pruning), f"ASR at most fine-pruning's ({100 * fine_pruning:.2f}%)", asr,
            reference=fine_pruning)
    strip = mean("strip", "auroc")
    require(at_least(auroc, strip), f"AUROC at least STRIP's ({strip:.3f})", auroc, percent=False, reference=strip)
    return misses


def check_repair_targets(figures: dict) -> list[Miss]:
    """Issue 4's targets for AR repair and NONE training that the run's means miss."""
    misses = _coverage_misses(figures) + [m for attack, arch, cases in _groups(figures)
                                          for m in _repair_group_misses(attack, arch, cases)]
    reductions = [_reduction(cases) for attack, _, cases in _groups(figures) if attack != "clean"]
    if reductions:
        average = float(np.mean(reductions))
        if not at_least(average, NONE_MIN_ASR_REDUCTION):
            misses.append(Miss("all attacks", "both", f"NONE training: ASR ≥ {NONE_MIN_ASR_REDUCTION:g}× lower on "
                                                       "average", f"{average:.1f}×" if np.isfinite(average)
                                                                   else "no figure"))
    return misses


def _reduction(cases: list[dict]) -> float:
    """Undefended ASR over NONE's (NaN where either is missing; NONE's at 0 counts as 1e-4)."""
    trained = _checked_mean(cases, "none-train", "asr")
    return _checked_mean(cases, "none", "asr") / (max(trained, 1e-4) if np.isfinite(trained) else trained)


def _repair_group_misses(attack: str, arch: str, cases: list[dict]) -> list[Miss]:
    misses: list[Miss] = []

    def require(ok: bool, target: str, value: float, note: str = "", unit: str = "%") -> None:
        if not (np.isfinite(value) and ok):
            misses.append(Miss(attack, arch, target,
                               "no figure" if not np.isfinite(value) else f"{100 * value:.2f}{unit}{note}"))

    for method, title in (("ar-repair", "AR repair"), ("none-train", "NONE training")):
        loss = _checked_mean(cases, "none", "ca") - _checked_mean(cases, method, "ca")
        if attack == "clean":
            require(at_most(loss, REPAIR_MAX_ACCURACY_LOSS_CLEAN_MODEL),
                    f"clean model: {title} loses ≤ {100 * REPAIR_MAX_ACCURACY_LOSS_CLEAN_MODEL:g} point", loss,
                    unit=" points")
            continue
        bound = AR_MAX_ACCURACY_LOSS if method == "ar-repair" else NONE_MAX_ACCURACY_LOSS
        require(at_most(loss, bound), f"{title}: clean accuracy within {100 * bound:g} points", loss,
                unit=" points")
    if attack in AR_ATTACKS:
        asr = _checked_mean(cases, "ar-repair", "asr")
        require(at_most(asr, AR_MAX_ASR), f"AR repair: ASR ≤ {100 * AR_MAX_ASR:g}%", asr,
                note=_untouched_note(cases, "ar-repair"))
    return misses


def _untouched_note(cases: list[dict], method: str) -> str:
    """For an attack-success miss: the share of the same images the same defense answers with the target class
    untouched, or nothing where the run did not record it."""
    untouched = _metric(cases, method, "untouched")[0]
    return f" (untouched: {100 * untouched:.2f}%)" if np.isfinite(untouched) else ""


def _none_table(figures: dict) -> str:
    rows = ["| attack | model | samples dropped (rule) | precision | recall | pushed off their label (per seed) | "
            "ASR none | ASR NONE | ratio |", "|---|---|---|---|---|---|---|---|---|"]
    reductions, undefended, trained_all = [], [], []
    for attack, arch, cases in _groups(figures):
        none, trained = _checked_mean(cases, "none", "asr"), _checked_mean(cases, "none-train", "asr")
        pushed = ", ".join(str(c["methods"]["none-train"].get("unlearned", "–")) for c in cases)
        # Runs before the rule was recorded all dropped the split's whole upper group.
        rule = "/".join(sorted({c["methods"]["none-train"].get("drop", "split") for c in cases}))
        dropped = f"{_fmt(_metric(cases, 'none-train', 'removed'), False, 0)} ({rule})"
        if attack == "clean":
            rows.append(f"| clean | {arch} | {dropped} | – | – | "
                        f"{pushed} | – | – | – |")
            continue
        reductions.append(_reduction(cases))
        undefended.append(none)
        trained_all.append(trained)
        # Precision is over the seeds that dropped something (older runs recorded 1.0 for dropping nothing).
        precision = mean_spread([c["methods"]["none-train"].get("precision") for c in cases
                                 if c["methods"]["none-train"].get("removed")])
        ratio = "–" if not np.isfinite(reductions[-1]) else f"{reductions[-1]:.1f}×"
        rows.append(f"| {attack} | {arch} | {dropped} | {_fmt(precision)} | "
                    f"{_fmt(_metric(cases, 'none-train', 'recall'))} | {pushed} | {_fmt((none, 0.0))} | "
                    f"{_fmt((trained, 0.0))} | {ratio} |")
    if reductions and not np.isfinite(reductions).all():
        rows += ["", "A seed lacks a figure, so the ratios' mean, which issue 4's target is checked on, is not "
                     "measured (the target reads it as a miss)."]
    elif reductions:
        carried = sum(r >= 10 for r in reductions)
        rows += ["", f"The mean of the ratios, which issue 4's target is checked on, is {np.mean(reductions):.1f}×, "
                     f"carried by the {carried} of {len(reductions)} rows at 10× or more. Their median is "
                     f"{np.median(reductions):.1f}×, and the mean "
                     f"undefended ASR over the mean ASR after NONE is "
                     f"{np.mean(undefended) / max(np.mean(trained_all), 1e-4):.1f}×."]
    return "\n".join(rows)


def headline_table(figures: dict) -> str:
    """No defense vs guard's default, per attack and architecture (percent, mean ± spread over seeds)."""
    rows = ["| attack | poisoned | model | CA none | CA guard | ASR none | ASR guard | RA guard | AUROC | TPR | FPR |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for attack, arch, cases in _groups(figures):
        poisoned = f"{100 * cases[0]['n_poisoned'] / cases[0]['n_train']:.1f}%"
        rows.append(
            f"| {attack} | {poisoned} | {arch} | {_fmt(_metric(cases, 'none', 'ca'))} | "
            f"{_fmt(_metric(cases, 'guard', 'ca'))} | "
            f"{_fmt(_metric(cases, 'none', 'asr'))} | {_fmt(_metric(cases, 'guard', 'asr'))} | "
            f"{_fmt(_metric(cases, 'guard', 'ra'))} | {_fmt(_metric(cases, 'guard', 'auroc'), False, 3)} | "
            f"{_fmt(_metric(cases, 'guard', 'tpr'))} | {_fmt(_metric(cases, 'guard', 'fpr'))} |")
    return "\n".join(rows)


def _method_table(figures: dict, key: str, methods: tuple[str, ...] = METHODS) -> str:
    rows = ["| attack | model | " + " | ".join(METHOD_TITLES[m] for m in methods) + " |",
            "|---|---|" + "---|" * len(methods)]
    for attack, arch, cases in _groups(figures):
        cells = [_fmt(_metric(cases, m, key)) for m in methods]
        rows.append(f"| {attack} | {arch} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _detection_table(figures: dict) -> str:
    rows = ["| attack | model | AUROC guard | AUROC check alone | AUROC STRIP | took | AUROC guard, took | "
            "AUROC STRIP, took | TPR guard | TPR STRIP | FPR guard | FPR STRIP |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for attack, arch, cases in _groups(figures):
        if attack == "clean":
            continue
        auc = [_fmt(_metric(cases, m, k), False, 3) for m, k in (("guard", "auroc"), ("check", "auroc"),
                                                                ("strip", "auroc"))]
        took = [_fmt(_metric(cases, m, "auroc_took"), False, 3) for m in ("guard", "strip")]
        rates = [_fmt(_metric(cases, m, k)) for k in ("tpr", "fpr") for m in ("guard", "strip")]
        rows.append(f"| {attack} | {arch} | " + " | ".join([*auc, _fmt(_metric(cases, "none", "asr")), *took, *rates])
                    + " |")
    return "\n".join(rows)


def _floor_table(figures: dict) -> str:
    """The clean model's answers to each trigger: the attack success rate no defense can go below."""
    floors = [(arch, [c["trigger_floor"] for c in cases]) for attack, arch, cases in _groups(figures)
              if attack == "clean" and all("trigger_floor" in c for c in cases)]
    if not floors:
        return "No clean-model case in this run."
    names = list(floors[0][1][0])
    rows = ["| model | " + " | ".join("untouched images" if n == "clean" else n for n in names) + " |",
            "|---|" + "---|" * len(names)]
    for arch, per_seed in floors:
        rows.append(f"| {arch} | " + " | ".join(_fmt(mean_spread([f.get(n) for f in per_seed])) for n in names) + " |")
    return "\n".join(rows)


def _unlearned(case: dict) -> str:
    """The classes whose triggers AR unlearned in one case, as "0 8" ("–" for none)."""
    classes = case["methods"]["ar-repair"].get("unlearned")
    if not isinstance(classes, list):  # figures from before AR took several triggers held a flag
        return "?"
    return " ".join(map(str, classes)) or "–"


def _suspects(scan: dict) -> str:
    """One case's scan suspect, and the warp and blend scans' as "w0" and "b0" where they name one: "8 w0",
    "–"."""
    named = [] if scan["suspect"] is None else [str(scan["suspect"])]
    if scan.get("warp_suspect") is not None:  # figures from before the warp scan hold none
        named.append(f"w{scan['warp_suspect']}")
    if scan.get("blend_suspect") is not None:  # nor those from before the blend scan
        named.append(f"b{scan['blend_suspect']}")
    return " ".join(named) or "–"


def _extra_table(figures: dict) -> str:
    rows = ["| attack | model | PGD acc. unguarded | PGD acc. guarded | PGD flagged | scan suspect (per seed; w: warp scan, b: blend scan) | "
            "AR unlearned (per seed) | reference answered, clean | reference answered, triggered | scan s | "
            "calibration s | overhead × (batch 64) | case s |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for attack, arch, cases in _groups(figures):
        adv = [c["adversarial"] for c in cases]
        suspects = ", ".join(_suspects(c["scan"]) for c in cases)
        unlearned = "; ".join(_unlearned(c) for c in cases if "ar-repair" in c["methods"])
        rows.append(
            f"| {attack} | {arch} | {_fmt(mean_spread([a['accuracy_unguarded'] for a in adv]))} | "
            f"{_fmt(mean_spread([a['accuracy_guarded'] for a in adv]))} | "
            f"{_fmt(mean_spread([a['flagged'] for a in adv]))} | {suspects} | {unlearned or '–'} | "
            f"{_fmt(_metric(cases, 'guard', 'overruled_clean'))} | {_fmt(_metric(cases, 'guard', 'overruled_triggered'))} | "
            f"{_fmt(mean_spread([c['scan']['seconds'] for c in cases]), False, 1)} | "
            f"{_fmt(_metric(cases, 'guard', 'calibration_seconds'), False, 1)} | "
            f"{_fmt(mean_spread([c['overhead']['ratio'] for c in cases]), False, 2)} | "
            f"{_fmt(mean_spread([c['seconds'] for c in cases]), False, 0)} |")
    return "\n".join(rows)


def misses_text(misses: list[Miss], what: str = "of the default policy") -> str:
    """The misses as a Markdown list, or one sentence saying there are none."""
    if not misses:
        return f"Every target {what} is met on every attack and architecture in this run."
    lines = [f"{len(misses)} target(s) missed:"]
    lines += [f"- {m.attack} / {m.arch}: {m.target} — got {m.value}" for m in misses]
    return "\n".join(lines)


def plot(figures: dict, out: Path) -> list[Path]:
    """ROC curves of the per-request score (guard vs STRIP, first seed) and CA/ASR bars per attack."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written: list[Path] = []
    groups = _groups(figures)
    archs = list(dict.fromkeys(arch for _, arch, _ in groups))
    attacks = [a for a in dict.fromkeys(attack for attack, _, _ in groups) if a != "clean"]
    if attacks:
        cols = min(3, len(attacks))
        rows = -(-len(attacks) // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.6 * rows), squeeze=False)
        for ax, attack in zip(axes.flat, attacks, strict=False):
            for (a, arch, cases), color in ((g, c) for g in groups for c in [f"C{archs.index(g[1])}"]):
                if a != attack:
                    continue
                for method, style in (("guard", "-"), ("strip", ":")):
                    roc = cases[0]["methods"][method]["roc"]
                    ax.plot(roc["fpr"], roc["tpr"], style, color=color,
                            label=f"{METHOD_TITLES[method]}, {arch}, seed {cases[0]['seed']}")
            ax.plot([0, 1], [0, 1], color="0.8", linewidth=0.8)
            ax.set(title=attack, xlabel="false-positive rate (clean)", ylabel="true-positive rate (triggered)",
                   xlim=(0, 1), ylim=(0, 1.01))
            ax.legend(fontsize=7, loc="lower right")
        for ax in list(axes.flat)[len(attacks):]:
            ax.axis("off")
        fig.tight_layout()
        written.append(_save_png(fig, out / "roc.png"))

    names = [a for a in dict.fromkeys(attack for attack, _, _ in groups)]
    fig, axes = plt.subplots(2, len(archs), figsize=(max(6, 1.3 * len(names) * len(archs) + 2), 7), squeeze=False)
    width = 0.8 / len(METHODS)
    for col, arch in enumerate(archs):
        by_attack = {attack: cases for attack, a, cases in groups if a == arch}
        for row, (key, title) in enumerate((("ca", "clean accuracy"), ("asr", "attack success rate"))):
            ax = axes[row][col]
            for i, method in enumerate(METHODS):
                values = [_metric(by_attack[a], method, key)[0] if a in by_attack else np.nan for a in names]
                ax.bar(np.arange(len(names)) + (i - len(METHODS) / 2 + 0.5) * width, values, width,
                       label=METHOD_TITLES[method])  # a missing figure (NaN) leaves a gap, not a 0 bar
            ax.set_xticks(np.arange(len(names)), names, rotation=30, ha="right", fontsize=8)
            ax.set(title=f"{title}, {arch}", ylim=(0, 1))
    axes[0][0].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    written.append(_save_png(fig, out / "bars.png"))
    return written


def _save_png(fig, path: Path) -> Path:
    """Write a matplotlib figure (into write_report's drawing folder, which is moved in whole) and close it."""
    import matplotlib.pyplot as plt

    try:
        fig.savefig(path, dpi=110, format="png")
        return path
    finally:
        plt.close(fig)


def _fine_tuning_text(figures: dict) -> str:
    """Where fine-tuning alone, the step of Liu et al.'s fine-pruning that EVALUATION.md's pruning-only baseline
    leaves out, answered fewer triggered images with the target than guard's default: the target above compares
    against the pruning alone, which removes little."""
    lower = [(attack, arch, tuned, guarded) for attack, arch, cases in _groups(figures) if attack != "clean"
             and np.isfinite(tuned := _metric(cases, "fine-tuning", "asr")[0])
             and np.isfinite(guarded := _checked_mean(cases, "guard", "asr")) and tuned < guarded]
    intro = ("Fine-pruning above is EVALUATION.md's: the pruning alone. Liu et al. fine-tune the pruned model "
             "afterwards; the fine-tuning row measures that step on its own, on the defender's clean set.")
    if not any("fine-tuning" in c["methods"] for c in _cases(figures)):
        return ""
    if not lower:
        return f"\n{intro} It leaves no lower ASR than guard's default on any attack.\n"
    rows = "; ".join(f"{attack} / {arch} {100 * tuned:.2f}% against {100 * guarded:.2f}%"
                     for attack, arch, tuned, guarded in lower)
    return f"\n{intro} It leaves a lower ASR than guard's default on {len(lower)} row(s): {rows}.\n"


def _failures_text(figures: dict) -> str:
    failures = figures.get("failures") or []
    if not failures:
        return ""
    lines = [f"\n{len(failures)} case(s) failed and are missing from every table:"]
    lines += [f"- {f['attack']} / {f['arch']} / seed {f['seed']}: {f['error']}" for f in failures]
    return "\n".join(lines) + "\n"


class PartialFigures:
    """The cases a run has finished, rewritten after each: a run cut short can still be drawn with --figures. A
    convenience only: a write that fails is said once, and the run goes on."""

    def __init__(self, path: Path, command: str) -> None:
        self.path, self.command, self.failed = path, command, False

    def keep(self, figures: dict) -> None:
        if not figures["cases"] or self.failed:
            return
        try:
            write_json(self.path, {**figures, "command": self.command}, indent=1)
        except GuardError as exc:
            self.failed = True
            print(f"guard eval: cannot keep the cases so far ({exc}); the run goes on", file=sys.stderr)

    def remove(self) -> None:
        """The run's own figures.json is written: the partial one has served (an earlier write of it too, where a
        later one failed); where it cannot go, the next run into the folder says so."""
        with contextlib.suppress(OSError):
            self.path.unlink(missing_ok=True)


_SETTINGS_DRAWN = ("attacks", "archs", "seeds", "fpr", "acc_budget", "n_train", "epochs", "n_clean", "n_eval",
                   "strip_samples", "scan_steps")
_MACHINE_DRAWN = ("cpus", "platform", "python", "torch")
_CASE_DRAWN = ("attack", "arch", "seed", "methods")


def figures_missing(figures: dict) -> list[str]:
    """What of the figures the report draws from `figures` lacks (`settings.fpr`, `cases[3].methods`): a file of
    another making is named as such, not met by a KeyError halfway through the drawing."""
    missing = [key for key in ("settings", "machine", "seconds", "cases") if key not in figures]
    for key, drawn in (("settings", _SETTINGS_DRAWN), ("machine", _MACHINE_DRAWN)):
        part = figures.get(key)
        missing += [f"{key}.{name}" for name in drawn if not isinstance(part, dict) or name not in part]
    for index, case in enumerate(figures.get("cases") or []):
        missing += [f"cases[{index}].{name}" for name in _CASE_DRAWN if not isinstance(case, dict) or name not in case]
    return missing


def write_report(figures: dict, out: str | Path, command: str) -> Path:
    """Write figures.json, the PNG plots and report.md under `out`; returns the report's path.

    `command` is the `guard eval` command line that produced the figures; it is stored with them. All is drawn in
    a folder of its own first, so a drawing that fails or is interrupted (figures of another making, Ctrl-C) leaves
    an earlier report and its figures as they were.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    figures = {**figures, "command": figures.get("command", command)}
    with tempfile.TemporaryDirectory(prefix=".guard-drawing-", dir=out) as folder:
        drawn = Path(folder)
        _draw(figures, drawn)
        # An earlier run's report would sit beside these figures were the moves cut short; its curves, beside a
        # report without attacked cases.
        (out / "report.md").unlink(missing_ok=True)
        if not (drawn / "roc.png").exists():
            (out / "roc.png").unlink(missing_ok=True)
        for name in ("figures.json", *sorted(p.name for p in drawn.glob("*.png")), "report.md"):
            os.replace(drawn / name, out / name)  # figures.json first: the report can be redrawn from it
    return out / "report.md"


def _draw(figures: dict, out: Path) -> None:
    """figures.json, the plots and report.md in the folder `out`."""
    write_json(out / "figures.json", figures, indent=1)
    images = plot(figures, out)
    misses = check_targets(figures)
    settings = figures["settings"]
    machine = figures["machine"]
    evaluation = ("the rest of the test split" if settings["n_eval"] is None
                  else f"the next {settings['n_eval']:,} test images")
    text = f"""# guard eval report

Produced by `{figures['command']}` in {figures['seconds'] / 60:.1f} minutes on {machine['cpus']} CPU cores
({machine.get('cpu', 'processor not recorded')}, {machine['platform']}, Python {machine['python']},
torch {machine['torch']}), no GPU.

- **Data and models.** Fashion-MNIST. Each case trains on {settings['n_train']:,} training images for
  {settings['epochs']} epochs; the attack poisons the share shown in the headline table (source-specific relabels
  half the source class's images, where EVALUATION.md says 10%, which left too weak a backdoor, and stamps 10% of the
  other non-target images as cover, labels kept; docs/design.md). The defender's clean set is the first
  {settings['n_clean']:,} test images; evaluation uses {evaluation}.
- **Thresholds** come from the clean set only (target FPR {100 * settings['fpr']:g}%, accuracy budget
  {100 * settings['acc_budget']:g} point). The defaults were not: `cut_z`, the demote and suspect rates, the
  reference's settings, the dense part and the warp and blend scans' thresholds were chosen by attack success on
  tuning models (`tools/`, docs/design.md): this recipe at other seeds, measured on training-split images and never
  on the evaluation images, but with this run's very triggers (the same patch, blend pattern and warp field, target
  0); the blend scan unlearns at this run's blend strength; and the FPR rule (`--fpr-confidence`) was chosen on a
  model of the clean / resnet seed-0 recipe measured on test-split images, this run's own. So for those settings the
  badnets, blend and wanet rows and the FPR are not out-of-sample; the baselines had no such tuning.
- **Figures** are percent, mean ± spread (sample std) over seeds {settings['seeds']}.
  - CA: clean accuracy.
  - ASR: the share of triggered non-target images (for source-specific, images of the source class) answered with
    the target class.
  - RA: the share of triggered images answered with their true class.
  - FPR / TPR: the shares of clean / triggered requests flagged.
  - STRIP is measured on {settings['strip_samples']} clean and {settings['strip_samples']} triggered images per
    case (64 forwards each).
  - ROC curves show the first seed.
- **Methods.** The consistency check is LinkBreaker-style, and the pruning methods and AR repair are
  reconstructions (ALGORITHMS.md). NONE training starts its rounds from the undefended model, which is exactly its
  first step (normal training on the same data).
- **Guard's default** is what `guard calibrate` does with its defaults: the static mask, the consistency check,
  the class `guard scan` suspects, whose answers are demoted from a threshold of their own, and the reference, a copy
  of the model fine-tuned on the clean set that answers the requests it firmly disagrees with the model on (at most
  about 8% of clean ones: a threshold set over five fine-tunings, each holding out another fifth, that lets through
  no more of the held-out disagreements than the reference won against the model). The fine-tunings also unlearn
  the triggers the scan synthesised for its candidate classes, stamped on a tenth of each batch under their true
  labels, the pattern of the class its blend scan names (a faint pattern over the whole image that sends most
  images there, unlearned blended in at 0.15), and the warp of the class its warp scan names (a small smooth warp
  that sends most images there); the
  model's answers of that class are overruled past a threshold of their own, set by the same rule on the held-out
  samples the model answers with it at rate 0.5 (`--warp-overrule-rate`), and the score gains a part: how much
  more probability the model gives that class than the reference does (`--warp-lean`). A demotion whose answer the
  reference gives probability 0.99 or more is spared, unless the request scores above every clean calibration
  request. The suspect and the candidates are the scan's in the last table, run at {settings['scan_steps']} steps
  (the command's scan runs 200). The consistency check's column is the check alone: its score's parts (all taps,
  the first conv tap, the dense distance) and the input envelope, with no mask, no suspect, no reference; "guard
  without the reference" is the default's profile with its reference (and the warp's lean)
  taken out.
- **Targets checked below** (issue 3): CA within {100 * MAX_ACCURACY_LOSS:g} point of no defense; ASR ≤
  {100 * MAX_ASR:g}% (≤ 5% for wanet and adaptive); AUROC ≥ {MIN_AUROC}; observed FPR within
  {100 * MAX_FPR_DEVIATION:g} points of the target; on the clean model, at most the target flagged and at most
  {100 * MAX_ACCURACY_LOSS_CLEAN_MODEL:g} points lost; ASR at most fine-pruning's, AUROC at least STRIP's.

## Headline: no defense vs guard's default policy

{headline_table(figures)}

## Targets

{misses_text(misses)}
{_fine_tuning_text(figures)}{_failures_text(figures)}
## What each part adds: attack success rate

{_method_table(figures, 'asr')}

## What each part adds: clean accuracy

{_method_table(figures, 'ca')}

## The floor: a clean model's answers to each trigger

The clean models (no poison) answer the target class for this share of each attack's triggered images, measured
like ASR (for source-specific, source-class images). The first column is the same share for untouched non-target
images. With no backdoor to remove, this is the attack success rate a perfect guard or repair would still show;
the 2% targets sit at or below it on some attacks.

{_floor_table(figures)}

## Model repair: attack success rate

Models cleaned offline (`guard repair`, `guard train --none`), each measured as it is, unguarded. Fine-tuning and
AR train on the defender's clean set for the same epochs; AR also unlearns the synthesised triggers of the scan's
candidate classes (the suspect and any class with anomaly index at least 1, or where there is neither the scan's two
most anomalous classes; listed per seed in the last table), and the pattern and the warp of the classes the blend
and warp scans name.
Benign-salience pruning is `guard repair --method prune`. Plain L2 (`--method l2`) is left out of the full run to
keep it within its hour.

{_method_table(figures, 'asr', REPAIRS)}

## What the trigger adds: the same images untouched

The share of the images counted for ASR that each model answers with the target class without the trigger: its own
confusions into that class. ASR minus this is what the trigger still adds. A model whose ASR is down to this has no
backdoor left to remove and goes lower only by confusing less, so where this lies near or above a 2% target, the
target asks for a more accurate model rather than a cleaner one. The misses above give both figures.

{_method_table(figures, 'untouched', UNTOUCHED)}

## Model repair: clean accuracy

{_method_table(figures, 'ca', REPAIRS)}

## NONE training: the samples it removed

Precision and recall of the samples dropped from fine-tuning against the poisoned ones (ground truth, used only for
this table), and how many the fine-tuning pushed off their label: those of the split's most common label, when the
model's runner-up classes for them spread over many classes, as images of many classes poisoned under one label do,
and the upper group of any class whose own split looks like other classes far more often than the rest of the class
(docs/design.md, "NONE's per-class split"); a round that pushes fine-tunes one epoch longer. The rule says what was
dropped: `split`, the natural-breaks split's whole upper group (the paper); `gated`, only the samples pushed off their
label; with either, the rest of a taken class that looks like another class is dropped too, not pushed. Precision is
over the seeds that dropped anything; – where none did.

{_none_table(figures)}

## Model repair: targets

{misses_text(check_repair_targets(figures), "for repair") if any(c["methods"].get("ar-repair") for c in _cases(figures)) else "No repair figures in this run."}

## Detection: guard's per-request score against STRIP

"Took" is the share of triggered images the undefended model answers with the target class (its attack success);
the "took" AUROCs are measured on those images alone, against the same clean ones. A score of the model's state
sees a trigger that did not take only as far as it disturbs the model anyway; one that does not disturb it scores
like a clean image, and where a trigger takes on a minority of images such a score's AUROC over all of them stays
near took + (1 − took) / 2 even if it finds every trigger that took. The targets are checked on the AUROC over all
triggered images, as EVALUATION.md states it; the "took" columns say how much of a miss that accounts for.
STRIP's are measured on its own subsample (above), so where little took they rest on few images (`n_took` in
figures.json).

{_detection_table(figures)}

## Adversarial examples (PGD ℓ∞ 0.1, 10 steps, against the unguarded model), scan, reference and cost

"Reference answered" is the share of requests the default guard's reference answered instead of the model (clean
images; triggered ones). `guard calibrate` runs the scan before calibrating, so its default costs scan s plus
calibration s (the scan here runs {settings['scan_steps']} steps, the command's {ScanSettings().steps}). The overhead is
timed on clean requests; a flagged one is re-predicted and costs more.

{_extra_table(figures)}

## Plots

""" + "\n".join(f"![{p.stem}]({p.name})" for p in images) + "\n"
    (out / "report.md").write_text(text)
