"""`guard bench`: what guarding costs, measured side by side in one run on this machine.

At each batch size it times the bare ONNX Runtime session, the guarded engine in-process (interleaved with the bare
session in short blocks, so both see the same machine state) and the guarded server over gRPC with concurrent
tritonclient callers (`guard serve` in a process of its own). It also records the peak memory of the server
process against a process that only runs the bare session, STRIP's cost per request, how the guarded cost grows
with the number of taps, and the time to calibrate. Output: a Markdown table, JSON and a PNG plot.
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from guard.errors import GuardError, ModelError
from guard.model.graph import LoadedModel, default_taps, load_model, tensor_ranks
from guard.runtime.engine import ort_providers
from guard.runtime.guard import Guard
from guard.samples import write_atomic, write_json

if TYPE_CHECKING:
    from tritonclient.grpc import InferInput


@dataclass
class BenchSettings:
    batches: list[int] = field(default_factory=lambda: [1, 8, 64])
    seconds: float = 3.0  # per measurement
    callers: int = 8  # concurrent gRPC callers against the server
    threads: int = 0  # ONNX Runtime intra-op threads for both sessions (0: one per core)
    device: str = "cpu"
    strip_overlays: int = 64  # STRIP's blends per request, as in guard eval
    server_batch_size: int = 0  # the server's dynamic batching (0: off)
    tap_growth: bool = True  # also time guards calibrated with 1, 2, ... taps (needs labelled data)
    calibration_samples: int = 1000


def _percentiles(latencies: list[float], batch: int) -> dict[str, float]:
    seconds = np.asarray(latencies)
    return {"p50_ms": round(1e3 * float(np.percentile(seconds, 50)), 4),
            "p99_ms": round(1e3 * float(np.percentile(seconds, 99)), 4),
            "throughput": round(batch / float(seconds.mean()), 1), "calls": len(latencies)}


def triton_input(name: str, x: np.ndarray) -> InferInput:
    """A tritonclient FP32 input tensor holding `x`."""
    import tritonclient.grpc as triton

    tensor = triton.InferInput(name, list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    return tensor


def cycled_batches(x: np.ndarray, batch: int, count: int | None = None) -> list[np.ndarray]:
    """`count` batches of `batch` samples, cycling through x; by default enough to cover all of x (at least 8), so
    that what a guarded call costs, which depends on the samples (how many are re-predicted), is that of the whole
    data and not of its first few samples."""
    count = count or max(8, -(-len(x) // batch))
    index = (np.arange(batch * count) % len(x)).reshape(count, batch)
    return [np.ascontiguousarray(x[i]) for i in index]


def _side_by_side(bare, guarded, batches: list[np.ndarray], seconds: float) -> tuple[list[float], list[float]]:
    """Alternate blocks of bare and guarded calls until `seconds` pass; latencies of each."""
    times: tuple[list[float], list[float]] = ([], [])
    for fn in (bare, guarded):  # warm both
        fn(batches[0])
    stop = time.perf_counter() + seconds
    calls = 0
    while time.perf_counter() < stop or calls < 10:
        for fn, out in ((bare, times[0]), (guarded, times[1])):
            for x in batches[:4]:
                started = time.perf_counter()
                fn(x)
                out.append(time.perf_counter() - started)
        calls += 4
        batches = batches[4:] + batches[:4]
    return times


_BARE_PROCESS = textwrap.dedent("""
    import json, re, sys, time
    import numpy as np, onnxruntime as ort
    options = ort.SessionOptions()
    options.intra_op_num_threads = int(sys.argv[3])
    providers = [p if isinstance(p, str) else tuple(p) for p in json.loads(sys.argv[4])]
    session = ort.InferenceSession(sys.argv[1], options, providers=providers)
    name = session.get_inputs()[0].name
    x = np.load(sys.argv[2])
    stop = time.perf_counter() + 1.0
    while time.perf_counter() < stop:
        session.run(None, {name: x})
    status = open("/proc/self/status").read()
    print(int(re.search(r"VmHWM:\\s+(\\d+) kB", status).group(1)) / 1024)
