"""`guard eval`'s orchestration: workers, interruption, the folder it writes, and the settings it refuses.

A case trains and measures for minutes; here the real command and its real worker processes run a stand-in that
sleeps and answers a case of the committed report's figures (a `sitecustomize` on the subprocess's PYTHONPATH, so
the spawned workers load it too). What is under test is everything around the case.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from guard.cli import main

ROOT = Path(__file__).resolve().parents[1]
FIGURES = ROOT / "docs" / "eval" / "figures.json"
STAND_IN = textwrap.dedent(f"""
    import copy, json, os, time
    import guard.eval.suite as suite

    _cases = {{(c["attack"], c["arch"], c["seed"]): c for c in json.load(open({str(FIGURES)!r}))["cases"]}}

    class TwoPartError(Exception):  # pickles as its message alone, which its constructor refuses
        def __init__(self, first, second):
            super().__init__(f"{{first}} {{second}}")

    def run_case(case, settings):
        with open(os.environ["STAND_IN_PIDS"], "a") as pids:
            pids.write(f"{{os.getpid()}}\\n")
        time.sleep(float(os.environ["STAND_IN_SECONDS"]))
        if case.attack == os.environ.get("STAND_IN_FAILS"):
            raise TwoPartError("no", "figures")
        return copy.deepcopy(_cases[(case.attack, case.arch, case.seed)])

    run_case.__module__, run_case.__qualname__ = "guard.eval.suite", "run_case"  # picklable for the workers
    suite.run_case = run_case
""")


def start_eval(tmp_path: Path, seconds: float, *args: str, fails: str = "") -> subprocess.Popen:
    """`guard eval ARGS` with the stand-in's cases taking `seconds` each; those of attack `fails` raise."""
    (tmp_path / "stand_in").mkdir(exist_ok=True)
    (tmp_path / "stand_in" / "sitecustomize.py").write_text(STAND_IN)
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "stand_in"), "STAND_IN_PIDS": str(tmp_path / "pids"),
           "STAND_IN_SECONDS": str(seconds), "STAND_IN_FAILS": fails}
    return subprocess.Popen([sys.executable, "-m", "guard", "eval", *args], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own process group, as a terminal's foreground job


def wait_for(path: Path, process: subprocess.Popen, seconds: float = 180) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.2)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_an_interrupted_run_stops_its_workers_at_once_and_keeps_the_finished_cases(tmp_path: Path, sig: int,
                                                                                   code: int) -> None:
    """Ctrl-C (to the process group, as a terminal sends it) and SIGTERM (a cancelled CI job): leaving the pool
    waited for every queued case, and SIGTERM left the workers running with nobody to collect their cases."""
    out = tmp_path / "out"
    process = start_eval(tmp_path, 2.0, "--attacks", "badnets,blend,clean", "--archs", "cnn", "--seeds", "0,1,2",
                         "--workers", "2", "--out", str(out))
    wait_for(out / "figures.partial.json", process)
    while len((tmp_path / "pids").read_text().split()) < 2:  # the second worker may still be importing torch
        assert process.poll() is None, process.communicate()
        time.sleep(0.2)
    if sig == signal.SIGINT:
        os.killpg(process.pid, sig)
    else:
        process.send_signal(sig)
    try:
        _, err = process.communicate(timeout=30)  # nine cases of 2 s on two workers would take longer
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == code, err
    assert "interrupted; the cases finished are kept in" in err and "Traceback" not in err
    kept = json.loads((out / "figures.partial.json").read_text())
    assert 1 <= len(kept["cases"]) < 9 and not kept["failures"]  # an interruption is no case's failure
    assert not (out / "figures.json").exists()
    workers = {int(line) for line in (tmp_path / "pids").read_text().split()}
    assert len(workers) == 2
    time.sleep(1)
    assert not [pid for pid in workers if alive(pid)]
    started = len((tmp_path / "pids").read_text().split())
    time.sleep(3)
    assert len((tmp_path / "pids").read_text().split()) == started  # no case started after the run ended
    # the next run into the folder would replace the only copy of those cases: refused, and the file kept
    assert main(["eval", "--attacks", "badnets", "--archs", "cnn", "--seeds", "0", "--out", str(out)]) == 2
    assert (out / "figures.partial.json").read_text() == json.dumps(kept, indent=1) + "\n"
    # drawn into its own folder, as the README says, its cases are in figures.json and it makes way for a new run
    assert main(["eval", "--figures", str(out / "figures.partial.json"), "--out", str(out)]) == 0
    assert json.loads((out / "figures.json").read_text())["cases"] == kept["cases"]
    assert not (out / "figures.partial.json").exists()


