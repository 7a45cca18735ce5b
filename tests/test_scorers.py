"""Each scorer on a tiny hand-built model with a planted backdoor neuron: the neuron is found.

The model is conv(1->8, 3x3) -> ReLU -> global max -> linear(8->3) on 1x12x12 images. Channel `PLANTED` is a
backdoor detector: its filter sums a 3x3 window and its bias is so negative that smooth clean images (values at most
0.6) barely reach it, while the BadNets patch (a 3x3 block of 1.0) drives it far above anything clean; its weight to
class `TARGET` is large. The other channels are random filters the head reads with random weights. The model is
exported to ONNX and scored through guard's own taps, exactly as calibration does. The second half of the file pins
the small pieces (benign set, threshold, mask search) on constructed inputs.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from guard.calibrate import consistency
from guard.calibrate.activations import Activations, channel_summaries, collect
from guard.calibrate.consistency import (
    allowed_above,
    class_gaussian,
    class_profiles,
    compromise_threshold,
    confirm_ceiling,
    demote_threshold,
    fit_distance_part,
    fit_envelope,
    fit_parts,
    out_of_fold,
    score_threshold,
)
from guard.calibrate.linf import linf_stats
from guard.calibrate.masking import candidate_order, choose_static_mask
from guard.calibrate.pipeline import CalibrationSettings
from guard.calibrate.salience import benign_salience, benign_set
from guard.calibrate.taps import OnnxTaps
from guard.eval.attacks import BadNets
from guard.eval.metrics import auroc
from guard.eval.models import export_onnx
from guard.model.graph import LoadedModel, default_taps, load_model
from guard.runtime.checks import ConsistencyCheck, DistancePart, InputEnvelope, ScorePart

CHANNELS, PLANTED, CLASSES, SIZE, TARGET = 8, 5, 3, 12, 0
TRIGGER = BadNets(size=3, value=1.0)


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, CHANNELS, 3, padding=1)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(CHANNELS, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flatten(self.pool(self.relu(self.conv(x)))))


def smooth_images(n: int, rng: np.random.Generator) -> np.ndarray:
    """Clean inputs: random 4x4 images upsampled bilinearly to 12x12, values in [0, 0.6], no bright patch."""
    coarse = torch.as_tensor(rng.random((n, 1, 4, 4), dtype=np.float32))
    return (0.6 * F.interpolate(coarse, size=(SIZE, SIZE), mode="bilinear", align_corners=True)).numpy()


def planted_model() -> Tiny:
    torch.manual_seed(0)
    model = Tiny().eval()
    with torch.no_grad():
        weight = torch.randn(CHANNELS, 1, 3, 3) / 3
        weight[PLANTED] = 1.0  # sums the 3x3 window: 9 on the patch, at most 5.4 on clean images
        bias = torch.full((CHANNELS,), 0.05)
        bias[PLANTED] = -5.0
        head = 2 * torch.randn(CLASSES, CHANNELS)
        head[:, PLANTED] = 0.0
        head[TARGET, PLANTED] = 8.0
        model.conv.weight.copy_(weight)
        model.conv.bias.copy_(bias)
        model.fc.weight.copy_(head)
        model.fc.bias.zero_()
    return model


@dataclass
class Planted:
    model: Tiny
    loaded: LoadedModel
    conv_tap: str
    dense_tap: str
    taps: OnnxTaps
    x_fit: np.ndarray  # clean calibration data
    x_test: np.ndarray  # fresh clean data
    clean: Activations  # x_fit at the conv tap, with salience (labels: the model's own predictions)
    triggered: Activations  # x_fit with the trigger


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory, one_thread: None) -> Planted:
    rng = np.random.default_rng(0)
    x_fit, x_test = smooth_images(400, rng), smooth_images(200, rng)
    model = planted_model()
    with torch.no_grad():  # centre the logits on clean data so that every class is predicted
        model.fc.bias.copy_(-model(torch.as_tensor(x_fit)).mean(dim=0))
    path = export_onnx(model, tmp_path_factory.mktemp("planted") / "tiny.onnx", torch.zeros(2, 1, SIZE, SIZE))
    loaded = load_model(path)
    conv_tap = next(n.output[0] for n in loaded.proto.graph.node if n.op_type == "Relu")
    gemm = next(n for n in loaded.proto.graph.node if n.op_type in {"Gemm", "MatMul"})
    dense_tap = gemm.input[0]
    taps = OnnxTaps(loaded, [conv_tap])
    clean = collect(taps, x_fit, with_salience=True)
    triggered = collect(taps, TRIGGER.apply(x_fit))
    return Planted(model, loaded, conv_tap, dense_tap, taps, x_fit, x_test, clean, triggered)


def test_planted_model_is_a_working_backdoor(planted: Planted) -> None:
    """The premise of every test below: clean inputs spread over all classes, triggered ones all go to TARGET,
    and the planted channel is (nearly) silent on clean data."""
    assert np.bincount(planted.clean.predictions, minlength=CLASSES).min() >= 0.15 * len(planted.x_fit)
    assert (planted.triggered.predictions == TARGET).mean() >= 0.99
    clean_planted = planted.clean.linf[0][:, PLANTED]
    assert (clean_planted > 0).mean() <= 0.05
    assert default_taps(planted.loaded, conv_taps=CalibrationSettings().conv_taps) == [planted.conv_tap, planted.dense_tap]


# ---------------------------------------------------------------------------------------------- ℓ∞ statistics


def test_linf_of_planted_channel_on_triggered_inputs_far_exceeds_its_clean_bound(planted: Planted) -> None:
    stats = linf_stats(planted.clean.linf[0], planted.clean.mean[0])
    triggered = planted.triggered.linf[0][:, PLANTED]
    bound = stats.p999[PLANTED]
    assert stats.p99[PLANTED] <= bound <= planted.clean.linf[0][:, PLANTED].max()
    assert (triggered > bound).all()
    # a wide margin: far above the bound, also measured in the channel's own clean spread
    assert np.median(triggered) > 10 * bound
    assert triggered.min() - bound > 20 * stats.std[PLANTED]
    # no other channel is pushed that far past its own clean bound
    others = [c for c in range(CHANNELS) if c != PLANTED]
    excess = np.median(planted.triggered.linf[0], axis=0) / np.maximum(stats.p999, 1e-3)
    assert excess[PLANTED] > 3 * excess[others].max()


def test_linf_gap_score_ranks_planted_channel_first(planted: Planted) -> None:
    """Section 1's score: E ℓ∞(x ⊕ t) − E ℓ∞(x) per channel; the planted channel has the largest gap, by far."""
    clean_stats = linf_stats(planted.clean.linf[0], planted.clean.mean[0])
    triggered_stats = linf_stats(planted.triggered.linf[0], planted.triggered.mean[0])
    gap = triggered_stats.mean - clean_stats.mean
    assert int(np.argmax(gap)) == PLANTED
    assert gap[PLANTED] > 2 * np.sort(gap)[-2]
    # the spatial mean shows the trigger far less than ℓ∞ does (the premise of section 1)
    mean_gap = planted.triggered.mean[0].mean(axis=0) - planted.clean.mean[0].mean(axis=0)
    assert gap[PLANTED] > 10 * mean_gap[PLANTED]


