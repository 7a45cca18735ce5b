"""Published defenses the guard is compared against in the same run: fine-pruning and STRIP.

The evaluation (EVALUATION.md, "Baselines in the same run") reports the guard next to the defenses a reader
would try first, on the very same backdoored models and clean data, so that a gain is measured rather than
claimed. Both baselines here work on the PyTorch module directly, not on the ONNX file:

* :func:`fine_prune` (Liu et al., 2018, "Fine-Pruning") is a model repair. It ranks the channels of the last
  convolutional activation by their mean activation over the defender's clean set and zeroes the dormant ones,
  on the theory that a backdoor hides in neurons clean inputs leave idle. The paper's fine-tuning step is left
  out, as EVALUATION.md defines the baseline; the evaluation's fine-tuning row (`guard repair --method finetune`
  on the same clean set) is that step on its own, and the report names where it beats guard's default.
* :class:`Strip` (Gao et al., 2019, "STRIP") is an input detector. It blends the input with clean images and
  measures the entropy of the predictions: a trigger keeps dominating the blend, so a triggered input stays
  confidently on the target class (low entropy) where a clean input's prediction scatters (high entropy). Its
  cost is one forward per overlay, which is why the evaluation times it against a plain forward.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

__all__ = ["FinePruning", "Strip", "fine_prune", "last_conv_activation"]

#: The buffer :func:`fine_prune` registers on the pruned layer of its copy: 1 keeps a channel, 0 prunes it.
MASK_BUFFER = "prune_mask"


def _is_activation(module: nn.Module) -> bool:
    """True for torch's activation modules (ReLU, GELU, SiLU, ...): the neurons that pruning targets."""
    return type(module).__module__ == nn.modules.activation.__name__


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Run the block in eval mode (BatchNorm statistics untouched), then restore the model's training flag."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer, CPU for a model with neither."""
    for tensor in [*model.parameters(), *model.buffers()]:
        return tensor.device
    return torch.device("cpu")


def last_conv_activation(model: nn.Module, sample_shape: tuple[int, ...]) -> str:
    """Name of the last activation submodule whose output is a (N, C, H, W) map, found by a dry run.

    ``sample_shape`` is one sample's shape, (C, H, W) (a leading batch axis is accepted too). Pools and
    container blocks also return 4-D maps, after the activation, but the channels fine-pruning ranks are
    neurons, so only activation modules (``nn.ReLU`` and the rest of ``torch.nn.modules.activation``) are
    candidates: ``relu2`` for :class:`~guard.eval.models.SmallCNN`, ``block3.relu2`` for
    :class:`~guard.eval.models.SmallResNet`. The run is in eval mode without gradients, and its hooks are
    removed afterwards. Raises ValueError when no activation produces a 4-D output.
    """
    shape = tuple(sample_shape) if len(sample_shape) == 4 else (1, *sample_shape)
    order: list[str] = []
    handles = []
    for name, module in model.named_modules():
        if name and _is_activation(module):

            def record(_module: nn.Module, _inputs: object, output: object, name: str = name) -> None:
                if isinstance(output, torch.Tensor) and output.dim() == 4:
                    order.append(name)

            handles.append(module.register_forward_hook(record))
    try:
        with _eval_mode(model), torch.no_grad():
            model(torch.zeros(shape, device=_model_device(model)))
    finally:
        for handle in handles:
            handle.remove()
    if not order:
        raise ValueError("no activation submodule produces a (N, C, H, W) output")
    return order[-1]


def _apply_prune_mask(module: nn.Module, _inputs: object, output: torch.Tensor) -> torch.Tensor:
    """Forward hook: zero the pruned channels of ``output`` (a module-level function so copies can pickle)."""
    mask = getattr(module, MASK_BUFFER)
    return output * mask.view(1, -1, *([1] * (output.dim() - 2)))


@dataclass(frozen=True)
class FinePruning:
    """Outcome of :func:`fine_prune`; ``model`` is the pruned copy, the input model is left as it was."""

    model: nn.Module
    layer: str
    pruned: np.ndarray  # channel indices, in pruning order (ascending mean activation)
    accuracy_before: float  # on the clean set used for the pruning
    accuracy_after: float
    mean_activation: np.ndarray = field(repr=False)  # (C,) over the clean set, before pruning
    accuracies: np.ndarray = field(repr=False)  # clean accuracy with k channels pruned, k = 0, 1, ... scanned


