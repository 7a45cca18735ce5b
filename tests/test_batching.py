"""The dynamic batcher's contract, with a row-wise predict function standing in for the engine: every caller gets
exactly its rows, batches never exceed their size, a failure reaches only the callers of its batch."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from guard.errors import UnavailableError
from guard.runtime.batching import Batcher
from guard.runtime.guard import Result


def rowwise(x: np.ndarray) -> Result:
    """A deterministic per-sample answer that names the sample: label = its first pixel."""
    if np.any(x < 0):
        raise ValueError("negative input")
    labels = x[:, 0, 0, 0].astype(np.int64)
    return Result(labels=labels, logits=np.repeat(x[:, :, 0, 0], 3, axis=1), flagged=labels % 2 == 1,
                  score=x[:, 0, 0, 0].copy(), model_labels=labels, demoted=labels % 3 == 0,
                  overruled=labels % 5 == 0, spared=labels % 7 == 0,
                  stage_seconds={"engine": 0.0})


def request(first: int, size: int) -> np.ndarray:
    return np.arange(first, first + size, dtype=np.float32).reshape(size, 1, 1, 1) * np.ones((1, 1, 2, 2), np.float32)


def test_concurrent_requests_share_batches_and_get_their_own_rows() -> None:
    sizes: list[int] = []
    batcher = Batcher(rowwise, max_size=16, max_delay=0.05, on_batch=sizes.append)
    requests = [request(100 * i, 1 + i % 5) for i in range(40)]
    try:
        with ThreadPoolExecutor(20) as pool:
            results = list(pool.map(batcher.submit, requests))
    finally:
        batcher.close()
    for x, result in zip(requests, results, strict=True):
        np.testing.assert_array_equal(result.labels, x[:, 0, 0, 0].astype(np.int64))
        np.testing.assert_array_equal(result.flagged, result.labels % 2 == 1)
        np.testing.assert_array_equal(result.demoted, result.labels % 3 == 0)
        np.testing.assert_array_equal(result.overruled, result.labels % 5 == 0)
        np.testing.assert_array_equal(result.spared, result.labels % 7 == 0)
        assert result.logits.shape == (len(x), 3) and result.stage_seconds["queue"] >= 0
    assert sum(sizes) == sum(len(x) for x in requests)
    assert max(sizes) <= 16 and len(sizes) < len(requests) / 2


def test_a_request_larger_than_the_batch_runs_alone() -> None:
    sizes: list[int] = []
    batcher = Batcher(rowwise, max_size=4, max_delay=0.01, on_batch=sizes.append)
    try:
        result = batcher.submit(request(0, 10))
    finally:
        batcher.close()
    assert sizes == [10] and len(result.labels) == 10


def test_a_failure_reaches_the_callers_of_its_batch_only() -> None:
    batcher = Batcher(rowwise, max_size=64, max_delay=0.2)
    go = threading.Barrier(3)

    def submit(x: np.ndarray) -> Result:
        go.wait()
        return batcher.submit(x)

    try:
        with ThreadPoolExecutor(3) as pool:
            futures = [pool.submit(submit, x) for x in (request(0, 2), -request(1, 1), request(5, 1))]
        for future in futures:  # all three were joined into one batch, so all three see its failure
            with pytest.raises(ValueError, match="negative"):
                future.result()
        after = batcher.submit(request(7, 2))
    finally:
        batcher.close()
    np.testing.assert_array_equal(after.labels, [7, 8])


def test_close_answers_what_is_queued_then_refuses() -> None:
    release = threading.Event()

    def slow(x: np.ndarray) -> Result:
        release.wait(5)
        return rowwise(x)

    batcher = Batcher(slow, max_size=3, max_delay=0.01)
    with ThreadPoolExecutor(5) as pool:
        futures = [pool.submit(batcher.submit, request(10 * i, 3)) for i in range(4)]
        while batcher._queue.qsize() < 3:  # the first request is running (held by `slow`), three wait behind it
            threading.Event().wait(0.01)
        closing = pool.submit(batcher.close)
        release.set()
        closing.result(timeout=10)
        answers = [f.result(timeout=10) for f in futures]
    assert sorted(a.labels[0] for a in answers) == [0, 10, 20, 30]
    with pytest.raises(UnavailableError, match="shutting down"):
        batcher.submit(request(0, 1))


def test_an_expired_request_leaves_its_batch_and_the_rest_is_answered() -> None:
    from guard.errors import DeadlineExceededError

    batcher = Batcher(rowwise, max_size=64, max_delay=0.3)
    go = threading.Barrier(3)

    def submit(x: np.ndarray, timeout: float) -> Result:
        go.wait()
        return batcher.submit(x, timeout)

    try:
        with ThreadPoolExecutor(3) as pool:
            futures = [pool.submit(submit, request(0, 2), 10.0), pool.submit(submit, request(5, 1), 0.05),
                       pool.submit(submit, request(9, 3), 0.05)]
        np.testing.assert_array_equal(futures[0].result().labels, [0, 1])
        for future in futures[1:]:
            with pytest.raises(DeadlineExceededError):
                future.result()
        np.testing.assert_array_equal(batcher.submit(request(7, 1)).labels, [7])  # the batcher is alive
    finally:
        batcher.close()


def test_a_caller_stops_waiting_at_its_deadline_even_while_its_batch_waits() -> None:
    from guard.errors import DeadlineExceededError

    batcher = Batcher(rowwise, max_size=64, max_delay=1e13)  # past threading.TIMEOUT_MAX: capped, not an overflow
    try:
        with pytest.raises(DeadlineExceededError, match="waiting for a batch"):
            batcher.submit(request(0, 1), timeout=0.2)
        # a full batch runs; a caller without a deadline has a practically endless one (gRPC's time_remaining)
        np.testing.assert_array_equal(batcher.submit(request(3, 64), timeout=1e300).labels, np.arange(3, 67))
    finally:
        batcher.close()


def test_a_request_whose_call_ends_leaves_at_once_and_is_not_computed() -> None:
    """A cancelled call (gRPC runs the callbacks given to `add_callback`) stops its caller's wait then, not when its
    batch runs, and its rows are left out of the batch; a call already ended is not queued at all."""
    from guard.errors import CallerGoneError

    ends: list[Callable[[], object]] = []

    def on_end(callback: Callable[[], object]) -> bool:
        ends.append(callback)
        return True

    sizes: list[int] = []
    batcher = Batcher(rowwise, max_size=64, max_delay=1.0, on_batch=sizes.append)
    try:
        with ThreadPoolExecutor(2) as pool:
            cancelled = pool.submit(batcher.submit, request(0, 2), None, on_end)
            kept = pool.submit(batcher.submit, request(5, 1))
            while not ends or batcher._queue.qsize() + len(batcher._batch) < 2:
                threading.Event().wait(0.01)
            ends[0]()  # the caller cancels, well inside the 1 s batch delay
            with pytest.raises(CallerGoneError, match="waited for a batch"):
                cancelled.result(timeout=0.5)
            assert sizes == []  # its batch has not run yet
            np.testing.assert_array_equal(kept.result(timeout=5).labels, [5])
        assert sizes == [1]  # the cancelled request's two rows were never computed
        with pytest.raises(CallerGoneError, match="before its request was queued"):
            batcher.submit(request(0, 1), None, lambda callback: False)
        assert sizes == [1]
    finally:
        batcher.close()


def test_flush_closes_the_open_batch_at_once_and_every_later_one() -> None:
    """The server drains: a batch delay would spend its grace period waiting for callers that will not come."""
    batcher = Batcher(rowwise, max_size=64, max_delay=1e13)
    pool = ThreadPoolExecutor(1)
    try:
        waiting = pool.submit(batcher.submit, request(3, 2))
        while not batcher._batch:
            threading.Event().wait(0.01)
        assert not waiting.done()
        batcher.flush()
        np.testing.assert_array_equal(waiting.result(timeout=5).labels, [3, 4])
        np.testing.assert_array_equal(pool.submit(batcher.submit, request(8, 1)).result(timeout=5).labels, [8])
    finally:
        batcher.close()  # answers what waits, so the pool's thread ends whatever failed
        pool.shutdown()


class _Crash(BaseException):
    """Something `_run`'s `except Exception` does not catch, so the batcher's thread itself fails."""


def test_a_batcher_whose_thread_dies_fails_its_callers_and_refuses_the_rest() -> None:
    entered, release = threading.Event(), threading.Event()

    def crash(x: np.ndarray) -> Result:
        entered.set()
        release.wait(10)
        raise _Crash("the engine's thread was torn down")

    batcher = Batcher(crash, max_size=1, max_delay=0.0)
    with ThreadPoolExecutor(3) as pool:
        running = pool.submit(batcher.submit, request(0, 1))
        assert entered.wait(10)
        queued = [pool.submit(batcher.submit, request(i, 1)) for i in (1, 2)]
        while batcher._queue.qsize() < 2:  # both wait behind the crashing batch
            threading.Event().wait(0.01)
        release.set()
        for future in (running, *queued):
            with pytest.raises(UnavailableError, match="batcher stopped"):
                future.result(10)
    with pytest.raises(UnavailableError):
        batcher.submit(request(3, 1))
    batcher.close()  # returns: the thread is gone
