"""``confkd segment`` through CliRunner and as a subprocess: exit codes, messages, files, interruption, ACDC."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from confkd.cli.main import app
from confkd.data.phantoms import make_phantom
from confkd.data.volume import read_volume

runner = CliRunner()
NO_MODEL = "no --model given and this installation has no bundled default model: pass a checkpoint or model folder"


def save_phantom(path: Path, seed: int) -> Path:
    ph = make_phantom(seed, size=(48, 48), slices=4)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(ph.image, ph.affine), path)
    return path


@pytest.fixture
def scans(tmp_path: Path) -> list[Path]:
    return [save_phantom(tmp_path / "scans" / f"ph{i}_0000.nii.gz", 500 + i) for i in range(3)]


def segment(*args: str | Path) -> tuple[int, str]:
    result = runner.invoke(app, ["segment", *map(str, args)])
    return result.exit_code, result.output


def test_success_exit_0_with_outputs_and_summary(tmp_path: Path, scans: list[Path], checkpoint: Path) -> None:
    out = tmp_path / "out"
    code, output = segment(*scans, "--out", out, "--model", checkpoint, "--device", "cpu", "--backend", "torch")
    assert code == 0, output
    for case in ("ph0", "ph1", "ph2"):
        for name in (f"{case}_seg.nii.gz", f"{case}_conf.nii.gz", f"{case}.json"):
            assert (out / name).is_file()
    assert (out / "summary.csv").is_file() and not (out / "failures.jsonl").exists()
    # piped output: one plain line per case, then the summary as tab-separated lines
    assert "[1/3] ok ph0" in output and "ok\t3" in output and "failed\t0" in output and f"out\t{out}" in output
    assert "Traceback" not in output

    code, output = segment(str(scans[0].parent / "*.nii.gz"), "--out", out, "--model", checkpoint)
    assert code == 0 and "skipping 3 complete case(s)" in output and "skipped (complete)\t3" in output


def test_default_out_dir_is_announced(
    tmp_path: Path, scans: list[Path], checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    code, output = segment(scans[0], "--model", checkpoint)
    assert code == 0, output
    assert "no --out given: writing to ./confkd_out/" in output
    assert (tmp_path / "confkd_out" / "ph0_seg.nii.gz").is_file()


def test_usage_errors_exit_2(
    tmp_path: Path, scans: list[Path], checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    monkeypatch.setattr("confkd.bundled.DEFAULT_MODEL", "not-installed")  # an installation without the model
    code, output = segment(*scans, "--out", out)
    assert code == 2 and NO_MODEL in " ".join(output.split())
    for bad in ("3/3", "-1/2", "x", "1/0"):
        code, output = segment(*scans, "--out", out, "--model", checkpoint, "--shard", bad)
        assert code == 2 and "--shard" in output, (bad, output)
    code, output = segment(tmp_path / "nothing" / "*.nii.gz", "--out", out, "--model", checkpoint)
    assert code == 2 and "no inputs matched" in output
    code, output = segment(tmp_path / "missing.nii.gz", "--out", out, "--model", checkpoint)
    assert code == 2 and "missing.nii.gz: no such file or directory" in output
    not_a_model = tmp_path / "model.pt"
    not_a_model.write_text("hello")
    code, output = segment(*scans, "--out", out, "--model", not_a_model)
    assert code == 2 and "model.pt" in output and "Traceback" not in output
    code, output = segment(*scans, "--out", out, "--model", checkpoint, "--backend", "tensorrt")
    assert code == 2 and "tensorrt" in output
    code, output = segment(*scans, "--out", out, "--model", checkpoint, "--backend", "caffe")
    assert code == 2
    code, output = segment(*scans, "--out", out, "--model", checkpoint, "--low-confidence", "1.5")
    assert code == 2 and "--low-confidence" in output
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    code, output = segment(*scans, "--out", blocker / "out", "--model", checkpoint)
    assert code == 2 and "cannot write the output folder" in output
    assert not out.exists()  # no usage error wrote anything


def test_a_corrupt_scan_exits_1_and_the_others_complete(tmp_path: Path, scans: list[Path], checkpoint: Path) -> None:
    corrupt = scans[0].parent / "corrupt_0000.nii.gz"
    corrupt.write_bytes(b"\x1f\x8b\x08\x00 this is not gzip")
    out = tmp_path / "out"
    code, output = segment(scans[0].parent, "--out", out, "--model", checkpoint)
    assert code == 1
    assert "FAILED corrupt (read)" in output and "Traceback" not in output
    lines = (out / "failures.jsonl").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["input"] == str(corrupt)
    assert sorted(p.name for p in out.glob("*_seg.nii.gz")) == ["ph0_seg.nii.gz", "ph1_seg.nii.gz", "ph2_seg.nii.gz"]
    assert not list(out.glob("corrupt*")) and not list(out.glob(".*"))


def test_shards_through_the_cli_cover_the_batch_once(tmp_path: Path, checkpoint: Path) -> None:
    scans = [save_phantom(tmp_path / "scans" / f"s{i:02d}.nii.gz", 600 + i) for i in range(7)]
    out = tmp_path / "out"
    written: list[str] = []
    for i in range(3):
        before = {p.name for p in out.glob("*.json")} if out.exists() else set()
        code, output = segment(*scans, "--out", out, "--model", checkpoint, "--shard", f"{i}/3")
        assert code == 0, output
        assert f"shard {i}/3:" in output
        written += sorted({p.name for p in out.glob("*.json")} - before)
    assert sorted(written) == [f"s{i:02d}.json" for i in range(7)]  # every case once, no overlap
    summary = (out / "summary.csv").read_text().splitlines()
    assert len(summary) == 1 + 7  # the last shard's summary covers the other shards' cases too


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupt_leaves_only_complete_outputs_and_a_rerun_finishes(
    tmp_path: Path, checkpoint: Path, signum: signal.Signals
) -> None:
    scans = [save_phantom(tmp_path / "scans" / f"c{i}_0000.nii.gz", 700 + i) for i in range(6)]
    out = tmp_path / "out"
    # the real CLI in a subprocess, with inference slowed down so that the signal lands mid-batch
    slow = (
        "import sys, time\n"
        "from confkd.inference import engine\n"
        "real = engine.infer\n"
        "def slow(*a, **k):\n"
        "    time.sleep(0.4)\n"
        "    return real(*a, **k)\n"
        "engine.infer = slow\n"
        "from confkd.cli.main import app\n"
        "app(sys.argv[1:], prog_name='confkd')\n"
    )
    args = ["segment", str(scans[0].parent), "--out", str(out), "--model", str(checkpoint), "--device", "cpu"]
    proc = subprocess.Popen([sys.executable, "-c", slow, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while not (out / "c0.json").exists():
        assert proc.poll() is None, proc.communicate()[0].decode()
        assert time.monotonic() < deadline, "the first case never completed"
        time.sleep(0.02)
    proc.send_signal(signum)
    output = proc.communicate(timeout=120)[0].decode()
    assert proc.returncode == 130, output
    assert f"interrupted ({signum.name})" in output and "Traceback" not in output

    done = sorted(p.stem for p in out.glob("c*.json"))
    assert 1 <= len(done) < 6, output
    # every output present is complete and readable; nothing partial, no temporary file
    assert sorted(p.name.removesuffix("_seg.nii.gz") for p in out.glob("*_seg.nii.gz")) == done
    assert sorted(p.name.removesuffix("_conf.nii.gz") for p in out.glob("*_conf.nii.gz")) == done
    for case in done:
        assert read_volume(out / f"{case}_seg.nii.gz").shape == (48, 48, 4)
        conf = read_volume(out / f"{case}_conf.nii.gz").array
        assert conf.min() >= 0.0 and conf.max() <= 1.0
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []
    assert (out / "summary.csv").is_file()
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name.startswith(tuple(done))}

    code, output = segment(scans[0].parent, "--out", out, "--model", checkpoint, "--device", "cpu")
    assert code == 0, output
    assert f"skipping {len(done)} complete case(s)" in output
    assert sorted(p.stem for p in out.glob("c*.json")) == [f"c{i}" for i in range(6)]
    assert {n: (out / n).stat().st_mtime_ns for n in stamps} == stamps  # finished cases were not redone


@pytest.mark.data
def test_acdc_cases_keep_their_geometry(acdc_dir: Path, tmp_path: Path, checkpoint: Path) -> None:
    images = sorted((acdc_dir / "imagesTs").glob("*_0000.nii.gz"))[:2]
    if len(images) < 2:
        pytest.skip("fewer than 2 ACDC test images")
    out = tmp_path / "out"
    code, output = segment(*images, "--out", out, "--model", checkpoint, "--device", "cpu")
    assert code == 0, output
    for image in images:
        case = image.name.removesuffix("_0000.nii.gz")
        ref = nib.load(image)
        for kind in ("seg", "conf"):
            got = nib.load(out / f"{case}_{kind}.nii.gz")
            assert got.shape == ref.shape
            np.testing.assert_array_equal(got.affine, ref.affine)
            for field in ("qform_code", "sform_code", "pixdim", "quatern_b", "quatern_c", "quatern_d"):
                np.testing.assert_array_equal(got.header[field], ref.header[field], err_msg=field)
            np.testing.assert_array_equal(got.header.get_sform(), ref.header.get_sform())
            np.testing.assert_array_equal(got.header.get_qform(), ref.header.get_qform())
        report = json.loads((out / f"{case}.json").read_text())
        assert report["shape"] == list(ref.shape) and report["input"] == str(image)
        assert os.path.getsize(out / f"{case}_conf.nii.gz") > 0


def test_the_same_scan_stored_differently_gets_the_same_mask(tmp_path: Path, checkpoint: Path) -> None:
    """Slice axis stored first and reversed, or an oblique header: the same physical scan, the same labels."""
    ph = make_phantom(3, size=(96, 96), slices=5)
    a, affine = ph.image, ph.affine
    scans = tmp_path / "in"
    scans.mkdir()
    nib.save(nib.Nifti1Image(a, affine), scans / "orig.nii.gz")
    # axes (k, i, j) with k reversed: voxel (k', i, j) is voxel (i, j, K-1-k') of the original
    moved = np.ascontiguousarray(np.transpose(a, (2, 0, 1))[::-1])
    index_map = np.zeros((4, 4))
    index_map[0, 1] = index_map[1, 2] = index_map[3, 3] = 1.0
    index_map[2, 0], index_map[2, 3] = -1.0, a.shape[2] - 1
    nib.save(nib.Nifti1Image(moved, affine @ index_map), scans / "moved.nii.gz")
    t = np.deg2rad(20.0)
    tilt = np.array([[np.cos(t), -np.sin(t), 0, 0], [np.sin(t), np.cos(t), 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(a, tilt @ affine), scans / "oblique.nii.gz")
    out = tmp_path / "out"
    code, output = segment(scans, "--out", out, "--model", checkpoint, "--device", "cpu")
    assert code == 0, output
    orig = np.asanyarray(nib.load(out / "orig_seg.nii.gz").dataobj)
    moved_back = np.transpose(np.asanyarray(nib.load(out / "moved_seg.nii.gz").dataobj)[::-1], (1, 2, 0))
    assert orig.any() and np.array_equal(moved_back, orig)
    assert np.array_equal(np.asanyarray(nib.load(out / "oblique_seg.nii.gz").dataobj), orig)
    assert np.allclose(nib.load(out / "moved_seg.nii.gz").affine, affine @ index_map)
