"""`guard repair`: the adaptive-regularization penalty, the weights it reaches through the graph, and the
repair of the real BadNets model (weights only, graph unchanged; with the scan's trigger the real attack
mostly stops working at little clean accuracy); the prune method and the CLI's files and refusals."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from conftest import TARGET, Scanned
from guard.calibrate.pipeline import CalibrationSettings, calibrate
from guard.calibrate.profile import Profile
from guard.calibrate.synthesis import Trigger, load_trigger
from guard.calibrate.taps import OnnxTaps
from guard.cli import main
from guard.errors import GuardError, ModelError
from guard.eval.models import SmallCNN, SmallResNet, export_onnx
from guard.model.graph import channel_producers, default_taps, load_model
from guard.repair.adaptive_reg import RepairSettings, _costly, _unlearning_batch, penalty_coefficients, repair

SAMPLE_SHAPE = (1, 28, 28)


# -------------------------------------------------------------------------------------------------- helpers


def _session(model: onnx.ModelProto | Path) -> ort.InferenceSession:
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else Path(model).read_bytes()
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"])


def _labels(model: onnx.ModelProto | Path, x: np.ndarray) -> np.ndarray:
    session = _session(model)
    name = session.get_inputs()[0].name
    return session.run(None, {name: np.asarray(x, dtype=np.float32)})[0].argmax(1)


def _rates(model: onnx.ModelProto | Path, backdoored) -> tuple[float, float]:
    """(clean accuracy on the evaluation images, real attack success on their triggered non-target images)."""
    accuracy = float((_labels(model, backdoored.x_eval) == backdoored.y_eval).mean())
    triggered, _ = backdoored.triggered()
    return accuracy, float((_labels(model, triggered) == TARGET).mean())


def _arrays(proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {init.name: numpy_helper.to_array(init) for init in proto.graph.initializer}


def _run_cli(argv: list[str]) -> tuple[int, str]:
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(argv)
    return code, stdout.getvalue()


# ------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def clean_data(backdoored, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("repair-data") / "clean.npz"
    np.savez(path, x=backdoored.x_clean, y=backdoored.y_clean)
    return path


@pytest.fixture(scope="module")
def scan_out(scanned: Scanned) -> Path:
    """`guard scan` at its defaults (conftest's, shared with test_scan); its trigger.npz feeds the repairs."""
    assert (scanned.out / "trigger.npz").is_file(), "the scan named no suspect, so it wrote no trigger"
    return scanned.out


@pytest.fixture(scope="module")
def trigger(scan_out):
    loaded = load_trigger(scan_out / "trigger.npz", SAMPLE_SHAPE, 10)
    assert loaded.target == TARGET
    return loaded


@pytest.fixture(scope="module")
def ar_repair(backdoored, trigger):
    """Method ar with the scan's trigger, default settings."""
    return repair(backdoored.model_path, backdoored.x_clean, backdoored.y_clean,
                  settings=RepairSettings(method="ar"), triggers=[trigger])


@pytest.fixture(scope="module")
def graphs(tmp_path_factory) -> dict[str, onnx.ModelProto]:
    """Untrained SmallCNN and SmallResNet exports; the ResNet's batch norms get non-trivial statistics so that
    folding them leaves a bias on every conv."""
    root = tmp_path_factory.mktemp("producers")
    torch.manual_seed(3)
    resnet = SmallResNet()
    with torch.no_grad():
        for m in resnet.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    sample = torch.zeros(1, *SAMPLE_SHAPE)
    return {
        "cnn": load_model(export_onnx(SmallCNN(), root / "cnn.onnx", sample)).proto,
        "resnet": load_model(export_onnx(resnet, root / "resnet.onnx", sample)).proto,
    }


# -------------------------------------------------------------------------------------------------- penalty


def test_ar_penalty_gradient_is_2cw_and_zero_outside_the_infected_weights():
    generator = torch.Generator().manual_seed(0)
    w0 = torch.randn(8, 4, 3, 3, generator=generator) * torch.logspace(-3, 0, 8)[:, None, None, None]
    w0[0, 0, 0, 0] = 0.0  # a weight that starts at zero: eps keeps its coefficient finite
    infected = (torch.rand(w0.shape, generator=generator) < 0.3).float()
    infected[0, 0, 0, 0] = 1.0
    eps = 1e-3
    c = penalty_coefficients(w0, infected, "ar", eps)
    assert torch.isfinite(c).all()
    torch.testing.assert_close(c, infected / (w0.abs() + eps) ** 2)

    w = (w0 + 0.1 * torch.randn(w0.shape, generator=generator)).requires_grad_(True)
    (c * w ** 2).sum().backward()
    torch.testing.assert_close(w.grad, 2 * c * w.detach())
    assert (w.grad[infected == 0] == 0).all()
    assert (w.grad[infected == 1] != 0).all()

    # Relative to the start: halving any infected weight costs 1/4 (up to eps), whatever its magnitude.
    magnitude = 10 ** torch.empty(200).uniform_(-3, 0, generator=generator)
    start = magnitude * torch.where(torch.rand(200, generator=generator) < 0.5, -1.0, 1.0)
    ones = torch.ones(200)
    relative = penalty_coefficients(start, ones, "ar", 1e-6) * (0.5 * start) ** 2
    torch.testing.assert_close(relative, torch.full_like(relative, 0.25), rtol=5e-3, atol=0)
    plain = penalty_coefficients(start, ones, "l2", 1e-6) * (0.5 * start) ** 2
    assert plain.max() / plain.min() > 1e4  # plain L2 barely touches the small weights


def test_unlearning_stamps_the_share_asked_each_image_with_one_of_the_triggers():
    def trigger(target: int, column: int, value: float) -> Trigger:
        mask = np.zeros((1, 4, 4), np.float32)
        mask[0, :, column] = 1
        return Trigger(target=target, mask=mask, pattern=np.full((1, 4, 4), value, np.float32), success=1.0,
                       mask_l1=4.0)

    images = torch.full((4000, 1, 4, 4), 0.5)
    triggers = [trigger(0, 0, 1.0), trigger(3, 3, 0.0)]
    out = _unlearning_batch(images, triggers, 0.3, torch.Generator().manual_seed(0))
    first = (out[:, 0, :, 0] == 1.0).all(dim=1)
    second = (out[:, 0, :, 3] == 0.0).all(dim=1)
    untouched = (out == 0.5).flatten(1).all(dim=1)
    assert not (first & second).any()  # one trigger per image, never both
    assert (first | second | untouched).all()
    assert 0.27 < (first | second).float().mean() < 0.33
    assert 0.4 < first.sum() / (first | second).sum() < 0.6  # both triggers drawn alike
    assert (_unlearning_batch(images, triggers, 0.0, torch.Generator()) == images).all()


def test_l2_coefficients_are_the_mask_and_finetune_has_none():
    generator = torch.Generator().manual_seed(1)
    w0 = torch.randn(16, 5, generator=generator)
    infected = (torch.rand(w0.shape, generator=generator) < 0.5).float()
    l2 = penalty_coefficients(w0, infected, "l2", 1e-3)
    assert torch.equal(l2, infected)
    l2[0, 0] = 123.0  # a copy: changing it leaves the mask alone
    assert infected[0, 0] != 123.0
    assert torch.equal(penalty_coefficients(w0, infected, "finetune", 1e-3), torch.zeros_like(w0))


# ---------------------------------------------------------------------------------------- channel producers


def _tap_channel(proto: onnx.ModelProto, tap: str, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        _, acts = OnnxTaps(load_model(proto), [tap]).run(torch.as_tensor(x))
    return acts[0].numpy()


def _zero_channel(proto: onnx.ModelProto, producers, channel: int) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    names = {p.weight: p.axis for p in producers} | {p.bias: 0 for p in producers if p.bias}
    for init in out.graph.initializer:
        if init.name in names:
            value = numpy_helper.to_array(init).copy()
            np.moveaxis(value, names[init.name], 0)[channel] = 0
            init.CopyFrom(numpy_helper.from_array(value, init.name))
    return out


def test_channel_producers_name_the_layers_behind_the_default_taps(graphs):
    cnn = graphs["cnn"]
    taps = default_taps(load_model(cnn), conv_taps=RepairSettings().conv_taps)
    found = [channel_producers(cnn, t) for t in taps]
    assert [[(p.weight, p.axis, p.bias) for p in f] for f in found] == [
        [("conv1.weight", 0, "conv1.bias")],
        [("conv2.weight", 0, "conv2.bias")],
        [("fc1.weight", 0, "fc1.bias")],  # Gemm with transB: the output axis of its (out, in) weight is 0
    ]
    resnet = graphs["resnet"]
    taps = default_taps(load_model(resnet), conv_taps=RepairSettings().conv_taps)
    weights = [sorted(p.weight for p in channel_producers(resnet, t)) for t in taps]
    assert weights == [
        ["block3.conv1.weight"],
        ["block3.conv2.weight", "block3.shortcut.0.weight"],  # the residual sum: both branches
        ["block3.conv2.weight", "block3.shortcut.0.weight"],  # through global pooling and its flatten
    ]
    assert all(p.bias is not None and p.axis == 0 for t in taps for p in channel_producers(resnet, t))
    with pytest.raises(ModelError, match="found no Conv/Gemm/MatMul"):
        channel_producers(resnet, load_model(resnet).input_name)


def test_a_flattened_conv_map_feeding_the_logits_is_calibrated_and_left_out_of_the_penalised_taps(tmp_path: Path):
    """conv -> relu -> flatten -> linear: the default taps' feature vector is the conv map flattened, whose features
    are positions, which no layer computes one by one. Calibration's reference (plain fine-tuning) failed on it after
    every pass; AR leaves it out of its default taps, and refuses it, named as a layer, before any pass."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                              torch.nn.Linear(4 * 8 * 8, 3)).eval()
    path = tmp_path / "flat.onnx"
    export_onnx(net, path, torch.zeros(1, 1, 8, 8))
    loaded = load_model(path)
    x = np.random.default_rng(0).random((300, 1, 8, 8), dtype=np.float32)
    y = _labels(path, x)
    conv, flat = default_taps(loaded, conv_taps=2)
    assert default_taps(loaded, conv_taps=2, repairable=True) == [conv]
    with pytest.raises(ModelError, match="found no Conv/Gemm/MatMul"):
        channel_producers(loaded.proto, flat)

    from guard.calibrate.pipeline import CalibrationSettings, calibrate
    profile = calibrate(loaded, x, y, settings=CalibrationSettings(reference_folds=1))
    assert profile.tap_names == [conv, flat]
    _, report = repair(loaded, x, y, settings=RepairSettings(method="ar", epochs=1))
    assert list(report.infected) == [conv]  # the conv map alone: its four channels are the conv's
    with pytest.raises(ModelError, match=r"--method ar penalises .* no Conv/Gemm/MatMul layer computes those of"):
        repair(loaded, x, y, settings=RepairSettings(method="ar", layers=[flat]))


def test_channel_producers_follow_a_projection_shortcut_but_not_an_identity_one(graphs):
    proto = graphs["resnet"]
    producer = {out: node for node in proto.graph.node for out in node.output}
    after_add = {node.input[0]: node.output[0] for node in proto.graph.node if node.op_type == "Relu"}
    adds = [node for node in proto.graph.node if node.op_type == "Add"]
    identity = [a for a in adds if any(producer[i].op_type == "Relu" for i in a.input)]
    projection = [a for a in adds if all(producer[i].op_type == "Conv" for i in a.input)]
    assert len(identity) == 1 and len(projection) == 2

    identity_tap = after_add[identity[0].output[0]]
    found = channel_producers(proto, identity_tap)
    assert [p.weight for p in found] == ["block1.conv2.weight"]  # not the stem conv that the shortcut carries
    for add in projection:
        tap = after_add[add.output[0]]
        found = channel_producers(proto, tap)
        assert sorted(p.weight for p in found) == sorted(producer[i].input[1] for i in add.input)

    # What the names mean: zeroing a channel of every producer silences that channel of a projection block's
    # output; an identity block's output keeps what its shortcut (the stem's activation) carries there.
    x = np.random.default_rng(0).random((4, *SAMPLE_SHAPE), dtype=np.float32)
    tap = after_add[projection[0].output[0]]
    channel = int(_tap_channel(proto, tap, x).sum(axis=(0, 2, 3)).argmax())
    silenced = _tap_channel(_zero_channel(proto, channel_producers(proto, tap), channel), tap, x)
    assert (silenced[:, channel] == 0).all() and silenced.any()
    shortcut = next(i for i in identity[0].input if producer[i].op_type == "Relu")
    stem = _tap_channel(proto, shortcut, x)
    channel = int(stem.sum(axis=(0, 2, 3)).argmax())
    assert stem[:, channel].any()
    zeroed = _zero_channel(proto, channel_producers(proto, identity_tap), channel)
    kept = _tap_channel(zeroed, identity_tap, x)
    np.testing.assert_allclose(kept[:, channel], stem[:, channel], rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------------- repair


def test_ar_repair_changes_only_the_weights(backdoored, ar_repair):
    repaired, report = ar_repair
    original = load_model(backdoored.model_path).proto
    assert [i.name for i in repaired.graph.input] == [i.name for i in original.graph.input]
    assert [o.name for o in repaired.graph.output] == [o.name for o in original.graph.output]
    nodes = [n.SerializeToString() for n in repaired.graph.node]
    assert nodes == [n.SerializeToString() for n in original.graph.node]
    before, after = _arrays(original), _arrays(repaired)
    assert list(before) == list(after)
    changed = {name for name in before if not np.array_equal(before[name], after[name])}
    layer_weights = {n.input[i] for n in original.graph.node if n.op_type in ("Conv", "Gemm")
                     for i in (1, 2) if i < len(n.input)}
    assert changed and changed <= layer_weights
    for name in before:
        assert after[name].dtype == before[name].dtype and after[name].shape == before[name].shape
    assert all(np.issubdtype(before[name].dtype, np.floating) for name in changed)
    # The Reshape's int64 shape is there too, and untouched.
    assert any(not np.issubdtype(a.dtype, np.floating) for a in before.values())

    x = backdoored.x_eval[:8]
    logits = _session(repaired).run(None, {"input": x})[0]
    assert logits.shape == (8, 10) and np.isfinite(logits).all()
    assert report.method == "ar" and report.penalized_weights > 0
    assert report.infected_norm_left is not None and report.infected_norm_left < 1  # the penalty shrank them


def test_repair_report_accuracy_is_measured_on_its_holdout(backdoored, ar_repair):
    repaired, report = ar_repair
    n = len(backdoored.x_clean)
    holdout = RepairSettings().holdout
    assert report.holdout_samples == max(10, round(holdout * n))
    hold = np.random.default_rng(report.settings["seed"]).permutation(n)[:report.holdout_samples]
    x, y = backdoored.x_clean[hold], backdoored.y_clean[hold]
    assert report.accuracy_before == pytest.approx(float((_labels(backdoored.model_path, x) == y).mean()))
    assert report.accuracy_after == pytest.approx(float((_labels(repaired, x) == y).mean()))
    assert report.settings["method"] == "ar" and report.settings["layers"] == default_taps(
        load_model(backdoored.model_path), conv_taps=RepairSettings().conv_taps)
    assert set(report.infected) == set(report.settings["layers"])
    assert json.loads(json.dumps(report.to_dict()))["accuracy_after"] == report.accuracy_after


def test_ar_repair_with_the_scanned_trigger_stops_the_real_attack(backdoored, ar_repair):
    repaired, _ = ar_repair
    accuracy_before, attack_before = _rates(backdoored.model_path, backdoored)
    accuracy_after, attack_after = _rates(repaired, backdoored)
    assert attack_before > 0.8
    assert attack_after < 0.2 and attack_after < attack_before / 4
    assert accuracy_after >= accuracy_before - 0.03


def test_repair_backs_off_the_learning_rate_when_it_costs_too_much_accuracy(backdoored, trigger):
    def run(**change):
        settings = RepairSettings(method="ar", epochs=2, lr=1.0, max_accuracy_loss=0.15, max_accuracy_fall=0.15,
                                  **change)
        return repair(backdoored.model_path, backdoored.x_clean, backdoored.y_clean, settings=settings,
                      triggers=[trigger])[1]

    wrecked = run(backoffs=0)  # Adam at lr 1 ruins the model, and without back-offs that run is kept
    assert wrecked.attempts == 1 and wrecked.lr_used == 1.0
    assert wrecked.accuracy_before - wrecked.accuracy_after > 0.15
    assert not wrecked.within_bound  # ... and the report says it is unfit
    backed_off = run(backoffs=10)
    assert 1 < backed_off.attempts < 11 and backed_off.within_bound
    assert backed_off.lr_used == pytest.approx(1.0 / 2 ** (backed_off.attempts - 1))
    # the first run that kept within bound (counted in images: 3 of 20 is 0.15 to a rounding error)
    assert backed_off.accuracy_before - backed_off.accuracy_after <= 0.15 + 1e-9
    assert f"lr backed off to {backed_off.lr_used:g}" in backed_off.summary()


def test_cli_repair_writes_no_model_that_cost_too_much_in_every_run(backdoored, clean_data, trigger, tmp_path,
                                                                      capsys):
    """An earlier run's model and report stay as they were: the rejected run's report goes beside them, named so."""
    out, earlier_report = tmp_path / "wrecked.onnx", tmp_path / "wrecked.repair.json"
    out.write_bytes(b"an earlier run's model")
    earlier_report.write_text("an earlier run's report")
    code = main(["repair", str(backdoored.model_path), "--data", str(clean_data), "--out", str(out), "--method",
                 "finetune", "--lr", "1", "--schedule", "constant", "--epochs", "1"])
    assert code == 2 and out.read_bytes() == b"an earlier run's model"
    assert earlier_report.read_text() == "an earlier run's report"
    err = capsys.readouterr().err
    assert "cost too much held-out accuracy" in err and "in 3 run(s): try a lower --lr" in err
    assert "wrecked.repair.rejected.json" in err
    report = json.loads((tmp_path / "wrecked.repair.rejected.json").read_text())
    assert report["within_bound"] is False and report["attempts"] == 3  # the report says what happened
    assert [run["lr"] for run in report["runs"]] == [1.0, 0.5, 0.25]  # ... and what each run cost
    assert report["runs"][-1]["accuracy_after"] == report["accuracy_after"]
    assert all(report["accuracy_before"] - run["accuracy_after"] > 0.015 for run in report["runs"])


def test_cli_repair_whose_model_write_fails_leaves_the_earlier_report(backdoored, clean_data, tmp_path,
                                                                      monkeypatch, capsys):
    """The model is written before its report: a failed write (a full disk) leaves the earlier pair as it was."""
    out, earlier_report = tmp_path / "fixed.onnx", tmp_path / "fixed.repair.json"
    out.write_bytes(b"an earlier run's model")
    earlier_report.write_text("an earlier run's report")

    def full_disk(*_args: object, **_kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(onnx, "save", full_disk)
    code = main(["repair", str(backdoored.model_path), "--data", str(clean_data), "--out", str(out), "--method",
                 "prune"])
    assert code == 2 and "No space left on device" in capsys.readouterr().err
    assert out.read_bytes() == b"an earlier run's model" and earlier_report.read_text() == "an earlier run's report"


def test_unlabelled_repair_data_must_hold_every_class_the_model_answers(backdoored):
    """Labelled data short of a class is refused; unlabelled, the model's own answers show the same gap."""
    x, y = backdoored.x_clean, backdoored.y_clean
    half = x[y < 5][:200]
    with pytest.raises(GuardError, match=r"answers none of the 200 unlabelled repair samples with class\(es\) "
                                         r"\[.*9\]: fine-tuned on its own answers it would forget them"):
        repair(backdoored.model_path, half, None, settings=RepairSettings(method="ar", epochs=1))
    _, report = repair(backdoored.model_path, half, None, settings=RepairSettings(method="prune"))  # trains nothing
    assert report.method == "prune"


def test_repair_leaves_out_repeated_samples_and_prune_takes_no_triggers(backdoored, clean_data, trigger, tmp_path,
                                                                        capsys):
    twice = tmp_path / "twice.npz"
    np.savez(twice, x=np.concatenate([backdoored.x_clean[:200]] * 2), y=np.concatenate([backdoored.y_clean[:200]] * 2))
    assert main(["repair", str(backdoored.model_path), "--data", str(twice), "--out", str(tmp_path / "p.onnx"),
                 "--method", "prune"]) == 0
    out = capsys.readouterr().out
    assert "200 clean sample(s) repeat an earlier one" in out
    assert "measured on 40 held-out samples; below about 100 it shows only large falls" in out
    report = json.loads((tmp_path / "p.repair.json").read_text())
    assert report["duplicates_dropped"] == 200 and report["holdout_samples"] < 200
    assert main(["repair", str(backdoored.model_path), "--data", str(clean_data), "--out", str(tmp_path / "q.onnx"),
                 "--method", "prune", "--trigger", str(tmp_path / "not-read.npz")]) == 2
    assert "no use for --trigger" in capsys.readouterr().err
    # nor for the training's options, which its report recorded as if they had been used
    assert main(["repair", str(backdoored.model_path), "--data", str(clean_data), "--out", str(tmp_path / "q.onnx"),
                 "--method", "prune", "--epochs", "7", "--lr", "0.3", "--schedule", "constant"]) == 2
    assert "no use for --epochs, --lr, --schedule: give them to ar, l2 or finetune" in capsys.readouterr().err
    for command in ("repair", "calibrate"):  # an unset shell variable is not "the default taps"
        assert main([command, str(backdoored.model_path), "--data", str(clean_data), "--out",
                     str(tmp_path / "r.out"), "--layers", ""]) == 2
        assert "--layers is empty; leave it out for the default taps" in capsys.readouterr().err
        assert main([command, str(backdoored.model_path), "--data", str(clean_data), "--out",
                     str(tmp_path / "r.out"), "--layers", "relu,relu"]) == 2
        assert "--layers names ['relu'] more than once" in capsys.readouterr().err
    assert not (tmp_path / "q.onnx").exists() and not (tmp_path / "r.out").exists()
    with pytest.raises(GuardError, match="no use for triggers"):
        repair(backdoored.model_path, backdoored.x_clean, backdoored.y_clean, settings=RepairSettings(method="prune"),
               triggers=[trigger])


def _flipped(held: int, lost: int, gained: int) -> tuple[np.ndarray, np.ndarray]:
    """Held-out correctness before and after a run that lost `lost` samples and gained `gained`."""
    before = np.zeros(held, dtype=bool)
    before[: held // 2] = True
    after = before.copy()
    after[:lost] = False
    after[held // 2 : held // 2 + gained] = True
    return before, after


@pytest.mark.parametrize(("lost", "gained", "z", "costly"), [
    (4, 0, 0.0, True),  # a 2-point fall on 200 samples, past the 1.5 allowed
    (3, 0, 0.0, False),  # exactly 1.5 points: within the bound
    (6, 2, 0.0, True),
    (6, 2, 1.645, False),  # 4 net lost of 8 flipped: 1.4 standard errors, chance
    (12, 2, 1.645, True),  # 10 net of 14: 2.7 standard errors
    (12, 2, 3.0, False),
    (30, 0, 3.0, True),  # a wrecked run stays costly at any sensible z
    (60, 49, 1.645, True),  # 11 net of 109 flipped: within chance, but a 5.5-point fall is past the 5 allowed
    (59, 49, 1.645, False),  # 10 net: 5 points, within chance and within the largest fall
])
def test_a_back_off_needs_a_fall_past_the_bound_and_past_chance(lost, gained, z, costly):
    before, after = _flipped(200, lost, gained)
    assert before.sum() - after.sum() == lost - gained
    settings = RepairSettings(max_accuracy_loss=0.015, backoff_z=z, max_accuracy_fall=0.05)
    assert _costly(before, after, settings) is costly


def test_a_fall_on_a_small_held_out_set_is_costly_past_the_largest_fall():
    """10 held-out samples going 0.7 -> 0.3 passed the chance test (4 net of 6 flipped: 1.63 standard errors),
    and the model was written as within the bound."""
    before, after = _flipped(10, 5, 1)
    assert before.sum() - after.sum() == 4
    assert _costly(before, after, RepairSettings())
    assert not _costly(*_flipped(200, 6, 2), RepairSettings())  # the same z on a large set: chance, as before


def test_repair_methods_judge_the_same_weights_and_only_ar_and_l2_shrink_them(backdoored, trigger):
    reports = {}
    for method in ("ar", "l2", "finetune"):  # one fixed rate, so that the penalties are compared, not the back-offs
        settings = RepairSettings(method=method, epochs=3, lr=1e-3, backoffs=0)
        _, reports[method] = repair(backdoored.model_path, backdoored.x_clean, backdoored.y_clean, settings=settings,
                                    triggers=[trigger])
    assert reports["ar"].infected == reports["l2"].infected == reports["finetune"].infected
    assert len({r.penalized_weights for r in reports.values()}) == 1
    # ar penalises each weight relative to its start: it shrinks the infected weights far more than plain
    # L2 on weights of size ~0.05, and plain fine-tuning has nothing pulling them down at all.
    assert reports["ar"].infected_norm_left < 0.8
    assert reports["ar"].infected_norm_left < reports["l2"].infected_norm_left
    assert reports["l2"].infected_norm_left <= reports["finetune"].infected_norm_left + 1e-6


def test_repair_without_labels_keeps_to_the_models_own_answers(backdoored):
    settings = RepairSettings(method="finetune", epochs=1)
    _, report = repair(backdoored.model_path, backdoored.x_clean, settings=settings)
    assert report.accuracy_before == 1.0  # the labels are the model's own answers
    assert report.accuracy_after > 0.8
    assert not report.labelled and "held-out agreement with the model 1.000 -> " in report.summary()


def test_prune_takes_the_taps_calibrate_takes(graphs, backdoored, tmp_path):
    """Prune took repair's two conv taps (AR's) and held-out share, not the mask `guard calibrate` would choose."""
    model = tmp_path / "resnet.onnx"
    onnx.save(graphs["resnet"], model)
    x, y = backdoored.x_clean[:100], backdoored.y_clean[:100]
    _, report = repair(model, x, y, settings=RepairSettings(method="prune"))
    taps = calibrate(model, x, y, settings=CalibrationSettings(reference=False)).tap_names
    assert report.settings["layers"] == taps and len(taps) > len(default_taps(load_model(model), conv_taps=2))


def test_prune_folds_the_calibrated_mask_without_training(backdoored):
    repaired, report = repair(backdoored.model_path, backdoored.x_clean, backdoored.y_clean,
                              settings=RepairSettings(method="prune", epochs=50))
    original = load_model(backdoored.model_path).proto
    assert len(repaired.graph.node) == len(original.graph.node)  # SmallCNN: folded into weights, no Mul
    before, after = _arrays(original), _arrays(repaired)
    for name in before:
        moved = before[name] != after[name]
        assert (after[name][moved] == 0).all(), f"{name}: pruning only zeroes weights, it does not train them"
    assert report.penalized_weights == 0 and report.infected_norm_left is None
    assert sum(report.infected.values()) > 0
    # the mask `guard calibrate` chooses (the fixture's profile: the same data at calibrate's defaults)
    calibrated = Profile.load(backdoored.profile_path)
    assert report.infected == {tap.name: int((~tap.keep).sum()) for tap in calibrated.taps}
    assert report.settings["layers"] == calibrated.tap_names

    # Each pruned channel is silenced either at the layer computing it or at the layers reading it.
    def dead_rows(weight: str, bias: str) -> set[int]:
        rows = after[weight].reshape(len(after[weight]), -1)
        return {c for c in range(len(rows))
                if not rows[c].any() and after[bias][c] == 0 and before[weight][c].any()}

    def dead_inputs(weight: str, channels: int) -> set[int]:
        """Input channels whose (out, channel, features) slice became zero (a flattened channel: a block)."""
        w = after[weight].reshape(len(after[weight]), channels, -1)
        was = before[weight].reshape(w.shape)
        return {c for c in range(channels) if not w[:, c].any() and was[:, c].any()}

    pruned = {
        "conv1": dead_rows("conv1.weight", "conv1.bias") | dead_inputs("conv2.weight", 16),
        "conv2": dead_rows("conv2.weight", "conv2.bias") | dead_inputs("fc1.weight", 32),
        "fc1": dead_rows("fc1.weight", "fc1.bias") | dead_inputs("fc2.weight", 64),
    }
    taps = default_taps(load_model(original), conv_taps=RepairSettings().conv_taps)
    assert [len(pruned[layer]) for layer in ("conv1", "conv2", "fc1")] == [report.infected[t] for t in taps]

    n = len(backdoored.x_clean)
    hold = np.random.default_rng(0).permutation(n)[:report.holdout_samples]
    x, y = backdoored.x_clean[hold], backdoored.y_clean[hold]
    assert report.accuracy_after == pytest.approx(float((_labels(repaired, x) == y).mean()))


@pytest.mark.parametrize(("change", "message"), [
    ({"method": "dropout"}, "unknown repair method 'dropout'"),
    ({"schedule": "step"}, "unknown learning-rate schedule 'step'"),
    ({"lr_floor": 1.5}, "the learning rate's floor is a share of it in [0, 1]"),
    ({"backoffs": -1}, "the back-offs be >= 0"),
    ({"max_accuracy_loss": 1.5}, "the accuracy bound and the largest fall must lie in [0, 1], in that order"),
    ({"max_accuracy_fall": 0.01}, "the accuracy bound and the largest fall must lie in [0, 1], in that order"),
    ({"backoff_z": -1.0}, "their z finite and >= 0"),
    ({"backoff_z": float("nan")}, "their z finite and >= 0"),
    ({"lr": -0.1}, "--lr must be a finite number >= 0"),
    ({"strength": float("nan")}, "--strength must be a finite number >= 0"),
    ({"eps": float("inf")}, "--eps must be a finite number >= 0"),
    ({"epochs": -1, "method": "prune"}, "--epochs must be >= 0"),
    ({"epochs": 0}, "--epochs must be >= 1 (ar trains)"),  # 0 epochs of AR would change nothing
    ({"batch_size": 0}, "the batch size >= 1"),
    ({"holdout": 1.0}, "holdout share must lie in (0, 1)"),
    ({"benign_share": 0.0}, "benign share must lie in (0, 1]"),
    ({"conv_taps": -1}, "conv taps must be a whole number >= 0"),
    ({"conv_taps": 2.5}, "conv taps must be a whole number >= 0"),
])
def test_repair_settings_refuse_what_cannot_repair(change, message):
    with pytest.raises(GuardError) as caught:
        RepairSettings(**change).validate()
    assert message in str(caught.value)


def test_repair_refuses_bad_settings_before_touching_the_model(tmp_path):
    with pytest.raises(GuardError, match="unknown repair method"):
        repair(tmp_path / "missing.onnx", np.zeros((4, *SAMPLE_SHAPE), np.float32),
               settings=RepairSettings(method="nope"))
    RepairSettings(method="prune", lr=0, strength=0, eps=0, epochs=0).validate()  # boundaries are allowed


def test_repair_that_trains_refuses_float16_weights_before_the_run(backdoored):
    """Adam's eps is 0 in float16: every weight of a float16 model ended NaN, and the report blamed the lr. (A model
    whose taps are float16 too is refused before, as guard serves none: test_graph.) Here the first conv computes in
    float16 and hands float32 on."""
    proto = onnx.load(backdoored.model_path)
    graph = proto.graph
    first = graph.node[0]
    assert first.op_type == "Conv"
    weights = set(first.input[1:])
    halves = [numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16), t.name) if t.name in weights else t
              for t in graph.initializer]
    del graph.initializer[:]
    graph.initializer.extend(halves)
    source, out = first.input[0], first.output[0]
    first.input[0], first.output[0] = "x16", "y16"
    graph.node.insert(0, onnx.helper.make_node("Cast", [source], ["x16"], to=onnx.TensorProto.FLOAT16))
    graph.node.insert(2, onnx.helper.make_node("Cast", ["y16"], [out], to=onnx.TensorProto.FLOAT))
    del graph.value_info[:]
    half = load_model(proto)
    x, y = backdoored.x_clean[:200], backdoored.y_clean[:200]
    assert (_labels(proto, x) == _labels(backdoored.model_path, x)).mean() > 0.95  # the same model, served fine
    for method in ("ar", "finetune"):
        with pytest.raises(GuardError, match=rf"--method {method} trains float32 weights; .*\(float16\)"):
            repair(half, x, y, settings=RepairSettings(method=method, epochs=1))
    repaired, report = repair(half, x, y, settings=RepairSettings(method="prune"))  # trains nothing: it may
    assert report.within_bound and all(np.isfinite(numpy_helper.to_array(t)).all() for t in repaired.graph.initializer)


# ------------------------------------------------------------------------------------------------------ CLI


def test_cli_repair_writes_the_model_and_its_report(backdoored, clean_data, tmp_path):
    out = tmp_path / "fixed.onnx"
    stale = tmp_path / "fixed.repair.rejected.json"
    stale.write_text("{}")  # an earlier rejected run's report: it no longer describes what lies beside it
    code, stdout = _run_cli(["repair", str(backdoored.model_path), "--data", str(clean_data),
                             "--out", str(out), "--method", "l2", "--epochs", "1", "--lr", "0.001",
                             "--strength", "2", "--seed", "3"])
    assert code == 0
    loaded = load_model(out)
    assert loaded.num_classes == 10 and loaded.input_name == "input"
    report_path = tmp_path / "fixed.repair.json"
    report = json.loads(report_path.read_text())
    assert report["method"] == "l2" and report["trigger_targets"] == []
    assert (report["settings"]["epochs"], report["settings"]["lr"], report["settings"]["strength"],
            report["settings"]["seed"]) == (1, 0.001, 2.0, 3)
    assert report["holdout_samples"] == 100
    assert str(out) in stdout and str(report_path) in stdout and "guard calibrate" in stdout
    assert _arrays(loaded.proto).keys() == _arrays(load_model(backdoored.model_path).proto).keys()
    assert not stale.exists()


def test_cli_repair_uses_a_trigger_written_by_guard_scan(backdoored, clean_data, scan_out, tmp_path):
    out, report_path = tmp_path / "fixed.onnx", tmp_path / "custom.json"
    code, _ = _run_cli(["repair", str(backdoored.model_path), "--data", str(clean_data), "--out", str(out),
                        "--trigger", str(scan_out / "trigger.npz"), "--report", str(report_path)])
    assert code == 0
    report = json.loads(report_path.read_text())
    assert report["trigger_targets"] == [TARGET] and report["method"] == "ar"
    assert not (tmp_path / "fixed.repair.json").exists()
    _, attack_before = _rates(backdoored.model_path, backdoored)
    _, attack_after = _rates(out, backdoored)
    assert attack_after < attack_before / 4


def test_cli_scan_writes_every_candidate_trigger_in_the_format_repair_reads(backdoored, clean_data, scan_out,
                                                                           trigger):
    """scan.json's candidates, suspect first, each as candidate_K.npz that `load_trigger` (`repair --trigger`) reads,
    the suspect's the same as trigger.npz: a team can review the triggers between the two steps."""
    summary = json.loads((scan_out / "scan.json").read_text())
    assert summary["files"]["candidates"] == [f"candidate_{k}.npz" for k in summary["candidates"]]
    loaded = [load_trigger(scan_out / name, SAMPLE_SHAPE, 10) for name in summary["files"]["candidates"]]
    assert [t.target for t in loaded] == summary["candidates"] and loaded[0].target == TARGET  # the suspect first
    assert np.array_equal(loaded[0].mask, trigger.mask) and np.array_equal(loaded[0].pattern, trigger.pattern)


def test_cli_repair_unlearns_every_trigger_it_is_given(backdoored, clean_data, scan_out, tmp_path):
    decoy = _write_trigger(tmp_path / "decoy.npz", target=np.array(3))  # a half-grey veil
    out = tmp_path / "fixed.onnx"
    code, stdout = _run_cli(["repair", str(backdoored.model_path), "--data", str(clean_data), "--out", str(out),
                             "--trigger", str(scan_out / "trigger.npz"), "--trigger", str(decoy)])
    assert code == 0, stdout
    report = json.loads((tmp_path / "fixed.repair.json").read_text())
    assert report["trigger_targets"] == [TARGET, 3]
    _, attack_before = _rates(backdoored.model_path, backdoored)
    _, attack_after = _rates(out, backdoored)
    assert attack_after < attack_before / 4  # a decoy beside the real trigger does not stop the repair


def test_cli_repair_scan_dir_unlearns_the_candidates_suspect_first(backdoored, scanned: Scanned, tmp_path):
    # --scan-dir is --scan without scanning again: the same candidates, from the folder guard scan wrote
    out = tmp_path / "fixed.onnx"
    code, stdout = _run_cli(["repair", str(backdoored.model_path), "--data", str(scanned.data), "--out", str(out),
                             "--scan-dir", str(scanned.out)])
    assert code == 0, stdout
    written = json.loads((tmp_path / "fixed.repair.json").read_text())
    targets, warps, blends = written["trigger_targets"], written["warp_targets"], written["blend_targets"]
    candidates = json.loads((scanned.out / "scan.json").read_text())["candidates"]
    assert targets[0] == TARGET and [*targets, *warps, *blends] == candidates
    said = " and ".join([f"the triggers of classes {targets}", *(f"the warp of class {k}" for k in warps),
                         *(f"the blend of class {k}" for k in blends)])
    assert f"unlearning the scan's candidates in {scanned.out}: {said}" in stdout
    _, attack_before = _rates(backdoored.model_path, backdoored)
    _, attack_after = _rates(out, backdoored)
    assert attack_after < attack_before / 4


def test_a_scan_dir_of_another_model_or_incomplete_is_refused(backdoored, clean_model, scanned: Scanned, tmp_path,
                                                              capsys):
    def refused(model: Path, folder: Path) -> str:
        assert main(["repair", str(model), "--data", str(scanned.data), "--out", str(tmp_path / "fixed.onnx"),
                     "--scan-dir", str(folder)]) == 2
        return capsys.readouterr().err

    assert "is of another model" in refused(clean_model, scanned.out)  # its triggers were found on other weights
    partial = tmp_path / "partial"
    shutil.copytree(scanned.out, partial)
    (partial / json.loads((partial / "scan.json").read_text())["files"]["candidates"][-1]).unlink()
    assert "cannot read a trigger from" in refused(backdoored.model_path, partial)
    (partial / "scan.json").write_text("{not json")
    assert "cannot read a guard scan from" in refused(backdoored.model_path, partial)
    assert "cannot read a guard scan from" in refused(backdoored.model_path, tmp_path / "nowhere")
    assert not (tmp_path / "fixed.onnx").exists()


def test_cli_repair_scans_with_its_seed_as_calibrate_does(backdoored, clean_data, tmp_path, monkeypatch):
    """`repair --scan --seed 3` scanned with seed 0, so `guard scan --seed 3` then `--scan-dir` was not the same."""
    import guard.scan

    class Scanned(Exception):
        pass

    seeds = []

    def scan_seed(model, x, y=None, *, settings=None):
        seeds.append(settings.seed if settings is not None else None)
        raise Scanned

    monkeypatch.setattr(guard.scan, "run_scan", scan_seed)
    for command in ("repair", "calibrate"):
        with pytest.raises(Scanned):
            main([command, str(backdoored.model_path), "--data", str(clean_data), "--out", str(tmp_path / "out"),
                  "--seed", "3", *(["--scan"] if command == "repair" else [])])
    assert seeds == [3, 3]


def _write_trigger(path: Path, mask_shape=(1, 28, 28), pattern_shape=(1, 28, 28), fill=0.5, **extra) -> Path:
    arrays = {"mask": np.full(mask_shape, fill, np.float32),
              "pattern": np.full(pattern_shape, fill, np.float32), "target": np.array(0)}
    arrays.update(extra)
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return path


@pytest.mark.parametrize(("make", "message"), [
    (lambda p: p.write_bytes(b"this is not an npz file") and p, "cannot read a trigger from {path}"),
    (lambda p: _write_trigger(p, target=None), "cannot read a trigger from {path}"),
    (lambda p: _write_trigger(p, (1, 14, 14), (1, 14, 14)),
     "the trigger in {path} is for images (1, 14, 14), the model takes (1, 28, 28)"),
    (lambda p: _write_trigger(p, pattern_shape=(3, 28, 28)),
     "the trigger in {path} is for images (3, 28, 28), the model takes (1, 28, 28)"),
    (lambda p: _write_trigger(p, fill=np.nan), "the trigger in {path} holds NaN or Inf"),
    (lambda p: _write_trigger(p, target=np.array([0, 1])), "the trigger's target in {path} must be one class"),
    (lambda p: _write_trigger(p, target=np.array(10)), "the trigger's target in {path} must be one class"),
    (lambda p: _write_trigger(p, target=np.array(3.7)), "the trigger's target in {path} must be one class"),
    (lambda p: _write_trigger(p, mask_shape=(1, 4096, 4096), fill=0),  # read whole before its shape was checked
     "'mask' in {path} declares shape (1, 4096, 4096); (1, 28, 28) is expected"),
    (lambda p: _write_trigger(p, grid=np.zeros((2048, 2048, 2), np.float32)),
     "'grid' in {path} declares shape (2048, 2048, 2); (28, 28, 2) is expected"),
    (lambda p: _write_trigger(p, mask=np.full((1, 28, 28), 0.5 + 1j, np.complex64)),  # cast dropped the imaginary
     "the trigger in {path} must hold real numbers"),
])
def test_cli_repair_refuses_a_bad_trigger_file(backdoored, clean_data, tmp_path, capsys, make, message):
    path = tmp_path / "trigger.npz"
    make(path)
    out = tmp_path / "fixed.onnx"
    code = main(["repair", str(backdoored.model_path), "--data", str(clean_data), "--out", str(out),
                 "--trigger", str(path)])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("guard: error: ") and message.format(path=path) in err
    assert "Traceback" not in err
    assert not out.exists() and not (tmp_path / "fixed.repair.json").exists()


def test_cli_repair_refuses_bad_numbers_and_data(backdoored, clean_data, tmp_path, capsys):
    out = tmp_path / "fixed.onnx"
    assert main(["repair", str(backdoored.model_path), "--data", str(clean_data), "--out", str(out),
                 "--lr", "-1"]) == 2
    assert capsys.readouterr().err.strip() == "guard: error: --lr must be a finite number >= 0, got -1.0"
    flat = tmp_path / "flat.npz"
    np.savez(flat, x=backdoored.x_clean[:, 0], y=backdoored.y_clean)
    assert main(["repair", str(backdoored.model_path), "--data", str(flat), "--out", str(out)]) == 2
    assert "repair data has shape (500, 28, 28)" in capsys.readouterr().err
    assert not out.exists()


def test_weights_held_in_constant_nodes_are_refused_before_any_fine_tuning(backdoored, clean_data, tmp_path,
                                                                          monkeypatch, capsys):
    """Valid ONNX that guard loads and serves; fine-tuning it raised 'optimizer got an empty parameter list' with a
    traceback, in calibrate after a minute, and --method ar blamed the taps."""
    import guard.scan

    proto = onnx.load(backdoored.model_path)
    graph = proto.graph
    constants = [onnx.helper.make_node("Constant", [], [init.name], value=init) for init in graph.initializer]
    moved = onnx.helper.make_model(onnx.helper.make_graph([*constants, *graph.node], graph.name, graph.input,
                                                          graph.output), opset_imports=proto.opset_import,
                                   ir_version=proto.ir_version)
    model = tmp_path / "constants.onnx"
    onnx.save(moved, model)
    monkeypatch.setattr(guard.scan, "run_scan", lambda *a, **k: pytest.fail("scanned before the model was checked"))
    for command, fragment in ((["repair", "--method", "finetune"], "--method finetune fine-tunes"),
                              (["repair", "--method", "ar"], "--method ar fine-tunes"),
                              (["calibrate"], "the reference (calibrate without it: --no-reference) fine-tunes")):
        out = tmp_path / "out" / ("p.safetensors" if command == ["calibrate"] else "m.onnx")
        assert main([command[0], str(model), "--data", str(clean_data), "--out", str(out), *command[1:]]) == 2
        err = capsys.readouterr().err
        assert fragment in err and "none of them is an initializer of the graph" in err, err
        assert not (tmp_path / "out").exists()
    assert main(["repair", str(model), "--data", str(clean_data), "--out", str(tmp_path / "pruned.onnx"),
                 "--method", "prune"]) == 0  # trains nothing
