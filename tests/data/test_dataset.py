"""The nnU-Net v2 raw layout reader, on tiny fake datasets written with nibabel and on the real ones."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest

from confkd.data.dataset import NnUNetDataset, covers
from confkd.errors import DatasetError

LABELS = {"background": 0, "RV": 1, "MYO": 2, "LV": 3, "ignore": 4}


def _nii(path: Path, value: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.full((4, 4, 2), value, dtype=np.int16), np.eye(4)), str(path))


def make_dataset(
    root: Path,
    cases: Iterable[str] = ("p1_f01", "p1_f02", "p2_f01", "p2_f02", "p10_f01"),
    *,
    channels: int = 1,
    labels: Mapping[str, int] = LABELS,
    no_label: Iterable[str] = (),
    no_scribble: Iterable[str] = (),
    splits: Any = None,
    test_cases: Iterable[str] = (),
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """A fake nnU-Net v2 raw dataset with 4x4x2 NIfTI files."""
    meta = {"name": "Fake", "channel_names": {str(i): f"ch{i}" for i in range(channels)}, "labels": dict(labels)}
    meta.update(extra or {})
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset.json").write_text(json.dumps(meta))
    for case in cases:
        for c in range(channels):
            _nii(root / "imagesTr" / f"{case}_{c:04d}.nii.gz", value=c)
        if case not in no_label:
            _nii(root / "labelsTr" / f"{case}.nii.gz", value=1)
        if case not in no_scribble:
            _nii(root / "scribblesTr" / f"{case}.nii.gz", value=4)
    for case in test_cases:
        for c in range(channels):
            _nii(root / "imagesTs" / f"{case}_{c:04d}.nii.gz")
    if splits is not None:
        (root / "splits.json").write_text(json.dumps(splits))
    return root


# ---------------------------------------------------------------------- happy paths
def test_open_lists_cases_labels_scribbles_and_test_images(tmp_path: Path) -> None:
    root = make_dataset(
        tmp_path / "ds",
        splits={"train": ["p1", "p10"], "val": ["p2"]},
        no_scribble=["p2_f02"],
        no_label=["p10_f01"],
        test_cases=["p3_f01"],
    )
    ds = NnUNetDataset.open(root)
    assert [c.name for c in ds.cases] == ["p10_f01", "p1_f01", "p1_f02", "p2_f01", "p2_f02"]
    assert {c.name: c.patient for c in ds.cases} == {
        "p10_f01": "p10",
        "p1_f01": "p1",
        "p1_f02": "p1",
        "p2_f01": "p2",
        "p2_f02": "p2",
    }
    case = ds.case("p1_f01")
    assert case.image_paths == (root.resolve() / "imagesTr" / "p1_f01_0000.nii.gz",)
    assert case.label_path == root.resolve() / "labelsTr" / "p1_f01.nii.gz"
    assert case.scribble_path == root.resolve() / "scribblesTr" / "p1_f01.nii.gz"
    assert ds.case("p2_f02").scribble_path is None
    assert ds.case("p10_f01").label_path is None
    assert [c.name for c in ds.test_cases] == ["p3_f01"]
    assert ds.test_cases[0].label_path is None
    assert ds.label_names == ("background", "RV", "MYO", "LV")
    assert ds.num_classes == 4
    assert ds.ignore_index == 4
    assert ds.file_ending == ".nii.gz"
    assert ds.splits == {"train": ("p1", "p10"), "val": ("p2",)}
    assert [c.name for c in ds.cases_of_split("train")] == ["p10_f01", "p1_f01", "p1_f02"]
    assert ds.patients_of_split("val") == ("p2",)


def test_patient_rule_needs_an_underscore_boundary() -> None:
    assert covers("patient001", "patient001_frame01")
    assert covers("patient001_frame01", "patient001_frame01")
    assert not covers("patient00", "patient001_frame01")
    assert not covers("p1", "p10_f01")


def test_multi_channel_cases_have_all_channels_in_order(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "ds", cases=["a_1", "b_1"], channels=3, labels={"background": 0, "x": 1})
    ds = NnUNetDataset.open(root)
    assert [p.name for p in ds.case("a_1").image_paths] == ["a_1_0000.nii.gz", "a_1_0001.nii.gz", "a_1_0002.nii.gz"]
    assert ds.num_channels == 3
    assert ds.ignore_index is None
    assert ds.num_classes == 2
    assert ds.splits == {}
    assert ds.case("a_1").patient == "a_1"  # no splits: each case is its own patient


def test_fold_style_splits_select_a_fold(tmp_path: Path) -> None:
    folds = [
        {"train": ["p1_f01", "p1_f02", "p10_f01"], "val": ["p2_f01", "p2_f02"]},
        {"train": ["p2_f01", "p2_f02", "p10_f01"], "val": ["p1_f01", "p1_f02"]},
    ]
    root = make_dataset(tmp_path / "ds", splits=folds)
    ds0 = NnUNetDataset.open(root)
    ds1 = NnUNetDataset.open(root, fold=1)
    assert ds0.fold == 0
    assert ds1.fold == 1
    assert [c.name for c in ds1.cases_of_split("val")] == ["p1_f01", "p1_f02"]
    assert [c.name for c in ds0.cases_of_split("val")] == ["p2_f01", "p2_f02"]
    assert ds1.case("p1_f01").patient == "p1_f01"  # case-level folds: each case is its own patient
    with pytest.raises(DatasetError, match=r"splits\.json: holds 2 folds; choose fold 0\.\.1"):
        NnUNetDataset.open(root, fold=2)


def test_custom_file_ending(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    (root / "imagesTr").mkdir(parents=True)
    (root / "dataset.json").write_text(
        json.dumps({"channel_names": {"0": "CT"}, "labels": {"background": 0, "a": 1}, "file_ending": ".nrrd"})
    )
    (root / "imagesTr" / "c1_0000.nrrd").write_bytes(b"")
    (root / "imagesTr" / "c1_0000.nii.gz").write_bytes(b"")  # other endings are ignored
    ds = NnUNetDataset.open(root)
    assert [c.name for c in ds.cases] == ["c1"]
    assert ds.file_ending == ".nrrd"


# ---------------------------------------------------------------------- errors name the file and the fix
def test_missing_dataset_json(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"dataset\.json: dataset\.json not found") as info:
        NnUNetDataset.open(tmp_path)
    assert str(tmp_path) in str(info.value)


def test_invalid_json(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "ds")
    (root / "dataset.json").write_text('{"labels": {')
    with pytest.raises(DatasetError, match=r"ds/dataset\.json: not valid JSON \(line 1"):
        NnUNetDataset.open(root)


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        ({"RV": 1, "MYO": 2}, r'must include "background": 0'),
        ({"background": 1, "RV": 2}, r'must include "background": 0'),
        ({"background": 0, "RV": 1, "ignore": 1}, r'"ignore" label must be the highest.*set it to 2'),
        ({"background": 0, "RV": 2}, "consecutive"),
        ({"background": 0, "RV": [1, 2]}, "region-based labels are not"),
    ],
)
def test_bad_labels(tmp_path: Path, labels: dict, message: str) -> None:
    root = make_dataset(tmp_path / "ds", labels=labels)
    with pytest.raises(DatasetError, match=message) as info:
        NnUNetDataset.open(root)
    assert str(root / "dataset.json") in str(info.value)


def test_missing_images_tr(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    root.mkdir()
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "MRI"}, "labels": {"background": 0}}))
    with pytest.raises(DatasetError, match=r"ds/imagesTr: missing; put the training images there as CASE_0000"):
        NnUNetDataset.open(root)


def test_label_file_without_image(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "ds")
    _nii(root / "labelsTr" / "p9_f01.nii.gz")
    with pytest.raises(DatasetError, match=r"labelsTr/p9_f01\.nii\.gz: no image for case 'p9_f01'"):
        NnUNetDataset.open(root)


def test_scribble_file_without_image(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "ds")
    _nii(root / "scribblesTr" / "p9_f01.nii.gz")
    with pytest.raises(DatasetError, match=r"scribblesTr/p9_f01\.nii\.gz: no image for case"):
        NnUNetDataset.open(root)


def test_missing_channel_and_missing_suffix(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "ds", cases=["a_1", "b_1"], channels=2)
    (root / "imagesTr" / "b_1_0001.nii.gz").unlink()
    with pytest.raises(DatasetError, match=r"imagesTr: case 'b_1' has channels \[0\].*missing b_1_0001\.nii\.gz"):
        NnUNetDataset.open(root)
    root = make_dataset(tmp_path / "ds2")
    _nii(root / "imagesTr" / "nosuffix.nii.gz")
    with pytest.raises(DatasetError, match=r"imagesTr/nosuffix\.nii\.gz: .*rename it to CASE_0000\.nii\.gz"):
        NnUNetDataset.open(root)


def test_num_training_mismatch(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "ds", extra={"numTraining": 7})
    with pytest.raises(DatasetError, match=r"dataset\.json: numTraining is 7 but .*imagesTr holds 5 cases"):
        NnUNetDataset.open(root)


def test_split_naming_an_unknown_patient(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "ds", splits={"train": ["p1", "p2", "p10"], "val": ["p7"]})
    with pytest.raises(DatasetError, match=r"splits\.json: split 'val' names 'p7', which covers no case"):
        NnUNetDataset.open(root)


def test_bad_splits_shape(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "ds", splits={"train": "p1"})
    with pytest.raises(DatasetError, match=r"splits\.json: split 'train' must be a list"):
        NnUNetDataset.open(root)
    root = make_dataset(tmp_path / "ds2", splits={"train": ["p1", "p2", "p10"]})
    with pytest.raises(DatasetError, match=r"splits\.json: holds one set of splits.*use fold=0"):
        NnUNetDataset.open(root, fold=1)


def test_case_covered_by_no_split_entry(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "ds", splits={"train": ["p1"], "val": ["p2"]})
    ds = NnUNetDataset.open(root)
    with pytest.raises(DatasetError, match=r"splits\.json: training case 'p10_f01' is covered by no split entry"):
        ds.cases_of_split("train")


def test_case_covered_by_two_entries(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "ds", splits={"train": ["p1", "p2", "p10"], "val": ["p2_f02"]})
    ds = NnUNetDataset.open(root)
    assert ds.case("p2_f02").patient == "p2_f02"  # ambiguous: the case stands alone
    with pytest.raises(DatasetError, match=r"'p2_f02' is covered by 2 entries \('p2' in 'train', 'p2_f02' in 'val'\)"):
        ds.cases_of_split("val")


def test_unknown_split_and_no_splits(tmp_path: Path) -> None:
    ds = NnUNetDataset.open(make_dataset(tmp_path / "ds", splits={"train": ["p1", "p2", "p10"]}))
    with pytest.raises(DatasetError, match="no split 'test'; available splits: train"):
        ds.cases_of_split("test")
    ds = NnUNetDataset.open(make_dataset(tmp_path / "ds2"))
    with pytest.raises(DatasetError, match=r"splits\.json: missing, so there is no split 'train'"):
        ds.cases_of_split("train")


# ---------------------------------------------------------------------- real data
@pytest.mark.data
def test_real_acdc_layout(acdc_dir: Path) -> None:
    ds = NnUNetDataset.open(acdc_dir)
    assert len(ds.cases) == 170
    assert len({c.patient for c in ds.cases}) == 85
    assert len(ds.patients_of_split("train")) == 70
    assert len(ds.patients_of_split("val")) == 15
    assert ds.ignore_index == 4
    assert ds.num_classes == 4
    assert ds.label_names == ("background", "RV", "MYO", "LV")
    assert all(c.label_path is not None and c.scribble_path is not None for c in ds.cases)
    assert len(ds.test_cases) == 30
    assert {c.patient for c in ds.cases_of_split("train")}.isdisjoint(c.patient for c in ds.cases_of_split("val"))
    assert [c.name for c in ds.cases if c.patient == "patient001"] == ["patient001_frame01", "patient001_frame12"]


@pytest.mark.data
def test_real_acdc_scribbles_agree_with_the_dense_label(acdc_dir: Path) -> None:
    case = NnUNetDataset.open(acdc_dir).case("patient001_frame01")
    assert case.label_path is not None
    assert case.scribble_path is not None
    label = np.asarray(nib.load(str(case.label_path)).dataobj)
    scribble = np.asarray(nib.load(str(case.scribble_path)).dataobj)
    assert scribble.shape == label.shape
    annotated = scribble != 4
    agreement = float(np.mean(scribble[annotated] == label[annotated]))
    print(f"patient001_frame01: {annotated.sum()} scribble voxels, agreement with the dense label {agreement:.4%}")
    assert 0 < annotated.mean() < 0.2  # sparse
    assert agreement > 0.99
    assert set(np.unique(scribble[annotated]).tolist()) == {0, 1, 2, 3}


@pytest.mark.data
def test_real_hippocampus_has_no_splits_or_scribbles(hippocampus_dir: Path) -> None:
    ds = NnUNetDataset.open(hippocampus_dir)
    assert ds.splits == {}
    assert ds.ignore_index is None
    assert ds.num_classes == 3
    assert len(ds.cases) == 200
    assert all(c.scribble_path is None and c.label_path is not None for c in ds.cases)
