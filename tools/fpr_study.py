"""How the clean false-positive rate of `guard calibrate` varies with the draw of the clean data.

One clean model of `guard eval`'s recipe (20k training images, 3 epochs) is calibrated many times, each time on a
random 1,000-image defender set from the test split, and its guard is measured on the other 9,000 test images.
Prints one JSON line per calibration and a summary line: the mean and spread of the fresh FPR and the share of
calibrations above the target. Extra settings go in as JSON, for example the old on-average rule:

    python -m tools.fpr_study --arch resnet --trials 30 --settings '{"fpr_confidence": 0.5}'
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from guard.calibrate.pipeline import CalibrationSettings, calibrate
from guard.eval.datasets import load_fashion_mnist
from guard.eval.models import build_model, export_onnx, train
from guard.model.graph import load_model
from guard.runtime.guard import Guard
from guard.runtime.policy import Policy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet", choices=["cnn", "resnet"])
    parser.add_argument("--seed", type=int, default=0, help="the model's training seed")
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--defender", type=int, default=1000, help="clean samples per calibration")
    parser.add_argument("--settings", default="{}", help="CalibrationSettings fields as JSON")
    args = parser.parse_args()
    extra = json.loads(args.settings)
    target = CalibrationSettings(**extra).fpr
    torch.set_num_threads(1)
    x_train, y_train = load_fashion_mnist("train")
    x_test, y_test = load_fashion_mnist("test")
    subset = np.sort(np.random.default_rng(args.seed).choice(len(x_train), 20_000, replace=False))
    torch.manual_seed(args.seed)
    module = train(build_model(args.arch), x_train[subset], y_train[subset], epochs=3, seed=args.seed)
    rates = []
    with tempfile.TemporaryDirectory(prefix="guard-fpr-") as tmp:
        loaded = load_model(export_onnx(module, Path(tmp) / "model.onnx", torch.zeros(1, *x_test.shape[1:])))
        for trial in range(args.trials):
            order = np.random.default_rng(1000 + trial).permutation(len(x_test))
            defender, fresh = order[: args.defender], order[args.defender :]
            settings = CalibrationSettings(**{**extra, "seed": trial})
            profile = calibrate(loaded, x_test[defender], y_test[defender], settings=settings)
            flagged = Guard(loaded, profile, policy=Policy.ENFORCE, threads=1).predict(x_test[fresh]).flagged
            rates.append(float(flagged.mean()))
            print(json.dumps({"trial": trial, "fresh_fpr": rates[-1],
                              "calibration_flag_rate": profile.figures["calibration_flag_rate"],
                              "k": profile.thresholds.k, "tau": profile.thresholds.tau}), flush=True)
    print(json.dumps({"mean_fpr": float(np.mean(rates)), "std": float(np.std(rates)),
                      "share_above_target": float(np.mean(np.array(rates) > target)), "trials": len(rates)}))


if __name__ == "__main__":
    main()
