"""`guard scan`: trigger synthesis names the BadNets target and no class of a clean model; the synthesised trigger
works; ℓ∞-gap pruning against it weakens the real attack within the accuracy budget; the CLI writes its files."""

from __future__ import annotations

import dataclasses
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TARGET, Scanned
from guard.calibrate import synthesis
from guard.calibrate.blends import BlendSettings, scan_blends
from guard.calibrate.linf import prune_by_gap
from guard.calibrate.synthesis import ScanResult, Trigger, anomaly_index, pick_suspect
from guard.calibrate.taps import OnnxTaps
from guard.calibrate.warps import WarpSettings, scan_warps
from guard.cli import main
from guard.errors import GuardError
from guard.model.graph import load_model
from guard.scan import (
    PNG_SIGNATURE,
    ScanReport,
    ScanSettings,
    encode_png,
    format_report,
    report_dict,
    run_scan,
    write_outputs,
)


def _decode_png(data: bytes) -> np.ndarray:
    """Just enough PNG reading for guard's own files: 8-bit grey or RGB, filter 0 on every row."""
    assert data[:8] == PNG_SIGNATURE
    position, chunks = 8, {}
    while position < len(data):
        (length,) = struct.unpack(">I", data[position:position + 4])
        kind = data[position + 4:position + 8]
        body = data[position + 8:position + 8 + length]
        (crc,) = struct.unpack(">I", data[position + 8 + length:position + 12 + length])
        assert crc == zlib.crc32(kind + body)
        chunks[kind] = chunks.get(kind, b"") + body
        position += 12 + length
    width, height, depth, colour, *_ = struct.unpack(">IIBBBBB", chunks[b"IHDR"])
    assert depth == 8 and colour in (0, 2)
    planes = 3 if colour == 2 else 1
    rows = np.frombuffer(zlib.decompress(chunks[b"IDAT"]), dtype=np.uint8).reshape(height, 1 + width * planes)
    assert (rows[:, 0] == 0).all()
    image = rows[:, 1:].reshape(height, width, planes)
    return image[..., 0] if planes == 1 else image


@pytest.fixture(scope="module")
def cli_scan(scanned: Scanned) -> tuple[Path, str]:
    """One end-to-end `guard scan` of the backdoored model (conftest's); later tests read what it wrote."""
    return scanned.out, scanned.stdout


def test_scan_names_the_backdoor_target(cli_scan):
    out, stdout = cli_scan
    report = json.loads((out / "scan.json").read_text())
    index = [c["anomaly_index"] for c in report["classes"]]
    sizes = [c["mask_l1"] for c in report["classes"]]
    assert report["suspect"] == TARGET
    assert index[TARGET] > report["threshold"]
    assert report["candidates"][0] == TARGET
    assert report["candidates"] == [k for k in np.argsort(index)[::-1] if index[k] >= 1.0]
    assert sizes[TARGET] < 0.2 * np.median(sizes)  # the 3×3 patch is tiny next to any natural trigger
    assert f"class {TARGET} is the likely backdoor target" in stdout
    # A patch backdoor is no warp: the warp scan ran and named nothing.
    assert len(report["warps"]["classes"]) == 10 and report["warps"]["suspect"] is None
    assert "warp scan: no class is named" in stdout


def test_a_scan_repeats_itself(backdoored):
    """The scan is seeded, so the same model, samples and settings give the same report: tests take conftest's one
    scan (`scan_once`) for another of the same, and `--scan-dir` stands in for calibrate's own scan."""
    settings = ScanSettings(steps=10, warps={"steps": 5}, blends={"steps": 5})
    first, second = (run_scan(backdoored.model_path, backdoored.x_clean[:60], backdoored.y_clean[:60],
                              settings=settings) for _ in range(2))
    for report in (first, second):
        del report.figures["seconds"], report.figures["step_seconds"]
    assert report_dict(first) == report_dict(second)
    for a, b in zip(first.candidates, second.candidates, strict=True):
        assert all(np.array_equal(x, y) for x, y in zip(dataclasses.astuple(a), dataclasses.astuple(b), strict=True))


