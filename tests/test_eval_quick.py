"""`guard eval --quick`, the CI-sized run of the evaluation protocol, end to end through the command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from guard.cli import main
from guard.eval.suite import below_floor


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory, fashion) -> tuple[int, Path]:
    out = tmp_path_factory.mktemp("eval")
    code = main(["eval", "--quick", "--out", str(out)])
    return code, out


def test_quick_eval_meets_its_floors(quick_report: tuple[int, Path]) -> None:
    code, out = quick_report
    figures = json.loads((out / "figures.json").read_text())
    assert below_floor(figures) == []
    assert code == 0


def test_quick_eval_writes_report_plots_and_raw_figures(quick_report: tuple[int, Path]) -> None:
    _, out = quick_report
    report = (out / "report.md").read_text()
    assert "guard eval --quick" in report and "## Targets" in report
    cpu = json.loads((out / "figures.json").read_text())["machine"]["cpu"]
    assert cpu and cpu in report  # run times and even the trained models depend on the processor
    assert not list(out.glob("*.tmp"))  # each file went to a temporary name first, and was renamed
    assert not (out / "figures.partial.json").exists()  # the cases so far, kept while the run went on
    for name in ("roc.png", "bars.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({name})" in report
    figures = json.loads((out / "figures.json").read_text())
    assert {(c["attack"], c["arch"]) for c in figures["cases"]} == {("badnets", "cnn"), ("clean", "cnn")}
    badnets = next(c for c in figures["cases"] if c["attack"] == "badnets")
    expected = {"none", "fine-pruning", "strip", "linf-prune", "salience-prune", "check", "guard-no-reference",
                "guard", "fine-tuning", "ar-repair", "none-train"}
    assert set(badnets["methods"]) == expected
    assert "| guard without the reference | guard (default) |" in report
    guard = badnets["methods"]["guard"]
    assert 0 < guard["overruled_clean"] < 0.15 < guard["overruled_triggered"]  # the reference vetoes the trigger
    assert "## Model repair: targets" in report and "| AR repair | NONE training |" in report
    none_train = badnets["methods"]["none-train"]
    assert 0 <= none_train["recall"] <= 1
    assert (none_train["precision"] is None) == (none_train["removed"] == 0)  # no precision for nothing removed
    assert none_train["precision"] is None or 0 <= none_train["precision"] <= 1
    # The split always takes a group; by default only what was pushed off its label is dropped.
    assert none_train["drop"] == "gated" and none_train["split"][0] > 0
    assert none_train["removed"] == none_train["unlearned"] <= sum(none_train["split"])
    assert len(none_train["spread"]) == len(none_train["agreement"]) >= 1  # the push's gate, per round
    assert all(a is None or 0 <= a <= 1 for a in none_train["agreement"])
    assert badnets["n_triggered"] > 0 and badnets["n_poisoned"] > 0
    assert 0.5 <= badnets["methods"]["strip"]["auroc"] <= 1.0
    # BadNets takes on nearly every image, so the AUROC on the triggers that took is the whole AUROC, near enough
    for method in ("guard", "check", "strip"):
        row = badnets["methods"][method]
        assert abs(row["auroc_took"] - row["auroc"]) < 0.05 and 0 <= row["tpr_took"] <= 1
    assert "| took | AUROC guard, took | AUROC STRIP, took |" in report
    # the victims untouched: a few confusions into the target, where the trigger takes nearly all (ASR above)
    for method in ("none", "guard", "ar-repair", "none-train"):
        assert 0 <= badnets["methods"][method]["untouched"] < 0.2
    assert "## What the trigger adds: the same images untouched" in report


def test_clean_model_case_measures_the_trigger_floor(quick_report: tuple[int, Path]) -> None:
    _, out = quick_report
    figures = json.loads((out / "figures.json").read_text())
    clean = next(c for c in figures["cases"] if c["attack"] == "clean")
    badnets = next(c for c in figures["cases"] if c["attack"] == "badnets")
    floor = clean["trigger_floor"]
    assert set(floor) == {"clean", "badnets", "badnets-1%", "blend", "source-specific", "wanet", "adaptive"}
    assert all(0 <= v <= 1 for v in floor.values())
    # a clean model answers the target for a few triggered images; the backdoored one for nearly all
    assert floor["badnets"] < 0.2 < 0.8 < badnets["methods"]["none"]["asr"]
    assert "trigger_floor" not in badnets  # only a clean model shows the floor
    report = (out / "report.md").read_text()
    assert "## The floor: a clean model's answers to each trigger" in report
    assert "| model | untouched images | badnets |" in report


def test_floor_check_names_a_broken_figure(quick_report: tuple[int, Path]) -> None:
    _, out = quick_report
    figures = json.loads((out / "figures.json").read_text())
    badnets = next(c for c in figures["cases"] if c["attack"] == "badnets")
    badnets["methods"]["guard"]["asr"] = 0.9  # what a guard that stopped working would show
    broken = below_floor(figures)
    assert len(broken) == 1 and "attack success under guard" in broken[0]
    badnets["methods"]["guard"]["auroc"] = None  # a figure that went missing fails the floor too
    assert len(below_floor(figures)) == 2


def test_eval_rejects_an_unknown_attack(capsys, tmp_path) -> None:
    assert main(["eval", "--attacks", "badnets,nope", "--out", str(tmp_path / "report")]) == 2
    assert "unknown attack" in capsys.readouterr().err
    assert not (tmp_path / "report").exists()  # refused before the report folder is made
