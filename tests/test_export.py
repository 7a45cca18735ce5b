"""`guard export`: a torch architecture plus its weights become the ONNX file guard calibrates and serves, answering as
the torch module does; weights are read without running pickled code, and a bad part is refused in one line."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from guard.cli import main
from guard.eval.models import SmallCNN
from guard.model.graph import load_model

FACTORY = textwrap.dedent("""
    from torch import nn

    def tiny(num_classes, in_channels=3):
        return nn.Sequential(nn.Conv2d(in_channels, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveMaxPool2d(2),
                             nn.Flatten(), nn.Linear(16, num_classes))

    def not_a_module():
        return "a model"

    class Picky(nn.Module):
        def forward(self, x):
            assert x.shape[-1] == 32, "wants 32 pixels"
            return x

    def picky():
        return Picky()

    def flat():
        return nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
""")


def run(capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def answers(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x})[0]


@pytest.fixture
def factory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    (tmp_path / "guard_test_export_nets.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "guard_test_export_nets"


def test_a_factory_with_safetensors_weights_exports_what_torch_answers(tmp_path: Path, factory: str,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(0)
    module = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveMaxPool2d(2), nn.Flatten(),
                           nn.Linear(16, 7))
    save_file(module.state_dict(), tmp_path / "tiny.safetensors")
    out = tmp_path / "models" / "tiny.onnx"
    code, stdout, _ = run(capsys, "export", f"{factory}:tiny", "--weights", tmp_path / "tiny.safetensors",
                          "--input-shape", "3,12,10", "--num-classes", "7", "--out", out)
    assert code == 0 and "output 'logits' (N, 7)" in stdout
    # the next step it suggests writes beside, not over, weights named like the model (tiny.safetensors)
    assert stdout.strip().endswith(f"--out {out.parent / 'tiny.profile.safetensors'}")
    loaded = load_model(out)
    assert loaded.sample_shape == (3, 12, 10) and loaded.num_classes == 7
    x = np.random.default_rng(1).random((5, 3, 12, 10), dtype=np.float32)
    with torch.no_grad():
        expected = module(torch.as_tensor(x)).numpy()
    np.testing.assert_allclose(answers(out, x), expected, atol=1e-5)
    assert sorted(p.name for p in out.parent.iterdir()) == ["tiny.onnx"]  # no temporary file left


def test_a_builtin_architecture_with_a_torch_state_dict_exports(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(0)
    module = SmallCNN().eval()
    torch.save(module.state_dict(), tmp_path / "cnn.pt")
    out = tmp_path / "cnn.onnx"
    assert run(capsys, "export", "cnn", "--weights", tmp_path / "cnn.pt", "--input-shape", "1,28,28",
               "--out", out)[0] == 0
    x = np.random.default_rng(2).random((3, 1, 28, 28), dtype=np.float32)
    with torch.no_grad():
        np.testing.assert_allclose(answers(out, x), module(torch.as_tensor(x)).numpy(), atol=1e-4)


def _pickled_module(path: Path, legacy: bool = False) -> None:
    # a whole pickled module: loading it would run code from the file
    torch.save(SmallCNN(), path, _use_new_zipfile_serialization=not legacy)


def _with_nan(path: Path) -> None:
    state = SmallCNN().state_dict()
    state["conv1.bias"][0] = float("nan")
    torch.save(state, path)


@pytest.mark.parametrize(("weights", "options", "fragment"), [
    (_pickled_module, [], "holds pickled objects besides tensors .* weights_only, so no code from the file runs"),
    (lambda p: _pickled_module(p, legacy=True), [], "holds pickled objects besides tensors"),
    # quantized weights were cast to float, so a model of weights -127..127 was exported; safetensors are known by
    # their content, whatever the file's name
    (lambda p: save_file({k: v.to(torch.int8) for k, v in SmallCNN().state_dict().items()}, str(p)), [],
     r"not of the architecture's number kinds: .*\(torch.int8 for torch.float32\)"),
    (_with_nan, [], r"hold NaN or Inf in \['conv1.bias'\]"),
    (lambda p: torch.save({"conv1.weight": torch.zeros(1)}, p), [],
     "do not fit the architecture: .*Missing key"),
    (lambda p: p.write_bytes(b"not a torch file"), [], "cannot read weights from"),
    (lambda p: torch.save([1, 2, 3], p), [], "holds no state dict of tensors"),
    (lambda p: torch.save(SmallCNN().state_dict(), p), ["--input-shape", "1,28"], "--input-shape takes one sample's"),
    (lambda p: torch.save(SmallCNN().state_dict(), p), ["--input-shape", "3,28,28"], "size mismatch for conv1"),
    (lambda p: torch.save(SmallCNN().state_dict(), p), ["--input-shape", "1,10,10"], "cannot run on samples of shape"),
    (lambda p: torch.save(SmallCNN().state_dict(), p), ["--num-classes", "1"], "--num-classes must be at least 2"),
])
def test_weights_and_settings_it_cannot_export_are_refused_in_one_line(tmp_path: Path, weights, options: list[str],
                                                                        fragment: str,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    weights(tmp_path / "w.pt")
    shape = [] if "--input-shape" in options else ["--input-shape", "1,28,28"]
    code, _, err = run(capsys, "export", "cnn", "--weights", tmp_path / "w.pt", *shape, *options,
                       "--out", tmp_path / "m.onnx")
    assert code == 2 and err.startswith("guard: error: ") and len(err.strip().splitlines()) == 1, err
    assert re.search(fragment, err), err
    assert not (tmp_path / "m.onnx").exists()


def test_a_folder_for_weights_and_a_class_count_the_factory_ignores_are_refused(
        tmp_path: Path, factory: str, capsys: pytest.CaptureFixture[str]) -> None:
    """A folder read as an input folder the output may not lie in; --num-classes passed to no factory argument was
    dropped, and the export answered 10 classes."""
    code, _, err = run(capsys, "export", "cnn", "--weights", tmp_path, "--input-shape", "1,28,28",
                       "--out", tmp_path / "out" / "m.onnx")
    assert code == 2 and f"{tmp_path} is a folder; --weights takes the weights file" in err
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
    save_file(model.state_dict(), str(tmp_path / "w.safetensors"))
    code, _, err = run(capsys, "export", f"{factory}:flat", "--weights", tmp_path / "w.safetensors", "--input-shape",
                       "1,28,28", "--num-classes", "5", "--out", tmp_path / "m.onnx")
    assert code == 2 and "--num-classes 5, but guard_test_export_nets:flat answers 10 logits" in err
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize(("spec", "fragment"), [
    ("not_a_module", "returned str, not a torch nn.Module"),
    ("tiny", r"tiny\(in_channels=1\) failed \(TypeError\): .*num_classes"),  # it needs a class count nobody gave
    ("picky", r"cannot run on samples of shape \(1, 28, 28\) \(AssertionError\): wants 32 pixels"),
])
def test_a_factory_that_builds_no_usable_module_is_refused(tmp_path: Path, factory: str, spec: str, fragment: str,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    torch.save({} if spec == "picky" else SmallCNN().state_dict(), tmp_path / "w.pt")  # Picky has no weights
    code, _, err = run(capsys, "export", f"{factory}:{spec}", "--weights", tmp_path / "w.pt", "--input-shape",
                       "1,28,28", "--out", tmp_path / "m.onnx")
    assert code == 2
    assert re.search(fragment, err), err


def test_the_installed_command_finds_a_factory_in_the_working_folder(tmp_path: Path) -> None:
    """`python -m guard` has the working folder on its import path; the `guard` script pip installs does not, and a
    user's `mymodels:make` beside their data must import from either."""
    import subprocess
    import sys

    script = Path(sys.executable).parent / "guard"
    assert script.is_file(), f"the guard command is not installed next to {sys.executable} (pip install -e .)"
    (tmp_path / "guard_test_cwd_nets.py").write_text(FACTORY)
    torch.manual_seed(0)
    module = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveMaxPool2d(2), nn.Flatten(),
                           nn.Linear(16, 3))
    save_file(module.state_dict(), tmp_path / "w.safetensors")
    done = subprocess.run([str(script), "export", "guard_test_cwd_nets:tiny", "--weights", "w.safetensors",
                           "--input-shape", "1,8,8", "--num-classes", "3", "--out", "m.onnx"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    assert load_model(tmp_path / "m.onnx").num_classes == 3