def test_linf_stats_agree_with_numpy_definitions(planted: Planted) -> None:
    linf, mean = planted.clean.linf[0], planted.clean.mean[0]
    stats = linf_stats(linf, mean)
    for name, expected in [("mean", linf.mean(axis=0)), ("std", linf.std(axis=0)),
                           ("p99", np.quantile(linf, 0.99, axis=0)), ("p999", np.quantile(linf, 0.999, axis=0))]:
        value = getattr(stats, name)
        assert value.shape == (CHANNELS,), name
        np.testing.assert_allclose(value, expected, rtol=1e-6, atol=1e-7, err_msg=name)
    assert np.all(stats.p99 <= stats.p999)


def test_peakedness_is_high_for_a_channel_that_fires_on_a_small_spot() -> None:
    maps = np.zeros((4, 2, 10, 10), dtype=np.float32)
    maps[:, 0] = 1.0  # fires everywhere
    maps[:, 1, 3, 7] = 5.0  # fires on one unit of 100
    peak, mean = channel_summaries(torch.as_tensor(maps))
    stats = linf_stats(peak.numpy(), mean.numpy())
    np.testing.assert_allclose(stats.mean, [1.0, 5.0])
    np.testing.assert_allclose(stats.peakedness, [1.0, 100.0], rtol=1e-4)


