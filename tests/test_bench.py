"""`guard bench` end to end on a small model: every figure it promises is there and plausible."""

from __future__ import annotations

import json
import sys
import time

import numpy as np
import pytest

from conftest import Backdoored
from guard.bench import format_table, growth_taps, in_threads, write_outputs
from guard.cli import main
from guard.errors import GuardError
from guard.runtime.guard import Guard


def test_bench_measures_bare_engine_and_server_side_by_side(backdoored: Backdoored, tmp_path, capsys,
                                                           monkeypatch) -> None:
    x, y = backdoored.x_clean[:300], backdoored.y_clean[:300]  # the bench calibrates on it, for each tap count
    data = tmp_path / "clean.npz"
    np.savez(data, x=x, y=y)
    out = tmp_path / "bench"
    # a deployed guard's variables are not the benched server's: a token there would lock the bench's client out
    (tmp_path / "token").write_text("s3cret\n")
    monkeypatch.setenv("GUARD_AUTH_TOKEN_FILE", str(tmp_path / "token"))
    code = main(["bench", str(backdoored.model_path), "--profile", str(backdoored.profile_path), "--data", str(data),
                 "--batches", "1,16", "--seconds", "0.3", "--callers", "2", "--threads", "1", "--out", str(out)])
    assert code == 0
    figures = json.loads((out / "bench.json").read_text())
    assert [r["batch"] for r in figures["rows"]] == [1, 16]
    for row in figures["rows"]:
        for part in ("bare", "engine", "server"):
            assert row[part]["calls"] >= 10 and 0 < row[part]["p50_ms"] <= row[part]["p99_ms"]
        assert row["engine_over_bare"] == round(row["engine"]["p50_ms"] / row["bare"]["p50_ms"], 3)
        assert 0 <= row["repredicted_share"] <= 1
        # the server's throughput against the engine under as many callers as the server had (like for like)
        assert row["engine_concurrent_throughput"] > 0
        assert row["server_over_concurrent_engine_throughput"] == round(
            row["server"]["throughput"] / row["engine_concurrent_throughput"], 3)
    # the shares are the whole data's, not its first few batches' (at batch 1 that had been 8 images)
    guard = Guard.load(backdoored.model_path, backdoored.profile_path)
    assert figures["rows"][0]["repredicted_share"] == round(float(guard.engine.run(x).needs.mean()), 4)
    assert figures["rows"][0]["flagged_share"] == round(float(guard.predict(x).flagged.mean()), 4)
    assert figures["server_peak_rss_mb"] > figures["bare_process_peak_rss_mb"] > 10
    assert figures["strip"]["ratio"] > 2, "64 blends per input cannot cost less than two bare calls"
    growth = figures["tap_growth"]
    assert [g["taps"] for g in growth] == list(range(1, len(growth) + 1)) and len(growth) >= 3
    assert figures["calibration"]["samples"] == len(x)
    assert figures["skipped"] == {} and figures["settings"]["tap_growth"]
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # written to a temporary name, as PNG
    assert sorted(p.name for p in out.iterdir()) == ["bench.json", "bench.md", "bench.png"]
    table = (out / "bench.md").read_text()
    assert table.startswith("| batch |") and "STRIP" in table and "server / engine, 1 caller / 2 |" in table
    assert "engine / bare" in capsys.readouterr().out
    # What did not run is named, with the reason.
    figures["skipped"] = {"tap_growth": "the data has no labels"}
    assert "Not measured: tap growth (the data has no labels)." in format_table(figures)
    # Without matplotlib (a runtime-only install) the figures are still written, and only the plot is left out.
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    bare = tmp_path / "bare"
    assert write_outputs(figures, bare) == [bare / "bench.json", bare / "bench.md"]
    assert sorted(p.name for p in bare.iterdir()) == ["bench.json", "bench.md"]


def test_bench_and_load_refuse_data_the_model_cannot_take_before_starting_a_server(backdoored: Backdoored, tmp_path,
                                                                                  capsys) -> None:
    data = tmp_path / "rgb.npz"
    np.savez(data, x=np.zeros((30, 3, 32, 32), np.float32), y=np.arange(30) % 10)
    for command in (["bench", "--out", str(tmp_path / "b")], ["load"]):
        assert main([command[0], str(backdoored.model_path), "--profile", str(backdoored.profile_path), "--data",
                     str(data), *command[1:]]) == 2
        assert "samples have shape (3, 32, 32); the model takes (1, 28, 28)" in capsys.readouterr().err
    empty = tmp_path / "empty.npz"
    np.savez(empty, x=np.zeros((0, 1, 28, 28), np.float32))
    for command in (["bench", "--out", str(tmp_path / "b")], ["load"]):
        assert main([command[0], str(backdoored.model_path), "--profile", str(backdoored.profile_path), "--data",
                     str(empty), *command[1:]]) == 2
        assert "the data holds no samples" in capsys.readouterr().err  # was a traceback from an empty cycle
    assert not (tmp_path / "b").exists(), "a refused bench leaves no empty output folder"
    few = tmp_path / "few.npz"
    np.savez(few, x=backdoored.x_clean[:5], y=backdoored.y_clean[:5])
    assert main(["bench", str(backdoored.model_path), "--profile", str(backdoored.profile_path), "--data", str(few),
                 "--out", str(tmp_path / "b")]) == 2
    assert "needs at least 20 clean samples" in capsys.readouterr().err
    lacking = tmp_path / "lacking.npz"  # calibration, timed last, needs every class: refused before the timings
    keep = backdoored.y_clean != 2
    np.savez(lacking, x=backdoored.x_clean[keep], y=backdoored.y_clean[keep])
    assert main(["bench", str(backdoored.model_path), "--profile", str(backdoored.profile_path), "--data",
                 str(lacking), "--out", str(tmp_path / "b")]) == 2
    assert "no sample of class(es) [2]" in capsys.readouterr().err and not (tmp_path / "b").exists()