def test_a_run_of_several_workers_writes_every_case_in_order(tmp_path: Path) -> None:
    out = tmp_path / "out"
    process = start_eval(tmp_path, 0.5, "--attacks", "badnets,clean", "--archs", "cnn,resnet", "--seeds", "0",
                         "--workers", "3", "--out", str(out))
    _, err = process.communicate(timeout=300)
    assert process.returncode in (0, 1), err  # 1: the committed figures miss targets, as the report says
    figures = json.loads((out / "figures.json").read_text())
    assert [(c["attack"], c["arch"]) for c in figures["cases"]] == [
        ("badnets", "cnn"), ("clean", "cnn"), ("badnets", "resnet"), ("clean", "resnet")]
    assert not figures["failures"] and not (out / "figures.partial.json").exists()
    assert len(set((tmp_path / "pids").read_text().split())) <= 3


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_case_whose_error_does_not_pickle_fails_alone(tmp_path: Path, workers: str) -> None:
    """In a worker, such an error broke the pool: every case not yet answered failed as 'a worker process died'."""
    out = tmp_path / "out"
    process = start_eval(tmp_path, 0.5, "--attacks", "badnets,blend,clean", "--archs", "cnn", "--seeds", "0",
                         "--workers", workers, "--out", str(out), fails="blend")
    _, err = process.communicate(timeout=300)
    assert process.returncode == 1, err
    figures = json.loads((out / "figures.json").read_text())
    assert [c["attack"] for c in figures["cases"]] == ["badnets", "clean"]
    assert figures["failures"] == [{"attack": "blend", "arch": "cnn", "seed": 0, "error": "TwoPartError: no figures"}]


@pytest.mark.parametrize(("given", "fragment"), [
    (["--attacks", ""], "unknown attack or architecture ['']"),  # an unset shell variable is not "the defaults"
    (["--quick", "--archs", ""], "unknown attack or architecture ['']"),
    (["--seeds", ""], "--seeds takes comma-separated integers"),
    (["--seeds", str(2**32)], "seeds must lie in 0..2^32-1"),
    (["--n-train", "1000000"], "n_train must lie in 100..60,000"),
    # its floors are on badnets and the clean model: a run without either ended below them, after all its cases
    (["--quick", "--attacks", "blend,clean"], "checks floors on the badnets case(s): keep them in --attacks"),
    (["--quick", "--attacks", "badnets"], "checks floors on the clean case(s): keep them in --attacks"),
])
def test_settings_that_would_run_something_else_are_refused_before_any_case(
        given: list[str], fragment: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", *given, "--out", str(tmp_path / "out")]) == 2
    assert fragment in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_figures_of_another_making_are_refused_before_the_folder_is_touched(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "report"
    out.mkdir()
    (out / "figures.json").write_text("an earlier report's figures")
    stranger = tmp_path / "stranger.json"
    for figures, fragment in (({"cases": [{"attack": "badnets"}]}, "lacks settings, machine, seconds"),
                              ({**json.loads(FIGURES.read_text()), "settings": {}}, "lacks settings.attacks")):
        stranger.write_text(json.dumps(figures))
        assert main(["eval", "--figures", str(stranger), "--out", str(out)]) == 2
        assert fragment in capsys.readouterr().err
    assert (out / "figures.json").read_text() == "an earlier report's figures"
    assert sorted(p.name for p in out.iterdir()) == ["figures.json"]


def test_a_drawing_that_fails_leaves_the_earlier_report_beside_its_own_figures(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The report is drawn in a folder of its own, then moved: a drawing that failed after writing the figures left
    the earlier run's report.md beside another run's figures (and, first fixed, deleted it). A run's own cases stay
    in figures.partial.json, which is removed only once the report is written."""
    import guard.eval.report as report

    out = tmp_path / "report"
    out.mkdir()
    earlier = {"report.md": "an earlier run's report", "figures.json": "an earlier run's figures"}
    for name, text in earlier.items():
        (out / name).write_text(text)

    def broken(*_args: object) -> None:
        raise RuntimeError("the plot failed")

    monkeypatch.setattr(report, "plot", broken)
    with pytest.raises(RuntimeError):
        report.write_report(json.loads(FIGURES.read_text()), out, "guard eval")
    assert {p.name: p.read_text() for p in out.iterdir()} == earlier
