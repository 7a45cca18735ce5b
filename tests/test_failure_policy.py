"""When the guard itself fails: a check budget so small that ONNX Runtime aborts every guarded run (a real failure
inside the check, not a stub), under each failure policy, in-process and through the real server."""

from __future__ import annotations

import time
import urllib.request

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from conftest import Backdoored, log_messages
from guard.config import ServeSettings
from guard.errors import CheckFailedError, GuardError
from guard.model.graph import load_model
from guard.runtime.engine import PlainSession
from guard.runtime.guard import Guard
from guard.server._proto.guard.v1 import guard_pb2, guard_pb2_grpc
from guard.server.app import GuardServer

MODEL = "badnets"
BUDGET = 1e-9  # seconds per sample: the abort lands before a 256-image batch is through the graph


@pytest.fixture(scope="module")
def big_batch(backdoored: Backdoored) -> np.ndarray:
    triggered, _ = backdoored.triggered()
    return np.ascontiguousarray(np.concatenate([backdoored.x_eval[:128], triggered[:128]]))


def test_fail_closed_refuses_and_fail_open_answers_unguarded(backdoored: Backdoored, big_batch: np.ndarray) -> None:
    closed = Guard.load(backdoored.model_path, backdoored.profile_path, check_budget=BUDGET)
    with pytest.raises(CheckFailedError, match=r"CheckTimeout: it ran past its time budget \(--check-budget-ms\)"):
        closed.predict(big_batch)  # ONNX Runtime's own words, "terminate flag", read as an internal error
    opened = Guard.load(backdoored.model_path, backdoored.profile_path, check_budget=BUDGET, on_failure="open")
    result = opened.predict(big_batch)
    bare = PlainSession(load_model(backdoored.model_path).proto.SerializeToString(), "input").logits(big_batch)
    assert result.unchecked and not result.flagged.any() and np.isnan(result.score).all()
    np.testing.assert_array_equal(result.labels, bare.argmax(axis=1))  # the model's own answers, triggers and all
    assert set(result.stage_seconds) == {"engine", "unguarded"}  # the failed check's time, then the model's
    unlimited = Guard.load(backdoored.model_path, backdoored.profile_path, on_failure="open").predict(big_batch)
    assert not unlimited.unchecked and unlimited.flagged[128:].mean() > 0.8  # no failure: guarded as usual


def test_the_budget_grows_with_the_batch(backdoored: Backdoored, big_batch: np.ndarray) -> None:
    """A budget per run would let a caller fail the check at will with a batch large enough to outlast it, and under
    fail-open read the unguarded model's answers; per sample, a batch gets as long as its samples would alone."""
    unlimited = Guard.load(backdoored.model_path, backdoored.profile_path)
    times = []
    for _ in range(5):
        started = time.perf_counter()
        unlimited.predict(big_batch)
        times.append(time.perf_counter() - started)
    # the batch takes a tenth of its budget per sample, and 25 times a budget that were per run
    per_sample = 10 * float(np.median(times)) / len(big_batch)
    opened = Guard.load(backdoored.model_path, backdoored.profile_path, check_budget=per_sample, on_failure="open")
    result = opened.predict(big_batch)
    assert not result.unchecked and result.flagged[128:].mean() > 0.8  # checked, the triggers caught


def test_fail_open_answers_on_the_guards_own_engine_and_device(backdoored: Backdoored) -> None:
    """The unguarded model runs where the guarded one does: "cpu:0" is a torch device ONNX Runtime does not know,
    and fail-open on the torch engine refused to start with it."""
    opened = Guard.load(backdoored.model_path, backdoored.profile_path, engine="torch", device="cpu:0",
                        on_failure="open")
    x = backdoored.x_eval[:16]
    bare = PlainSession(load_model(backdoored.model_path).proto.SerializeToString(), "input").logits(x)
    np.testing.assert_allclose(opened._unguarded.logits(x), bare, atol=1e-4)
    assert not opened.predict(x).unchecked


