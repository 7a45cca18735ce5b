"""Make the models `docs/performance.md` was measured on: the eval suite's BadNets SmallCNN and SmallResNet.

Each is trained on 20,000 Fashion-MNIST training images (10% poisoned, as in `guard eval`), exported to ONNX and
calibrated on 1,000 clean test images; `clean.npz` holds 2,000 other clean test images with labels for
`guard bench --data`. Run from the repository root::

    python -m tools.bench_models --out /tmp/guard-bench
    guard bench /tmp/guard-bench/resnet.onnx --profile /tmp/guard-bench/resnet.safetensors \\
        --data /tmp/guard-bench/clean.npz --out docs/bench/resnet
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from guard.calibrate.pipeline import calibrate
from guard.eval.attacks import BadNets
from guard.eval.datasets import load_fashion_mnist
from guard.eval.models import export_onnx, train_backdoored


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--archs", default="cnn,resnet")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    x_test, y_test = load_fashion_mnist("test")
    np.savez(args.out / "clean.npz", x=x_test[1000:3000], y=y_test[1000:3000])
    for arch in args.archs.split(","):
        model, facts = train_backdoored(BadNets(), n_train=20_000, epochs=2, seed=args.seed, arch=arch)
        path = export_onnx(model, args.out / f"{arch}.onnx", torch.zeros(1, 1, 28, 28))
        profile = calibrate(path, x_test[:1000], y_test[:1000])
        profile.save(args.out / f"{arch}.safetensors")
        print(f"{arch}: clean accuracy {facts['clean_accuracy']:.3f}, attack success {facts['asr']:.3f}, "
              f"calibration of 1,000 samples {profile.figures['seconds']:.1f} s -> {path}")


if __name__ == "__main__":
    main()
