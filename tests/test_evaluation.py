"""Folder evaluation: matching by case name, geometry checks, class names, CSV outputs, and real ACDC labels."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from confkd.data.volume import read_volume
from confkd.errors import ConfigError, DatasetError
from confkd.evaluation import evaluate_folder
from confkd.metrics import evaluate_case, summarize

SPACING = (1.5, 1.25, 5.0)
AFFINE = np.diag([*SPACING, 1.0])
AFFINE[:3, 3] = (-20.0, 10.0, 3.0)
SHAPE = (20, 18, 6)


def save(path: Path, array: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    nib.save(nib.Nifti1Image(np.asarray(array), affine), path)
    return path


def label_map(seed: int, shape=SHAPE) -> np.ndarray:
    """Two boxy classes at random places (class 2 sometimes overwrites part of class 1)."""
    rng = np.random.default_rng(seed)
    out = np.zeros(shape, dtype=np.uint8)
    for c in (1, 2):
        lo = rng.integers(0, np.array(shape) // 2)
        hi = lo + rng.integers(2, np.array(shape) // 2 + 1)
        out[tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))] = c
    return out


def same(text: str, value: float) -> bool:
    """A CSV cell holds exactly ``value`` (NaN as "nan")."""
    number = float(text)
    return (math.isnan(number) and math.isnan(value)) or number == value


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


@pytest.fixture
def folders(tmp_path: Path) -> dict[str, Path]:
    """labels/ with caseA..caseE, preds/ exercising every matching rule, and a dataset.json naming the classes."""
    gt_dir, pred_dir = tmp_path / "labels", tmp_path / "preds"
    gt_dir.mkdir()
    pred_dir.mkdir()
    for i, case in enumerate(["caseA", "caseB", "caseC", "caseD", "caseE"]):
        save(gt_dir / f"{case}.nii.gz", label_map(i))
    save(pred_dir / "caseA_seg.nii.gz", label_map(10))  # "_seg" naming
    save(pred_dir / "caseB.nii", label_map(11))  # plain naming, another extension
    # caseC has no prediction
    save(pred_dir / "caseD_seg.nii.gz", label_map(13, shape=(20, 18, 7)))  # wrong shape
    shifted = AFFINE.copy()
    shifted[0, 3] += 0.5
    save(pred_dir / "caseE_seg.nii.gz", label_map(14), affine=shifted)  # half a millimetre off
    save(pred_dir / "caseA_conf.nii.gz", np.full(SHAPE, 0.5, dtype=np.float32))  # a confidence map: ignored
    save(pred_dir / "stranger_seg.nii.gz", label_map(15))  # no ground truth: extra
    (pred_dir / "report.json").write_text("{}")  # a report: ignored
    dataset_json = tmp_path / "dataset.json"
    dataset_json.write_text(json.dumps({"labels": {"background": 0, "RV": 1, "MYO": 2, "ignore": 3}}))
    return {"gt": gt_dir, "pred": pred_dir, "dataset_json": dataset_json, "out": tmp_path / "out"}


def test_matching_missing_extra_and_error_rows(folders: dict[str, Path]) -> None:
    result = evaluate_folder(folders["pred"], folders["gt"], dataset_json=folders["dataset_json"])
    assert [r.case for r in result.rows] == ["caseA", "caseB", "caseC", "caseD", "caseE"]
    assert [r.case for r in result.scored] == ["caseA", "caseB"]
    assert result.rows[0].pred_path == folders["pred"] / "caseA_seg.nii.gz"
    assert result.rows[1].pred_path == folders["pred"] / "caseB.nii"
    assert result.missing == ("caseC",)
    assert result.extra == (folders["pred"] / "stranger_seg.nii.gz",)
    errors = {r.case: r.error or "" for r in result.errors}
    assert set(errors) == {"caseD", "caseE"}
    for case, error in errors.items():
        assert "\n" not in error
        assert f"{case}_seg.nii.gz" in error and f"{case}.nii.gz" in error  # names both files
    assert "(20, 18, 7)" in errors["caseD"] and "(20, 18, 6)" in errors["caseD"]
    assert "0.5 mm" in errors["caseE"]


def test_metrics_are_those_of_evaluate_case_with_the_ground_truth_spacing(folders: dict[str, Path]) -> None:
    result = evaluate_folder(folders["pred"], folders["gt"], dataset_json=folders["dataset_json"])
    assert result.classes == {1: "RV", 2: "MYO"}
    for row, pred_seed, gt_seed in [(result.rows[0], 10, 0), (result.rows[1], 11, 1)]:
        assert row.metrics == evaluate_case(label_map(pred_seed), label_map(gt_seed), [1, 2], SPACING)
    assert result.summary == summarize([r.metrics for r in result.scored if r.metrics], [1, 2])


def test_csv_outputs_parse_back_to_the_metrics(folders: dict[str, Path]) -> None:
    result = evaluate_folder(
        folders["pred"], folders["gt"], dataset_json=folders["dataset_json"], out_dir=folders["out"]
    )
    assert sorted(p.name for p in folders["out"].iterdir()) == ["per_case.csv", "summary.csv"]  # no temporaries

    columns, rows = read_csv(folders["out"] / "per_case.csv")
    assert columns == ["case", "RV_dice", "MYO_dice", "RV_hd95", "MYO_hd95", "mean_dice", "mean_hd95", "error"]
    assert [r["case"] for r in rows] == ["caseA", "caseB", "caseC", "caseD", "caseE"]
    for row, scored in zip(rows[:2], result.rows[:2], strict=True):
        assert scored.metrics is not None
        for c, name in [(1, "RV"), (2, "MYO")]:
            assert same(row[f"{name}_dice"], scored.metrics.dice[c])
            assert same(row[f"{name}_hd95"], scored.metrics.hd95[c])
        assert same(row["mean_dice"], scored.metrics.mean_dice)
        assert same(row["mean_hd95"], scored.metrics.mean_hd95)
        assert row["error"] == ""
    assert rows[2]["error"] == "no prediction" and rows[2]["RV_dice"] == ""
    assert "caseD_seg.nii.gz" in rows[3]["error"] and rows[3]["MYO_hd95"] == ""

    columns, summary_rows = read_csv(folders["out"] / "summary.csv")
    assert columns == ["metric", "class", "mean", "std", "n", "n_nan"]
    assert [(r["metric"], r["class"]) for r in summary_rows] == [
        ("dice", "RV"),
        ("dice", "MYO"),
        ("dice", "mean"),
        ("hd95", "RV"),
        ("hd95", "MYO"),
        ("hd95", "mean"),
    ]
    for r in summary_rows:
        keys: dict[str, int | str] = {"RV": 1, "MYO": 2, "mean": "mean"}
        key = keys[r["class"]]
        stat = result.summary[r["metric"]][key]
        assert same(r["mean"], stat.mean)
        assert same(r["std"], stat.std)
        assert int(r["n"]) == stat.n and int(r["n_nan"]) == stat.n_nan


def test_a_perfect_prediction_scores_one_and_zero(tmp_path: Path) -> None:
    (tmp_path / "gt").mkdir()
    (tmp_path / "pred").mkdir()
    save(tmp_path / "gt" / "x.nii.gz", label_map(3))
    save(tmp_path / "pred" / "x_seg.nii.gz", label_map(3))
    result = evaluate_folder(tmp_path / "pred", tmp_path / "gt", labels={"background": 0, "a": 1, "b": 2})
    assert result.classes == {1: "a", 2: "b"}
    assert result.summary["dice"]["mean"].mean == 1.0
    assert result.summary["hd95"]["mean"].mean == 0.0


def test_class_names_default_to_the_values_found_in_the_ground_truths(tmp_path: Path) -> None:
    (tmp_path / "gt").mkdir()
    (tmp_path / "pred").mkdir()
    only_one = np.zeros(SHAPE, dtype=np.uint8)
    only_one[2:6, 2:6, 1:3] = 1
    with_four = only_one.copy()
    with_four[10:14, 10:14, 2:4] = 4
    save(tmp_path / "gt" / "a.nii.gz", only_one)
    save(tmp_path / "gt" / "b.nii.gz", with_four)
    stray = only_one.copy()
    stray[0, 0, 0] = 9  # a value that no ground truth holds is no class
    save(tmp_path / "pred" / "a.nii.gz", stray)
    save(tmp_path / "pred" / "b.nii.gz", only_one)
    result = evaluate_folder(tmp_path / "pred", tmp_path / "gt", out_dir=tmp_path / "out")
    assert result.classes == {1: "1", 4: "4"}
    a, b = (r.metrics for r in result.rows)
    assert a is not None and b is not None
    assert (a.dice[4], a.hd95[4]) == (1.0, 0.0)  # absent from both maps of case a
    assert b.dice[4] == 0.0 and math.isnan(b.hd95[4])  # missed in case b
    assert result.summary["hd95"][4].n == 1 and result.summary["hd95"][4].n_nan == 1
    columns, _ = read_csv(tmp_path / "out" / "per_case.csv")
    assert columns[1:5] == ["1_dice", "4_dice", "1_hd95", "4_hd95"]


def test_an_affine_within_tolerance_is_accepted(tmp_path: Path) -> None:
    (tmp_path / "gt").mkdir()
    (tmp_path / "pred").mkdir()
    nudged = AFFINE.copy()
    nudged[:3, 3] += 2e-4
    save(tmp_path / "gt" / "x.nii.gz", label_map(1))
    save(tmp_path / "pred" / "x.nii.gz", label_map(1), affine=nudged)
    result = evaluate_folder(tmp_path / "pred", tmp_path / "gt", labels={"a": 1})
    assert [r.case for r in result.scored] == ["x"]


def test_two_predictions_for_one_case_are_an_error_row(tmp_path: Path) -> None:
    (tmp_path / "gt").mkdir()
    (tmp_path / "pred").mkdir()
    save(tmp_path / "gt" / "x.nii.gz", label_map(1))
    save(tmp_path / "gt" / "y.nii.gz", label_map(2))
    save(tmp_path / "pred" / "x.nii.gz", label_map(1))
    save(tmp_path / "pred" / "x_seg.nii.gz", label_map(1))
    save(tmp_path / "pred" / "y_seg.nii.gz", label_map(2))
    result = evaluate_folder(tmp_path / "pred", tmp_path / "gt", labels={"a": 1})
    assert [r.case for r in result.errors] == ["x"]
    assert "x.nii.gz" in (result.errors[0].error or "") and "x_seg.nii.gz" in (result.errors[0].error or "")
    assert [r.case for r in result.scored] == ["y"]


def test_serial_and_threaded_runs_agree(folders: dict[str, Path]) -> None:
    serial = evaluate_folder(folders["pred"], folders["gt"], labels={"RV": 1, "MYO": 2}, workers=1)
    threaded = evaluate_folder(folders["pred"], folders["gt"], labels={"RV": 1, "MYO": 2}, workers=4)
    assert serial.per_case_table() == threaded.per_case_table()


def test_bad_arguments(folders: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not both"):
        evaluate_folder(folders["pred"], folders["gt"], labels={"a": 1}, dataset_json=folders["dataset_json"])
    with pytest.raises(ConfigError, match="no foreground"):
        evaluate_folder(folders["pred"], folders["gt"], labels={"background": 0})
    with pytest.raises(DatasetError, match="not found"):
        evaluate_folder(tmp_path / "nowhere", folders["gt"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no ground-truth images"):
        evaluate_folder(folders["pred"], tmp_path / "empty")
    bad_json = tmp_path / "bad.json"
    bad_json.write_text(json.dumps({"labels": {"RV": 1}}))
    with pytest.raises(DatasetError, match="background"):
        evaluate_folder(folders["pred"], folders["gt"], dataset_json=bad_json)


# ---------------------------------------------------------------------------------------------- real data
ACDC_CASES = ["patient001_frame01", "patient002_frame12", "patient003_frame01", "patient004_frame15"]


@pytest.fixture
def acdc_labels(acdc_dir: Path, tmp_path: Path) -> Path:
    gt_dir = tmp_path / "labels"
    gt_dir.mkdir()
    for case in ACDC_CASES:
        (gt_dir / f"{case}.nii.gz").symlink_to(acdc_dir / "labelsTr" / f"{case}.nii.gz")
    return gt_dir


@pytest.mark.data
def test_acdc_labels_against_themselves(acdc_dir: Path, acdc_labels: Path) -> None:
    result = evaluate_folder(acdc_labels, acdc_labels, dataset_json=acdc_dir / "dataset.json")
    assert result.classes == {1: "RV", 2: "MYO", 3: "LV"}
    assert len(result.scored) == 4
    for row in result.scored:
        assert row.metrics is not None
        assert all(v == 1.0 for v in row.metrics.dice.values())
        assert all(v == 0.0 for v in row.metrics.hd95.values())


@pytest.mark.data
def test_acdc_labels_shifted_by_one_slice(acdc_dir: Path, acdc_labels: Path, tmp_path: Path) -> None:
    pred_dir = tmp_path / "preds"
    pred_dir.mkdir()
    for case in ACDC_CASES:
        img = nib.Nifti1Image.from_filename(acdc_labels / f"{case}.nii.gz")
        gt = np.asarray(img.dataobj)
        shifted = np.zeros_like(gt)
        shifted[..., 1:] = gt[..., :-1]  # one slice along k, same header
        nib.save(nib.Nifti1Image(shifted, img.affine, img.header), pred_dir / f"{case}_seg.nii.gz")
    result = evaluate_folder(pred_dir, acdc_labels, dataset_json=acdc_dir / "dataset.json")
    assert len(result.scored) == 4
    for row in result.scored:
        assert row.metrics is not None
        slice_spacing = read_volume(row.label_path).spacing[2]
        assert all(v < 1.0 for v in row.metrics.dice.values())
        assert any(v >= slice_spacing for v in row.metrics.hd95.values())