def test_a_budget_needs_the_onnxruntime_engine_and_a_finite_number(backdoored: Backdoored) -> None:
    """A NaN budget made every deadline pass at once (every request answered unguarded under fail-open); an
    infinite one raised OverflowError in each run's timer thread."""
    with pytest.raises(GuardError, match="budget"):
        Guard.load(backdoored.model_path, backdoored.profile_path, engine="torch", check_budget=0.1)
    for budget in (float("nan"), float("inf"), 0.0, -1.0):
        with pytest.raises(GuardError, match="positive, finite"):
            Guard.load(backdoored.model_path, backdoored.profile_path, check_budget=budget)


@pytest.mark.parametrize(("settings", "message"), [
    ({"policy": "ENFORCE"}, r"policy must be one of \['monitor', 'enforce'\], got 'ENFORCE'"),
    ({"on_failure": "sideways"}, r"on_failure must be one of \['closed', 'open'\]"),
    ({"threads": -1}, r"threads must be a whole number in \[0, 1024\]"),
    ({"threads": 10**6}, "threads must be"),  # ONNX Runtime started them all: the load never finished
    ({"threads": True}, "threads must be"),
    ({"engine": "torch", "device": "mps"}, "guard runs on cpu or cuda, not 'mps'"),
])
def test_the_api_refuses_settings_the_cli_would_with_a_guard_error(backdoored: Backdoored, settings: dict,
                                                                   message: str) -> None:
    """The CLI and the settings refuse these first; the Python API let torch's RuntimeError or a bare ValueError
    through, or hung."""
    with pytest.raises(GuardError, match=message):
        Guard.load(backdoored.model_path, backdoored.profile_path, **settings)


def test_the_api_takes_a_numpy_thread_count(backdoored: Backdoored) -> None:
    guard = Guard.load(backdoored.model_path, backdoored.profile_path, threads=np.int64(1))
    assert len(guard.predict(backdoored.x_eval[:2]).labels) == 2


def test_a_budget_longer_than_a_timer_can_wait_checks_as_if_unlimited(backdoored: Backdoored,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A finite budget past threading.TIMEOUT_MAX raised OverflowError in every run's timer thread."""
    import threading

    import onnxruntime

    from guard.runtime.engine import _run_options

    failures: list[BaseException] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: failures.append(args.exc_value))
    before = set(threading.enumerate())
    with _run_options(onnxruntime, time.perf_counter() + 1e12) as options:
        time.sleep(0.5)  # the timer's thread is in its wait (or failed to start it) before the run ends
        timers = set(threading.enumerate()) - before
        assert not options.terminate
    for timer in timers:
        timer.join(5)
    assert timers and not failures, failures
    guard = Guard.load(backdoored.model_path, backdoored.profile_path, check_budget=1e12)
    assert not guard.predict(backdoored.x_eval[:4]).unchecked


def test_onnx_runtime_computes_denormals_as_zero(backdoored: Backdoored, big_batch: np.ndarray) -> None:
    """Pixels near 1e-38 (no visible change) made subnormal activations that slowed ONNX Runtime's CPU kernels up to
    tenfold, so such a batch failed a budget ordinary triggered batches stay within, and under fail-open the
    backdoor answered. Every session computes denormals as zero, so the batch is answered as its zeros would be."""
    import onnxruntime as ort

    from guard.runtime.engine import _sessions

    options, _ = _sessions(ort, "cpu", 0)  # every session of the guard is built with these
    assert options.get_session_config_entry("session.set_denormal_as_zero") == "1"
    guard = Guard.load(backdoored.model_path, backdoored.profile_path, threads=1)
    for tiny in (1e-40, 2e-38):
        nudged = np.where(big_batch == 0, np.float32(tiny), big_batch).astype(np.float32)
        plain, result = guard.predict(big_batch), guard.predict(nudged)
        np.testing.assert_array_equal(result.labels, plain.labels)
        np.testing.assert_array_equal(result.flagged, plain.flagged)


def test_a_masked_array_cannot_hide_nan_from_the_check(backdoored: Backdoored) -> None:
    from guard.errors import RequestError

    x = backdoored.x_eval[:2].copy()
    x[0, 0, 0, 0] = np.nan
    hidden = np.ma.masked_invalid(x)  # np.isfinite skips masked entries; the engine does not
    with pytest.raises(RequestError, match="NaN"):
        Guard.load(backdoored.model_path, backdoored.profile_path).predict(hidden)


