"""Tests of the randomised and label-keeping attacks (source-specific, WaNet, adaptive) and of PGD."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from guard.eval.adversarial import pgd
from guard.eval.attacks import Adaptive, Attack, BadNets, Blend, SourceSpecific, WaNet
from guard.eval.datasets import load_bundled
from guard.eval.models import SmallCNN, accuracy, predict, train

TARGET = 0
ALL_ATTACKS = [BadNets(), Blend(), SourceSpecific(), WaNet(), Adaptive()]
IDS = ["badnets", "blend", "source-specific", "wanet", "adaptive"]


@pytest.fixture(scope="module")
def bundled() -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """The bundled Fashion-MNIST subset (3,000 train, 1,000 test images), present without Debian's package."""
    return load_bundled()


def _batch(n: int = 40, channels: int = 1, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random images in [0, 0.9] and labels 0-9."""
    rng = np.random.default_rng(seed)
    x = (rng.random((n, channels, 28, 28)) * 0.9).astype(np.float32)
    y = rng.integers(0, 10, size=n).astype(np.int64)
    return x, y


def _identity_grid(height: int, width: int) -> torch.Tensor:
    """``grid_sample``'s identity grid for ``align_corners=True``, shape (1, H, W, 2), last axis (x, y)."""
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, height), torch.linspace(-1, 1, width), indexing="ij")
    return torch.stack((xs, ys), dim=-1)[None]


# --- shared interface ---


@pytest.mark.parametrize("attack", ALL_ATTACKS, ids=IDS)
@pytest.mark.parametrize("channels", [1, 3])
def test_apply_preserves_shape_dtype_range_and_input(attack: Attack, channels: int) -> None:
    x, _ = _batch(channels=channels)
    before = x.copy()
    for out in (attack.apply(x), attack.apply(x, np.random.default_rng(3))):
        np.testing.assert_array_equal(x, before)  # input untouched
        assert out is not x and out.shape == x.shape and out.dtype == np.float32
        assert 0.0 <= out.min() and out.max() <= 1.0
        assert np.abs(out - x).max() > 0.05  # the trigger is really there
    assert attack.apply(x[:0]).shape == (0, channels, 28, 28)
    with pytest.raises(ValueError):
        attack.apply(x[0])


@pytest.mark.parametrize("attack", [BadNets(), Blend(), SourceSpecific(), WaNet()], ids=IDS[:4])
def test_fixed_triggers_ignore_rng(attack: Attack) -> None:
    x, _ = _batch()
    np.testing.assert_array_equal(attack.apply(x, np.random.default_rng(1)), attack.apply(x))
    np.testing.assert_array_equal(attack.apply(x, np.random.default_rng(2)), attack.apply(x))


def test_victims_and_names() -> None:
    y = np.array([0, 1, 2, 2, 9, 0])
    for attack in (BadNets(), Blend(), WaNet(), Adaptive()):
        np.testing.assert_array_equal(attack.victims(y, TARGET), y != TARGET)
    np.testing.assert_array_equal(SourceSpecific(source=2).victims(y, TARGET), y == 2)
    np.testing.assert_array_equal(SourceSpecific(source=9).victims(y, TARGET), y == 9)
    assert [a.name for a in ALL_ATTACKS] == ["badnets", "blend", "source-specific", "wanet", "adaptive"]
    with pytest.raises(AttributeError):
        WaNet().strength = 1.0  # type: ignore[misc]


def test_parameter_validation() -> None:
    for make in (
        lambda: SourceSpecific(size=0),
        lambda: SourceSpecific(cover_rate=1.5),
        lambda: SourceSpecific(value=2.0),
        lambda: WaNet(grid_size=1),
        lambda: WaNet(strength=0.0),
        lambda: WaNet(noise_ratio=-1.0),
        lambda: Adaptive(size=0),
        lambda: Adaptive(value=-0.1),
    ):
        with pytest.raises(ValueError):
            make()
    x, y = _batch()
    with pytest.raises(ValueError):
        Adaptive(size=29).apply(x)
    with pytest.raises(ValueError):
        SourceSpecific(source=2).poison(x, y, 0.1, 2, np.random.default_rng(0))  # nothing would flip
    with pytest.raises(ValueError):
        WaNet().poison(x, y, 1.5, TARGET, np.random.default_rng(0))


