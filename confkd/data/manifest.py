"""The case manifest: which supervision each case gets, and the rule that decided it.

Supervision is decided per PATIENT, never per volume or slice: ``n_strong`` patients of the training split are
"strong" (dense labels), every other patient of the split is "weak" (sparse labels, read from ``scribblesTr``
or generated from the dense label at load time by :mod:`confkd.data.weak_labels`), and the validation split's
cases are "none" (images only for training; their label path is kept for evaluation).

The strong patients are drawn from the sorted patient list with ``numpy.random.default_rng(seed)``: a partial
Fisher-Yates shuffle driven by the PCG64 bit generator's raw 64-bit outputs, which NumPy keeps fixed, so the
draw does not depend on the NumPy version's sampling algorithms, the machine or the Python version.

A dataset without ``splits.json`` has one implicit training split holding every training case, each case its
own patient, and no validation split.

The parts: this module builds manifests (:func:`build_manifest`, :func:`build_manifest_from_config`) and re-exports
the rest, so that all the names of ``__all__`` import from here; :mod:`confkd.data.manifest_io` holds the types
(:class:`Manifest`, :class:`ManifestEntry`, :class:`ManifestRule`, :class:`Supervision`) and the file: the manifest
is saved as JSON with paths relative to the dataset root, together with a fingerprint of the dataset
(:func:`dataset_fingerprint`: SHA-256 of dataset.json, splits.json and the sorted case names) checked when the
manifest is loaded against a dataset.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from confkd.config import DataConfig
from confkd.data.dataset import Case, NnUNetDataset
from confkd.data.manifest_io import (
    WEAK_SOURCES,
    Manifest,
    ManifestEntry,
    ManifestRule,
    Supervision,
    dataset_fingerprint,
)
from confkd.data.weak_labels import GENERATED_SOURCES, default_weak_params, weak_params_from_config
from confkd.errors import ConfigError, DatasetError

__all__ = [
    "Manifest",
    "ManifestEntry",
    "ManifestRule",
    "Supervision",
    "build_manifest",
    "build_manifest_from_config",
    "dataset_fingerprint",
]

logger = logging.getLogger(__name__)


def _draw(patients: Sequence[str], n: int, seed: int) -> list[str]:
    """``n`` of the sorted ``patients``: partial Fisher-Yates on PCG64's raw outputs (version-stable)."""
    pool = sorted(patients)
    bits = np.random.default_rng(seed).bit_generator
    for i in range(n):
        # modulo bias is below len(pool) / 2**64: negligible
        j = i + int(bits.random_raw()) % (len(pool) - i)
        pool[i], pool[j] = pool[j], pool[i]
    return sorted(pool[:n])


def _split_cases(dataset: NnUNetDataset, split: str) -> tuple[Case, ...]:
    if not dataset.splits:
        logger.info("%s has no splits.json: using every training case as split %r", dataset.root, split)
        return dataset.cases
    return dataset.cases_of_split(split)


