"""Score a folder of predicted label maps against a folder of ground-truth label maps (``confkd evaluate``).

Matching is by case name: a ground truth ``CASE<ext>`` matches the prediction ``CASE<ext>`` or ``CASE_seg<ext>``
(``<ext>`` any of :data:`IMAGE_SUFFIXES`, not necessarily the same on both sides). In the prediction folder,
confidence maps (``*_conf<ext>``) and non-image files (reports) are ignored. Ground truths without a prediction
are *missing*, predictions without a ground truth are *extra*; both are listed, never silently dropped.

Geometry: the ground truth is the reference. A prediction must have its shape, and its voxel centres must lie
within :data:`AFFINE_TOLERANCE_MM` of the ground truth's (checked at the grid's corners, where an affine
difference is largest); otherwise that case becomes an error row naming both files and the others are still
scored. Spacing for HD95 comes from the ground truth's header.

Classes: from ``dataset_json`` (its ``"labels"``, without background 0 and ``"ignore"``), else from ``labels``,
else the sorted union of the non-zero values found in the ground truths, each named by its value.

Outputs (:meth:`EvaluationResult.write_csv`, atomic): ``per_case.csv``, one row per ground truth with columns
``case, <name>_dice..., <name>_hd95..., mean_dice, mean_hd95, error`` (``error`` is empty for scored cases;
numbers are Python's shortest round-trip repr, undefined HD95 is ``nan``), and ``summary.csv`` with columns
``metric, class, mean, std, n, n_nan``, one row per class and one for ``mean`` (the per-case mean over classes),
for each metric.

Cases are read and scored by a small thread pool: nibabel's gzip decompression and numpy/scipy release the GIL,
and on 2 cores two workers were measured faster than one on ACDC (see :data:`DEFAULT_WORKERS`).
"""

from __future__ import annotations

import csv
import io
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from confkd.data.dataset import _parse_labels, _read_json
from confkd.data.volume import Volume, one_line, read_volume
from confkd.errors import ConfigError, ConfKDError, DatasetError
from confkd.io_utils import atomic_write_text, split_image_suffix
from confkd.metrics import CaseMetrics, SummaryStat, evaluate_case, summarize

__all__ = [
    "AFFINE_TOLERANCE_MM",
    "IMAGE_SUFFIXES",
    "CaseRow",
    "EvaluationResult",
    "evaluate_folder",
]

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")
AFFINE_TOLERANCE_MM = 1e-3
#: threads reading and scoring cases; capped because each holds two volumes in memory
DEFAULT_WORKERS = min(4, os.cpu_count() or 1)
PRED_SUFFIX = "_seg"
CONF_SUFFIX = "_conf"


@dataclass(frozen=True)
class CaseRow:
    """One ground-truth case: its files and either its metrics or why it could not be scored."""

    case: str
    label_path: Path
    pred_path: Path | None
    metrics: CaseMetrics | None = None
    error: str | None = None

    @property
    def missing(self) -> bool:
        """No prediction was found for this case."""
        return self.pred_path is None


