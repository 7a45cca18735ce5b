"""Fashion-MNIST loaders for the evaluation harness.

The guard is evaluated on real backdoored models, so the harness needs real images. Debian ships Fashion-MNIST
as the ``dataset-fashion-mnist`` package (idx files, gzipped); this module reads those files without any
download or third-party dependency. Where the package is absent (CI, wheels installed elsewhere), a small
class-balanced subset bundled inside ``guard.data`` keeps tests and demos working offline.
"""

from __future__ import annotations

import gzip
import io
import os
import zlib
from importlib import resources
from pathlib import Path
from typing import Literal

import numpy as np

__all__ = [
    "BUNDLED_RESOURCE",
    "CLASS_NAMES",
    "FASHION_MNIST_DIR",
    "fashion_mnist_dir",
    "load_bundled",
    "load_fashion_mnist",
    "read_idx_images",
    "read_idx_labels",
    "to_float",
]

#: Where Debian's ``dataset-fashion-mnist`` puts the idx files; ``GUARD_FASHION_MNIST_DIR`` overrides it.
FASHION_MNIST_DIR = Path(os.environ.get("GUARD_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))

#: The ten Fashion-MNIST classes, indexed by label.
CLASS_NAMES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

#: File name of the bundled subset inside the ``guard.data`` package.
BUNDLED_RESOURCE = "fashion_mnist_subset.npz"

_IMAGES_MAGIC = 2051
_LABELS_MAGIC = 2049
_SPLIT_PREFIX = {"train": "train", "test": "t10k"}


def fashion_mnist_dir() -> Path:
    """Return the directory to read: ``GUARD_FASHION_MNIST_DIR`` if set now, else ``FASHION_MNIST_DIR``."""
    override = os.environ.get("GUARD_FASHION_MNIST_DIR")
    return Path(override) if override else FASHION_MNIST_DIR


def _read_bytes(path: str | os.PathLike[str]) -> bytes:
    """Read a file whole, gunzipping it when it starts with the gzip magic."""
    raw = Path(path).read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise ValueError(f"{path}: corrupt gzip stream ({exc})") from exc
    return raw


def _header(data: bytes, path: str | os.PathLike[str], magic: int, n_dims: int) -> tuple[int, ...]:
    """Check the magic number and return the dimension sizes that follow it."""
    header_len = 4 + 4 * n_dims
    if len(data) < header_len:
        raise ValueError(f"{path}: too short for an idx header ({len(data)} bytes, need {header_len})")
    found = int.from_bytes(data[:4], "big")
    if found != magic:
        raise ValueError(f"{path}: bad idx magic number {found}, expected {magic}")
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(n_dims))
    expected = header_len + int(np.prod(dims, dtype=np.int64))
    if len(data) != expected:
        raise ValueError(f"{path}: {len(data)} bytes, but header {dims} implies {expected}")
    return dims


def read_idx_images(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an idx3 image file (gzipped or plain) into a uint8 array of shape (N, H, W)."""
    data = _read_bytes(path)
    n, rows, cols = _header(data, path, _IMAGES_MAGIC, 3)
    return np.frombuffer(data, dtype=np.uint8, offset=16).reshape(n, rows, cols).copy()


def read_idx_labels(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an idx1 label file (gzipped or plain) into an int64 array of shape (N,)."""
    data = _read_bytes(path)
    _header(data, path, _LABELS_MAGIC, 1)
    return np.frombuffer(data, dtype=np.uint8, offset=8).astype(np.int64)


def to_float(images: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W) or (N, 1, H, W) images to float32 (N, 1, H, W) in [0, 1]."""
    if images.ndim == 3:
        images = images[:, None, :, :]
    return (images.astype(np.float32) / np.float32(255.0)).astype(np.float32, copy=False)


def load_fashion_mnist(split: Literal["train", "test"]) -> tuple[np.ndarray, np.ndarray]:
    """Load a full split from the idx files: x float32 (N, 1, 28, 28) in [0, 1], y int64 (N,)."""
    if split not in _SPLIT_PREFIX:
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    root = fashion_mnist_dir()
    prefix = _SPLIT_PREFIX[split]
    paths = []
    for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
        candidates = [root / f"{prefix}-{kind}.gz", root / f"{prefix}-{kind}"]
        found = next((p for p in candidates if p.is_file()), None)
        if found is None:
            raise FileNotFoundError(
                f"Fashion-MNIST {split} file {candidates[0]} not found. Install it with "
                "`apt-get install dataset-fashion-mnist`, or set GUARD_FASHION_MNIST_DIR to a directory "
                "holding the idx files, or use the bundled subset (guard.eval.datasets.load_bundled())."
            )
        paths.append(found)
    images = read_idx_images(paths[0])
    labels = read_idx_labels(paths[1])
    if len(images) != len(labels):
        raise ValueError(f"{paths[0]} has {len(images)} images but {paths[1]} has {len(labels)} labels")
    return to_float(images), labels


def load_bundled() -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """Load the subset shipped in ``guard.data``: ((x_train, y_train), (x_test, y_test)), full format."""
    blob = resources.files("guard.data").joinpath(BUNDLED_RESOURCE).read_bytes()
    with np.load(io.BytesIO(blob), allow_pickle=False) as npz:
        x_train, y_train = npz["x_train"], npz["y_train"]
        x_test, y_test = npz["x_test"], npz["y_test"]
    return (
        (to_float(x_train), y_train.astype(np.int64)),
        (to_float(x_test), y_test.astype(np.int64)),
    )
