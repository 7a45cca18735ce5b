"""Measure NONE training variants side by side on data outside the evaluation split, and print what each gives.

The models and data are `tools.tuning`'s (the eval recipe with seeds the eval never uses). Each variant is a JSON
object of NoneSettings fields; every variant starts its rounds from the same normally trained model, as `guard eval`
does, and the clean accuracy and attack success on the measuring images, and the removed and pushed-off samples
against the ground truth, are printed per variant:

    python -m tools.tune_none --arch cnn --attacks badnets blend clean --seeds 10 11 12 \\
        --variant paper='{"unlearn": 0}' --variant default='{}'
"""

from __future__ import annotations

import copy
import json

import torch

from guard.eval.models import predict
from guard.eval.suite import TARGET
from guard.repair.none import NoneSettings, train_none
from tools.tuning import comparison_args, comparison_cases


def main() -> None:
    args = comparison_args(__doc__.splitlines()[0], ["badnets", "clean"], "NoneSettings")
    for seed, attack_name, case in comparison_cases(args):
        truth = case.poisoned if case.poisoned.any() else None
        row: dict[str, object] = {"arch": args.arch, "attack": attack_name, "seed": seed,
                                  "before": _measured(case.module, case)}
        for name, fields in args.variant:
            model = copy.deepcopy(case.module)
            report = train_none(model, case.x_train, case.y_train, pretrained=True, poisoned=truth,
                                settings=NoneSettings(**{"seed": seed, **fields}))
            pushed = [i for r in report.rounds for i in r.unlearned]
            row[name] = {**_measured(model, case), "removed": len(report.removed), "precision": report.precision,
                         "recall": report.recall, "pushed": len(pushed),
                         "pushed_precision": float(case.poisoned[pushed].mean()) if pushed and truth is not None
                         else None,
                         "split": [r.split for r in report.rounds],
                         "spread": [None if r.spread is None else round(r.spread, 3) for r in report.rounds],
                         "agreement": [None if r.agreement is None else round(r.agreement, 3) for r in report.rounds],
                         "contrast": [sorted(r.contrast.items(), key=lambda kv: -kv[1])[:3] for r in report.rounds],
                         "poisoned_classes": [r.poisoned_classes for r in report.rounds]}
        print(json.dumps(row, default=lambda v: round(float(v), 4)), flush=True)


def _measured(model: torch.nn.Module, case) -> dict[str, float]:
    figures = {"ca": float((predict(model, case.x_meas) == case.y_meas).mean())}
    if case.x_trig is not None:
        figures["asr"] = float((predict(model, case.x_trig) == TARGET).mean())
    return {key: round(value, 4) for key, value in figures.items()}


if __name__ == "__main__":
    main()