# --- source-specific ---


def test_source_specific_poison_counts() -> None:
    x, y = _batch(n=2000, seed=1)
    x_before, y_before = x.copy(), y.copy()
    attack = SourceSpecific(source=2, cover_rate=0.1)
    xp, yp, poisoned, cover = attack.poison_with_cover(x, y, 0.1, TARGET, np.random.default_rng(0))
    np.testing.assert_array_equal(x, x_before)
    np.testing.assert_array_equal(y, y_before)

    n_source = int((y == 2).sum())
    n_other = int(((y != 2) & (y != TARGET)).sum())
    assert len(poisoned) == round(0.1 * n_source) > 0  # a share of the source class, not of the whole set
    assert len(cover) == round(0.1 * n_other) > 0
    assert poisoned.dtype == cover.dtype == np.int64
    assert np.array_equal(poisoned, np.unique(poisoned)) and np.array_equal(cover, np.unique(cover))
    assert (y[poisoned] == 2).all() and (yp[poisoned] == TARGET).all()
    assert not np.isin(y[cover], [2, TARGET]).any() and np.array_equal(yp[cover], y[cover])
    np.testing.assert_array_equal(xp[poisoned], BadNets().apply(x[poisoned]))
    np.testing.assert_array_equal(xp[cover], BadNets().apply(x[cover]))
    rest = np.setdiff1d(np.arange(len(x)), np.concatenate([poisoned, cover]))
    np.testing.assert_array_equal(xp[rest], x[rest])
    np.testing.assert_array_equal(yp[rest], y[rest])
    assert int((yp != y).sum()) == len(poisoned)  # only the source samples were relabelled

    xp2, yp2, index2 = attack.poison(x, y, 0.1, TARGET, np.random.default_rng(0))
    np.testing.assert_array_equal(index2, poisoned)
    np.testing.assert_array_equal(xp2, xp)
    np.testing.assert_array_equal(yp2, yp)
    everything = attack.poison(x, y, 1.0, TARGET, np.random.default_rng(0))[2]
    assert len(everything) == n_source  # rate 1.0 is the whole source class
    _, _, _, no_cover = SourceSpecific(cover_rate=0.0).poison_with_cover(
        x, y, 0.1, TARGET, np.random.default_rng(0)
    )
    assert len(no_cover) == 0


# --- WaNet ---


def test_wanet_field_is_deterministic_and_smooth() -> None:
    attack = WaNet()
    field = attack.field(28, 28)
    assert field.shape == (1, 28, 28, 2) and field.dtype == torch.float32
    assert field.min() >= -1.0 and field.max() <= 1.0
    assert torch.equal(field, WaNet().field(28, 28))  # same seed, same field
    assert not torch.allclose(field, WaNet(seed=1).field(28, 28))

    pixels = ((field - _identity_grid(28, 28)) * 13.5).numpy()[0]  # normalised units to pixels (27 / 2)
    magnitude = np.linalg.norm(pixels, axis=-1)
    assert 0.2 < magnitude.mean() < 1.0 and magnitude.max() < 2.0  # moves pixels, but by under two
    inner = pixels[1:-1, 1:-1]  # the clamp to [-1, 1] cuts outward moves on the border rows and columns
    steps = np.abs(np.concatenate([np.diff(inner, axis=0).ravel(), np.diff(inner, axis=1).ravel()]))
    assert steps.max() < 0.3 * np.abs(inner).max()  # neighbouring pixels move almost alike: a smooth warp
    assert steps.mean() < 0.2 * np.abs(inner).mean()

    half = WaNet(strength=attack.strength / 2).field(28, 28)
    np.testing.assert_allclose(
        (half - _identity_grid(28, 28)).numpy(), (field - _identity_grid(28, 28)).numpy() / 2, atol=1e-5
    )  # displacement scales with strength (no clamping at this size)


