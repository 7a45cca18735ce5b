"""`guard train --none`: natural breaks, backdoor-channel scores, channel resets through the traced graph,
NONE training on a really poisoned set (its report against the ground truth), and the CLI with built-in and
user architectures."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

from guard.cli import main
from guard.errors import GuardError
from guard.eval.attacks import BadNets
from guard.eval.models import SmallCNN, SmallResNet
from guard.model.graph import load_model
from guard.repair.architectures import build
from guard.repair.none import (
    NoneReport,
    NoneSettings,
    RoundReport,
    _truth,
    channel_scores,
    jenks_upper,
    neighbour_labels,
    per_class_suspects,
    record,
    reset_channels,
    reset_targets,
    runner_up_spread,
    top_channels,
    train_none,
    unlearning_set,
)

TARGET = 0


@pytest.fixture(scope="module")
def poisoned_set(fashion) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """2,000 Fashion-MNIST training images, 10% BadNets to class 0, and the ground-truth poisoned mask."""
    x_train, y_train, _, _ = fashion
    rng = np.random.default_rng(1)
    subset = rng.choice(len(x_train), 2000, replace=False)
    x, y, index = BadNets().poison(x_train[subset], y_train[subset], 0.1, TARGET, rng)
    poisoned = np.zeros(len(x), dtype=bool)
    poisoned[index] = True
    return x, y, poisoned


# NONE needs a model that is sure of its answers (softmax > 0.9) before its first round: 2 quick epochs.
QUICK = {"epochs": 2, "lr": 3e-3, "batch_size": 32, "finetune_epochs": 1}


def _run_cli(argv: list[str]) -> tuple[int, str]:
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(argv)
    return code, stdout.getvalue()


# ------------------------------------------------------------------------------------------- natural breaks


def test_jenks_returns_exactly_the_planted_upper_group():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(0, 0.5, 900), rng.normal(10, 0.5, 100)])
    order = rng.permutation(len(values))
    upper, threshold = jenks_upper(values[order])
    assert (upper == (order >= 900)).all()
    assert threshold == values[:900].max()  # the largest value of the lower class
    assert upper.dtype == bool and upper.shape == (1000,)


def test_jenks_finds_the_best_split_of_an_uneven_sample():
    values = np.array([1.0, 2.0, 3.0, 20.0, 21.0, 40.0])
    best = min(range(1, len(values)),
               key=lambda k: values[:k].var() * k + values[k:].var() * (len(values) - k))
    upper, threshold = jenks_upper(values[::-1])
    assert upper[::-1].tolist() == [i >= best for i in range(len(values))]
    assert threshold == values[best - 1]


def test_jenks_splits_two_close_groups_far_from_zero():
    """The prefix sums of squares cancelled: groups at 1e8 and 1e8 + 1 gave an empty upper group."""
    values = np.concatenate([np.full(500, 1e8), np.full(500, 1e8 + 1)])
    upper, threshold = jenks_upper(values)
    assert upper.sum() == 500 and (values[upper] == 1e8 + 1).all() and threshold == 1e8


@pytest.mark.parametrize("values", [np.full(50, 3.0), np.array([7.0]), np.array([]), np.array([2.0, 2.0])])
def test_jenks_edge_cases_remove_nothing(values):
    upper, threshold = jenks_upper(values)
    assert upper.shape == values.shape and not upper.any()
    assert not np.isnan(threshold)


# ------------------------------------------------------------------------------------------- channel scores


def _planted(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """300 samples, 3 classes each confident in its own; channel 5 fires only for 20 of class 0's samples."""
    n, classes, channels = 300, 3, 8
    label = np.repeat(np.arange(classes), n // classes)
    probs = np.full((n, classes), 0.02)
    probs[np.arange(n), label] = 0.96
    peaks = np.abs(rng.normal(1.0, 0.5, (n, channels)))
    peaks[:, 5] = np.abs(rng.normal(0.5, 0.1, n))
    peaks[rng.choice(np.flatnonzero(label == 0), 20, replace=False), 5] = 12.0
    return peaks, probs


def test_channel_scores_rank_a_planted_backdoor_channel_first():
    peaks, probs = _planted(np.random.default_rng(0))
    scores = channel_scores(peaks, probs)
    assert top_channels(scores, 1 / 8).tolist() == [5]
    assert np.isfinite(scores).all()
    # The formula, for the planted channel and class 0: its peak over S_0 against mean + 3 std over W_0.
    unlikely = peaks[probs[:, 0] < 0.1, 5]
    assert scores[5] >= 12.0 - (unlikely.mean() + 3 * unlikely.std()) - 1e-9
    ranked = top_channels(scores, 0.5)
    assert len(ranked) == 4 and ranked[0] == 5
    assert (np.diff(scores[ranked]) <= 0).all()
    assert len(top_channels(np.arange(100.0), 0.07)) == 7  # ceil(r * C), though 0.07 * 100 is 7.000000000000001


def test_channel_scores_skip_classes_without_confident_samples():
    peaks, probs = _planted(np.random.default_rng(1))
    unsure = probs.copy()
    unsure[:100] = [0.8, 0.1, 0.1]  # class 0 is never above 0.9 now: its planted channel does not count
    scores = channel_scores(peaks, unsure)
    assert top_channels(scores, 1 / 8).tolist() != [5]
    only_others = np.maximum.reduce([
        peaks[unsure[:, k] > 0.9].max(axis=0)
        - (peaks[unsure[:, k] < 0.1].mean(axis=0) + 3 * peaks[unsure[:, k] < 0.1].std(axis=0))
        for k in (1, 2)
    ])
    np.testing.assert_allclose(scores, only_others)
    nobody_sure = np.full_like(probs, 1 / 3)
    assert np.isneginf(channel_scores(peaks, nobody_sure)).all()
    assert top_channels(channel_scores(peaks, nobody_sure), 0.5).tolist() == []  # no evidence: nothing chosen


def test_none_without_a_confident_class_resets_and_drops_nothing(poisoned_set):
    """An untrained model is never sure of a class: NONE has no evidence and must leave model and data alone."""
    x, y, poisoned = poisoned_set
    torch.manual_seed(0)
    model = SmallCNN()
    before = copy.deepcopy(model)
    report = train_none(model, x[:300], y[:300], settings=NoneSettings(finetune_epochs=0), poisoned=poisoned[:300],
                        pretrained=True)
    assert report.removed == [] and report.kept == 300
    assert report.rounds[0].reset == {}
    assert not any(changed.any() for changed in _changed(before, model).values())


# --------------------------------------------------------------------------------------------------- resets


def _changed(before: torch.nn.Module, after: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Per state entry, where it differs."""
    old = before.state_dict()
    return {name: value != old[name] for name, value in after.state_dict().items()}


def test_reset_targets_find_each_convs_batch_norm_and_readers():
    cnn, _ = reset_targets(SmallCNN().eval(), torch.zeros(2, 1, 28, 28))
    assert {k: (v.batch_norm, v.next_layers) for k, v in cnn.items()} == {
        "conv1": (None, [("conv2", 1)]),
        "conv2": (None, [("fc1", 49)]),  # flattened 32 x 7 x 7: each channel is 49 consecutive features
    }
    resnet, unknown = reset_targets(SmallResNet().eval(), torch.zeros(2, 1, 28, 28))
    assert unknown == []
    assert resnet["block2.conv2"].batch_norm == "block2.bn2"
    assert resnet["block2.conv2"].next_layers == [("block3.conv1", 1), ("block3.shortcut.0", 1)]
    assert resnet["block2.shortcut.0"].batch_norm == "block2.shortcut.1"
    assert resnet["block3.conv2"].next_layers == [("fc", 1)]  # through global pooling
    assert resnet["block1.conv1"].next_layers == [("block1.conv2", 1)]


class _ViewNet(nn.Module):
    """Flattens with x.view(x.size(0), -1), a common spelling in users' code."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.pool = nn.MaxPool2d(4)
        self.fc = nn.Linear(4 * 7 * 7, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.conv(x)))
        return self.fc(x.view(x.size(0), -1))


def test_reset_targets_pass_over_a_size_read_for_a_view():
    """x.size(0) reads the conv's output shape only: the walk went on to call the conv's next layer unknown."""
    targets, unknown = reset_targets(_ViewNet().eval(), torch.zeros(2, 1, 28, 28))
    assert unknown == [] and targets["conv"].next_layers == [("fc", 49)]


def test_reset_channels_into_a_depthwise_conv_zero_only_those_channels_filters():
    """A grouped conv's weight is (out, in / groups, kH, kW): channel 5 is not column 5 (an IndexError), and
    channel 0's column 0 is every depthwise filter."""
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=8),
                          nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1, groups=2), nn.Flatten(),
                          nn.Linear(4 * 28 * 28, 10)).eval()
    targets, unknown = reset_targets(model, torch.zeros(2, 1, 28, 28))
    assert unknown == [] and targets["0"].next_layers == [("2", 1)] and targets["2"].next_layers == [("4", 1)]
    depthwise, grouped = model[2].weight.detach().clone(), model[4].weight.detach().clone()
    reset_channels(model, "0", np.array([0, 5]), targets["0"])
    zeroed = [int(row) for row in range(8) if not model[2].weight[row].any()]
    assert zeroed == [0, 5] and torch.equal(model[2].weight[[1, 2, 3, 4, 6, 7]], depthwise[[1, 2, 3, 4, 6, 7]])
    reset_channels(model, "2", np.array([1, 6]), targets["2"])  # 2 groups of 4 inputs, 2 outputs each
    expected = grouped.clone()
    expected[0:2, 1] = 0  # channel 1: group 0, its column 1
    expected[2:4, 2] = 0  # channel 6: group 1, its column 2
    assert torch.equal(model[4].weight, expected)


