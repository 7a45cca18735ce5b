"""The ONNX Runtime engine: the guarded graph (static mask folded, ℓ∞ of each tap as extra outputs) and its
re-prediction twin (per-sample channel masks as extra inputs), each a session built once at start-up."""

from __future__ import annotations

import numpy as np

from guard.errors import GuardError, ModelError
from guard.model.graph import LINF_OUTPUT_PREFIX, MASK_INPUT_PREFIX


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise GuardError(
            "ONNX Runtime is not installed: pip install 'guard[cpu]' (or 'guard[gpu]' on a CUDA machine)"
        ) from None
    return onnxruntime


class OrtEngine:
    """Runs the guarded model: `run(x)` gives logits and per-tap ℓ∞; `repredict(x, masks)` the benign logits."""

    def __init__(self, served: bytes, repredict: bytes, input_name: str, output_name: str, taps: int,
                 device: str = "cpu", threads: int = 0) -> None:
        ort = _onnxruntime()
        if device == "cuda":
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        elif device == "cpu":
            providers = ["CPUExecutionProvider"]
        else:
            raise GuardError(f"unknown device {device!r}: use cpu or cuda")
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.intra_op_num_threads = threads  # 0: ONNX Runtime's default (one per core)
        try:
            self.session = ort.InferenceSession(served, options, providers=providers)
            self.repredict_session = ort.InferenceSession(repredict, options, providers=providers)
        except Exception as exc:  # noqa: BLE001 - ORT raises its own untyped errors; report them plainly
            raise ModelError(f"ONNX Runtime could not load the guarded model: {exc}") from None
        if device == "cuda" and "CUDAExecutionProvider" not in self.session.get_providers():
            raise GuardError(
                "--device cuda was asked for but ONNX Runtime's CUDA provider did not load "
                f"(available: {ort.get_available_providers()}); install guard[gpu] and a matching CUDA"
            )
        self.device = device
        self.input_name = input_name
        self.output_names = [output_name] + [f"{LINF_OUTPUT_PREFIX}{i}" for i in range(taps)]
        self.mask_names = [f"{MASK_INPUT_PREFIX}{i}" for i in range(taps)]
        self.repredict_output = output_name

    @property
    def providers(self) -> list[str]:
        return list(self.session.get_providers())

    def run(self, x: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        logits, *linf = self.session.run(self.output_names, {self.input_name: x})
        return logits, linf

    def repredict(self, x: np.ndarray, masks: list[np.ndarray]) -> np.ndarray:
        feeds = {self.input_name: x, **dict(zip(self.mask_names, masks, strict=True))}
        return self.repredict_session.run([self.repredict_output], feeds)[0]
