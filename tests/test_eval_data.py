"""Tests of the evaluation harness: idx reading, bundled data, poisoning attacks, training and ONNX export."""

from __future__ import annotations

import gzip
import struct
import time
from importlib import resources
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from guard.eval import datasets
from guard.eval.attacks import BadNets, Blend
from guard.eval.models import (
    SmallCNN,
    SmallResNet,
    accuracy,
    build_model,
    channels_last,
    export_onnx,
    predict,
    train,
    train_backdoored,
)

DEBIAN_FILES = [
    datasets.fashion_mnist_dir() / name
    for name in (
        "train-images-idx3-ubyte.gz",
        "train-labels-idx1-ubyte.gz",
        "t10k-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte.gz",
    )
]
HAVE_DEBIAN = all(p.is_file() for p in DEBIAN_FILES)


def _idx_images(images: np.ndarray) -> bytes:
    """Encode uint8 (N, H, W) images as an idx3 file."""
    return struct.pack(">4i", 2051, *images.shape) + images.astype(np.uint8).tobytes()


def _idx_labels(labels: np.ndarray) -> bytes:
    """Encode labels as an idx1 file."""
    return struct.pack(">2i", 2049, len(labels)) + labels.astype(np.uint8).tobytes()


@pytest.fixture()
def tiny_idx() -> tuple[np.ndarray, np.ndarray]:
    """A 4-image 3x2 data set with distinct pixel values."""
    images = np.arange(4 * 3 * 2, dtype=np.uint8).reshape(4, 3, 2) * 10
    labels = np.array([3, 0, 9, 1], dtype=np.int64)
    return images, labels


# --- idx reader ---


@pytest.mark.parametrize("compress", [False, True])
def test_read_idx_round_trip(tmp_path: Path, tiny_idx: tuple[np.ndarray, np.ndarray], compress: bool) -> None:
    images, labels = tiny_idx
    img_bytes, lab_bytes = _idx_images(images), _idx_labels(labels)
    suffix = ".gz" if compress else ""
    img_path, lab_path = tmp_path / f"img{suffix}", tmp_path / f"lab{suffix}"
    img_path.write_bytes(gzip.compress(img_bytes) if compress else img_bytes)
    lab_path.write_bytes(gzip.compress(lab_bytes) if compress else lab_bytes)

    got_images = datasets.read_idx_images(img_path)
    got_labels = datasets.read_idx_labels(lab_path)
    assert got_images.dtype == np.uint8 and got_images.shape == (4, 3, 2)
    np.testing.assert_array_equal(got_images, images)
    assert got_labels.dtype == np.int64
    np.testing.assert_array_equal(got_labels, labels)
    got_images[0, 0, 0] = 255  # the result must be writable (not a view of an immutable buffer)


def test_read_idx_corrupt(tmp_path: Path, tiny_idx: tuple[np.ndarray, np.ndarray]) -> None:
    images, labels = tiny_idx
    truncated = tmp_path / "truncated"
    truncated.write_bytes(_idx_images(images)[:-1])
    with pytest.raises(ValueError, match="implies"):
        datasets.read_idx_images(truncated)

    wrong_magic = tmp_path / "wrong_magic"
    wrong_magic.write_bytes(_idx_labels(labels))
    with pytest.raises(ValueError, match="magic"):
        datasets.read_idx_images(wrong_magic)
    images_file = tmp_path / "images.idx"
    images_file.write_bytes(_idx_images(images))
    with pytest.raises(ValueError, match="magic"):
        datasets.read_idx_labels(images_file)

    too_short = tmp_path / "short"
    too_short.write_bytes(b"\x00\x00\x08")
    with pytest.raises(ValueError, match="too short"):
        datasets.read_idx_labels(too_short)

    bad_gzip = tmp_path / "bad.gz"
    bad_gzip.write_bytes(gzip.compress(_idx_labels(labels))[:-6])
    with pytest.raises(ValueError):
        datasets.read_idx_labels(bad_gzip)


