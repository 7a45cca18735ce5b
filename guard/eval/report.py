"""The evaluation report: raw figures as JSON, Markdown tables, PNG plots, and the check against the targets.

Tables show the mean and spread over seeds per attack and architecture; every target of the default policy is
checked here, in one place, and each miss is named in the report rather than hidden in an average.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from guard.eval.metrics import mean_spread

# Rows of the "what each part adds" table, in the order a reader builds up the defense.
METHODS = ("none", "fine-pruning", "linf-prune", "salience-prune", "check", "guard")
METHOD_TITLES = {
    "none": "no defense", "fine-pruning": "fine-pruning", "strip": "STRIP", "linf-prune": "ℓ∞-gap pruning (scan)",
    "salience-prune": "benign-salience pruning", "check": "consistency check", "guard": "guard (default)",
}
LOOSE_ASR_ATTACKS = ("wanet", "adaptive")  # their target is ASR ≤ 5%, the others' 2%


@dataclass
class Miss:
    attack: str
    arch: str
    target: str
    value: str


def _cases(figures: dict) -> list[dict]:
    return list(figures["cases"])


def _groups(figures: dict) -> list[tuple[str, str, list[dict]]]:
    """(attack, arch, cases over seeds), in the run's order."""
    out: dict[tuple[str, str], list[dict]] = {}
    for case in _cases(figures):
        out.setdefault((case["attack"], case["arch"]), []).append(case)
    return [(attack, arch, cases) for (attack, arch), cases in out.items()]


def _metric(cases: list[dict], method: str, key: str) -> tuple[float, float]:
    return mean_spread([c["methods"].get(method, {}).get(key) for c in cases])


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
    return [miss for attack, arch, cases in _groups(figures) for miss in _group_misses(attack, arch, cases, target_fpr)]


def _group_misses(attack: str, arch: str, cases: list[dict], target_fpr: float) -> list[Miss]:
    misses: list[Miss] = []

    def mean(method: str, key: str) -> float:
        return _metric(cases, method, key)[0]

    def miss(target: str, value: float, percent: bool = True) -> None:
        misses.append(Miss(attack, arch, target, f"{100 * value:.2f}%" if percent else f"{value:.3f}"))

    ca_loss = mean("none", "ca") - mean("guard", "ca")
    fpr = mean("guard", "fpr")
    if attack == "clean":
        if fpr > target_fpr:
            miss(f"clean model flagged ≤ {100 * target_fpr:g}%", fpr)
        if ca_loss > 0.002:
            miss("clean model: no accuracy lost (≤ 0.2 points)", ca_loss)
        return misses
    if ca_loss > 0.01:
        miss("clean accuracy within 1 point", ca_loss)
    asr_bound = 0.05 if attack in LOOSE_ASR_ATTACKS else 0.02
    asr = mean("guard", "asr")
    if asr > asr_bound:
        miss(f"ASR ≤ {100 * asr_bound:g}%", asr)
    if mean("guard", "auroc") < 0.98:
        miss("AUROC ≥ 0.98", mean("guard", "auroc"), percent=False)
    if abs(fpr - target_fpr) > 0.02:
        miss(f"FPR within 2 points of {100 * target_fpr:g}%", fpr)
    if asr > mean("fine-pruning", "asr"):
        miss(f"ASR below fine-pruning's ({100 * mean('fine-pruning', 'asr'):.2f}%)", asr)
    if mean("guard", "auroc") < mean("strip", "auroc"):
        miss(f"AUROC above STRIP's ({mean('strip', 'auroc'):.3f})", mean("guard", "auroc"), percent=False)
    return misses


