"""The evaluation's figures and its target check, pinned on small hand-made inputs."""

from __future__ import annotations

import copy
import itertools
import json

import numpy as np
import pytest

from guard.eval.metrics import auroc, mean_spread, roc_curve, share
from guard.eval.report import (
    _detection_table,
    _fine_tuning_text,
    _method_table,
    _none_table,
    check_repair_targets,
    check_targets,
    headline_table,
    misses_text,
)
from guard.eval.suite import QUICK_MAX_ACCURACY_LOSS, TARGET, _detection, _Truth, below_floor


def brute_auroc(negative: np.ndarray, positive: np.ndarray) -> float:
    pairs = list(itertools.product(negative, positive))
    return sum(1.0 if p > n else 0.5 if p == n else 0.0 for n, p in pairs) / len(pairs)


@pytest.mark.parametrize("seed", range(5))
def test_auroc_matches_pairwise_count_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    negative = rng.integers(0, 6, size=40).astype(float)  # few distinct values: many ties
    positive = rng.integers(2, 8, size=30).astype(float)
    assert auroc(negative, positive) == pytest.approx(brute_auroc(negative, positive))


def test_auroc_extremes_and_empty() -> None:
    assert auroc(np.zeros(5), np.ones(5)) == 1.0
    assert auroc(np.ones(5), np.zeros(5)) == 0.0
    assert np.isnan(auroc(np.zeros(0), np.ones(3)))


def test_roc_curve_runs_from_all_flagged_to_none_and_is_monotone() -> None:
    rng = np.random.default_rng(0)
    fpr, tpr = roc_curve(rng.normal(size=200), rng.normal(1.0, size=200))
    assert (fpr[0], tpr[0]) == (1.0, 1.0)
    assert (fpr[-1], tpr[-1]) == (0.0, 0.0)
    assert np.all(np.diff(fpr) <= 0) and np.all(np.diff(tpr) <= 0)
    # the area under the sampled curve is close to the rank AUROC
    area = float(np.sum((fpr[:-1] - fpr[1:]) * (tpr[:-1] + tpr[1:]) / 2))  # trapezoids, numpy 1 and 2 alike
    assert abs(area - 0.76) < 0.1


def test_a_nan_score_ranks_above_every_number_and_infinities_leave_the_curve_finite() -> None:
    """The guard flags a NaN score (an input the model overflows on): the metrics rank it so, where np.unique sorted
    it last by accident; quantiles between two infinities were NaN thresholds, each a spurious (0, 0) point."""
    nan, inf = float("nan"), float("inf")
    assert auroc([nan], [0.0]) == 0.0 and auroc([0.0], [nan]) == 1.0 and auroc([nan], [nan]) == 0.5
    assert auroc([0.0, 1.0], [nan, 0.5]) == auroc([0.0, 1.0], [inf, 0.5]) == 0.75
    with np.errstate(all="raise"):  # no interpolation between infinities
        fpr, tpr = roc_curve([0.0, 1.0, 2.0, inf], [1.5, inf, inf, nan], points=11)
    assert np.isfinite(fpr).all() and (fpr[0], tpr[0]) == (1.0, 1.0) and (fpr[-1], tpr[-1]) == (0.0, 0.0)
    assert np.all(np.diff(fpr) <= 0) and np.all(np.diff(tpr) <= 0)
    assert int(((fpr == 0) & (tpr == 0)).sum()) == 1  # one end, not one per NaN threshold
    assert tpr[-2] == 0.75  # the three infinite (or NaN) triggered scores stay above the highest finite threshold


def test_share_and_mean_spread() -> None:
    assert share(np.array([True, False, False, True])) == 0.5
    assert np.isnan(share(np.array([], dtype=bool)))
    assert mean_spread([0.5]) == (0.5, 0.0)
    mean, spread = mean_spread([0.1, 0.3, None, float("nan")])
    assert mean == pytest.approx(0.2) and spread == pytest.approx(np.std([0.1, 0.3], ddof=1))


def _case(attack: str, seed: int, **guard: float) -> dict:
    methods = {
        "none": {"ca": 0.88, "asr": 0.99, "ra": 0.0},
        "fine-pruning": {"ca": 0.87, "asr": 0.50},
        "strip": {"auroc": 0.90, "fpr": 0.05, "tpr": 0.5},
        "linf-prune": {"ca": 0.88, "asr": 0.3},
        "salience-prune": {"ca": 0.88, "asr": 0.9},
        "check": {"ca": 0.88, "asr": 0.05, "auroc": 0.99, "fpr": 0.05},
        "guard": {"ca": 0.875, "asr": 0.01, "ra": 0.8, "auroc": 0.999, "tpr": 1.0, "fpr": 0.05},
    }
    methods["guard"].update(guard)
    return {"attack": attack, "arch": "cnn", "seed": seed, "methods": methods, "n_poisoned": 100, "n_train": 1000}


