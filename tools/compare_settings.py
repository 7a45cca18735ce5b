"""Compare calibration settings side by side on data outside the evaluation split, and print what each gives.

The models and data are `tools.tuning`'s (the eval recipe with seeds the eval never uses; the defender's clean set
and the measuring set from training-split images outside the model's training subset). Each variant is a JSON
object of CalibrationSettings fields; every variant calibrates the same model on the same images, and the guard's
clean accuracy, clean flag rate, attack success and detection AUROC are printed per variant:

    python -m tools.compare_settings --arch resnet --attacks blend wanet --seeds 10 11 12 \\
        --variant single='{"dense_part": false}' --variant parts='{}'
"""

from __future__ import annotations

import argparse
import json

import torch

from guard.calibrate.pipeline import CalibrationSettings, calibrate
from guard.eval.datasets import load_fashion_mnist
from guard.eval.metrics import auroc
from guard.eval.suite import TARGET
from guard.runtime.guard import Guard
from tools.tuning import tuning_case


def _variant(text: str) -> tuple[str, dict[str, object]]:
    name, _, settings = text.partition("=")
    if not name or not settings:
        raise argparse.ArgumentTypeError(f"a variant is NAME=JSON, got {text!r}")
    try:
        fields = json.loads(settings)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"variant {name!r}: {exc}") from None
    if not isinstance(fields, dict):
        raise argparse.ArgumentTypeError(f"variant {name!r} must be a JSON object")
    return name, fields


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="cnn")
    parser.add_argument("--attacks", nargs="+", default=["blend", "source-specific", "clean"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[10])
    parser.add_argument("--variant", type=_variant, action="append", required=True,
                        help="NAME=JSON of CalibrationSettings fields; give two or more")
    parser.add_argument("--measure", type=int, default=3000, help="measuring images per case")
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = load_fashion_mnist("train")
    for seed, attack_name in ((s, a) for s in args.seeds for a in args.attacks):
        case = tuning_case(args.arch, attack_name, seed, n_measure=args.measure, data=data)
        loaded = case.loaded()
        row: dict[str, object] = {"arch": args.arch, "attack": attack_name, "seed": seed}
        for name, fields in args.variant:
            settings = CalibrationSettings(**{"seed": seed, **fields})
            guard = Guard(loaded, calibrate(loaded, case.x_def, case.y_def, settings=settings), threads=1)
            clean = guard.predict(case.x_meas)
            figures = {"ca": float((clean.labels == case.y_meas).mean()), "flagged": float(clean.flagged.mean())}
            if case.x_trig is not None:
                triggered = guard.predict(case.x_trig)
                figures["asr"] = float((triggered.labels == TARGET).mean())
                figures["auroc"] = auroc(clean.score, triggered.score)
            row[name] = {key: round(value, 4) for key, value in figures.items()}
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