def headline_table(figures: dict) -> str:
    """No defense vs guard's default, per attack and architecture (percent, mean ± spread over seeds)."""
    rows = ["| attack | model | CA none | CA guard | ASR none | ASR guard | RA guard | AUROC | TPR | FPR |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for attack, arch, cases in _groups(figures):
        rows.append(
            f"| {attack} | {arch} | {_fmt(_metric(cases, 'none', 'ca'))} | {_fmt(_metric(cases, 'guard', 'ca'))} | "
            f"{_fmt(_metric(cases, 'none', 'asr'))} | {_fmt(_metric(cases, 'guard', 'asr'))} | "
            f"{_fmt(_metric(cases, 'guard', 'ra'))} | {_fmt(_metric(cases, 'guard', 'auroc'), False, 3)} | "
            f"{_fmt(_metric(cases, 'guard', 'tpr'))} | {_fmt(_metric(cases, 'guard', 'fpr'))} |")
    return "\n".join(rows)


def _method_table(figures: dict, key: str) -> str:
    rows = ["| attack | model | " + " | ".join(METHOD_TITLES[m] for m in METHODS) + " |",
            "|---|---|" + "---|" * len(METHODS)]
    for attack, arch, cases in _groups(figures):
        cells = [_fmt(_metric(cases, m, key)) for m in METHODS]
        rows.append(f"| {attack} | {arch} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _detection_table(figures: dict) -> str:
    rows = ["| attack | model | AUROC guard | AUROC check alone | AUROC STRIP | TPR guard | TPR STRIP | "
            "FPR guard | FPR STRIP |", "|---|---|---|---|---|---|---|---|---|"]
    for attack, arch, cases in _groups(figures):
        if attack == "clean":
            continue
        rows.append(
            f"| {attack} | {arch} | {_fmt(_metric(cases, 'guard', 'auroc'), False, 3)} | "
            f"{_fmt(_metric(cases, 'check', 'auroc'), False, 3)} | {_fmt(_metric(cases, 'strip', 'auroc'), False, 3)} | "
            f"{_fmt(_metric(cases, 'guard', 'tpr'))} | {_fmt(_metric(cases, 'strip', 'tpr'))} | "
            f"{_fmt(_metric(cases, 'guard', 'fpr'))} | {_fmt(_metric(cases, 'strip', 'fpr'))} |")
    return "\n".join(rows)


def _extra_table(figures: dict) -> str:
    rows = ["| attack | model | PGD acc. unguarded | PGD acc. guarded | PGD flagged | scan suspect (per seed) | "
            "calibration s | overhead × (batch 64) | case s |", "|---|---|---|---|---|---|---|---|---|"]
    for attack, arch, cases in _groups(figures):
        adv = [c["adversarial"] for c in cases]
        suspects = ", ".join("–" if c["scan"]["suspect"] is None else str(c["scan"]["suspect"]) for c in cases)
        rows.append(
            f"| {attack} | {arch} | {_fmt(mean_spread([a['accuracy_unguarded'] for a in adv]))} | "
            f"{_fmt(mean_spread([a['accuracy_guarded'] for a in adv]))} | "
            f"{_fmt(mean_spread([a['flagged'] for a in adv]))} | {suspects} | "
            f"{_fmt(_metric(cases, 'guard', 'calibration_seconds'), False, 1)} | "
            f"{_fmt(mean_spread([c['overhead']['ratio'] for c in cases]), False, 2)} | "
            f"{_fmt(mean_spread([c['seconds'] for c in cases]), False, 0)} |")
    return "\n".join(rows)


def misses_text(misses: list[Miss]) -> str:
    if not misses:
        return "Every target of the default policy is met on every attack and architecture in this run."
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
                    ax.plot(roc["fpr"], roc["tpr"], style, color=color, label=f"{METHOD_TITLES[method]}, {arch}")
            ax.plot([0, 1], [0, 1], color="0.8", linewidth=0.8)
            ax.set(title=attack, xlabel="false-positive rate (clean)", ylabel="true-positive rate (triggered)",
                   xlim=(0, 1), ylim=(0, 1.01))
            ax.legend(fontsize=7, loc="lower right")
        for ax in list(axes.flat)[len(attacks):]:
            ax.axis("off")
        fig.tight_layout()
        written.append(out / "roc.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)

    names = [a for a in dict.fromkeys(attack for attack, _, _ in groups)]
    fig, axes = plt.subplots(2, len(archs), figsize=(max(6, 1.3 * len(names) * len(archs) + 2), 7), squeeze=False)
    width = 0.8 / len(METHODS)
    for col, arch in enumerate(archs):
        by_attack = {attack: cases for attack, a, cases in groups if a == arch}
        for row, (key, title) in enumerate((("ca", "clean accuracy"), ("asr", "attack success rate"))):
            ax = axes[row][col]
            for i, method in enumerate(METHODS):
                values = [_metric(by_attack[a], method, key)[0] if a in by_attack else np.nan for a in names]
                ax.bar(np.arange(len(names)) + (i - len(METHODS) / 2 + 0.5) * width, np.nan_to_num(values),
                       width, label=METHOD_TITLES[method])
            ax.set_xticks(np.arange(len(names)), names, rotation=30, ha="right", fontsize=8)
            ax.set(title=f"{title}, {arch}", ylim=(0, 1))
    axes[0][0].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    written.append(out / "bars.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)
    return written


def write_report(figures: dict, out: str | Path, command: str) -> Path:
    """Write figures.json, the PNG plots and report.md under `out`; returns the report's path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "figures.json").write_text(json.dumps(figures, indent=1) + "\n")
    images = plot(figures, out)
    misses = check_targets(figures)
    settings = figures["settings"]
    machine = figures["machine"]
    seeds = settings["seeds"]
    text = f"""# guard eval report

Produced by `{command}` in {figures['seconds'] / 60:.1f} minutes on {machine['cpus']} CPU cores
({machine['platform']}, Python {machine['python']}, torch {machine['torch']}), no GPU.
Fashion-MNIST; per case {settings['n_train']:,} poisoned training images, {settings['epochs']} epochs; the
defender's clean set is the first {settings['n_clean']:,} test images, evaluation uses the rest of the test split.
Thresholds come from the clean set only (target FPR {100 * settings['fpr']:g}%, accuracy budget
{100 * settings['acc_budget']:g} point). Figures are percent, mean ± spread (sample std) over seeds {seeds}.
CA: clean accuracy; ASR: triggered non-target images (source-specific: of the source class) answered with the
target class; RA: triggered images answered with their true class; FPR/TPR: clean/triggered requests flagged.
The consistency check is LinkBreaker-style and the pruning methods are reconstructions (see ALGORITHMS.md).

## Headline: no defense vs guard's default policy

{headline_table(figures)}

## Targets

{misses_text(misses)}

## What each part adds: attack success rate

{_method_table(figures, 'asr')}

## What each part adds: clean accuracy

{_method_table(figures, 'ca')}

## Detection: guard's per-request score against STRIP

{_detection_table(figures)}

## Adversarial examples (PGD ℓ∞ 0.1, 10 steps, against the unguarded model), scan and cost

{_extra_table(figures)}

## Plots

""" + "\n".join(f"![{p.stem}]({p.name})" for p in images) + "\n"
    report = out / "report.md"
    report.write_text(text)
    return report
