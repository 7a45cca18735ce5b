"""Engines run the two serving graphs (guard.model.serving): the served graph with the check inside, and the tail.

Both engines keep what the tail needs (the cut tensors and the masks) where the model ran, and bring back to the
host only the logits, the scores and the needs-re-prediction flags. `OrtEngine` does this on CUDA with ONNX
Runtime's IOBinding (the input is copied to the device once, the cut tensors stay there); on CPU, where the device
is the host, a plain run costs fewer Python calls than binding each tensor (measured: 55 against 95 µs a call on the
SmallCNN at batch 1). `TorchEngine` runs the same graphs through guard's torch bridge on any torch device, for users
whose model lives in PyTorch on a GPU.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from guard.errors import GuardError, ModelError
from guard.model.serving import (
    CUT_PREFIX,
    DEMOTE_SCORE_OUTPUT,
    NEEDS_OUTPUT,
    ROWS_INPUT,
    SCORE_OUTPUT,
    ServingGraphs,
)

ENGINES = ("onnxruntime", "torch")


@dataclass
class EngineRun:
    """One pass of the served graph: host copies of the small outputs, and the rest left on the device."""

    logits: np.ndarray  # (N, K) float32
    score: np.ndarray  # (N,) float32
    demote_score: np.ndarray  # (N,) float32: the score over the parts that demote
    needs: np.ndarray  # (N,) bool: the sample needs a benign re-prediction
    carry: dict[str, Any]  # tail input name -> device value (cut tensors, masks)


class Engine(Protocol):
    device: str

    @property
    def providers(self) -> list[str]: ...

    def run(self, x: np.ndarray, deadline: float | None = None) -> EngineRun: ...

    def repredict(self, run: EngineRun, rows: np.ndarray, deadline: float | None = None) -> np.ndarray: ...


def build_engine(kind: str, graphs: ServingGraphs, input_name: str, output_name: str, device: str = "cpu",
                 threads: int = 0, io_binding: bool | None = None) -> Engine:
    if kind == "onnxruntime":
        return OrtEngine(graphs, input_name, output_name, device, threads, io_binding)
    if kind == "torch":
        return TorchEngine(graphs, input_name, output_name, device, threads)
    raise GuardError(f"unknown engine {kind!r}: use one of {', '.join(ENGINES)}")


def plain_model(kind: str, model: bytes, input_name: str, output_name: str, device: str = "cpu",
                threads: int = 0) -> PlainSession | TorchPlain:
    """A model as it is (no mask, no check) on the same engine and device as the served graph."""
    if kind == "torch":
        return TorchPlain(model, output_name, device)
    return PlainSession(model, input_name, device, threads)


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise GuardError(
            "ONNX Runtime is not installed: pip install 'guard[cpu]' (or 'guard[gpu]' on a CUDA machine)"
        ) from None
    return onnxruntime


def _tail_names(graphs: ServingGraphs, input_name: str) -> tuple[list[str], dict[str, str]]:
    """Served output names to fetch after the head three, and which tail input each feeds (the input, if it is
    part of the cut, is fed from the request itself)."""
    outputs = [*graphs.masks, *(name for name in graphs.cut if name != input_name)]
    feeds = {name: name for name in graphs.masks}
    feeds.update({name: f"{CUT_PREFIX}{i}" for i, name in enumerate(graphs.cut)})
    return outputs, feeds


def ort_providers(device: str) -> list[str | tuple[str, dict[str, str]]]:
    """ONNX Runtime's providers for `device`. The CUDA provider runs float32 convolutions and GEMMs in TF32 (a
    10-bit mantissa) on Ampere and later unless told not to: about 1e-3 from the float32 that calibration measured,
    as the torch engine's TF32 would be (`_torch_device`)."""
    if device == "cuda":
        return [("CUDAExecutionProvider", {"use_tf32": "0"}), "CPUExecutionProvider"]
    if device == "cpu":
        return ["CPUExecutionProvider"]
    raise GuardError(f"unknown device {device!r}: use cpu or cuda")


def _sessions(ort: Any, device: str, threads: int) -> tuple[Any, list[str | tuple[str, dict[str, str]]]]:
    providers = ort_providers(device)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads  # 0: ONNX Runtime's default (one per core)
    # Denormal floats as zero (FTZ/DAZ): pixels near 1e-38 made subnormal activations, which slowed the CPU kernels
    # up to tenfold (measured 10 -> 76 ms for 256 images), enough for a caller to push a batch past its check
    # budget and, under fail-open, be answered by the unguarded model. What it changes is below 1.2e-38.
    options.add_session_config_entry("session.set_denormal_as_zero", "1")
    return options, providers


def _require_cuda_provider(ort: Any, session: Any, device: str) -> None:
    """ONNX Runtime falls back to the CPU silently when the CUDA provider cannot load; asked for CUDA, refuse."""
    if device == "cuda" and "CUDAExecutionProvider" not in session.get_providers():
        raise GuardError("--device cuda was asked for but ONNX Runtime's CUDA provider did not load "
                         f"(available: {ort.get_available_providers()}); install guard[gpu] and a matching CUDA")