def test_scan_names_no_class_of_a_clean_model(clean_model, backdoored):
    # the patch synthesis alone: test_warps and test_blends ask the same of the warp and blend scans
    report = run_scan(clean_model, backdoored.x_clean, backdoored.y_clean,
                      settings=ScanSettings(warp_scan=False, blend_scan=False))
    assert report.classes.suspect is None, report.classes.anomaly_index
    assert report.pruning is None
    assert len(report.classes.triggers) == 10
    assert all(t.success > 0.9 for t in report.classes.triggers)  # every class did get a working trigger


def test_a_model_of_many_classes_is_scanned_a_group_of_classes_at_a_time(backdoored, monkeypatch):
    """Every class was stamped on every batch at once: 100 classes of 3x32x32 took 5 GB. With room for three classes'
    batches per forward, each scan (patch, warp, blend) still finds a trigger per class, in order, and its backdoor
    target's patch still works."""
    monkeypatch.setattr(synthesis, "STAMPED_VALUES", 3 * 32 * 28 * 28)
    largest = []

    def forward(x: torch.Tensor) -> torch.Tensor:
        largest.append(len(x))
        return backdoored.module(x)

    x, y = backdoored.x_clean[:200], backdoored.y_clean[:200]
    patch = synthesis.synthesize_triggers(forward, x, y, settings=synthesis.SynthesisSettings(steps=60))
    # the optimisation's forwards hold 3 classes' batches (all 10 at once: 320 images), the success's one class's
    # 200 images (all at once: 2,000)
    assert [t.target for t in patch] == list(range(10)) and 3 * 32 in largest and max(largest) <= 200
    assert patch[TARGET].success > 0.9
    largest.clear()
    warps = scan_warps(forward, x, y, WarpSettings(steps=5))
    blends = scan_blends(forward, x, y, BlendSettings(steps=5))
    assert [t.target for t in warps.triggers] == [t.target for t in blends.triggers] == list(range(10))
    assert 3 * 32 in largest and max(largest) <= 200


def test_synthesised_trigger_sends_most_clean_images_to_the_target(cli_scan, backdoored):
    out, _ = cli_scan
    with np.load(out / "trigger.npz") as saved:
        mask, pattern, target = saved["mask"], saved["pattern"], int(saved["target"])
    assert target == TARGET and mask.shape == (1, 28, 28) and pattern.shape == (1, 28, 28)
    victims = backdoored.x_eval[backdoored.y_eval != TARGET]
    stamped = (1 - mask) * victims + mask * pattern
    with torch.no_grad():
        predicted = backdoored.module(torch.as_tensor(stamped, dtype=torch.float32)).argmax(1).numpy()
    assert (predicted == TARGET).mean() > 0.9


def test_linf_gap_pruning_weakens_the_real_attack_within_the_budget(cli_scan, backdoored):
    out, _ = cli_scan
    report = json.loads((out / "scan.json").read_text())
    pruning = report["pruning"]
    taps = pruning["taps"]
    tap_model = OnnxTaps(load_model(backdoored.model_path), taps)
    channels = [len(pruning["gap"][t]) for t in taps]
    keep = [np.ones(c, dtype=np.float32) for c in channels]
    for tap_keep, tap in zip(keep, taps, strict=True):
        tap_keep[pruning["pruned_channels"][tap]] = 0
    assert pruning["pruned"] > 0

    def rates(masks: list[np.ndarray] | None) -> tuple[float, float]:
        triggered, _ = backdoored.triggered()
        rows = None if masks is None else [torch.as_tensor(m)[None] for m in masks]
        with torch.no_grad():
            clean, _ = tap_model.run(torch.as_tensor(backdoored.x_eval), rows)
            attacked, _ = tap_model.run(torch.as_tensor(triggered), rows)
        accuracy = float((clean.argmax(1).numpy() == backdoored.y_eval).mean())
        return accuracy, float((attacked.argmax(1).numpy() == TARGET).mean())

    accuracy_before, attack_before = rates(None)
    accuracy_after, attack_after = rates(keep)
    assert attack_after < attack_before
    budget = report["settings"]["acc_budget"]
    assert pruning["holdout_accuracy_after"] >= pruning["holdout_accuracy_before"] - budget
    # Held out from the scan, the evaluation images get the budget again as room for sampling noise.
    assert accuracy_after >= accuracy_before - 2 * budget


