"""INPUTS resolution for ``confkd segment``: case names, output suffixes, folders, globs, DICOM, collisions, shards."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk  # noqa: N813

from confkd.inference.inputs import (
    MAX_CASE_BYTES,
    CaseInput,
    InputError,
    case_name,
    display_path,
    output_suffix,
    parse_shard,
    resolve_inputs,
    sanitize_case_name,
    select_shard,
    shard_of,
)


def touch(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def write_dicom_series(folder: Path, *, suffix: str = ".dcm") -> Path:
    """A 3-slice DICOM series written by SimpleITK (the tags ImageSeriesReader sorts on)."""
    folder.mkdir(parents=True, exist_ok=True)
    image = sitk.GetImageFromArray(np.arange(3 * 4 * 5, dtype=np.int16).reshape(3, 4, 5))
    image.SetSpacing((0.8, 0.8, 5.0))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(3):
        s = image[:, :, k]
        for tag, value in {
            "0008|0060": "MR",
            "0020|000d": "1.2.826.0.1.3680043.2.1125.9",
            "0020|000e": "1.2.826.0.1.3680043.2.1125.9.1",
            "0020|0037": "1\\0\\0\\0\\1\\0",
            "0008|0018": f"1.2.826.0.1.3680043.2.1125.9.1.{k + 1}",
            "0020|0013": str(k + 1),
            "0020|0032": f"0\\0\\{5.0 * k}",
        }.items():
            s.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"IM{k:04d}.dcm"))
        writer.Execute(s)
        (folder / f"IM{k:04d}.dcm").rename(folder / f"IM{k:04d}{suffix}")  # scanner exports often have none
    return folder


# ------------------------------------------------------------------------------------------------ names


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("patient001_frame01_0000.nii.gz", "patient001_frame01"),
        ("case_0001.nii.gz", "case_0001"),  # only the first channel's suffix is dropped
        ("scan.NII.GZ", "scan"),
        ("scan.nii", "scan"),
        ("ct_0000.nrrd", "ct"),
        ("ct.nhdr", "ct"),
        ("a.b.mha", "a.b"),
        ("_0000.nii.gz", "_0000"),  # nothing would be left
    ],
)
def test_case_names(name: str, expected: str) -> None:
    assert case_name(Path("/data") / name, is_dicom=False) == expected


def test_dicom_case_names_come_from_the_folder(tmp_path: Path) -> None:
    series = write_dicom_series(tmp_path / "series_A")
    assert case_name(series) == "series_A"
    assert case_name(series / "IM0000.dcm") == "series_A"


@pytest.mark.parametrize(
    ("suffix", "expected"),
    [
        (".nii.gz", ".nii.gz"),
        (".nii", ".nii"),
        (".nrrd", ".nrrd"),
        (".mha", ".mha"),
        (".nhdr", ".nrrd"),  # detached headers cannot be renamed atomically as one file
        (".mhd", ".mha"),
        (".NII.GZ", ".nii.gz"),
    ],
)
def test_output_suffix(suffix: str, expected: str) -> None:
    assert output_suffix(f"x{suffix}") == expected


def test_output_suffix_of_dicom_and_unknown() -> None:
    assert output_suffix("folder", is_dicom=True) == ".nii.gz"
    with pytest.raises(InputError, match=r"scan\.png: unknown image format '\.png'"):
        output_suffix("scan.png")


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("../../etc/passwd", "___.._etc_passwd"),  # leading dots and separators become _
        ("..", "case"),  # trailing dots go first (Windows drops them), nothing is left
        (".hidden", "_hidden"),
        ("a\\b:c*d?e", "a_b_c_d_e"),
        ("tab\there\nnew", "tab_here_new"),
        ("caf\udce9", "caf_"),  # an undecodable byte of a non-UTF-8 file name
        ("trailing. ", "trailing"),
        ("CON", "CON_"),
        ("", "case"),
        ("patiënt 7", "patiënt 7"),  # ordinary non-ASCII text is kept
    ],
)
def test_sanitize_case_name(raw: str, expected: str) -> None:
    assert sanitize_case_name(raw) == expected


def test_long_names_are_cut_and_stay_unique() -> None:
    a, b = sanitize_case_name("x" * 300 + "a"), sanitize_case_name("x" * 300 + "b")
    assert a != b
    assert len(a.encode()) <= MAX_CASE_BYTES and len(b.encode()) <= MAX_CASE_BYTES
    multibyte = sanitize_case_name("é" * 300)
    assert len(multibyte.encode()) <= MAX_CASE_BYTES
    multibyte.encode("utf-8")  # never cut inside a character


def test_sanitised_outputs_stay_inside_out_dir(tmp_path: Path) -> None:
    for raw in ("../../escape", "/abs/path", "..", "a/../../b", "\\\\server\\share"):
        name = sanitize_case_name(raw)
        target = (tmp_path / f"{name}_seg.nii.gz").resolve()
        assert target.parent == tmp_path.resolve()
        assert not name.startswith(".")


# ------------------------------------------------------------------------------------------------ resolution


def test_files_folders_and_globs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    scans = tmp_path / "scans"
    for name in ("a_0000.nii.gz", "b.nrrd", "c.mha", "notes.txt", ".hidden.nii.gz", "d.json"):
        touch(scans / name)
    touch(scans / "nested" / "deep.nii.gz")  # folders are not searched recursively
    write_dicom_series(scans / "series1")
    solo = touch(tmp_path / "solo.nii")

    resolved = resolve_inputs([scans, solo])
    assert [c.case for c in resolved.cases] == ["a", "b", "c", "series1", "solo"]
    assert resolved.problems == () and resolved.unmatched == ()
    by_case = {c.case: c for c in resolved.cases}
    assert by_case["series1"] == CaseInput("series1", scans / "series1", ".nii.gz", is_dicom=True)
    assert by_case["b"].suffix == ".nrrd" and by_case["solo"].suffix == ".nii"

    # a quoted glob (as on Windows) is expanded by us; ** recurses; hidden files stay out
    monkeypatch.chdir(tmp_path)
    globbed = resolve_inputs(["scans/*.nii.gz", "scans/**/deep*.nii.gz", "nothing/*.nii"])
    assert [c.case for c in globbed.cases] == ["a", "deep"]
    assert globbed.unmatched == ("nothing/*.nii",)


def test_the_same_file_twice_is_one_case(tmp_path: Path) -> None:
    f = touch(tmp_path / "x_0000.nii.gz")
    resolved = resolve_inputs([f, tmp_path, str(tmp_path / "*.nii.gz"), tmp_path / "." / "x_0000.nii.gz"])
    assert [c.case for c in resolved.cases] == ["x"] and resolved.problems == ()


def test_dicom_folder_given_directly_or_by_its_files(tmp_path: Path) -> None:
    series = write_dicom_series(tmp_path / "s")
    for given in ([series], [str(series / "*.dcm")], [series / "IM0001.dcm"]):
        resolved = resolve_inputs(given)
        assert [(c.case, c.path, c.is_dicom) for c in resolved.cases] == [("s", series, True)], given


def test_extension_less_dicom_is_found_by_gdcm(tmp_path: Path) -> None:
    series = write_dicom_series(tmp_path / "export" / "SER001", suffix="")
    assert sorted(p.name for p in series.iterdir())[0] == "IM0000"
    resolved = resolve_inputs([tmp_path / "export"])
    assert [(c.case, c.is_dicom) for c in resolved.cases] == [("SER001", True)]


def test_missing_paths_and_unknown_suffixes_become_failed_cases(tmp_path: Path) -> None:
    good = touch(tmp_path / "good.nii.gz")
    png = touch(tmp_path / "photo.png")
    resolved = resolve_inputs([good, tmp_path / "missing_0000.nii.gz", png])
    assert [c.case for c in resolved.cases] == ["good"]
    problems = {p.case: p for p in resolved.problems}
    assert set(problems) == {"missing", "photo"}
    assert problems["missing"].message.endswith("missing_0000.nii.gz: no such file or directory")
    assert "unknown image format '.png'" in problems["photo"].message


def test_collisions_are_refused_for_both_inputs(tmp_path: Path) -> None:
    a = touch(tmp_path / "site1" / "case7_0000.nii.gz")
    b = touch(tmp_path / "site2" / "case7.nrrd")
    c = touch(tmp_path / "site2" / "CASE8.nii")
    d = touch(tmp_path / "site3" / "case8.mha")  # equal ignoring case: would collide on macOS / Windows
    e = touch(tmp_path / "site3" / "other.mha")
    resolved = resolve_inputs([a, b, c, d, e])
    assert [x.case for x in resolved.cases] == ["other"]
    assert {(p.case, p.error_type) for p in resolved.problems} == {
        ("case7", "CaseNameCollision"),
        ("CASE8", "CaseNameCollision"),
        ("case8", "CaseNameCollision"),
    }
    messages = {p.path: p.message for p in resolved.problems}
    assert str(b) in messages[a] and str(a) in messages[b]  # each names the other
    assert "rename one input" in messages[a]


def test_non_utf8_file_names(tmp_path: Path) -> None:
    raw = os.fsencode(tmp_path) + b"/caf\xe9_0000.nii.gz"
    try:
        with open(raw, "wb") as f:
            f.write(b"x")
    except OSError:
        pytest.skip("this file system refuses non-UTF-8 names")
    resolved = resolve_inputs([tmp_path])
    (case,) = resolved.cases
    assert case.case == "caf_"
    shown = display_path(case.path)
    shown.encode("utf-8")  # printable and JSON/CSV-safe
    assert shown.endswith("caf\\xe9_0000.nii.gz")


def test_output_folder_contents_are_not_inputs(tmp_path: Path) -> None:
    touch(tmp_path / "scan_0000.nii.gz")
    touch(tmp_path / "scan_seg.nii.gz")
    resolved = resolve_inputs([tmp_path], exclude=tmp_path)
    assert resolved.cases == ()
    (other := tmp_path / "out").mkdir()
    assert [c.case for c in resolve_inputs([tmp_path], exclude=other).cases] == ["scan", "scan_seg"]


# ------------------------------------------------------------------------------------------------ shards


@pytest.mark.parametrize(("text", "expected"), [("0/1", (0, 1)), ("2/3", (2, 3)), (" 1 / 4 ", (1, 4))])
def test_parse_shard(text: str, expected: tuple[int, int]) -> None:
    assert parse_shard(text) == expected


@pytest.mark.parametrize("text", ["3/3", "-1/2", "1/0", "a/b", "1", "1/2/3", ""])
def test_bad_shards_name_the_value(text: str) -> None:
    with pytest.raises(InputError, match="--shard"):
        parse_shard(text)


def test_shard_is_sha256_of_the_case_name() -> None:
    for name in ("patient001", "caf_", "x" * 50):
        assert shard_of(name, 7) == int(hashlib.sha256(name.encode()).hexdigest(), 16) % 7


def _cases(names: list[str]) -> list[CaseInput]:
    return [CaseInput(n, Path(f"/in/{n}.nii.gz"), ".nii.gz") for n in names]


def test_shards_cover_the_batch_exactly_once_and_are_stable() -> None:
    names = [f"patient{i:03d}" for i in range(10)]
    cases = _cases(names)
    shards = [select_shard(cases, i, 3) for i in range(3)]
    seen = [c.case for shard in shards for c in shard]
    assert sorted(seen) == names and len(seen) == len(set(seen))  # union is the input set, no overlap
    assert all(shards), "10 names over 3 shards: each shard gets some (a fixed, known split)"
    # adding inputs never moves an existing case to another shard
    more = _cases(names + [f"new{i}" for i in range(20)])
    for i, shard in enumerate(shards):
        assert {c.case for c in shard} <= {c.case for c in select_shard(more, i, 3)}


def test_resolved_inputs_shard_problems_too(tmp_path: Path) -> None:
    files = [touch(tmp_path / f"c{i}.nii.gz") for i in range(8)]
    resolved = resolve_inputs([*files, tmp_path / "gone.nii.gz"])
    parts = [resolved.shard(i, 2) for i in range(2)]
    assert sorted(c.case for p in parts for c in p.cases) == [c.case for c in resolved.cases]
    assert sum(len(p.problems) for p in parts) == 1
    assert parts[shard_of("gone", 2)].problems[0].case == "gone"
    with pytest.raises(InputError):
        resolved.shard(2, 2)