def _figures(*cases: dict, seeds: list[int] | None = None) -> dict:
    """A run of these cases: its settings name their attacks and architecture and, unless given, their seeds."""
    attacks = list(dict.fromkeys(c["attack"] for c in cases))
    seeds = sorted({c["seed"] for c in cases}) if seeds is None else seeds
    return {"settings": {"fpr": 0.05, "attacks": attacks, "archs": ["cnn"], "seeds": seeds}, "cases": list(cases)}


def test_targets_met_gives_no_miss() -> None:
    figures = _figures(_case("badnets", 0), _case("badnets", 1), _case("clean", 0, fpr=0.04, ca=0.88),
                       _case("clean", 1, fpr=0.04, ca=0.88))
    assert check_targets(figures) == []
    assert "Every target" in misses_text([])


def test_each_missed_target_is_named() -> None:
    figures = _figures(_case("badnets", 0, asr=0.03, auroc=0.85, fpr=0.09, ca=0.86),
                       _case("wanet", 0, asr=0.04), _case("clean", 0, fpr=0.07, ca=0.87))
    missed = {(m.attack, m.target.split(" ")[0]) for m in check_targets(figures)}
    assert ("badnets", "ASR") in missed  # 3% > 2%
    assert ("badnets", "AUROC") in missed  # below 0.98, and below STRIP's 0.90
    assert ("badnets", "FPR") in missed
    assert ("badnets", "clean") in missed
    assert not any(attack == "wanet" for attack, _ in missed)  # 4% is within wanet's 5%
    assert {target for attack, target in missed if attack == "clean"} == {"clean"}
    assert len([m for m in check_targets(figures) if m.attack == "clean"]) == 2


def test_rows_where_fine_tuning_leaves_less_attack_success_than_the_guard_are_named() -> None:
    """The fine-pruning target compares against the pruning alone; fine-tuning, its second step, can beat the guard."""
    wanet, badnets = _case("wanet", 0, asr=0.04), _case("badnets", 0)
    assert _fine_tuning_text(_figures(wanet, badnets)) == ""  # a run without the row says nothing
    wanet["methods"]["fine-tuning"] = {"ca": 0.87, "asr": 0.03}
    badnets["methods"]["fine-tuning"] = {"ca": 0.87, "asr": 0.5}
    text = _fine_tuning_text(_figures(wanet, badnets))
    assert "lower ASR than guard's default on 1 row(s): wanet / cnn 3.00% against 4.00%." in text
    wanet["methods"]["fine-tuning"]["asr"] = 0.05
    assert "no lower ASR than guard's default on any attack" in _fine_tuning_text(_figures(wanet, badnets))


def test_targets_use_the_mean_over_seeds() -> None:
    good, bad = _case("blend", 0, asr=0.0), _case("blend", 1, asr=0.03)
    assert check_targets(_figures(good, bad)) == []  # mean 1.5% <= 2%
    worse = copy.deepcopy(bad)
    worse["seed"] = 2
    worse["methods"]["guard"]["asr"] = 0.05
    assert [m.target for m in check_targets(_figures(good, bad, worse))] == ["ASR ≤ 2%"]


def test_headline_table_shows_mean_and_spread() -> None:
    table = headline_table(_figures(_case("badnets", 0, asr=0.01), _case("badnets", 1, asr=0.03)))
    row = table.splitlines()[2]
    assert row.startswith("| badnets | 10.0% | cnn | 88.0 |")
    assert "2.0 ± 1.4" in row  # ASR mean 2%, sample std 1.41%


def test_a_missing_figure_is_a_miss_not_a_pass() -> None:
    case = _case("badnets", 0)
    case["methods"]["guard"]["asr"] = None  # e.g. no triggered images were measured
    del case["methods"]["strip"]
    missed = {m.target.split(" ")[0]: m.value for m in check_targets(_figures(case))}
    assert missed["ASR"] == "no figure"
    assert missed["AUROC"] == "no figure"  # the comparison with STRIP's AUROC has nothing to compare with


def test_a_figure_missing_in_one_seed_is_a_miss_not_an_average_of_the_others() -> None:
    measured, lost = _case("badnets", 0), _case("badnets", 1)
    lost["methods"]["guard"]["asr"] = None
    lost["methods"]["guard"]["auroc"] = float("nan")
    missed = {m.target.split(" ")[0]: m.value for m in check_targets(_figures(measured, lost))}
    assert missed["ASR"] == "no figure" and missed["AUROC"] == "no figure"
    assert check_targets(_figures(measured, _case("badnets", 1))) == []


