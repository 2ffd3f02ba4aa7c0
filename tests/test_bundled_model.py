"""The bundled default model: present, hash-checked, used by ``confkd segment`` without ``--model``, and good on
real ACDC val scans (the scans it was validated on; skipped without ../shared/data)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from confkd.bundled import DEFAULT_MODEL, bundled_model_dir
from confkd.cli.main import app
from confkd.inference.manifest import load_manifest
from confkd.metrics import evaluate_case

runner = CliRunner()


def test_bundled_model_is_installed_and_verified() -> None:
    folder = bundled_model_dir()
    assert folder is not None and folder.name == DEFAULT_MODEL
    manifest = load_manifest(folder)  # checks the ONNX file against the sha256 recorded at export
    assert manifest.labels["names"] == ["background", "RV", "MYO", "LV"]
    assert manifest.config["data"]["n_strong"] == 7 and manifest.config["data"]["weak_source"] == "scribbles"
    assert (folder / "model.onnx").stat().st_size < 16 * 2**20
    assert bundled_model_dir("no-such-model") is None


def test_segment_without_model_uses_the_bundled_one(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    image = nib.Nifti1Image(rng.normal(100, 20, (96, 80, 3)).astype(np.int16), np.diag([1.5, 1.5, 8.0, 1.0]))
    scan = tmp_path / "scan.nii.gz"
    nib.save(image, scan)
    out = tmp_path / "out"
    result = runner.invoke(app, ["segment", str(scan), "--out", str(out), "--backend", "onnxruntime"])
    assert result.exit_code == 0, result.output
    seg = nib.load(out / "scan_seg.nii.gz")
    assert seg.shape == image.shape and np.allclose(seg.affine, image.affine)
    report = json.loads((out / "scan.json").read_text())
    assert DEFAULT_MODEL in json.dumps(report)


@pytest.mark.data
def test_bundled_model_on_acdc_val(acdc_dir: Path, tmp_path: Path) -> None:
    cases = ["patient071_frame01", "patient080_frame01"]
    scans = [str(acdc_dir / "imagesTr" / f"{c}_0000.nii.gz") for c in cases]
    out = tmp_path / "out"
    result = runner.invoke(app, ["segment", *scans, "--out", str(out), "--backend", "onnxruntime"])
    assert result.exit_code == 0, result.output
    for case in cases:
        label = nib.load(acdc_dir / "labelsTr" / f"{case}.nii.gz")
        pred = np.asanyarray(nib.load(out / f"{case}_seg.nii.gz").dataobj)
        m = evaluate_case(pred, np.asanyarray(label.dataobj), [1, 2, 3], label.header.get_zooms()[:3])
        assert np.mean(list(m.dice.values())) > 0.7, (case, m.dice)