def test_reset_channels_on_the_cnn_zero_the_filters_and_the_flattened_features():
    torch.manual_seed(0)
    model = SmallCNN().eval()
    original = copy.deepcopy(model)
    targets, unknown = reset_targets(model, torch.zeros(2, 1, 28, 28))
    assert unknown == []
    channels = np.array([1, 4, 30])
    reset_channels(model, "conv2", channels, targets["conv2"])

    state = model.state_dict()
    assert (state["conv2.weight"][channels] == 0).all() and (state["conv2.bias"][channels] == 0).all()
    features = np.concatenate([np.arange(c * 49, (c + 1) * 49) for c in channels])
    assert (state["fc1.weight"][:, features] == 0).all()
    expected = {name: torch.zeros_like(value, dtype=torch.bool) for name, value in state.items()}
    expected["conv2.weight"][channels] = True
    expected["conv2.bias"][channels] = True
    expected["fc1.weight"][:, features] = True
    changed = _changed(original, model)
    for name, where in changed.items():
        assert torch.equal(where, expected[name]), name  # everything else is exactly as it was
    assert all(p.requires_grad for p in model.parameters())

    # What it means: the features of those channels no longer reach the classifier.
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        hidden = model.pool2(model.relu2(model.conv2(model.pool1(model.relu1(model.conv1(x))))))
        assert (hidden[:, channels] == 0).all()
        noisy = hidden.clone()
        noisy[:, channels] = 5.0
        assert torch.equal(model.fc1(model.flatten(noisy)), model.fc1(model.flatten(hidden)))


@pytest.mark.parametrize("conv", ["conv1", "block2.conv2", "block3.shortcut.0"])
def test_reset_channels_on_the_resnet_zero_conv_batch_norm_and_readers(conv):
    torch.manual_seed(0)
    model = SmallResNet().eval()
    with torch.no_grad():
        for module in model.modules():  # non-zero batch norm parameters, so that zeroing them shows
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
    original = copy.deepcopy(model)
    targets, _ = reset_targets(model, torch.zeros(2, 1, 28, 28))
    target = targets[conv]
    channels = np.array([0, 3])
    reset_channels(model, conv, channels, target)

    state = model.state_dict()
    expected = {name: torch.zeros_like(value, dtype=torch.bool) for name, value in state.items()}
    for name in (f"{conv}.weight", f"{target.batch_norm}.weight", f"{target.batch_norm}.bias"):
        expected[name][channels] = True
    assert target.batch_norm is not None
    assert target.next_layers and all(block == 1 for _, block in target.next_layers)
    for layer, _ in target.next_layers:
        expected[f"{layer}.weight"][:, channels] = True
    for name, where in expected.items():
        if where.any():
            assert (state[name][where] == 0).all(), name
    for name, where in _changed(original, model).items():
        assert torch.equal(where, expected[name] & (original.state_dict()[name] != 0)), name
    # The running statistics stay as they were (they are state too, and were compared above).
    assert torch.equal(state[f"{target.batch_norm}.running_var"],
                       original.state_dict()[f"{target.batch_norm}.running_var"])