def test_cli_scan_writes_a_viewable_trigger_picture(cli_scan):
    out, stdout = cli_scan
    report = json.loads((out / "scan.json").read_text())
    scale = report["settings"]["png_scale"]
    for name in (report["files"]["trigger_png"], report["files"]["mask_png"]):
        data = (out / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE)
        assert _decode_png(data).shape == (28 * scale, 28 * scale)
        assert name in stdout


def test_cli_scan_refuses_a_missing_data_file(backdoored, tmp_path, capsys):
    missing = tmp_path / "nothing.npz"
    assert main(["scan", str(backdoored.model_path), "--data", str(missing), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"guard: error: data file not found: {missing}"


def test_cli_scan_refuses_too_few_steps_before_reading_anything(tmp_path, capsys):
    # below one window of the synthesis's cost schedule nothing is measured; said before the data or model is read
    missing = tmp_path / "nothing"
    assert main(["scan", str(missing / "m.onnx"), "--data", str(missing / "d.npz"), "--out", str(tmp_path),
                 "--steps", "3"]) == 2
    assert "--steps must be at least 5" in capsys.readouterr().err
    with pytest.raises(GuardError, match="unknown synthesis setting"):
        ScanSettings(synthesis={"stpes": 10}).validate()


def test_cli_scan_refuses_data_of_the_wrong_shape(backdoored, tmp_path, capsys):
    data = tmp_path / "flat.npz"
    np.savez(data, x=backdoored.x_clean[:, 0])  # (N, 28, 28): the channel axis is missing
    out = tmp_path / "scans" / "first"
    assert main(["scan", str(backdoored.model_path), "--data", str(data), "--out", str(out)]) == 2
    assert "scan data has shape (500, 28, 28); the model takes (N, 1, 28, 28)" in capsys.readouterr().err
    assert not (tmp_path / "scans").exists()  # a refused scan leaves no empty folder it made


def test_anomaly_index_names_only_a_small_outlier():
    sizes = np.array([150.0, 300, 90, 280, 200, 160, 140, 290, 80, 170])
    assert pick_suspect(anomaly_index(sizes)) is None
    small = sizes.copy()
    small[3] = 10
    assert pick_suspect(anomaly_index(small)) == 3
    large = sizes.copy()
    large[3] = 5000  # an outlier on the large side never counts
    assert pick_suspect(anomaly_index(large)) is None
    # The linear index cannot reach 2 when the natural sizes spread this much, whatever the outlier's size.
    assert pick_suspect(anomaly_index(small, "linear")) is None
    # A small mask whose trigger does not work is an optimisation cut short (too few --steps), not a backdoor.
    success = np.ones(10)
    assert pick_suspect(anomaly_index(small), success=success) == 3
    success[3] = 0.055
    assert pick_suspect(anomaly_index(small), success=success) is None
    smaller = small.copy()  # a working outlier under an unconverged one is still named
    smaller[5] = 15
    assert pick_suspect(anomaly_index(smaller), success=success) == 5
    assert pick_suspect(np.array([-0.67, 0.67]), threshold=0.5) is None  # two classes: nothing to judge by
    tied = np.full(10, 100.0)  # half or more of the classes alike: the MAD is 0
    tied[3] = 98.0
    for scale in ("log", "linear"):  # 2% below the rest is no outlier (it read ~3,000 and ~13,500)
        assert pick_suspect(anomaly_index(tied, scale)) is None
    tied[3] = 10.0  # a tenth of the others' size still is
    assert pick_suspect(anomaly_index(tied)) == pick_suspect(anomaly_index(tied, "linear")) == 3


def test_the_verdict_says_when_the_scan_cannot_judge(tmp_path):
    """Two classes always give indexes of ±0.67, which read as a clean verdict; a small trigger that never
    converged is named as such."""
    two = format_report(_report([-0.67, 0.67], None))
    assert "cannot judge a model of 2 classes" in two and "no class is suspected" not in two
    unconverged = _report([0.1, 0.2, 3.0, -0.5], None)
    unconverged.classes.triggers[2].success = 0.055
    assert "class(es) [2] have anomalously small triggers" in format_report(unconverged)
    unconverged.classes.anomaly_index[2] = 1.0  # under the threshold: it would not have been named anyway
    assert "anomalously small" not in format_report(unconverged)


def test_the_verdict_gives_the_named_class_its_own_index():
    """Under a more anomalous class whose trigger did not converge, the named one was given that class's index."""
    named = _report([0.1, 0.2, 3.5, -0.5, 2.6], 4)
    named.classes.triggers[2].success = 0.055
    assert "class 4 is the likely backdoor target" in (text := format_report(named))
    assert "(anomaly index 2.60 > " in text and "3.50 >" not in text


def _report(index: list[float], suspect: int | None, success: list[float] | None = None,
            **settings: float) -> ScanReport:
    blank = np.zeros((1, 2, 2), np.float32)
    triggers = [Trigger(target=k, mask=blank, pattern=blank, success=s, mask_l1=1.0)
                for k, s in enumerate(success or [1.0] * len(index))]
    result = ScanResult(triggers=triggers, anomaly_index=np.array(index), suspect=suspect, threshold=2.0)
    return ScanReport(model_sha256="", classes=result, pruning=None, taps=[], settings=ScanSettings(**settings),
                      figures={})


def test_candidates_are_the_classes_at_or_above_the_floor_most_anomalous_first():
    index = [1.3, -0.2, 0.4, 2.8, 1.0, -1.5, 0.99, 0.0, 1.7, -0.4]
    assert [t.target for t in _report(index, 3).candidates] == [3, 8, 0, 4]
    assert [t.target for t in _report(index, None, candidate_index=1.5).candidates] == [3, 8]
    assert _report(index, None, candidate_index=3.0, fill_candidates=0).candidates == []
    # ... and by default the two most anomalous classes fill an empty list
    assert [t.target for t in _report(index, None, candidate_index=3.0).candidates] == [3, 8]
    # A floor above the naming threshold still keeps the suspect: a named target is always unlearned.
    assert [t.target for t in _report(index, 3, candidate_index=5.0).candidates] == [3]
    with pytest.raises(GuardError, match="candidate index"):
        ScanSettings(candidate_index=float("nan")).validate()


def test_a_trigger_that_does_not_work_is_no_candidate():
    """A class whose synthesis was cut short (its trigger sends under half the other images to it) has a small mask
    for no backdoor's sake: it was handed to calibrate and repair to unlearn all the same, at a cost in accuracy."""
    index = [1.3, -0.2, 0.4, 2.8, 1.0, -1.5, 0.99, 0.0, 1.7, -0.4]
    success = [0.95, 1.0, 0.9, 0.22, 1.0, 1.0, 1.0, 0.3, 0.49, 1.0]
    assert [t.target for t in _report(index, None, success).candidates] == [0, 4]
    assert [t.target for t in _report(index, None, success, candidate_index=3.0).candidates] == [0, 4]  # the fill


def test_the_fill_takes_the_most_anomalous_classes_only_where_none_reaches_the_floor():
    index = [0.45, -0.02, 0.02, -0.49, 0.43, -1.29, 0.86, -1.21, 0.92, -1.01]
    assert _report(index, None, fill_candidates=0).candidates == []
    assert [t.target for t in _report(index, None, fill_candidates=2).candidates] == [8, 6]
    assert [t.target for t in _report(index, None, fill_candidates=3).candidates] == [8, 6, 0]
    assert _report([-0.67, 0.67], None).candidates == []  # two classes: nothing to judge, so nothing to fill with
    # a class at the floor, or a named suspect, is a candidate already: nothing is added
    assert [t.target for t in _report(index, None, candidate_index=0.9, fill_candidates=3).candidates] == [8]
    assert [t.target for t in _report(index, 4, candidate_index=5.0, fill_candidates=3).candidates] == [4]
    with pytest.raises(GuardError, match="fill"):
        ScanSettings(fill_candidates=-1).validate()


def test_gap_pruning_stops_at_the_bound_or_the_budget():
    order = [(0, 2), (0, 0), (1, 1)]

    def success(keep: list[np.ndarray]) -> float:
        return 1.0 - 0.4 * sum(int((~k).sum()) for k in keep)

    result = prune_by_gap(order, [3, 2], accuracy=lambda keep: 0.8, success=success)
    assert result.stopped == "success" and result.pruned == 3
    assert result.keep[0].tolist() == [False, True, False] and result.keep[1].tolist() == [True, False]
    costly = prune_by_gap(order, [3, 2], accuracy=lambda keep: 0.8 if keep[0][0] else 0.7, success=success)
    assert costly.stopped == "budget" and costly.pruned == 1 and costly.accuracy_after == 0.8


def test_scan_outputs_are_written_whole_and_a_failed_write_leaves_no_stale_summary(tmp_path):
    report = _report([0.1, 0.2, 3.0, -0.5], 2)
    written = write_outputs(report, tmp_path)
    assert {p.name for p in written} == {"scan.json", "candidate_2.npz", "trigger.npz", "trigger_2.png", "mask_2.png"}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in written)  # no .tmp left behind
    assert json.loads((tmp_path / "scan.json").read_text())["files"]["candidates"] == ["candidate_2.npz"]
    # A later scan that cannot write its files must not leave the old scan.json naming files it removed.
    (tmp_path / "trigger.npz").unlink()
    (tmp_path / "trigger.npz").mkdir()
    with pytest.raises(GuardError, match=r"trigger\.npz"):
        write_outputs(report, tmp_path)
    assert not (tmp_path / "scan.json").exists() and not list(tmp_path.glob("*.tmp"))


def test_a_scan_removes_every_earlier_scans_files_not_only_those_of_its_classes(tmp_path):
    """A scan of a 100-class model left candidate_10..99 and its suspect's pictures beside a 10-class scan's."""
    earlier = ["candidate_42.npz", "warp_77.npz", "blend_12.npz", "trigger_30.png", "mask_30.png", "trigger.npz"]
    for name in [*earlier, "notes.txt", "candidate_x.npz"]:
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "scan.json").write_text(json.dumps({"files": {
        "candidates": earlier[:3], "trigger": "trigger.npz", "trigger_png": "trigger_30.png", "mask_png": "mask_30.png"}}))
    written = write_outputs(_report([0.1, 0.2, 3.0, -0.5], 2), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*(p.name for p in written), "notes.txt",
                                                                 "candidate_x.npz"])