class PlainSession:
    """A model as it is, no mask and no check, in ONNX Runtime: the model itself, which a guard that fails open
    answers with, or the profile's reference (a fine-tuned copy)."""

    def __init__(self, model: bytes, input_name: str, device: str = "cpu", threads: int = 0) -> None:
        ort = _onnxruntime()
        options, providers = _sessions(ort, device, threads)
        try:
            self.session = ort.InferenceSession(model, options, providers=providers)
        except Exception as exc:  # noqa: BLE001 - ORT raises its own untyped errors; report them plainly
            raise ModelError(f"ONNX Runtime could not load the model: {exc}") from None
        _require_cuda_provider(ort, self.session, device)
        self._ort = ort
        self.input_name = input_name

    def logits(self, x: np.ndarray, deadline: float | None = None) -> np.ndarray:
        """`deadline` (time.perf_counter()): abort the run, raising, once it passes."""
        with _run_options(self._ort, deadline) as options:
            return self.session.run(None, {self.input_name: x}, options)[0]


class CheckTimeout(RuntimeError):
    """The check ran past its budget and ONNX Runtime stopped it (its own error reads as an internal failure)."""


@contextmanager
def _run_options(ort: Any, deadline: float | None) -> Iterator[Any]:
    """RunOptions that ONNX Runtime aborts once `deadline` (time.perf_counter()) passes, raising CheckTimeout; None
    without one."""
    if deadline is None:
        yield None
        return
    options = ort.RunOptions()
    # clamped: a longer wait raises OverflowError in the timer's thread, and leaves the run unbounded anyway
    wait = min(max(0.0, deadline - time.perf_counter()), threading.TIMEOUT_MAX)
    timer = threading.Timer(wait, setattr, (options, "terminate", True))
    timer.start()
    try:
        yield options
    except Exception:
        if options.terminate:
            raise CheckTimeout("it ran past its time budget (--check-budget-ms) and was stopped") from None
        raise
    finally:
        timer.cancel()


class OrtEngine:
    """ONNX Runtime sessions for the served graph and the tail (IOBinding on CUDA, plain runs on CPU)."""

    def __init__(self, graphs: ServingGraphs, input_name: str, output_name: str, device: str = "cpu",
                 threads: int = 0, io_binding: bool | None = None) -> None:
        """`io_binding`: None binds on CUDA only; True also on CPU (the CUDA path, testable without a GPU)."""
        ort = _onnxruntime()
        options, providers = _sessions(ort, device, threads)
        try:
            self.session = ort.InferenceSession(graphs.served, options, providers=providers)
            self.tail = ort.InferenceSession(graphs.tail, options, providers=providers)
        except Exception as exc:  # noqa: BLE001 - ORT raises its own untyped errors; report them plainly
            raise ModelError(f"ONNX Runtime could not load the guarded model: {exc}") from None
        _require_cuda_provider(ort, self.session, device)
        self._ort = ort
        self.device = device
        self.input_name = input_name
        self.output_name = output_name
        self._carried, self._feeds = _tail_names(graphs, input_name)
        self._outputs = [output_name, SCORE_OUTPUT, DEMOTE_SCORE_OUTPUT, NEEDS_OUTPUT, *self._carried]
        self.io_binding = device == "cuda" if io_binding is None else io_binding

    @property
    def providers(self) -> list[str]:
        return list(self.session.get_providers())

    def run(self, x: np.ndarray, deadline: float | None = None) -> EngineRun:
        """`deadline` (time.perf_counter()): abort the run, raising, once it passes."""
        with _run_options(self._ort, deadline) as options:
            return self._run(x, options)

    def _run(self, x: np.ndarray, options: Any) -> EngineRun:
        if not self.io_binding:
            logits, score, demote_score, needs, *carried = self.session.run(self._outputs, {self.input_name: x},
                                                                            options)
            carry = {self._feeds[name]: v for name, v in zip(self._carried, carried, strict=True)}
            if self.input_name in self._feeds:
                carry[self._feeds[self.input_name]] = x
            return EngineRun(logits, score, demote_score, needs, carry)
        binding = self.session.io_binding()
        value = self._ort.OrtValue.ortvalue_from_numpy(x, self.device, 0)  # on CUDA: the one host-to-device copy
        binding.bind_ortvalue_input(self.input_name, value)
        for name in self._outputs:
            binding.bind_output(name, self.device)
        self.session.run_with_iobinding(binding, options)
        logits, score, demote_score, needs, *carried = binding.get_outputs()
        carry = {self._feeds[name]: v for name, v in zip(self._carried, carried, strict=True)}
        if self.input_name in self._feeds:
            carry[self._feeds[self.input_name]] = value
        return EngineRun(logits.numpy(), score.numpy(), demote_score.numpy(), needs.numpy(), carry)

    def repredict(self, run: EngineRun, rows: np.ndarray, deadline: float | None = None) -> np.ndarray:
        """Benign logits (len(rows), K) from the tail, reading the run's cut tensors where they are."""
        rows = np.ascontiguousarray(rows, dtype=np.int64)
        with _run_options(self._ort, deadline) as options:
            return self._repredict(run, rows, options)

    def _repredict(self, run: EngineRun, rows: np.ndarray, options: Any) -> np.ndarray:
        if not self.io_binding:
            return self.tail.run([self.output_name], {**run.carry, ROWS_INPUT: rows}, options)[0]
        binding = self.tail.io_binding()
        for name, value in run.carry.items():
            binding.bind_ortvalue_input(name, value)
        binding.bind_cpu_input(ROWS_INPUT, rows)
        binding.bind_output(self.output_name, self.device)
        self.tail.run_with_iobinding(binding, options)
        return binding.get_outputs()[0].numpy()