@dataclass(frozen=True)
class EvaluationResult:
    """Per-case rows (sorted by case), the summary over the scored ones, and the unmatched predictions.

    Attributes:
        classes: class value -> name, in column order.
        rows: one per ground truth, sorted by case name.
        summary: :func:`confkd.metrics.summarize` over the scored rows, keyed by class *value* and ``"mean"``.
        extra: prediction files that match no ground truth.
    """

    classes: dict[int, str]
    rows: tuple[CaseRow, ...]
    summary: dict[str, dict[int | str, SummaryStat]]
    extra: tuple[Path, ...] = field(default_factory=tuple)

    @property
    def missing(self) -> tuple[str, ...]:
        """Cases whose ground truth has no prediction."""
        return tuple(r.case for r in self.rows if r.missing)

    @property
    def errors(self) -> tuple[CaseRow, ...]:
        """Rows with a prediction that could not be scored (unreadable, geometry mismatch, ambiguous match)."""
        return tuple(r for r in self.rows if r.error is not None and not r.missing)

    @property
    def scored(self) -> tuple[CaseRow, ...]:
        return tuple(r for r in self.rows if r.metrics is not None)

    def per_case_table(self) -> list[dict[str, str]]:
        """The rows of ``per_case.csv`` as dicts of strings."""
        columns = self._metric_columns()
        table = []
        for row in self.rows:
            values = row.metrics.to_row(self.classes) if row.metrics is not None else {}
            out = {"case": row.case}
            out.update({c: _fmt(values[c]) if c in values else "" for c in columns})
            out["error"] = row.error or ""
            table.append(out)
        return table

    def summary_table(self) -> list[dict[str, str]]:
        """The rows of ``summary.csv`` as dicts of strings."""
        table = []
        for metric, per_class in self.summary.items():
            for key, stat in per_class.items():
                name = self.classes[key] if isinstance(key, int) else key
                table.append(
                    {
                        "metric": metric,
                        "class": name,
                        "mean": _fmt(stat.mean),
                        "std": _fmt(stat.std),
                        "n": str(stat.n),
                        "n_nan": str(stat.n_nan),
                    }
                )
        return table

    def write_csv(self, out_dir: Path) -> tuple[Path, Path]:
        """Write ``per_case.csv`` and ``summary.csv`` into ``out_dir`` (created if needed), atomically.

        Returns:
            The two paths written.
        """
        out_dir = Path(out_dir)
        per_case = out_dir / "per_case.csv"
        summary = out_dir / "summary.csv"
        atomic_write_text(per_case, _csv(["case", *self._metric_columns(), "error"], self.per_case_table()))
        atomic_write_text(summary, _csv(["metric", "class", "mean", "std", "n", "n_nan"], self.summary_table()))
        return per_case, summary

    def _metric_columns(self) -> list[str]:
        names = list(self.classes.values())
        return [f"{n}_dice" for n in names] + [f"{n}_hd95" for n in names] + ["mean_dice", "mean_hd95"]


def _fmt(value: float) -> str:
    return repr(float(value))  # shortest repr that round-trips; NaN -> "nan", which float() parses back


