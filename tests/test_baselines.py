"""The baselines (fine-pruning, STRIP) on the session's genuinely backdoored BadNets SmallCNN.

Fine-pruning must respect its accuracy budget on the clean set, really zero the channels it reports, and leave
the model it was given alone. STRIP must separate triggered from clean images, honour the false-positive rate
it was fitted for, and give the same scores for the same seed. STRIP costs one forward per overlay, so its
tests use 32 overlays and a few hundred images to stay within seconds on one thread.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from guard.eval.baselines import MASK_BUFFER, FinePruning, Strip, fine_prune, last_conv_activation
from guard.eval.metrics import auroc
from guard.eval.models import OrtClassifier, SmallCNN, SmallResNet, accuracy, predict

BUDGET = 0.01
N_OVERLAYS = 32


def _has_hooks(model: torch.nn.Module) -> bool:
    return any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_last_conv_activation_names_and_leaves_model_alone() -> None:
    torch.manual_seed(0)
    cnn, resnet = SmallCNN(), SmallResNet().train()
    running = resnet.block3.bn2.running_mean.clone()
    assert last_conv_activation(cnn, (1, 28, 28)) == "relu2"
    assert last_conv_activation(resnet, (1, 28, 28)) == "block3.relu2"
    assert last_conv_activation(resnet, (2, 1, 28, 28)) == "block3.relu2"  # a batch shape works too
    assert resnet.training  # mode restored, and the dry run did not update BatchNorm statistics
    assert torch.equal(resnet.block3.bn2.running_mean, running)
    assert not _has_hooks(cnn) and not _has_hooks(resnet)


def test_last_conv_activation_needs_a_spatial_activation() -> None:
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2), torch.nn.ReLU())
    with pytest.raises(ValueError, match="no activation"):
        last_conv_activation(model, (1, 2, 2))


@pytest.fixture(scope="module")
def pruning(backdoored) -> tuple[FinePruning, np.ndarray, torch.Tensor]:
    """Fine-pruning of the backdoored model, with the original's logits on some images taken beforehand."""
    probe = backdoored.x_eval[:64]
    with torch.no_grad():
        before = backdoored.module(torch.as_tensor(probe)).clone()
    return fine_prune(backdoored.module, backdoored.x_clean, backdoored.y_clean, budget=BUDGET), probe, before


def test_fine_prune_keeps_clean_accuracy_within_budget(backdoored, pruning) -> None:
    result, _, _ = pruning
    assert result.layer == "relu2"
    assert len(result.pruned) >= 1
    assert result.accuracy_before == pytest.approx(accuracy(backdoored.module, backdoored.x_clean,
                                                            backdoored.y_clean))
    measured = accuracy(result.model, backdoored.x_clean, backdoored.y_clean)
    assert measured == pytest.approx(result.accuracy_after)
    assert measured >= result.accuracy_before - BUDGET - 1e-9


def test_fine_prune_follows_liu_ranking_and_stops_at_first_breach(pruning) -> None:
    result, _, _ = pruning
    k = len(result.pruned)
    rest = np.setdiff1d(np.arange(len(result.mean_activation)), result.pruned)
    assert np.all(np.diff(result.mean_activation[result.pruned]) >= 0)  # ascending mean activation
    if len(rest):
        assert result.mean_activation[result.pruned].max() <= result.mean_activation[rest].min()
        assert result.accuracies[k + 1] < result.accuracy_before - BUDGET  # the next channel broke the budget
    assert np.all(result.accuracies[: k + 1] >= result.accuracy_before - BUDGET - 1e-9)


def test_fine_prune_leaves_the_original_untouched(backdoored, pruning) -> None:
    result, probe, before = pruning
    assert result.model is not backdoored.module
    assert not hasattr(backdoored.module.relu2, MASK_BUFFER)
    assert not _has_hooks(backdoored.module)
    with torch.no_grad():
        assert torch.equal(backdoored.module(torch.as_tensor(probe)), before)
        assert not torch.equal(result.model(torch.as_tensor(probe)), before)  # the copy is really changed


def test_fine_prune_zeroes_exactly_the_pruned_channels(backdoored, pruning) -> None:
    result, probe, _ = pruning
    seen: list[torch.Tensor] = []
    layer = result.model.get_submodule(result.layer)
    handle = layer.register_forward_hook(lambda _m, _i, out: seen.append(out.detach().clone()))
    try:
        with torch.no_grad():
            result.model(torch.as_tensor(probe))
    finally:
        handle.remove()
    (out,) = seen
    kept = np.setdiff1d(np.arange(out.shape[1]), result.pruned)
    assert torch.count_nonzero(out[:, result.pruned]) == 0
    assert torch.count_nonzero(out[:, kept].amax(dim=(0, 2, 3))) == len(kept)  # every kept channel fires