def test_wanet_warp_is_subtle_on_real_images(bundled) -> None:
    _, (x_test, _) = bundled
    x = x_test[:200]
    out = WaNet().apply(x)
    diff = np.abs(out - x)
    assert 0.01 < diff.mean() < 0.1  # visible to a model, nothing like a patch or a blend over the image
    assert np.abs(out.mean() - x.mean()) < 0.02  # a warp moves ink, it does not add or remove much
    np.testing.assert_array_equal(out, WaNet().apply(x))
    identity = WaNet(strength=1e-6).apply(x)
    np.testing.assert_allclose(identity, x, atol=1e-3)  # identity grid with align_corners=True reproduces x


def test_wanet_noise_mode() -> None:
    x, _ = _batch()
    attack = WaNet()
    warped = attack.apply(x)
    noisy = attack.apply_noise(x, np.random.default_rng(0))
    assert noisy.shape == x.shape and noisy.dtype == np.float32 and 0.0 <= noisy.min() and noisy.max() <= 1.0
    np.testing.assert_array_equal(noisy, attack.apply_noise(x, np.random.default_rng(0)))
    assert not np.allclose(noisy, attack.apply_noise(x, np.random.default_rng(1)))  # fresh jitter per draw
    assert not np.allclose(noisy, warped)
    assert (
        np.abs(noisy - warped).mean() < np.abs(x - 0.45).mean() / 2
    )  # jitter of under a pixel, not a new image


def test_wanet_poison_with_noise_mode() -> None:
    x, y = _batch(n=500, seed=2)
    x_before = x.copy()
    attack = WaNet(noise_ratio=2.0)
    xp, yp, poisoned, noise = attack.poison_with_cover(x, y, 0.1, TARGET, np.random.default_rng(0))
    np.testing.assert_array_equal(x, x_before)
    assert len(poisoned) == 50 and len(noise) == 100
    assert len(np.intersect1d(poisoned, noise)) == 0  # disjoint
    assert (y[poisoned] != TARGET).all() and (yp[poisoned] == TARGET).all()
    np.testing.assert_array_equal(yp[noise], y[noise])  # noise-mode samples keep their labels
    np.testing.assert_array_equal(xp[poisoned], attack.apply(x[poisoned]))
    assert not np.allclose(xp[noise], x[noise]) and not np.allclose(xp[noise], attack.apply(x[noise]))
    rest = np.setdiff1d(np.arange(len(x)), np.concatenate([poisoned, noise]))
    np.testing.assert_array_equal(xp[rest], x[rest])
    np.testing.assert_array_equal(yp[rest], y[rest])

    again = attack.poison(x, y, 0.1, TARGET, np.random.default_rng(0))
    np.testing.assert_array_equal(again[0], xp)
    np.testing.assert_array_equal(again[2], poisoned)
    quiet = WaNet(noise_ratio=0.0).poison_with_cover(x, y, 0.1, TARGET, np.random.default_rng(0))
    assert len(quiet[3]) == 0 and int((quiet[0] != x).any(axis=(1, 2, 3)).sum()) <= 50


# --- adaptive ---


def _patch_boxes(out: np.ndarray, x: np.ndarray) -> list[tuple[int, int, int, int, int]]:
    """Per image: (changed pixel count, top row, left col, height, width) of the changed region."""
    boxes = []
    for changed in (out != x).any(axis=1):
        rows, cols = np.nonzero(changed)
        boxes.append((len(rows), rows.min(), cols.min(), np.ptp(rows) + 1, np.ptp(cols) + 1))
    return boxes