def test_a_case_that_failed_is_a_miss_and_a_cell_missing_a_seed_shows_none() -> None:
    """A failed case left the others' mean to pass the target; a NaN in one seed was averaged away in the tables
    while the target check called it a miss."""
    cases = [_case("blend", seed, asr=0.0) for seed in (0, 2)]
    missed = check_targets(_figures(*cases, seeds=[0, 1, 2]))
    assert [(m.attack, m.target, m.value) for m in missed] == [("blend", "measured on all 3 seeds", "2 of 3")]
    assert [m.value for m in check_repair_targets(_figures(*cases, seeds=[0, 1, 2]))][:1] == ["2 of 3"]
    absent = check_targets({**_figures(*cases), "settings": {**_figures(*cases)["settings"],
                                                             "attacks": ["blend", "wanet"]}})
    assert [(m.attack, m.value) for m in absent] == [("wanet", "0 of 2")]  # every seed of it failed
    cases[1]["methods"]["guard"]["auroc"] = float("nan")
    row = headline_table(_figures(*cases)).splitlines()[2].split(" | ")
    assert row[8] == "–"  # the AUROC cell, as its target check: no figure
    assert next(m.value for m in check_targets(_figures(*cases)) if m.target.startswith("AUROC ≥")) == "no figure"


def test_the_none_table_shows_a_seeds_missing_figure_as_none_not_nan() -> None:
    cases = []
    for seed in (0, 1):
        case = _case("badnets", seed)
        case["methods"]["none-train"] = {"asr": 0.02, "ca": 0.88, "removed": 90, "precision": 0.9, "recall": 0.8,
                                         "unlearned": 90, "drop": "gated"}
        cases.append(case)
    cases[1]["methods"]["none-train"]["asr"] = None
    table = _none_table(_figures(*cases))
    assert table.splitlines()[2].endswith("| 99.0 | – | – |") and "nan" not in table
    assert "is not measured (the target reads it as a miss)" in table


def test_partial_figures_are_kept_and_a_failed_write_does_not_end_the_run(tmp_path, capsys) -> None:
    from guard.eval.report import PartialFigures

    partial = PartialFigures(tmp_path / "figures.partial.json", "guard eval")
    partial.keep(_figures())  # no case yet: nothing to keep
    assert not partial.path.exists()
    partial.keep(_figures(_case("badnets", 0, auroc_took=float("nan"))))  # no triggered image took
    kept = json.loads(partial.path.read_text(), parse_constant=lambda name: pytest.fail(f"{name} in the figures"))
    assert kept["command"] == "guard eval" and kept["cases"][0]["methods"]["guard"]["auroc_took"] is None
    partial.remove()
    assert not partial.path.exists()
    partial.keep(_figures(_case("badnets", 0)))
    partial.failed = True  # a later write failed: the one kept earlier still goes once the run's figures are written
    partial.remove()
    assert not partial.path.exists()
    blocked = PartialFigures(tmp_path / "taken", "guard eval")
    blocked.path.mkdir()  # e.g. the disk refuses: said once, and the run goes on
    for _ in range(2):
        blocked.keep(_figures(_case("badnets", 0)))
    blocked.remove()
    assert capsys.readouterr().err.count("cannot keep the cases so far") == 1 and blocked.path.is_dir()


def test_a_figure_exactly_on_its_bound_meets_the_target() -> None:
    """Counts of 9,000 images land a rounding error past the bound (630/9000 - 0.05 > 0.02 in floating point)."""
    assert 630 / 9000 - 0.05 > 0.02 and 7650 / 9000 - 7560 / 9000 > 0.01  # what the slack is for
    on_bound = _case("badnets", 0, fpr=630 / 9000, ca=7560 / 9000)
    on_bound["methods"]["none"]["ca"] = 7650 / 9000
    clean = [_case("clean", seed, fpr=0.05, ca=0.88) for seed in range(3)]  # a mean of three 5%s exceeds 5%
    assert check_targets(_figures(on_bound, seeds=[0])) == check_targets(_figures(*clean)) == []
    past = _case("badnets", 0, fpr=631 / 9000)
    assert [m.target.split(" ")[0] for m in check_targets(_figures(past))] == ["FPR"]


def test_the_quick_floors_allow_a_figure_exactly_on_them() -> None:
    case = _case("clean", 0, fpr=0.10, ca=0.85)
    assert case["methods"]["none"]["ca"] - 0.85 > QUICK_MAX_ACCURACY_LOSS  # 0.88 - 0.85 in floating point
    badnets = _case("badnets", 0, fpr=0.10, ca=0.85)
    badnets["methods"]["ar-repair"] = {"asr": 0.15}
    assert below_floor(_figures(case, badnets)) == []
    case["methods"]["guard"]["ca"] = 0.849
    assert [line.split(":")[0] for line in below_floor(_figures(case, badnets))] == ["clean"]


