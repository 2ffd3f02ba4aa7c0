"""The CLI through typer's CliRunner: exit codes, one-line errors, real files."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import pytest
import yaml
from typer.testing import CliRunner

from confkd.cli.main import app

runner = CliRunner()


def test_version_and_help() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.stdout.startswith("confkd ")
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("info", "phantoms", "manifest", "config"):
        assert command in result.stdout


@pytest.fixture(scope="module")
def phantom_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cli") / "ph"
    result = runner.invoke(
        app, ["phantoms", str(root), "--n-train", "4", "--n-val", "1", "--n-test", "1", "--size", "48"]
    )
    assert result.exit_code == 0, result.output
    return root


def test_phantoms_refuses_non_empty_folder(phantom_dir: Path) -> None:
    result = runner.invoke(app, ["phantoms", str(phantom_dir)])
    assert result.exit_code == 2
    assert "not empty" in result.output


def test_info_prints_geometry_and_fails_per_file(phantom_dir: Path, tmp_path: Path) -> None:
    image = sorted((phantom_dir / "imagesTr").iterdir())[0]
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"\x1f\x8b\x08\x00garbage")
    result = runner.invoke(app, ["info", str(image), str(broken)])
    assert result.exit_code == 1  # one input failed, the other was still described
    lines = result.stdout.strip().splitlines()
    assert lines[0].split("\t")[:3] == ["file", "format", "shape"]
    row = lines[1].split("\t")
    assert row[0] == str(image)
    assert row[2] == "×".join(str(n) for n in nib.load(image).shape)
    expected_spacing = "×".join(f"{s:.3g}" for s in nib.load(image).header.get_zooms())
    assert row[3] == expected_spacing
    assert "broken.nii.gz" in result.output and "Traceback" not in result.output


def test_manifest_command_writes_reproducible_json(phantom_dir: Path, tmp_path: Path) -> None:
    outs = []
    for name in ("a.json", "b.json"):
        out = tmp_path / name
        result = runner.invoke(app, ["manifest", str(phantom_dir), "--out", str(out), "--set", "data.n_strong=2"])
        assert result.exit_code == 0, result.output
        outs.append(json.loads(out.read_text()))
    assert outs[0] == outs[1]
    strong = {e["patient"] for e in outs[0]["entries"] if e["supervision"] == "strong"}
    assert len(strong) == 2
    assert "strong\t2\t4" in result.stdout  # 2 patients, 2 frames each


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "data.n_strong=99"], "n_strong"),
        (["--set", "data.n_strng=1"], "unknown config key 'data.n_strng'"),
    ],
)
def test_manifest_errors_are_one_line(phantom_dir: Path, tmp_path: Path, args: list[str], message: str) -> None:
    result = runner.invoke(app, ["manifest", str(phantom_dir), "--out", str(tmp_path / "m.json"), *args])
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "m.json").exists()


def test_manifest_on_missing_dataset(tmp_path: Path) -> None:
    result = runner.invoke(app, ["manifest", str(tmp_path / "nope"), "--out", str(tmp_path / "m.json")])
    assert result.exit_code == 2
    assert "dataset.json" in result.output


def test_config_command_resolves_overrides(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("loss:\n  lambda_ent: 0.5\n")
    result = runner.invoke(app, ["config", "--config", str(cfg), "--set", "model.width=8"])
    assert result.exit_code == 0, result.output
    resolved = yaml.safe_load(result.stdout)
    assert resolved["loss"]["lambda_ent"] == 0.5
    assert resolved["model"]["width"] == 8
    bad = runner.invoke(app, ["config", "--set", "loss.temperature=-1"])
    assert bad.exit_code == 2
    assert "loss.temperature" in bad.output


def test_info_on_real_acdc_file(acdc_dir: Path) -> None:
    path = acdc_dir / "imagesTr" / "patient001_frame01_0000.nii.gz"
    result = runner.invoke(app, ["info", str(path)])
    assert result.exit_code == 0
    row = result.stdout.strip().splitlines()[1].split("\t")
    img = nib.load(path)
    assert row[2] == "×".join(str(n) for n in img.shape)
    assert row[4] == "".join(nib.orientations.aff2axcodes(img.affine))
    assert float(row[5]) == pytest.approx(0.0, abs=0.05)  # this ACDC header is axis-aligned


def test_evaluate_command_on_phantom_labels(phantom_dir: Path, tmp_path: Path) -> None:
    """Labels scored against themselves: Dice 1, HD95 0; a missing prediction gives exit code 1."""
    import shutil

    preds = tmp_path / "preds"
    preds.mkdir()
    labels = sorted((phantom_dir / "labelsTr").iterdir())
    for path in labels[:-1]:
        shutil.copy(path, preds / path.name.replace(".nii.gz", "_seg.nii.gz"))
    result = runner.invoke(
        app,
        ["evaluate", str(preds), str(phantom_dir / "labelsTr"), "--dataset-json", str(phantom_dir / "dataset.json")],
    )
    assert result.exit_code == 1, result.output  # the last label has no prediction
    assert labels[-1].name.replace(".nii.gz", "") in result.output
    lines = [line.split("\t") for line in result.stdout.splitlines() if "\t" in line]
    assert lines[0] == ["class", "Dice", "HD95 mm", "cases"]
    by_class = {row[0]: row for row in lines[1:]}
    assert set(by_class) == {"RV", "MYO", "LV", "mean"}
    assert by_class["mean"][1].startswith("1.0000")
    assert by_class["mean"][2].startswith("0.00")
    assert by_class["LV"][3] == str(len(labels) - 1)
    assert (preds / "per_case.csv").is_file() and (preds / "summary.csv").is_file()