def test_record_gives_softmax_and_per_channel_spatial_maxima():
    torch.manual_seed(0)
    model = SmallCNN().eval()
    x = np.random.default_rng(0).random((5, 1, 28, 28), dtype=np.float32)
    probs, peaks = record(model, x, batch_size=2)
    with torch.no_grad():
        inputs = torch.as_tensor(x)
        want = torch.softmax(model(inputs), dim=1).numpy()
        conv2 = model.conv2(model.pool1(model.relu1(model.conv1(inputs)))).amax(dim=(2, 3)).numpy()
    np.testing.assert_allclose(probs, want, rtol=1e-5, atol=1e-6)
    assert set(peaks) == {"conv1", "conv2"} and peaks["conv1"].shape == (5, 16)
    np.testing.assert_allclose(peaks["conv2"], conv2, rtol=1e-5, atol=1e-6)
    model.unused = torch.nn.Conv2d(1, 2, 3)  # a head the forward never calls (np.concatenate of nothing raised)
    assert set(record(model, x, batch_size=2)[1]) == {"conv1", "conv2"}


# -------------------------------------------------------------------------------------------- NONE training


@pytest.fixture(scope="module")
def none_runs(poisoned_set):
    """Two rounds of NONE on the same data, once with the ground truth and once without."""
    x, y, poisoned = poisoned_set
    settings = NoneSettings(rounds=2, **QUICK)
    torch.manual_seed(0)
    with_truth = train_none(SmallCNN(), x, y, settings=settings, poisoned=poisoned)
    torch.manual_seed(0)
    model = SmallCNN()
    without = train_none(model, x, y, settings=copy.deepcopy(settings))
    return with_truth, without, model


def test_none_report_agrees_with_the_ground_truth(poisoned_set, none_runs):
    x, y, poisoned = poisoned_set
    report, _, _ = none_runs
    removed = np.array(report.removed, dtype=int)
    assert (np.diff(removed) > 0).all() and removed.min() >= 0 and removed.max() < len(x)
    assert report.kept == len(x) - len(removed)
    rounds = [np.array(r.removed, dtype=int) for r in report.rounds]
    assert len(rounds) == 2
    assert np.array_equal(np.sort(np.concatenate(rounds)), removed)  # each sample is removed at most once
    assert report.precision == pytest.approx(poisoned[removed].mean())
    assert report.recall == pytest.approx(poisoned[removed].sum() / poisoned.sum())
    for r, dropped in zip(report.rounds, rounds, strict=True):
        if len(dropped):
            assert r.precision == pytest.approx(poisoned[dropped].mean())
        else:
            assert r.precision is None  # a share of nothing: not 1.0, which would read as a perfect removal
        assert r.recall == pytest.approx(poisoned[dropped].sum() / poisoned.sum())
        assert all(len(channels) == math.ceil(0.03 * (16 if conv == "conv1" else 32))
                   for conv, channels in r.reset.items())
    # NONE does find the patch: what its first round drops is mostly poisoned, and most poisoned samples are
    # in it. Natural breaks always split, so the second round, with no backdoor left, splits off a clean group; it
    # does not look poisoned, and by default nothing of it is dropped.
    first, second = report.rounds
    assert first.recall > 0.8
    # The per-class split takes class 0 and also drops the rest of it that looks like another class (not pushed):
    # with those set aside, what the round dropped is mostly poison.
    assert first.poisoned_classes == [TARGET] and first.lookalikes and np.all(y[first.lookalikes] == TARGET)
    assert set(first.lookalikes) <= set(first.removed) and not set(first.lookalikes) & set(first.unlearned)
    assert poisoned[np.setdiff1d(first.removed, first.lookalikes)].mean() > 0.9
    assert report.recall >= first.recall
    assert all(r.split >= len(r.removed) for r in report.rounds)
    assert second.split > 0 and second.removed == []
    assert json.loads(json.dumps(report.to_dict()))["removed"] == report.removed


def test_ground_truth_with_nothing_poisoned_has_no_recall():
    """A clean training set given as ground truth: recall is a share of nothing, not a perfect 1.0."""
    report = NoneReport(rounds=[], removed=[3, 7], kept=8, precision=0.0, recall=None, unlearned=0,
                        unreset_next_layers=[], seconds=0.0)
    assert "precision 0.000, recall –" in report.summary() and "not found" not in report.summary()
    # a conv whose next layer the reset could not find (a torch.cat after it, say) is named in the printed line too
    assert "0 channels reset (the next layer of a, b not found: their own weights only)" in replace(
        report, unreset_next_layers=["a", "b"]).summary()
    assert _truth(np.array([3, 7]), np.zeros(10, dtype=bool)) == (0.0, None)


def test_a_run_that_reset_nothing_says_why():
    """An under-trained model is sure of no sample: NONE then scores no channel and reset nothing, without a word."""
    idle = RoundReport(reset={"conv1": [], "conv2": []}, threshold=math.inf, split=0, removed=[], spread=None,
                       agreement=None, unlearned=[])
    report = NoneReport(rounds=[idle], removed=[], kept=10, precision=None, recall=None, unlearned=0,
                        unreset_next_layers=[], seconds=0.0, settings={"confident": 0.9, "unlikely": 0.1})
    assert "0 channels reset" in report.summary() and "softmax above 0.9" in report.summary()
    assert "softmax" not in replace(report, rounds=[replace(idle, reset={"conv1": [3]})]).summary()
    torch.manual_seed(0)  # an untrained model is sure of nothing: train_none reports the round with no reset
    x = np.random.default_rng(0).random((40, 1, 28, 28), dtype=np.float32)
    untrained = train_none(SmallCNN(), x, np.arange(40) % 10, pretrained=True, settings=NoneSettings(finetune_epochs=1))
    assert untrained.rounds and "0 channels reset" in untrained.summary() and "softmax above 0.9" in untrained.summary()


