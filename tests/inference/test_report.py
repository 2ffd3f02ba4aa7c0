"""QA reports, batch flagging, summary.csv and preview montages, on synthetic values with known answers."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from confkd.inference.preview import GAP, TILE, montage_size, preview_slices, write_preview
from confkd.inference.report import (
    apply_batch_flags,
    batch_flags,
    build_report,
    label_statistics,
    load_reports,
    read_report,
    write_report,
    write_summary,
)

NAMES = {0: "background", 1: "RV", 2: "MYO", 3: "LV"}


def test_label_statistics_known_values() -> None:
    labels = np.zeros((4, 5, 2), np.uint8)
    labels[0, :, 0] = 1  # 5 voxels
    labels[1:3, 0:2, 1] = 3  # 4 voxels
    confidence = np.full(labels.shape, 0.9, np.float32)
    confidence[labels == 1] = 0.4
    confidence[labels == 3] = [0.2, 0.6, 0.8, 1.0]
    stats = label_statistics(labels, confidence, NAMES, voxel_ml=0.006, low_confidence=0.5)
    per = {e["name"]: e for e in stats["labels"]}
    assert [e["voxels"] for e in stats["labels"]] == [31, 5, 0, 4]
    assert per["RV"]["volume_ml"] == pytest.approx(0.03) and per["LV"]["volume_ml"] == pytest.approx(0.024)
    assert per["RV"]["mean_confidence"] == pytest.approx(0.4)
    assert per["LV"]["mean_confidence"] == pytest.approx(0.65)
    assert per["MYO"]["mean_confidence"] is None  # no voxel: undefined, not 0
    assert stats["foreground"] == {"voxels": 9, "volume_ml": pytest.approx(0.054), "mean_confidence": pytest.approx(
        (5 * 0.4 + 2.6) / 9, abs=1e-6
    )}  # fmt: skip
    assert stats["mean_confidence"] == pytest.approx((31 * 0.9 + 2.0 + 2.6) / 40, abs=1e-6)
    # below 0.5: the 5 RV voxels and one LV voxel (0.2)
    assert stats["low_confidence"]["fraction"] == pytest.approx(6 / 40)
    assert stats["low_confidence"]["foreground_fraction"] == pytest.approx(6 / 9, abs=1e-6)


def _report(**overrides: Any) -> dict[str, Any]:
    labels = np.zeros((6, 6, 3), np.uint8)
    labels[1:3, 1:3, :] = 2  # 12 voxels
    affine = np.diag([2.0, 1.0, 3.0, 1.0])
    affine[0, 1] = 0.5  # sheared: the voxel volume is |det| = 6 mm^3, not the spacing product
    args: dict[str, Any] = {
        "case": "c1",
        "input_path": "/in/c1_0000.nii.gz",
        "shape": labels.shape,
        "affine": affine,
        "image_format": "nifti1",
        "labels": labels,
        "confidence": np.where(labels > 0, 0.8, 0.99).astype(np.float32),
        "label_names": NAMES,
        "low_confidence": 0.5,
        "timings": {"read": 0.1, "preprocess": 0.2, "infer": 0.3, "postprocess": 0.05, "write": 0.1, "total": 0.75},
        "model": {"backend": "torch", "device": "cpu", "hash": "ab" * 32, "version": "confkd 0.1.0 / t.yaml"},
        "outputs": {"seg": "c1_seg.nii.gz", "conf": "c1_conf.nii.gz"},
        "run_id": "run-1",
        "tta": False,
    }
    args.update(overrides)
    return build_report(**args)


def test_report_fields() -> None:
    report = _report()
    json.dumps(report, allow_nan=False)  # plain JSON
    assert report["voxel_volume_ml"] == pytest.approx(0.006)
    myo = report["labels"][2]
    assert myo["voxels"] == 12 and myo["volume_ml"] == pytest.approx(0.072)
    assert report["foreground"]["mean_confidence"] == pytest.approx(0.8)
    assert report["spacing"][0] == pytest.approx(2.0) and report["spacing"][1] == pytest.approx(np.hypot(1, 0.5))
    assert set(report["timings_s"]) == {"read", "preprocess", "infer", "postprocess", "write", "total"}
    for key in ("backend", "device", "hash", "version"):
        assert report["model"][key]
    assert report["confkd_version"] and report["created"].endswith("Z")
    assert report["flagged"] is False and report["flag_reasons"] == []
    low = _report(confidence=np.full((6, 6, 3), 0.3, np.float32))
    assert low["flagged"] and "below the floor 0.5" in low["flag_reasons"][0]


def test_4d_reports_volumes_per_frame() -> None:
    labels = np.zeros((4, 4, 2, 3), np.uint8)
    labels[0, 0, 0, 1] = 3
    labels[:2, :2, :, 2] = 1
    report = _report(labels=labels, confidence=np.ones(labels.shape, np.float32), shape=labels.shape)
    assert [f["LV"] for f in report["frame_volumes_ml"]] == pytest.approx([0.0, 0.006, 0.0])
    assert [f["RV"] for f in report["frame_volumes_ml"]] == pytest.approx([0.0, 0.0, 8 * 0.006])


def test_batch_flag_catches_one_case_far_below_the_others() -> None:
    values = [0.90, 0.91, 0.89, 0.92, 0.90, 0.88, 0.60]
    flags = batch_flags(values)
    assert [bool(f) for f in flags] == [False] * 6 + [True]
    # median 0.90, MAD 0.01: threshold 0.90 - 3 * 1.4826 * 0.01 = 0.8555; 0.60 is also above the 0.5 floor
    assert "unusually low for the batch: below 0.856 = median 0.900" in flags[-1][0]
    assert len(flags[-1]) == 1


def test_uniform_batches_flag_nothing() -> None:
    assert not any(batch_flags([0.9] * 8))
    # MAD 0: the 0.02 minimum gap keeps rounding-level differences from flagging
    assert not any(batch_flags([0.9, 0.9, 0.9, 0.9, 0.9, 0.895]))
    assert [bool(f) for f in batch_flags([0.9, 0.9, 0.9, 0.9, 0.9, 0.85])] == [False] * 5 + [True]


def test_small_batches_use_the_floor_only() -> None:
    flags = batch_flags([0.95, 0.96, 0.7, 0.4])  # fewer than 5 cases: no batch statistics
    assert [bool(f) for f in flags] == [False, False, False, True]
    assert flags[3] == ["mean foreground confidence 0.400 is below the floor 0.5"]
    assert batch_flags([None, 0.9]) == [["no foreground predicted"], []]
    assert batch_flags([0.55], floor=0.6)[0][0].endswith("below the floor 0.6")


def test_flags_are_rewritten_into_the_reports_and_the_summary(tmp_path: Path) -> None:
    confidences = [0.9, 0.91, 0.89, 0.9, 0.92, 0.6]
    for i, c in enumerate(confidences):
        case = f"case{i}"
        outputs = {"seg": f"{case}_seg.nii.gz", "conf": f"{case}_conf.nii.gz"}
        for name in outputs.values():
            (tmp_path / name).write_bytes(b"")
        report = _report(
            case=case,
            outputs=outputs,
            confidence=np.full((6, 6, 3), c, np.float32),
        )
        write_report(tmp_path / f"{case}.json", report)
    (tmp_path / "stray.json").write_text('{"not": "ours"}')
    (tmp_path / "broken.json").write_text("{")
    (tmp_path / "case5_conf.nii.gz").unlink()  # an incomplete case is not part of the batch
    reports = load_reports(tmp_path)
    assert sorted(reports) == [f"case{i}" for i in range(5)]
    assert apply_batch_flags(tmp_path, reports) == 0

    (tmp_path / "case5_conf.nii.gz").write_bytes(b"")
    reports = load_reports(tmp_path)
    assert apply_batch_flags(tmp_path, reports) == 1
    on_disk = read_report(tmp_path / "case5.json")
    assert on_disk is not None and on_disk["flagged"] and "unusually low" in on_disk["flag_reasons"][0]

    failures = {"gone": {"case": "gone", "input": "/in/gone.nii.gz", "stage": "read", "error_type": "VolumeReadError",
                         "message": "/in/gone.nii.gz: file is empty (0 bytes)", "run_id": "run-2"}}  # fmt: skip
    write_summary(tmp_path / "summary.csv", reports, failures)
    with open(tmp_path / "summary.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [r["case"] for r in rows] == [*(f"case{i}" for i in range(6)), "gone"]
    assert [r["flagged"] for r in rows[:6]] == ["no"] * 5 + ["yes"]
    assert {r["status"] for r in rows[:6]} == {"ok"}
    assert float(rows[0]["volume_ml_MYO"]) == pytest.approx(0.072) and rows[0]["volume_ml_RV"] == "0.0"
    assert float(rows[5]["foreground_confidence"]) == pytest.approx(0.6)
    assert float(rows[0]["seconds"]) == pytest.approx(0.75)
    assert rows[6]["status"] == "failed" and rows[6]["stage"] == "read"
    assert rows[6]["error"] == "VolumeReadError: /in/gone.nii.gz: file is empty (0 bytes)"
    assert list(tmp_path.glob(".*")) == []  # atomic writes leave no temporary file


# ---------------------------------------------------------------------------------------------- preview


def test_preview_slices_span_the_labelled_extent() -> None:
    labels = np.zeros((4, 4, 20), np.uint8)
    labels[1, 1, 2:10] = 1
    assert preview_slices(labels, axis=2) == [2, 3, 5, 6, 8, 9]
    assert preview_slices(labels[..., :4], axis=2) == [2, 3]
    assert preview_slices(np.zeros((4, 4, 5), np.uint8), axis=2) == [0, 1, 2, 3, 4]  # nothing labelled: all
    assert preview_slices(labels, axis=0) == [1]


def test_preview_png_has_the_expected_size_and_content(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    image = rng.normal(size=(60, 30, 8)).astype(np.float32)
    labels = np.zeros(image.shape, np.uint8)
    labels[10:20, 5:15, :] = 1
    labels[30:40, 5:15, :] = 2
    confidence = rng.uniform(size=image.shape).astype(np.float32)
    # spacing (1, 1, 4): slices along k; a slice is 60 mm wide and 30 mm high -> tiles of 2 x TILE by TILE
    out = write_preview(tmp_path / "c_preview.png", image, labels, confidence, (1.0, 1.0, 4.0))
    png = Image.open(out)
    assert png.format == "PNG" and png.mode == "RGB"
    assert png.size == (6 * 2 * TILE + 5 * GAP, 2 * TILE + GAP) == montage_size(image.shape, (1, 1, 4), 6)
    pixels = np.asarray(png).astype(int)
    top = pixels[:TILE, : 2 * TILE]
    coloured = (np.abs(top[..., 0] - top[..., 1]) > 30) | (np.abs(top[..., 1] - top[..., 2]) > 30)
    assert coloured.any() and not coloured.all()  # the overlay marks the labels, the image stays grey elsewhere
    bottom = pixels[TILE + GAP :, : 2 * TILE]
    assert (bottom[..., 2] > 0).all()  # viridis never reaches pure black
    assert list(tmp_path.glob(".*")) == []


def test_preview_of_a_4d_volume_uses_its_first_frame(tmp_path: Path) -> None:
    shape = (16, 16, 3, 2)
    out = write_preview(
        tmp_path / "p.png", np.ones(shape), np.zeros(shape, np.uint8), np.ones(shape, np.float32), (2.0, 2.0, 2.0)
    )
    assert Image.open(out).size == (3 * TILE + 2 * GAP, 2 * TILE + GAP)
