"""ONNX Runtime through the same segment pipeline as torch: export via the CLI, segment both ways, compare."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from confkd.cli.main import app
from confkd.config import config_from_dict
from confkd.data.phantoms import make_phantom
from confkd.inference.model import load_model
from confkd.inference.runners import Runner, RunnerError
from confkd.inference.runners_onnx import OrtRunner, ort_providers
from confkd.training.checkpoint import save_untrained_checkpoint

cli = CliRunner()


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("ort")
    cfg = config_from_dict(
        {
            "model": {"width": 8, "depth": 3, "num_classes": 4, "norm": "instance"},
            "preprocess": {"target_spacing": [1.5, 1.5], "pad_multiple": 8},
            # max tile 256 > every resampled phantom slice: both backends run whole slices, the same tiling
            # (InstanceNorm statistics depend on the tile, so different tilings would differ by design)
            "train": {"patch_size": [128, 128]},
        }
    )
    path = save_untrained_checkpoint(
        cfg, root / "model.pt", label_names=("background", "RV", "MYO", "LV"), ignore_index=4, seed=1
    )
    result = cli.invoke(app, ["export", str(path), "--out", str(root / "exported")])
    assert result.exit_code == 0, result.output
    return path, root / "exported"


def test_ort_runner_is_a_runner_with_manifest_bounds(models: tuple[Path, Path]) -> None:
    _, exported = models
    loaded = load_model(exported, device="cpu")  # auto: onnxruntime for a directory without TensorRT
    runner = loaded.runner
    assert isinstance(runner, OrtRunner) and isinstance(runner, Runner)
    assert runner.max_tile == (256, 256) and runner.max_batch == 32 and runner.divisor == 8
    assert loaded.label_names == {0: "background", 1: "RV", 2: "MYO", 3: "LV"}
    probs = runner(torch.randn(3, 1, 40, 64))
    assert probs.shape == (3, 4, 40, 64) and torch.allclose(probs.sum(1), torch.ones(3, 40, 64), atol=1e-5)
    with pytest.raises(RunnerError, match="onnxruntime-gpu"):
        ort_providers(torch.device("cuda"), ["CPUExecutionProvider"])
    assert ort_providers(torch.device("cuda"), ["TensorrtExecutionProvider", "CUDAExecutionProvider", "X"]) == [
        "TensorrtExecutionProvider",
        "CUDAExecutionProvider",
        "CPUExecutionProvider",
    ]


def test_torch_and_onnxruntime_agree_through_segment(models: tuple[Path, Path], tmp_path: Path) -> None:
    ckpt, exported = models
    scans = []
    for i in range(3):
        ph = make_phantom(900 + i, size=(160, 144), slices=5)
        scans.append(tmp_path / "scans" / f"case{i}.nii.gz")
        scans[-1].parent.mkdir(exist_ok=True)
        nib.save(nib.Nifti1Image(ph.image, ph.affine), scans[-1])
    outs = {}
    for backend, model in (("torch", ckpt), ("onnxruntime", exported)):
        out = tmp_path / backend
        args = ["segment", *map(str, scans), "--out", str(out), "--model", str(model), "--backend", backend]
        result = cli.invoke(app, [*args, "--device", "cpu"])
        assert result.exit_code == 0, result.output
        outs[backend] = out
    for scan in scans:
        name = scan.name.replace(".nii.gz", "")
        seg = [np.asarray(nib.load(outs[b] / f"{name}_seg.nii.gz").dataobj) for b in outs]
        conf = [nib.load(outs[b] / f"{name}_conf.nii.gz").get_fdata() for b in outs]
        agreement = float(np.mean(seg[0] == seg[1]))
        assert agreement >= 0.999, (name, agreement)
        # stored as uint8 with scale 1/255: equal network outputs round to the same step; 1e-3 allows none
        assert np.abs(conf[0] - conf[1]).max() <= 1e-3 + 1 / 255, name
    print("agreement ok")


def test_export_cli_errors_exit_2(models: tuple[Path, Path], tmp_path: Path) -> None:
    ckpt, exported = models
    result = cli.invoke(app, ["export", str(ckpt), "--out", str(exported)])
    assert result.exit_code == 2 and "already exists" in result.output
    result = cli.invoke(app, ["export", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "no such checkpoint" in result.output and not (tmp_path / "o").exists()
    result = cli.invoke(app, ["segment", str(tmp_path), "--model", str(exported), "--backend", "torch"])
    assert result.exit_code == 2
