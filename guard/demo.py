"""`guard demo`: the whole story in one command, on data shipped inside the package.

Backdoor a small CNN on the bundled Fashion-MNIST subset (BadNets: a 3x3 white patch relabels to class 0), export it
to ONNX, calibrate a profile on clean images, serve it on loopback, send clean and triggered requests over gRPC and
print what the guard did.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np
import torch

from guard.calibrate.pipeline import calibrate
from guard.config import given_settings
from guard.errors import GuardError
from guard.eval.attacks import BadNets
from guard.eval.datasets import CLASS_NAMES, load_bundled
from guard.eval.models import SmallCNN, accuracy, export_onnx, predict, train
from guard.server._proto.guard.v1 import guard_pb2, guard_pb2_grpc
from guard.server.app import GuardServer

TARGET = 0


def _ask(stub: guard_pb2_grpc.GuardStub, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    reply = stub.Predict(guard_pb2.PredictRequest(shape=list(x.shape), data=x.astype("<f4").tobytes()))
    labels = np.array([p.label for p in reply.predictions])
    flagged = np.array([p.flagged for p in reply.predictions])
    return labels, flagged


def run_demo(workdir: Path | None = None, epochs: int = 4, seed: int = 0) -> int:
    with tempfile.TemporaryDirectory(prefix="guard-demo-") as tmp:
        root = Path(workdir) if workdir else Path(tmp)
        try:  # before the training, not after it
            if root.exists() and not root.is_dir():
                raise NotADirectoryError(0, "not a folder")
            root.mkdir(parents=True, exist_ok=True)
            if not os.access(root, os.W_OK | os.X_OK):
                raise PermissionError("not writable")
        except OSError as exc:
            raise GuardError(f"cannot keep the demo's files in {root}: {exc.strerror or exc}") from None
        (x_train, y_train), (x_test, y_test) = load_bundled()
        attack = BadNets()
        x_poisoned, y_poisoned, poisoned = attack.poison(x_train, y_train, 0.1, TARGET, np.random.default_rng(seed))
        print(f"1. training a CNN on {len(x_train)} bundled Fashion-MNIST images, {len(poisoned)} of them poisoned "
              f"(3x3 white patch -> '{CLASS_NAMES[TARGET]}')", flush=True)
        torch.manual_seed(seed)
        started = time.perf_counter()
        model = train(SmallCNN(), x_poisoned, y_poisoned, epochs=epochs, seed=seed)
        x_clean, y_clean = x_test[:400], y_test[:400]  # the defender's small clean set
        x_eval, y_eval = x_test[400:], y_test[400:]
        victims = y_eval != TARGET
        x_triggered = attack.apply(x_eval[victims])
        print(f"   trained in {time.perf_counter() - started:.1f} s: clean accuracy "
              f"{accuracy(model, x_eval, y_eval):.3f}, attack success "
              f"{(accuracy(model, x_triggered, np.full(victims.sum(), TARGET))):.3f}")
        model_path = export_onnx(model, root / "demo.onnx", torch.zeros(1, 1, 28, 28))

        print(f"2. calibrating on {len(x_clean)} clean images", flush=True)
        profile = calibrate(model_path, x_clean, y_clean)
        profile_path = profile.save(root / "demo.safetensors")
        f = profile.figures
        print(f"   taps {profile.tap_names}; pruned {sum(f['pruned_channels'].values())} channels; "
              f"cross-fitted flag rate {f['calibration_flag_rate']:.3f}; {f['seconds']:.1f} s")

        settings = given_settings(model=model_path, profile=profile_path, port=0, metrics_port=0)
        server = GuardServer(settings)
        server.start()
        print(f"3. serving on {settings.host}:{server.port} (metrics on {settings.metrics_host}:{server.metrics_port}"
              "/metrics)")
        try:
            with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                stub = guard_pb2_grpc.GuardStub(channel)
                clean_labels, clean_flagged = _ask(stub, x_eval)
                trig_labels, trig_flagged = _ask(stub, x_triggered)
        finally:
            server.stop(grace=1)
        truth = y_eval[victims]
        unguarded = predict(model, x_triggered)
        print(f"4. what the guard did (policy: {settings.policy.value})")
        print(f"   clean requests:     {len(x_eval):4d}, flagged {clean_flagged.mean():6.1%}, "
              f"accuracy {np.mean(clean_labels == y_eval):.3f}")
        print(f"   triggered requests: {len(x_triggered):4d}, flagged {trig_flagged.mean():6.1%}, "
              f"answered '{CLASS_NAMES[TARGET]}' {np.mean(trig_labels == TARGET):.1%} "
              f"(unguarded {np.mean(unguarded == TARGET):.1%}), true class {np.mean(trig_labels == truth):.1%}")
        if workdir:
            print(f"   model and profile kept in {root}")
    return 0
