"""The QA report of one segmented case, batch-level flagging, and ``summary.csv``.

A report (``OUT_DIR/<case>.json``, written last: its presence marks the case complete) holds:

* where the case came from and its geometry: input path, shape, spacing, affine, format;
* per label (background included): voxel count, volume in mL (voxel count × |det(affine[:3, :3])| / 1000, which
  is the product of the spacings for any non-sheared grid), mean confidence inside the label; the same for the
  foreground (every label but 0) as a whole; the mean confidence over the whole volume;
* the fraction of voxels whose confidence is below ``low_confidence`` (over the volume and over the foreground);
* the time per stage in seconds (read, preprocess, infer, postprocess, write, total), backend, device, model hash
  and version, confkd version, the run id and a UTC timestamp;
* ``flagged`` and ``flag_reasons``.

Flagging (:func:`batch_flags`), on the mean foreground confidence ``m`` of each case: a case is flagged when

* no foreground is predicted at all;
* ``m`` is below an absolute floor (default 0.5);
* the batch has at least 5 cases and ``m < median - max(3 × 1.4826 × MAD, 0.02)`` (a robust z-score below -3;
  1.4826 × MAD estimates the standard deviation of normal data, and the 0.02 minimum keeps a batch of nearly
  identical cases from flagging a case that is lower by a rounding error).

The batch is every complete report in OUT_DIR (earlier runs and other shards included); flags are recomputed at
the end of each run and changed reports are rewritten atomically.
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from confkd.io_utils import atomic_write_text

__all__ = [
    "CONFIDENCE_FLOOR",
    "REPORT_SCHEMA",
    "batch_flags",
    "build_report",
    "label_statistics",
    "load_reports",
    "read_report",
    "summary_rows",
    "write_report",
    "write_summary",
]

REPORT_SCHEMA = "confkd-segment-report"
REPORT_VERSION = 1
#: default absolute floor on the mean foreground confidence
CONFIDENCE_FLOOR = 0.5
MIN_BATCH = 5
MAD_K = 3.0
MAD_TO_SIGMA = 1.4826
MIN_GAP = 0.02
STAGES = ("read", "preprocess", "infer", "postprocess", "write")
# voxels per bincount pass: bounds the float64 weights copy to 32 MB whatever the volume size
_CHUNK = 1 << 22


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def _round(value: float | None, digits: int = 6) -> float | None:
    return None if value is None else round(float(value), digits)


def label_statistics(
    labels: np.ndarray,
    confidence: np.ndarray,
    label_names: Mapping[int, str],
    voxel_ml: float,
    low_confidence: float,
) -> dict[str, Any]:
    """Counts, volumes and confidences per label, for the foreground and overall.

    Shape:
        ``labels`` integer ``[i, j, k(, t)]``, non-negative; ``confidence`` float ``[i, j, k(, t)]`` in [0, 1].
    """
    if labels.shape != confidence.shape:
        raise ValueError(f"labels {labels.shape} and confidence {confidence.shape} differ in shape")
    flat_labels = labels.reshape(-1)
    flat_conf = confidence.reshape(-1)
    n_classes = max(max(label_names, default=0) + 1, int(flat_labels.max(initial=0)) + 1)
    counts = np.zeros(n_classes, dtype=np.int64)
    sums = np.zeros(n_classes, dtype=np.float64)
    low = np.zeros(n_classes, dtype=np.int64)
    for start in range(0, flat_labels.size, _CHUNK):
        lab = flat_labels[start : start + _CHUNK].astype(np.intp, copy=False)
        conf = flat_conf[start : start + _CHUNK]
        counts += np.bincount(lab, minlength=n_classes)
        sums += np.bincount(lab, weights=conf, minlength=n_classes)
        low += np.bincount(lab[conf < low_confidence], minlength=n_classes)
    per_label = []
    for index in range(n_classes):
        n = int(counts[index])
        per_label.append(
            {
                "index": index,
                "name": label_names.get(index, f"label{index}"),
                "voxels": n,
                "volume_ml": _round(n * voxel_ml),
                "mean_confidence": _round(sums[index] / n) if n else None,
            }
        )
    total = int(counts.sum())
    fg_n = int(counts[1:].sum())
    return {
        "labels": per_label,
        "foreground": {
            "voxels": fg_n,
            "volume_ml": _round(fg_n * voxel_ml),
            "mean_confidence": _round(sums[1:].sum() / fg_n) if fg_n else None,
        },
        "mean_confidence": _round(sums.sum() / total) if total else None,
        "low_confidence": {
            "threshold": float(low_confidence),
            "fraction": _round(low.sum() / total) if total else None,
            "foreground_fraction": _round(low[1:].sum() / fg_n) if fg_n else None,
        },
    }


def build_report(
    *,
    case: str,
    input_path: str,
    shape: Sequence[int],
    affine: np.ndarray,
    image_format: str,
    labels: np.ndarray,
    confidence: np.ndarray,
    label_names: Mapping[int, str],
    low_confidence: float,
    timings: Mapping[str, float],
    model: Mapping[str, Any],
    outputs: Mapping[str, str],
    run_id: str,
    tta: bool,
    floor: float = CONFIDENCE_FLOOR,
) -> dict[str, Any]:
    """The JSON-serialisable QA report of one case (flagged against ``floor`` only; see :func:`batch_flags`).

    ``outputs`` maps ``"seg"``, ``"conf"`` (and ``"preview"``) to file names inside OUT_DIR; ``model`` holds
    ``backend``, ``device``, ``hash``, ``version`` and ``source``.
    """
    import confkd

    affine = np.asarray(affine, dtype=np.float64)
    spacing = [float(v) for v in np.linalg.norm(affine[:3, :3], axis=0)]
    voxel_ml = abs(float(np.linalg.det(affine[:3, :3]))) / 1000.0
    stats = label_statistics(labels, confidence, label_names, voxel_ml, low_confidence)
    report: dict[str, Any] = {
        "schema": REPORT_SCHEMA,
        "schema_version": REPORT_VERSION,
        "case": case,
        "input": input_path,
        "format": image_format,
        "outputs": dict(outputs),
        "shape": [int(n) for n in shape],
        "spacing": spacing,
        "affine": affine.tolist(),
        "voxel_volume_ml": voxel_ml,
        **stats,
        "timings_s": {k: _round(float(v), 4) for k, v in timings.items()},
        "model": dict(model),
        "tta": bool(tta),
        "confkd_version": confkd.__version__,
        "run_id": run_id,
        "created": utc_now(),
    }
    if labels.ndim == 4:  # cine: volumes per frame (end-diastole / end-systole are what clinicians read)
        report["frame_volumes_ml"] = [
            {
                label_names.get(i, f"label{i}"): _round(float(np.count_nonzero(labels[..., t] == i)) * voxel_ml)
                for i in range(1, len(stats["labels"]))
            }
            for t in range(labels.shape[3])
        ]
    reasons = batch_flags([report["foreground"]["mean_confidence"]], floor=floor)[0]
    report["flagged"] = bool(reasons)
    report["flag_reasons"] = reasons
    return report


def foreground_confidence(report: Mapping[str, Any]) -> float | None:
    value = report.get("foreground", {}).get("mean_confidence")
    return None if value is None else float(value)


def batch_flags(
    values: Sequence[float | None],
    *,
    floor: float = CONFIDENCE_FLOOR,
    min_cases: int = MIN_BATCH,
    k: float = MAD_K,
    min_gap: float = MIN_GAP,
) -> list[list[str]]:
    """Flag reasons for each case's mean foreground confidence (``None``: no foreground predicted).

    See the module docstring for the rule; an empty list means not flagged.
    """
    known = [float(v) for v in values if v is not None and math.isfinite(v)]
    threshold = median = None
    if len(known) >= min_cases:
        median = statistics.median(known)
        mad = statistics.median(abs(v - median) for v in known)
        threshold = median - max(k * MAD_TO_SIGMA * mad, min_gap)
    out: list[list[str]] = []
    for value in values:
        reasons: list[str] = []
        if value is None or not math.isfinite(value):
            reasons.append("no foreground predicted")
        else:
            if value < floor:
                reasons.append(f"mean foreground confidence {value:.3f} is below the floor {floor:g}")
            if threshold is not None and median is not None and value < threshold:
                reasons.append(
                    f"mean foreground confidence {value:.3f} is unusually low for the batch: below {threshold:.3f} "
                    f"= median {median:.3f} - {k:g} x 1.4826 x MAD over {len(known)} cases"
                )
        out.append(reasons)
    return out


# ---------------------------------------------------------------------------------------------- files


def write_report(path: Path, report: Mapping[str, Any]) -> None:
    """Write a report atomically (ASCII JSON: undecodable bytes of file names survive as escapes)."""
    atomic_write_text(path, json.dumps(report, indent=2, allow_nan=False) + "\n")


def read_report(path: Path) -> dict[str, Any] | None:
    """A report if ``path`` holds one that parses and has our schema, else ``None``."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("schema") != REPORT_SCHEMA or not isinstance(data.get("case"), str):
        return None
    return data


