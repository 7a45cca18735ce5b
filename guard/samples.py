"""Reading user data: `.npz` with `x` (N, C, H, W) in the model's input range and optional `y` (N,) labels, or a
folder of images (scaled to [0, 1]); and writing output files whole.

Loaded with allow_pickle=False: a data file from anyone cannot run code.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import secrets
import stat
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from numpy.lib.npyio import NpzFile

from guard.errors import GuardError

log = logging.getLogger("guard.samples")


def write_atomic(path: Path, write: Callable[[Path], object],
                 errors: tuple[type[Exception], ...] = (OSError,)) -> Path:
    """`write` a file next to `path`, flush it to disk, then rename it there: a failed write or a crash leaves no
    half-written output. The temporary name is this write's own, so two runs writing one path do not write into
    each other's file. The `errors` a write may raise become a GuardError naming the path."""
    # the name cut short: a legal 255-character name plus the suffix was past the file system's limit
    tmp = path.with_name(f"{path.name[:128]}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        with open(tmp, "rb") as written:
            os.fsync(written.fileno())
        with contextlib.suppress(FileNotFoundError):  # a file replaced keeps its mode (0600 stays 0600)
            os.chmod(tmp, stat.S_IMODE(os.stat(path).st_mode))
        tmp.replace(path)
        _fsync_folder(path.parent)
    except errors as exc:
        _remove(tmp)
        raise GuardError(f"cannot write {path}: {exc}") from None
    except BaseException:  # a write that refuses its own output (a GuardError) or is interrupted leaves nothing either
        _remove(tmp)
        raise
    return path


def strict_json(data: object, indent: int = 2) -> str:
    """`data` as strict JSON: a number that is not finite (a detection rate over no image, say) is written null,
    which every parser reads, where Python's default `NaN` token is refused by most (jq, JavaScript)."""

    def finite(value: object) -> object:
        if isinstance(value, np.generic):  # a numpy scalar, which json cannot write
            value = value.item()
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {key: finite(item) for key, item in value.items()}
        if isinstance(value, list | tuple):
            return [finite(item) for item in value]
        return value

    return json.dumps(finite(data), indent=indent, allow_nan=False)


def write_json(path: Path, data: object, indent: int = 2) -> Path:
    """`data` as strict JSON (`strict_json`), written whole or not at all."""
    text = strict_json(data, indent) + "\n"
    return write_atomic(path, lambda tmp: tmp.write_text(text))


def _remove(path: Path) -> None:
    """Remove a temporary file if it is there; where it cannot be (its folder is a file), the error said is the
    write's."""
    with contextlib.suppress(OSError):
        path.unlink(missing_ok=True)


def _fsync_folder(folder: Path) -> None:
    """Make a rename in `folder` durable; where folders cannot be opened (Windows) the rename stands as it is."""
    try:
        handle = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)


DATA_HINT = "save one with np.savez(path, x=..., y=...)"
TRIGGER_HINT = "give a trigger file guard scan wrote (trigger.npz, candidate_K.npz, warp_K.npz, blend_K.npz)"


def load_samples(path: str | Path) -> tuple[np.ndarray, np.ndarray | None]:
    """(x float32, y int64 or None) from an .npz file or an image folder, with clear errors for anything else."""
    if not str(path).strip():  # Path("") is the working folder: `--data "$UNSET"` read whatever images lay there
        raise GuardError("the data path is empty")
    path = Path(path)
    if path.is_dir():
        return _image_folder(path)
    if not path.is_file():
        raise GuardError(f"data file not found: {path}")
    with open_npz(path) as data:
        if "x" not in data.files:
            raise GuardError(f"{path} has no array 'x' (found {data.files}); {DATA_HINT}")
        x = npz_array(data, "x", path)
        y = npz_array(data, "y", path) if "y" in data.files else None
    if not np.issubdtype(x.dtype, np.number) or np.iscomplexobj(x):  # float32 of a complex drops its imaginary part
        raise GuardError(f"x in {path} must be real numbers, got {x.dtype}")
    if not np.issubdtype(x.dtype, np.floating):  # 8-bit pixels given to a model trained on [0, 1] look 255x bright
        raise GuardError(f"x in {path} is {x.dtype}; guard gives the model x as stored, so store it as float32 in "
                         f"the model's input range (x.astype('float32') / 255 for a model trained on [0, 1])")
    if y is not None and (y.ndim != 1 or not np.issubdtype(y.dtype, np.integer)):
        raise GuardError(f"y in {path} must be a 1-D integer array, got {y.dtype} {y.shape}")
    return x.astype(np.float32, copy=False), None if y is None else y.astype(np.int64, copy=False)


