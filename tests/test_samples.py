"""Image folders as data: what `--data FOLDER` reads, and how it refuses a folder it cannot read right."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import Backdoored, log_messages
from guard.calibrate.profile import Profile
from guard.cli import main
from guard.errors import GuardError
from guard.samples import check_samples, load_poisoned, load_samples, write_atomic, write_json


def write_images(folder: Path, x: np.ndarray, y: np.ndarray | None, suffix: str = ".png") -> Path:
    """`x` (N, C, H, W) in [0, 1] as 8-bit images: under class folders `y[i]/` where labelled, else directly."""
    for i, sample in enumerate(x):
        where = folder if y is None else folder / str(int(y[i]))
        where.mkdir(parents=True, exist_ok=True)
        pixels = np.rint(sample * 255).astype(np.uint8)
        image = Image.fromarray(pixels[0]) if len(pixels) == 1 else Image.fromarray(pixels.transpose(1, 2, 0))
        image.save(where / f"{i:05d}{suffix}")
    return folder


def test_class_folders_give_the_images_and_their_labels(tmp_path: Path, backdoored: Backdoored) -> None:
    x, y = backdoored.x_clean[:40], backdoored.y_clean[:40]
    loaded_x, loaded_y = load_samples(write_images(tmp_path / "clean", x, y))
    order = np.lexsort((np.arange(len(y)), y))  # read class by class, each in file-name order
    assert loaded_x.dtype == np.float32 and loaded_x.shape == x.shape
    assert np.array_equal(loaded_y, y[order])
    assert np.abs(loaded_x - x[order]).max() <= 0.5 / 255 + 1e-6  # only 8-bit rounding
    assert load_poisoned(tmp_path / "clean", len(x)) is None


def test_loose_images_are_unlabelled_and_colour_ones_have_three_channels(tmp_path: Path) -> None:
    rgb = np.random.default_rng(0).random((5, 3, 8, 6), dtype=np.float32)
    write_images(tmp_path / "rgb", rgb, None)
    (tmp_path / "rgb" / "notes.txt").write_text("not an image, skipped")
    (tmp_path / "rgb" / ".DS_Store").write_bytes(b"\0")
    x, y = load_samples(tmp_path / "rgb")
    assert y is None and x.shape == (5, 3, 8, 6) and np.abs(x - rgb).max() <= 0.5 / 255 + 1e-6
    Image.fromarray(np.zeros((8, 6, 4), np.uint8), "RGBA").save(tmp_path / "rgb" / "00005.png")  # alpha is dropped
    assert load_samples(tmp_path / "rgb")[0].shape == (6, 3, 8, 6)


def test_files_that_are_not_images_are_named_as_skipped(tmp_path: Path) -> None:
    """A folder short of the files guard cannot read says so, rather than calibrating on fewer samples unawares."""
    x = np.random.default_rng(1).random((3, 1, 4, 4), dtype=np.float32)
    write_images(tmp_path / "data", x, np.array([0, 1, 1]))
    (tmp_path / "data" / "1" / "IMG_0001.heic").write_bytes(b"\0")
    (tmp_path / "data" / "0" / ".hidden").write_bytes(b"\0")
    (tmp_path / "data" / "labels.csv").write_text("beside the class folders")
    (tmp_path / "data" / "0" / "9.png").symlink_to(tmp_path / "moved.png")  # a link to an image no longer there
    with log_messages("guard.samples") as messages:
        assert len(load_samples(tmp_path / "data")[0]) == 3
        assert len(messages) == 1 and "skipped 3 file(s)" in messages[0]
        assert all(name in messages[0] for name in ("IMG_0001.heic", "labels.csv", "9.png"))
        for name in ("1/IMG_0001.heic", "labels.csv", "0/9.png"):
            (tmp_path / "data" / name).unlink()
        load_samples(tmp_path / "data")
        assert len(messages) == 1  # hidden files are no one's samples


def test_a_folder_is_grey_only_if_every_image_is(tmp_path: Path) -> None:
    """A palette image of greys is grey; one colour image makes the whole folder RGB, the grey ones repeated."""
    folder = tmp_path / "data"
    folder.mkdir()
    grey = Image.fromarray(np.arange(16, dtype=np.uint8).reshape(4, 4) * 16)
    grey.convert("P").save(folder / "a.png")
    grey.save(folder / "b.jpg", quality=100)
    x, _ = load_samples(folder)
    assert x.shape == (2, 1, 4, 4)
    Image.fromarray(np.dstack([np.zeros((4, 4), np.uint8), np.full((4, 4), 200, np.uint8),
                               np.zeros((4, 4), np.uint8)])).save(folder / "c.png")
    x, _ = load_samples(folder)
    assert x.shape == (3, 3, 4, 4) and np.array_equal(x[0, 0], x[0, 2]) and x[2, 1].min() == np.float32(200 / 255)


def _named_classes(folder: Path) -> None:
    (folder / "cat").mkdir(parents=True)
    Image.new("L", (4, 4)).save(folder / "cat" / "0.png")


def _png16(path: Path, colour_type: int, channels: int) -> None:
    """A 16-bit PNG written by hand (Pillow writes none in colour): Pillow opens it as 8-bit RGB or RGBA."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = np.full((4, 4 * channels), 40000, ">u2")
    pixels = b"".join(b"\0" + row.tobytes() for row in rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 4, 4, 16, colour_type, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(pixels)) + chunk(b"IEND", b""))