def test_load_fashion_mnist_from_env_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_idx: tuple[np.ndarray, np.ndarray]
) -> None:
    images = np.full((2, 28, 28), 255, dtype=np.uint8)
    images[1] = 0
    labels = np.array([4, 7])
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx_images(images)))
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(_idx_labels(labels))  # plain file works too
    monkeypatch.setenv("GUARD_FASHION_MNIST_DIR", str(tmp_path))

    x, y = datasets.load_fashion_mnist("test")
    assert x.dtype == np.float32 and x.shape == (2, 1, 28, 28)
    assert y.dtype == np.int64 and y.tolist() == [4, 7]
    assert x[0].min() == 1.0 and x[1].max() == 0.0

    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist") as info:
        datasets.load_fashion_mnist("train")
    assert "GUARD_FASHION_MNIST_DIR" in str(info.value) and "bundled" in str(info.value)
    with pytest.raises(ValueError):
        datasets.load_fashion_mnist("valid")  # type: ignore[arg-type]


def test_class_names() -> None:
    assert len(datasets.CLASS_NAMES) == 10
    assert datasets.CLASS_NAMES[0] == "T-shirt/top" and datasets.CLASS_NAMES[9] == "Ankle boot"


# --- bundled subset ---


def test_bundled_subset() -> None:
    resource = resources.files("guard.data").joinpath(datasets.BUNDLED_RESOURCE)
    assert len(resource.read_bytes()) < 2 * 1024 * 1024

    (x_train, y_train), (x_test, y_test) = datasets.load_bundled()
    for x, y, n in ((x_train, y_train, 3000), (x_test, y_test, 1000)):
        assert x.dtype == np.float32 and x.shape == (n, 1, 28, 28)
        assert y.dtype == np.int64 and y.shape == (n,)
        assert 0.0 <= x.min() and x.max() <= 1.0 and x.max() > 0.99
        np.testing.assert_array_equal(np.bincount(y, minlength=10), np.full(10, n // 10))
        assert not np.array_equal(y[: n // 10], np.sort(y[: n // 10]))  # shuffled, not grouped by class
        assert np.allclose(x * 255, np.round(x * 255), atol=1e-4)  # exact 8-bit grey levels

    for name in ("README.md", "LICENSE-fashion-mnist"):
        text = resources.files("guard.data").joinpath(name).read_text(encoding="utf-8")
        assert "Zalando" in text


@pytest.mark.skipif(not HAVE_DEBIAN, reason="needs Debian's dataset-fashion-mnist package")
def test_bundled_subset_comes_from_debian_files() -> None:
    (x_train, _), (x_test, _) = datasets.load_bundled()
    full_train, _ = datasets.load_fashion_mnist("train")
    full_test, _ = datasets.load_fashion_mnist("test")
    assert full_train.shape == (60000, 1, 28, 28) and full_test.shape == (10000, 1, 28, 28)
    # Spot-check that bundled images are real images of the right split.
    train_rows = {row.tobytes() for row in full_train[:, 0, 0:14:3, 7:21:3].reshape(60000, -1)}
    test_rows = {row.tobytes() for row in full_test[:, 0, 0:14:3, 7:21:3].reshape(10000, -1)}
    assert all(img[0, 0:14:3, 7:21:3].reshape(-1).tobytes() in train_rows for img in x_train[:50])
    assert all(img[0, 0:14:3, 7:21:3].reshape(-1).tobytes() in test_rows for img in x_test[:50])


# --- attacks ---


def _batch(n: int = 20, channels: int = 1, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random images in [0, 0.9] and labels 0-9."""
    rng = np.random.default_rng(seed)
    x = (rng.random((n, channels, 28, 28)) * 0.9).astype(np.float32)
    y = rng.integers(0, 10, size=n).astype(np.int64)
    return x, y


@pytest.mark.parametrize("channels", [1, 3])
def test_badnets_apply(channels: int) -> None:
    x, _ = _batch(channels=channels)
    before = x.copy()
    out = BadNets(size=3, value=1.0).apply(x)
    np.testing.assert_array_equal(x, before)  # input untouched
    assert out is not x and out.shape == x.shape and out.dtype == x.dtype
    np.testing.assert_array_equal(out[:, :, 25:, 25:], 1.0)
    mask = np.ones((28, 28), dtype=bool)
    mask[25:, 25:] = False
    np.testing.assert_array_equal(out[:, :, mask], x[:, :, mask])

    grey = BadNets(size=5, value=0.5).apply(x)
    np.testing.assert_array_equal(grey[:, :, 23:, 23:], 0.5)
    assert (grey[:, :, 22, :] == x[:, :, 22, :]).all() and (grey[:, :, :, 22] == x[:, :, :, 22]).all()
    with pytest.raises(ValueError):
        BadNets(size=0)
    with pytest.raises(ValueError):
        BadNets().apply(x[0])


def test_blend_apply() -> None:
    x, _ = _batch()
    before = x.copy()
    attack = Blend(alpha=0.15, seed=0)
    out = attack.apply(x)
    np.testing.assert_array_equal(x, before)
    noise = attack.pattern((1, 28, 28))
    assert noise.shape == (1, 28, 28) and 0.0 <= noise.min() and noise.max() <= 1.0 and noise.std() > 0.2
    np.testing.assert_allclose(out, 0.85 * x + 0.15 * noise[None], atol=1e-6)
    assert out.dtype == np.float32 and 0.0 <= out.min() and out.max() <= 1.0
    np.testing.assert_array_equal(out, Blend(alpha=0.15, seed=0).apply(x))  # fixed pattern
    assert not np.allclose(out, Blend(alpha=0.15, seed=1).apply(x))
    with pytest.raises(ValueError):
        Blend(alpha=0.0)


@pytest.mark.parametrize("attack", [BadNets(), Blend()], ids=["badnets", "blend"])
def test_poison_mechanics(attack: BadNets | Blend) -> None:
    x, y = _batch(n=200, seed=1)
    x_before, y_before = x.copy(), y.copy()
    target = 2
    xp, yp, index = attack.poison(x, y, rate=0.1, target=target, rng=np.random.default_rng(0))

    np.testing.assert_array_equal(x, x_before)
    np.testing.assert_array_equal(y, y_before)
    assert xp.shape == x.shape and xp.dtype == x.dtype and yp.dtype == y.dtype
    assert index.dtype == np.int64 and len(index) == 20
    assert np.array_equal(index, np.unique(index))  # sorted, no repeats
    assert (y[index] != target).all()  # all-to-one: only samples not already of the target class
    assert (yp[index] == target).all()
    np.testing.assert_array_equal(xp[index], attack.apply(x[index]))
    rest = np.setdiff1d(np.arange(len(x)), index)
    np.testing.assert_array_equal(xp[rest], x[rest])
    np.testing.assert_array_equal(yp[rest], y[rest])

    again = attack.poison(x, y, rate=0.1, target=target, rng=np.random.default_rng(0))
    np.testing.assert_array_equal(again[2], index)  # same rng seed, same choice
    assert len(attack.poison(x, y, 0.0, target, np.random.default_rng(0))[2]) == 0
    all_in = attack.poison(x, y, 1.0, target, np.random.default_rng(0))[2]
    assert len(all_in) == int((y != target).sum())  # capped by the non-target samples
    with pytest.raises(ValueError):
        attack.poison(x, y, 1.5, target, np.random.default_rng(0))


def test_attacks_are_frozen() -> None:
    attack = BadNets()
    with pytest.raises(AttributeError):
        attack.size = 5  # type: ignore[misc]
    assert attack == BadNets(3, 1.0) and hash(attack) == hash(BadNets())
    assert attack.name == "badnets" and Blend().name == "blend"


# --- models ---


def test_models_shapes_and_relu_modules() -> None:
    x = torch.rand(4, 1, 28, 28)
    cnn = SmallCNN()
    assert cnn(x).shape == (4, 10)
    names = [name for name, module in cnn.named_modules() if isinstance(module, torch.nn.ReLU)]
    assert names == ["relu1", "relu2", "relu3"]
    resnet = SmallResNet().eval()
    assert resnet(x).shape == (4, 10)
    assert sum(isinstance(m, torch.nn.ReLU) for m in resnet.modules()) >= 5
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in resnet.modules())
    assert SmallCNN(num_classes=3, in_channels=3)(torch.rand(2, 3, 28, 28)).shape == (2, 3)


def test_train_is_deterministic() -> None:
    x, y = _batch(n=64, seed=3)
    models = []
    for _ in range(2):
        torch.manual_seed(0)  # the initial weights come from the global RNG when the model is built
        models.append(train(SmallCNN(), x, y, epochs=2, batch_size=16, seed=5))
    a, b = models
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)
    assert not a.training
    labels = predict(a, x, batch_size=10)
    assert labels.dtype == np.int64 and labels.shape == (64,)
    assert accuracy(a, x, y) == float(np.mean(labels == y))


@pytest.mark.parametrize("arch", ["cnn", "resnet"])
def test_channels_last_is_only_a_layout(arch) -> None:
    """Training and prediction run on channels-last weights for speed; the weights come back in the default layout
    (ONNX export fails on channels-last ones) and the answers do not depend on the layout."""
    x, y = _batch(n=64, seed=4)
    torch.manual_seed(0)
    model = train(build_model(arch), x, y, epochs=1, batch_size=16, seed=1)
    assert all(p.is_contiguous() for p in model.parameters())
    inputs = torch.as_tensor(x)
    with torch.no_grad():
        reference = model(inputs)
        with channels_last(model) as same:
            assert same is model and model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
            fast = model(inputs)
    assert model.conv1.weight.is_contiguous()
    torch.testing.assert_close(fast, reference, rtol=1e-4, atol=1e-5)
    assert np.array_equal(predict(model, x), reference.argmax(1).numpy())
    assert all(p.is_contiguous() and not p.is_inference() for p in model.parameters())
    model(inputs).sum().backward()  # predict's inference mode left the weights usable by autograd
    assert model.conv1.weight.grad is not None


@pytest.fixture(scope="module")
def backdoored() -> tuple[torch.nn.Module, dict[str, object], float]:
    """The 5k-image, 2-epoch BadNets SmallCNN on Debian's Fashion-MNIST, and the seconds it took."""
    if not HAVE_DEBIAN:
        pytest.skip(
            "Debian's Fashion-MNIST files are missing: `apt-get install dataset-fashion-mnist` "
            f"(looked for {DEBIAN_FILES[0].parent})"
        )
    started = time.perf_counter()
    model, facts = train_backdoored(BadNets(), rate=0.1, target=0, n_train=5000, epochs=2, seed=0)
    return model, facts, time.perf_counter() - started


def test_train_backdoored(backdoored: tuple[torch.nn.Module, dict[str, object], float]) -> None:
    model, facts, seconds = backdoored
    print(f"train_backdoored: {seconds:.1f} s total, facts {facts}")
    assert isinstance(model, SmallCNN) and not model.training
    assert facts["data_source"] == "debian" and facts["n_train"] == 5000 and facts["n_poisoned"] == 500
    assert facts["clean_accuracy"] > 0.75  # type: ignore[operator]
    assert facts["asr"] > 0.8  # type: ignore[operator]
    assert seconds < 30.0


# --- ONNX export ---


@pytest.mark.parametrize("arch", ["cnn", "resnet"])
def test_export_onnx_matches_torch(tmp_path: Path, arch: str) -> None:
    torch.manual_seed(0)
    model: torch.nn.Module = SmallCNN() if arch == "cnn" else SmallResNet()
    if arch == "resnet":  # give BatchNorm non-trivial running statistics before exporting
        model.train()
        with torch.no_grad():
            model(torch.rand(32, 1, 28, 28))
    model.eval()
    path = export_onnx(model, tmp_path / "sub" / "model.onnx", torch.rand(2, 1, 28, 28))

    assert path == tmp_path / "sub" / "model.onnx"
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.onnx"]  # no external data file
    proto = onnx.load(str(path), load_external_data=False)
    onnx.checker.check_model(proto)
    assert all(not init.external_data for init in proto.graph.initializer)
    assert [i.name for i in proto.graph.input] == ["input"]
    assert [o.name for o in proto.graph.output] == ["logits"]
    for value in (proto.graph.input[0], proto.graph.output[0]):
        batch = value.type.tensor_type.shape.dim[0]
        assert batch.dim_param and not batch.dim_value  # symbolic batch axis
    relus = [n for n in proto.graph.node if n.op_type == "Relu"]
    assert len(relus) == (3 if arch == "cnn" else 7)

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch_size in (1, 5):
        x = torch.rand(batch_size, 1, 28, 28)
        with torch.no_grad():
            expected = model(x).numpy()
        (got,) = session.run(["logits"], {"input": x.numpy()})
        assert got.shape == (batch_size, 10)
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


def test_export_backdoored_model(
    tmp_path: Path, backdoored: tuple[torch.nn.Module, dict[str, object], float]
) -> None:
    model = backdoored[0]
    path = export_onnx(model, tmp_path / "backdoored.onnx", torch.rand(1, 1, 28, 28))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    _, (x_test, y_test) = datasets.load_bundled()
    for batch_size in (1, 5):
        x = x_test[:batch_size]
        with torch.no_grad():
            expected = model(torch.from_numpy(x)).numpy()
        (got,) = session.run(None, {"input": x})
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    triggered = BadNets().apply(x_test[y_test != 0][:200])
    (logits,) = session.run(None, {"input": triggered})
    assert (logits.argmax(axis=1) == 0).mean() > 0.8  # the backdoor survives export