@pytest.mark.parametrize("policy", ["closed", "open"])
def test_the_server_applies_the_policy_and_counts_it(backdoored: Backdoored, big_batch: np.ndarray,
                                                     policy: str) -> None:
    server = GuardServer(ServeSettings(model=backdoored.model_path, profile=backdoored.profile_path, port=0,
                                       metrics_port=0, on_check_failure=policy, check_budget_ms=BUDGET * 1000))
    server.start()
    try:
        with triton.InferenceServerClient(f"127.0.0.1:{server.port}") as client:
            tensor = triton.InferInput("input", list(big_batch.shape), "FP32")
            tensor.set_data_from_numpy(big_batch)
            if policy == "closed":
                with pytest.raises(InferenceServerException, match="fail-closed"):
                    client.infer(MODEL, [tensor])
            else:
                reply = client.infer(MODEL, [tensor])
                assert reply.get_response().parameters["guard_unchecked"].bool_param
                assert not reply.as_numpy("guard_flagged").any()
                # guard.v1 says so too: an unflagged answer there is otherwise indistinguishable from a clean one
                with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                    predicted = guard_pb2_grpc.GuardStub(channel).Predict(guard_pb2.PredictRequest(
                        shape=list(big_batch.shape), data=big_batch.tobytes()))
                assert predicted.unchecked and not any(p.flagged for p in predicted.predictions)
                # unguarded logits that overflow are refused, and not counted as an unguarded answer (as large a
                # batch as above, so that the check fails on it too)
                huge = triton.InferInput("input", list(big_batch.shape), "FP32")
                huge.set_data_from_numpy(np.full(big_batch.shape, 3e38, np.float32))
                with pytest.raises(InferenceServerException, match="NaN or Inf"):
                    client.infer(MODEL, [huge])
        with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5) as response:
            text = response.read().decode()
    finally:
        server.stop(grace=1)
    outcome, count = ("refused", 1) if policy == "closed" else ("answered_unguarded", 2)  # open: OIP and guard.v1
    assert f'guard_check_failures_total{{model="{MODEL}",outcome="{outcome}"}} {count:.1f}' in text
    if policy == "closed":
        assert f'guard_request_errors_total{{code="UNAVAILABLE",model="{MODEL}"}} 1.0' in text


def test_an_input_the_model_overflows_on_is_flagged_never_clean(backdoored: Backdoored) -> None:
    """Finite values so large that the model's logits and the score come out NaN: in-process the sample is flagged
    (the server refuses it, tests/test_server.py), and the ordinary samples beside it are answered as alone."""
    guard = Guard.load(backdoored.model_path, backdoored.profile_path)
    x = np.concatenate([backdoored.x_eval[:4], np.full((1, 1, 28, 28), 3e38, np.float32)])
    result = guard.predict(x)
    assert np.isnan(result.score[4]) and result.flagged[4]
    alone = guard.predict(backdoored.x_eval[:4])
    np.testing.assert_array_equal(result.labels[:4], alone.labels)
    np.testing.assert_array_equal(result.flagged[:4], alone.flagged)


def test_failed_checks_are_logged_at_most_once_per_interval(backdoored: Backdoored, big_batch: np.ndarray) -> None:
    """A caller can fail the check at will (a batch past the budget): each failure wrote a line, 300 in half a
    second; now one line per interval says how many were left out."""
    with log_messages("guard.runtime") as lines:
        opened = Guard.load(backdoored.model_path, backdoored.profile_path, check_budget=BUDGET, on_failure="open")
        for _ in range(5):
            assert opened.predict(big_batch).unchecked
        opened._failures.warning("OtherError", "check failed otherwise")  # another kind is not held back
        opened._failures._last["CheckTimeout"] -= 60  # the interval has passed
        opened.predict(big_batch)
    failed = [line for line in lines if line.startswith("check failed")]
    assert len(failed) == 3 and failed[1] == "check failed otherwise", failed
    assert failed[2].startswith("check failed, answering unguarded (fail-open): CheckTimeout")
    assert failed[2].endswith("(4 more since the last such line)"), failed