@pytest.mark.parametrize(("build", "fragment"), [
    (_named_classes, r"named by the class index .* \['cat'\]"),
    # each value's high byte was kept, silently, where README says 16-bit images are refused
    (lambda f: _png16(f / "rgb.png", 2, 3), "is a 'RGB;16B' image; guard reads 8-bit images only"),
    (lambda f: _png16(f / "grey-alpha.png", 4, 2), "is a 'LA;16B' image; guard reads 8-bit images only"),
    # the images of a folder inside a class folder were skipped without a word
    (lambda f: (write_images(f, np.zeros((2, 1, 4, 4), np.float32), np.array([0, 1])), (f / "0" / "more").mkdir(),
                Image.new("L", (4, 4)).save(f / "0" / "more" / "x.png")), "class folders hold folders"),
    (lambda f: (write_images(f, np.zeros((2, 1, 4, 4), np.float32), np.array([0, 1])),
                write_images(f, np.zeros((1, 1, 4, 4), np.float32), None)), "both images and class folders"),
    (lambda f: (write_images(f, np.zeros((1, 1, 4, 4), np.float32), None),
                Image.new("L", (5, 4)).save(f / "00001.png")), r"one size: .* is 4x4 \(width x height\), .* is 5x4"),
    (lambda f: (f.mkdir(), Image.fromarray(np.full((4, 4), 40000, np.uint16)).save(f / "deep.png")),
     "is a 'I;16' image; guard reads 8-bit images only"),
    (lambda f: (f.mkdir(), Image.fromarray(np.full((4, 4), 0.5, np.float32)).save(f / "float.tif")),
     "is a 'F' image; guard reads 8-bit images only"),
    (lambda f: ((f / "\u00b2").mkdir(parents=True), Image.new("L", (4, 4)).save(f / "\u00b2" / "0.png")),
     "named by the class index"),  # a superscript two is a digit to str.isdigit, not to int
    (lambda f: (write_images(f, np.zeros((1, 1, 4, 4), np.float32), None),
                (f / "00001.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")), "cannot read image .*00001.png"),
    (lambda f: (f.mkdir(), (f / "readme.txt").write_text("no images")), "no images"),
    (lambda f: (write_images(f, np.zeros((2, 1, 4, 4), np.float32), np.array([0, 1])), (f / "00").mkdir(),
                Image.new("L", (4, 4)).save(f / "00" / "x.png")), r"named by the class index .* \['00'\]"),  # 0/ too
    (lambda f: ((f / ("9" * 20)).mkdir(parents=True), Image.new("L", (4, 4)).save(f / ("9" * 20) / "0.png")),
     "named by the class index"),  # no int64 holds it
])
def test_folders_it_cannot_read_right_are_refused_in_one_line(tmp_path: Path, build, fragment: str) -> None:
    folder = tmp_path / "data"
    build(folder)
    with pytest.raises(GuardError, match=fragment):
        load_samples(folder)


@pytest.mark.parametrize("limit", [100, 500])  # 784 pixels past twice the limit (Pillow refuses), or within it (warns)
def test_a_decompression_bomb_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, limit: int) -> None:
    write_images(tmp_path / "data", np.zeros((1, 1, 28, 28), np.float32), None)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    with pytest.raises(GuardError, match=r"cannot read image .*decompression bomb"):
        load_samples(tmp_path / "data")


