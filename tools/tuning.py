"""The models and data the tuning tools share: `guard eval`'s recipe (20k training images, 3 epochs) with seeds the
eval never uses, and the defender's clean set and the measuring set drawn from training-split images outside the
model's training subset, so nothing touches the test split `guard eval` reports on."""

from __future__ import annotations

import tempfile
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