""")


def bare_process_rss(model_path: Path, x: np.ndarray, threads: int, device: str, workdir: Path) -> float:
    """Peak memory of a Python process that only loads the bare model into ONNX Runtime and runs `x`."""
    batch = workdir / "bench_batch.npy"
    np.save(batch, x)
    providers = json.dumps(ort_providers(device))
    out = subprocess.run([sys.executable, "-c", _BARE_PROCESS, str(model_path), str(batch), str(threads), providers],
                         capture_output=True, text=True, check=True, timeout=120)
    return float(out.stdout.strip().splitlines()[-1])


@contextmanager
def exit_on_sigterm() -> Iterator[None]:
    """SIGTERM as SystemExit for the block, so the `finally` that stops a started `guard serve` runs (Python's own
    SIGTERM ends the process there and then, and left the server running with its port). Only the main thread may
    set handlers: elsewhere (the CLI embedded in a program's thread) the block runs as it is."""

    def leave(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, leave)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def server_limits(batch: int, sample_shape: tuple[int, ...]) -> list[str]:
    """`guard serve` flags that let a request of `batch` samples through: its own limits (1024 samples, 64 MiB)
    refused a bench or load run at a larger batch."""
    from guard.config import ServeSettings

    fields = ServeSettings.model_fields
    needed_mb = -(-batch * math.prod(sample_shape) * 4 // 2**20) + 1  # FP32, and a MiB for the message's framing
    return ["--max-batch", str(max(batch, fields["max_batch"].default)),
            "--max-message-mb", str(max(needed_mb, fields["max_message_mb"].default))]


def warm_call(client: object, input_name: str, x: np.ndarray, timeout: float) -> None:
    """One call before timing, so connection set-up is not measured; a refusal is a GuardError, not a traceback."""
    from tritonclient.utils import InferenceServerException

    try:
        client.infer("", [triton_input(input_name, x)], client_timeout=timeout)  # type: ignore[attr-defined]
    except InferenceServerException as exc:
        raise GuardError(f"the server refused the warm-up call of {len(x)} samples: {exc.message()}") from None


def exit_text(code: int) -> str:
    """A process's exit status in words: `code 2`, or `killed by SIGKILL` for -9."""
    if code < 0 and -code in signal.valid_signals():
        return f"killed by {signal.Signals(-code).name}"
    return f"code {code}"


class ServerProcess:
    """`guard serve` on a free loopback port, in a process of its own, with `args` added to its command line."""

    def __init__(self, model: Path, profile: Path, args: list[str], workdir: Path) -> None:
        command = [sys.executable, "-m", "guard", "serve", str(model), "--profile", str(profile), "--port", "0",
                   "--metrics-port", "0", *args]
        # The server measured is the one these arguments describe: GUARD_* variables meant for a deployed guard (a
        # token, TLS, another policy or limit, a settings file) would change it or lock this client out.
        env = {k: v for k, v in os.environ.items() if not k.upper().startswith("GUARD_")}
        self.log = workdir / "server.log"
        with self.log.open("w") as log:  # a file, not a pipe: a chatty server can never block on it
            self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True, env=env)
        ready: list[str] = []
        reader = threading.Thread(target=lambda: ready.append(self.process.stdout.readline()), daemon=True)
        reader.start()
        try:
            reader.join(timeout=120)
        except BaseException:  # SIGTERM (exit_on_sigterm) or Ctrl-C while it starts: it is not left running
            self.close()
            raise
        match = re.search(r"on [\d.]+:(\d+),", ready[0]) if ready else None
        if not match:
            try:  # its output ended: it is exiting, if not yet reaped (poll() alone raced that under load)
                code = self.process.wait(timeout=30) if ready == [""] else self.process.poll()
            except subprocess.TimeoutExpired:
                code = None
            self.close()
            why = (f"exited ({exit_text(code)}) before it was ready" if code is not None
                   else "did not start within 120 s" if not ready
                   else f"printed {ready[0].strip()[:200]!r} where it says where it serves")
            raise GuardError(f"guard serve {why}: {self.log.read_text()[-2000:]}")
        self.port = int(match.group(1))

    def raise_if_exited(self, during: str) -> None:
        """A GuardError saying the server is gone, how, and the end of its log, where it has exited."""
        code = self.process.poll()
        if code is None:
            return
        raise GuardError(f"guard serve exited ({exit_text(code)}) during {during}: {self.log.read_text()[-2000:]}")

    def rss_mb(self, field: str = "VmRSS") -> float:
        """Resident memory of the server process now (VmRSS) or at its peak (VmHWM), in MiB; a GuardError once it
        has exited (an exited process's status has no memory lines, or is gone)."""
        try:
            found = re.search(rf"{field}:\s+(\d+) kB", Path(f"/proc/{self.process.pid}/status").read_text())
        except OSError:
            found = None
        if found is None:
            raise GuardError("guard serve has exited: its memory cannot be read")
        return int(found.group(1)) / 1024

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process.stdout.close()


def in_threads(caller: Callable[[int], None], count: int, what: str, halt: threading.Event) -> float:
    """`caller(i)` for i < `count`, each in a thread of its own, all at once; the wall time until the last returns.
    Callers stop when `halt` is set, which a failing caller does (the first error is then a GuardError naming `what`,
    raised once the others are done), as does a Ctrl-C or SIGTERM here, before it goes on up."""
    errors: list[BaseException] = []

    def run(index: int) -> None:
        try:
            caller(index)
        except BaseException as exc:  # noqa: BLE001 - reported below, after the other callers finish
            errors.append(exc)
            halt.set()

    started = time.perf_counter()
    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    except BaseException:
        halt.set()
        for thread in threads:
            if thread.ident is not None:
                thread.join()
        raise
    if errors:
        raise GuardError(f"{what} failed: {errors[0]}")
    return time.perf_counter() - started


def _server_load(port: int, input_name: str, batches: list[np.ndarray], seconds: float,
                 callers: int) -> tuple[list[float], float, int]:
    """`callers` threads, one tritonclient each, sending batches for `seconds`: latencies, wall time, samples."""
    import tritonclient.grpc as triton

    latencies: list[float] = []
    lock = threading.Lock()
    halt = threading.Event()

    def caller(offset: int) -> None:
        with triton.InferenceServerClient(f"127.0.0.1:{port}") as client:
            mine, calls = [], 0
            while (time.perf_counter() < stop or calls == 0) and not halt.is_set():
                tensor = triton_input(input_name, batches[(offset + calls) % len(batches)])
                started = time.perf_counter()
                client.infer("", [tensor], client_timeout=60)
                mine.append(time.perf_counter() - started)
                calls += 1
        with lock:
            latencies.extend(mine)

    _warm(port, input_name, batches[0])
    stop = time.perf_counter() + seconds
    wall = in_threads(caller, callers, "a bench caller", halt)
    return latencies, wall, len(latencies) * len(batches[0])


def _engine_load(predict: Callable[[np.ndarray], object], batches: list[np.ndarray], seconds: float,
                 callers: int) -> float:
    """Samples a second of the in-process engine under `callers` threads calling it as the server's callers do: the
    like-for-like figure for the server's throughput, which its concurrent workers spread over every core."""
    counts = [0] * callers
    halt = threading.Event()

    def caller(index: int) -> None:
        while (time.perf_counter() < stop or counts[index] == 0) and not halt.is_set():
            predict(batches[(index + counts[index]) % len(batches)])
            counts[index] += 1

    stop = time.perf_counter() + seconds
    wall = in_threads(caller, callers, "an engine caller", halt)
    return sum(counts) * len(batches[0]) / wall


def _warm(port: int, input_name: str, x: np.ndarray) -> None:
    import tritonclient.grpc as triton

    with triton.InferenceServerClient(f"127.0.0.1:{port}") as client:
        warm_call(client, input_name, x, 60)


def _strip_ratio(session, bare: Callable[[np.ndarray], None], x: np.ndarray, overlays: int,
                 threads: int) -> dict[str, float]:
    """STRIP on one request of len(x) samples (its blends through the same bare session) against bare calls on the
    same batch, interleaved with it, median against median. STRIP blends and takes softmaxes in torch, which gets as
    many threads as the sessions: at torch's own default it had the whole machine while the sessions had one."""
    import torch

    from guard.eval.baselines import Strip
    from guard.eval.models import OrtClassifier

    previous = torch.get_num_threads()
    torch.set_num_threads(threads or os.cpu_count() or 1)
    try:
        strip = Strip(OrtClassifier(session), x, n_overlays=overlays)
        strip.score(x)
        strip_t: list[float] = []
        bare_t: list[float] = []
        for _ in range(5):
            strip.score(x)
            strip_t.append(strip.last_seconds)
            for _ in range(4):
                started = time.perf_counter()
                bare(x)
                bare_t.append(time.perf_counter() - started)
    finally:
        torch.set_num_threads(previous)
    seconds = float(np.median(strip_t))
    return {"batch": len(x), "overlays": overlays, "ms_per_request": round(1e3 * seconds, 3),
            "ratio": round(seconds / float(np.median(bare_t)), 2)}


def _spread(x: np.ndarray, y: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """`count` samples drawn from the whole set (seeded), each class's first draw among them: an image folder is read
    class by class, so its first samples can miss classes calibration needs, and so can a draw of a rare class."""
    order = np.random.default_rng(0).permutation(len(x))
    firsts = np.unique(y[order], return_index=True)[1]  # where in the draw each class first comes
    pick = np.sort(np.concatenate([order[firsts], np.delete(order, firsts)[:max(0, count - len(firsts))]]))
    return x[pick], y[pick]


def growth_taps(model: LoadedModel) -> list[list[str]]:
    """The tap sets the tap-growth figure calibrates: the penultimate features (where the model has them) plus the
    last 0, 1, 2, ... conv activations, up to calibration's default; none where default taps find nothing."""
    from guard.calibrate.pipeline import CalibrationSettings

    try:
        taps = default_taps(model, conv_taps=len(model.proto.graph.node))
    except ModelError:
        return []
    ranks = tensor_ranks(model.proto)
    conv = [t for t in taps if ranks.get(t) == 4]
    dense = [t for t in taps if ranks.get(t) == 2]
    sets = [[*conv[len(conv) - count:], *dense] for count in range(min(len(conv), CalibrationSettings().conv_taps) + 1)]
    return [taps for taps in sets if taps]


def _tap_growth(model_path: Path, x: np.ndarray, y: np.ndarray, bare, tap_sets: list[list[str]],
                settings: BenchSettings, workdir: Path) -> list[dict[str, float]]:
    """Guards calibrated on the same data with each of `tap_sets`; guarded against bare at the largest batch."""
    from guard.calibrate.pipeline import CalibrationSettings, calibrate

    batch = max(settings.batches)
    batches = cycled_batches(x, batch)
    rows = []
    for taps in tap_sets:
        profile = calibrate(model_path, *_spread(x, y, 500), settings=CalibrationSettings(layers=taps), progress=False)
        path = profile.save(workdir / f"taps{len(taps)}.safetensors")
        guard = Guard.load(model_path, path, device=settings.device, threads=settings.threads)
        bare_t, guarded_t = _side_by_side(bare, guard.predict, batches, settings.seconds / 2)
        rows.append({"taps": len(taps), "channels": sum(t.channels for t in profile.taps), "batch": batch,
                     "ratio": round(float(np.median(guarded_t) / np.median(bare_t)), 3)})
    return rows


def machine() -> dict[str, object]:
    import onnxruntime

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "onnxruntime": onnxruntime.__version__, "providers": onnxruntime.get_available_providers()}


def run_bench(model_path: str | Path, profile_path: str | Path, x: np.ndarray, y: np.ndarray | None,
              settings: BenchSettings, workdir: Path) -> dict[str, object]:
    """Every figure of the bench as one JSON-ready dict."""
    import onnxruntime as ort

    model_path, profile_path = Path(model_path), Path(profile_path)
    guard = Guard.load(model_path, profile_path, device=settings.device, threads=settings.threads)
    options = ort.SessionOptions()
    options.intra_op_num_threads = settings.threads
    session = ort.InferenceSession(str(model_path), options, providers=ort_providers(settings.device))
    input_name = session.get_inputs()[0].name

    def bare(batch: np.ndarray) -> None:
        session.run(None, {input_name: batch})

    # What runs last is settled now, and `settings` in the figures says what ran, with the reason for what did not.
    skipped: dict[str, str] = {}
    tap_sets = growth_taps(load_model(model_path)) if y is not None and settings.tap_growth else []
    if settings.tap_growth and not tap_sets:
        skipped["tap_growth"] = ("the data has no labels" if y is None else
                                 "the model has no conv activations or penultimate features to tap by default")
    if settings.calibration_samples and y is None:
        skipped["calibration"] = "the data has no labels"
    ran = replace(settings, tap_growth=bool(tap_sets), calibration_samples=0 if y is None else
                  settings.calibration_samples)
    figures: dict[str, object] = {"machine": machine(), "settings": asdict(ran), "skipped": skipped,
                                  "model": str(model_path), "engine_providers": guard.engine.providers,
                                  "tail_from_input": guard.tail_from_input, "rows": []}
    args = ["--device", settings.device, "--threads", str(settings.threads), "--workers", str(max(8, settings.callers)),
            *server_limits(max(settings.batches), tuple(x.shape[1:]))]
    if settings.server_batch_size:
        args += ["--batch-size", str(settings.server_batch_size)]
    server = ServerProcess(model_path, profile_path, args, workdir)
    try:
        for batch in settings.batches:
            batches = cycled_batches(x, batch)
            bare_t, guarded_t = _side_by_side(bare, guard.predict, batches, settings.seconds)
            flagged = float(np.mean([guard.predict(b).flagged.mean() for b in batches]))
            repredicted = float(np.mean([guard.engine.run(b).needs.mean() for b in batches]))
            latencies, wall, samples = _server_load(server.port, input_name, batches, settings.seconds,
                                                    settings.callers)
            concurrent = _engine_load(guard.predict, batches, settings.seconds, settings.callers)
            row = {"batch": batch, "bare": _percentiles(bare_t, batch), "engine": _percentiles(guarded_t, batch),
                   "server": {**_percentiles(latencies, batch), "throughput": round(samples / wall, 1)},
                   "engine_concurrent_throughput": round(concurrent, 1),
                   "flagged_share": round(flagged, 4), "repredicted_share": round(repredicted, 4)}
            row["engine_over_bare"] = round(row["engine"]["p50_ms"] / row["bare"]["p50_ms"], 3)
            # against one caller (as the runs before session 57 gave it), and against as many callers as the server
            row["server_over_engine_throughput"] = round(row["server"]["throughput"] / row["engine"]["throughput"], 3)
            row["server_over_concurrent_engine_throughput"] = round(
                row["server"]["throughput"] / row["engine_concurrent_throughput"], 3)
            figures["rows"].append(row)
        figures["server_peak_rss_mb"] = round(server.rss_mb("VmHWM"), 1)
    except GuardError:  # a caller's failure reads as the server's refusal, where the server is in fact gone
        server.raise_if_exited("the bench")
        raise
    finally:
        server.close()
    largest = cycled_batches(x, max(settings.batches), 1)[0]
    figures["bare_process_peak_rss_mb"] = round(
        bare_process_rss(model_path, largest, settings.threads, settings.device, workdir), 1)
    figures["server_over_bare_rss"] = round(figures["server_peak_rss_mb"] / figures["bare_process_peak_rss_mb"], 3)
    figures["strip"] = _strip_ratio(session, bare, largest, settings.strip_overlays, settings.threads)
    if tap_sets:
        figures["tap_growth"] = _tap_growth(model_path, x, y, bare, tap_sets, settings, workdir)
    if y is not None and ran.calibration_samples:
        from guard.calibrate.pipeline import calibrate

        count = min(ran.calibration_samples, len(x))
        started = time.perf_counter()
        calibrate(model_path, *_spread(x, y, count), progress=False)
        figures["calibration"] = {"samples": count, "seconds": round(time.perf_counter() - started, 2)}
    return figures


def format_table(figures: dict[str, object]) -> str:
    callers = figures["settings"]["callers"]
    lines = ["| batch | bare p50 / p99 ms | guarded engine p50 / p99 ms | engine / bare | server p50 / p99 ms | "
             f"server samples/s | engine samples/s, 1 caller / {callers} | server / engine, 1 caller / {callers} | "
             "re-predicted |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in figures["rows"]:
        b, e, s = r["bare"], r["engine"], r["server"]
        lines.append(f"| {r['batch']} | {b['p50_ms']:.3f} / {b['p99_ms']:.3f} | {e['p50_ms']:.3f} / {e['p99_ms']:.3f}"
                     f" | {r['engine_over_bare']:.3f} | {s['p50_ms']:.3f} / {s['p99_ms']:.3f} | {s['throughput']:.0f}"
                     f" | {e['throughput']:.0f} / {r['engine_concurrent_throughput']:.0f}"
                     f" | {r['server_over_engine_throughput']:.3f} / {r['server_over_concurrent_engine_throughput']:.3f}"
                     f" | {r['repredicted_share']:.1%} |")
    lines.append("")
    lines.append(f"Peak memory: server process {figures['server_peak_rss_mb']} MiB, bare-session process "
                 f"{figures['bare_process_peak_rss_mb']} MiB (ratio {figures['server_over_bare_rss']}).")
    strip = figures["strip"]
    lines.append(f"STRIP ({strip['overlays']} blends) on a batch of {strip['batch']}: {strip['ms_per_request']} ms, "
                 f"{strip['ratio']}x the bare call.")
    if "tap_growth" in figures:
        growth = ", ".join(f"{g['taps']} taps ({g['channels']} channels): {g['ratio']}x" for g in figures["tap_growth"])
        lines.append(f"Guarded / bare at batch {figures['tap_growth'][0]['batch']} by taps: {growth}.")
    if "calibration" in figures:
        c = figures["calibration"]
        lines.append(f"Calibration of {c['samples']} samples, without the scan `guard calibrate` runs first "
                     f"(`--no-scan`): {c['seconds']} s.")
    for what, why in figures.get("skipped", {}).items():
        lines.append(f"Not measured: {what.replace('_', ' ')} ({why}).")
    return "\n".join(lines)


def plot(figures: dict[str, object], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = figures["rows"]
    batches = [r["batch"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in (("bare", "bare ONNX Runtime"), ("engine", "guarded engine"), ("server", "guarded server")):
        ax.plot(batches, [r[key]["p50_ms"] for r in rows], marker="o", label=f"{label} (p50)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size")
    ax.set_ylabel("latency per call (ms)")
    ax.set_title("guard bench: latency against batch size")
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    try:
        write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    finally:
        plt.close(fig)


def write_outputs(figures: dict[str, object], out: Path) -> list[Path]:
    """bench.json and bench.md, and the plot bench.png where matplotlib is installed (the `eval` extra; the
    figures do not need it, so a runtime-only install still gets them). Returns the files written."""
    written = [write_json(out / "bench.json", figures)]
    table = format_table(figures) + "\n"
    written.append(write_atomic(out / "bench.md", lambda tmp: tmp.write_text(table)))
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return written
    plot(figures, out / "bench.png")
    return [*written, out / "bench.png"]
