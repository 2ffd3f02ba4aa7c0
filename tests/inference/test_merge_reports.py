"""``confkd merge-reports``: three ``--shard I/3`` runs merged give what one unsharded run gives.

Real segment runs (CLI, a small random-weight model) on phantoms: the batch is built so that the robust z-score
flags of the whole batch differ from those each shard computes alone (eight copies of one scan make the batch's
MAD zero, so the other scans fall below ``median - 0.02``), and it holds one corrupt file.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path
from typing import Any

import nibabel as nib
import pytest
from typer.testing import CliRunner

from confkd.cli.main import app
from confkd.config import config_from_dict
from confkd.data.phantoms import make_phantom
from confkd.inference.inputs import shard_of
from confkd.inference.merge import MergeError, merge_outputs
from confkd.training.checkpoint import save_untrained_checkpoint

runner = CliRunner()
SHARDS = 3
# columns that differ between any two runs
RUN_COLUMNS = ("seconds", "run_id")
Z_REASON = "unusually low for the batch"


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The unsharded run (``"single"``) and the three shard runs (``"0"``, ``"1"``, ``"2"``) of one batch."""
    root = tmp_path_factory.mktemp("merge")
    cfg = config_from_dict(
        {
            "model": {"width": 4, "depth": 2, "num_classes": 4},
            "preprocess": {"target_spacing": [1.5, 1.5], "pad_multiple": 8},
        }
    )
    model = save_untrained_checkpoint(cfg, root / "m.pt", label_names=("background", "RV", "MYO", "LV"), ignore_index=4)
    scans = root / "scans"
    scans.mkdir()
    base = make_phantom(529, size=(48, 48), slices=4)
    for i in range(8):
        nib.save(nib.Nifti1Image(base.image, base.affine), scans / f"same{i}_0000.nii.gz")
    for seed in range(520, 526):
        ph = make_phantom(seed, size=(48, 48), slices=4)
        nib.save(nib.Nifti1Image(ph.image, ph.affine), scans / f"ph{seed}_0000.nii.gz")
    (scans / "corrupt_0000.nii.gz").write_bytes(b"\x1f\x8b\x08\x00 this is not gzip")
    common = ["--model", str(model), "--device", "cpu", "--backend", "torch"]
    out = {"single": root / "single"}
    result = runner.invoke(app, ["segment", str(scans), "--out", str(out["single"]), *common])
    assert result.exit_code == 1, result.output  # the corrupt file
    for i in range(SHARDS):
        out[str(i)] = root / f"shard{i}"
        args = ["segment", str(scans), "--out", str(out[str(i)]), "--shard", f"{i}/{SHARDS}", *common]
        result = runner.invoke(app, args)
        assert result.exit_code in (0, 1), result.output
    return out


def shard_dirs(runs: dict[str, Path]) -> list[Path]:
    return [runs[str(i)] for i in range(SHARDS)]


def summary(path: Path) -> list[dict[str, str]]:
    with open(path / "summary.csv", newline="", encoding="utf-8") as f:
        return [{k: v for k, v in row.items() if k not in RUN_COLUMNS} for row in csv.DictReader(f)]


def failures(path: Path) -> list[dict[str, Any]]:
    records = [json.loads(line) for line in (path / "failures.jsonl").read_text().splitlines()]
    return sorted(({k: v for k, v in r.items() if k not in ("run_id", "time")} for r in records), key=str)


def merge(*args: str | Path) -> tuple[int, str]:
    result = runner.invoke(app, ["merge-reports", *map(str, args)])
    return result.exit_code, result.output


def snapshot(folders: list[Path]) -> dict[Path, bytes]:
    return {p: p.read_bytes() for folder in folders for p in sorted(folder.iterdir())}


def test_merged_shards_equal_one_unsharded_run(runs: dict[str, Path], tmp_path: Path) -> None:
    shards = shard_dirs(runs)
    before = snapshot(shards)
    code, output = merge(*shards, "--out", tmp_path / "merged", "--shards", SHARDS)
    assert code == 1, output  # merged, and the batch has a failed case
    assert "ok\t14" in output and "failed\t1" in output and "Traceback" not in output
    merged, single = summary(tmp_path / "merged"), summary(runs["single"])
    assert merged == single  # same columns, same rows in the same order, same values and flags
    assert [r["case"] for r in merged] == sorted(r["case"] for r in merged)
    assert {r["case"]: r["status"] for r in merged}["corrupt"] == "failed"
    assert failures(tmp_path / "merged") == failures(runs["single"])
    assert snapshot(shards) == before  # the shard folders were only read

    # the batch's flags are not the shards' own: a concatenation of the shard summaries would be wrong
    z_flagged = {r["case"] for r in merged if Z_REASON in r["flag_reasons"]}
    assert z_flagged and z_flagged <= {f"ph{s}" for s in range(520, 526)}, z_flagged
    by_shard = {r["case"]: r for folder in shards for r in summary(folder)}
    assert sorted(by_shard) == [r["case"] for r in merged]
    assert any(by_shard[r["case"]]["flag_reasons"] != r["flag_reasons"] for r in merged)

    # the images are the unsharded run's, byte for byte, and every case is in exactly one shard
    images = sorted(p.name for p in runs["single"].glob("*.nii.gz"))
    assert len(images) == 2 * 14
    owners = {name: [f for f in shards if (f / name).exists()] for name in images}
    assert all(len(found) == 1 for found in owners.values()), owners
    for name, (folder,) in owners.items():
        assert (folder / name).read_bytes() == (runs["single"] / name).read_bytes(), name