def test_the_calibrations_draw_holds_every_class_however_the_data_is_ordered() -> None:
    """Image folders are read class by class, and a rare class can miss a draw: the tap-growth calibrations got
    data without some class, and the bench failed after all its timings."""
    from guard.bench import _spread

    y = np.repeat(np.arange(10), [500] * 9 + [3])  # class 9 rare, at the end
    x = np.arange(len(y), dtype=np.float32)
    drawn_x, drawn_y = _spread(x, y, 20)
    assert set(drawn_y.tolist()) == set(range(10)) and len(drawn_y) == 20
    assert (y[drawn_x.astype(int)] == drawn_y).all() and len(set(drawn_x.tolist())) == 20


def test_sigterm_exits_through_the_block_in_the_main_thread_and_is_left_alone_elsewhere() -> None:
    """SIGTERM during a bench or load run must reach their `finally` (which stops guard serve); only the main thread
    may set a handler, and the CLI embedded in another thread ran before the handler existed."""
    import signal
    import threading

    from guard.bench import exit_on_sigterm

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as stopped, exit_on_sigterm():
        signal.raise_signal(signal.SIGTERM)
    assert stopped.value.code == 128 + signal.SIGTERM and signal.getsignal(signal.SIGTERM) == before
    errors: list[BaseException] = []

    def elsewhere() -> None:
        try:
            with exit_on_sigterm():
                pass
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    thread = threading.Thread(target=elsewhere)
    thread.start()
    thread.join()
    assert errors == []


@pytest.mark.parametrize(("script", "said"), [
    ("echo hello; exec sleep 60", "printed 'hello' where it says where it serves"),
    ("echo oops >&2; exit 2", r"exited \(code 2\) before it was ready: oops"),
])
def test_a_server_that_does_not_say_where_it_serves_is_named_for_what_it_did(
        tmp_path, monkeypatch: pytest.MonkeyPatch, script: str, said: str) -> None:
    """A server whose output ended was read as not starting within 120 s while it exited (its exit code was read
    before it was reaped); one that printed something else was said not to have started at all."""
    from guard.bench import ServerProcess
    from guard.errors import GuardError

    fake = tmp_path / "python"
    fake.write_text(f"#!/bin/sh\n{script}\n")
    fake.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(fake))  # `python -m guard serve ...` runs the script instead
    with pytest.raises(GuardError, match=said):
        ServerProcess(tmp_path / "m.onnx", tmp_path / "p.safetensors", [], tmp_path)


def test_tap_growth_taps_are_the_penultimate_features_plus_the_last_convs_and_none_without_default_taps(
        backdoored: Backdoored) -> None:
    """A model whose logits come from no Gemm or MatMul failed the bench after every timing, with nothing written."""
    from onnx import TensorProto, helper, numpy_helper

    from guard.model.graph import load_model

    sets = growth_taps(load_model(backdoored.model_path))
    assert len(sets) >= 3 and all(s[-1] == sets[0][0] for s in sets), sets  # the penultimate features in each
    assert [len(s) for s in sets] == list(range(1, len(sets) + 1))
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node("GlobalAveragePool", ["c"], ["p"]),
             helper.make_node("Flatten", ["p"], ["logits"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 6, 6])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])],
                              [numpy_helper.from_array(rng.normal(size=(3, 1, 3, 3)).astype(np.float32), "w")])
    assert growth_taps(load_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))) == []


def test_callers_stop_when_one_fails_or_the_run_is_interrupted() -> None:
    """The bench's callers ran on to --seconds after Ctrl-C or SIGTERM (then the process aborted), and after one of
    them had failed."""
    import signal
    import threading

    def run(first: object) -> None:
        halt = threading.Event()

        def caller(index: int) -> None:
            if index == 0:
                time.sleep(0.2)
                first()
            deadline = time.monotonic() + 60
            while not halt.is_set() and time.monotonic() < deadline:
                time.sleep(0.01)

        in_threads(caller, 4, "a caller", halt)

    def fail() -> None:
        raise ValueError("refused")

    started = time.monotonic()
    with pytest.raises(GuardError, match="a caller failed: refused"):
        run(fail)
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C: a real SIGINT, which wakes the main thread from its join
        run(lambda: signal.pthread_kill(threading.main_thread().ident, signal.SIGINT))
    assert time.monotonic() - started < 30, "the other callers waited for their own deadline"
