"""The one data plane behind both gRPC adapters: look up the model, run the guard, record metrics.

Protocol code (OIP, guard.v1) only decodes requests into numpy and encodes Results; everything else happens here,
so both protocols answer and count identically.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np

from guard.errors import CheckFailedError, DeadlineExceededError, OverloadedError, RequestError
from guard.runtime.batching import Batcher
from guard.runtime.guard import Guard, Result
from guard.server.audit import AuditLog, Caller
from guard.server.metrics import Metrics

VERSION = "1"  # the served model's only version, as ModelMetadata lists it


class UnknownModelError(RequestError):
    """The request names a model this server does not serve."""


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
        self._running = threading.BoundedSemaphore(workers)  # held while the engine works for the request
        self.batcher = None
        if batch_size:
            self.batcher = Batcher(guard.predict, batch_size, batch_delay,
                                   on_batch=metrics.batch.labels(model=name).observe)

    def close(self) -> None:
        """Stop the batcher once the requests it holds have been answered; then close the audit log."""
        if self.batcher is not None:
            self.batcher.close()
        if self.audit is not None:
            self.audit.close()

    def resolve(self, name: str, version: str = "") -> str:
        """The served model's name; an empty name means the only model served, an empty version its only version."""
        if name not in ("", self.name):
            raise UnknownModelError(f"unknown model {name!r}; this server serves {self.name!r}")
        if version not in ("", VERSION):
            raise UnknownModelError(f"unknown version {version!r} of model {self.name!r}; it has version {VERSION!r}")
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
              caller: Caller | None = None) -> Result:
        """Guarded answers for a decoded batch; counts samples, verdicts, scores, stage times and failed checks, and
        writes the audit log's line for `caller` where the request holds a flagged sample.

        `time_left`: seconds until the caller's deadline (gRPC gives a huge number when there is none). A request
        out of time is dropped before the engine runs it.
        """
        if x.shape[0] > self.max_batch:
            raise RequestError(f"batch of {x.shape[0]} samples exceeds the server's limit of {self.max_batch}")
        started = time.perf_counter()
        try:
            result = self._predict(x, time_left, started)
        except CheckFailedError:
            self.metrics.check_failures.labels(model=self.name, outcome="refused").inc()
            raise
        broken = ~np.isfinite(result.logits).all(axis=1)
        if not result.unchecked:  # an unguarded answer has no score
            broken |= ~np.isfinite(result.score)
        if broken.any():  # finite inputs the model overflows on: no answer is better than a NaN one
            raise RequestError(f"the model's outputs are NaN or Inf for sample(s) {np.flatnonzero(broken).tolist()[:10]}"
                               ": the input is far outside what the model computes with; not answered")
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

    def _predict(self, x: np.ndarray, time_left: float | None, started: float) -> Result:
        if self.batcher is not None:  # a bad request is refused here, alone, before it could fail a shared batch
            return self.batcher.submit(self.guard.validate(x), time_left)
        # at most `workers` engine runs at once; the other admitted requests wait here, until their deadline at most
        wait = None if time_left is None else min(time_left - (time.perf_counter() - started), threading.TIMEOUT_MAX)
        if (wait is not None and wait <= 0) or not self._running.acquire(timeout=wait):
            raise DeadlineExceededError("the deadline passed while the request waited for the engine; not computed")
        try:
            result = self.guard.predict(x)
        finally:
            self._running.release()
        self.metrics.batch.labels(model=self.name).observe(len(x))
        return result

    def count_error(self, code: str) -> None:
        self.metrics.errors.labels(model=self.name, code=code).inc()