def build_manifest(
    dataset: NnUNetDataset,
    *,
    split: str = "train",
    n_strong: int,
    seed: int,
    weak_source: str = "scribbles",
    strong_patients: Sequence[str] | None = None,
    val_split: str | None = "val",
    weak_params: Mapping[str, Any] | None = None,
    weak_seed: int = 0,
) -> Manifest:
    """Decide each case's supervision; see the module docstring for the rule.

    ``strong_patients`` overrides the random draw (its length must equal ``n_strong``). ``weak_params`` are the
    generator parameters for generated sources (defaults of :mod:`confkd.data.weak_labels` otherwise).
    Raises :class:`ConfigError` for bad arguments and :class:`DatasetError` when the dataset cannot satisfy them.
    """
    if weak_source not in WEAK_SOURCES:
        raise ConfigError(f"unknown weak_source {weak_source!r}; available options are: {', '.join(WEAK_SOURCES)}")
    if isinstance(n_strong, bool) or not isinstance(n_strong, int) or n_strong < 0:
        raise ConfigError(f"n_strong must be a non-negative integer, got {n_strong!r}")
    params: dict[str, Any] = {}
    if weak_source != "scribbles":
        unknown = sorted(set(weak_params or {}) - set(GENERATED_SOURCES[weak_source]))
        if unknown:
            raise ConfigError(
                f"unknown weak_params {', '.join(unknown)} for weak_source {weak_source!r}; "
                f"valid: {', '.join(GENERATED_SOURCES[weak_source])}"
            )
        params = {**default_weak_params(weak_source), **(weak_params or {})}  # record every value used
    elif weak_params:
        raise ConfigError("weak_params only apply to generated weak sources (erosion, discs, bbox), not scribbles")

    train_cases = _split_cases(dataset, split)
    patients = sorted({c.patient for c in train_cases})
    if n_strong > len(patients):
        raise ConfigError(
            f"n_strong={n_strong} but split {split!r} of {dataset.root} has only {len(patients)} patients; "
            f"use n_strong <= {len(patients)}"
        )
    if strong_patients is not None:
        explicit = tuple(strong_patients)
        unknown_patients = sorted(set(explicit) - set(patients))
        if unknown_patients:
            raise DatasetError(
                f"{dataset.root}: strong_patients {', '.join(unknown_patients[:5])} are not patients of split "
                f"{split!r} (e.g. {', '.join(patients[:3])})"
            )
        if len(set(explicit)) != len(explicit) or len(explicit) != n_strong:
            raise ConfigError(
                f"strong_patients must list n_strong={n_strong} distinct patients, got {len(explicit)} entries "
                f"({len(set(explicit))} distinct)"
            )
        strong = set(explicit)
    else:
        explicit = None
        strong = set(_draw(patients, n_strong, seed))

    entries: list[ManifestEntry] = []
    missing_scribbles: list[str] = []
    for case in train_cases:
        if case.patient in strong:
            supervision, source = Supervision.STRONG, None
            if case.label_path is None:
                raise DatasetError(
                    f"{dataset.root / 'labelsTr'}: strong case {case.name!r} has no dense label "
                    f"{case.name}{dataset.file_ending}; add it or choose other strong patients"
                )
        else:
            supervision, source = Supervision.WEAK, weak_source
            if weak_source == "scribbles" and case.scribble_path is None:
                missing_scribbles.append(case.name)
            if weak_source != "scribbles" and case.label_path is None:
                raise DatasetError(
                    f"{dataset.root / 'labelsTr'}: weak case {case.name!r} has no dense label to generate "
                    f"{weak_source!r} seeds from; add {case.name}{dataset.file_ending}"
                )
        entries.append(_entry(case, split, supervision, source))
    if missing_scribbles:
        folder = dataset.root / "scribblesTr"
        raise DatasetError(
            f"{folder}: {'no such folder, so ' if not folder.is_dir() else ''}"
            f"no scribble for weak case {missing_scribbles[0]!r} ({len(missing_scribbles)} weak cases lack one); add "
            f"{missing_scribbles[0]}{dataset.file_ending} or use weak_source='erosion' to generate seeds"
        )

    used_val: str | None = None
    if val_split is not None and dataset.splits:
        if val_split == split:
            raise ConfigError(f"val_split and split are both {split!r}; choose a different validation split")
        entries.extend(_entry(c, val_split, Supervision.NONE, None) for c in dataset.cases_of_split(val_split))
        used_val = val_split
    elif val_split is not None:
        logger.info("%s has no splits.json: no validation split %r", dataset.root, val_split)

    rule = ManifestRule(
        split=split,
        val_split=used_val,
        n_strong=n_strong,
        seed=seed,
        weak_source=weak_source,
        strong_patients=explicit,
        weak_params=params,
        weak_seed=weak_seed,
        fold=dataset.fold,
    )
    ignore = dataset.ignore_index
    return Manifest(
        entries=tuple(entries),
        rule=rule,
        dataset_root=dataset.root,
        fingerprint=dataset_fingerprint(dataset),
        num_classes=dataset.num_classes,
        ignore_index=dataset.num_classes if ignore is None else ignore,
    )


def build_manifest_from_config(dataset: NnUNetDataset, data_cfg: DataConfig) -> Manifest:
    """:func:`build_manifest` with every choice taken from a :class:`~confkd.config.DataConfig`.

    ``data_cfg.n_strong = None`` makes every patient of the training split strong (the upper-bound regime).
    """
    source = data_cfg.weak_source
    n_strong = data_cfg.n_strong
    if n_strong is None:
        n_strong = len(dataset.patients_of_split(data_cfg.train_split)) if dataset.splits else len(dataset.cases)
    return build_manifest(
        dataset,
        split=data_cfg.train_split,
        n_strong=n_strong,
        seed=data_cfg.strong_seed,
        weak_source=source,
        val_split=data_cfg.val_split,
        weak_params=None if source == "scribbles" else weak_params_from_config(source, data_cfg),
        weak_seed=data_cfg.weak_seed,
    )


def _entry(case: Case, split: str, supervision: Supervision, weak_source: str | None) -> ManifestEntry:
    return ManifestEntry(
        case=case.name,
        patient=case.patient,
        split=split,
        supervision=supervision,
        image_paths=case.image_paths,
        label_path=case.label_path,
        scribble_path=case.scribble_path,
        weak_source=weak_source,
    )
