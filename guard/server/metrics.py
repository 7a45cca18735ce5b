"""Prometheus metrics of one server, in a registry of its own (no import-time globals), on a separate HTTP port.

The names here are the ones dashboards and alert rules use; change them here or nowhere.
"""

from __future__ import annotations

import contextlib
import socket
import socketserver
import threading
import time
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app

from guard._version import __version__

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# The gRPC codes guard's handlers answer errors with (guard/server/status.py).
ERROR_CODES = ("INVALID_ARGUMENT", "NOT_FOUND", "UNAUTHENTICATED", "RESOURCE_EXHAUSTED", "UNAVAILABLE",
               "DEADLINE_EXCEEDED", "CANCELLED", "INTERNAL")
# The stages a request's time is split into (guard/server/dataplane.py, Result.stage_seconds, the batcher).
STAGES = ("decode", "queue", "engine", "repredict", "reference", "unguarded", "total")
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
# The score is in units of its clean spread (a part's 95th percentile sits at 1): on the eval's models tau is about
# 1.2 and the demote threshold about 2.
_SCORE_BUCKETS = (-2.0, -1.0, 0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 15.0, 20.0, 50.0)


# prometheus_client's own server gave every connection a thread for as long as it stayed open: a thousand idle ones
# held a thousand threads in guard's process. Here a connection is closed this long after it was accepted, whatever
# it sends meanwhile (a byte every few seconds kept a per-read timeout waiting for good), and at most this many are
# served at once; one past them waits a moment for a place, then is closed. Scrapes take milliseconds.
METRICS_TIMEOUT_SECONDS = 10.0
METRICS_CONNECTIONS = 64
_PLACE_WAIT_SECONDS = 1.0


class _ScrapeHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        """Scrapes are not logged."""


class _ScrapeServer(socketserver.ThreadingMixIn, WSGIServer):
    """At most METRICS_CONNECTIONS connections, each closed by a watchdog thread once past its time."""

    daemon_threads = True

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        self._places = threading.BoundedSemaphore(METRICS_CONNECTIONS)
        self._deadlines: dict[socket.socket, float] = {}
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._watcher = threading.Thread(target=self._watch, name="guard-metrics-watch", daemon=True)
        super().__init__(*args, **kwargs)  # binds; a refused bind calls server_close before the watcher runs
        self._watcher.start()

    def server_close(self) -> None:
        self._closed.set()
        super().server_close()
        if self._watcher.is_alive():
            self._watcher.join()

    def process_request(self, request, client_address) -> None:  # type: ignore[no-untyped-def]
        if not self._places.acquire(timeout=_PLACE_WAIT_SECONDS):
            self.shutdown_request(request)
            return
        with self._lock:
            self._deadlines[request] = time.monotonic() + METRICS_TIMEOUT_SECONDS
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address) -> None:  # type: ignore[no-untyped-def]
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._lock:
                self._deadlines.pop(request, None)
            self._places.release()

    def handle_error(self, request, client_address) -> None:  # type: ignore[no-untyped-def]
        """A connection cut off, or closed past its time: nothing to print (the default printed a traceback each,
        which anyone who can connect could repeat)."""

    def _watch(self) -> None:
        while not self._closed.wait(0.5):
            now = time.monotonic()
            with self._lock:
                late = [request for request, deadline in self._deadlines.items() if deadline < now]
            for request in late:
                with contextlib.suppress(OSError):  # its reader's recv returns, and its thread ends
                    request.shutdown(socket.SHUT_RDWR)


class Metrics:
    """The guard's counters, histograms and gauges."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("guard_requests_total", "Requests answered, by verdict (flagged if any sample was)",
                                ["model", "verdict"], registry=r)
        self.samples = Counter("guard_samples_total", "Samples answered, by verdict", ["model", "verdict"],
                               registry=r)
        self.errors = Counter("guard_request_errors_total",
                              "Inference requests guard refused or failed, by gRPC status code (not those gRPC refuses "
                              "itself, such as an oversized message)", ["model", "code"], registry=r)
        self.duration = Histogram("guard_request_duration_seconds", "Time spent per request, by stage",
                                  ["model", "stage"], buckets=_LATENCY_BUCKETS, registry=r)
        self.score = Histogram("guard_check_score", "Consistency score per sample", ["model"],
                               buckets=_SCORE_BUCKETS, registry=r)
        self.batch = Histogram("guard_engine_batch_samples", "Samples per engine run (dynamic batching joins requests)",
                               ["model"], buckets=_BATCH_BUCKETS, registry=r)
        self.demoted = Counter("guard_demoted_samples_total",
                               "Flagged samples so far outside their class's profile that the model's own class was "
                               "refused (under the monitor policy: would have been)", ["model"], registry=r)
        self.overruled = Counter("guard_overruled_samples_total",
                                 "Samples the profile's reference (a fine-tuned copy) firmly disagreed with, and "
                                 "answered (under the monitor policy: would have)", ["model"], registry=r)
        self.spared = Counter("guard_spared_samples_total",
                              "Samples past a demote threshold whose answer the profile's reference firmly confirmed, "
                              "so the model's own class was kept", ["model"], registry=r)
        self.check_failures = Counter("guard_check_failures_total",
                                      "Requests the guard could not check, by what the failure policy did",
                                      ["model", "outcome"], registry=r)
        self.audit_dropped = Counter("guard_audit_lines_dropped_total",
                                     "Audit log lines lost: the disk refused them, or the writer was too far behind",
                                     ["model"], registry=r)
        self.audit_enabled = Gauge("guard_audit_log_enabled", "1 when flagged requests are written to an audit log",
                                   ["model"], registry=r)
        self.inflight = Gauge("guard_inflight_requests", "Requests being answered now", registry=r)
        self.ready = Gauge("guard_model_ready", "1 when the model is loaded and serving", ["model"], registry=r)
        self.build = Gauge("guard_build_info", "Build information", ["version"], registry=r)
        self.build.labels(version=__version__).set(1)
        # Every series exists from the first scrape at 0, so that rate() sees the first request or error too.
        for verdict in ("clean", "flagged"):
            self.requests.labels(model=model, verdict=verdict)
            self.samples.labels(model=model, verdict=verdict)
        for code in ERROR_CODES:
            self.errors.labels(model=model, code=code)
        for stage in STAGES:
            self.duration.labels(model=model, stage=stage)
        self.score.labels(model=model)
        self.demoted.labels(model=model)
        self.overruled.labels(model=model)
        self.spared.labels(model=model)
        for outcome in ("refused", "answered_unguarded"):
            self.check_failures.labels(model=model, outcome=outcome)
        self.batch.labels(model=model)
        self.audit_dropped.labels(model=model)
        self.audit_enabled.labels(model=model).set(0)
        self.ready.labels(model=model).set(0)
        self._http: _ScrapeServer | None = None
        self._thread: threading.Thread | None = None

    def serve(self, host: str, port: int) -> int:
        """Start the HTTP endpoint; returns the bound port."""
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]  # an IPv6 host needs AF_INET6
        server = type("_ScrapeServerOfFamily", (_ScrapeServer,), {"address_family": family})
        self._http = make_server(host, port, make_wsgi_app(self.registry), server, handler_class=_ScrapeHandler)
        self._thread = threading.Thread(target=self._http.serve_forever, name="guard-metrics", daemon=True)
        self._thread.start()
        return int(self._http.server_port)

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
