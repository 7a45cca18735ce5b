"""The models and data the tuning tools share: `guard eval`'s recipe (20k training images, 3 epochs) with seeds the
eval never uses, and the defender's clean set and the measuring set drawn from training-split images outside the
model's training subset, so nothing touches the test split `guard eval` reports on."""

from __future__ import annotations

import argparse
import json
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from guard.eval.datasets import load_fashion_mnist
from guard.eval.models import build_model, export_onnx, train
from guard.eval.suite import ATTACKS, TARGET
from guard.model.graph import LoadedModel, load_model


@dataclass
class TuningCase:
    module: torch.nn.Module  # trained on the (possibly poisoned) training subset
    x_def: np.ndarray  # the defender's clean set (1,000 images)
    y_def: np.ndarray
    x_meas: np.ndarray  # clean images to measure on
    y_meas: np.ndarray
    x_trig: np.ndarray | None  # the measuring set's victims with the trigger; None for the clean model
    x_train: np.ndarray  # the (possibly poisoned) training subset the module was trained on
    y_train: np.ndarray
    poisoned: np.ndarray  # (N,) bool over the training subset: the ground truth, for reports only

    def loaded(self) -> LoadedModel:
        """The trained module as the ONNX model guard calibrates and serves (the file is not kept)."""
        with tempfile.TemporaryDirectory() as tmp:
            return load_model(export_onnx(self.module, Path(tmp) / "model.onnx",
                                          torch.zeros(1, *self.x_def.shape[1:])))


def tuning_case(arch: str, attack_name: str, seed: int, n_measure: int,
                data: tuple[np.ndarray, np.ndarray] | None = None) -> TuningCase:
    """Train one model of the eval recipe and draw its data; `data` is the training split if already loaded."""
    x_all, y_all = data if data is not None else load_fashion_mnist("train")
    spec = ATTACKS[attack_name]
    attack = spec.make()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(x_all))
    train_idx, def_idx, meas_idx = np.sort(order[:20000]), order[20000:21000], order[21000:21000 + n_measure]
    x_train, y_train = x_all[train_idx], y_all[train_idx]
    poisoned = np.zeros(len(x_train), dtype=bool)
    if attack is not None:
        x_train, y_train, index = attack.poison(x_train, y_train, spec.rate, TARGET, rng)
        poisoned[index] = True
    torch.manual_seed(seed)
    module = build_model(arch)
    train(module, x_train, y_train, epochs=3, seed=seed)
    x_meas, y_meas = x_all[meas_idx], y_all[meas_idx]
    x_trig = None
    if attack is not None:
        victims = attack.victims(y_meas, TARGET)
        x_trig = attack.apply(x_meas[victims], np.random.default_rng(seed + 1))
    return TuningCase(module, x_all[def_idx], y_all[def_idx], x_meas, y_meas, x_trig, x_train, y_train, poisoned)


def variant(text: str) -> tuple[str, dict[str, object]]:
    """One `--variant NAME=JSON` argument: a name and the settings fields it changes."""
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


def comparison_args(description: str, attacks: list[str], settings_name: str) -> argparse.Namespace:
    """The command line the side-by-side tools share: architecture, attacks, seeds, variants, measuring images."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--arch", default="cnn", choices=["cnn", "resnet"])
    parser.add_argument("--attacks", nargs="+", default=attacks, choices=list(ATTACKS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[10])
    parser.add_argument("--variant", type=variant, action="append", required=True,
                        help=f"NAME=JSON of {settings_name} fields; give two or more")
    parser.add_argument("--measure", type=int, default=3000, help="measuring images per case")
    return parser.parse_args()


def comparison_cases(args: argparse.Namespace) -> Iterator[tuple[int, str, TuningCase]]:
    """Each (seed, attack, case) of `comparison_args`, trained one at a time on one thread."""
    torch.set_num_threads(1)
    data = load_fashion_mnist("train")
    for seed, attack_name in ((s, a) for s in args.seeds for a in args.attacks):
        yield seed, attack_name, tuning_case(args.arch, attack_name, seed, n_measure=args.measure, data=data)