def test_a_quick_floor_whose_case_is_missing_is_broken() -> None:
    """guard eval --quick --attacks clean passed with none of the badnets floors checked."""
    broken = below_floor(_figures(_case("clean", 0)))
    assert len(broken) == 5 and all(line.endswith(": no badnets case in the run") for line in broken)
    assert len(below_floor(_figures())) == 6


def test_none_table_takes_precision_only_from_seeds_that_dropped_something() -> None:
    cases = []
    for seed, removed, precision in ((0, 0, 1.0), (1, 200, 0.9), (2, 0, None)):  # seed 0: an older run's 1.0
        case = _case("badnets", seed)
        case["methods"]["none-train"] = {"asr": 0.5, "ca": 0.88, "removed": removed, "precision": precision,
                                         "recall": removed / 100, "unlearned": removed, "drop": "gated"}
        cases.append(case)
    row = _none_table(_figures(*cases)).splitlines()[2].split(" | ")
    assert row[3] == "90.0"  # seed 1's alone, not a mean with seed 0's "perfect" empty removal
    nothing = _none_table(_figures(cases[0], cases[2])).splitlines()[2].split(" | ")
    assert nothing[3] == "–"


def test_detection_on_the_triggers_that_took() -> None:
    rng = np.random.default_rng(0)
    clean = rng.normal(size=400)
    took = np.arange(300) < 100  # a third of the triggers took and score high; the rest look clean
    triggered = np.where(took, 10.0, rng.normal(size=300))
    row = _detection(clean, clean > 1.6, triggered, triggered > 1.6, took)
    assert row["auroc_took"] == 1.0 and row["tpr_took"] == 1.0 and row["n_took"] == 100
    assert abs(row["auroc"] - (1 / 3 + 2 / 3 / 2)) < 0.05  # took + (1 - took) / 2
    assert row["tpr"] < 0.5
    untold = _detection(clean, clean > 1.6, triggered, triggered > 1.6)
    assert untold["auroc_took"] is None and untold["auroc"] == row["auroc"]


def test_detection_table_shows_the_took_columns() -> None:
    case = _case("wanet", 0, auroc=0.65, auroc_took=0.97)
    case["methods"]["none"]["asr"] = 0.3
    case["methods"]["strip"]["auroc_took"] = 0.8
    header, _, row = _detection_table(_figures(case)).splitlines()
    cells = dict(zip(header.strip("|").split(" | "), row.strip("|").split(" | ")))
    assert cells["took"].strip() == "30.0"
    assert cells["AUROC guard, took"].strip() == "0.970" and cells["AUROC STRIP, took"].strip() == "0.800"
    assert cells["AUROC guard"].strip() == "0.650"


def test_answers_count_the_victims_untouched_answers_of_the_target() -> None:
    truth = _Truth(np.array([0, 1, 2, 3, 1]), np.array([False, True, True, True, True]))
    labels = np.array([0, TARGET, 2, TARGET, 1])  # victims 1 and 3 answered with the target untouched
    row = truth.score(labels, trig_labels=np.array([TARGET, TARGET, 3, 2]))  # victim 3 kept its class
    assert row["ca"] == pytest.approx(3 / 5) and row["asr"] == pytest.approx(2 / 4)
    assert row["untouched"] == pytest.approx(2 / 4) and row["ra"] == pytest.approx(1 / 4)
    clean = _Truth(np.array([0, 1]), None).score(np.array([0, 1]), None)
    assert clean["ca"] == 1.0 and clean["asr"] is clean["untouched"] is None


def test_an_asr_miss_says_how_many_of_the_same_images_were_answered_so_untouched() -> None:
    case = _case("badnets", 0, asr=0.03, untouched=0.025)
    case["methods"]["ar-repair"] = {"ca": 0.875, "asr": 0.04, "untouched": 0.031}
    case["methods"]["none-train"] = {"ca": 0.875, "asr": 0.01}
    asr_miss = next(m for m in check_targets(_figures(case)) if m.target.startswith("ASR"))
    assert asr_miss.value == "3.00% (untouched: 2.50%)"
    ar_miss = next(m for m in check_repair_targets(_figures(case)) if m.target.startswith("AR repair: ASR"))
    assert ar_miss.value == "4.00% (untouched: 3.10%)"
    older = _case("badnets", 0, asr=0.03)  # figures from before the untouched share was recorded
    assert next(m for m in check_targets(_figures(older)) if m.target.startswith("ASR")).value == "3.00%"
    row = _method_table(_figures(case, older), "untouched", ("guard", "ar-repair")).splitlines()[2]
    assert row == "| badnets | cnn | – | – |"  # one seed did not record it: no mean of the other
