"""Bad inputs, generated here, mixed in one batch with good scans and run through the real ``confkd segment``.

Every bad input must give one line naming the file and the problem (stderr and ``failures.jsonl``, no
traceback) or its documented handling; the batch goes on, the good scans complete, nothing partial is left in
OUT_DIR, and the exit code follows docs/segment.md. docs/reliability.md tabulates these cases.
"""

from __future__ import annotations

import builtins
import csv
import errno
import gzip
import inspect
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk  # noqa: N813
from typer.testing import CliRunner

from confkd import io_utils
from confkd.cli import segment_commands
from confkd.cli.main import app
from confkd.data.phantoms import make_phantom
from confkd.data.volume import DEFAULT_MAX_VOXELS
from confkd.inference import outputs
from confkd.inference.inputs import display_path

SHAPE = (48, 48, 4)
# NIfTI-1 header byte offsets (nifti1.h)
DIM_OFFSET = 40  # dim[0..7], int16
MAGIC_OFFSET = 344


def _phantom(seed: int) -> tuple[np.ndarray, np.ndarray]:
    ph = make_phantom(seed, size=SHAPE[:2], slices=SHAPE[2])
    return ph.image, ph.affine


def _save(path: Path, data: np.ndarray, affine: np.ndarray | None = None, **codes: int) -> Path:
    """A NIfTI file whose qform and sform are ``affine`` with codes 1, unless ``codes`` say otherwise."""
    affine = np.diag([1.5, 1.5, 8.0, 1.0]) if affine is None else affine
    img = nib.Nifti1Image(data, None)
    img.header.set_qform(affine, code=codes.get("qcode", 1))
    img.header.set_sform(affine, code=codes.get("scode", 1))
    nib.save(img, path)
    return path


def _uncompressed(path: Path) -> bytearray:
    return bytearray(gzip.decompress(path.read_bytes()))


def _write_dicom_series(folder: Path, data: np.ndarray, series_uid: str) -> None:
    """One file per slice with the tags GDCM groups and sorts series by (as tests/data/test_volume.py)."""
    folder.mkdir(parents=True, exist_ok=True)
    image = sitk.GetImageFromArray(np.ascontiguousarray(data.transpose(2, 1, 0)))
    image.SetSpacing((1.5, 1.5, 8.0))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(image.GetDepth()):
        slice_k = image[:, :, k]
        for tag, value in {
            "0008|0060": "MR",
            "0020|000d": "1.2.826.0.1.3680043.2.1125.7",
            "0020|000e": series_uid,
            "0020|0037": "1\\0\\0\\0\\1\\0",
            "0008|0018": f"{series_uid}.{k + 1}",
            "0020|0013": str(k + 1),
            "0020|0032": "\\".join(str(v) for v in image.TransformIndexToPhysicalPoint((0, 0, k))),
        }.items():
            slice_k.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"{series_uid.rsplit('.', 1)[1]}_{k}.dcm"))
        writer.Execute(slice_k)


