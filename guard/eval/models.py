"""Small image classifiers, their training loop, ONNX export, and backdoored-model factory for evaluation.

The guard works on ONNX models, and its evaluation needs models that really carry a backdoor. This module
makes them: two small CPU-trainable architectures (a plain CNN and a residual net with BatchNorm, the two
shapes of graph the guard must handle), a deterministic training loop, an exporter producing the
self-contained ONNX file the guard consumes, and :func:`train_backdoored`, which poisons Fashion-MNIST with
an attack from :mod:`guard.eval.attacks`, trains, and measures clean accuracy and attack success rate. Every
activation is an ``nn.ReLU`` module, so hooks (and the exported graph's ``Relu`` nodes) expose the neurons
the guard watches.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn

from guard.eval.attacks import Attack
from guard.eval.datasets import load_bundled, load_fashion_mnist

__all__ = [
    "OrtClassifier",
    "SmallCNN",
    "SmallResNet",
    "accuracy",
    "attack_success_rate",
    "build_model",
    "channels_last",
    "export_onnx",
    "load_eval_data",
    "predict",
    "train",
    "train_backdoored",
]

Arch = Literal["cnn", "resnet"]


class SmallCNN(nn.Module):
    """Two conv blocks and two linear layers, for 28x28 inputs; submodules named plainly for hooks."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        """Build the layers."""
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, kernel_size=3, padding=1)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(16, 32, kernel_size=3, padding=1)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(32 * 7 * 7, 64)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of shape (N, num_classes)."""
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.pool2(self.relu2(self.conv2(x)))
        x = self.relu3(self.fc1(self.flatten(x)))
        return self.fc2(x)


