"""OUT_DIR housekeeping: leftovers of a killed run (hidden part / temporary files) are removed once stale."""

from __future__ import annotations

import os
import time
from pathlib import Path

from confkd.inference.outputs import STALE_S, prepare_out_dir


def test_prepare_out_dir_removes_only_stale_temporary_files(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    old = time.time() - STALE_S - 10
    stale = [".case_seg.20261126T000000Z-1.part.nii.gz", ".case.json.abcd1234.tmp", ".x.part"]
    fresh = [".case_conf.20261126T000000Z-2.part.nii.gz"]  # may belong to another shard writing right now
    kept = ["case_seg.nii.gz", "case.json", ".hidden_user_file", "notes.part.txt"]
    for name in stale + fresh + kept:
        (out / name).write_bytes(b"x")
    for name in stale + kept:
        os.utime(out / name, (old, old))
    prepare_out_dir(out)
    assert sorted(p.name for p in out.iterdir()) == sorted(fresh + kept)