def load_poisoned(path: str | Path, count: int) -> np.ndarray | None:
    """The optional ground truth `poisoned` (N,) of a training .npz (bool, or 0/1), or None when absent (always for
    an image folder)."""
    if Path(path).is_dir():
        return None
    with open_npz(Path(path)) as data:
        if "poisoned" not in data.files:
            return None
        poisoned = npz_array(data, "poisoned", path)
    if poisoned.shape != (count,) or not (poisoned.dtype == bool or np.isin(poisoned, (0, 1)).all()):
        raise GuardError(f"poisoned in {path} must be ({count},) booleans, got {poisoned.dtype} {poisoned.shape}")
    return poisoned.astype(bool)


@contextmanager
def open_npz(path: Path, hint: str = DATA_HINT) -> Iterator[NpzFile]:
    """The open archive, or a GuardError saying why it is not one (an .npy holds one bare array, not named ones)
    and, in `hint`, what to give instead."""
    try:
        with open(path, "rb") as handle:
            magic = handle.read(6)
    except OSError as exc:
        raise GuardError(f"cannot read {path} as .npz: {exc}") from None
    if not magic.startswith((b"PK", b"\x93NUMPY")):  # numpy reads anything else as a pickle, and says so
        raise GuardError(f"{path} is not an .npz (a zip of named arrays); {hint}")
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise GuardError(f"cannot read {path} as .npz: {exc}") from None
    if not isinstance(data, NpzFile):
        raise GuardError(f"{path} is a single .npy array, not an .npz of named arrays; {hint}")
    with data:
        yield data


def needed(data: NpzFile, keys: tuple[str, ...]) -> tuple[str, ...]:
    """`keys`, each of which the archive must hold."""
    missing = [key for key in keys if key not in data.files]
    if missing:
        raise GuardError(f"it has no {missing} (found {data.files})")
    return keys


def npz_array(data: NpzFile, key: str, path: str | Path, expected: tuple[int, ...] | None = None) -> np.ndarray:
    """One array of the archive; a corrupt member, a pickled one, one that is not an .npy array or one too large for
    memory is a GuardError. The size is read from the member's header first: a small compressed file can hold
    gigabytes of zeros, and Linux grants the allocation and kills the process later rather than raise MemoryError.
    `expected`: the shape the caller needs; a member declaring more values than it, and over a million, is refused
    before it is read (a few MB of zeros declaring gigabytes; a smaller one is read and refused by its caller)."""
    shape, dtype = _declared(data, key, path)
    if expected is not None and math.prod(shape) > max(math.prod(expected), 1 << 20):
        raise GuardError(f"{key!r} in {path} declares shape {shape}; {expected} is expected")
    need = math.prod(shape) * (dtype.itemsize + 8)  # as stored, and the float32 or int64 copy made of it
    _refuse_past_memory(need, f"{key!r} in {path} is {dtype} of shape {shape}")
    try:
        return data[key]
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise GuardError(f"cannot read {key!r} from {path}: {exc}") from None
    except MemoryError:
        raise GuardError(f"{key!r} in {path} declares a shape too large for this machine's memory") from None


def _declared(data: NpzFile, key: str, path: str | Path) -> tuple[tuple[int, ...], np.dtype]:
    """The shape and dtype a member's .npy header declares. numpy reads the member named `key` before `key.npy`, and
    gives a member without an .npy header back as raw bytes: such a member is refused here."""
    name = key if key in data.zip.namelist() else f"{key}.npy"
    try:
        with data.zip.open(name) as member:
            version = np.lib.format.read_magic(member)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = read(member)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as exc:
        raise GuardError(f"{key!r} in {path} is not a numpy array saved by np.savez: {exc}") from None
    return tuple(shape), dtype


