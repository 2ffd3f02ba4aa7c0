"""Validation during training: whole-volume predictions of the student and the teacher, scored per class.

The labelled cases of the validation split are read once, raw (:func:`read_validation_cases`); each validation
predicts every case whole on its own grid with :func:`~confkd.inference.predict.predict_volume` (the inference
path: preprocess, network, probabilities resampled back, argmax) and scores both branches with 3D Dice and HD95 in
mm at the case's real spacing (:func:`~confkd.metrics.evaluate_case`). One forward pass gives both branches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from confkd.config import Config, PreprocessConfig
from confkd.data.manifest import Manifest, Supervision
from confkd.inference.predict import predict_volume
from confkd.metrics import CaseMetrics, evaluate_case, summarize
from confkd.training.data import read_case

__all__ = ["ValidationCase", "format_validation", "read_validation_cases", "score_cases", "validate"]

BRANCHES = ("student", "teacher")


@dataclass(frozen=True)
class ValidationCase:
    """A labelled case of the validation split, raw: image channels and dense label ``[i, j, k]``."""

    name: str
    channels: tuple[np.ndarray, ...]
    label: np.ndarray
    spacing: tuple[float, float, float]


def read_validation_cases(manifest: Manifest, split: str, cfg: PreprocessConfig) -> list[ValidationCase]:
    """The cases of ``split`` with supervision "none" and a dense label (the others cannot be scored)."""
    entries = [e for e in manifest.cases(split) if e.supervision is Supervision.NONE and e.label_path is not None]
    out = []
    for entry in entries:
        raw = read_case(entry, manifest, cfg)
        assert raw.label is not None  # label_path is set
        out.append(ValidationCase(entry.case, raw.channels, raw.label.astype(np.int64), raw.spacing))
    return out


def score_cases(
    model: nn.Module,
    cases: list[ValidationCase],
    config: Config,
    device: torch.device,
    amp: torch.dtype | None,
    batch_size: int,
    branches: tuple[str, ...] = BRANCHES,
) -> dict[str, list[CaseMetrics]]:
    """Dice and HD95 per case of each of ``branches`` ("student", "teacher"), in the order of ``cases``.

    Every case is predicted whole on its own grid (one forward pass gives both branches); a single-branch model
    scores its one output for both. The model is in eval mode meanwhile and back in its previous mode afterwards.
    """
    classes = list(range(1, config.model.num_classes))
    scores: dict[str, list[CaseMetrics]] = {branch: [] for branch in branches}
    was_training = model.training
    model.eval()
    try:
        for case in cases:
            pred = predict_volume(
                model,
                list(case.channels),
                config.preprocess,
                spacing=case.spacing,
                device=device,
                batch_size=batch_size,
                autocast_dtype=amp,
            )
            labels = {"student": pred.student.argmax(0).cpu().numpy()}
            if "teacher" in branches:
                single = pred.teacher is None or pred.teacher is pred.student
                labels["teacher"] = labels["student"] if single else pred.teacher.argmax(0).cpu().numpy()  # type: ignore[union-attr]
            for branch in branches:
                scores[branch].append(evaluate_case(labels[branch], case.label, classes, case.spacing))
    finally:
        model.train(was_training)
    return scores


def validate(
    model: nn.Module,
    cases: list[ValidationCase],
    config: Config,
    label_names: tuple[str, ...],
    device: torch.device,
    amp: torch.dtype | None,
    batch_size: int,
) -> dict[str, Any]:
    """Per-class and mean Dice / HD95 (mm) of the student and the teacher on ``cases`` (see :func:`score_cases`).

    Returns ``{"student": {"dice": {name: ...}, "hd95": {name: ...}, "mean_dice": ..., "mean_hd95": ...},
    "teacher": {...}}`` with class names from ``label_names`` (background excluded); values averaged over the cases,
    None where undefined (HD95 of an empty mask in every case).
    """
    classes = list(range(1, config.model.num_classes))
    scores = score_cases(model, cases, config, device, amp, batch_size)
    out: dict[str, Any] = {}
    for branch, cases_metrics in scores.items():
        summary = summarize(cases_metrics, classes)
        out[branch] = {
            "dice": {label_names[c]: _finite(summary["dice"][c].mean) for c in classes},
            "hd95": {label_names[c]: _finite(summary["hd95"][c].mean) for c in classes},
            "mean_dice": _finite(summary["dice"]["mean"].mean),
            "mean_hd95": _finite(summary["hd95"]["mean"].mean),
        }
    return out


def format_validation(metrics: dict[str, Any]) -> str:
    """One line for the log, e.g. ``student Dice 0.8123 (RV 0.7934 MYO 0.8010 LV 0.8425) HD95 3.27 mm (RV 4.12
    MYO n/a LV 2.05) | teacher Dice ...``: Dice with 4 decimals, HD95 in mm with 2, ``n/a`` where undefined.

    ``metrics``: as returned by :func:`validate`.
    """
    parts = []
    for branch in BRANCHES:
        m = metrics[branch]
        dice = _number(m["mean_dice"], 4) + _per_class(m["dice"], 4)
        unit = "" if m["mean_hd95"] is None else " mm"
        hd95 = _number(m["mean_hd95"], 2) + unit + _per_class(m["hd95"], 2)
        parts.append(f"{branch} Dice {dice} HD95 {hd95}")
    return " | ".join(parts)


def _per_class(values: dict[str, float | None], decimals: int) -> str:
    return " (" + " ".join(f"{name} {_number(v, decimals)}" for name, v in values.items()) + ")"


def _number(value: float | None, decimals: int) -> str:
    return "n/a" if value is None else f"{value:.{decimals}f}"


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None
