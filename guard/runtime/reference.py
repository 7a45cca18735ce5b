"""The profile's reference at serve time: the model's graph with the profile's fine-tuned weights swapped in, the
disagreement past which its answer replaces the model's (guard.calibrate.reference fits both), the confirmation
that spares a demotion, and the model's lean towards a warp's class beyond the reference's, a part of the score."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from guard.errors import GuardError, ProfileError
from guard.model.graph import with_initializers

# The weights fine-tuning trains, by op: input indices of the weight and bias (a batch norm's scale and bias, not
# its running statistics). A reference may change these and nothing else.
TRAINED_INPUTS = {"Conv": (1, 2), "Gemm": (1, 2), "MatMul": (1,), "BatchNormalization": (1, 2)}


def trained_initializers(proto: onnx.ModelProto) -> list[str]:
    """Names of the initializers that are weights or biases of the model's linear layers and batch norms, in the
    order the graph uses them."""
    initializers = {init.name for init in proto.graph.initializer}
    names = (node.input[index] for node in proto.graph.node for index in TRAINED_INPUTS.get(node.op_type, ())
             if index < len(node.input))
    return list(dict.fromkeys(name for name in names if name in initializers))


def refuse_untrainable(proto: onnx.ModelProto, what: str) -> None:
    """A GuardError where no weight of a linear layer or batch norm is an initializer (Constant nodes hold them,
    say): a fine-tuning would have nothing to train, and failed with an empty optimiser after the run's minutes."""
    if not trained_initializers(proto):
        raise GuardError(f"{what} fine-tunes the weights of the model's {', '.join(TRAINED_INPUTS)} nodes, but none "
                         "of them is an initializer of the graph (Constant nodes hold them?): store the weights as "
                         "initializers")


def disagreement(reference_logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per row, how much more log-probability the reference gives its own answer than `labels` (the model's answer):
    0 where they agree."""
    logits = reference_logits.astype(np.float64)
    rows = np.arange(len(logits))
    return (logits.max(axis=1) - logits[rows, labels]).astype(np.float32)  # the softmax's normaliser cancels


def lean(model_logits: np.ndarray, reference_logits: np.ndarray, target: int) -> np.ndarray:
    """Per row, how much more probability the model gives `target` than the reference does. A warp trigger pulls the
    model towards its class even where it does not take, and the reference, which unlearned the warp, feels no pull;
    on clean requests the two give any class about the same probability."""
    return (_softmax(model_logits)[:, target] - _softmax(reference_logits)[:, target]).astype(np.float32)


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def confirms(reference_logits: np.ndarray, labels: np.ndarray, confirm: float | None) -> np.ndarray:
    """Per row, whether the reference gives `labels` (the model's answers) at least probability `confirm` (None:
    no row). The reference has unlearned the scan's candidate triggers and faded the rest, so an extreme request it
    still answers firmly as the model does is more likely an odd clean image than a trigger that took."""
    if confirm is None:
        return np.zeros(len(labels), dtype=bool)
    logits = reference_logits.astype(np.float64)
    top = logits.max(axis=1, keepdims=True)
    log_norm = top[:, 0] + np.log(np.exp(logits - top).sum(axis=1))
    return logits[np.arange(len(logits)), labels] - log_norm >= np.log(confirm)


def reference_model(original: onnx.ModelProto, weights: dict[str, np.ndarray]) -> onnx.ModelProto:
    """`original` with the reference's weights in place of its own. The weights come from a profile, which is
    untrusted: each must be a trained weight of the model (a linear layer's or a batch norm's weight or bias, never
    a shape, a scale or a running statistic) and keep its shape and dtype, finite."""
    initializers = {init.name: init for init in original.graph.initializer}  # read from the protos, not copied
    trained = set(trained_initializers(original))
    for name, value in weights.items():
        if name not in trained:
            raise ProfileError(f"the profile's reference changes {name!r}, which is not a trained weight of this "
                               "model (a linear layer's or batch norm's weight or bias)")
        shape = tuple(initializers[name].dims)
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(initializers[name].data_type))
        if value.shape != shape or value.dtype != dtype or not np.issubdtype(dtype, np.floating):
            raise ProfileError(f"the profile's reference weight {name!r} is {value.dtype}{list(value.shape)}; the "
                               f"model's is {dtype}{list(shape)}")
        if not np.isfinite(value).all():
            raise ProfileError(f"the profile's reference weight {name!r} is not finite")
    return with_initializers(original, weights)
