"""Tune the guard's demotion on data outside the evaluation split, and print what each rate gives.

The models follow `guard eval`'s recipe (20k training images, 3 epochs) with seeds the eval never uses; the
defender's clean set and the measuring set are training-split images outside the model's training subset. For each
`--demote-rate`, the guard is calibrated and its clean accuracy and attack success are measured, next to the guard
with demotion off and the guard demoting every extreme request (without the margin proviso).

    python -m tools.tune_demote --arch cnn --attacks badnets-1% blend source-specific clean --seeds 10 --rates 0.01 0.015
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math

import numpy as np
import torch

from guard.calibrate.pipeline import CalibrationSettings, calibrate
from guard.eval.datasets import load_fashion_mnist
from guard.eval.suite import ATTACKS, TARGET
from guard.runtime.guard import Guard
from tools.tuning import tuning_case


def _share(labels: np.ndarray, want: np.ndarray | int) -> float:
    return round(float((labels == want).mean()), 4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="cnn", choices=["cnn", "resnet"])
    parser.add_argument("--attacks", nargs="+", default=["badnets-1%", "blend", "source-specific", "clean"],
                        choices=list(ATTACKS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[10])
    parser.add_argument("--rates", type=float, nargs="+", default=[0.01, 0.015])
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = load_fashion_mnist("train")
    for seed, attack_name in ((s, a) for s in args.seeds for a in args.attacks):
        case = tuning_case(args.arch, attack_name, seed, n_measure=3000, data=data)
        x_def, y_def, x_meas, y_meas, x_trig = case.x_def, case.y_def, case.x_meas, case.y_meas, case.x_trig
        loaded = case.loaded()
        for rate in args.rates:
            profile = calibrate(loaded, x_def, y_def, settings=CalibrationSettings(demote_rate=rate, seed=seed),
                                progress=False)
            off = dataclasses.replace(profile, thresholds=dataclasses.replace(profile.thresholds, demote=math.inf))
            row: dict[str, object] = {"attack": attack_name, "arch": args.arch, "seed": seed, "rate": rate}
            guards = {"off": Guard(loaded, off, threads=1), "default": Guard(loaded, profile, threads=1)}
            for variant, guard in guards.items():
                row[f"ca_{variant}"] = _share(guard.predict(x_meas).labels, y_meas)
                if x_trig is not None:
                    row[f"asr_{variant}"] = _share(guard.predict(x_trig).labels, TARGET)
            # Demoting every extreme request whose re-prediction agrees, without the margin proviso.
            for key, x, want in (("ca_no_proviso", x_meas, y_meas), ("asr_no_proviso", x_trig, TARGET)):
                if x is None:
                    continue
                result = guards["off"].predict(x)
                extreme = (result.labels == result.model_labels) & (result.score > profile.thresholds.demote)
                runner_up = result.logits.copy()
                runner_up[np.arange(len(x)), result.model_labels] = -np.inf
                row[key] = _share(np.where(extreme, runner_up.argmax(axis=1), result.labels), want)
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