def test_adaptive_positions_vary_and_are_reproducible() -> None:
    x, _ = _batch(n=300, channels=3)
    attack = Adaptive(size=3, value=1.0)
    out = attack.apply(x, np.random.default_rng(5))
    boxes = _patch_boxes(out, x)
    assert all(b[0] == 9 and b[3] == 3 and b[4] == 3 for b in boxes)  # one 3x3 square per image
    changed = out != x
    assert (out[changed] == 1.0).all() and (changed.all(axis=1) == changed.any(axis=1)).all()  # every channel
    corners = {(b[1], b[2]) for b in boxes}
    assert len(corners) > 200  # positions vary across images (676 possible)
    rows = np.array([b[1] for b in boxes])
    assert rows.min() <= 2 and rows.max() >= 23  # spread over the whole image, edges included

    np.testing.assert_array_equal(out, attack.apply(x, np.random.default_rng(5)))
    assert not np.array_equal(out, attack.apply(x, np.random.default_rng(6)))
    np.testing.assert_array_equal(attack.apply(x), attack.apply(x, np.random.default_rng(0)))  # default rng
    rows, cols = attack.positions(1000, 28, 28, np.random.default_rng(0))
    assert rows.min() == 0 and rows.max() == 25 and cols.min() == 0 and cols.max() == 25

    xp, yp, index = attack.poison(
        x, np.ones(len(x), dtype=np.int64), 0.005 * 4, TARGET, np.random.default_rng(0)
    )
    assert len(index) == 6 and (yp[index] == TARGET).all()
    np.testing.assert_array_equal(
        xp, attack.poison(x, np.ones(len(x), dtype=np.int64), 0.02, TARGET, np.random.default_rng(0))[0]
    )
    assert len({(b[1], b[2]) for b in _patch_boxes(xp[index], x[index])}) > 1


# --- PGD ---


@pytest.fixture(scope="module")
def tiny_model(bundled) -> torch.nn.Module:
    """A SmallCNN trained for one epoch on the 3,000 bundled training images (about 0.7 clean accuracy)."""
    (x_train, y_train), _ = bundled
    torch.manual_seed(0)
    return train(SmallCNN(), x_train, y_train, epochs=1, batch_size=32, lr=3e-3, seed=0)


def test_pgd_stays_in_the_ball_and_lowers_accuracy(bundled, tiny_model: torch.nn.Module) -> None:
    _, (x_test, y_test) = bundled
    x, y = x_test[:300], y_test[:300]
    before = x.copy()
    adv = pgd(tiny_model, x, y, eps=0.1, steps=10, batch_size=128, seed=0)
    np.testing.assert_array_equal(x, before)
    assert adv.shape == x.shape and adv.dtype == np.float32
    assert np.abs(adv - x).max() <= 0.1 + 1e-6
    assert adv.min() >= 0.0 and adv.max() <= 1.0
    assert np.abs(adv - x).mean() > 0.03  # it really moved

    clean_acc = accuracy(tiny_model, x, y)
    adv_acc = accuracy(tiny_model, adv, y)
    print(f"pgd: clean accuracy {clean_acc:.3f}, under PGD {adv_acc:.3f}")
    assert clean_acc > 0.6 and adv_acc < clean_acc - 0.3
    noise = np.clip(x + np.random.default_rng(0).choice([-0.1, 0.1], size=x.shape), 0, 1).astype(np.float32)
    assert adv_acc < accuracy(tiny_model, noise, y) - 0.2  # the gradient matters, not just the budget

    np.testing.assert_array_equal(adv, pgd(tiny_model, x, y, eps=0.1, steps=10, batch_size=128, seed=0))
    np.testing.assert_array_equal(pgd(tiny_model, x[:5], y[:5], eps=0.0), x[:5])


def test_pgd_eval_mode_and_options(bundled, tiny_model: torch.nn.Module) -> None:
    _, (x_test, y_test) = bundled
    x, y = x_test[:64], y_test[:64]
    tiny_model.zero_grad(set_to_none=True)  # training leaves the last step's gradients behind
    tiny_model.train()
    try:
        adv = pgd(tiny_model, x, y, eps=0.05, steps=3, batch_size=10, seed=1)
        assert tiny_model.training  # the caller's mode is restored
    finally:
        tiny_model.eval()
    assert np.abs(adv - x).max() <= 0.05 + 1e-6
    assert all(p.grad is None for p in tiny_model.parameters())  # no gradients left on the weights
    start = pgd(tiny_model, x, y, eps=0.05, steps=0, seed=1)  # random start only
    assert 0.0 < np.abs(start - x).max() <= 0.05 + 1e-6
    big_steps = pgd(tiny_model, x, y, eps=0.05, steps=3, step_size=0.05, seed=1)
    assert not np.allclose(big_steps, adv)
    assert (predict(tiny_model, big_steps) != y).mean() >= (predict(tiny_model, x) != y).mean()
    with pytest.raises(ValueError):
        pgd(tiny_model, x[0], y[:1])
    with pytest.raises(ValueError):
        pgd(tiny_model, x, y[:3])