def test_fine_prune_is_exact_across_a_residual_sum() -> None:
    """Pruning every channel of the ResNet's last block leaves only the head's bias, despite the shortcut."""
    torch.manual_seed(0)
    model = SmallResNet().eval()
    x = np.random.default_rng(0).random((16, 1, 28, 28), dtype=np.float32)
    y = np.full(len(x), int(model.fc.bias.argmax()))  # the label once all is pruned: never below budget
    result = fine_prune(model, x, y, budget=0.99)
    assert result.layer == "block3.relu2"
    assert len(result.pruned) == 64
    with torch.no_grad():
        logits = result.model(torch.as_tensor(x))
    assert torch.allclose(logits, model.fc.bias.expand_as(logits))
    with pytest.raises(ValueError, match="already pruned"):
        fine_prune(result.model, x, y)


@pytest.fixture(scope="module")
def strip_setup(backdoored) -> tuple[Strip, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """STRIP with the defender's images as overlays; clean and triggered eval images, and their scores."""
    strip = Strip(backdoored.module, backdoored.x_clean, n_overlays=N_OVERLAYS, seed=0)
    clean = backdoored.x_eval[:300]
    triggered = backdoored.triggered()[0][:200]
    return strip, clean, triggered, strip.score(clean), strip.score(triggered)


def test_strip_scores_triggered_images_higher(strip_setup) -> None:
    _, clean, triggered, clean_scores, triggered_scores = strip_setup
    assert clean_scores.shape == (len(clean),) and triggered_scores.shape == (len(triggered),)
    assert np.all(clean_scores <= 0) and np.all(clean_scores >= -np.log(10) - 1e-5)  # minus an entropy
    assert auroc(clean_scores, triggered_scores) > 0.8


def test_strip_threshold_flags_about_fpr_of_its_fitting_set(strip_setup) -> None:
    strip, clean, triggered, _, _ = strip_setup
    with pytest.raises(RuntimeError):
        Strip(strip.model, clean[:4], n_overlays=2).flag(clean[:2])
    fpr = 0.1
    threshold = strip.fit_threshold(clean, fpr)
    assert strip.threshold == threshold
    flagged = strip.flag(clean).mean()
    assert fpr - 2 / len(clean) <= flagged <= fpr
    assert strip.flag(triggered).mean() > 0.5


def test_strip_is_reproducible_for_a_seed(backdoored, strip_setup) -> None:
    strip, clean, _, clean_scores, _ = strip_setup
    again = Strip(backdoored.module, backdoored.x_clean, n_overlays=N_OVERLAYS, seed=0, batch_size=100)
    np.testing.assert_array_equal(again.overlay_index, strip.overlay_index)
    np.testing.assert_allclose(again.score(clean[:40]), clean_scores[:40], rtol=1e-5, atol=1e-6)
    assert again.last_seconds > 0 and again.forwards_per_input == N_OVERLAYS
    other = Strip(backdoored.module, backdoored.x_clean, n_overlays=N_OVERLAYS, seed=1)
    assert not np.allclose(other.score(clean[:40]), clean_scores[:40])


def test_strip_and_predict_run_the_exported_model_in_onnx_runtime_alike(backdoored, strip_setup) -> None:
    """`guard eval` runs its forward-only passes (labels, STRIP) through ONNX Runtime: the same answers and scores
    as the torch module."""
    _, clean, triggered, clean_scores, triggered_scores = strip_setup
    with open(backdoored.model_path, "rb") as model_file:  # the module's own export
        served = OrtClassifier.load(model_file.read())
    assert not list(served.parameters())
    images = np.concatenate([clean, triggered])
    torch_labels, onnx_labels = predict(backdoored.module, images), predict(served, images)
    assert onnx_labels.dtype == np.int64 and (onnx_labels == torch_labels).mean() >= 0.998  # argmax ties aside
    onnx_strip = Strip(served, backdoored.x_clean, n_overlays=N_OVERLAYS, seed=0)
    np.testing.assert_allclose(onnx_strip.score(clean[:60]), clean_scores[:60], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(onnx_strip.score(triggered[:60]), triggered_scores[:60], rtol=1e-4, atol=1e-5)
    assert predict(served, images[:0]).shape == (0,)
