"""Compare calibration settings side by side on data outside the evaluation split, and print what each gives.

The models and data are `tools.tuning`'s (the eval recipe with seeds the eval never uses; the defender's clean set
and the measuring set from training-split images outside the model's training subset). Each variant is a JSON
object of CalibrationSettings fields; every variant calibrates the same model on the same images, and the guard's
clean accuracy, clean flag rate, attack success and detection AUROC are printed per variant:

    python -m tools.compare_settings --arch resnet --attacks blend wanet --seeds 10 11 12 \\
        --variant single='{"dense_part": false}' --variant parts='{}'

A variant whose `suspect` is "scan" takes the class `guard scan` suspects on that model, and its candidate triggers
for the reference to unlearn (as `guard calibrate` does by default; the scan runs once per model, at the eval's 150
steps):

    python -m tools.compare_settings --variant plain='{}' --variant scan='{"suspect": "scan"}'

Such a variant may also set the scan's `fill_candidates` (ScanSettings), which only changes the candidates of a
model whose scan names none:

    python -m tools.compare_settings --variant top2='{"suspect": "scan", "fill_candidates": 2}' ...

or leave out the warp that the scan's warp scan names (`"warp_scan": false`), to measure what unlearning it gives:

    python -m tools.compare_settings --variant stamps='{"suspect": "scan", "warp_scan": false}' \\
        --variant warps='{"suspect": "scan"}'

(and `"blend_scan": false` likewise leaves out the blend that the blend scan names), or give the named warp's
class an overrule threshold of its own (`warp_overrule_rate`, docs/design.md):

    python -m tools.compare_settings --attacks wanet clean --variant default='{"suspect": "scan"}' \\
        --variant warp='{"suspect": "scan", "warp_overrule_rate": 0.5}'
"""

from __future__ import annotations

import json
from dataclasses import replace

from guard.calibrate.pipeline import CalibrationSettings, calibrate
from guard.eval.metrics import auroc
from guard.eval.suite import TARGET
from guard.runtime.guard import Guard
from guard.scan import ScanSettings, run_scan
from tools.tuning import comparison_args, comparison_cases


def main() -> None:
    args = comparison_args(__doc__.splitlines()[0], ["blend", "source-specific", "clean"], "CalibrationSettings")
    for seed, attack_name, case in comparison_cases(args):
        loaded = case.loaded()
        row: dict[str, object] = {"arch": args.arch, "attack": attack_name, "seed": seed}
        if any(fields.get("suspect") == "scan" for _, fields in args.variant):
            scan = run_scan(loaded, case.x_def, case.y_def, settings=ScanSettings(steps=150, seed=seed))
            row["scan_suspect"] = scan.classes.suspect
            row["scan_candidates"] = [t.target for t in scan.candidates]
            row["warp_suspect"] = None if scan.warps is None else scan.warps.suspect
            row["warp_success"] = None if scan.warps is None else [round(v, 3) for v in scan.warps.success.tolist()]
            row["blend_suspect"] = None if scan.blends is None else scan.blends.suspect
            row["blend_success"] = (None if scan.blends is None
                                    else [round(v, 3) for v in scan.blends.success.tolist()])
        for name, fields in args.variant:
            triggers = []
            if fields.get("suspect") == "scan":
                fields = {**fields, "suspect": row["scan_suspect"]}
                fill = fields.pop("fill_candidates", scan.settings.fill_candidates)
                warps = scan.warps if fields.pop("warp_scan", True) else None
                blends = scan.blends if fields.pop("blend_scan", True) else None
                triggers = replace(scan, settings=replace(scan.settings, fill_candidates=fill), warps=warps,
                                   blends=blends).candidates
                row[f"{name}_unlearned"] = [t.target for t in triggers]
            settings = CalibrationSettings(**{"seed": seed, **fields})
            profile = calibrate(loaded, case.x_def, case.y_def, settings=settings, triggers=triggers)
            guard = Guard(loaded, profile, threads=1)
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