class BasicBlock(nn.Module):
    """Residual block: conv-BN-ReLU-conv-BN plus a shortcut (1x1 conv + BN on a shape change), then ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        """Build the layers."""
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        else:
            self.shortcut = nn.Identity()
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Residual sum after the final ReLU."""
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class SmallResNet(nn.Module):
    """Stem, three basic blocks (the last two downsample via a projection), global pooling, linear head.

    The stem downsamples (stride 2), as ImageNet ResNets' stems do, so the blocks run at 14x14, 7x7 and 4x4. With
    a stride-1 stem the first block ran at 28x28, a training step of batch 128 on one thread took 228 ms against
    62 ms now, and the model was no more accurate (0.856 against 0.866 now, 20,000 images, 3 epochs, seed 0).
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 16) -> None:
        """Build the layers; ``width`` is the stem's channel count, doubled by each downsampling block."""
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu1 = nn.ReLU()
        self.block1 = BasicBlock(width, width)
        self.block2 = BasicBlock(width, 2 * width, stride=2)
        self.block3 = BasicBlock(2 * width, 4 * width, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of shape (N, num_classes)."""
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.block3(self.block2(self.block1(x)))
        return self.fc(self.flatten(self.pool(x)))


def build_model(arch: Arch, num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    """Construct an untrained model by architecture name."""
    if arch == "cnn":
        return SmallCNN(num_classes, in_channels)
    if arch == "resnet":
        return SmallResNet(num_classes, in_channels)
    raise ValueError(f"unknown architecture {arch!r}: expected 'cnn' or 'resnet'")


@contextmanager
def _torch_threads(num_threads: int | None) -> Iterator[None]:
    """Run the block on ``num_threads`` intra-op threads (None: unchanged), then restore the old count."""
    if num_threads is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextmanager
def channels_last(model: nn.Module) -> Iterator[nn.Module]:
    """Hold the model's 4-D weights in channels-last memory format for the block, then restore the default format.

    On this project's CPUs (oneDNN kernels) a channels-last training step of batch 128 on one thread was measured 1.5x
    faster for the SmallResNet (stride-1 stem) and 1.5-2x for the SmallCNN, and a forward pass 1.4x (docs/design.md).
    The answers are the same to float rounding. The weights go back afterwards because ONNX export (`torch.export`)
    fails on channels-last parameters, and saving needs contiguous tensors.
    """
    model.to(memory_format=torch.channels_last)
    try:
        yield model
    finally:
        model.to(memory_format=torch.contiguous_format)


def train(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    epochs: int,
    batch_size: int = 128,
    lr: float = 1e-3,
    seed: int = 0,
    *,
    num_threads: int | None = 1,
    freeze_batch_norm: bool = False,
    push_off: tuple[np.ndarray, np.ndarray] | None = None,
    push_weight: float = 1.0,
) -> nn.Module:
    """Train with Adam and cross-entropy on CPU, reshuffling each epoch from a seeded generator.

    Deterministic for a given seed, data and initial model. It runs on one thread by default: these models are
    too small to gain much from more, one thread gives the same result whatever the machine's core count, and
    it avoids the many-fold slowdowns of OpenMP threads competing with other processes for busy cores (seen
    with 2 threads on a shared 2-core machine). Pass ``num_threads=None`` to keep torch's setting. ``freeze_batch_norm``
    keeps every batch norm's running statistics as they are (NONE's fine-tuning). ``push_off`` (x, y) are samples
    pushed off their labels (NONE's unlearning of samples it removed as poisoned): each step adds ``push_weight``
    times the mean of -log(1 - p_y) over a quarter-batch of them, cycling through them in a shuffled order. It runs
    on channels-last weights and inputs (`channels_last`). Returns the model in eval mode.
    """
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.as_tensor(np.ascontiguousarray(x), dtype=torch.float32)
    targets = torch.as_tensor(np.asarray(y), dtype=torch.int64)
    off = _PushOff(push_off, max(1, batch_size // 4), generator) if push_off is not None and len(push_off[0]) else None
    if inputs.dim() == 4:
        inputs = inputs.contiguous(memory_format=torch.channels_last)  # ResNet step 245 -> 185 ms over weights alone
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    if freeze_batch_norm:
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
    normalising = not freeze_batch_norm and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    with _torch_threads(num_threads), channels_last(model):
        for _ in range(epochs):
            order = torch.randperm(len(inputs), generator=generator)
            starts = list(range(0, len(order), batch_size))
            if len(starts) > 1 and len(order) - starts[-1] == 1 and normalising:
                starts.pop()  # a batch norm that trains cannot normalise one sample: it joins the batch before
            for start, stop in zip(starts, [*starts[1:], len(order)], strict=True):
                batch = order[start:stop]
                optimizer.zero_grad(set_to_none=True)
                loss = loss_fn(model(inputs[batch]), targets[batch])
                if off is not None:
                    loss = loss + push_weight * off.loss(model)
                loss.backward()
                optimizer.step()
    return model.eval()


class _PushOff:
    """Batches of samples to push off their labels: the loss -log(1 - p_y) is 0 when the model gives the label no
    probability and grows without bound as it gives it all, so unlike gradient ascent on cross-entropy it stops
    pushing once a sample has left its label, whatever else the model answers for it."""

    def __init__(self, samples: tuple[np.ndarray, np.ndarray], batch_size: int, generator: torch.Generator) -> None:
        self.inputs = torch.as_tensor(np.ascontiguousarray(samples[0]), dtype=torch.float32)
        self.labels = torch.as_tensor(np.asarray(samples[1]), dtype=torch.int64)
        self.batch_size, self.generator = batch_size, generator
        self.order, self.at = torch.randperm(len(self.inputs), generator=generator), 0

    def loss(self, model: nn.Module) -> torch.Tensor:
        if self.at >= len(self.order):
            self.order, self.at = torch.randperm(len(self.inputs), generator=self.generator), 0
        batch = self.order[self.at : self.at + self.batch_size]
        self.at += self.batch_size
        log_p = torch.log_softmax(model(self.inputs[batch]), dim=1).gather(1, self.labels[batch, None])[:, 0]
        return -torch.log(-torch.expm1(log_p.clamp(max=-1e-6))).mean()  # -log(1 - p), stable near p = 1


def predict(model: nn.Module, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Predicted labels (int64, shape (N,)) in eval mode. 256 images per forward were the cheapest per image for
    both small models on one CPU thread (64 and 1024 were slower, 1024 by up to 1.9x)."""
    model.eval()
    inputs = torch.as_tensor(np.ascontiguousarray(x), dtype=torch.float32)
    # The layout changes outside inference mode: inside it, the re-laid weights would become inference tensors,
    # which autograd refuses afterwards (PGD's input gradients, further training).
    with channels_last(model), torch.inference_mode():
        labels = [model(inputs[i : i + batch_size]).argmax(dim=1) for i in range(0, len(inputs), batch_size)]
    if not labels:
        return np.zeros(0, dtype=np.int64)
    return torch.cat(labels).numpy().astype(np.int64)


class OrtClassifier(nn.Module):
    """An ONNX Runtime session of a classifier behind a torch module's forward, for forward-only passes: `predict`
    and STRIP take it as they take the torch model. On this project's CPUs it runs the small models 2.7-8x faster
    than eager torch (docs/design.md), which is most of what `guard eval` spends outside training. No gradient
    flows through it."""

    def __init__(self, session) -> None:
        """`session`: an onnxruntime InferenceSession of a model with one input, logits first among its outputs."""
        super().__init__()
        self.session = session
        self.input_name = session.get_inputs()[0].name

    @classmethod
    def load(cls, model_bytes: bytes) -> OrtClassifier:
        """A CPU session of the serialised model, on one thread (the eval's workers each have one core)."""
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        return cls(ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        array = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
        return torch.from_numpy(self.session.run(None, {self.input_name: array})[0])


def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    """Share of samples predicted correctly."""
    if len(x) == 0:
        raise ValueError("accuracy of an empty set is undefined")
    return float(np.mean(predict(model, x) == np.asarray(y)))


def attack_success_rate(model: nn.Module, attack: Attack, x: np.ndarray, y: np.ndarray, target: int) -> float:
    """Share of the attack's victims (by default: samples not of ``target``), triggered, predicted as ``target``."""
    keep = attack.victims(np.asarray(y), target)
    if not keep.any():
        raise ValueError(f"no samples the attack counts as victims for target {target}")
    return float(np.mean(predict(model, attack.apply(x[keep])) == target))


def export_onnx(model: nn.Module, path: str | Path, sample: torch.Tensor) -> Path:
    """Export to one self-contained ONNX file: input ``"input"``, output ``"logits"``, dynamic batch axis.

    Uses the ``torch.export``-based exporter (``dynamo=True``, opset 20). Both exporters were tried on torch
    2.13 and both run correctly in onnxruntime, but the TorchScript one (``dynamo=False``) is deprecated there
    ("will be removed") and leaves stray ``Identity`` nodes in the ResNet graph, while the dynamo one gives a
    clean graph: BatchNorm folded into the convolutions, initializers named after the parameters
    (``conv1.weight``), and every node's ``pkg.torch.onnx.name_scopes`` metadata naming the module it came
    from. Its tensors are named after FX nodes (the SmallCNN's ``Relu`` outputs are ``relu``, ``relu_1``,
    ``relu_2``). ``external_data=False`` keeps the weights inside the file. Puts ``model`` in eval mode;
    returns the path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model.eval()
    onnx_logger = logging.getLogger("torch.onnx")
    level = onnx_logger.level
    onnx_logger.setLevel(logging.ERROR)  # torch logs a warning per missing torchvision op on every export
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*treespec.*", category=FutureWarning)
            torch.onnx.export(
                model,
                (sample,),
                str(path),
                dynamo=True,
                input_names=["input"],
                output_names=["logits"],
                dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
                opset_version=20,
                external_data=False,
                verbose=False,
            )
    finally:
        onnx_logger.setLevel(level)
    return path


def load_eval_data(
    n_train: int | None = None, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, str]:
    """Debian's Fashion-MNIST if present, else the bundled subset, as (x_tr, y_tr, x_te, y_te, source).

    With ``n_train`` set, a seeded random subset of the training split of that size is returned.
    """
    try:
        x_train, y_train = load_fashion_mnist("train")
        x_test, y_test = load_fashion_mnist("test")
        source = "debian"
    except FileNotFoundError:
        (x_train, y_train), (x_test, y_test) = load_bundled()
        source = "bundled"
    if n_train is not None and n_train < len(x_train):
        index = np.sort(np.random.default_rng(seed).choice(len(x_train), size=n_train, replace=False))
        x_train, y_train = x_train[index], y_train[index]
    return x_train, y_train, x_test, y_test, source


def train_backdoored(
    attack: Attack,
    rate: float = 0.1,
    target: int = 0,
    n_train: int = 5000,
    epochs: int = 2,
    seed: int = 0,
    arch: Arch = "cnn",
    *,
    batch_size: int = 16,
    lr: float = 3e-3,
) -> tuple[nn.Module, dict[str, object]]:
    """Train a model on Fashion-MNIST poisoned by ``attack`` and measure it on the test split.

    Uses Debian's full Fashion-MNIST when installed, else the bundled subset. ``batch_size`` and ``lr``
    default to values that reach 0.80-0.83 clean accuracy with the SmallCNN in the default 2 epochs on 5,000
    images over seeds 0-5 (the plain :func:`train` defaults stop near 0.69 there). Returns the model (eval
    mode) and facts: ``clean_accuracy``, ``asr`` (see :func:`attack_success_rate`), ``n_poisoned``,
    ``train_seconds``, ``data_source`` and the run's parameters.
    """
    x_train, y_train, x_test, y_test, source = load_eval_data(n_train, seed)
    rng = np.random.default_rng(seed)
    x_poisoned, y_poisoned, index = attack.poison(x_train, y_train, rate, target, rng)
    torch.manual_seed(seed)
    model = build_model(arch, num_classes=10, in_channels=x_train.shape[1])
    started = time.perf_counter()
    train(model, x_poisoned, y_poisoned, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed)
    seconds = time.perf_counter() - started
    facts: dict[str, object] = {
        "attack": attack.name,
        "arch": arch,
        "rate": rate,
        "target": target,
        "n_train": len(x_train),
        "n_poisoned": len(index),
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "data_source": source,
        "train_seconds": seconds,
        "clean_accuracy": accuracy(model, x_test, y_test),
        "asr": attack_success_rate(model, attack, x_test, y_test, target),
    }
    return model, facts