def test_none_without_ground_truth_removes_the_same_and_reports_no_precision(none_runs, poisoned_set):
    with_truth, without, model = none_runs
    assert without.precision is None and without.recall is None
    assert all(r.precision is None and r.recall is None for r in without.rounds)
    assert without.removed == with_truth.removed  # the ground truth is for the report only
    assert "precision" not in without.summary() and "precision" in with_truth.summary()
    x, y, _ = poisoned_set
    with torch.no_grad():
        accuracy = (model(torch.as_tensor(x)).argmax(1).numpy() == y).mean()
    assert accuracy > 0.6  # the fine-tuned model still classifies


def test_none_drops_the_whole_split_when_told_to(none_runs, poisoned_set):
    """`drop="split"` is the paper's rule: every round drops its split's whole upper group, the clean group of the
    second round too. The first round starts from the same model, so its split is the default run's."""
    x, y, poisoned = poisoned_set
    gated, _, _ = none_runs
    torch.manual_seed(0)
    report = train_none(SmallCNN(), x, y, settings=NoneSettings(rounds=2, drop="split", **QUICK), poisoned=poisoned)
    first, second = report.rounds
    assert first.split == gated.rounds[0].split and first.lookalikes == gated.rounds[0].lookalikes
    assert set(first.lookalikes) <= set(first.removed)  # dropped whatever the rule
    assert first.split <= len(first.removed) <= first.split + len(first.lookalikes)
    assert set(gated.rounds[0].removed) < set(first.removed)
    assert len(second.removed) == second.split > 0
    assert report.kept == len(x) - len(first.removed) - len(second.removed)
    assert first.unlearned == gated.rounds[0].unlearned  # what is pushed does not depend on what is dropped


def test_none_pushes_the_removed_poison_off_its_label_and_the_report_says_which(none_runs, poisoned_set):
    """The first round's drop is the patch's poison: labelled 0, images of many classes. It is what gets pushed off
    its label, and afterwards the model no longer answers the target for it; the second round's split is a clean group
    and is left alone."""
    x, y, poisoned = poisoned_set
    report, _, model = none_runs
    first, second = report.rounds
    pushed = np.array(first.unlearned, dtype=int)
    bars = NoneSettings()
    assert first.spread >= bars.min_spread and len(pushed) > 0
    assert set(pushed) <= set(first.removed) and np.all(y[pushed] == TARGET)
    assert first.unlearned_precision == pytest.approx(poisoned[pushed].mean()) and first.unlearned_precision > 0.9
    assert first.agreement is not None and first.agreement >= bars.min_agreement
    assert second.spread is not None and second.unlearned == []
    assert second.spread < bars.min_spread or (second.agreement is not None and second.agreement < bars.min_agreement)
    assert report.unlearned == len(pushed)
    assert "pushed off their label" in report.summary()
    # A round that pushes fine-tunes `unlearn_epochs` longer; one that pushes nothing runs E2 alone.
    assert first.epochs == QUICK["finetune_epochs"] + bars.unlearn_epochs and second.epochs == QUICK["finetune_epochs"]
    # The same run with unlearning off drops the same samples and pushes none; its model still answers the target
    # for most of the poison it dropped, the pushed model for far fewer.
    torch.manual_seed(0)
    plain = SmallCNN()
    off = train_none(plain, x, y, settings=NoneSettings(rounds=2, unlearn=0.0, **QUICK), poisoned=poisoned)
    assert off.rounds[0].removed == first.removed and off.rounds[0].spread == pytest.approx(first.spread)
    assert off.unlearned == 0 and all(r.unlearned == [] and r.epochs == QUICK["finetune_epochs"] for r in off.rounds)
    with torch.no_grad():
        target_share = [(m(torch.as_tensor(x[pushed])).argmax(1).numpy() == TARGET).mean() for m in (plain, model)]
    assert target_share[0] > 0.6 and target_share[1] < target_share[0] - 0.3


def test_runner_up_spread_tells_many_source_classes_from_one_neighbour():
    many = np.full((900, 10), 0.001)
    many[:, 0] = 0.9
    many[np.arange(900), 1 + np.arange(900) % 9] = 0.09  # runner-ups spread evenly over the 9 other classes
    assert runner_up_spread(many, 0) == pytest.approx(1.0)
    one = np.full((900, 10), 0.001)
    one[:, 0], one[:, 6] = 0.9, 0.09  # every runner-up is class 6 (a shirt behind a T-shirt)
    assert runner_up_spread(one, 0) == pytest.approx(0.0)


def test_neighbour_labels_vote_among_the_nearest_inputs():
    reference = np.array([[0.0, 0.0], [0.1, 0.0], [0.0, 0.1], [5.0, 5.0], [5.1, 5.0]])
    labels = np.array([2, 2, 7, 4, 4])
    queries = np.array([[0.05, 0.05], [4.9, 5.2], [0.0, 0.2]])
    assert neighbour_labels(queries, reference, labels, k=3).tolist() == [2, 4, 2]
    assert neighbour_labels(queries, reference, labels, k=1).tolist() == [2, 4, 7]
    assert neighbour_labels(queries[:1], reference, labels, k=50).tolist() == [2]  # k capped at the reference


def _gate_set(rng: np.random.Generator, poisoned_looks: str) -> tuple[np.ndarray, ...]:
    """1,800 samples in 10 well-separated pixel clusters: 900 labelled 0, the upper half of which the split removed,
    and 100 kept samples of each other class. The removed ones are either poison (images of class 1 + i % 9 under
    label 0) or a natural group of class 0's own images; the model ranks class 1 + i % 9 second for all of them."""
    centres = rng.normal(0, 10, (10, 16))
    truth = np.concatenate([np.zeros(900, dtype=int), np.repeat(np.arange(1, 10), 100)])
    removed = np.zeros(1800, dtype=bool)
    removed[:450] = True
    if poisoned_looks == "true class":
        truth[:450] = 1 + np.arange(450) % 9
    x = centres[truth] + rng.normal(0, 0.5, (1800, 16))
    labels = np.concatenate([np.zeros(900, dtype=int), truth[900:]])
    probs = np.full((1800, 10), 0.001)
    probs[np.arange(1800), labels] = 0.9
    probs[np.arange(900), 1 + np.arange(900) % 9] = 0.09
    suspicion = np.where(removed, 5.0, 1.0) + rng.normal(0, 0.1, 1800)
    return probs, labels, suspicion, removed, x


