"""The one data plane behind both gRPC adapters: look up the model, run the guard, record metrics.

Protocol code (OIP, guard.v1) only decodes requests into numpy and encodes Results; everything else happens here,
so both protocols answer and count identically.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np

from guard.errors import (
    CallerGoneError,
    CheckFailedError,
    DeadlineExceededError,
    OverloadedError,
    RequestError,
    shown,
)
from guard.runtime.batching import Batcher, OnEnd
from guard.runtime.guard import Guard, Result
from guard.server.audit import AuditLog, Caller
from guard.server.metrics import Metrics

VERSION = "1"  # the served model's only version, as ModelMetadata lists it
GONE_POLL = 0.05  # seconds between looks at whether a call waiting for the engine has ended
CLOSE_WAIT = 2.0  # seconds a stopping server waits, after its grace, for a batch run whose callers were cut off


class UnknownModelError(RequestError):
    """The request names a model this server does not serve."""


class EngineTurns:
    """At most `workers` engine runs at once, handed to the waiting requests first come, first served.

    A semaphore polled with a timeout would do the limiting, but each timed-out wait rejoins its waiters at the back:
    under load the oldest requests were overtaken by newer ones and ran out of time first. Here each waiter holds
    its place in one line while it looks, every GONE_POLL seconds, at its deadline and whether its call ended.
    """

    def __init__(self, workers: int) -> None:
        self._free = workers
        self._line: deque[threading.Event] = deque()  # the waiters' turns, oldest first
        self._lock = threading.Lock()

    def acquire(self, end: float | None, gone: threading.Event) -> None:
        """Wait for a turn, until `end` (a time.perf_counter() value; None: no deadline) or until `gone` is set."""
        with self._lock:
            if self._free and not self._line:
                self._free -= 1
                return
            turn = threading.Event()
            self._line.append(turn)
        try:
            while True:
                left = None if end is None else end - time.perf_counter()
                if left is not None and left <= 0:
                    raise DeadlineExceededError("the deadline passed while the request waited for the engine; "
                                                "not computed")
                if gone.is_set():
                    raise CallerGoneError("the call ended while the request waited for the engine; not computed")
                if turn.wait(GONE_POLL if left is None else min(left, GONE_POLL)):
                    return
        except BaseException:
            with self._lock:
                if turn.is_set():  # handed the turn as it gave up: it goes to the next in line
                    self._pass_on()
                else:
                    self._line.remove(turn)
            raise

    def release(self) -> None:
        """The engine run is over: the oldest waiter goes next."""
        with self._lock:
            self._pass_on()

    def _pass_on(self) -> None:
        if self._line:
            self._line.popleft().set()
        else:
            self._free += 1


class DataPlane:
    """Serves one guarded model under one name."""

    def __init__(self, guard: Guard, name: str, metrics: Metrics, max_batch: int, batch_size: int = 0,
                 batch_delay: float = 0.0, max_inflight: int = 64, workers: int = 8) -> None:
        self.guard = guard
        self.audit: AuditLog | None = None  # the server opens it as it starts
        self.name = name
        self.metrics = metrics
        self.max_batch = max_batch
        self.ready = False
        self.max_inflight = max_inflight
        self._admitted = threading.BoundedSemaphore(max_inflight)  # held from arrival to answer
        self._running = EngineTurns(workers)  # held while the engine works for the request
        self.batcher = None
        if batch_size:
            self.batcher = Batcher(guard.predict, batch_size, batch_delay,
                                   on_batch=metrics.batch.labels(model=name).observe)

    def drain(self) -> None:
        """The server stops taking calls: batches close at once rather than wait out their delay."""
        if self.batcher is not None:
            self.batcher.flush()

    def close(self) -> None:
        """Stop the batcher once the requests it holds have been answered, or after CLOSE_WAIT seconds; then close the
        audit log. It runs once gRPC's grace is over: a request still running then has had its call cancelled, is
        neither answered nor logged, and the stop does not wait out its batch for nobody (a pod's termination grace is
        counted)."""
        if self.batcher is not None:
            self.batcher.close(CLOSE_WAIT)
        if self.audit is not None:
            self.audit.close()

    def resolve(self, name: str, version: str = "") -> str:
        """The served model's name; an empty name means the only model served, an empty version its only version."""
        if name not in ("", self.name):
            raise UnknownModelError(f"unknown model {shown(name)}; this server serves {self.name!r}")
        if version not in ("", VERSION):
            raise UnknownModelError(f"unknown version {shown(version)} of model {self.name!r}; it has version {VERSION!r}")
        return self.name

    def serves(self, name: str, version: str = "") -> bool:
        """Whether `resolve` knows this name and version: ModelReady answers `ready=false` for one it does not, as
        Triton does, so that a client polling readiness of the wrong model reads "not ready" rather than an error."""
        try:
            self.resolve(name, version)
        except UnknownModelError:
            return False
        return True

    @contextmanager
    def request(self) -> Iterator[None]:
        """Wraps one inference request: admits it if fewer than `max_inflight` are held, else refuses it at once
        (RESOURCE_EXHAUSTED), and counts it in flight while it is held."""
        if not self._admitted.acquire(blocking=False):
            raise OverloadedError(f"the server holds its limit of {self.max_inflight} requests (--max-inflight); "
                                  "retry later or elsewhere")
        self.metrics.inflight.inc()
        try:
            yield
        finally:
            self.metrics.inflight.dec()
            self._admitted.release()

    def infer(self, x: np.ndarray, decode_seconds: float, time_left: float | None = None,
              caller: Caller | None = None, on_end: OnEnd | None = None) -> Result:
        """Guarded answers for a decoded batch; counts samples, verdicts, scores, stage times and failed checks, and
        writes the audit log's line for `caller` where the request holds a flagged sample.

        `time_left`: seconds until the caller's deadline (gRPC gives a huge number when there is none). A request
        out of time is dropped before the engine runs it. `on_end` (the gRPC context's `add_callback`) tells when
        the call ends: one cancelled while it waits is dropped, and an answer computed for a call that has ended
        (cancelled, past its deadline, or cut off by the server's shutdown) is neither counted as answered nor
        logged, as nobody receives it.
        """
        if x.shape[0] > self.max_batch:
            raise RequestError(f"batch of {x.shape[0]} samples exceeds the server's limit of {self.max_batch}")
        started = time.perf_counter()
        gone = threading.Event()
        if on_end is not None and not on_end(gone.set):
            gone.set()
        try:
            result = self._predict(x, time_left, started, gone, on_end)
        except CheckFailedError:
            self.metrics.check_failures.labels(model=self.name, outcome="refused").inc()
            raise
        if gone.is_set():
            raise CallerGoneError("the call ended (cancelled, past its deadline, or cut off by the server's shutdown) "
                                  "while the request was computed; its answer is dropped")
        # Finite inputs the model overflows on: no answer is better than a NaN one. A score that overflows where the
        # logits do not is refused too, under either policy: one Inf would stay in the score histogram's sum for good.
        broken = ~np.isfinite(result.logits).all(axis=1)
        if broken.any():
            raise RequestError(f"the model's outputs are NaN or Inf for sample(s) {np.flatnonzero(broken).tolist()[:10]}"
                               ": the input is far outside what the model computes with; not answered")
        if not result.unchecked and not np.isfinite(result.score).all():  # an unguarded answer has no score
            overflowed = np.flatnonzero(~np.isfinite(result.score)).tolist()[:10]
            raise RequestError(f"the guard's score is NaN or Inf for sample(s) {overflowed} (the model's outputs are "
                               "finite): the input is far outside the calibration data; not answered")
        if result.unchecked:  # counted once answered: a refusal above is no unguarded answer
            self.metrics.check_failures.labels(model=self.name, outcome="answered_unguarded").inc()
        total = decode_seconds + time.perf_counter() - started
        m, name = self.metrics, self.name
        flagged = int(result.flagged.sum())
        m.samples.labels(model=name, verdict="flagged").inc(flagged)
        m.samples.labels(model=name, verdict="clean").inc(len(result.flagged) - flagged)
        m.requests.labels(model=name, verdict="flagged" if flagged else "clean").inc()
        m.demoted.labels(model=name).inc(int(result.demoted.sum()))
        m.overruled.labels(model=name).inc(int(result.overruled.sum()))
        m.spared.labels(model=name).inc(int(result.spared.sum()))
        for stage, seconds in {"decode": decode_seconds, **result.stage_seconds, "total": total}.items():
            m.duration.labels(model=name, stage=stage).observe(seconds)
        if not result.unchecked:  # an unguarded answer has no score
            score = m.score.labels(model=name)
            for value in result.score.tolist():
                score.observe(value)
        if self.audit is not None and caller is not None:
            self.audit.record(name, self.guard.policy.value, caller, result)
        return result

    def _predict(self, x: np.ndarray, time_left: float | None, started: float, gone: threading.Event,
                 on_end: OnEnd | None) -> Result:
        if self.batcher is not None:  # a bad request is refused here, alone, before it could fail a shared batch
            return self.batcher.submit(self.guard.validate(x), time_left, on_end)
        self._wait_for_engine(time_left, started, gone)
        try:
            result = self.guard.predict(x)
        finally:
            self._running.release()
        self.metrics.batch.labels(model=self.name).observe(len(x))
        return result

    def _wait_for_engine(self, time_left: float | None, started: float, gone: threading.Event) -> None:
        """At most `workers` engine runs at once; the other admitted requests wait here, in arrival order, until their
        deadline at most, or until their call ends."""
        end = None if time_left is None else started + min(time_left, threading.TIMEOUT_MAX)
        self._running.acquire(end, gone)

    def count_error(self, code: str) -> None:
        self.metrics.errors.labels(model=self.name, code=code).inc()
