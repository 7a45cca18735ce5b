"""Tune `guard repair`'s settings on data outside the evaluation split, and print what each variant gives.

The models follow `guard eval`'s recipe (20k training images, 3 epochs) but with seeds the eval never uses; the
defender's clean set and the measuring set are training-split images outside the model's training subset, so
nothing here touches the test split `guard eval` reports on.

    python -m tools.tune_repair --arch cnn --attacks badnets blend clean --seeds 10 11
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace

import numpy as np
import onnxruntime as ort
import torch

from guard.calibrate.synthesis import Trigger
from guard.eval.datasets import load_fashion_mnist
from guard.eval.models import export_onnx
from guard.eval.suite import ATTACKS, TARGET
from guard.model.graph import load_model
from guard.repair.adaptive_reg import RepairSettings, repair
from guard.scan import ScanSettings, run_scan
from tools.tuning import tuning_case

VARIANTS: dict[str, dict[str, object]] = {
    "default": {"candidates": "scan"},  # the scan's own candidates, as `guard repair --scan` unlearns
    "constant-3e-3": {"schedule": "constant", "lr": 3e-3, "backoffs": 0},  # the defaults before tuning
    "cosine": {"lr": 3e-3, "backoffs": 0},
    "cosine-15": {"lr": 3e-3, "epochs": 15, "backoffs": 0},
    "cosine-unlearn0.3": {"lr": 3e-3, "unlearn_share": 0.3, "backoffs": 0},
    "cosine-lr5e-3": {"backoffs": 0},
    "cosine-lr5e-3-15": {"epochs": 15, "backoffs": 0},
    "cosine-lr5e-3-unlearn0.4": {"unlearn_share": 0.4, "backoffs": 0},
    "cosine-lr5e-3-gap0.2": {"gap_share": 0.2, "backoffs": 0},
    "cosine-lr1e-2": {"lr": 1e-2, "backoffs": 0},
    "cosine-15-unlearn0.4": {"lr": 3e-3, "epochs": 15, "unlearn_share": 0.4, "backoffs": 0},
    # A floor under the cosine (a share of the starting rate), with the default back-offs.
    "floor0.2": {"lr_floor": 0.2, "candidates": 1.0},
    "floor0.5": {"lr_floor": 0.5, "candidates": 1.0},
    # Which of the scan's triggers AR unlearns: classes whose anomaly index reaches this floor (None: the suspect
    # only, "all": every class).
    "suspect-only": {"candidates": None},
    "index1": {"candidates": 1.0},
    "index1.5": {"candidates": 1.5},
    "index0.5": {"candidates": 0.5},
    "all": {"candidates": "all"},
    # The held-out check's back-off: off, or only for a fall this many standard errors of the paired difference.
    "index1-nobackoff": {"candidates": 1.0, "backoffs": 0},
    "index1-z0": {"candidates": 1.0, "backoff_z": 0.0},  # the default before: any fall past the bound
    "index1-z1.64": {"candidates": 1.0, "backoff_z": 1.645},
    # A lower starting rate, for the stride-2-stem SmallResNet.
    "index1-lr3e-3": {"candidates": 1.0, "lr": 3e-3},
    "index1-lr2e-3": {"candidates": 1.0, "lr": 2e-3},
    "index0.5-lr3e-3": {"candidates": 0.5, "lr": 3e-3},
    "index1-lr2e-3-20": {"candidates": 1.0, "lr": 2e-3, "epochs": 20},
    "index1-lr3e-3-unlearn0.4": {"candidates": 1.0, "lr": 3e-3, "unlearn_share": 0.4},
    "index1-lr2e-3-unlearn0.4": {"candidates": 1.0, "lr": 2e-3, "unlearn_share": 0.4},
    "index1-lr3e-3-strength4": {"candidates": 1.0, "lr": 3e-3, "strength": 4.0},
    "index0.5-lr2e-3-unlearn0.4": {"candidates": 0.5, "lr": 2e-3, "unlearn_share": 0.4},
    # A diagnosis, not a setting a user has: unlearn the attack's real trigger in place of the scan's (fixed stamps
    # only: BadNets, source-specific, blend), to tell a poor synthesised trigger from unlearning that falls short.
    "true-trigger": {"candidates": "true"},
    # Where no class reaches the floor, the this-many most anomalous classes (ScanSettings.fill_candidates).
    "index1-fill2": {"candidates": 1.0, "fill": 2},
    "index1-fill3": {"candidates": 1.0, "fill": 3},
    # The infected channels judged at the last four conv activations, as calibration taps them (AR's default: two).
    "index1-fill2-taps4": {"candidates": 1.0, "fill": 2, "conv_taps": 4},
}


def _true_trigger(attack_name: str, shape: tuple[int, ...]) -> Trigger:
    """The attack's own trigger as a `Trigger` (x -> (1 - mask) * x + mask * pattern), read off its stamps on an
    all-zeros and an all-ones image; refused for triggers that are not one fixed stamp (warps, moving patches)."""
    attack = ATTACKS[attack_name].make()
    if attack is None:
        raise SystemExit(f"{attack_name} has no trigger to unlearn")
    zeros, ones = np.zeros((1, *shape), np.float32), np.ones((1, *shape), np.float32)
    on_zeros, on_ones = attack.apply(zeros)[0], attack.apply(ones)[0]
    mask = 1.0 - (on_ones - on_zeros)  # per pixel and channel
    probe = np.random.default_rng(0).random((1, *shape), dtype=np.float32)
    pattern = np.divide(on_zeros, mask, out=np.zeros_like(mask), where=mask > 0)
    stamped = attack.apply(probe, np.random.default_rng(1))[0]  # another draw: a moving patch moves
    if not (np.allclose(mask, mask[:1]) and np.allclose(stamped, (1 - mask) * probe[0] + mask * pattern, atol=1e-5)):
        raise SystemExit(f"{attack_name}'s trigger is not one fixed stamp")
    return Trigger(target=TARGET, mask=mask[:1], pattern=pattern, success=1.0, mask_l1=float(mask[0].sum()))


def _answers(session: ort.InferenceSession, name: str, x: np.ndarray) -> np.ndarray:
    return session.run(None, {name: x})[0].argmax(axis=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="cnn", choices=["cnn", "resnet"])
    parser.add_argument("--attacks", nargs="+", default=["badnets", "blend", "clean"], choices=list(ATTACKS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[10])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = load_fashion_mnist("train")
    for seed, attack_name in ((s, a) for s in args.seeds for a in args.attacks):
        case = tuning_case(args.arch, attack_name, seed, n_measure=5000, data=data)
        module, x_def, y_def, x_meas, y_meas, x_trig = (case.module, case.x_def, case.y_def, case.x_meas, case.y_meas,
                                                        case.x_trig)
        path = export_onnx(module, f"/tmp/tune-{args.arch}-{attack_name}.onnx", torch.zeros(1, *x_def.shape[1:]))
        loaded = load_model(path)
        scan = run_scan(loaded, x_def, y_def, settings=ScanSettings(seed=seed))
        base = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        ca0 = float((_answers(base, loaded.input_name, x_meas) == y_meas).mean())
        asr0 = None if x_trig is None else float((_answers(base, loaded.input_name, x_trig) == TARGET).mean())
        print(json.dumps({"attack": attack_name, "arch": args.arch, "seed": seed, "variant": "none", "ca": ca0, "asr": asr0,
                          "suspect": scan.classes.suspect,
                          "index": [round(float(v), 2) for v in scan.classes.anomaly_index]}), flush=True)
        for variant in args.variants:
            knobs = dict(VARIANTS[variant])
            floor = knobs.pop("candidates", None)
            fill = int(knobs.pop("fill", 0))
            index = scan.classes.anomaly_index
            if floor == "true":
                triggers = [_true_trigger(attack_name, x_def.shape[1:])]
            elif floor == "scan":
                triggers = list(scan.candidates)
            elif floor is None:
                triggers = [] if scan.suspect is None else [scan.suspect]
            else:
                chosen = range(len(index)) if floor == "all" else np.flatnonzero(index >= floor)
                if not len(chosen):
                    chosen = np.argsort(-index, kind="stable")[:fill]
                triggers = [scan.classes.triggers[int(k)] for k in chosen]
            settings = replace(RepairSettings(method="ar", seed=seed), **knobs)
            started = time.perf_counter()
            repaired, report = repair(loaded, x_def, y_def, settings=settings, triggers=triggers)
            session = ort.InferenceSession(repaired.SerializeToString(), providers=["CPUExecutionProvider"])
            ca = float((_answers(session, loaded.input_name, x_meas) == y_meas).mean())
            asr = None if x_trig is None else float((_answers(session, loaded.input_name, x_trig) == TARGET).mean())
            print(json.dumps({"attack": attack_name, "arch": args.arch, "seed": seed, "variant": variant, "ca": ca, "asr": asr,
                              "ca_loss": round(ca0 - ca, 4), "unlearned": [t.target for t in triggers], "lr_used": report.lr_used, "attempts": report.attempts,
                              "seconds": round(time.perf_counter() - started, 1)}),
                  flush=True)


if __name__ == "__main__":
    main()