def test_unlearning_set_pushes_poison_that_looks_like_its_runner_up_only():
    rng = np.random.default_rng(0)
    settings = NoneSettings()
    probs, labels, suspicion, removed, x = _gate_set(rng, "true class")
    chosen, spread, agreement = unlearning_set(probs, labels, suspicion, removed, x, settings)
    assert spread == pytest.approx(1.0, abs=0.01) and agreement == pytest.approx(1.0)
    assert np.array_equal(chosen, removed)
    # The same runner-ups, but the removed samples look like their own label: a natural group, not poison. The
    # spread alone would push them; the agreement does not.
    probs, labels, suspicion, removed, x = _gate_set(rng, "own label")
    chosen, spread, agreement = unlearning_set(probs, labels, suspicion, removed, x, settings)
    assert spread == pytest.approx(1.0, abs=0.01) and agreement < 0.2 and not chosen.any()
    chosen, _, _ = unlearning_set(probs, labels, suspicion, removed, x, replace(settings, min_agreement=0.0))
    assert np.array_equal(chosen, removed)
    # Runner-ups that all name one class fail the spread, and the agreement is not measured.
    one = probs.copy()
    one[:900, 1:] = 0.001
    one[:900, 6] = 0.09
    chosen, spread, agreement = unlearning_set(one, labels, suspicion, removed, x, settings)
    assert spread == pytest.approx(0.0) and agreement is None and not chosen.any()


def test_unlearning_set_takes_the_common_label_and_what_stands_out_within_it():
    rng = np.random.default_rng(1)
    probs, labels, suspicion, removed, x = _gate_set(rng, "true class")
    anything = NoneSettings(min_spread=0.0, min_agreement=0.0)
    # Only the removed group's most common label is pushed ...
    mixed = labels.copy()
    mixed[:50] = 3
    chosen, _, _ = unlearning_set(probs, mixed, suspicion, removed, x, anything)
    assert np.array_equal(chosen, removed & (mixed == 0))
    # ... and of it, only what stands out within that label: the split over all samples took some of the label's
    # clean samples (suspicion 2.5, between the label's clean 1 and its poison 5), the split within it does not.
    taken_too = ~removed & (labels == 0) & (rng.random(1800) < 0.2)
    suspicion[taken_too] = 2.5
    chosen, _, _ = unlearning_set(probs, labels, suspicion, removed | taken_too, x, anything)
    assert np.array_equal(chosen, removed)
    chosen, spread, agreement = unlearning_set(probs, labels, suspicion, np.zeros(1800, dtype=bool), x, anything)
    assert not chosen.any() and spread is None and agreement is None


def _per_class_set(rng: np.random.Generator, upper_looks: str, below: int = 0) -> tuple[np.ndarray, ...]:
    """1,000 samples of 10 classes in well-separated pixel clusters, every class confident in its label; on one conv,
    channel 3 peaks for 60 of class 0's samples. Those 60 are images of class 1 + i % 9 (poison under label 0), or of
    class 0 itself (a natural group). The next `below` samples of class 0 are poison that does not peak."""
    centres = rng.normal(0, 10, (10, 16))
    labels = np.repeat(np.arange(10), 100)
    truth = labels.copy()
    marked = np.arange(60)
    if upper_looks == "other classes":
        truth[marked] = 1 + marked % 9
    hidden = np.arange(60, 60 + below)
    truth[hidden] = 1 + hidden % 9
    x = centres[truth] + rng.normal(0, 0.5, (1000, 16))
    probs = np.full((1000, 10), 0.005)
    probs[np.arange(1000), labels] = 0.955
    peaks = np.abs(rng.normal(1.0, 0.2, (1000, 6)))
    peaks[marked, 3] = 8.0
    return probs, {"conv": peaks}, labels, x, marked


def test_per_class_split_takes_a_class_whose_upper_group_looks_like_other_classes():
    rng = np.random.default_rng(0)
    settings = NoneSettings(class_contrast=0.6)
    probs, peaks, labels, x, marked = _per_class_set(rng, "other classes")
    chosen, lookalikes, contrast = per_class_suspects(probs, peaks, labels, x, settings)
    assert np.array_equal(np.flatnonzero(chosen), marked)
    assert not lookalikes.any()  # the rest of class 0 looks like class 0
    assert contrast[0] == pytest.approx(1.0)
    assert all(abs(c) < 0.6 for k, c in contrast.items() if k != 0)  # the other classes' splits look like them
    # The same split of class 0, but its upper group looks like class 0: a natural group, left alone.
    probs, peaks, labels, x, marked = _per_class_set(rng, "own label")
    chosen, lookalikes, contrast = per_class_suspects(probs, peaks, labels, x, settings)
    assert not chosen.any() and not lookalikes.any() and contrast[0] == pytest.approx(0.0)


def test_per_class_split_drops_the_poison_a_taken_class_left_below_its_break():
    """Ten poisoned samples of class 0 do not peak, so the split leaves them in the lower group; once class 0 is
    taken, they are exactly the rest of it that looks like another class. Other classes are never searched."""
    rng = np.random.default_rng(0)
    probs, peaks, labels, x, marked = _per_class_set(rng, "other classes", below=10)
    chosen, lookalikes, contrast = per_class_suspects(probs, peaks, labels, x, NoneSettings(class_contrast=0.6))
    assert np.array_equal(np.flatnonzero(chosen), marked) and contrast[0] >= 0.6
    assert np.array_equal(np.flatnonzero(lookalikes), np.arange(60, 70))
    chosen_off, lookalikes_off, _ = per_class_suspects(probs, peaks, labels, x,
                                                        NoneSettings(class_contrast=0.6, drop_lookalikes=False))
    assert np.array_equal(chosen_off, chosen) and not lookalikes_off.any()