class TorchEngine:
    """The same two graphs evaluated by guard's torch bridge on a torch device (cpu, cuda, cuda:1, ...).

    `threads` sets torch's intra-op threads, which is process-wide.
    """

    def __init__(self, graphs: ServingGraphs, input_name: str, output_name: str, device: str = "cpu",
                 threads: int = 0) -> None:
        import onnx
        import torch

        from guard.model.bridge import OnnxModule

        self._device = _torch_device(device)
        if threads:
            torch.set_num_threads(threads)
        self._torch = torch
        self.served = OnnxModule(onnx.load_from_string(graphs.served)).to(self._device).eval()
        self.tail = OnnxModule(onnx.load_from_string(graphs.tail)).to(self._device).eval()
        self.device = device
        self.input_name = input_name
        self.output_name = output_name
        self._carried, self._feeds = _tail_names(graphs, input_name)

    @property
    def providers(self) -> list[str]:
        return [f"torch:{self._device}"]

    def run(self, x: np.ndarray, deadline: float | None = None) -> EngineRun:
        """`deadline` is not supported: torch has no way to abort a forward pass (Guard refuses a budget here)."""
        torch = self._torch
        if not x.flags.writeable:  # a request decoded straight from gRPC's buffer; torch wants its own memory
            x = x.copy()
        with torch.inference_mode():
            value = torch.from_numpy(x).to(self._device)
            outputs, _ = self.served.run(value)
        carry = {self._feeds[name]: outputs[name] for name in self._carried}
        if self.input_name in self._feeds:
            carry[self._feeds[self.input_name]] = value
        host = {name: outputs[name].cpu().numpy()
                for name in (self.output_name, SCORE_OUTPUT, DEMOTE_SCORE_OUTPUT, NEEDS_OUTPUT)}
        return EngineRun(host[self.output_name], host[SCORE_OUTPUT], host[DEMOTE_SCORE_OUTPUT], host[NEEDS_OUTPUT],
                         carry)

    def repredict(self, run: EngineRun, rows: np.ndarray, deadline: float | None = None) -> np.ndarray:
        torch = self._torch
        with torch.inference_mode():
            index = torch.as_tensor(np.asarray(rows, dtype=np.int64), device=self._device)
            outputs, _ = self.tail.run({**run.carry, ROWS_INPUT: index})
        return outputs[self.output_name].cpu().numpy()


def _torch_device(device: str) -> Any:
    import torch

    try:
        parsed = torch.device(device)
    except RuntimeError as exc:
        raise GuardError(f"unknown torch device {device!r}: {exc}") from None
    if parsed.type not in ("cpu", "cuda"):  # torch parses "mps" and the like, then fails on first use
        raise GuardError(f"guard runs on cpu or cuda, not {device!r}")
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise GuardError("--device cuda was asked for but torch sees no CUDA device")
    if parsed.type == "cuda":  # cuDNN convolutions default to TF32 (10-bit mantissa) on Ampere and later, where the
        torch.backends.cudnn.allow_tf32 = False  # calibration measured float32; process-wide, as guard serve is
        torch.backends.cuda.matmul.allow_tf32 = False
    return parsed


class TorchPlain:
    """A model as it is (the profile's reference) through guard's torch bridge, beside the torch engine."""

    def __init__(self, model: bytes, output_name: str, device: str = "cpu") -> None:
        import onnx
        import torch

        from guard.model.bridge import OnnxModule

        self._torch = torch
        self._device = _torch_device(device)
        self.module = OnnxModule(onnx.load_from_string(model)).to(self._device).eval()
        self.output_name = output_name

    def logits(self, x: np.ndarray, deadline: float | None = None) -> np.ndarray:
        """`deadline` is not supported, as for TorchEngine."""
        torch = self._torch
        with torch.inference_mode():
            outputs, _ = self.module.run(torch.from_numpy(x.copy() if not x.flags.writeable else x).to(self._device))
        return outputs[self.output_name].cpu().numpy()