def build_corpus(folder: Path) -> dict[str, Path]:
    """Good scans and every bad input of docs/reliability.md in ``folder``; case name -> path."""
    folder.mkdir(parents=True, exist_ok=True)
    image, affine = _phantom(1)
    p: dict[str, Path] = {}
    for i, name in enumerate(("good_a", "good_b", "diskfull")):
        data, aff = _phantom(10 + i)
        p[name] = _save(folder / f"{name}.nii.gz", data, aff)
    p["zero_byte"] = folder / "zero_byte.nii.gz"
    p["zero_byte"].touch()
    p["truncated"] = folder / "truncated.nii.gz"
    p["truncated"].write_bytes(p["good_a"].read_bytes()[:-300])
    raw = _uncompressed(p["good_a"])
    huge = bytearray(raw)
    huge[DIM_OFFSET : DIM_OFFSET + 8] = np.array([3, 10000, 10000, 10000], "<i2").tobytes()  # 10^12 voxels
    p["huge_header"] = folder / "huge_header.nii"
    p["huge_header"].write_bytes(bytes(huge))
    magic = bytearray(raw)
    magic[MAGIC_OFFSET : MAGIC_OFFSET + 4] = b"xyz\0"
    p["wrong_magic"] = folder / "wrong_magic.nii"
    p["wrong_magic"].write_bytes(bytes(magic))
    p["flat_2d"] = _save(folder / "flat_2d.nii.gz", image[:, :, 1], affine)
    p["five_d"] = _save(folder / "five_d.nii.gz", np.ones((8, 8, 3, 2, 2), np.float32))
    nan_inf = image.copy()
    nan_inf[5:9, 5:9, :] = np.nan
    nan_inf[20:22, 30:32, 1] = np.inf
    nan_inf[30:32, 20:22, 2] = -np.inf
    p["nan_inf"] = _save(folder / "nan_inf.nii.gz", nan_inf, affine)
    p["constant"] = _save(folder / "constant.nii.gz", np.full(SHAPE, 7.0, np.float32), affine)
    p["no_affine"] = _save(folder / "no_affine.nii.gz", image, affine, qcode=0, scode=0)  # pixdim only
    zero = nib.Nifti1Image(image, None)
    zero.header.set_sform(np.zeros((4, 4)), code=2)
    zero.header.set_qform(None, code=0)
    p["zero_sform"] = folder / "zero_sform.nii.gz"
    nib.save(zero, p["zero_sform"])
    disagree = nib.Nifti1Image(image, None)
    disagree.header.set_qform(np.diag([1.5, 1.5, 8.0, 1.0]), code=1)
    other = np.diag([1.5, 1.5, 8.0, 1.0])
    other[:3, 3] = (-40.0, 25.0, 60.0)
    disagree.header.set_sform(other, code=2)
    p["q_ne_s"] = folder / "q_ne_s.nii.gz"
    nib.save(disagree, p["q_ne_s"])
    pixdim = nib.Nifti1Image(image, None)
    pixdim.header.set_sform(np.diag([1.5, 1.5, 8.0, 1.0]), code=1)
    pixdim.header.set_qform(None, code=0)
    pixdim.header["pixdim"][1:4] = (0.3, 0.3, 2.0)
    p["pixdim_mismatch"] = folder / "pixdim_mismatch.nii.gz"
    nib.save(pixdim, p["pixdim_mismatch"])
    p["tiny_spacing"] = _save(folder / "tiny_spacing.nii.gz", image, np.diag([1e-6, 1e-6, 1e-6, 1.0]))
    p["huge_spacing"] = _save(folder / "huge_spacing.nii.gz", image, np.diag([1e6, 1e6, 1e6, 1.0]))
    p["complex"] = _save(folder / "complex.nii.gz", image.astype(np.complex64))
    rgb = np.zeros(SHAPE, dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    p["rgb"] = _save(folder / "rgb.nii.gz", rgb)
    p["rgb_nrrd"] = folder / "rgb_nrrd.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 8, 8, 3), np.uint8), isVector=True), str(p["rgb_nrrd"]))
    p["two_series"] = folder / "two_series"
    dicom = (image * 100).astype(np.int16)
    _write_dicom_series(p["two_series"], dicom, "1.2.826.0.1.3680043.2.1125.1.1")
    _write_dicom_series(p["two_series"], dicom[::-1], "1.2.826.0.1.3680043.2.1125.1.2")
    # non-UTF-8 file names: one good scan, one corrupt file (its message must still print); the keys are the case
    # names (the undecodable byte becomes "_"), the paths str with the byte as a surrogate escape, as from argv
    for key, content in (("good", p["good_b"].read_bytes()), ("bad", b"\x1f\x8b\x08\x00 not gzip")):
        raw = os.fsencode(folder) + b"/undecodable\xff_" + key.encode() + b".nii.gz"
        with open(raw, "wb") as f:
            f.write(content)
        p[f"undecodable__{key}"] = Path(os.fsdecode(raw))
    if os.geteuid() != 0:  # root reads every file whatever its mode
        p["no_permission"] = _save(folder / "no_permission.nii.gz", image, affine)
        p["no_permission"].chmod(0)
    return p


# ---------------------------------------------------------------------------------------------- fault injection


def _enospc() -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


class _FillsUp:
    """A writable file on a disk that fills up: the first write puts a few bytes on disk, then fails (ENOSPC)."""

    def __init__(self, file: Any) -> None:
        self._file = file

    def write(self, data: Any) -> int:
        self._file.write(data[:16])
        raise _enospc()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._file, name)

    def __enter__(self) -> _FillsUp:
        return self

    def __exit__(self, *exc: object) -> None:
        self._file.close()