def test_none_refuses_bad_ground_truth_and_settings(poisoned_set):
    x, y, poisoned = poisoned_set
    with pytest.raises(GuardError, match=r"poisoned ground truth must be \(N,\) = \(2000,\)"):
        train_none(SmallCNN(), x, y, settings=NoneSettings(epochs=0), poisoned=poisoned[:10])
    for change, message in [({"ratio": 0.0}, "--ratio must lie in"), ({"rounds": -1}, "must be >= 0"),
                            ({"unlearn_epochs": -1}, "unlearn epochs must be >= 0"),
                            ({"confident": 0.05}, "softmax bounds"), ({"batch_size": 0}, "batch size >= 1"),
                            ({"unlearn": -0.1}, "--unlearn must be"), ({"unlearn": float("nan")}, "--unlearn must be"),
                            ({"min_spread": 1.5}, "spread lie in"), ({"min_agreement": -0.1}, "agreement must lie"),
                            ({"neighbours": 0}, "neighbours be >= 1"),
                            ({"drop": "all"}, "--drop must be one of gated, split"),
                            ({"class_contrast": -0.1}, "--class-contrast must lie in"),
                            ({"class_contrast": 1.5}, "--class-contrast must lie in"),
                            ({"reference": 0}, "reference set be >= 1")]:
        with pytest.raises(GuardError, match=message):
            NoneSettings(**change).validate()


# ------------------------------------------------------------------------------------------------------ CLI


@pytest.fixture(scope="module")
def train_file(poisoned_set, tmp_path_factory):
    x, y, poisoned = poisoned_set
    path = tmp_path_factory.mktemp("train") / "poisoned.npz"
    np.savez(path, x=x[:1200], y=y[:1200], poisoned=poisoned[:1200])
    return path


def test_cli_train_none_writes_the_model_and_its_report(train_file, tmp_path):
    out = tmp_path / "none.onnx"
    code, stdout = _run_cli(["train", "--data", str(train_file), "--model", "cnn", "--out", str(out),
                             "--none",
                             "--epochs", "2", "--lr", "0.003", "--batch-size", "32", "--finetune-epochs", "1",
                             "--ratio", "0.1", "--unlearn", "0.5", "--unlearn-epochs", "0", "--drop", "split", "--class-contrast", "0.5",
                             "--seed", "0"])
    assert code == 0
    loaded = load_model(out)
    assert loaded.num_classes == 10 and loaded.sample_shape == (1, 28, 28)
    report_path = tmp_path / "none.train.json"
    report = json.loads(report_path.read_text())
    with np.load(train_file) as data:
        poisoned = data["poisoned"]
    removed = np.array(report["removed"], dtype=int)
    assert report["samples"] == 1200 and report["model"] == "cnn"
    assert report["kept"] == 1200 - len(removed) and len(removed) > 0
    assert report["precision"] == pytest.approx(poisoned[removed].mean())
    assert report["recall"] == pytest.approx(poisoned[removed].sum() / poisoned.sum())
    assert report["settings"]["ratio"] == 0.1 and report["settings"]["batch_size"] == 32
    first = report["rounds"][0]
    assert report["settings"]["drop"] == "split" and set(first["lookalikes"]) <= set(removed)
    assert first["split"] <= len(removed) <= first["split"] + len(first["lookalikes"])
    assert report["settings"]["unlearn"] == 0.5 and report["unlearned"] == sum(len(r["unlearned"])
                                                                                for r in report["rounds"])
    assert report["settings"]["unlearn_epochs"] == 0 and all(r["epochs"] == 1 for r in report["rounds"])
    assert [len(c) for c in report["rounds"][0]["reset"].values()] == [2, 4]  # ceil(0.1 * 16), ceil(0.1 * 32)
    contrast = report["rounds"][0]["contrast"]
    assert report["settings"]["class_contrast"] == 0.5 and contrast and {int(k) for k in contrast} <= set(range(10))
    assert report["rounds"][0]["poisoned_classes"] == [int(k) for k, c in contrast.items() if c >= 0.5]
    assert 0 <= report["training_accuracy"] <= 1
    assert str(out) in stdout and "samples removed" in stdout