def fine_prune(
    model: nn.Module,
    x_clean: np.ndarray,
    y_clean: np.ndarray,
    layer: str | None = None,
    budget: float = 0.01,
    batch_size: int = 512,
) -> FinePruning:
    """Prune the least active channels of ``layer`` while clean accuracy stays within ``budget`` of the start.

    Channels are ranked by mean activation (over samples and positions) on the clean set, ascending, and
    pruned one at a time in that order, exactly as Liu et al. do; the scan stops at the first prefix whose
    accuracy is more than ``budget`` below the unpruned accuracy and keeps the prefix before it. Clean
    accuracy is not monotone in the number of pruned channels, so a binary search would land on an arbitrary
    crossing, and the longest prefix within budget anywhere could skip a prefix that already broke it; the
    linear scan is faithful and cheap here (at most C + 1 batched forwards of the clean set, C <= 64 for the
    eval models, and it usually stops early). ``layer`` defaults to :func:`last_conv_activation`.

    Pruning is a forward hook on a deep copy that multiplies the layer's output by a 0/1 buffer
    (:data:`MASK_BUFFER`): exact for any architecture, unlike zeroing weights, which misses a residual sum.
    The copy is usable with :func:`guard.eval.models.predict`; its ``state_dict`` carries the extra buffer. If
    ``layer`` is one module called several times per forward, every call is masked.
    """
    x_clean = np.ascontiguousarray(x_clean, dtype=np.float32)
    y_clean = np.asarray(y_clean, dtype=np.int64)
    if len(x_clean) == 0 or len(x_clean) != len(y_clean):
        raise ValueError(f"need a non-empty clean set with one label per image, got {len(x_clean)} images "
                         f"and {len(y_clean)} labels")
    if not 0.0 <= budget < 1.0:
        raise ValueError(f"budget must be in [0, 1), got {budget}")
    if layer is None:
        layer = last_conv_activation(model, x_clean.shape[1:])
    pruned_model = copy.deepcopy(model).eval()
    target = pruned_model.get_submodule(layer)
    if hasattr(target, MASK_BUFFER):
        raise ValueError(f"layer {layer!r} is already pruned (it has a {MASK_BUFFER!r} buffer)")
    device = _model_device(pruned_model)
    inputs = torch.as_tensor(x_clean)
    labels = torch.as_tensor(y_clean)

    sums: list[torch.Tensor] = []
    counts: list[int] = []

    def accumulate(_module: nn.Module, _inputs: object, output: torch.Tensor) -> None:
        if output.dim() >= 2:
            sums.append(output.detach().double().sum(dim=(0, *range(2, output.dim()))))
            counts.append(output.numel() // output.shape[1])

    def clean_accuracy() -> float:
        correct = 0
        for start in range(0, len(inputs), batch_size):
            logits = pruned_model(inputs[start : start + batch_size].to(device))
            correct += int((logits.argmax(dim=1).cpu() == labels[start : start + batch_size]).sum())
        return correct / len(inputs)

    with torch.no_grad():
        handle = target.register_forward_hook(accumulate)
        try:
            accuracy_before = clean_accuracy()
        finally:
            handle.remove()
        if not sums:
            raise ValueError(f"layer {layer!r} produced no (N, C, ...) output on the clean set")
        mean_activation = (torch.stack(sums).sum(dim=0) / sum(counts)).cpu().numpy()
        order = np.argsort(mean_activation, kind="stable")

        mask = torch.ones(len(mean_activation), device=device)
        target.register_buffer(MASK_BUFFER, mask)
        target.register_forward_hook(_apply_prune_mask)
        accuracies = [accuracy_before]
        kept = 0
        for k in range(1, len(order) + 1):
            mask[order[k - 1]] = 0.0
            acc = clean_accuracy()
            accuracies.append(acc)
            if acc < accuracy_before - budget - 1e-12:
                mask[order[k - 1]] = 1.0
                break
            kept = k
    return FinePruning(
        model=pruned_model,
        layer=layer,
        pruned=order[:kept].astype(np.int64),
        accuracy_before=accuracy_before,
        accuracy_after=accuracies[kept],
        mean_activation=mean_activation,
        accuracies=np.asarray(accuracies),
    )


class Strip:
    """STRIP input detector (Gao et al., 2019): superimpose clean images, score by prediction entropy.

    Every input is blended with the same ``n_overlays`` clean images, drawn once from ``overlay_pool`` with
    ``seed`` (without replacement where the pool is big enough): scores are then reproducible, independent (up
    to float rounding) of how inputs are batched, and comparable across calls, where per-input draws as in the
    paper would add noise to each score. The blend is ``(1 - alpha) * x + alpha * overlay``. The score is the
    negative mean Shannon entropy (nats) of the softmax over the blends, so HIGHER means more suspicious, like
    the guard's scores.

    Construction only picks the overlays; all the work happens in :meth:`score` (``n_overlays`` forwards per
    input, batched ``batch_size`` images at a time, no loop per sample), so timing a call to ``score`` times
    STRIP. ``forwards_per_input`` and ``last_seconds`` (wall time of the latest ``score`` call) are there for
    the report. The default of 512 images per forward (8 inputs x 64 overlays) was the cheapest per image for
    the SmallCNN on one CPU thread; 1024 and more were 20-30 % slower.
    """

    def __init__(
        self,
        model: nn.Module,
        overlay_pool: np.ndarray,
        n_overlays: int = 64,
        alpha: float = 0.5,
        seed: int = 0,
        batch_size: int = 512,
    ) -> None:
        """Draw the overlays; ``overlay_pool`` is a clean (N, C, H, W) batch in [0, 1]."""
        pool = np.asarray(overlay_pool, dtype=np.float32)
        if pool.ndim != 4 or len(pool) == 0:
            raise ValueError(f"overlay_pool must be a non-empty (N, C, H, W) batch, got shape {pool.shape}")
        if n_overlays < 1:
            raise ValueError(f"n_overlays must be >= 1, got {n_overlays}")
        if not 0.0 < alpha < 1.0:
            raise ValueError(f"alpha must be in (0, 1), got {alpha}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.n_overlays = n_overlays
        self.alpha = alpha
        self.seed = seed
        self.batch_size = batch_size
        rng = np.random.default_rng(seed)
        self.overlay_index = rng.choice(len(pool), size=n_overlays, replace=n_overlays > len(pool))
        self._device = _model_device(model)
        # alpha * overlay is the same for every input: precompute it once.
        self._scaled_overlays = torch.as_tensor(alpha * pool[self.overlay_index], device=self._device)
        self.threshold: float | None = None
        self.last_seconds = 0.0

    @property
    def forwards_per_input(self) -> int:
        """Model forwards STRIP spends on one input (a plain prediction spends one)."""
        return self.n_overlays

    @torch.no_grad()
    def score(self, x: np.ndarray) -> np.ndarray:
        """Suspicion per input, shape (N,): minus the mean prediction entropy over the blends."""
        started = time.perf_counter()
        inputs = torch.as_tensor(np.ascontiguousarray(x, dtype=np.float32))
        if inputs.dim() != 4 or inputs.shape[1:] != self._scaled_overlays.shape[1:]:
            raise ValueError(f"expected a (N, {', '.join(map(str, self._scaled_overlays.shape[1:]))}) batch, "
                             f"got shape {tuple(inputs.shape)}")
        per_chunk = max(1, self.batch_size // self.n_overlays)  # inputs per forward of per_chunk * n images
        scores = []
        with _eval_mode(self.model):
            for start in range(0, len(inputs), per_chunk):
                chunk = inputs[start : start + per_chunk].to(self._device)
                blends = (1.0 - self.alpha) * chunk[:, None] + self._scaled_overlays[None]
                logits = self.model(blends.flatten(0, 1))
                log_p = torch.log_softmax(logits.float(), dim=1)
                entropy = -(log_p.exp() * log_p).sum(dim=1).view(len(chunk), self.n_overlays)
                scores.append(-entropy.mean(dim=1).cpu())
        result = torch.cat(scores).numpy() if scores else np.zeros(0, dtype=np.float32)
        self.last_seconds = time.perf_counter() - started
        return result

    def fit_threshold(self, x_clean: np.ndarray, fpr: float) -> float:
        """Set and return the threshold that flags at most ``fpr`` of ``x_clean`` (score strictly above it).

        It is the (1 - fpr) quantile of the clean scores, taken as an observed score ("higher" method) so that
        the share flagged on this set never exceeds ``fpr``, the same contract as the guard's threshold. Use
        clean images other than the overlay pool where possible: an image blended with itself looks triggered.
        """
        if not 0.0 < fpr < 1.0:
            raise ValueError(f"fpr must be in (0, 1), got {fpr}")
        scores = self.score(x_clean)
        if len(scores) == 0:
            raise ValueError("cannot fit a threshold on an empty set")
        self.threshold = float(np.quantile(scores, 1.0 - fpr, method="higher"))
        return self.threshold

    def flag(self, x: np.ndarray) -> np.ndarray:
        """Boolean (N,): True where the score is above the fitted threshold."""
        if self.threshold is None:
            raise RuntimeError("call fit_threshold before flag")
        return self.score(x) > self.threshold