@pytest.mark.parametrize("earlier", [None, {"files": {"candidates": ["candidate_1.npz"]}}, ["not", "a", "report"]])
def test_a_scan_refuses_files_named_as_its_own_that_no_earlier_scan_wrote(tmp_path, earlier):
    """The folder's segmentation masks (mask_0.png) and the user's own trigger.npz were removed unasked: a scan
    removed every file named as its files are, whether a scan had written it or not."""
    mine = ["mask_0.png", "trigger.npz", "notes.txt"]
    for name in mine:
        (tmp_path / name).write_bytes(b"mine")
    if earlier is not None:
        (tmp_path / "scan.json").write_text(json.dumps(earlier))
    with pytest.raises(GuardError, match=r"mask_0\.png, trigger\.npz, named as a scan names|not a guard scan's report"):
        write_outputs(_report([0.1, 0.2, 3.0, -0.5], 0), tmp_path)
    assert all((tmp_path / name).read_bytes() == b"mine" for name in mine)


def test_png_encoder_writes_grey_and_rgb():
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4)
    rgb = np.arange(36, dtype=np.uint8).reshape(3, 4, 3)
    assert (_decode_png(encode_png(grey)) == grey).all()
    assert (_decode_png(encode_png(rgb)) == rgb).all()


def test_a_scan_of_images_outside_0_to_1_says_its_triggers_are_not(backdoored):
    """The synthesised patterns lie in [0, 1]; a model fed normalised images hides its trigger elsewhere."""
    import logging

    said: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: said.append(record.getMessage())
    logging.getLogger("guard.scan").addHandler(handler)
    try:
        settings = ScanSettings(steps=5, warp_scan=False, blend_scan=False)
        run_scan(backdoored.model_path, backdoored.x_clean[:100] * 2 - 0.5, backdoored.y_clean[:100],
                 settings=settings)
        assert any("range over [-0.5, 1.5], the triggers it synthesises over [0, 1]" in line for line in said)
        said.clear()
        run_scan(backdoored.model_path, backdoored.x_clean[:100], backdoored.y_clean[:100], settings=settings)
        assert not any("range over" in line for line in said)
    finally:
        logging.getLogger("guard.scan").removeHandler(handler)