def test_cli_train_builds_a_users_factory(train_file, tmp_path, monkeypatch):
    (tmp_path / "guard_test_nets_ok.py").write_text(textwrap.dedent("""
        from torch import nn

        def tiny(num_classes, in_channels=3):
            return nn.Sequential(nn.Conv2d(in_channels, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(4),
                                 nn.Flatten(), nn.Linear(4 * 7 * 7, num_classes))
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    with np.load(train_file) as data:
        keep = data["y"] < 7  # 7 classes: the factory must be told
        np.savez(tmp_path / "seven.npz", x=data["x"][keep], y=data["y"][keep])
    out = tmp_path / "tiny.onnx"
    code, _ = _run_cli(["train", "--data", str(tmp_path / "seven.npz"), "--model", "guard_test_nets_ok:tiny",
                        "--out", str(out), "--epochs", "1"])
    assert code == 0
    loaded = load_model(out)
    assert loaded.num_classes == 7 and loaded.sample_shape == (1, 28, 28)  # in_channels came from the data
    report = json.loads((tmp_path / "tiny.train.json").read_text())
    assert report["model"] == "guard_test_nets_ok:tiny" and "removed" not in report


@pytest.mark.parametrize(("spec", "source", "message"), [
    ("transformer", None, "the architecture must be cnn, resnet or package.module:factory, got 'transformer'"),
    ("guard_test_no_such_module:make", None, "cannot import 'guard_test_no_such_module:make'"),
    ("guard_test_nets_str:make", "def make():\n    return 'a model'\n",
     "guard_test_nets_str:make returned str, not a torch nn.Module"),
    ("guard_test_nets_missing:other", "def make():\n    return None\n",
     "cannot import 'guard_test_nets_missing:other'"),
    ("guard_test_nets_narrow:make",
     "from torch import nn\n\ndef make():\n    return nn.Sequential(nn.Flatten(), nn.Linear(784, 3))\n",
     "output has shape (2, 3); it needs (N, >= 10) logits"),
    # refused before training, by a trial export: a file guard could not read would be written after it
    ("guard_test_nets_softmax:make",
     "from torch import nn\n\ndef make():\n    return nn.Sequential(nn.Flatten(), nn.Linear(784, 10), nn.Softmax(1))\n",
     "is a Softmax of its logits"),
    # refused before training: guard trains in channels-last, where x.view after a conv raised a traceback
    ("guard_test_nets_view:make",
     "from torch import nn\n\nclass Net(nn.Sequential):\n    def forward(self, x):\n"
     "        return self[2](self[1](self[0](x)).view(len(x), -1))\n\n"
     "def make():\n    return Net(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Linear(2 * 28 * 28, 10))\n",
     "fails on channels-last tensors, the layout guard trains in (RuntimeError: view size is not compatible"),
    ("guard_test_nets_value:make", "make = 42\n", "guard_test_nets_value:make is not callable (a int object)"),
    # more logits than classes: trained without a word, then refused by calibrate for the classes with no sample
    ("guard_test_nets_wide:make",
     "from torch import nn\n\ndef make():\n    return nn.Sequential(nn.Flatten(), nn.Linear(784, 12))\n",
     "answers 12 logits, but the labels name 10 classes"),
    # an auxiliary head's logits beside the main ones while training: the loss took them with a TypeError
    # a module deepcopy cannot copy (a lock) trains as before; the training-mode check ran on a deepcopy of it
    ("guard_test_nets_locked:make",
     "import threading\nfrom torch import nn\n\nclass Net(nn.Sequential):\n    def __init__(self, *layers):\n"
     "        super().__init__(*layers)\n        self.lock = threading.Lock()\n\n"
     "def make():\n    return Net(nn.Flatten(), nn.Linear(784, 10), nn.Softmax(1))\n",
     "is a Softmax of its logits"),
    ("guard_test_nets_aux:make",
     "from torch import nn\n\nclass Net(nn.Sequential):\n    def forward(self, x):\n"
     "        out = super().forward(x)\n        return (out, out) if self.training else out\n\n"
     "def make():\n    return Net(nn.Flatten(), nn.Linear(784, 10))\n",
     "answers tuple in training mode; guard trains on (N, 10) logits"),
    # a batch size the forward writes out, or turns into a number: guard runs batches of any size
    ("guard_test_nets_two:make",
     "from torch import nn\n\nclass Net(nn.Linear):\n    def forward(self, x):\n"
     "        return super().forward(x.reshape(2, -1))\n\ndef make():\n    return Net(784, 10)\n",
     "cannot run on a batch of 4 (RuntimeError: mat1 and mat2 shapes cannot be multiplied"),
    ("guard_test_nets_int:make",
     "from torch import nn\n\nclass Net(nn.Linear):\n    def forward(self, x):\n"
     "        return super().forward(x.reshape(int(x.shape[0]), -1))\n\ndef make():\n    return Net(784, 10)\n",
     "exported with its batch size fixed at 1: its forward turns the batch size into a number"),
])
def test_cli_train_refuses_an_architecture_it_cannot_build(train_file, tmp_path, monkeypatch, capsys, spec,
                                                           source, message):
    if source is not None:
        (tmp_path / f"{spec.partition(':')[0]}.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "model.onnx"
    argv = ["train", "--data", str(train_file), "--model", spec, "--out", str(out), "--epochs", "1"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("guard: error: ") and message in err and "Traceback" not in err
    assert not out.exists()


def test_cli_train_refuses_none_settings_without_none(train_file, tmp_path, capsys):
    # a forgotten --none would train an undefended model under a report that lists NONE's settings
    out = tmp_path / "m.onnx"
    assert main(["train", "--data", str(train_file), "--model", "cnn", "--out", str(out), "--rounds", "3",
                 "--drop", "split"]) == 2
    assert "--rounds/--drop set NONE's rounds; without --none" in capsys.readouterr().err
    assert not out.exists()


def test_cli_train_takes_any_sample_count_and_writes_strict_json(train_file, tmp_path, monkeypatch):
    """257 samples in batches of 128 leave a last batch of one, which a BatchNorm1d cannot train on: it joins the
    batch before. A round that finds no confident class makes no split: its threshold is null, not Infinity."""
    (tmp_path / "guard_test_nets_bn1d.py").write_text(textwrap.dedent("""
        from torch import nn

        def make(num_classes):
            return nn.Sequential(nn.Flatten(), nn.Linear(784, 16), nn.BatchNorm1d(16), nn.ReLU(),
                                 nn.Linear(16, num_classes))
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    with np.load(train_file) as data:
        np.savez(tmp_path / "odd.npz", x=data["x"][:257], y=data["y"][:257])
    out = tmp_path / "bn.onnx"
    code, _ = _run_cli(["train", "--data", str(tmp_path / "odd.npz"), "--model", "guard_test_nets_bn1d:make",
                        "--out", str(out), "--epochs", "1"])
    assert code == 0 and load_model(out).num_classes == 10
    # NONE with nothing to go on resets nothing: the model would be a plainly trained one (a poisoned training set's
    # backdoor and all) under --none's name, and is not written; the report is, as rejected.
    out = tmp_path / "none.onnx"
    code, _ = _run_cli(["train", "--data", str(train_file), "--model", "cnn", "--out", str(out), "--none",
                        "--epochs", "1", "--lr", "1e-9", "--finetune-epochs", "0", "--unlearn-epochs", "0"])
    assert code == 2 and not out.exists() and not (tmp_path / "none.train.json").exists()
    text = (tmp_path / "none.train.rejected.json").read_text()
    report = json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in the report"))
    assert report["rounds"][0]["threshold"] is None
    # a later run that writes the model takes the rejected report away: it describes no model beside it
    code, _ = _run_cli(["train", "--data", str(tmp_path / "odd.npz"), "--model", "cnn", "--out", str(out),
                        "--epochs", "1"])
    assert code == 0 and out.exists() and (tmp_path / "none.train.json").exists()
    assert not (tmp_path / "none.train.rejected.json").exists()


def test_build_names_the_builtin_architectures():
    x, y = np.zeros((4, 3, 28, 28), np.float32), np.array([0, 1, 2, 4])
    cnn = build("cnn", x, y)
    assert isinstance(cnn, SmallCNN) and cnn.fc2.out_features == 5 and cnn.conv1.in_channels == 3
    assert isinstance(build("resnet", x, y), SmallResNet)


def test_cli_train_none_refuses_a_conv_run_twice_before_training(train_file, tmp_path, monkeypatch, capsys):
    """NONE records a conv's channel peaks per run: a shared conv's outnumbered the samples, an IndexError after
    the whole training."""
    (tmp_path / "guard_test_nets_shared.py").write_text(textwrap.dedent("""
        from torch import nn

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.conv = nn.Conv2d(1, 1, 3, padding=1)
                self.head = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))

            def forward(self, x):
                return self.head(self.conv(self.conv(x)))

        def make():
            return Net()
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    trained = []
    monkeypatch.setattr("guard.eval.models.train", lambda *args, **kwargs: trained.append(args))
    out = tmp_path / "m.onnx"
    assert main(["train", "--data", str(train_file), "--model", "guard_test_nets_shared:make", "--out", str(out),
                 "--none"]) == 2
    err = capsys.readouterr().err
    assert "a forward pass runs ['conv'] more than once (shared weights)" in err and "Traceback" not in err
    assert trained == [] and not out.exists()


@pytest.mark.parametrize(("flags", "message"), [
    (["--epochs", "0"], "--epochs must be at least 1, got 0"),  # wrote an untrained model as a success
    (["--none", "--rounds", "0"], "--epochs and --rounds must be at least 1, got 3 and 0"),  # trained, then refused
])
def test_cli_train_refuses_no_training_before_reading_the_model(train_file, tmp_path, capsys, flags, message):
    out = tmp_path / "m.onnx"
    assert main(["train", "--data", str(train_file), "--model", "cnn", "--out", str(out), *flags]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_cli_train_refuses_weights_that_diverged(train_file, tmp_path, capsys):
    out = tmp_path / "made" / "deeper" / "m.onnx"
    assert main(["train", "--data", str(train_file), "--model", "cnn", "--out", str(out), "--epochs", "1",
                 "--lr", "1e20"]) == 2
    err = capsys.readouterr().err
    assert "the training diverged: the weights are no longer finite" in err and "try a lower --lr" in err
    assert not (tmp_path / "made").exists()  # the folders made for --out went with the run


def test_cli_train_never_removes_an_input_or_output_as_the_reports_rejected_sibling(train_file, tmp_path, capsys):
    """A successful run removes an earlier run's rejected report: --data train.rejected.npz --report train.npz
    deleted the training data, --out r.rejected.json --report r.json the model just written."""
    data = tmp_path / "train.rejected.npz"
    data.write_bytes(train_file.read_bytes())
    assert main(["train", "--data", str(data), "--model", "cnn", "--out", str(tmp_path / "m.onnx"),
                 "--report", str(tmp_path / "train.npz"), "--epochs", "1"]) == 2
    assert "is one of this command's inputs or outputs" in capsys.readouterr().err and data.is_file()
    assert main(["train", "--data", str(train_file), "--model", "cnn", "--out", str(tmp_path / "r.rejected.json"),
                 "--report", str(tmp_path / "r.json"), "--epochs", "1"]) == 2
    assert "is one of this command's inputs or outputs" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.rejected.npz"]


def test_a_training_stopped_by_sigterm_leaves_no_file_and_no_folder_it_made(train_file, tmp_path):
    """Python's default SIGTERM (a container's stop, `timeout`) ended the process at once: the folders made for
    --out stayed, where Ctrl-C removed them."""
    out = tmp_path / "made" / "deeper" / "m.onnx"
    process = subprocess.Popen([sys.executable, "-m", "guard", "train", "--data", str(train_file), "--model", "cnn",
                                "--out", str(out), "--epochs", "200"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 120
        while not out.parent.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert out.parent.exists(), process.communicate()
        time.sleep(2)  # training
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 128 + signal.SIGTERM and "Traceback" not in err, err
    assert not (tmp_path / "made").exists()


def test_cli_train_refuses_data_without_labels_or_with_bad_ground_truth(train_file, tmp_path, capsys):
    with np.load(train_file) as data:
        x, y = data["x"], data["y"]
    unlabelled = tmp_path / "unlabelled.npz"
    np.savez(unlabelled, x=x)
    out = tmp_path / "m.onnx"
    assert main(["train", "--data", str(unlabelled), "--model", "cnn", "--out", str(out), "--none"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"guard: error: {unlabelled} has no labels y: training needs them"
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, x=x, y=y, poisoned=np.full(len(x), 2))
    assert main(["train", "--data", str(wrong), "--model", "cnn", "--out", str(out), "--none"]) == 2
    assert "poisoned in" in capsys.readouterr().err
    assert main(["train", "--data", str(train_file), "--model", "cnn", "--out", str(out), "--none",
                 "--ratio", "2"]) == 2
    assert "--ratio must lie in (0, 1], got 2.0" in capsys.readouterr().err
    assert main(["train", "--data", str(train_file), "--model", "cnn", "--out", str(out), "--none",
                 "--unlearn", "-1"]) == 2
    assert "--unlearn must be a finite number >= 0" in capsys.readouterr().err
    assert not out.exists()


def test_a_stop_inside_the_exporter_stays_a_stop(tmp_path, monkeypatch):
    """SIGTERM during torch.export's lazy imports came back as TorchExportError (an AttributeError after it), and
    guard train said the model does not export, exit 2, instead of stopping (143)."""
    from guard.repair import architectures

    def cut_short(*_args):  # the chain torch 2.13 gave: TorchExportError from AttributeError, during SystemExit
        try:
            try:
                raise SystemExit(143)
            except SystemExit:
                raise AttributeError("module 'torch._dynamo' has no attribute 'exc'") from None
        except AttributeError as exc:
            raise RuntimeError("Failed to export the model with torch.export") from exc

    monkeypatch.setattr("guard.eval.models.export_onnx", cut_short)
    with pytest.raises(SystemExit) as stopped:
        architectures.export_checked(SmallCNN(), "cnn", (1, 28, 28), tmp_path / "m.onnx")
    assert stopped.value.code == 143