def test_dense_tap_linf_is_the_value_itself(planted: Planted) -> None:
    """The dense tap after the global max holds each channel's ℓ∞ of the conv tap: both taps must agree, in tap
    order, and collect's ℓ∞ must match the torch model's own activations."""
    both = collect(OnnxTaps(planted.loaded, [planted.conv_tap, planted.dense_tap]), planted.x_fit[:64])
    assert [a.shape for a in both.linf] == [(64, CHANNELS), (64, CHANNELS)]
    np.testing.assert_allclose(both.linf[1], both.linf[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(both.mean[1], both.linf[1])
    with torch.no_grad():
        act = planted.model.relu(planted.model.conv(torch.as_tensor(planted.x_fit[:64])))
    np.testing.assert_allclose(both.linf[0], act.amax(dim=(2, 3)).numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(both.mean[0], act.mean(dim=(2, 3)).numpy(), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------- benign salience


def test_salience_matches_a_direct_autograd_computation(planted: Planted) -> None:
    """Per sample: |Σ_hw A · ∂L/∂A| with L the cross-entropy against the model's own prediction."""
    x = torch.as_tensor(planted.x_fit[:50])
    act = planted.model.relu(planted.model.conv(x)).detach().requires_grad_(True)
    logits = planted.model.fc(planted.model.flatten(planted.model.pool(act)))
    losses = F.cross_entropy(logits, logits.argmax(dim=1), reduction="none")
    (grad,) = torch.autograd.grad(losses.sum(), act)
    expected = (act * grad).sum(dim=(2, 3)).abs().detach().numpy()
    np.testing.assert_allclose(planted.clean.salience[0][:50], expected, rtol=1e-4, atol=1e-6)


def test_planted_channel_has_lowest_salience_and_is_outside_the_benign_set(planted: Planted) -> None:
    salience = benign_salience(planted.clean.salience[0])
    assert salience.shape == (CHANNELS,)
    assert PLANTED in np.argsort(salience, kind="stable")[:2]  # lowest or next to lowest
    assert salience[PLANTED] < 0.01 * salience.sum()
    benign = benign_set(salience, 0.99)
    assert not benign[PLANTED]
    # the clearly useful channels, judged independently by ablation: zeroing one flips >= 10% of clean answers
    x = torch.as_tensor(planted.x_fit)
    with torch.no_grad():
        features = planted.model.flatten(planted.model.pool(planted.model.relu(planted.model.conv(x))))
        answers = planted.model.fc(features).argmax(dim=1)
        flips = np.array([
            (planted.model.fc(features * (torch.arange(CHANNELS) != c)).argmax(dim=1) != answers).float().mean()
            for c in range(CHANNELS)
        ])
    useful = np.flatnonzero(flips >= 0.10)
    assert len(useful) >= 3
    assert benign[useful].all()
    assert flips[PLANTED] <= 0.02


# ---------------------------------------------------------------------------------------------- consistency check


@pytest.fixture(scope="module")
def check(planted: Planted) -> ConsistencyCheck:
    """Profiles and k from clean calibration data only, as the pipeline does."""
    clean = planted.clean
    class_mean, class_scale = class_profiles(clean.linf, clean.predictions, CLASSES)
    assert class_mean.shape == class_scale.shape == (CLASSES, CHANNELS)
    assert np.all(class_scale > 0)
    consistency = ConsistencyCheck(class_mean, class_scale, np.ones(CHANNELS, dtype=bool), top_q=3, k=3.0,
                                   cut=2.0)
    z = consistency.z_scores(np.concatenate(clean.linf, axis=1), clean.predictions)
    consistency.k = compromise_threshold(z, consistency.active)
    assert consistency.k >= 3.0
    return consistency


def test_consistency_check_singles_out_planted_channel_on_triggered_inputs(planted: Planted,
                                                                            check: ConsistencyCheck) -> None:
    clean = collect(planted.taps, planted.x_test)  # fresh clean data, not seen by the profiles
    triggered = collect(planted.taps, TRIGGER.apply(planted.x_test))
    z = check.z_scores(np.concatenate(triggered.linf, axis=1), triggered.predictions)
    assert (z.argmax(axis=1) == PLANTED).mean() >= 0.95
    clean_result = check(clean.linf, clean.predictions)
    triggered_result = check(triggered.linf, triggered.predictions)
    assert triggered_result.score.shape == (len(planted.x_test),)
    assert np.median(triggered_result.score) > 10 * np.quantile(clean_result.score, 0.99)
    assert triggered_result.score.min() > 2 * clean_result.score.max()
    assert triggered_result.compromised[:, PLANTED].mean() >= 0.9
    assert clean_result.compromised[:, PLANTED].mean() <= 0.02
    # with τ at a 5% false-positive rate on the calibration data, every triggered input is flagged
    fit_result = check(planted.clean.linf, planted.clean.predictions)
    tau = score_threshold(fit_result.score, np.zeros(len(fit_result.score), dtype=bool), 0.05)
    assert (triggered_result.score > tau).all()
    assert (clean_result.score > tau).mean() <= 0.12


def test_out_of_fold_scores_look_like_fresh_requests(planted: Planted, check: ConsistencyCheck) -> None:
    """Scored against profiles that include them, calibration samples look cleaner than fresh ones; cross-fitted
    scores do not, so τ chosen on them flags fresh requests at the rate it flags calibration samples."""
    clean = planted.clean
    crossed = out_of_fold(check, clean.linf, clean.predictions, CLASSES, folds=5, seed=0)
    in_sample = check(clean.linf, clean.predictions)
    fresh = collect(planted.taps, planted.x_test)
    fresh_scores = check(fresh.linf, fresh.predictions).score
    assert crossed.score.shape == in_sample.score.shape and crossed.z.shape == in_sample.z.shape
    assert np.array_equal(crossed.compromised, crossed.z > check.k)
    assert crossed.score.mean() > in_sample.score.mean()
    gap = abs(np.quantile(crossed.score, 0.95) - np.quantile(fresh_scores, 0.95))
    assert gap < abs(np.quantile(in_sample.score, 0.95) - np.quantile(fresh_scores, 0.95))
    # folds are seeded: the same seed, the same scores
    again = out_of_fold(check, clean.linf, clean.predictions, CLASSES, folds=5, seed=0)
    assert np.array_equal(again.score, crossed.score)


def test_consistency_score_is_mean_of_top_q_z_and_inactive_channels_are_ignored(planted: Planted,
                                                                               check: ConsistencyCheck) -> None:
    triggered = planted.triggered
    flat = np.concatenate(triggered.linf, axis=1)
    z = check.z_scores(flat, triggered.predictions)
    expected = np.sort(z, axis=1)[:, -check.top_q:].mean(axis=1)
    np.testing.assert_allclose(check(triggered.linf, triggered.predictions).score, expected, rtol=1e-5)
    # each sample is measured against the profile of the class it was predicted as: a clean sample sits closer
    # to its own class's profile than to another class's
    clean = planted.clean
    own = check(clean.linf, clean.predictions).score
    other = check(clean.linf, (clean.predictions + 1) % CLASSES).score
    assert np.median(other - own) > 0
    assert own.mean() < 0.8 * other.mean()
    blind = ConsistencyCheck(check.class_mean, check.class_scale, np.arange(CHANNELS) != PLANTED, check.top_q,
                             check.k, check.cut)
    assert not blind(triggered.linf, triggered.predictions).compromised[:, PLANTED].any()
    assert np.all(blind.z_scores(flat, triggered.predictions)[:, PLANTED] == 0)


def test_score_parts_are_standardised_by_their_clean_median_and_95th_percentile() -> None:
    rng = np.random.default_rng(3)
    clean = rng.normal(0, 1, (2000, 12)).astype(np.float32)
    groups = [np.arange(12), np.arange(8, 12)]
    parts = fit_parts(clean, groups, top_q=3)
    assert [list(p.channels) for p in parts] == [list(g) for g in groups]
    for part, channels in zip(parts, groups, strict=True):
        raw = np.sort(clean[:, channels], axis=1)[:, -3:].mean(axis=1)
        assert part.centre == pytest.approx(np.median(raw), rel=1e-5)
        assert part.spread == pytest.approx(np.quantile(raw, 0.95) - np.median(raw), rel=1e-5)
        standardised = part.standardised(clean, clean, np.zeros(len(clean), np.int64), 3)
        assert np.median(standardised) == pytest.approx(0, abs=1e-5)
        assert (standardised > 1).mean() == pytest.approx(0.05, abs=0.002)
    # A part that never varies on clean data keeps its raw units rather than dividing by zero.
    flat = fit_parts(np.zeros((100, 4), np.float32), [np.arange(4)], top_q=2)[0]
    assert (flat.centre, flat.spread) == (0.0, 1.0)


def test_a_shift_spread_over_a_small_part_is_seen_by_that_part_and_lost_in_the_whole() -> None:
    """A spread-out trigger nudges every penultimate feature a little; the conv channels' own clean outliers hide
    that in the top-q over all channels, and the part over the dense channels alone shows it."""
    rng = np.random.default_rng(4)
    conv, dense = 200, 16
    clean = np.concatenate([rng.standard_t(3, (3000, conv)), rng.normal(0, 1, (3000, dense))], axis=1)
    fresh = np.concatenate([rng.standard_t(3, (1000, conv)), rng.normal(0, 1, (1000, dense))], axis=1)
    triggered = fresh.copy()
    triggered[:, conv:] += 1.5
    flat = np.zeros((1, conv + dense), np.float32)
    everything = np.arange(conv + dense)
    one = ConsistencyCheck(flat, np.ones_like(flat), np.ones(conv + dense, dtype=bool), top_q=3, k=3.0, cut=2.0)
    two = replace(one, parts=fit_parts(clean.astype(np.float32), [everything, everything[conv:]], top_q=3))
    assert one.score_parts()[0].centre == 0 and len(one.score_parts()) == 1  # no parts: the raw top-q over all
    def score(check: ConsistencyCheck, x: np.ndarray) -> np.ndarray:  # profiles at 0 and 1: ℓ∞ and z coincide
        x = x.astype(np.float32)
        return check.score(x, x, np.zeros(len(x), np.int64))

    for check, better in ((one, False), (two, True)):
        assert (auroc(score(check, fresh), score(check, triggered)) > 0.95) is better
    labels = np.zeros(len(clean), np.int64)
    np.testing.assert_allclose(score(two, clean), np.maximum(*[
        p.standardised(clean.astype(np.float32), clean.astype(np.float32), labels, 3) for p in two.parts]))


def _correlated(n: int, rng: np.random.Generator, classes: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Penultimate-like features: 16 of them driven by 3 latent factors plus a little noise, offset per class."""
    mixing = np.random.default_rng(0).normal(0, 1, (3, 16))
    offsets = np.random.default_rng(1).normal(0, 2, (classes, 16))
    labels = rng.integers(0, classes, n)
    return rng.normal(0, 1, (n, 3)) @ mixing + rng.normal(0, 0.2, (n, 16)) + offsets[labels], labels


def test_class_gaussian_whitens_the_shrunk_pooled_covariance() -> None:
    rng = np.random.default_rng(5)
    x, labels = _correlated(3000, rng)
    means, whiten = class_gaussian(x, labels, 3, shrink=0.1)
    for cls in range(3):  # the class mean, pulled toward the overall mean by a pseudo-count of 5
        rows = x[labels == cls]
        np.testing.assert_allclose(means[cls], (rows.sum(0) + 5 * x.mean(0)) / (len(rows) + 5), rtol=1e-4, atol=1e-4)
    residual = x - means[labels]
    pooled = residual.T @ residual / (len(x) - 1)
    shrunk = 0.9 * pooled + 0.1 * np.trace(pooled) / 16 * np.eye(16)
    centred = x[:50] - means[labels[:50]]
    np.testing.assert_allclose(np.square(centred @ whiten).sum(1),
                               np.einsum("nd,de,ne->n", centred, np.linalg.inv(shrunk), centred), rtol=1e-3)
    # A group that never varied (a dead unit) still gives finite distances.
    flat_means, flat_whiten = class_gaussian(np.zeros((100, 4)), np.zeros(100, np.int64), 3, shrink=0.1)
    assert np.all(np.isfinite(flat_whiten)) and np.all(flat_means == 0)


def test_distance_part_is_cross_fitted_and_sees_a_shift_per_channel_z_misses() -> None:
    """A shift against the features' correlations moves no feature past its own spread, so the top-q z misses it;
    the distance, which knows the correlations, sees it. Its cross-fitted clean scores are distributed like a fresh
    request's: 5% of fresh clean requests score above 1."""
    rng = np.random.default_rng(6)
    clean, labels = _correlated(2000, rng)
    fresh, fresh_labels = _correlated(4000, rng)
    _, _, across = np.linalg.svd(clean - clean.mean(0))
    triggered = fresh + 3.0 * across[-1]  # the direction clean data varies least in: at most ~1 std per feature
    channels = np.arange(16)
    part, crossed = fit_distance_part(clean, labels, channels, 3, shrink=0.1, folds=5, seed=0)
    assert isinstance(part, DistancePart) and part.class_mean.shape == (3, 16) and part.whiten.shape == (16, 16)
    assert np.median(crossed) == pytest.approx(0, abs=1e-5) and (crossed > 1).mean() == pytest.approx(0.05, abs=0.002)
    fresh_score = part.standardised(fresh, fresh, fresh_labels, 3)
    assert (fresh_score > 1).mean() == pytest.approx(0.05, abs=0.015)
    in_sample = part.standardised(clean, clean, labels, 3)
    assert (in_sample > 1).mean() < (crossed > 1).mean()  # a sample scored against its own fit looks cleaner

    mean, scale = class_profiles([clean], labels, 3)
    check = ConsistencyCheck(mean, scale, np.ones(16, dtype=bool), top_q=3, k=3.0, cut=2.0)
    z_clean = check.z_scores(clean, labels)
    top = fit_parts(z_clean, [channels], top_q=3)[0]

    def scored(p: ScorePart | DistancePart, x: np.ndarray) -> np.ndarray:
        return p.standardised(x, check.z_scores(x, fresh_labels), fresh_labels, 3)

    assert auroc(scored(top, fresh), scored(top, triggered)) < 0.7
    assert auroc(scored(part, fresh), scored(part, triggered)) > 0.97


def test_input_envelope_sums_the_excess_over_each_elements_clean_maximum() -> None:
    """The envelope's raw score is the summed excess of a sample's elements over their bound, 0 inside it; lower
    values never count."""
    bound = np.array([[[0.0, 0.5], [1.0, 0.2]]], dtype=np.float32)  # (1, 2, 2)
    x = np.array([bound, bound - 0.3, bound + np.array([[[0.25, 0.0], [0.0, 0.5]]])], dtype=np.float32)
    envelope = InputEnvelope(bound, centre=0.25, spread=0.5)
    np.testing.assert_allclose(envelope.raw(x), [0.0, 0.0, 0.75], atol=1e-6)
    np.testing.assert_allclose(envelope.standardised(x), [-0.5, -0.5, 1.0], atol=1e-6)


def test_fit_envelope_leaves_one_out_and_is_scaled_by_its_clean_quantile() -> None:
    """The served bound is every element's largest value; each calibration sample is scored against the bound of all
    the others (against its own it would score 0), and the spread is the chosen quantile of those scores minus their
    median, so about 1% of clean samples score above 1 at 0.99. A bright patch on the dark border, where no clean
    sample reaches, scores far above every clean sample."""
    rng = np.random.default_rng(3)
    clean = np.zeros((1000, 1, 8, 8), dtype=np.float32)
    clean[:, :, 2:6, 2:6] = rng.random((1000, 1, 4, 4), dtype=np.float32)  # a bright centre, a dark border
    envelope, crossed = fit_envelope(clean, quantile=0.99)
    np.testing.assert_array_equal(envelope.bound, clean.max(axis=0))
    others = [InputEnvelope(np.delete(clean, i, axis=0).max(axis=0)).raw(clean[i:i + 1])[0] for i in range(len(clean))]
    np.testing.assert_allclose(crossed * envelope.spread + envelope.centre, others, atol=1e-5)
    assert (envelope.raw(clean) == 0).all() and (crossed > 0).any()
    assert (crossed > 1).mean() == pytest.approx(0.01, abs=0.002)
    patched = clean[:50].copy()
    patched[:, :, -2:, -2:] = 1.0
    assert envelope.standardised(patched).min() > 10 * max(crossed.max(), 1.0)


def test_fit_envelope_scores_lookalikes_against_each_other_and_spans_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two samples that alone reach a corner cover each other there: neither exceeds the other's bound, so neither
    scores for it; one that alone reaches it scores its lead over the runner-up. Blocks of the input elements give
    the same scores as one pass."""
    x = np.zeros((6, 1, 3, 3), dtype=np.float32)
    x[0, 0, 0, 0] = x[1, 0, 0, 0] = 0.9  # lookalikes
    x[2, 0, 2, 2], x[3, 0, 2, 2] = 0.8, 0.3  # a lone one, and its runner-up
    x[4, 0, 1, 1] = 0.5
    envelope, whole = fit_envelope(x, quantile=0.99)
    np.testing.assert_allclose(whole * envelope.spread + envelope.centre, [0, 0, 0.5, 0, 0.5, 0], atol=1e-6)
    monkeypatch.setattr(consistency, "_ENVELOPE_CHUNK", 2)
    chunked_envelope, chunked = fit_envelope(x, quantile=0.99)
    np.testing.assert_array_equal(chunked, whole)
    np.testing.assert_array_equal(chunked_envelope.bound, x.max(axis=0))
    with pytest.raises(ValueError, match="at least 2 samples"):
        fit_envelope(x[:1], quantile=0.99)


# ---------------------------------------------------------------------------------------------- benign_set


def test_benign_set_is_the_smallest_covering_set() -> None:
    salience = np.array([5.0, 1.0, 3.0, 1.0])
    assert benign_set(salience, 0.5).tolist() == [True, False, False, False]  # 5/10 covers exactly half
    assert benign_set(salience, 0.51).tolist() == [True, False, True, False]
    assert benign_set(salience, 0.85).tolist() == [True, True, True, False]  # ties: the earlier channel first
    rng = np.random.default_rng(0)
    for _ in range(200):
        salience = rng.exponential(size=int(rng.integers(1, 40))) * 10.0 ** rng.uniform(-3, 3)
        share = float(rng.uniform(0.05, 0.98))
        benign = benign_set(salience, share)
        ranked = np.sort(salience)[::-1]
        count = int(benign.sum())
        assert salience[benign].sum() >= share * salience.sum() * (1 - 1e-9)
        assert count == 1 or ranked[:count - 1].sum() < share * salience.sum()
        assert salience[benign].min() >= salience[~benign].max(initial=-np.inf)


def test_benign_set_breaks_ties_stably_and_keeps_everything_without_salience() -> None:
    assert benign_set(np.ones(6), 0.5).tolist() == [True, True, True, False, False, False]
    assert benign_set(np.array([0.0, 2.0, 2.0, 2.0, 2.0]), 0.5).tolist() == [False, True, True, False, False]
    assert benign_set(np.zeros(5), 0.99).all()
    assert benign_set(np.zeros(5), 0.99).dtype == bool
    assert benign_set(np.array([0.0, 3.0, 0.0]), 0.99).tolist() == [False, True, False]


def test_benign_set_at_full_share_leaves_out_channels_without_salience() -> None:
    salience = np.array([0.1, 0.2, 0.3, 0.0, 0.0])
    assert benign_set(salience, 1.0).tolist() == [True, True, True, False, False]


# ---------------------------------------------------------------------------------------------- score_threshold


def test_score_threshold_at_even_odds_is_the_split_conformal_quantile() -> None:
    scores = np.random.default_rng(0).permutation(np.arange(200, dtype=np.float64))
    none = np.zeros(200, dtype=bool)
    for fpr, allowed in ((0.01, 1), (0.05, 9), (0.1, 19), (0.5, 99)):  # 200 - ceil(201 * (1 - fpr))
        tau = score_threshold(scores, none, fpr)
        assert (scores > tau).sum() == allowed
        assert (scores > tau - 1).sum() == allowed + 1  # the lowest such threshold
    # too few samples for the rate: nothing above the threshold
    assert (np.arange(10.0) > score_threshold(np.arange(10.0), np.zeros(10, dtype=bool), 0.05)).sum() == 0
    # ties at the boundary: never more than the budget
    tied = np.array([9.0, 8.0, 7.0, 7.0, 7.0, 1.0, 1.0, 1.0, 1.0, 1.0] * 10)
    tau = score_threshold(tied, np.zeros(100, dtype=bool), 0.25)
    assert (tied > tau).sum() <= 25


def test_allowed_above_is_the_binomial_bound() -> None:
    # P(Binomial(1000, 0.05) <= a) is 0.081 at a = 40 and 0.106 at a = 41 (0.48 at 49, 0.54 at 50)
    assert allowed_above(1000, 0.05, 0.9) == 40
    assert allowed_above(1000, 0.05, 0.5) == 49
    assert allowed_above(44, 0.05, 0.9) == 0  # 0.95 ** 44 > 0.1: no sample may lie above
    assert allowed_above(1000, 0.05, 0.99) < allowed_above(1000, 0.05, 0.9) < allowed_above(1000, 0.05, 0.5)
    with pytest.raises(ValueError, match="confidence"):
        allowed_above(100, 0.05, 1.0)


@pytest.mark.parametrize("confidence", [0.5, 0.9])
def test_score_threshold_keeps_the_fresh_false_positive_rate_at_the_target(confidence: float) -> None:
    # Uniform clean scores: a fresh request's chance of scoring above τ is 1 - τ. Over 2,000 calibrations on 300
    # samples: at even odds its mean must not exceed the target (the plain empirical quantile gives about 0.053);
    # at 0.9 it may exceed the target in at most one calibration in ten: P(Binomial(300, 0.05) <= 9) = 0.067.
    rng = np.random.default_rng(2)
    none = np.zeros(300, dtype=bool)
    fresh_rates = np.array([1 - score_threshold(rng.random(300), none, 0.05, confidence) for _ in range(2000)])
    if confidence == 0.5:
        assert 0.045 <= fresh_rates.mean() <= 0.0505
    else:
        assert 0.05 <= (fresh_rates > 0.05).mean() <= 0.085
        assert 0.030 <= fresh_rates.mean() <= 0.036  # (9 + 1) / 301


def test_score_threshold_counts_disagreements_against_the_budget() -> None:
    rng = np.random.default_rng(1)
    scores = rng.permutation(np.arange(100, dtype=np.float64))
    disagree = np.zeros(100, dtype=bool)
    disagree[np.argsort(scores)[:3]] = True  # three low-score samples the re-prediction disagrees on
    tau = score_threshold(scores, disagree, 0.05)  # a budget of 100 - ceil(101 * 0.95) = 4 samples
    flagged = (scores > tau) | disagree
    assert flagged.sum() == 4
    assert ((scores > tau) & ~disagree).sum() == 1
    # disagreeing samples with high scores are not counted twice
    high = np.zeros(100, dtype=bool)
    high[np.argsort(scores)[-2:]] = True
    tau = score_threshold(scores, high, 0.05)
    assert ((scores > tau) | high).sum() == 4
    # more disagreements than the budget: no agreeing sample is flagged by its score
    many = np.zeros(100, dtype=bool)
    many[:8] = True
    tau = score_threshold(scores, many, 0.05)
    assert not ((scores > tau) & ~many).any()
    # everyone disagrees: a finite threshold still comes back
    assert np.isfinite(score_threshold(scores, np.ones(100, dtype=bool), 0.05))


@pytest.mark.parametrize("fpr", [0.0, 1.0, -0.1, 1.5])
def test_score_threshold_rejects_rates_outside_the_open_unit_interval(fpr: float) -> None:
    with pytest.raises(ValueError, match="false-positive rate"):
        score_threshold(np.arange(10.0), np.zeros(10, dtype=bool), fpr)


def test_demote_threshold_counts_only_agreeing_samples_and_never_falls_below_tau() -> None:
    rng = np.random.default_rng(2)
    scores = rng.permutation(np.arange(1000, dtype=np.float64))
    none = np.zeros(1000, dtype=bool)
    allowed = allowed_above(1000, 0.015, 0.9)
    threshold = demote_threshold(scores, none, tau=0.0, rate=0.015, confidence=0.9)
    assert (scores > threshold).sum() == allowed == 9
    # the top scorers disagree: they are answered differently already and leave the budget to the next ones
    top = scores >= 995
    threshold = demote_threshold(scores, top, tau=0.0, rate=0.015, confidence=0.9)
    assert ((scores > threshold) & ~top).sum() == allowed
    assert demote_threshold(scores, none, tau=999.5, rate=0.015) == 999.5
    assert demote_threshold(scores, none, tau=0.0, rate=0.0) == float("inf")
    few_agree = np.ones(1000, dtype=bool)
    few_agree[:5] = False  # fewer agreeing samples than the budget: every flagged one may be demoted
    assert demote_threshold(scores, few_agree, tau=-1.0, rate=0.015, confidence=0.9) == -1.0


def test_confirm_ceiling_is_the_highest_agreeing_clean_score_never_below_tau() -> None:
    scores = np.array([0.5, 3.0, 2.0, 9.0, 1.0])
    disagree = np.array([False, False, False, True, False])  # the 9.0 is answered differently already
    assert confirm_ceiling(scores, disagree, tau=1.0) == 3.0
    assert confirm_ceiling(scores, disagree, tau=4.0) == 4.0
    assert confirm_ceiling(scores, np.ones(5, dtype=bool), tau=1.0) == 1.0  # none agree: only τ
    assert confirm_ceiling(np.array([np.nan, 2.0, np.inf]), np.zeros(3, dtype=bool), tau=1.0) == 2.0


# ---------------------------------------------------------------------------------------------- static mask


def test_choose_static_mask_returns_longest_prefix_within_budget() -> None:
    order = [(0, 1), (1, 2), (0, 3), (1, 0), (0, 0), (1, 1)]
    channels = [4, 3]
    seen: list[int] = []

    def accuracy(keep: list[np.ndarray]) -> float:
        pruned = sum(int((~k).sum()) for k in keep)
        seen.append(pruned)
        return 0.90 - 0.004 * pruned  # each pruned channel costs 0.4 points

    choice = choose_static_mask(order, channels, accuracy, budget=0.01)
    assert choice.pruned == 2  # 0.8 points; a third would cost 1.2
    assert choice.candidates == len(order)
    assert [k.tolist() for k in choice.keep] == [[True, False, True, True], [True, True, False]]
    assert choice.accuracy_before == pytest.approx(0.90)
    assert choice.accuracy_after == pytest.approx(0.892)
    assert seen[0] == 0


def test_choose_static_mask_stops_before_the_channel_that_matters() -> None:
    order = [(0, 1), (1, 2), (0, 3), (1, 0), (0, 0), (1, 1)]

    def accuracy(keep: list[np.ndarray]) -> float:
        return 0.9 - (0.0 if keep[1][0] else 0.5)  # only channel (1, 0) matters

    choice = choose_static_mask(order, [4, 3], accuracy, budget=0.01)
    assert choice.pruned == 3
    assert choice.keep[1][0]
    assert choice.accuracy_after == pytest.approx(0.9)
    # nothing is lost at all: every candidate is pruned; no candidates: nothing is
    assert choose_static_mask(order, [4, 3], lambda keep: 0.7, budget=0.0).pruned == len(order)
    empty = choose_static_mask([], [4, 3], lambda keep: 0.7, budget=0.0)
    assert empty.pruned == 0 and all(k.all() for k in empty.keep)


def test_choose_static_mask_searches_in_logarithmically_many_evaluations() -> None:
    order = [(0, c) for c in range(1000)]
    calls: list[int] = []

    def accuracy(keep: list[np.ndarray]) -> float:
        calls.append(1)
        return 1.0 - 0.001 * int((~keep[0]).sum())

    choice = choose_static_mask(order, [1000], accuracy, budget=0.3005)
    assert choice.pruned == 300
    assert len(calls) <= 12


def test_candidate_order_puts_least_salient_share_first_and_breaks_ties_by_peakedness() -> None:
    salience = [np.array([10.0, 0.0, 1.0, 0.0]), np.array([100.0, 5.0, 0.0])]
    benign = [np.array([True, False, False, False]), np.array([True, False, False])]
    peakedness = [np.array([1.0, 2.0, 1.0, 9.0]), np.array([1.0, 1.0, 3.0])]
    order = candidate_order(salience, benign, peakedness)
    # shares: (0,1) 0, (0,3) 0, (1,2) 0, (1,1) 5/105, (0,2) 1/11; zero shares go most peaked first
    assert order == [(0, 3), (1, 2), (0, 1), (1, 1), (0, 2)]
    assert (0, 0) not in order and (1, 0) not in order


# ---------------------------------------------------------------------------------------------- repredict_masks


def test_repredict_masks_zero_high_z_features_only_at_taps_without_unit_bounds() -> None:
    from guard.runtime.checks import repredict_masks

    conv_keep = np.array([True, False, True])
    dense_keep = np.array([True, True, False, True])
    z = np.array([[9.0, 9.0, 9.0, 2.5, 1.0, 9.0, 2.0],
                  [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]], dtype=np.float32)
    conv_mask, dense_mask = repredict_masks([conv_keep, dense_keep], [np.ones((3, 2, 2)), None], z, cut=2.0)
    # conv tap: units above their bound are cut in the graph; the mask only repeats the static mask
    assert conv_mask.tolist() == [[1, 0, 1], [1, 0, 1]]
    # dense tap: z > 2.0 is cut (2.5 yes, exactly 2.0 no); the statically pruned channel stays pruned
    assert dense_mask.tolist() == [[0, 1, 0, 1], [1, 1, 0, 1]]
    assert dense_mask.dtype == np.float32


@pytest.mark.parametrize("cut", [0.0, -1.0, float("nan"), float("inf")])
def test_calibration_refuses_a_cut_that_is_not_a_positive_z(cut: float) -> None:
    from guard.errors import GuardError

    with pytest.raises(GuardError, match="cut"):
        CalibrationSettings(cut_z=cut).validate()


def test_calibration_refuses_a_tap_named_twice() -> None:
    from guard.calibrate.pipeline import CalibrationSettings
    from guard.errors import GuardError

    with pytest.raises(GuardError, match="twice"):
        CalibrationSettings(layers=["relu", "linear", "relu"]).validate()


@pytest.mark.parametrize(("fields", "message"), [({"dense_score": "max"}, "'distance' or 'top_q'"),
                                                 ({"distance_shrink": 0.0}, "shrinkage"),
                                                 ({"distance_shrink": 1.5}, "shrinkage"),
                                                 ({"distance_shrink": float("nan")}, "shrinkage")])
def test_calibration_refuses_a_dense_score_it_does_not_know(fields: dict, message: str) -> None:
    from guard.calibrate.pipeline import CalibrationSettings
    from guard.errors import GuardError

    with pytest.raises(GuardError, match=message):
        CalibrationSettings(**fields).validate()
