"""Build ``guard/data/fashion_mnist_subset.npz`` from Debian's Fashion-MNIST idx files.

The package ships a small class-balanced subset so that tests and demos run where the
``dataset-fashion-mnist`` package is not installed. This script is how that file was made: it picks a fixed,
seeded, class-balanced sample (3,000 train images from the train split, 1,000 test images from the test
split), stores it as uint8 with ``np.savez_compressed``, and refuses to write anything of 2 MB or more.

Run from the repository root::

    python -m tools.make_bundled_data [--source DIR] [--out PATH] [--seed N]

The arrays are a pure function of the source files and the seed; the zip container's timestamps are not, so
compare files with the printed content digest rather than with a byte checksum.
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import numpy as np

from guard.eval.datasets import fashion_mnist_dir, read_idx_images, read_idx_labels

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "guard" / "data" / "fashion_mnist_subset.npz"
N_TRAIN = 3_000
N_TEST = 1_000
NUM_CLASSES = 10
MAX_BYTES = 2 * 1024 * 1024
SEED = 0


def balanced_indices(labels: np.ndarray, total: int, rng: np.random.Generator) -> np.ndarray:
    """Pick ``total // 10`` indices of every class at random, returned in a seeded random order."""
    if total % NUM_CLASSES:
        raise ValueError(f"total {total} is not a multiple of {NUM_CLASSES}")
    per_class = total // NUM_CLASSES
    chosen = []
    for cls in range(NUM_CLASSES):
        pool = np.flatnonzero(labels == cls)
        if len(pool) < per_class:
            raise ValueError(f"class {cls} has only {len(pool)} samples, need {per_class}")
        chosen.append(rng.choice(pool, size=per_class, replace=False))
    picked = np.concatenate(chosen)
    return picked[rng.permutation(len(picked))]


def load_split(source: Path, prefix: str) -> tuple[np.ndarray, np.ndarray]:
    """Read one split's gzipped idx image and label files as uint8 images and int64 labels."""
    images = read_idx_images(source / f"{prefix}-images-idx3-ubyte.gz")
    labels = read_idx_labels(source / f"{prefix}-labels-idx1-ubyte.gz")
    if len(images) != len(labels):
        raise ValueError(f"{prefix}: {len(images)} images but {len(labels)} labels")
    return images, labels


def content_digest(arrays: dict[str, np.ndarray]) -> str:
    """SHA-256 over the arrays' names, dtypes, shapes and bytes: stable across runs, unlike the zip bytes."""
    digest = hashlib.sha256()
    for name in sorted(arrays):
        arr = np.ascontiguousarray(arrays[name])
        digest.update(f"{name}:{arr.dtype.str}:{arr.shape};".encode())
        digest.update(arr.tobytes())
    return digest.hexdigest()


def build(source: Path, out: Path, seed: int = SEED) -> dict[str, np.ndarray]:
    """Write the subset to ``out`` and return the arrays written."""
    rng = np.random.default_rng(seed)
    x_train_all, y_train_all = load_split(source, "train")
    x_test_all, y_test_all = load_split(source, "t10k")
    train_idx = balanced_indices(y_train_all, N_TRAIN, rng)
    test_idx = balanced_indices(y_test_all, N_TEST, rng)
    arrays = {
        "x_train": x_train_all[train_idx].astype(np.uint8),
        "y_train": y_train_all[train_idx].astype(np.uint8),
        "x_test": x_test_all[test_idx].astype(np.uint8),
        "y_test": y_test_all[test_idx].astype(np.uint8),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp.npz")
    np.savez_compressed(tmp, **arrays)
    size = tmp.stat().st_size
    if size >= MAX_BYTES:
        tmp.unlink()
        raise SystemExit(f"bundled subset is {size} bytes, over the {MAX_BYTES}-byte limit")
    tmp.replace(out)
    return arrays


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=fashion_mnist_dir(), help="directory of idx .gz files")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where to write the .npz")
    parser.add_argument("--seed", type=int, default=SEED, help="seed of the sample")
    args = parser.parse_args(argv)
    arrays = build(args.source, args.out, args.seed)
    print(
        f"wrote {args.out} ({args.out.stat().st_size} bytes): "
        f"{len(arrays['x_train'])} train + {len(arrays['x_test'])} test images, "
        f"content sha256 {content_digest(arrays)}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