def test_update_reports_gives_the_batch_flags_to_the_shard_reports(runs: dict[str, Path], tmp_path: Path) -> None:
    shards = [shutil.copytree(folder, tmp_path / folder.name) for folder in shard_dirs(runs)]
    code, output = merge(*shards, "--out", tmp_path / "merged", "--update-reports")
    assert code == 1, output
    updated = int(next(line for line in output.splitlines() if line.startswith("reports updated")).split("\t")[1])
    assert updated > 0
    for single in sorted(runs["single"].glob("*.json")):
        expected = json.loads(single.read_text())
        (shard,) = [json.loads((f / single.name).read_text()) for f in shards if (f / single.name).exists()]
        assert (shard["flagged"], shard["flag_reasons"]) == (expected["flagged"], expected["flag_reasons"])
    # a second merge finds nothing left to update
    code, output = merge(*shards, "--out", tmp_path / "merged", "--update-reports")
    assert code == 1 and "reports updated\t0" in output, output


def test_refusals_are_one_line_errors(runs: dict[str, Path], tmp_path: Path) -> None:
    shards = shard_dirs(runs)
    out = tmp_path / "merged"
    # the unsharded folder holds every case: each shard's cases are duplicates
    code, output = merge(shards[0], runs["single"], "--out", out)
    assert code == 2 and "is in both" in output and str(runs["single"]) in " ".join(output.split()), output
    code, output = merge(shards[0], shards[0], "--out", out)
    assert code == 2 and "given twice" in output
    code, output = merge(*shards[:2], "--out", out, "--shards", SHARDS)
    assert code == 2 and "shard(s) 2/3" in output and "missing" in output, output
    code, output = merge(*shards, "--out", out, "--shards", 2)  # the wrong N: folders mix shards of 2
    assert code == 2 and "holds cases of shards 0/2, 1/2" in output, output
    code, output = merge(*shards, "--out", shards[1])
    assert code == 2 and "is one of the folders being merged" in output
    code, output = merge(*shards[1:], "--out", shards[0])
    assert code == 2 and "holds segment outputs" in output
    code, output = merge(tmp_path, "--out", out)
    assert code == 2 and "not a confkd segment output folder" in output
    assert not out.exists()


def test_shard_count_check_with_empty_shards(runs: dict[str, Path], tmp_path: Path) -> None:
    """With 20 shards some hold no case: their folders (a header-only summary.csv) still count, one per shard."""
    count = 20
    cases = sorted(p.stem for p in runs["single"].glob("*.json"))
    folders = [tmp_path / "shards" / str(i) for i in range(count)]
    for index, folder in enumerate(folders):
        folder.mkdir(parents=True)
        (folder / "summary.csv").write_text("case,status\n")
        for case in [c for c in cases if shard_of(c, count) == index]:
            for name in (f"{case}.json", f"{case}_seg.nii.gz", f"{case}_conf.nii.gz"):
                shutil.copy2(runs["single"] / name, folder / name)
        if shard_of("corrupt", count) == index:
            shutil.copy2(runs["single"] / "failures.jsonl", folder / "failures.jsonl")
    empty = [f for f in folders if len(list(f.iterdir())) == 1]
    assert empty  # 15 cases cannot fill 20 shards

    result = merge_outputs(folders, tmp_path / "m1", shards=count)
    assert (result.ok, result.failed) == (14, 1)
    assert summary(tmp_path / "m1") == summary(runs["single"])
    with pytest.raises(MergeError, match="19 folder\\(s\\) given, one per shard expected"):
        merge_outputs([f for f in folders if f != empty[0]], tmp_path / "m2", shards=count)
    full = next(f for f in folders if f not in empty)
    with pytest.raises(MergeError, match="missing: no folder holds their cases"):
        merge_outputs([f for f in folders if f != full], tmp_path / "m3", shards=count)
    with pytest.raises(MergeError, match="holds cases of shards"):
        merge_outputs([runs["single"]], tmp_path / "m4", shards=count)  # one folder with every shard
    assert merge_outputs([runs["single"]], tmp_path / "m5").ok == 14  # without --shards: nothing to check
