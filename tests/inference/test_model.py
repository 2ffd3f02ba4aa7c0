"""load_model: a checkpoint becomes a runner of its student only; every other path is a one-line error."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from confkd.config import Config, config_from_dict
from confkd.data.phantoms import make_phantom
from confkd.data.volume import Volume
from confkd.errors import ConfigError, ConfKDError, ModelFileError
from confkd.inference.engine import segment_volume
from confkd.inference.model import LoadedModel, ModelLoadError, UnsupportedModelError, load_model
from confkd.inference.predict import predict_volume
from confkd.inference.runners import TorchRunner
from confkd.training.checkpoint import CheckpointError, make_checkpoint, save_checkpoint
from confkd.training.network import DualBranchUNet, UNet, count_parameters, create_model


def _config(name: str = "dual_unet") -> Config:
    return config_from_dict(
        {
            "name": "tiny",
            "model": {"name": name, "width": 4, "depth": 2, "num_classes": 3},
            "preprocess": {"target_spacing": [1.25, 1.5], "pad_multiple": 8},
        }
    )


def _save(tmp_path: Path, name: str = "dual_unet") -> tuple[DualBranchUNet | UNet, Path]:
    config = _config(name)
    torch.manual_seed(0)
    model = create_model(config.model, 2)
    model(torch.randn(4, 1, 16, 16))  # BatchNorm statistics
    model.eval()
    ckpt = make_checkpoint(
        model,
        config,
        label_names=("background", "a", "b"),
        ignore_index=3,
        dataset_name="phantoms",
        dataset_fingerprint="f" * 64,
    )
    return model, save_checkpoint(ckpt, tmp_path / f"{name}.pt")


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[DualBranchUNet | UNet, Path]:
    return _save(tmp_path_factory.mktemp("ckpt"))


@pytest.mark.parametrize("name", ["dual_unet", "unet"])
def test_checkpoint_loads_the_student_exactly(tmp_path: Path, name: str) -> None:
    model, path = _save(tmp_path, name)
    loaded = load_model(path, device="cpu", channels_last=False)
    assert isinstance(loaded, LoadedModel) and isinstance(loaded.runner, TorchRunner)
    x = torch.randn(3, 1, 16, 24)
    with torch.no_grad():
        expected = torch.softmax(model.student_network()(x), dim=1)
    assert torch.equal(loaded.runner(x), expected)
    fast = load_model(path, device="cpu")  # channels_last: same values up to float rounding
    torch.testing.assert_close(fast.runner(x), expected, atol=1e-5, rtol=1e-4)


def test_runner_holds_no_teacher(saved: tuple[DualBranchUNet, Path]) -> None:
    model, path = saved
    runner = load_model(path, device="cpu").runner
    assert isinstance(runner, TorchRunner)
    keys = set(runner.network.state_dict())
    assert keys == set(model.student_network().state_dict())
    assert not any("teacher" in k for k in keys)
    assert count_parameters(runner.network) == count_parameters(model.student_network())
    assert count_parameters(runner.network) < count_parameters(model)
    teacher = {p.data_ptr() for p in model.teacher.parameters()}
    assert not teacher & {p.data_ptr() for p in runner.network.parameters()}


def test_metadata(saved: tuple[DualBranchUNet, Path]) -> None:
    _, path = saved
    loaded = load_model(str(path), backend="torch", device="cpu")
    assert loaded.model_hash == hashlib.sha256(path.read_bytes()).hexdigest()
    assert loaded.label_names == {0: "background", 1: "a", 2: "b"}  # ignore (3) excluded
    assert loaded.model_version.startswith("confkd ") and loaded.model_version.endswith(" / tiny.yaml")
    assert loaded.config == _config() and loaded.source == path
    assert loaded.config.preprocess.target_spacing == (1.25, 1.5)


def test_loaded_model_segments_like_predict_volume(saved: tuple[DualBranchUNet, Path]) -> None:
    model, path = saved
    phantom = make_phantom(2, size=(36, 40), slices=4)
    volume = Volume(phantom.image, phantom.affine, "nifti1")
    result = segment_volume(volume, load_model(path, device="cpu", channels_last=False))
    reference = predict_volume(model, volume, _config().preprocess).student.numpy()
    top = np.sort(reference, axis=0)
    ok = (top[-1] - top[-2]) > 1e-5
    assert ok.mean() > 0.99 and np.array_equal(result.labels[ok], reference.argmax(0)[ok])


def _one_line(error: pytest.ExceptionInfo[BaseException], path: Path) -> str:
    message = str(error.value)
    assert "\n" not in message and message.startswith(str(path)), message
    return message


def test_bad_paths_are_one_line_errors_naming_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "missing.pt"
    with pytest.raises(ModelLoadError, match="no such file") as info:
        load_model(missing, device="cpu")
    assert isinstance(info.value, ModelFileError)
    _one_line(info, missing)

    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00not a checkpoint" * 100)
    with pytest.raises(ModelFileError, match="not a readable confkd checkpoint") as bad:
        load_model(garbage, device="cpu")
    assert isinstance(bad.value, CheckpointError)
    _one_line(bad, garbage)

    empty_dir = tmp_path / "nothing"
    empty_dir.mkdir()
    with pytest.raises(ModelLoadError, match="not a model; expected one of") as info:
        load_model(empty_dir, device="cpu")
    _one_line(info, empty_dir)


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("manifest", "missing field(s) format"),
        ("onnx_dir", "no manifest.json; not an exported model directory"),
        ("onnx_file", "a bare ONNX file carries no manifest; pass the exported directory"),
    ],
)
def test_incomplete_exported_models_are_refused_with_the_fix(tmp_path: Path, kind: str, message: str) -> None:
    if kind == "onnx_file":
        path = tmp_path / "model.onnx"
        path.write_bytes(b"bytes")
    else:
        path = tmp_path / "exported"
        path.mkdir()
        (path / ("manifest.json" if kind == "manifest" else "model.onnx")).write_bytes(b"{}")
    with pytest.raises(ModelFileError) as info:  # one type for "the model could not be loaded"
        load_model(path, device="cpu", backend="onnxruntime")
    assert message in _one_line(info, path)
    if kind == "onnx_file":
        assert isinstance(info.value, UnsupportedModelError)


def test_backend_and_device_are_validated(saved: tuple[DualBranchUNet, Path]) -> None:
    _, path = saved
    for backend in ("onnxruntime", "tensorrt"):
        with pytest.raises(ModelLoadError, match="runs on the torch backend") as info:
            load_model(path, backend=backend, device="cpu")
        _one_line(info, path)
    with pytest.raises(ConfigError, match="unknown backend 'onnx'; available options are: auto, torch"):
        load_model(path, backend="onnx", device="cpu")
    with pytest.raises(ConfigError, match="unknown device 'tpu'"):
        load_model(path, device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfKDError, match="no GPU"):
            load_model(path, device="cuda:0")
    assert load_model(path).runner.device.type == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.gpu
def test_cuda_device_index_is_checked(saved: tuple[DualBranchUNet, Path]) -> None:
    _, path = saved
    assert load_model(path, device="cuda:0").runner.device == torch.device("cuda", 0)
    with pytest.raises(ConfKDError, match="GPU"):
        load_model(path, device=f"cuda:{torch.cuda.device_count()}")
    with pytest.raises(ConfigError, match="cuda:N"):
        load_model(path, device="cuda:x")
