"""`guard load`: a bounded load run against `guard serve` on loopback, to show it holds up.

Concurrent tritonclient callers send for a fixed time; every call ends as answered, rejected (RESOURCE_EXHAUSTED:
more requests than `--max-inflight` allows, refused by guard, or by gRPC itself beyond the threads and slots guard
keeps) or failed (anything else). The server's resident memory is sampled every
second, so a leak shows as growth between the start and the end of the run.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from guard.bench import ServerProcess, cycled_batches, in_threads, server_limits, triton_input, warm_call
from guard.errors import GuardError
from guard.model.graph import load_model


@dataclass
class LoadSettings:
    callers: int = 64
    seconds: float = 60.0
    batch: int = 1  # samples per call
    max_inflight: int = 64  # the server's --max-inflight
    workers: int = 8  # the server's --workers
    timeout: float = 30.0  # each call's deadline


def _percentiles(seconds: list[float]) -> dict[str, float | None]:
    if not seconds:
        return {"p50_ms": None, "p99_ms": None}
    values = np.asarray(seconds) * 1e3
    return {"p50_ms": round(float(np.percentile(values, 50)), 3), "p99_ms": round(float(np.percentile(values, 99)), 3)}


def run_load(model: Path, profile: Path, x: np.ndarray, settings: LoadSettings, workdir: Path,
             on_start: Callable[[str], None] | None = None) -> dict[str, object]:
    """One run; returns counts, latencies and the server's memory as a JSON-ready dict. `on_start` is told the
    server's address once it answers and the callers start: the server's start takes seconds before the run."""
    import tritonclient.grpc as triton
    from tritonclient.utils import InferenceServerException

    input_name = load_model(model).input_name
    server = ServerProcess(Path(model), Path(profile), ["--max-inflight", str(settings.max_inflight),
                                                        "--workers", str(settings.workers),
                                                        *server_limits(settings.batch, tuple(x.shape[1:]))], workdir)
    outcomes: dict[str, list[float]] = {"answered": [], "rejected": []}
    failures: list[str] = []
    lock = threading.Lock()
    rss: list[float] = []
    # Set when the callers are done, or on any way out (so that they stop with the run, not at `stop`): it stops
    # the callers and the memory watch alike.
    halt = threading.Event()
    try:
        batches = cycled_batches(x, settings.batch)  # all of x: what a call costs depends on the samples
        with triton.InferenceServerClient(f"127.0.0.1:{server.port}") as client:  # warm: the start of the run
            for batch in batches[:16]:
                warm_call(client, input_name, batch, settings.timeout)
        rss.append(server.rss_mb())
        stop = time.perf_counter() + settings.seconds

        def watch_memory() -> None:
            while not halt.wait(1.0):
                try:
                    rss.append(server.rss_mb())
                except GuardError:  # it exited: the callers stop now, not at `stop`
                    halt.set()
                    return

        def caller(offset: int) -> None:
            with triton.InferenceServerClient(f"127.0.0.1:{server.port}") as client:
                calls = 0
                while time.perf_counter() < stop and not halt.is_set():
                    tensor = triton_input(input_name, batches[(offset + calls) % len(batches)])
                    started = time.perf_counter()
                    try:
                        client.infer("", [tensor], client_timeout=settings.timeout)
                        kind = "answered"
                    except InferenceServerException as exc:
                        refusal = ("max-inflight", "Concurrent RPC limit")  # guard's, and gRPC's own beyond it
                        if "RESOURCE_EXHAUSTED" in str(exc.status()) and any(r in str(exc.message()) for r in refusal):
                            kind = "rejected"
                        else:
                            with lock:
                                failures.append(f"{exc.status()}: {exc.message()}")
                            kind = None
                    except Exception as exc:  # noqa: BLE001 - any other failure counts as failed, the run goes on
                        with lock:
                            failures.append(f"{type(exc).__name__}: {exc}")
                        kind = None
                    elapsed = time.perf_counter() - started
                    if kind:
                        with lock:
                            outcomes[kind].append(elapsed)
                    calls += 1

        monitor = threading.Thread(target=watch_memory, daemon=True)
        monitor.start()
        if on_start:
            on_start(f"127.0.0.1:{server.port}")
        wall = in_threads(caller, settings.callers, "a load caller", halt)
        halt.set()
        monitor.join()
        server.raise_if_exited("the run")
        rss.append(server.rss_mb())
    except GuardError:  # a warm-up call's failure reads as a refusal, where the server is in fact gone
        server.raise_if_exited("the run")
        raise
    finally:
        halt.set()
        server.close()
    if not outcomes["answered"]:
        raise GuardError(f"no call was answered; the server said: {server.log.read_text()[-2000:]}")
    sent = len(outcomes["answered"]) + len(outcomes["rejected"]) + len(failures)
    return {
        "settings": asdict(settings), "sent": sent, "answered": len(outcomes["answered"]),
        "rejected": len(outcomes["rejected"]), "failed": len(failures), "failures": sorted(set(failures))[:10],
        "seconds": round(wall, 1), "answered_per_second": round(len(outcomes["answered"]) / wall, 1),
        "answered_latency": _percentiles(outcomes["answered"]), "rejected_latency": _percentiles(outcomes["rejected"]),
        # One sample a second: growth that stops after the first seconds is allocators warming up to the
        # concurrency; growth that goes on is a leak.
        "rss_mb": {"start": round(rss[0], 1), "at_10s": round(rss[10], 1) if len(rss) > 10 else None,
                   "end": round(rss[-1], 1), "max": round(max(rss), 1), "every_second": [round(v, 1) for v in rss]},
    }


def format_run(figures: dict[str, object]) -> str:
    s, a, r, m = figures["settings"], figures["answered_latency"], figures["rejected_latency"], figures["rss_mb"]
    rejected = f" (p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms)" if figures["rejected"] else ""
    at_10s = f"{m['at_10s']} after 10 s, " if m["at_10s"] is not None else ""  # a run shorter than 10 s has none
    return (f"{s['callers']} callers x {s['seconds']:g} s, batch {s['batch']}, --max-inflight {s['max_inflight']}: "
            f"sent {figures['sent']}, answered {figures['answered']} ({figures['answered_per_second']}/s, "
            f"p50 {a['p50_ms']} ms, p99 {a['p99_ms']} ms), rejected {figures['rejected']}{rejected}, "
            f"failed {figures['failed']}; server RSS {m['start']} MiB at the start, "
            f"{at_10s}{m['end']} at the end (max {m['max']})")
