from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from confkd.io_utils import atomic_path, atomic_write_text, split_image_suffix


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("case_0000.nii.gz", ("case_0000", ".nii.gz")),
        ("A.NII.GZ", ("A", ".NII.GZ")),
        ("scan.nrrd", ("scan", ".nrrd")),
        ("x.y.mha", ("x.y", ".mha")),
        ("report.json", ("report", ".json")),
        ("noext", ("noext", "")),
    ],
)
def test_split_image_suffix(name: str, expected: tuple[str, str]) -> None:
    assert split_image_suffix(name) == expected


def test_atomic_write_has_normal_permissions(tmp_path: Path) -> None:
    target = tmp_path / "out.txt"
    atomic_write_text(target, "x")
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask
    assert target.read_text() == "x"


def test_failed_write_leaves_nothing_and_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "seg.nii.gz"
    target.write_text("old")
    seen: list[Path] = []

    def interrupted_write() -> None:
        with atomic_path(target) as tmp:
            seen.append(tmp)
            tmp.write_text("half")
            raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        interrupted_write()
    assert seen[0].name.endswith(".nii.gz")  # writers dispatch on the suffix
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["seg.nii.gz"]
