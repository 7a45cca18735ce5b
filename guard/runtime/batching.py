"""Dynamic batching: concurrent requests that arrive within a short delay of each other share one engine run.

A batch closes when it holds `max_size` samples or `max_delay` seconds after its first request arrived, whichever
comes first (at once, once `flush` is called: the server is draining); each caller then gets exactly its own rows
back. Requests run in arrival order; one bigger than `max_size` runs alone. A request whose call has ended is
dropped before its batch runs.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import CancelledError, Future, InvalidStateError
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field

import numpy as np

from guard.errors import CallerGoneError, DeadlineExceededError, UnavailableError
from guard.runtime.guard import Result

log = logging.getLogger(__name__)
OnEnd = Callable[[Callable[[], object]], bool]  # registers a callback for when the call ends; False: it has ended
_FLUSH = object()  # put on the queue by `flush`: the batch being collected closes now


@dataclass(eq=False)  # compared by identity: the default __eq__ would compare the arrays
class _Pending:
    x: np.ndarray
    deadline: float | None = None  # time.perf_counter() after which the caller no longer waits
    arrived: float = field(default_factory=time.perf_counter)
    future: Future[Result] = field(default_factory=Future)


class Batcher:
    """Joins requests into batches for `predict`, on one thread of its own."""

    def __init__(self, predict: Callable[[np.ndarray], Result], max_size: int, max_delay: float,
                 on_batch: Callable[[int], None] | None = None) -> None:
        self._predict = predict
        self.max_size = max_size
        self.max_delay = max_delay
        self._on_batch = on_batch
        self._queue: queue.SimpleQueue[_Pending | object | None] = queue.SimpleQueue()
        self._held: _Pending | None = None  # a request that did not fit the last batch; it opens the next one
        self._batch: list[_Pending] = []  # the batch being collected or run
        self._lock = threading.Lock()
        self._closed = False
        self._flushing = False
        self._thread = threading.Thread(target=self._loop, name="guard-batcher", daemon=True)
        self._thread.start()

    def submit(self, x: np.ndarray, timeout: float | None = None, on_end: OnEnd | None = None) -> Result:
        """Blocks until the batch holding `x` has run; returns the rows of `x` (with a `queue` stage time).

        `timeout`: seconds the caller still waits. A request whose time has run out when its batch starts is
        dropped from the batch, not computed, and gets a DeadlineExceededError; one whose batch is still running
        then stops waiting for it. `on_end` (a gRPC context's `add_callback`) tells when the call ends: one that
        ends (cancelled) before its batch starts is dropped too, and its caller's thread stops waiting at once.
        """
        pending = _Pending(x, None if timeout is None else time.perf_counter() + timeout)
        if on_end is not None and not on_end(pending.future.cancel):  # cancels only an answer not yet given
            raise CallerGoneError("the call ended before its request was queued; not computed")
        with self._lock:
            if self._closed:
                raise UnavailableError("the server is shutting down")
            self._queue.put(pending)
        try:  # a call without a deadline has a practically endless one, past what a thread wait takes
            return pending.future.result(None if timeout is None or timeout >= threading.TIMEOUT_MAX else timeout)
        except FutureTimeout:
            raise DeadlineExceededError(f"the deadline passed after {timeout:.3f} s waiting for a batch") from None
        except CancelledError:
            raise CallerGoneError("the call ended while its request waited for a batch; its answer is dropped") from None

    def flush(self) -> None:
        """Close the batch being collected now, and each later one as soon as its requests are in the queue: the
        server is draining, and a batch delay would spend its grace period waiting for callers that will not come."""
        self._flushing = True
        self._queue.put(_FLUSH)

    def close(self, timeout: float | None = None) -> None:
        """Finish what is queued, then stop the thread; later submits are refused. Waits `timeout` seconds at most
        (None: until it is done); a batch still running then is left to finish on its own (daemon) thread."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(None)
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("a batch was still running %.1f s after the batcher closed; not waiting for it", timeout)

    def _collect(self, first: _Pending) -> tuple[list[_Pending], bool]:
        """The batch opened by `first`; True if the queue has been closed."""
        batch, size = self._batch, len(first.x)
        deadline = first.arrived + self.max_delay
        while size < self.max_size:
            wait = 0.0 if self._flushing else min(max(0.0, deadline - time.perf_counter()), threading.TIMEOUT_MAX)
            try:
                item = self._queue.get(timeout=wait) if wait else self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                return batch, True
            if item is _FLUSH:
                break
            if size + len(item.x) > self.max_size:
                self._held = item
                break
            batch.append(item)
            size += len(item.x)
        return batch, False

    def _loop(self) -> None:
        try:
            self._serve()
        except BaseException as exc:  # its callers wait on this thread alone: none may be left waiting
            log.exception("the batcher stopped")
            self._refuse_all(UnavailableError(f"the batcher stopped ({type(exc).__name__}: {exc})"))

    def _serve(self) -> None:
        closed = False
        while not closed or self._held is not None:
            first, self._held = self._held, None
            while first is None or first is _FLUSH:
                first = self._queue.get()
                if first is None:
                    return
            self._batch = [first]
            batch, closed = self._collect(first)
            self._run(batch)
            self._batch = []

    def _refuse_all(self, error: Exception) -> None:
        """Close, and fail every request not yet answered: the batch in hand, the one held over and the queue."""
        with self._lock:
            self._closed = True
        waiting = [*self._batch, *([self._held] if self._held is not None else [])]
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, _Pending):
                waiting.append(item)
        for pending in waiting:
            _settle(pending.future, error=error)

    def _run(self, batch: list[_Pending]) -> None:
        """Predict the batch and answer each caller; whatever fails, every caller gets an answer or the error."""
        started = time.perf_counter()
        expired = [p for p in batch if p.deadline is not None and p.deadline <= started]
        for pending in expired:
            _settle(pending.future, error=DeadlineExceededError(
                f"the deadline passed after {started - pending.arrived:.3f} s waiting for a batch; not computed"))
        batch = [p for p in batch if (p.deadline is None or p.deadline > started) and not p.future.cancelled()]
        if not batch:
            return
        try:
            result = self._predict(batch[0].x if len(batch) == 1 else np.concatenate([p.x for p in batch]))
            if self._on_batch is not None:
                self._on_batch(len(result.labels))
            answers, start = [], 0
            for pending in batch:
                stop = start + len(pending.x)
                rows = result.rows(start, stop)
                rows.stage_seconds["queue"] = started - pending.arrived
                answers.append(rows)
                start = stop
        except Exception as exc:  # noqa: BLE001 - every caller of the batch gets the failure as its own
            for pending in batch:
                _settle(pending.future, error=exc)
            return
        for pending, rows in zip(batch, answers, strict=True):
            _settle(pending.future, rows)


def _settle(future: Future[Result], result: Result | None = None, error: BaseException | None = None) -> None:
    """Answer a caller, unless its call ended meanwhile (its future cancelled, from the call's own thread)."""
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except InvalidStateError:
        pass
