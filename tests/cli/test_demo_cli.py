"""``confkd demo`` end to end (a few steps only: the full demo is the README's first command)."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from confkd.cli.main import app

runner = CliRunner()


def test_demo_runs_every_stage(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    result = runner.invoke(app, ["demo", "--out", str(out), "--steps", "4"])
    assert result.exit_code == 0, result.output
    rows = {line.split("\t")[0]: line.split("\t") for line in result.stdout.splitlines() if "\t" in line}
    assert set(rows) >= {"class", "RV", "MYO", "LV", "mean"}
    assert 0.0 <= float(rows["mean"][1]) <= 1.0
    assert (out / "run" / "checkpoint_best.pt").is_file()
    segs = sorted((out / "segment").glob("*_seg.nii.gz"))
    assert len(segs) == 6
    assert len(list((out / "segment").glob("*_preview.png"))) == 6
    assert (out / "segment" / "summary.csv").is_file()
    # a second run refuses to mix into the same folder
    again = runner.invoke(app, ["demo", "--out", str(out), "--steps", "4"])
    assert again.exit_code == 2
    assert "not empty" in again.output