def report_is_complete(out_dir: Path, report: Mapping[str, Any]) -> bool:
    """Every output a report lists exists in ``out_dir``."""
    outputs = report.get("outputs")
    if not isinstance(outputs, dict) or not outputs.get("seg") or not outputs.get("conf"):
        return False
    return all(isinstance(name, str) and (out_dir / name).is_file() for name in outputs.values() if name)


def load_reports(out_dir: Path) -> dict[str, dict[str, Any]]:
    """Every complete report in ``out_dir`` by case name (stray or foreign JSON files are ignored)."""
    out: dict[str, dict[str, Any]] = {}
    for path in sorted(Path(out_dir).glob("*.json")):
        if path.name.startswith("."):
            continue
        report = read_report(path)
        if report is not None and path.name == f"{report['case']}.json" and report_is_complete(out_dir, report):
            out[report["case"]] = report
    return out


def apply_batch_flags(out_dir: Path, reports: Mapping[str, dict[str, Any]], *, floor: float = CONFIDENCE_FLOOR) -> int:
    """Recompute the flags of ``reports`` as one batch; rewrite (atomically) those that changed. Returns the
    number of flagged cases."""
    cases = sorted(reports)
    flags = batch_flags([foreground_confidence(reports[c]) for c in cases], floor=floor)
    for case, reasons in zip(cases, flags, strict=True):
        report = reports[case]
        if report.get("flag_reasons") != reasons or report.get("flagged") != bool(reasons):
            report["flagged"] = bool(reasons)
            report["flag_reasons"] = reasons
            write_report(out_dir / f"{case}.json", report)
    return sum(1 for reasons in flags if reasons)