def _refuse_past_memory(need: int, what: str) -> None:
    """A GuardError where loading `what` needs more bytes than this process may use."""
    memory = _memory_bytes()
    if memory is not None and need > memory:
        raise GuardError(f"{what}: about {need / 2**30:.1f} GiB to load, more than this machine's "
                         f"{memory / 2**30:.1f} GiB of memory")


def _memory_bytes() -> int | None:
    """The memory this process may use: the machine's, or its cgroup's limit where lower (a container); None where
    neither can be read."""
    limits = []
    try:
        limits.append(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):
        pass
    for cgroup in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):  # v2, v1
        try:
            limit = Path(cgroup).read_text().strip()
        except OSError:
            continue
        if limit.isdigit() and int(limit) < 2**62:  # v1 writes its "no limit" as a number near 2**63
            limits.append(int(limit))
    return min(limits) if limits else None


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
EIGHT_BIT_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV")


def _image_folder(folder: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """Images as (N, C, H, W) in [0, 1], in file-name order: C = 1 if every image is grey (whatever its mode), else
    RGB, C = 3. Labelled: one subfolder per class, named by the class index the model answers (`0/`, `1/`, ...);
    unlabelled: the images directly in `folder`. Class names are refused, because an order guessed from them would
    mislabel every sample silently."""
    entries = [p for p in _listing(folder) if not p.name.startswith(".")]
    classes = [p for p in entries if p.is_dir()]
    loose = [p for p in entries if _is_image(p)]
    if classes and loose:
        raise GuardError(f"{folder} holds both images and class folders; put every image in its class's folder")
    if classes:
        # the index as written: no sign, no leading zero (0/ and 00/ would be one class), at most 9 digits
        named = [p.name for p in classes if not (p.name.isascii() and p.name.isdigit() and len(p.name) <= 9
                                                 and (p.name == "0" or not p.name.startswith("0")))]
        if named:
            raise GuardError(f"class folders in {folder} must be named by the class index the model answers (0, 1, "
                             f"...), got {named[:5]}; a guessed order of names would mislabel samples")
        nested = [f for c in classes for f in _listing(c) if f.is_dir() and not f.name.startswith(".")]
        if nested:  # their images were skipped without a word
            raise GuardError(f"class folders hold folders ({', '.join(map(str, nested[:3]))}); guard reads the "
                             "images directly in each class folder")
        listed = [(f, int(c.name)) for c in classes for f in _listing(c)] + [(f, None) for f in entries
                                                                             if not f.is_dir()]
    else:
        listed = [(f, None) for f in entries if not f.is_dir()]
    files = [(f, label) for f, label in listed if _is_image(f)]
    # a photo library's .heic files, or a link to an image no longer there, would leave the samples short unsaid
    others = [f.name for f, _ in listed if not f.name.startswith(".") and not _is_image(f)]  # folders: refused
    if others:
        log.warning("skipped %d file(s) in %s that are not images guard reads (%s; a broken link, a device or a "
                    "pipe neither): %s", len(others), folder, ", ".join(IMAGE_SUFFIXES),
                    ", ".join(others[:5]) + (", ..." if len(others) > 5 else ""))
    if not files:
        raise GuardError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    first = _read_image(files[0][0])
    need = len(files) * first.nbytes * 4 // 3  # every image as float32 RGB, and a third more for a grey copy
    # Small compressed files decode to gigabytes; refuse, not be killed.
    _refuse_past_memory(need, f"the {len(files)} images in {folder} of {first.shape[1]}x{first.shape[0]} pixels")
    x = np.empty((len(files), 3, *first.shape[:2]), np.float32)  # filled in place: no list and stacked copy at once
    x[0] = first.transpose(2, 0, 1)
    for index, (f, _) in enumerate(files[1:], start=1):
        x[index] = _read_image(f, files[0][0], first.shape[1::-1]).transpose(2, 0, 1)
    grey = bool((x[:, :1] == x[:, 1:]).all())
    labels = None if not classes else np.array([label for _, label in files], dtype=np.int64)
    return (x[:, :1].copy() if grey else x), labels


def _listing(folder: Path) -> list[Path]:
    try:
        return sorted(folder.iterdir())
    except OSError as exc:
        raise GuardError(f"cannot list {folder}: {exc}") from None


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def _read_image(path: Path, first: Path | None = None, size: tuple[int, int] | None = None) -> np.ndarray:
    """One 8-bit image as float32 RGB (H, W, 3) in [0, 1] (grey ones repeat their channel); one that is not 8-bit,
    cannot be read, is oversized, or is not of the `first` image's `size` (width, height; read from its header,
    before decoding) is a GuardError."""
    import warnings

    from PIL import Image

    try:
        with warnings.catch_warnings():  # Pillow only warns between its pixel limit and twice it; refuse those too
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(path)
        with image:
            if size is not None and image.size != size:
                raise GuardError(f"the images must share one size: {first} is {size[0]}x{size[1]} (width x height), "
                                 f"{path} is {image.size[0]}x{image.size[1]}")
            # 16-bit or float: converting would clip, not scale. Pillow opens a 16-bit colour PNG as RGB, keeping
            # each value's high byte: its stored (raw) mode says 16 bits.
            raw = [t[3] if isinstance(t[3], str) else str(t[3][0]) if t[3] else "" for t in image.tile or []]
            deep = image.mode if image.mode not in EIGHT_BIT_MODES else next((m for m in raw if ";16" in m), None)
            if deep is not None:
                raise GuardError(f"{path} is a {deep!r} image; guard reads 8-bit images only (save an .npz "
                                 "of x scaled as the model expects instead)")
            array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    except GuardError:
        raise
    except Exception as exc:  # noqa: BLE001 - Pillow's decoders raise OSError, ValueError, SyntaxError, ...
        raise GuardError(f"cannot read image {path} ({type(exc).__name__}): {exc}") from None
    return array


MIN_HELD_OUT = 10  # fewer held-out samples measure nothing
SPAN_FACTOR = 20.0  # a clean sample spanning this many times the upper quartile of ranges is scaled unlike the rest


def _shuffle(count: int, share: float, seed: int) -> tuple[np.ndarray, int]:
    """The seeded order of `count` samples, and how many of them a held-out `share` is."""
    return np.random.default_rng(seed).permutation(count), max(MIN_HELD_OUT, round(share * count))


def holdout_split(count: int, share: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(held-out, fit) indices: a seeded shuffle, `share` of it (at least 10) held out for the decisions."""
    order, n_hold = _shuffle(count, share, seed)
    return order[:n_hold], order[n_hold:]


def holdout_folds(count: int, share: float, seed: int, folds: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Up to `folds` (held-out, fit) splits whose held-out sets are disjoint, cut one after another from
    `holdout_split`'s shuffle, each of its size; the rest of the shuffle, in its order, is fit. The first is
    `holdout_split`'s. Of several, the last also takes a remainder too short to be a fold (under 10), so that with
    folds = 1 / share every sample is held out once: 999 samples at a fifth make four folds of 200 and one of 199,
    1,002 four of 200 and one of 202."""
    order, n_hold = _shuffle(count, share, seed)
    starts = list(range(0, count, n_hold))[:folds]
    if count < MIN_HELD_OUT or not starts:
        return []
    if len(starts) > 1 and count - starts[-1] < MIN_HELD_OUT:
        starts.pop()
    stops = [*starts[1:], starts[-1] + n_hold]
    if len(starts) > 1 and count - stops[-1] < MIN_HELD_OUT:
        stops[-1] = count
    return [(order[start:stop], np.concatenate([order[:start], order[stop:]])) for start, stop in zip(starts, stops)]


def first_occurrences(x: np.ndarray) -> np.ndarray:
    """Indices of the samples of `x` with no identical sample before them, in order. Calibration cross-fits its
    thresholds: a copy in another fold scores like a sample the fit has seen, so duplicates make the thresholds (and
    the rates they claim) too low."""
    _, first = np.unique(x.reshape(len(x), -1), axis=0, return_index=True)
    return np.sort(first)


def without_repeats(x: np.ndarray, y: np.ndarray | None, sample_shape: tuple[int, ...], num_classes: int,
                    purpose: str) -> tuple[np.ndarray, np.ndarray | None]:
    """`x` and `y` without the samples that repeat an earlier one (`first_occurrences`: a copy on both sides of a
    held-out split is judged on an image the fit has seen), and what is left checked again for `purpose`, every
    class included."""
    distinct = first_occurrences(x)
    if len(distinct) == len(x):
        return x, y
    x, y = x[distinct], None if y is None else y[distinct]
    check_samples(x, y, sample_shape, num_classes, f"{purpose} (repeated samples left out)", every_class=True)
    return x, y


def as_samples(x: np.ndarray, y: np.ndarray | None, purpose: str) -> tuple[np.ndarray, np.ndarray | None]:
    """`x` as float32 and `y` as int64 for the Python API, refusing what the cast would change unseen: integer pixels
    (0-255 given to a model trained on [0, 1]) and labels that are not integers (the CLI's files are refused so)."""
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.floating):
        raise GuardError(f"{purpose} data is {x.dtype}; guard gives the model x as given, so pass float32 in the "
                         f"model's input range (x.astype('float32') / 255 for a model trained on [0, 1])")
    if y is not None and not np.issubdtype((y := np.asarray(y)).dtype, np.integer):
        raise GuardError(f"{purpose} labels must be integers, got {y.dtype}")
    return x.astype(np.float32, copy=False), None if y is None else y.astype(np.int64, copy=False)


def check_samples(x: np.ndarray, y: np.ndarray | None, sample_shape: tuple[int, ...], num_classes: int,
                  purpose: str, *, every_class: bool = False) -> None:
    """Refuse clean data that `purpose` ("calibration", "scan") cannot use, saying what is wrong with it.

    `every_class`: labels must cover every class of the model. Calibration would score a class it never saw
    against the others' profile (flagging most of its requests), and a repair fine-tuned without it forgets it.
    """
    if x.ndim != 4 or tuple(x.shape[1:]) != sample_shape:
        grey = x.ndim == 4 and x.shape[1] == 1 and len(sample_shape) == 3 and sample_shape[0] == 3
        hint = (" (an image folder whose images are all grey is read as one channel: for this model give an .npz "
                "with x = np.repeat(x, 3, axis=1))") if grey else ""
        raise GuardError(f"{purpose} data has shape {x.shape}; the model takes "
                         f"(N, {', '.join(map(str, sample_shape))}){hint}")
    if len(x) < 20:
        raise GuardError(f"{purpose} needs at least 20 clean samples (a few hundred recommended); got {len(x)}")
    if not np.all(np.isfinite(x)):
        raise GuardError(f"{purpose} data contains NaN or Inf")
    flat = x.reshape(len(x), -1)
    spans = flat.max(axis=1) - flat.min(axis=1)
    if np.all(spans == 0):
        raise GuardError(f"every {purpose} sample is one constant value: clean images are needed")
    typical = float(np.quantile(spans, 0.75))  # not the median: most images may be near-blank frames
    loud = np.flatnonzero(spans > SPAN_FACTOR * typical)
    if typical > 0 and loud.size:  # one image ×255 among 0-1 ones raised k from 3 to 842: attack success 1% -> 28%
        raise GuardError(f"{loud.size} {purpose} sample(s) span more than {SPAN_FACTOR:g} times the values three "
                         f"quarters of the samples span at most ({typical:.3g}), e.g. sample(s) {loud[:5].tolist()} span "
                         f"{', '.join(f'{v:.3g}' for v in spans[loud[:5]])}: scaled unlike the rest (0-255 among 0-1?), "
                         f"they skew their class's statistics; scale them like the others or leave them out")
    if y is None:
        return
    if y.shape != (len(x),):
        raise GuardError(f"labels must be (N,) = ({len(x)},) integers; got shape {y.shape}")
    outside = np.unique(y[(y < 0) | (y >= num_classes)])
    if outside.size:
        raise GuardError(f"labels must lie in [0, {num_classes}), the model's classes; got {outside[:5].tolist()}")
    missing = np.flatnonzero(np.bincount(y, minlength=num_classes) == 0)
    if every_class and missing.size:
        raise GuardError(f"the {purpose} data has no sample of class(es) {missing.tolist()}: every class of the "
                         "model needs clean samples (a few dozen each), or its requests are judged by the other "
                         "classes' statistics")
