"""What the offline commands (calibrate, scan, repair, train, bench, eval) do with a user's bad files and settings:
one line `guard: error: ...` and exit code 2, before any long run where it can be told then, and no output left
half-written or stale."""

from __future__ import annotations

import json
import sys
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import Backdoored
from guard.calibrate.activations import collect
from guard.calibrate.pipeline import calibrate
from guard.calibrate.profile import Profile, ProfileError
from guard.calibrate.synthesis import load_trigger
from guard.calibrate.taps import OnnxTaps
from guard.calibrate.warps import load_any_trigger
from guard.cli import main
from guard.errors import GuardError, ModelError
from guard.model.graph import default_taps, load_model, validate_taps
from guard.repair.adaptive_reg import repair
from guard.samples import check_samples, load_poisoned, load_samples
from guard.scan import ScanSettings, run_scan, write_outputs


def run(capsys: pytest.CaptureFixture[str], *args: str | Path) -> str:
    """`guard ARGS...` in this process; the one line it printed on stderr, having exited with 2."""
    code = main([str(a) for a in args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("guard: error: "), err
    return err[0]


def write_npz(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


# ------------------------------------------------------------------------------------------------- data files


@pytest.mark.parametrize("command", [["inspect", "{long}"], ["serve", "--model", "{model}", "--profile", "{long}"],
                                     ["calibrate", "{model}", "--data", "{long}", "--out", "{out}"],
                                     ["scan", "{model}", "--data", "{long}"]])
def test_a_path_the_system_refuses_is_said_so_not_a_traceback(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                               backdoored: Backdoored, command: list[str]) -> None:
    """A name longer than the file system allows made Path.is_file raise (it swallows only 'not found'): a traceback
    from every command that reads a file."""
    names = {"long": str(tmp_path / ("x" * 300)), "model": str(backdoored.model_path), "out": str(tmp_path / "p")}
    message = run(capsys, *(part.format(**names) for part in command))
    assert "File name too long" in message and "x" * 300 in message, message
    with pytest.raises(ProfileError, match=r"cannot read the profile .*File name too long"):
        Profile.load(names["long"])


def test_a_timeout_inside_guard_stays_a_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    """TimeoutError is an OSError in Python's tree, but a failure of guard's: it printed 'guard: error: ' and no more."""
    import guard.cli

    def times_out(_args: object) -> int:
        raise TimeoutError

    monkeypatch.setattr(guard.cli, "_inspect", times_out)
    with pytest.raises(TimeoutError):
        main(["inspect", "profile.safetensors"])


def test_a_bare_npy_is_not_taken_for_an_npz(tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.zeros((30, 1, 28, 28), np.float32))
    with pytest.raises(GuardError, match=r"single \.npy array"):
        load_samples(tmp_path / "x.npy")


def test_a_member_declaring_a_huge_shape_is_refused_not_allocated(tmp_path: Path) -> None:
    path = tmp_path / "huge.npz"
    header = {"descr": "<f4", "fortran_order": False, "shape": (10**6, 1, 28, 28_000)}
    with zipfile.ZipFile(path, "w") as archive, archive.open("x.npy", "w") as member:
        np.lib.format.write_array_header_1_0(member, header)  # and no data: what the header says is enough
    with pytest.raises(GuardError, match=r"'x' in .* is float32 of shape \(1000000, 1, 28, 28000\): about .* GiB to "
                                         r"load, more than this machine's"):
        load_samples(path)


def test_a_member_stored_without_an_npy_header_is_refused(tmp_path: Path) -> None:
    """numpy reads a member named 'x' before 'x.npy', and gives one without the .npy header back as bytes (it ended in
    an AttributeError); a valid array stored under the bare name skipped the size check."""
    raw = tmp_path / "raw.npz"
    with zipfile.ZipFile(raw, "w") as archive:
        archive.writestr("x", b"not an array")
    with pytest.raises(GuardError, match=r"'x' in .*raw\.npz is not a numpy array saved by np\.savez"):
        load_samples(raw)
    trigger = tmp_path / "trigger.npz"
    with zipfile.ZipFile(trigger, "w") as archive:
        for name in ("mask", "pattern", "target"):
            archive.writestr(name, bytes(8))
    with pytest.raises(GuardError, match=r"cannot read a trigger from .*'mask' in .* is not a numpy array"):
        load_trigger(trigger, (1, 28, 28), 10)
    huge = tmp_path / "huge.npz"
    header = {"descr": "<f4", "fortran_order": False, "shape": (10**6, 1, 28, 28_000)}
    with zipfile.ZipFile(huge, "w") as archive, archive.open("x", "w") as member:  # the bare name, and no data
        np.lib.format.write_array_header_1_0(member, header)
    with pytest.raises(GuardError, match="GiB to load, more than this machine's"):
        load_samples(huge)


def test_a_pickled_ground_truth_is_refused(tmp_path: Path) -> None:
    path = write_npz(tmp_path / "train.npz", x=np.zeros((30, 1, 8, 8), np.float32), y=np.zeros(30, np.int64),
                     poisoned=np.array([object()] * 30, dtype=object))
    with pytest.raises(GuardError, match="cannot read 'poisoned'"):
        load_poisoned(path, 30)


@pytest.mark.parametrize(("x", "fragment"), [
    (np.zeros((30, 1, 8, 8), np.complex64), "real numbers, got complex64"),  # float32 would drop the imaginary part
    (np.full((30, 1, 8, 8), "a"), "real numbers, got <U1"),
])
def test_data_that_is_not_real_numbers_is_refused(tmp_path: Path, x: np.ndarray, fragment: str) -> None:
    with pytest.raises(GuardError, match=fragment):
        load_samples(write_npz(tmp_path / "data.npz", x=x, y=np.zeros(30, np.int64)))


@pytest.fixture
def training_set(tmp_path: Path) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.random((40, 1, 28, 28), dtype=np.float32), np.arange(40) % 4


@pytest.mark.parametrize(("edit", "options", "fragment"), [
    (lambda x, y: (np.where(np.arange(x.size).reshape(x.shape) == 5, np.nan, x), y), [], "NaN or Inf"),
    (lambda x, y: (x, np.where(y == 3, 9, y)), [], "got 4 distinct labels from 0 to 9"),
    (lambda x, y: (x, -y), [], "got 4 distinct labels from -3 to 0"),
    (lambda x, y: (x, np.where(np.arange(len(y)) == 0, 10**18, y)), [], "labels from 0 to 1000000000000000000"),
    (lambda x, y: (x[:, 0], y), [], "must be (N, C, H, W)"),
    (lambda x, y: (np.repeat(x.transpose(0, 2, 3, 1), 3, axis=3), y), [], "looks channels-last (N, H, W, C)"),
    (lambda x, y: (x, 0 * y), [], "training labels name 1 class(es); a classifier needs at least 2"),
    (lambda x, y: (x, y), ["--lr", "nan"], "--lr and --finetune-lr must be finite and positive"),
    (lambda x, y: (x, y), ["--none", "--finetune-lr", "-1"], "--lr and --finetune-lr must be finite and positive"),
])
def test_train_refuses_data_and_rates_it_cannot_train_on(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                         training_set, edit, options: list[str],
                                                         fragment: str) -> None:
    x, y = edit(*training_set)
    data = write_npz(tmp_path / "train.npz", x=x, y=y)
    line = run(capsys, "train", "--data", data, "--model", "cnn", "--out", tmp_path / "m.onnx", *options)
    assert fragment in line
    assert not (tmp_path / "m.onnx").exists()


def test_integer_pixels_are_refused_not_fed_as_they_are(tmp_path: Path) -> None:
    """uint8 images in an .npz were given to the model as 0..255, where an image folder reads 0..1."""
    data = write_npz(tmp_path / "clean.npz", x=np.zeros((30, 1, 8, 8), np.uint8), y=np.zeros(30, np.int64))
    with pytest.raises(GuardError, match=r"x in .* is uint8; .*x\.astype\('float32'\) / 255"):
        load_samples(data)


def test_the_python_api_refuses_integer_pixels_and_labels_that_are_not_integers(backdoored: Backdoored) -> None:
    """calibrate(), scan and repair cast them in silence: uint8 images calibrated as 0..255."""
    x, y = backdoored.x_clean[:60], backdoored.y_clean[:60]
    eight_bit = (x * 255).astype(np.uint8)
    for run_it in (lambda x, y: calibrate(backdoored.model_path, x, y),
                   lambda x, y: run_scan(backdoored.model_path, x, y),
                   lambda x, y: repair(backdoored.model_path, x, y)):
        with pytest.raises(GuardError, match=r"data is uint8; .*x\.astype\('float32'\) / 255"):
            run_it(eight_bit, y)
        with pytest.raises(GuardError, match="labels must be integers, got float64"):
            run_it(x, y + 0.5)


def test_a_sample_scaled_unlike_the_rest_is_refused_and_named(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                              backdoored: Backdoored) -> None:
    """One image stored 0..255 among 0..1 ones raised the check's k from 3 to 842 (a review measured attack success
    under the guard 0.8% -> 27.7%); data normalised to mean 0 and std 1 spans more, but alike, and is taken."""
    x, y = backdoored.x_clean[:200].copy(), backdoored.y_clean[:200]
    check_samples((x - x.mean()) / x.std(), y, x.shape[1:], 10, "calibration", every_class=True)
    dark = x.copy()  # most frames near-blank: against the median span every ordinary image read as mis-scaled
    dark[:120] = np.random.default_rng(0).uniform(0, 0.03, dark[:120].shape).astype(np.float32)
    check_samples(dark, y, x.shape[1:], 10, "calibration", every_class=True)
    x[17] *= 255
    line = run(capsys, "calibrate", backdoored.model_path, "--data", write_npz(tmp_path / "c.npz", x=x, y=y),
               "--no-scan", "--out", tmp_path / "p.safetensors")
    assert "1 calibration sample(s) span more than 20 times the values three quarters" in line, line
    assert "sample(s) [17] span 255" in line, line
    with pytest.raises(GuardError, match=r"repair sample\(s\) span more than 20 times"):
        repair(backdoored.model_path, x, y)


def test_clean_data_missing_a_class_or_all_constant_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                                backdoored: Backdoored) -> None:
    """A class without clean samples was scored against the other classes' pooled profile (most of its requests
    flagged), and a repair fine-tuned without it forgot it; constant images gave a profile that flagged everything."""
    x, y = backdoored.x_clean[:200], backdoored.y_clean[:200]
    seen = y < 5
    missing = write_npz(tmp_path / "missing.npz", x=x[seen], y=y[seen])
    for command in ("calibrate", "repair"):
        line = run(capsys, command, backdoored.model_path, "--data", missing, "--out", tmp_path / "out",
                   *(["--no-scan"] if command == "calibrate" else []))
        assert "has no sample of class(es) [5, 6, 7, 8, 9]" in line, command
    blank = write_npz(tmp_path / "blank.npz", x=np.zeros_like(x), y=y)
    assert "every calibration sample is one constant value" in run(
        capsys, "calibrate", backdoored.model_path, "--data", blank, "--no-scan", "--out", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_repair_that_trains_needs_an_epoch(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                           backdoored: Backdoored) -> None:
    """--epochs 0 wrote the model unchanged and said it had new weights."""
    clean = write_npz(tmp_path / "clean.npz", x=backdoored.x_clean[:100], y=backdoored.y_clean[:100])
    line = run(capsys, "repair", backdoored.model_path, "--data", clean, "--epochs", "0", "--out", tmp_path / "r.onnx")
    assert "--epochs must be >= 1 (ar trains)" in line and not (tmp_path / "r.onnx").exists()


def test_an_output_that_is_an_input_is_refused_before_the_run(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                              training_set, backdoored: Backdoored) -> None:
    """Writing the profile over the model, the repaired model over the backdoored one (the evidence), the report over
    the repaired model or a trained model over its data would lose what the command was run on."""
    x, y = training_set
    data = write_npz(tmp_path / "train.npz", x=x, y=y)
    model = tmp_path / "model.onnx"
    model.write_bytes(backdoored.model_path.read_bytes())
    clean = write_npz(tmp_path / "clean.npz", x=backdoored.x_clean[:100], y=backdoored.y_clean[:100])
    earlier_scan = tmp_path / "scan"  # an earlier guard scan's files are inputs too
    earlier_scan.mkdir()
    (earlier_scan / "scan.json").write_text("{}")
    (earlier_scan / "candidate_0.npz").write_bytes(b"trigger")
    before = {path: path.read_bytes() for path in (data, model, clean, *earlier_scan.iterdir())}
    for command in (["train", "--data", data, "--model", "cnn", "--out", data],
                    ["calibrate", model, "--data", clean, "--scan-dir", earlier_scan, "--out", earlier_scan / "scan.json"],
                    ["repair", model, "--data", clean, "--scan-dir", earlier_scan, "--out", tmp_path / "r.onnx",
                     "--report", earlier_scan / "candidate_0.npz"],
                    ["calibrate", model, "--data", clean, "--no-scan", "--out", model],
                    ["calibrate", model, "--data", clean, "--no-scan", "--out", tmp_path / "." / "clean.npz"],
                    ["repair", model, "--data", clean, "--out", model],
                    ["repair", model, "--data", clean, "--out", tmp_path / "r.onnx", "--report", tmp_path / "r.onnx"]):
        assert "is one of this command's inputs or outputs" in run(capsys, *command), command
    assert {path: path.read_bytes() for path in before} == before
    assert not (tmp_path / "r.onnx").exists()


def test_outputs_that_name_a_folder_or_lie_in_an_input_folder_are_refused(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], backdoored: Backdoored) -> None:
    """`--out .` raised a ValueError traceback in repair and train (the report is named after it); a profile written
    into a folder of images replaced one of them, and the folder no longer loaded."""
    from PIL import Image

    clean = write_npz(tmp_path / "clean.npz", x=backdoored.x_clean[:100], y=backdoored.y_clean[:100])
    for out in (".", "/", "", "new/.", "new/.."):  # `new/.` wrote a model named `new`
        for command in (["repair", backdoored.model_path, "--data", clean],
                        ["train", "--data", clean, "--model", "cnn"]):
            with pytest.raises(SystemExit) as stopped:
                main([*map(str, command), "--out", out])
            err = capsys.readouterr().err
            assert stopped.value.code == 2 and "names a folder; give a file name to write" in err, (command, out)
    assert not Path("new").exists()
    images = tmp_path / "images"
    for label in range(10):
        (images / str(label)).mkdir(parents=True)
        for index in np.flatnonzero(backdoored.y_clean[:100] == label)[:3]:
            pixels = (backdoored.x_clean[index, 0] * 255).astype(np.uint8)
            Image.fromarray(pixels).save(images / str(label) / f"{index}.png")
    victim = next((images / "3").iterdir())
    before = victim.read_bytes()
    for out in (victim, images / "3" / "new.safetensors"):
        assert "lies in an input folder" in run(capsys, "calibrate", backdoored.model_path, "--data", images,
                                                "--no-scan", "--out", out)
    assert victim.read_bytes() == before and not (images / "3" / "new.safetensors").exists()


def test_data_missing_a_class_is_refused_before_the_scan(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                        backdoored: Backdoored,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Refused after the scan's tens of seconds (minutes on a real model), where --no-scan refused it at once."""
    import guard.scan

    def no_scan(*args: object, **kwargs: object) -> None:
        raise AssertionError("the scan ran before the data was checked")

    monkeypatch.setattr(guard.scan, "run_scan", no_scan)
    keep = backdoored.y_clean[:200] != 3
    clean = write_npz(tmp_path / "clean.npz", x=backdoored.x_clean[:200][keep], y=backdoored.y_clean[:200][keep])
    made = tmp_path / "made" / "deeper"  # folders made for the outputs go again with the refused run
    for command in (["calibrate", backdoored.model_path, "--data", clean, "--out", made / "p.safetensors"],
                    ["repair", backdoored.model_path, "--data", clean, "--scan", "--out", made / "r.onnx"]):
        assert "has no sample of class(es) [3]" in run(capsys, *command), command
        assert not (tmp_path / "made").exists()


def test_a_misspelt_layer_is_refused_before_the_scan(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                             backdoored: Backdoored) -> None:
    clean = write_npz(tmp_path / "clean.npz", x=backdoored.x_clean[:100], y=backdoored.y_clean[:100])
    for command in ("calibrate", "repair"):
        code = main([command, str(backdoored.model_path), "--data", str(clean), "--layers", "relu_9",
                     "--out", str(tmp_path / "out"), *(["--scan"] if command == "repair" else [])])
        out, err = capsys.readouterr()
        assert code == 2 and "no tensor named ['relu_9']" in err, command
        assert "scan" not in out, command  # refused before the scan's seconds were spent
    loaded = load_model(backdoored.model_path)
    features = default_taps(loaded, conv_taps=1)[-1]  # a model that hands out its penultimate features too is tapped
    with_features = onnx.load(backdoored.model_path)
    with_features.graph.output.append(helper.make_tensor_value_info(features, TensorProto.FLOAT, ["N", None]))
    validate_taps(load_model(with_features), default_taps(load_model(with_features), conv_taps=1))
    ends = [loaded.input_name, loaded.output_name]
    for end in ends:  # the output was calibrated, and the profile could then never be served
        assert f"cannot tap the model's input or its logits ['{end}']" in run(
            capsys, "calibrate", backdoored.model_path, "--data", clean, "--layers", end, "--no-scan",
            "--out", tmp_path / "out")


@pytest.mark.parametrize("command", [["calibrate", "m.onnx", "--out", "p.safetensors"], ["scan", "m.onnx"],
                                     ["repair", "m.onnx", "--out", "r.onnx"], ["train", "--model", "cnn",
                                                                               "--out", "t.onnx"]])
def test_a_negative_seed_is_refused_before_anything_is_read(command: list[str],
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """numpy's generators refuse one with a traceback, after the data was read (calibrate, scan, repair)."""
    with pytest.raises(SystemExit) as exited:
        main([*command, "--data", "missing.npz", "--seed", "-1"])
    assert exited.value.code == 2 and "a seed is a whole number in 0..2^32-1, got '-1'" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # torch's generators take none past 64 bits
        main([*command, "--data", "missing.npz", "--seed", str(2**64)])
    assert f"got '{2**64}'" in capsys.readouterr().err


def test_scan_refuses_an_output_folder_that_is_a_file_before_scanning(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str],
                                                                      backdoored: Backdoored) -> None:
    clean = write_npz(tmp_path / "clean.npz", x=backdoored.x_clean[:100], y=backdoored.y_clean[:100])
    taken = tmp_path / "taken"
    taken.write_text("a file")
    code = main(["scan", str(backdoored.model_path), "--data", str(clean), "--out", str(taken)])
    out, err = capsys.readouterr()
    assert code == 2 and "cannot use" in err and str(taken) in err
    assert "anomaly" not in out  # the scan's report was never printed
    images = tmp_path / "images"
    (images / "0").mkdir(parents=True)
    for inside in (images, images / "scan"):  # its pictures would be read as samples, of another size, next time
        assert main(["scan", str(backdoored.model_path), "--data", str(images), "--out", str(inside)]) == 2
        assert "lies in the data folder" in capsys.readouterr().err and not (images / "scan").exists()
    masks = tmp_path / "masks"  # a folder of the user's own, whose names a scan would take for its files
    masks.mkdir()
    (masks / "mask_0.png").write_bytes(b"mine")
    assert main(["scan", str(backdoored.model_path), "--data", str(clean), "--out", str(masks)]) == 2
    out, err = capsys.readouterr()
    assert "holds mask_0.png" in err and "anomaly" not in out and (masks / "mask_0.png").read_bytes() == b"mine"


def test_outputs_that_are_folders_are_refused_before_the_run(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                             training_set, backdoored: Backdoored) -> None:
    x, y = training_set
    data = write_npz(tmp_path / "train.npz", x=x, y=y)
    folder = tmp_path / "taken"
    folder.mkdir()
    assert "is a folder" in run(capsys, "train", "--data", data, "--model", "cnn", "--out", folder)
    clean = write_npz(tmp_path / "clean.npz", x=backdoored.x_clean[:100], y=backdoored.y_clean[:100])
    for command in (["calibrate", backdoored.model_path, "--data", clean, "--no-scan", "--out", folder],
                    ["repair", backdoored.model_path, "--data", clean, "--out", folder]):
        assert "is a folder" in run(capsys, *command)
    assert list(folder.iterdir()) == []  # nothing half-written inside either
    # one that does not exist yet, written as a folder: Path dropped the slash, and repair wrote a model named `new`
    # (see also test_outputs_that_name_a_folder_or_lie_in_an_input_folder_are_refused)
    for command in (["calibrate", backdoored.model_path, "--data", clean, "--out"],
                    ["repair", backdoored.model_path, "--data", clean, "--out"],
                    ["repair", backdoored.model_path, "--data", clean, "--out", "m.onnx", "--report"],
                    ["train", "--data", data, "--model", "cnn", "--out"],
                    ["export", "--model", "cnn", "--weights", data, "--input-shape", "1,28,28", "--out"]):
        with pytest.raises(SystemExit) as stopped:
            main([*map(str, command), f"{tmp_path / 'new'}/"])
        assert stopped.value.code == 2 and "names a folder; give a file name to write" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


def test_a_refused_run_removes_every_folder_it_made_for_its_outputs(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                                     training_set, monkeypatch: pytest.MonkeyPatch
                                                                     ) -> None:
    """The folders made for --out stayed where the --report after it was refused, and a parent made for both
    outputs stayed where the leaf of the second was removed after it."""
    monkeypatch.chdir(tmp_path)
    x, y = training_set
    data = write_npz(tmp_path / "train.npz", x=x, y=y)
    assert "is one of this command's inputs" in run(capsys, "train", "--data", data, "--model", "cnn", "--out",
                                                    "a1/a2/m.onnx", "--report", data)
    assert "cannot import 'no_such_module:make'" in run(capsys, "train", "--data", data, "--model",
                                                        "no_such_module:make", "--out", "b/m/m.onnx",
                                                        "--report", "b/r/r.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.npz"]
    figures = json.loads((Path(__file__).parents[1] / "docs" / "eval" / "figures.json").read_text())
    del figures["cases"][0]["adversarial"]
    (tmp_path / "given.json").write_text(json.dumps(figures))
    assert "cannot draw a report" in run(capsys, "eval", "--figures", "given.json", "--out", "new/report")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["given.json", "train.npz"]


def test_a_profile_that_cannot_be_written_leaves_no_temporary_file(tmp_path: Path, backdoored: Backdoored) -> None:
    folder = tmp_path / "taken.safetensors"
    folder.mkdir()
    with pytest.raises(GuardError, match="cannot write"):
        Profile.load(backdoored.profile_path).save(folder)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken.safetensors"]


def test_train_writes_into_a_new_folder_and_leaves_no_temporary_file(tmp_path: Path, training_set) -> None:
    x, y = training_set
    data = write_npz(tmp_path / "train.npz", x=x, y=y)
    out = tmp_path / "new" / "deeper" / "m.onnx"
    assert main(["train", "--data", str(data), "--model", "cnn", "--out", str(out), "--epochs", "1"]) == 0
    assert load_model(out).num_classes == 4
    assert sorted(p.name for p in out.parent.iterdir()) == ["m.onnx", "m.train.json"]


# ------------------------------------------------------------------------------------------------- models


def tiny_model(batch: int | str = "N", elem: int = TensorProto.FLOAT, classes: int = 3, opset: int = 17,
               softmax: str | None = None, sample: tuple[int, int, int] = (1, 4, 4)) -> onnx.ModelProto:
    """`softmax`: the op that takes a Softmax of the scores to the output."""
    weight = numpy_helper.from_array(np.ones((int(np.prod(sample)), classes), np.float32), "w")
    nodes = [helper.make_node("Flatten", ["x"], ["f"]), helper.make_node("MatMul", ["f", "w"], ["scores"])]
    if softmax:
        nodes += [helper.make_node("Softmax", ["scores"], ["p"], axis=1), helper.make_node(softmax, ["p"], ["logits"])]
    else:
        nodes += [helper.make_node("Identity", ["scores"], ["logits"])]
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("x", elem, [batch, *sample])],
        [helper.make_tensor_value_info("logits", elem, [batch, classes])], [weight])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def test_a_tiny_model_of_the_right_form_loads() -> None:
    assert load_model(tiny_model()).num_classes == 3  # the refusals below are for their one defect
    # channels first, of any image size, and a (C, T, 1) signal, which is no square image with its channels last
    for sample in ((3, 32, 32), (1, 28, 28), (4, 8, 8), (9, 128, 1), (8, 16, 4)):
        assert load_model(tiny_model(sample=sample)).sample_shape == sample
    # an output declared without its classes (tf2onnx names them unk__N), or with no shape at all: the graph tells
    symbolic, shapeless = tiny_model(), tiny_model()
    symbolic.graph.output[0].type.tensor_type.shape.dim[1].dim_param = "unk__7"
    shapeless.graph.output[0].type.tensor_type.ClearField("shape")
    assert load_model(symbolic).num_classes == load_model(shapeless).num_classes == 3
    # default-domain nodes with only another domain imported: ONNX Runtime runs them (as opset 13 here)
    other_domain = tiny_model()
    other_domain.opset_import[0].CopyFrom(helper.make_opsetid("ai.onnx.ml", 3))
    assert load_model(other_domain).num_classes == 3


def _node_names(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    for node, name in zip(model.graph.node, names, strict=False):
        node.name = name
    return model


def _in_domain(model: onnx.ModelProto, domain: str) -> onnx.ModelProto:
    model.graph.node[0].domain = domain
    return model


@pytest.mark.parametrize(("model", "fragment"), [
    (tiny_model(batch=1), "batch dimension is fixed at 1"),
    (tiny_model(elem=TensorProto.DOUBLE), "float32 inputs; 'x' is DOUBLE"),
    (tiny_model(classes=1), "at least 2 classes"),
    # refused before a calibration whose profile could not be served
    (tiny_model(opset=9), "opset 10 or later; this model uses opset 9"),
    # the scan, repairs and reference train through the output, the confirmations read its softmax
    (tiny_model(softmax="Identity"), "is a Softmax of its logits; guard needs the logits"),
    (tiny_model(softmax="Flatten"), "is a Softmax of its logits"),  # it was taken for logits behind a reshape
    (tiny_model(softmax="Dropout"), "is a Softmax of its logits"),
    # a scan's mask over (H, W, C) would be one value per column, its PNG a strip
    (tiny_model(sample=(28, 28, 1)), "of shape .None, 28, 28, 1. looks channels-last"),
    (tiny_model(sample=(32, 32, 3)), "model.x.permute.0, 2, 3, 1.."),
    # calibrated, then refused by ONNX Runtime when served; and a traceback from shape inference
    (_node_names(tiny_model(), ["a", "b", "a"]), "nodes share the name.s. .'a'."),
    (_in_domain(tiny_model(), "com.example"), "domain.s. .'com.example'. that it does not import"),
    (b"", "<bytes> holds no ONNX graph"),  # was "exactly one input; this one has []"
])
def test_models_guard_cannot_serve_are_refused_at_load(model: onnx.ModelProto | bytes, fragment: str) -> None:
    with pytest.raises(ModelError, match=fragment.replace("(", r"\(")):
        load_model(model)


def test_a_model_with_external_weights_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "external.onnx"
    onnx.save_model(tiny_model(), path, save_as_external_data=True, location="w.bin", size_threshold=0)
    assert (tmp_path / "w.bin").is_file()
    with pytest.raises(ModelError, match="external data"):
        load_model(path)


# ------------------------------------------------------------------------------------------------- triggers, scan


@pytest.mark.parametrize(("mask", "fragment"), [
    (np.full((1, 28, 28), 50.0, np.float32), r"mask must lie in \[0, 1\]"),
    (np.full((1, 28, 28), -5.0, np.float32), r"mask must lie in \[0, 1\]"),
    (np.full((1, 28, 28), "a"), "must hold real numbers"),
])
def test_a_trigger_mask_outside_zero_one_is_refused(tmp_path: Path, mask: np.ndarray, fragment: str) -> None:
    path = write_npz(tmp_path / "trigger.npz", mask=mask, pattern=np.zeros((1, 28, 28), np.float32),
                     target=np.int64(0))
    with pytest.raises(GuardError, match=fragment):
        load_trigger(path, (1, 28, 28), 10)


def test_a_trigger_given_as_npy_is_refused(tmp_path: Path) -> None:
    """... pointing to guard scan's files, not to the data's np.savez(path, x=..., y=...)."""
    np.save(tmp_path / "mask.npy", np.zeros((1, 28, 28), np.float32))
    (tmp_path / "mask.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    for given in ("mask.npy", "mask.png"):
        for load in (load_trigger, load_any_trigger):
            with pytest.raises(GuardError, match="cannot read a trigger") as refused:
                load(tmp_path / given, (1, 28, 28), 10)
            assert "give a trigger file guard scan wrote" in str(refused.value)
            assert "x=..." not in str(refused.value)


@pytest.mark.parametrize("threshold", [float("nan"), -100.0, 0.0])
def test_a_scan_threshold_that_names_nothing_or_everything_is_refused(threshold: float) -> None:
    with pytest.raises(GuardError, match="--threshold must be a finite anomaly index above 0"):
        ScanSettings(threshold=threshold).validate()


def test_a_scan_replaces_an_earlier_scans_trigger_files_and_writes_its_candidates(tmp_path: Path,
                                                                        backdoored: Backdoored) -> None:
    report = run_scan(backdoored.model_path, backdoored.x_clean[:60], backdoored.y_clean[:60],
                      settings=ScanSettings(steps=40, threshold=1e9,  # a threshold nothing reaches
                                            warp_scan=False, blend_scan=False))  # stamp files are the point
    assert report.suspect is None
    for name in ("trigger.npz", "trigger_0.png", "mask_0.png", "candidate_0.npz", "candidate_9.npz", "notes.txt"):
        (tmp_path / name).write_text("from an earlier scan")
    (tmp_path / "scan.json").write_text(json.dumps({"files": {
        "candidates": ["candidate_0.npz", "candidate_9.npz"], "trigger": "trigger.npz", "trigger_png": "trigger_0.png",
        "mask_png": "mask_0.png"}}))
    write_outputs(report, tmp_path)
    candidates = sorted(f"candidate_{t.target}.npz" for t in report.candidates)  # filled: the two most anomalous
    assert len(candidates) == 2
    # the user's own file stays; the earlier scan's suspect and candidates go, whatever this scan's candidates are
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["notes.txt", "scan.json", *candidates])
    assert sorted(json.loads((tmp_path / "scan.json").read_text())["files"]["candidates"]) == candidates
    for trigger in report.candidates:
        loaded = load_trigger(tmp_path / f"candidate_{trigger.target}.npz", (1, 28, 28), 10)
        assert loaded.target == trigger.target and np.array_equal(loaded.mask, trigger.mask)


# ------------------------------------------------------------------------------------------------- bench, eval


@pytest.mark.parametrize("option", [["--callers", "0"], ["--seconds", "0"], ["--threads", "-1"],
                                    ["--threads", "1000000"],  # ONNX Runtime makes them all: 20 GiB, then killed
                                    ["--server-batch-size", "-1"]])
def test_bench_refuses_settings_it_cannot_measure_with(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                       backdoored: Backdoored, option: list[str]) -> None:
    line = run(capsys, "bench", backdoored.model_path, "--profile", backdoored.profile_path, "--out", tmp_path / "b",
               *option)
    assert "--callers must be >= 1" in line


@pytest.mark.parametrize("command", ["bench", "load"])
def test_bench_and_load_without_tritonclient_say_what_to_install(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                                 backdoored: Backdoored, command: str,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """tritonclient is the `client` extra, not a dependency: bench failed with a traceback after its timings."""
    monkeypatch.setitem(sys.modules, "tritonclient.grpc", None)  # `import tritonclient.grpc` now raises ImportError
    line = run(capsys, command, backdoored.model_path, "--profile", backdoored.profile_path, "--out", tmp_path / "b",
               *(["--data", tmp_path / "none.npz"] if command == "load" else []))
    assert f"guard {command} calls guard serve with tritonclient" in line and "pip install 'guard[client]'" in line
    assert not (tmp_path / "b").exists()


def test_bench_refuses_an_output_folder_that_is_a_file_before_measuring(capsys: pytest.CaptureFixture[str],
                                                                        tmp_path: Path,
                                                                        backdoored: Backdoored) -> None:
    taken = tmp_path / "file"
    taken.write_text("")
    assert "cannot write the bench results" in run(capsys, "bench", backdoored.model_path, "--profile",
                                                   backdoored.profile_path, "--out", taken)


@pytest.mark.parametrize(("content", "fragment"), [
    (None, "cannot read the figures"), ("{not json", "cannot read the figures"),
    ("[1, 2]", "not a guard eval figures.json"),
    ('{"cases": []}', "holds no case: there is no report to draw"),
])
def test_eval_refuses_figures_it_cannot_read(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                             content: str | None, fragment: str) -> None:
    figures = tmp_path / "figures.json"
    if content is not None:
        figures.write_text(content)
    assert fragment in run(capsys, "eval", "--figures", figures, "--out", tmp_path / "report")
    assert not (tmp_path / "report").exists()  # a refused run leaves no empty report folder behind


def test_eval_refuses_run_options_with_figures(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """A redraw runs nothing: `--quick` with it exited 0 without its floors checked, which a CI step would pass."""
    figures = Path(__file__).parents[1] / "docs" / "eval" / "figures.json"
    said = run(capsys, "eval", "--figures", figures, "--quick", "--seeds", "0", "--workers", "0", "--out", tmp_path)
    assert "--figures only redraws a report; --quick, --seeds, --workers would run the suite" in said
    assert not any(tmp_path.iterdir())


def test_an_eval_whose_every_case_fails_writes_nothing_over_an_earlier_report(
        capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the dataset every case failed, the report's plot raised, and figures.json with no case was left
    beside the earlier run's report.md and plots; the failures were never printed."""
    out = tmp_path / "report"
    out.mkdir()
    (out / "report.md").write_text("the earlier run")
    monkeypatch.setenv("GUARD_FASHION_MNIST_DIR", str(tmp_path / "absent"))
    assert main(["eval", "--quick", "--workers", "1", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("guard eval: case failed:") == 2 and "every case failed (2); nothing written" in err
    assert sorted(p.name for p in out.iterdir()) == ["report.md"] and (out / "report.md").read_text() == "the earlier run"
    assert "seeds must lie in 0..2^32-1" in run(capsys, "eval", "--quick", "--seeds", "-1", "--out", out)
    fresh = tmp_path / "fresh" / "report"  # neither exists: both are removed
    assert "seeds must lie in 0..2^32-1" in run(capsys, "eval", "--quick", "--seeds", "-1", "--out", fresh)
    assert main(["eval", "--quick", "--workers", "1", "--out", str(fresh)]) == 2
    assert "every case failed (2); nothing written" in capsys.readouterr().err
    assert not fresh.parent.exists()  # a run that wrote nothing leaves no empty folder it made


def test_a_report_without_attacked_cases_leaves_no_earlier_roc_curves(tmp_path: Path) -> None:
    from guard.eval.report import write_report

    figures = json.loads((Path(__file__).parents[1] / "docs" / "eval" / "figures.json").read_text())
    figures["cases"] = [case for case in figures["cases"] if case["attack"] == "clean"]
    (tmp_path / "roc.png").write_bytes(b"an earlier run's curves")
    write_report(figures, tmp_path, "guard eval")
    assert not (tmp_path / "roc.png").exists() and (tmp_path / "bars.png").exists()


@pytest.mark.parametrize("lacks", ["adversarial", "n_poisoned"])
def test_a_redraw_that_fails_leaves_the_earlier_report_and_figures(capsys: pytest.CaptureFixture[str],
                                                                   tmp_path: Path, lacks: str) -> None:
    """figures_missing looks at a case's four keys; the drawing reads more. A file lacking one deleted report.md,
    replaced figures.json, then died with a KeyError traceback."""
    figures = json.loads((Path(__file__).parents[1] / "docs" / "eval" / "figures.json").read_text())
    del figures["cases"][0][lacks]
    given = tmp_path / "given.json"
    given.write_text(json.dumps(figures))
    out = tmp_path / "report"
    out.mkdir()
    earlier = {"report.md": "the earlier report", "figures.json": "{}", "roc.png": "curves", "bars.png": "bars"}
    for name, text in earlier.items():
        (out / name).write_text(text)
    said = run(capsys, "eval", "--figures", given, "--out", out)
    assert f"cannot draw a report from {given}" in said and f"KeyError: '{lacks}'" in said
    assert {p.name: p.read_text() for p in out.iterdir()} == earlier  # nothing replaced, no drawing folder left


def test_figures_json_is_strict_json_and_redraws_the_same_report(tmp_path: Path) -> None:
    """A figure over no image (no triggered image took) is NaN in memory; figures.json says null, which jq and
    JavaScript read, where Python's NaN token is refused, and the report redrawn from it is the same."""
    from guard.eval.report import write_report

    figures = json.loads((Path(__file__).parents[1] / "docs" / "eval" / "figures.json").read_text())
    guard = next(case for case in figures["cases"] if case["attack"] == "adaptive")["methods"]["guard"]
    guard.update(tpr_took=float("nan"), auroc_took=float("nan"), n_took=0)
    first = write_report(figures, tmp_path / "first", "guard eval").read_text()
    raw = (tmp_path / "first" / "figures.json").read_text()
    written = json.loads(raw, parse_constant=lambda name: pytest.fail(f"{name} in figures.json"))
    assert "NaN" not in raw and None in (case["methods"]["guard"]["auroc_took"] for case in written["cases"])
    assert write_report(written, tmp_path / "again", "guard eval").read_text() == first


def test_repeated_samples_are_left_out_and_rates_too_few_samples_cannot_bound_are_named(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], backdoored: Backdoored) -> None:
    """A repeated image sits in another cross-fitting fold than its copy and scores like a sample the fit has seen,
    lowering the thresholds; below ln(1 - confidence) / ln(1 - rate) samples a rate cannot be bounded at all."""
    from guard.calibrate.consistency import samples_to_bound
    from guard.calibrate.pipeline import CalibrationSettings, calibrate

    x, y = backdoored.x_clean[:80], backdoored.y_clean[:80]
    once = calibrate(backdoored.model_path, x, y, settings=CalibrationSettings(reference=False))
    assert once.figures["duplicates_dropped"] == 0 and once.figures["unanswered_classes"] == []
    assert once.figures["unbounded_rates"] == {"demote_rate": 153, "envelope_demote_rate": 460}  # fpr 5% needs 45
    assert samples_to_bound(0.05, 0.9) == 45 and (1 - 0.05) ** 45 <= 0.1 < (1 - 0.05) ** 44
    twice = write_npz(tmp_path / "twice.npz", x=np.concatenate([x, x[:40]]), y=np.concatenate([y, y[:40]]))
    assert main(["calibrate", str(backdoored.model_path), "--data", str(twice), "--no-scan", "--no-reference",
                 "--quiet", "--out", str(tmp_path / "p.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "40 clean sample(s) repeat an earlier one and were left out" in out
    assert "80 clean samples cannot bound --demote-rate (needs 153), --envelope-demote-rate (needs 460)" in out
    profile = Profile.load(tmp_path / "p.safetensors")
    assert profile.figures["duplicates_dropped"] == 40 and profile.figures["samples"] == 80
    assert profile.thresholds.tau == once.thresholds.tau and profile.thresholds.demote == once.thresholds.demote


def test_unlabelled_calibration_prints_agreement_not_accuracy(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                             backdoored: Backdoored) -> None:
    """Without labels the model's answers stand in for them: its 'accuracy' was 1.000 by definition."""
    data = write_npz(tmp_path / "x.npz", x=backdoored.x_clean[:300])
    assert main(["calibrate", str(backdoored.model_path), "--data", str(data), "--no-scan", "--no-reference",
                 "--out", str(tmp_path / "p.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "held-out agreement with the model 1.000 -> " in out and "accuracy" not in out


def test_unlabelled_data_the_reference_would_forget_a_class_on_is_refused_before_the_scan(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], backdoored: Backdoored,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The reference's fine-tuning refused it, worded as repair's, after a scan of a minute and more."""
    import guard.scan

    def no_scan(*args: object, **kwargs: object) -> None:
        raise AssertionError("the scan ran before the data was checked")

    monkeypatch.setattr(guard.scan, "run_scan", no_scan)
    model = load_model(backdoored.model_path)
    answers = collect(OnnxTaps(model, []), backdoored.x_clean).predictions
    unlabelled = backdoored.x_clean[answers != 3]
    data = write_npz(tmp_path / "x.npz", x=unlabelled)
    said = run(capsys, "calibrate", backdoored.model_path, "--data", data, "--out", tmp_path / "p.safetensors")
    assert f"answers none of the {len(unlabelled)} unlabelled calibration samples with class(es) [3]" in said
    assert "--no-reference" in said and not (tmp_path / "p.safetensors").exists()
    with pytest.raises(GuardError, match=r"unlabelled calibration samples with class\(es\) \[3\]"):
        calibrate(model, unlabelled)
    assert main(["calibrate", str(backdoored.model_path), "--data", str(data), "--no-scan", "--no-reference",
                 "--quiet", "--out", str(tmp_path / "p.safetensors")]) == 0
    assert "note: the model answers none of the" in capsys.readouterr().out  # without the reference: a note


def test_output_cut_short_by_its_reader_ends_quietly(backdoored: Backdoored) -> None:
    """`guard inspect profile | head` ended in a BrokenPipeError traceback."""
    import subprocess
    import sys

    done = subprocess.Popen([sys.executable, "-m", "guard", "inspect", str(backdoored.profile_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    done.stdout.close()  # before guard has imported what it needs, so its first write finds no reader
    err = done.stderr.read()
    assert done.wait(timeout=120) == 1 and "Traceback" not in err and "BrokenPipe" not in err, err