def _csv(columns: Sequence[str], rows: Iterable[Mapping[str, str]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------- matching
def _image_files(folder: Path) -> dict[str, list[Path]]:
    """Image files of ``folder`` by name without suffix (hidden files and other suffixes skipped)."""
    found: dict[str, list[Path]] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not path.is_file():
            continue
        stem, suffix = split_image_suffix(path.name)
        if suffix.lower() in IMAGE_SUFFIXES and stem:
            found.setdefault(stem, []).append(path)
    return found


def _match(pred_dir: Path, label_dir: Path) -> tuple[dict[str, Path], dict[str, list[Path]], tuple[Path, ...]]:
    """Ground truths by case, predictions matched to each case, and the unmatched predictions."""
    label_files = _image_files(label_dir)
    labels: dict[str, Path] = {}
    for name, paths in label_files.items():
        if len(paths) > 1:
            raise DatasetError(
                f"{label_dir}: case {name!r} has several ground truths ({', '.join(p.name for p in paths)}); keep one"
            )
        labels[name] = paths[0]
    matched: dict[str, list[Path]] = {}
    extra: list[Path] = []
    for stem, paths in _image_files(pred_dir).items():
        if stem in labels:  # an exact name wins, so even a case called "x_conf" or "x_seg" can be evaluated
            case: str | None = stem
        elif stem.endswith(PRED_SUFFIX) and stem[: -len(PRED_SUFFIX)] in labels:
            case = stem[: -len(PRED_SUFFIX)]
        elif stem.endswith(CONF_SUFFIX):
            continue  # a confidence map, not a prediction
        else:
            case = None
        if case is None:
            extra.extend(paths)
        else:
            matched.setdefault(case, []).extend(paths)
    return labels, matched, tuple(sorted(extra))


# ---------------------------------------------------------------------------------------------- classes
def _classes_from(labels: Mapping[str, int] | None, dataset_json: Path | None) -> dict[int, str] | None:
    """Class value -> name from ``dataset_json`` or ``labels`` (background and "ignore" left out), else None."""
    if labels is not None and dataset_json is not None:
        raise ConfigError("give the class names either as labels or as dataset_json, not both")
    if dataset_json is not None:
        path = Path(dataset_json)
        meta = _read_json(path, what="dataset.json", hint="pass the dataset's dataset.json")
        if not isinstance(meta, Mapping):
            raise DatasetError(f"{path}: must hold a JSON object with a 'labels' mapping")
        mapping: Mapping[str, int] = _parse_labels(meta, path)
        where = str(path)
    elif labels is not None:
        mapping = labels
        where = "labels"
    else:
        return None
    classes: dict[int, str] = {}
    for name, value in mapping.items():
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ConfigError(f"{where}: label {name!r} has value {value!r}; label values must be integers")
        if name == "ignore" or int(value) == 0:
            continue
        if int(value) in classes:
            raise ConfigError(f"{where}: labels {classes[int(value)]!r} and {name!r} share the value {value}")
        classes[int(value)] = str(name)
    if not classes:
        raise ConfigError(f"{where}: no foreground classes (every label is background 0 or 'ignore')")
    return dict(sorted(classes.items()))


def _present_values(array: np.ndarray) -> set[int]:
    """The non-zero values of an integer-valued label map."""
    if array.size and array.dtype.kind in "uib" and int(array.min()) >= 0 and int(array.max()) < 2**16:
        counts = np.bincount(array.ravel().astype(np.intp, copy=False))  # O(n), unlike np.unique's sort
        return {int(v) for v in np.flatnonzero(counts) if v != 0}
    return {int(v) for v in np.unique(array) if v != 0}


# ---------------------------------------------------------------------------------------------- scoring
@dataclass(frozen=True)
class _Scored:
    metrics: CaseMetrics | None
    gt_values: frozenset[int] = frozenset()
    error: str | None = None


def _label_map(volume: Volume, role: str) -> np.ndarray:
    if volume.is_4d:
        raise DatasetError(f"{volume.path}: {role} is 4D {volume.shape}; expected one 3D label map")
    array = np.asarray(volume.array)
    if array.dtype.kind == "f":
        if not (np.isfinite(array).all() and np.array_equal(array, np.rint(array))):
            raise DatasetError(f"{volume.path}: {role} holds non-integer values; expected a label map")
        array = array.astype(np.int64)
    return array


def _check_geometry(pred: Volume, gt: Volume) -> None:
    if pred.shape != gt.shape:
        raise DatasetError(f"{pred.path}: shape {pred.shape} differs from the ground truth {gt.path} {gt.shape}")
    corners = np.array(np.meshgrid(*[[0, n - 1] for n in gt.shape[:3]], indexing="ij")).reshape(3, -1)
    homogeneous = np.vstack([corners, np.ones(corners.shape[1])])
    offset = float(np.abs((pred.affine - gt.affine) @ homogeneous)[:3].max())
    if offset > AFFINE_TOLERANCE_MM:
        raise DatasetError(
            f"{pred.path}: voxel positions differ from the ground truth {gt.path} by up to {offset:.4g} mm "
            f"(tolerance {AFFINE_TOLERANCE_MM} mm); resample the prediction onto the ground truth"
        )


def _score(label_path: Path, pred_paths: Sequence[Path], classes: Sequence[int] | None) -> _Scored:
    """Read and score one case; ``classes=None``: score every value present in either map (labels inferred)."""
    if len(pred_paths) > 1:
        names = ", ".join(str(p) for p in pred_paths)
        return _Scored(None, error=f"{label_path.name}: several predictions match ({names}); keep one")
    try:
        gt_volume = read_volume(label_path)
        pred_volume = read_volume(pred_paths[0])
        _check_geometry(pred_volume, gt_volume)
        gt = _label_map(gt_volume, "ground truth")
        pred = _label_map(pred_volume, "prediction")
        gt_values = frozenset(_present_values(gt))
        to_score = sorted(gt_values | _present_values(pred)) if classes is None else classes
        metrics = evaluate_case(pred, gt, to_score, gt_volume.spacing)
    except ConfKDError as e:
        return _Scored(None, error=one_line(e, limit=500))
    return _Scored(metrics, gt_values)


def _restrict(metrics: CaseMetrics, classes: Sequence[int]) -> CaseMetrics:
    # a class absent from a case's maps was not scored for it: absent from both is Dice 1, HD95 0 by convention
    return CaseMetrics(
        {c: metrics.dice.get(c, 1.0) for c in classes},
        {c: metrics.hd95.get(c, 0.0) for c in classes},
    )


def evaluate_folder(
    pred_dir: Path,
    label_dir: Path,
    *,
    labels: Mapping[str, int] | None = None,
    dataset_json: Path | None = None,
    out_dir: Path | None = None,
    workers: int | None = None,
) -> EvaluationResult:
    """Score every prediction in ``pred_dir`` against its ground truth in ``label_dir`` (see the module docstring).

    Args:
        pred_dir: predicted label maps (``CASE_seg<ext>`` or ``CASE<ext>``).
        label_dir: ground-truth label maps ``CASE<ext>``.
        labels: class name -> value (background 0 and "ignore" are left out); exclusive with ``dataset_json``.
        dataset_json: an nnU-Net ``dataset.json`` whose ``"labels"`` name the classes.
        out_dir: if given, ``per_case.csv`` and ``summary.csv`` are written there.
        workers: threads reading and scoring cases (default :data:`DEFAULT_WORKERS`).

    Raises:
        DatasetError: a folder is missing, holds no ground truth, holds two ground truths for one case, or (with
            inferred classes) no ground truth holds any foreground; a bad ``dataset_json``.
        ConfigError: bad ``labels``, or both ``labels`` and ``dataset_json``.
    """
    pred_dir, label_dir = Path(pred_dir), Path(label_dir)
    for folder, what in ((pred_dir, "prediction"), (label_dir, "ground-truth")):
        if not folder.is_dir():
            raise DatasetError(f"{folder}: {what} folder not found")
    classes = _classes_from(labels, dataset_json)
    gt_files, matched, extra = _match(pred_dir, label_dir)
    if not gt_files:
        raise DatasetError(f"{label_dir}: no ground-truth images ({', '.join(IMAGE_SUFFIXES)})")
    to_score = [case for case in sorted(gt_files) if case in matched]
    logger.info(
        "evaluating %d cases (%d without prediction, %d extra predictions)",
        len(to_score),
        len(gt_files) - len(to_score),
        len(extra),
    )
    values = list(classes) if classes is not None else None
    n_workers = max(1, min(workers or DEFAULT_WORKERS, len(to_score) or 1))
    with ThreadPoolExecutor(max_workers=n_workers) as pool:
        results = pool.map(lambda c: _score(gt_files[c], matched[c], values), to_score)
        scored = dict(zip(to_score, results, strict=True))

    if classes is None:
        found = sorted(set().union(*(s.gt_values for s in scored.values())))
        if not found and any(s.metrics is not None for s in scored.values()):
            raise DatasetError(
                f"{label_dir}: no ground truth holds a non-zero label, so there is nothing to score; "
                "pass labels or dataset_json to name the classes"
            )
        classes = {v: str(v) for v in found}
    final = list(classes)

    rows = []
    for case in sorted(gt_files):
        if case not in scored:
            rows.append(CaseRow(case, gt_files[case], None, error="no prediction"))
            continue
        result = scored[case]
        metrics = _restrict(result.metrics, final) if result.metrics is not None else None
        if result.error is not None:
            logger.warning("%s", result.error)
        rows.append(CaseRow(case, gt_files[case], matched[case][0], metrics, result.error))
    summary = summarize([r.metrics for r in rows if r.metrics is not None], final)
    evaluation = EvaluationResult(classes, tuple(rows), summary, extra)
    if out_dir is not None:
        evaluation.write_csv(Path(out_dir))
    return evaluation