def full_disk(mp: pytest.MonkeyPatch, full: Callable[[str], bool]) -> None:
    """Make the disk full for the paths where ``full(path)``: a fault injection at the boundary to the OS (the
    image library's save and the built-in ``open`` of confkd's writers), not a mock of confkd. Each such write
    leaves a partial file behind, as a real full disk does; confkd has to remove it."""
    real_save = nib.save

    def save(img: Any, filename: Any, *args: Any, **kwargs: Any) -> None:
        if full(os.fspath(filename)):
            Path(filename).write_bytes(b"\x1f\x8b\x08\x00 partial")
            raise _enospc()
        real_save(img, filename, *args, **kwargs)

    def opener(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        f = builtins.open(file, mode, *args, **kwargs)  # noqa: SIM115 (the caller closes it)
        return _FillsUp(f) if set(mode) & set("wax") and full(os.fspath(file)) else f

    mp.setattr(nib, "save", save)
    for module in (io_utils, outputs):
        mp.setattr(module, "open", opener, raising=False)


# ---------------------------------------------------------------------------------------------- the batch


@dataclass
class Run:
    code: int
    stdout: str
    stderr: str
    out: Path
    inputs: dict[str, Path]

    def failures(self) -> dict[str, dict[str, Any]]:
        path = self.out / "failures.jsonl"
        lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
        return {r["case"]: r for r in map(json.loads, lines)}

    def summary(self) -> dict[str, dict[str, str]]:
        with open(self.out / "summary.csv", newline="", encoding="utf-8") as f:
            return {row["case"]: row for row in csv.DictReader(f)}


def segment(inputs: dict[str, Path], out: Path, checkpoint: Path, *args: str | Path) -> Run:
    argv = [*map(str, args), "--out", str(out), "--model", str(checkpoint), "--device", "cpu", "--backend", "torch"]
    result = CliRunner().invoke(app, ["segment", *argv])
    return Run(result.exit_code, result.stdout, result.stderr, out, inputs)


@pytest.fixture(scope="module")
def batch(tmp_path_factory: pytest.TempPathFactory, checkpoint: Path) -> Run:
    """The whole corpus in one run; one case's confidence map and another's report hit a full disk."""
    root = tmp_path_factory.mktemp("bad_inputs")
    corpus = build_corpus(root / "in")
    corpus["reportfull"] = _save(root / "in" / "reportfull.nii.gz", *_phantom(20))
    with pytest.MonkeyPatch.context() as mp:
        full_disk(mp, lambda path: "diskfull_conf" in path or "reportfull.json" in path)
        return segment(corpus, root / "out", checkpoint, root / "in")


# case -> (stage, error type, what the one-line message says after "<input path>: ")
FAILED = {
    "zero_byte": ("read", "VolumeReadError", r"file is empty \(0 bytes\)"),
    "truncated": ("read", "VolumeReadError", r"voxel data are truncated or corrupt \(Compressed file ended"),
    "huge_header": (
        "read",
        "VolumeReadError",
        rf"image of shape \(10000, 10000, 10000\) has 1000000000000 voxels, more than max_voxels={DEFAULT_MAX_VOXELS}",
    ),
    "wrong_magic": ("read", "VolumeReadError", r"not a readable NIfTI file \(Cannot work out file type"),
    "five_d": ("read", "UnsupportedImageError", r"image of shape \(8, 8, 3, 2, 2\) has more than one non-singleton"),
    "zero_sform": ("read", "GeometryError", r"singular voxel-to-world affine \(voxel sizes \[0.0, 0.0, 0.0\]"),
    "huge_spacing": (
        "preprocess",
        "VolumeReadError",
        r"resampled from 1e\+06x1e\+06x1e\+06 mm voxels, the network grid of shape \(4, 32000000, 32000000\) has",
    ),
    "complex": ("read", "UnsupportedImageError", r"complex voxels \(complex64\) are not supported"),
    "rgb": ("read", "UnsupportedImageError", r"voxel type .* \(RGB / vector / non-numeric\) is not supported"),
    "rgb_nrrd": ("read", "UnsupportedImageError", r"3-component \(vector / RGB\) voxels are not supported"),
    "two_series": ("read", "VolumeReadError", r"holds 2 DICOM series \(1\.2\.826\.0\.1\.3680043\.2\.1125\.1\.1, "),
    "undecodable__bad": ("read", "VolumeReadError", r"not a readable NIfTI file"),
    "no_permission": ("read", "VolumeReadError", r"cannot open for reading \(Permission denied\)"),
    "diskfull": ("write", "VolumeWriteError", r"cannot write \(No space left on device\)"),
    "reportfull": ("write", "VolumeWriteError", r"cannot write the report \(No space left on device\)"),
}
# where the message's file is not the input: the output that could not be written
MESSAGE_FILE = {"diskfull": "diskfull_conf.nii.gz", "reportfull": "reportfull.json"}
OK = [
    "good_a",
    "good_b",
    "flat_2d",
    "nan_inf",
    "constant",
    "no_affine",
    "q_ne_s",
    "pixdim_mismatch",
    "tiny_spacing",
    "undecodable__good",
]
ROOT = os.geteuid() == 0
ROOT_SKIP = "running as root, which reads files whatever their permissions (chmod 000 is no obstacle)"


def test_the_batch_goes_on_exit_1_one_line_per_failure(batch: Run) -> None:
    assert batch.code == 1, batch.stderr
    assert "Traceback" not in batch.stdout + batch.stderr
    failed = [line for line in batch.stderr.splitlines() if " FAILED " in line]
    expected = set(FAILED) - ({"no_permission"} if ROOT else set())
    assert sorted(line.split(" FAILED ", 1)[1].split(" ", 1)[0] for line in failed) == sorted(expected)
    assert set(batch.failures()) == expected
    summary = batch.summary()
    assert {c for c, row in summary.items() if row["status"] == "ok"} == set(OK)
    assert {c for c, row in summary.items() if row["status"] == "failed"} == expected


@pytest.mark.parametrize("case", sorted(FAILED))
def test_failure_names_the_file_and_the_problem(batch: Run, case: str) -> None:
    if case == "no_permission" and ROOT:
        pytest.skip(ROOT_SKIP)
    stage, error_type, problem = FAILED[case]
    record = batch.failures()[case]
    assert (record["stage"], record["error_type"]) == (stage, error_type)
    where = display_path(batch.out / MESSAGE_FILE[case] if case in MESSAGE_FILE else batch.inputs[case])
    assert record["input"] == display_path(batch.inputs[case])
    message = record["message"]
    assert "\n" not in message and message.startswith(f"{where}: "), message
    assert re.match(problem, message[len(where) + 2 :]), message
    (line,) = [ln for ln in batch.stderr.splitlines() if f" FAILED {case} " in ln]
    assert line.endswith(f"FAILED {case} ({stage}): {message}")
    # nothing of a failed case in OUT_DIR: no image, no report, no part or temporary file
    assert [p.name for p in batch.out.iterdir() if p.name.startswith((f"{case}_", f"{case}.", f".{case}"))] == []


def test_no_partial_or_temporary_files(batch: Run) -> None:
    names = sorted(p.name for p in batch.out.iterdir())
    expected = sorted(
        ["failures.jsonl", "summary.csv", *(f"{c}{s}" for c in OK for s in ("_seg.nii.gz", "_conf.nii.gz", ".json"))]
    )
    assert names == expected


@pytest.mark.parametrize("case", OK)
def test_documented_handling_keeps_the_input_geometry(batch: Run, case: str) -> None:
    source = nib.load(batch.inputs[case])
    seg = nib.load(batch.out / f"{case}_seg.nii.gz")
    conf = nib.load(batch.out / f"{case}_conf.nii.gz")
    report = json.loads((batch.out / f"{case}.json").read_text())
    # a 2D image is one slice: (48, 48) -> (48, 48, 1); everything else keeps its shape
    shape = (*source.shape, 1) if len(source.shape) == 2 else source.shape
    assert seg.shape == conf.shape == shape == tuple(report["shape"])
    for out in (seg, conf):
        np.testing.assert_array_equal(out.affine, source.affine)
        for field in ("qform_code", "sform_code", "pixdim", "srow_x", "quatern_b"):
            np.testing.assert_array_equal(np.atleast_1d(out.header[field])[:4], np.atleast_1d(source.header[field])[:4])
    confidence = np.asanyarray(conf.dataobj)
    assert bool(np.isfinite(confidence).all())  # NaN / Inf voxels included
    assert float(confidence.min()) >= 0.0 and float(confidence.max()) <= 1.0 + 1e-6  # uint8 * (1/255) in float32
    np.testing.assert_allclose(report["affine"], source.affine, rtol=1e-6)


def test_documented_geometry_choices(batch: Run) -> None:
    """Which affine wins where the header is ambiguous: nibabel's rules (sform, else qform, else pixdim)."""
    report = {c: json.loads((batch.out / f"{c}.json").read_text()) for c in ("no_affine", "q_ne_s", "pixdim_mismatch")}
    np.testing.assert_allclose(report["q_ne_s"]["affine"][0][3], -40.0)  # the sform's origin, not the qform's 0
    np.testing.assert_allclose(np.diag(report["pixdim_mismatch"]["affine"])[:3], [1.5, 1.5, 8.0])  # not pixdim 0.3
    no_affine = np.asarray(report["no_affine"]["affine"])  # codes 0: pixdim scaling, centred, no rotation
    np.testing.assert_allclose(np.abs(np.diag(no_affine)[:3]), nib.load(batch.inputs["no_affine"]).header.get_zooms())
    assert json.loads((batch.out / "tiny_spacing.json").read_text())["spacing"] == pytest.approx([1e-6] * 3)
    undecodable = json.loads((batch.out / "undecodable__good.json").read_text())["input"]
    assert undecodable.endswith("undecodable\\xff_good.nii.gz")  # the byte as an escape, as in failures.jsonl


# ---------------------------------------------------------------------------------------------- output folder


def test_an_output_folder_that_cannot_be_written_is_a_usage_error(tmp_path: Path, checkpoint: Path) -> None:
    scan = _save(tmp_path / "scan.nii.gz", *_phantom(2))
    blocker = tmp_path / "a_file"  # a regular file as the parent: fails even for root, unlike chmod
    blocker.write_text("")
    run = segment({"scan": scan}, blocker / "out", checkpoint, scan)
    assert run.code == 2, run.stderr
    (line,) = run.stderr.splitlines()[-1:]
    assert line == f"error: {blocker / 'out'}: cannot write the output folder (Not a directory); choose another --out"
    assert "Traceback" not in run.stdout + run.stderr
    assert blocker.read_text() == ""


def test_a_disk_that_fills_up_fails_every_case_and_leaves_nothing_partial(tmp_path: Path, checkpoint: Path) -> None:
    (tmp_path / "in").mkdir()
    scans = {f"ph{i}": _save(tmp_path / "in" / f"ph{i}.nii.gz", *_phantom(30 + i)) for i in range(2)}
    out = tmp_path / "out"
    with pytest.MonkeyPatch.context() as mp:
        full_disk(mp, lambda path: path.startswith(str(out)))  # every write into OUT_DIR, once the run has begun
        run = segment(scans, out, checkpoint, tmp_path / "in")
    assert run.code == 2, run.stderr
    assert "Traceback" not in run.stdout + run.stderr
    for case in scans:
        (line,) = [ln for ln in run.stderr.splitlines() if f" FAILED {case} " in ln]
        assert line.endswith(f"FAILED {case} (write): {out / case}_seg.nii.gz: cannot write (No space left on device)")
    assert run.stderr.splitlines()[-1] == (
        f"error: {out}: cannot write failures.jsonl (No space left on device); summary.csv (No space left on device); "
        "the cases reported ok are complete, re-run to redo the others"
    )
    # failures.jsonl is append-only: what the full disk took of its lines stays, as malformed lines readers skip
    assert sorted(p.name for p in out.iterdir()) == ["failures.jsonl"]
    assert outputs.read_failures(out / "failures.jsonl") == {}

    # space again: the re-run completes the batch, and a new failure is a line of its own after the torn ones
    bad = tmp_path / "in" / "bad.nii.gz"
    bad.write_bytes(b"\x1f\x8b\x08\x00 not gzip")
    run = segment(scans, out, checkpoint, tmp_path / "in")
    assert run.code == 1, run.stderr
    assert {c: r["status"] for c, r in run.summary().items()} == {"bad": "failed", "ph0": "ok", "ph1": "ok"}
    assert list(outputs.read_failures(out / "failures.jsonl")) == ["bad"]


# ---------------------------------------------------------------------------------------------- memory guard


def test_memory_guard_refuses_before_decoding_in_every_format(tmp_path: Path, checkpoint: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    data, affine = _phantom(3)  # 48 x 48 x 4 = 9216 voxels
    inputs = {"nii": _save(folder / "nii.nii.gz", data, affine)}
    image = sitk.GetImageFromArray(np.ascontiguousarray(data.transpose(2, 1, 0)))
    image.SetSpacing((1.5, 1.5, 8.0))
    for name in ("nrrd", "mha"):
        inputs[name] = folder / f"{name}.{name}"
        sitk.WriteImage(image, str(inputs[name]))
    # voxel data cut short: refusing this file for its size shows that no voxel was decoded
    inputs["mha"].write_bytes(inputs["mha"].read_bytes()[:-1000])
    inputs["dicom"] = folder / "dicom"
    _write_dicom_series(inputs["dicom"], (data * 100).astype(np.int16), "1.2.826.0.1.3680043.2.1125.2.1")
    # within the budget as read, but not on the model's 1.5 mm grid: 24 x 24 at 3 mm -> (4, 48, 48) network voxels
    inputs["coarse"] = _save(folder / "coarse.nii.gz", data[:24, :24], np.diag([3.0, 3.0, 8.0, 1.0]))
    inputs["small"] = _save(folder / "small.nii.gz", data[:40, :40], affine)  # 6400 voxels, network grid (4, 40, 40)

    run = segment(inputs, tmp_path / "out", checkpoint, folder, "--max-voxels", "9000")
    assert run.code == 1, run.stderr
    failures = run.failures()
    assert sorted(failures) == ["coarse", "dicom", "mha", "nii", "nrrd"]
    for case in ("nii", "nrrd", "mha", "dicom"):
        assert failures[case]["stage"] == "read"
        assert failures[case]["message"] == (
            f"{inputs[case]}: image of shape (48, 48, 4) has 9216 voxels, more than max_voxels=9000 "
            "(confkd segment --max-voxels)"
        )
    assert failures["coarse"]["stage"] == "preprocess"
    assert failures["coarse"]["message"] == (
        f"{inputs['coarse']}: resampled from 3x3x8 mm voxels, the network grid of shape (4, 48, 48) has 9216 voxels, "
        "more than max_voxels=9000 (confkd segment --max-voxels)"
    )
    assert run.summary()["small"]["status"] == "ok"


def test_max_voxels_option(tmp_path: Path, checkpoint: Path) -> None:
    assert inspect.signature(segment_commands.segment).parameters["max_voxels"].default == DEFAULT_MAX_VOXELS
    scan = _save(tmp_path / "scan.nii.gz", *_phantom(4))
    run = segment({"scan": scan}, tmp_path / "out", checkpoint, scan, "--max-voxels", "0")  # 0: no limit
    assert run.code == 0, run.stderr
    run = segment({"scan": scan}, tmp_path / "out2", checkpoint, scan, "--max-voxels", "-1")
    assert run.code == 2 and "--max-voxels" in run.stderr and not (tmp_path / "out2").exists()
