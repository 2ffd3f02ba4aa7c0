"""The case manifest: patient-level draws, supervision rules, persistence and fingerprints."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest

from confkd.config import DataConfig
from confkd.data.dataset import NnUNetDataset
from confkd.data.manifest import (
    Manifest,
    Supervision,
    build_manifest,
    build_manifest_from_config,
    dataset_fingerprint,
)
from confkd.data.weak_labels import erosion_seeds, random_discs
from confkd.errors import ConfigError, DatasetError

PATIENTS = [f"pat{i:02d}" for i in range(1, 11)]  # 10 training patients
VAL = ["pat11", "pat12"]
SEED7_FIVE = ("pat04", "pat05", "pat06", "pat07", "pat10")


def _nii(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 2), dtype=np.uint8), np.eye(4)), str(path))


def make_dataset(
    root: Path, *, no_scribble: Iterable[str] = (), splits: Any = "default", labels: dict | None = None
) -> Path:
    """10 train + 2 val patients with two frames each; dense labels and scribbles for every case."""
    meta = {
        "channel_names": {"0": "MRI"},
        "labels": labels or {"background": 0, "a": 1, "b": 2, "ignore": 3},
        "file_ending": ".nii.gz",
    }
    root.mkdir(parents=True)
    (root / "dataset.json").write_text(json.dumps(meta))
    for patient in PATIENTS + VAL:
        for frame in ("frame01", "frame02"):
            case = f"{patient}_{frame}"
            _nii(root / "imagesTr" / f"{case}_0000.nii.gz")
            _nii(root / "labelsTr" / f"{case}.nii.gz")
            if case not in no_scribble:
                _nii(root / "scribblesTr" / f"{case}.nii.gz")
    if splits == "default":
        splits = {"train": PATIENTS, "val": VAL}
    if splits is not None:
        (root / "splits.json").write_text(json.dumps(splits))
    return root


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> NnUNetDataset:
    return NnUNetDataset.open(make_dataset(tmp_path_factory.mktemp("m") / "ds"))


# ---------------------------------------------------------------------- drawing strong patients
def test_same_seed_same_strong_set_and_different_seeds_differ(dataset: NnUNetDataset) -> None:
    draws = {seed: build_manifest(dataset, n_strong=3, seed=seed).strong_patients() for seed in range(5)}
    assert build_manifest(dataset, n_strong=3, seed=0).strong_patients() == draws[0]
    assert len(set(draws.values())) > 1
    for strong in draws.values():
        assert len(strong) == 3
        assert set(strong) <= set(PATIENTS)


def test_draw_is_pinned(dataset: NnUNetDataset) -> None:
    # a known answer: changes here would silently change every experiment's strong set
    # (partial Fisher-Yates over the sorted patients driven by PCG64(seed).random_raw(), checked by hand)
    assert build_manifest(dataset, n_strong=3, seed=0).strong_patients() == ("pat01", "pat02", "pat03")
    assert build_manifest(dataset, n_strong=3, seed=1).strong_patients() == ("pat01", "pat02", "pat08")
    assert build_manifest(dataset, n_strong=5, seed=7).strong_patients() == SEED7_FIVE


def test_supervision_is_decided_per_patient(dataset: NnUNetDataset) -> None:
    manifest = build_manifest(dataset, n_strong=4, seed=2)
    by_patient: dict[str, set[Supervision]] = {}
    for entry in manifest.entries:
        by_patient.setdefault(entry.patient, set()).add(entry.supervision)
    assert all(len(kinds) == 1 for kinds in by_patient.values())
    assert manifest.summary() == {
        "strong": {"patients": 4, "cases": 8},
        "weak": {"patients": 6, "cases": 12},
        "none": {"patients": 2, "cases": 4},
    }
    assert {e.case for e in manifest.strong_cases()}.isdisjoint(e.case for e in manifest.weak_cases())
    assert all(e.weak_source == "scribbles" and e.scribble_path for e in manifest.weak_cases())
    assert all(e.weak_source is None for e in manifest.strong_cases())


def test_val_cases_keep_their_labels_for_evaluation(dataset: NnUNetDataset) -> None:
    manifest = build_manifest(dataset, n_strong=2, seed=0)
    val = manifest.cases("val")
    assert [e.case for e in val] == ["pat11_frame01", "pat11_frame02", "pat12_frame01", "pat12_frame02"]
    assert all(e.supervision is Supervision.NONE and e.label_path is not None for e in val)
    assert len(manifest.cases("train")) == 20


def test_n_strong_zero_and_all(tmp_path: Path, dataset: NnUNetDataset) -> None:
    assert build_manifest(dataset, n_strong=0, seed=0).summary()["strong"] == {"patients": 0, "cases": 0}
    # the upper-bound regime: every training case strong, so missing scribbles do not matter
    no_scribbles = NnUNetDataset.open(make_dataset(tmp_path / "ds", no_scribble=["pat05_frame02"]))
    upper = build_manifest(no_scribbles, n_strong=10, seed=0)
    assert upper.summary()["strong"] == {"patients": 10, "cases": 20}
    assert upper.summary()["weak"] == {"patients": 0, "cases": 0}
    with pytest.raises(ConfigError, match=r"n_strong=11 but split 'train' .* has only 10 patients"):
        build_manifest(dataset, n_strong=11, seed=0)
    with pytest.raises(ConfigError, match="non-negative"):
        build_manifest(dataset, n_strong=-1, seed=0)


def test_explicit_strong_patients(dataset: NnUNetDataset) -> None:
    manifest = build_manifest(dataset, n_strong=2, seed=0, strong_patients=["pat07", "pat02"])
    assert manifest.strong_patients() == ("pat02", "pat07")
    assert manifest.rule.strong_patients == ("pat07", "pat02")
    with pytest.raises(DatasetError, match="strong_patients pat11 are not patients of split 'train'"):
        build_manifest(dataset, n_strong=1, seed=0, strong_patients=["pat11"])
    with pytest.raises(ConfigError, match="n_strong=3 distinct patients, got 2"):
        build_manifest(dataset, n_strong=3, seed=0, strong_patients=["pat01", "pat02"])


def test_missing_scribble_names_the_case_and_suggests_erosion(tmp_path: Path) -> None:
    ds = NnUNetDataset.open(make_dataset(tmp_path / "ds", no_scribble=["pat09_frame02", "pat10_frame01"]))
    with pytest.raises(DatasetError, match=r"scribblesTr: no scribble for weak case 'pat09_frame02' \(2 weak") as e:
        build_manifest(ds, n_strong=0, seed=0)
    assert "weak_source='erosion'" in str(e.value)
    manifest = build_manifest(ds, n_strong=0, seed=0, weak_source="erosion", weak_params={"iterations": 4})
    assert manifest.rule.weak_params == {"iterations": 4}
    assert all(e.weak_source == "erosion" for e in manifest.weak_cases())


def test_generated_sources_record_their_parameters(dataset: NnUNetDataset) -> None:
    assert build_manifest(dataset, n_strong=1, seed=0, weak_source="bbox").rule.weak_params == {
        "shrink": 0.5,
        "margin": 2,
    }
    with pytest.raises(ConfigError, match="unknown weak_params radius for weak_source 'erosion'; valid: iterations"):
        build_manifest(dataset, n_strong=1, seed=0, weak_source="erosion", weak_params={"radius": 2})
    with pytest.raises(ConfigError, match="available options are: scribbles, erosion, discs, bbox"):
        build_manifest(dataset, n_strong=1, seed=0, weak_source="boxes")


def test_build_from_config(dataset: NnUNetDataset) -> None:
    cfg = DataConfig(n_strong=3, strong_seed=1, weak_source="discs", disc_radius=2, weak_seed=5)
    manifest = build_manifest_from_config(dataset, cfg)
    assert manifest.strong_patients() == build_manifest(dataset, n_strong=3, seed=1).strong_patients()
    assert manifest.rule.weak_params == {"count": 2, "radius": 2}
    assert manifest.rule.weak_seed == 5
    assert manifest.rule.val_split == "val"


def test_weak_label_for_uses_recorded_params_and_a_per_case_rng(dataset: NnUNetDataset) -> None:
    label = np.zeros((12, 12), dtype=np.uint8)
    label[2:10, 2:10] = 1
    erosion = build_manifest(dataset, n_strong=0, seed=0, weak_source="erosion", weak_params={"iterations": 2})
    entry = erosion.weak_cases()[0]
    np.testing.assert_array_equal(
        erosion.weak_label_for(entry, label, slice_axis=None), erosion_seeds(label, iterations=2, ignore_index=3)
    )
    discs = build_manifest(dataset, n_strong=0, seed=0, weak_source="discs", weak_params={"radius": 1})
    first, second = discs.weak_cases()[:2]
    a = discs.weak_label_for(first, label, slice_axis=None)
    np.testing.assert_array_equal(a, discs.weak_label_for(first, label, slice_axis=None))  # order-independent
    assert not np.array_equal(a, discs.weak_label_for(second, label, slice_axis=None))
    assert set(np.unique(a)) <= {0, 1, 3}
    assert np.array_equal(a, random_discs(label, radius=1, rng=_case_rng(0, first.case), ignore_index=3))
    scribbles = build_manifest(dataset, n_strong=0, seed=0)
    with pytest.raises(DatasetError, match=r"is not generated .*read .*scribblesTr"):
        scribbles.weak_label_for(scribbles.weak_cases()[0], label, slice_axis=None)


def _case_rng(seed: int, case: str) -> np.random.Generator:
    from confkd.data.weak_labels import case_rng

    return case_rng(seed, case)


def test_dataset_without_splits_uses_every_case_and_no_val(tmp_path: Path) -> None:
    ds = NnUNetDataset.open(make_dataset(tmp_path / "ds", splits=None, labels={"background": 0, "a": 1}))
    manifest = build_manifest(ds, n_strong=2, seed=0, weak_source="erosion")
    assert manifest.summary()["none"]["cases"] == 0
    assert len(manifest.entries) == 24  # each case is its own patient
    assert manifest.summary()["strong"] == {"patients": 2, "cases": 2}
    assert manifest.rule.val_split is None
    assert manifest.ignore_index == 2  # no "ignore" label: the next value after the classes


# ---------------------------------------------------------------------- persistence
def test_save_load_round_trip_with_relative_paths(tmp_path: Path, dataset: NnUNetDataset) -> None:
    manifest = build_manifest(dataset, n_strong=3, seed=0, weak_source="bbox", weak_params={"shrink": 0.3})
    path = tmp_path / "out" / "manifest.json"
    manifest.save(path)
    assert [p.name for p in path.parent.iterdir()] == ["manifest.json"]  # no temporary files left behind
    data = json.loads(path.read_text())
    assert data["entries"][0]["image_paths"] == ["imagesTr/pat01_frame01_0000.nii.gz"]
    assert data["entries"][0]["label_path"] == "labelsTr/pat01_frame01.nii.gz"
    assert Manifest.load(path) == manifest
    assert Manifest.load(path, dataset.root) == manifest
    assert Manifest.load(path, dataset) == manifest
    assert manifest.to_json() == Manifest.load(path).to_json()


def test_load_against_a_moved_dataset(tmp_path: Path, dataset: NnUNetDataset) -> None:
    manifest = build_manifest(dataset, n_strong=3, seed=0)
    manifest.save(tmp_path / "m.json")
    moved = tmp_path / "moved"
    shutil.copytree(dataset.root, moved)
    loaded = Manifest.load(tmp_path / "m.json", moved)
    assert loaded.dataset_root == moved.resolve()
    assert loaded.entries[0].image_paths[0] == moved.resolve() / "imagesTr" / "pat01_frame01_0000.nii.gz"
    assert loaded.entries[0].image_paths[0].is_file()


def _edit(path: Path, edit: Any) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.update(extra=1), r"unknown field extra in the manifest; valid fields: format_version, "),
        (lambda d: d["rule"].update(lr=1), r"unknown field lr in rule; valid fields: split, val_split, n_strong"),
        (lambda d: d["entries"][0].update(dose=1), r"unknown field dose in entries\[0\]; valid fields: case, "),
        (lambda d: d["entries"][0].pop("patient"), r"entries\[0\] lacks patient"),
        (lambda d: d["entries"][1].update(supervision="full"), r"supervision 'full' is not one of strong, weak"),
        (lambda d: d["rule"].update(n_strong="3"), r"rule\.n_strong must be int, got '3'"),
        (lambda d: d["entries"][0].update(image_paths=[1]), r"image_paths must be list\[str\], got \[1\]"),
        (lambda d: d.update(format_version=2), r"format_version 2 is not supported"),
    ],
)
def test_load_rejects_bad_manifests(tmp_path: Path, dataset: NnUNetDataset, edit: Any, message: str) -> None:
    path = tmp_path / "m.json"
    build_manifest(dataset, n_strong=1, seed=0).save(path)
    _edit(path, edit)
    with pytest.raises(DatasetError, match=message) as info:
        Manifest.load(path)
    assert str(path) in str(info.value)


def test_load_rejects_invalid_json(tmp_path: Path) -> None:
    path = tmp_path / "m.json"
    path.write_text("{")
    with pytest.raises(DatasetError, match=r"m\.json: not valid JSON"):
        Manifest.load(path)


def test_fingerprint_mismatch_is_detected(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "ds")
    ds = NnUNetDataset.open(root)
    build_manifest(ds, n_strong=2, seed=0).save(tmp_path / "m.json")
    assert Manifest.load(tmp_path / "m.json", root).fingerprint == dataset_fingerprint(ds)
    # a new case changes the fingerprint
    for kind, name in (("imagesTr", "pat10_frame03_0000"), ("labelsTr", "pat10_frame03")):
        _nii(root / kind / f"{name}.nii.gz")
    with pytest.raises(DatasetError, match=r"m\.json: built for a dataset with fingerprint .*rebuild the manifest"):
        Manifest.load(tmp_path / "m.json", root)
    Manifest.load(tmp_path / "m.json")  # without a dataset nothing is checked
    # so does an edit of splits.json
    root2 = make_dataset(tmp_path / "ds2")
    before = dataset_fingerprint(NnUNetDataset.open(root2))
    (root2 / "splits.json").write_text(json.dumps({"train": PATIENTS[:-1], "val": VAL + PATIENTS[-1:]}))
    assert dataset_fingerprint(NnUNetDataset.open(root2)) != before


# ---------------------------------------------------------------------- real data
@pytest.mark.data
def test_real_acdc_manifest(acdc_dir: Path) -> None:
    manifest = build_manifest(NnUNetDataset.open(acdc_dir), n_strong=3, seed=0)
    assert len(manifest.strong_cases()) == 6
    assert manifest.summary() == {
        "strong": {"patients": 3, "cases": 6},
        "weak": {"patients": 67, "cases": 134},
        "none": {"patients": 15, "cases": 30},
    }
    assert all(e.patient <= "patient070" for e in manifest.strong_cases())


@pytest.mark.data
def test_real_hippocampus_needs_a_generated_weak_source(hippocampus_dir: Path) -> None:
    ds = NnUNetDataset.open(hippocampus_dir)
    with pytest.raises(DatasetError, match=r"no scribble for weak case 'hippocampus_.*weak_source='erosion'"):
        build_manifest(ds, n_strong=5, seed=0)
    manifest = build_manifest(ds, n_strong=5, seed=0, weak_source="erosion")
    assert manifest.summary()["strong"] == {"patients": 5, "cases": 5}
    assert manifest.ignore_index == 3


def test_config_n_strong_null_means_every_train_patient(dataset: NnUNetDataset) -> None:
    manifest = build_manifest_from_config(dataset, DataConfig(n_strong=None, weak_source="erosion"))
    train_patients = set(dataset.patients_of_split("train"))
    assert set(manifest.strong_patients()) == train_patients
    assert manifest.weak_cases() == ()