def summary_rows(
    reports: Mapping[str, Mapping[str, Any]], failures: Mapping[str, Mapping[str, Any]]
) -> tuple[list[str], list[list[str]]]:
    """Header and rows of ``summary.csv``: one row per complete case (status ``ok``) and per case whose latest
    attempt failed and that has no complete output (status ``failed``), sorted by case.

    Volume columns (``volume_ml_<label>``) cover every foreground label seen in the reports.
    """
    names: dict[int, str] = {}
    for report in reports.values():
        for entry in report.get("labels", []):
            if entry["index"] > 0:
                names.setdefault(int(entry["index"]), str(entry["name"]))
    label_columns = [f"volume_ml_{names[i]}" for i in sorted(names)]
    header = [
        "case",
        "status",
        "flagged",
        "foreground_confidence",
        "mean_confidence",
        "low_confidence_fraction",
        *label_columns,
        "seconds",
        "run_id",
        "flag_reasons",
        "input",
        "stage",
        "error",
    ]

    def fmt(value: Any) -> str:
        return "" if value is None else str(value)  # floats: the shortest repr that reads back exactly

    rows: list[list[str]] = []
    for case in sorted(set(reports) | set(failures)):
        if case in reports:
            r = reports[case]
            volumes = {f"volume_ml_{e['name']}": e["volume_ml"] for e in r.get("labels", []) if e["index"] > 0}
            rows.append(
                [
                    case,
                    "ok",
                    "yes" if r.get("flagged") else "no",
                    fmt(foreground_confidence(r)),
                    fmt(r.get("mean_confidence")),
                    fmt(r.get("low_confidence", {}).get("fraction")),
                    *(fmt(volumes.get(col)) for col in label_columns),
                    fmt(r.get("timings_s", {}).get("total")),
                    str(r.get("run_id", "")),
                    "; ".join(r.get("flag_reasons", [])),
                    str(r.get("input", "")),
                    "",
                    "",
                ]
            )
        else:
            f = failures[case]
            rows.append(
                [
                    case,
                    "failed",
                    "",
                    "",
                    "",
                    "",
                    *("" for _ in label_columns),
                    "",
                    str(f.get("run_id", "")),
                    "",
                    str(f.get("input", "")),
                    str(f.get("stage", "")),
                    f"{f.get('error_type', '')}: {f.get('message', '')}",
                ]
            )
    return header, rows


def write_summary(
    path: Path, reports: Mapping[str, Mapping[str, Any]], failures: Mapping[str, Mapping[str, Any]]
) -> None:
    """Write ``summary.csv`` atomically (UTF-8, ``\\n`` line ends)."""
    header, rows = summary_rows(reports, failures)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())
