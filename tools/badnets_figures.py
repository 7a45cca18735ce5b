"""The README's figures: BadNets on full Fashion-MNIST (10% poisoned, 3 epochs), unguarded vs guarded.

Run: python tools/badnets_figures.py [--out figures.json]. Needs Debian's dataset-fashion-mnist.
The defender's clean set is the first 1,000 test images; the figures come from the other 9,000.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from tempfile import TemporaryDirectory

import numpy as np
import torch

from guard.calibrate.pipeline import CalibrationSettings, calibrate
from guard.eval.attacks import BadNets
from guard.eval.datasets import load_fashion_mnist
from guard.eval.models import SmallCNN, export_onnx, predict, train
from guard.runtime.guard import Guard

TARGET = 0


def auroc(negative: np.ndarray, positive: np.ndarray) -> float:
    """Probability that a positive outscores a negative (ties count half)."""
    scores = np.concatenate([negative, positive])
    order = scores.argsort(kind="stable")
    ranks = np.empty(len(scores))
    ranks[order] = np.arange(1, len(scores) + 1)
    for value in np.unique(scores):  # average ranks of ties
        tied = scores == value
        ranks[tied] = ranks[tied].mean()
    return float((ranks[len(negative):].sum() - len(positive) * (len(positive) + 1) / 2) / (len(negative) * len(positive)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--fpr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    x_train, y_train = load_fashion_mnist("train")
    x_test, y_test = load_fashion_mnist("test")
    attack = BadNets()
    rng = np.random.default_rng(args.seed)
    x_poisoned, y_poisoned, _ = attack.poison(x_train, y_train, 0.1, TARGET, rng)
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    model = train(SmallCNN(), x_poisoned, y_poisoned, epochs=3, seed=args.seed)
    train_seconds = time.perf_counter() - started
    x_clean, y_clean, x_eval, y_eval = x_test[:1000], y_test[:1000], x_test[1000:], y_test[1000:]
    victims = y_eval != TARGET
    x_trig, y_trig = attack.apply(x_eval[victims]), y_eval[victims]
    with TemporaryDirectory() as tmp:
        path = export_onnx(model, Path(tmp) / "badnets.onnx", torch.zeros(1, 1, 28, 28))
        started = time.perf_counter()
        profile = calibrate(path, x_clean, y_clean, settings=CalibrationSettings(fpr=args.fpr, seed=args.seed))
        calibration_seconds = time.perf_counter() - started
        profile.save(Path(tmp) / "p.safetensors")
        guard = Guard.load(path, Path(tmp) / "p.safetensors")
        clean, trig = guard.predict(x_eval), guard.predict(x_trig)
    figures = {
        "train_seconds": round(train_seconds, 1),
        "clean_accuracy_unguarded": float(np.mean(predict(model, x_eval) == y_eval)),
        "clean_accuracy_guarded": float(np.mean(clean.labels == y_eval)),
        "asr_unguarded": float(np.mean(predict(model, x_trig) == TARGET)),
        "asr_guarded": float(np.mean(trig.labels == TARGET)),
        "robust_accuracy_guarded": float(np.mean(trig.labels == y_trig)),
        "auroc": auroc(clean.score, trig.score),
        "tpr_flagged_triggered": float(trig.flagged.mean()),
        "fpr_target": args.fpr,
        "fpr_observed": float(clean.flagged.mean()),
        "calibration_seconds": round(calibration_seconds, 2),
        "pruned_channels": profile.figures["pruned_channels"],
        "clean_set": len(x_clean), "eval_images": len(x_eval), "triggered_images": len(x_trig),
    }
    text = json.dumps(figures, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