def test_images_that_would_not_fit_in_memory_are_refused_before_decoding_them_all(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each image under Pillow's limit, all of them past the machine's memory: the process was killed, not told."""
    import guard.samples

    write_images(tmp_path / "data", np.zeros((3, 1, 28, 28), np.float32), None)
    need = 3 * 28 * 28 * 3 * 4 * 4 // 3  # float32 RGB, and a third more for the grey copy
    monkeypatch.setattr(guard.samples, "_memory_bytes", lambda: need - 1)
    with pytest.raises(GuardError, match=r"the 3 images in .* of 28x28 pixels: about .* GiB to load, more than"):
        load_samples(tmp_path / "data")
    monkeypatch.setattr(guard.samples, "_memory_bytes", lambda: need)
    assert load_samples(tmp_path / "data")[0].shape == (3, 1, 28, 28)


def test_calibrate_from_an_image_folder_matches_the_same_images_as_npz(tmp_path: Path,
                                                                       backdoored: Backdoored) -> None:
    folder = write_images(tmp_path / "clean", backdoored.x_clean[:300], backdoored.y_clean[:300])
    x, y = load_samples(folder)
    np.savez(tmp_path / "clean.npz", x=x, y=y)
    for data, out in ((folder, "folder.safetensors"), (tmp_path / "clean.npz", "npz.safetensors")):
        assert main(["calibrate", str(backdoored.model_path), "--data", str(data), "--no-scan", "--no-reference",
                     "--quiet", "--out", str(tmp_path / out)]) == 0
    from_folder, from_npz = (Profile.load(tmp_path / name) for name in ("folder.safetensors", "npz.safetensors"))
    assert from_folder.thresholds.tau == from_npz.thresholds.tau
    assert all(np.array_equal(a.keep, b.keep) for a, b in zip(from_folder.taps, from_npz.taps, strict=True))


def test_any_decoder_failure_is_one_guard_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Pillow's PNG decoder raises SyntaxError on some broken chunks (a fuzzed file did); it is an unreadable image."""
    write_images(tmp_path / "data", np.zeros((1, 1, 4, 4), np.float32), None)

    def broken(*args: object, **kwargs: object) -> None:
        raise SyntaxError("broken PNG file (chunk b'n\\x00\\x00\\x00')")

    monkeypatch.setattr(Image, "open", broken)
    with pytest.raises(GuardError, match=r"cannot read image .*00000.png \(SyntaxError\): broken PNG"):
        load_samples(tmp_path / "data")


def test_two_writes_of_one_path_do_not_share_a_temporary_file(tmp_path: Path) -> None:
    """A second run writing the same output while the first is still writing: each finishes whole, the last rename
    wins, and no temporary file is left."""
    out = tmp_path / "profile.safetensors"

    def first(tmp: Path) -> None:
        tmp.write_text("first")
        write_atomic(out, lambda other: other.write_text("second"))  # the other run, in the middle of this one

    write_atomic(out, first)
    assert out.read_text() == "first"
    assert [p.name for p in tmp_path.iterdir()] == [out.name]


def test_a_rewritten_file_keeps_its_mode_and_a_long_name_is_written(tmp_path: Path) -> None:
    """A 0600 report became 0644 when rewritten; a legal 250-character name plus the temporary suffix passed the file
    system's limit."""
    private = tmp_path / "report.json"
    write_json(private, {"a": np.float32(0.5), "b": np.int64(3)})  # numpy scalars are written as numbers
    private.chmod(0o600)
    write_json(private, {"a": 1})
    assert private.stat().st_mode & 0o777 == 0o600 and json.loads(private.read_text()) == {"a": 1}
    long = tmp_path / ("r" * 245 + ".json")
    write_json(long, {})
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([private.name, long.name])


def test_an_empty_data_path_is_refused_not_read_as_the_working_folder(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    write_images(tmp_path, np.zeros((2, 1, 4, 4), np.float32), None)
    monkeypatch.chdir(tmp_path)
    for empty in ("", "  "):
        with pytest.raises(GuardError, match="the data path is empty"):
            load_samples(empty)


def test_a_write_whose_folder_is_a_file_is_a_guard_error(tmp_path: Path) -> None:
    """The cleanup of the temporary file raised NotADirectoryError over the GuardError it was about to raise."""
    (tmp_path / "file").write_text("")
    with pytest.raises(GuardError, match=r"cannot write .*out\.json"):
        write_atomic(tmp_path / "file" / "out.json", lambda tmp: tmp.write_text("{}"))


@pytest.mark.parametrize("content", [b"hello\n", b"\x08\x07\x12\x04onnx", b"\x80\x04\x95pickle"])
def test_a_file_that_is_no_npz_is_named_so_and_pickles_are_not_suggested(tmp_path: Path, content: bytes) -> None:
    """numpy reads any file that is neither a zip nor an .npy as a pickle, and its refusal suggested allow_pickle=True
    for a text file or a model given as --data by mistake."""
    from guard.errors import GuardError
    from guard.samples import load_samples

    path = tmp_path / "data.npz"
    path.write_bytes(content)
    with pytest.raises(GuardError, match=r"is not an \.npz") as refused:
        load_samples(path)
    assert "pickle" not in str(refused.value)


def test_grey_data_for_a_colour_model_says_why_it_has_one_channel(tmp_path: Path) -> None:
    from guard.samples import check_samples

    write_images(tmp_path / "data", np.full((20, 1, 4, 4), 0.5, np.float32), None)
    x, _ = load_samples(tmp_path / "data")
    with pytest.raises(GuardError, match=r"the model takes \(N, 3, 4, 4\) \(an image folder whose images are all grey"):
        check_samples(x, None, (3, 4, 4), 10, "calibration")


def test_grey_images_for_a_colour_model_are_refused_with_the_way_out() -> None:
    """An image folder of grey pictures is read as one channel, though saved as RGB; the refusal says what to give."""
    x = np.random.default_rng(2).random((30, 1, 8, 8), dtype=np.float32)
    with pytest.raises(GuardError, match=r"all grey is read as one channel: .* np\.repeat\(x, 3, axis=1\)"):
        check_samples(x, None, (3, 8, 8), 10, "calibration")
