"""Reader for the nnU-Net v2 raw dataset layout (paths and metadata only; no voxels are read here).

Layout::

    <root>/dataset.json                     labels, channel_names, file_ending, numTraining
    <root>/splits.json                      optional: patient-level splits
    <root>/imagesTr/CASE_0000<ending>       training images, one file per channel (_0000, _0001, ...)
    <root>/labelsTr/CASE<ending>            dense labels (optional per case)
    <root>/scribblesTr/CASE<ending>         sparse labels; the label named "ignore" marks unannotated voxels
    <root>/imagesTs/CASE_0000<ending>       test images

``splits.json`` comes in two shapes, both accepted: ours, ``{"train": [...], "val": [...], ...}``, and nnU-Net's
list of folds ``[{"train": [...], "val": [...]}, ...]`` (one fold is selected with ``fold``).

Case -> patient rule: a split entry ``P`` covers case ``C`` when ``C == P`` or ``C`` starts with ``P + "_"``.
So ACDC's ``patient001`` covers ``patient001_frame01`` and ``patient001_frame12``, and nnU-Net's case-level
folds (entries equal to case names) work unchanged. A case's patient is the one entry that covers it; a case
covered by no entry (or ambiguously, by several) is its own patient here, and :meth:`NnUNetDataset.cases_of_split`
refuses to use such a splits file. Patient ids are never parsed out of file names.
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from confkd.errors import DatasetError

__all__ = ["Case", "NnUNetDataset", "covers"]

logger = logging.getLogger(__name__)

_CHANNEL_RE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


def covers(entry: str, case: str) -> bool:
    """Whether split entry ``entry`` (a patient or case id) covers case ``case`` (see the module docstring)."""
    return case == entry or case.startswith(entry + "_")


def _covering_ids(case: str) -> list[str]:
    """Every entry that would cover ``case``: the case itself and each prefix that ends before an "_"."""
    return [case] + [case[:i] for i, ch in enumerate(case) if ch == "_" and i > 0]


def _owners(case: str, splits: Mapping[str, Sequence[str]]) -> list[tuple[str, str]]:
    """The (split, entry) pairs of ``splits`` that cover ``case``."""
    ids = set(_covering_ids(case))
    return [(s, e) for s, entries in splits.items() for e in entries if e in ids]


@dataclass(frozen=True)
class Case:
    """One case of the dataset: its channel images (ordered _0000, _0001, ...) and optional label files."""

    name: str
    patient: str
    image_paths: tuple[Path, ...]
    label_path: Path | None = None
    scribble_path: Path | None = None


@dataclass(frozen=True)
class NnUNetDataset:
    """A parsed nnU-Net v2 raw dataset folder. Build it with :meth:`open`."""

    root: Path
    name: str
    labels: Mapping[str, int]
    channel_names: Mapping[str, str]
    file_ending: str
    cases: tuple[Case, ...]
    test_cases: tuple[Case, ...]
    splits: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    fold: int | None = None
    num_training: int | None = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def open(cls, root: str | Path, *, fold: int = 0) -> NnUNetDataset:
        """Parse ``root/dataset.json``, list ``imagesTr``/``imagesTs`` and read the optional ``splits.json``.

        ``fold`` selects one fold when ``splits.json`` is nnU-Net's list of folds. Raises :class:`DatasetError`.
        """
        root = Path(root).expanduser().resolve()
        meta = _read_json(root / "dataset.json", what="dataset.json", hint="every nnU-Net v2 raw dataset needs one")
        if not isinstance(meta, Mapping):
            raise DatasetError(f"{root / 'dataset.json'}: must hold a JSON object with 'labels' and 'channel_names'")
        labels = _parse_labels(meta, root / "dataset.json")
        file_ending = meta.get("file_ending", ".nii.gz")
        if not isinstance(file_ending, str) or not file_ending.startswith("."):
            raise DatasetError(
                f"{root / 'dataset.json'}: file_ending must be a string such as '.nii.gz', got {file_ending!r}"
            )
        channel_names = _parse_channel_names(meta, root / "dataset.json")

        images_tr = root / "imagesTr"
        if not images_tr.is_dir():
            raise DatasetError(f"{images_tr}: missing; put the training images there as CASE_0000{file_ending}")
        train_images = _list_images(images_tr, file_ending, channel_names)
        test_images = (
            _list_images(root / "imagesTs", file_ending, channel_names) if (root / "imagesTs").is_dir() else {}
        )
        label_files = _list_label_files(root / "labelsTr", file_ending, train_images)
        scribble_files = _list_label_files(root / "scribblesTr", file_ending, train_images)

        num_training = meta.get("numTraining")
        if num_training is not None and (isinstance(num_training, bool) or not isinstance(num_training, int)):
            raise DatasetError(f"{root / 'dataset.json'}: numTraining must be an integer, got {num_training!r}")
        if num_training is not None and num_training != len(train_images):
            raise DatasetError(
                f"{root / 'dataset.json'}: numTraining is {num_training} but {images_tr} holds "
                f"{len(train_images)} cases; fix numTraining or restore the missing images"
            )

        splits, used_fold = _read_splits(root / "splits.json", fold)
        coverable = {i for name in [*train_images, *test_images] for i in _covering_ids(name)}
        for split, entries in splits.items():
            for entry in entries:
                if entry not in coverable:
                    raise DatasetError(
                        f"{root / 'splits.json'}: split {split!r} names {entry!r}, which covers no case in "
                        f"imagesTr or imagesTs; remove it or add its images"
                    )

        def patient_of(case: str) -> str:
            owners = {e for _, e in _owners(case, splits)}
            return owners.pop() if len(owners) == 1 else case

        cases = tuple(
            Case(name, patient_of(name), paths, label_files.get(name), scribble_files.get(name))
            for name, paths in sorted(train_images.items())
        )
        test_cases = tuple(Case(name, patient_of(name), paths) for name, paths in sorted(test_images.items()))
        name = meta.get("name")
        return cls(
            root=root,
            name=name if isinstance(name, str) else root.name,
            labels=dict(labels),
            channel_names=dict(channel_names),
            file_ending=file_ending,
            cases=cases,
            test_cases=test_cases,
            splits=splits,
            fold=used_fold,
            num_training=num_training,
        )

    # ------------------------------------------------------------------ labels
    @property
    def ignore_index(self) -> int | None:
        """The value of the label named "ignore" (unannotated voxels of sparse labels), or None."""
        return self.labels.get("ignore")

    @property
    def label_names(self) -> tuple[str, ...]:
        """Class index -> name, excluding "ignore" (``label_names[0] == "background"``)."""
        by_value = sorted((v, k) for k, v in self.labels.items() if k != "ignore")
        return tuple(k for _, k in by_value)

    @property
    def num_classes(self) -> int:
        """Number of classes, background included, "ignore" excluded."""
        return len(self.label_names)

    @property
    def num_channels(self) -> int:
        return len(self.channel_names)

    # ------------------------------------------------------------------ splits
    def case(self, name: str) -> Case:
        """The training case called ``name``."""
        for c in self.cases:
            if c.name == name:
                return c
        raise DatasetError(f"{self.root / 'imagesTr'}: no case {name!r}")

    def cases_of_split(self, split: str) -> tuple[Case, ...]:
        """The training cases covered by the entries of ``split``, sorted by name.

        Raises :class:`DatasetError` for an unknown split, or when ``splits.json`` leaves a training case
        uncovered or covers it by two entries (the patient would be ambiguous, or leak across splits).
        """
        path = self.root / "splits.json"
        if not self.splits:
            raise DatasetError(f"{path}: missing, so there is no split {split!r}; write one to use splits")
        if split not in self.splits:
            raise DatasetError(f"{path}: no split {split!r}; available splits: {', '.join(self.splits)}")
        for case in self.cases:
            owners = _owners(case.name, self.splits)
            if not owners:
                raise DatasetError(
                    f"{path}: training case {case.name!r} is covered by no split entry; "
                    f"add its patient to one split (entry P covers case C when C == P or C starts with P_)"
                )
            if len(owners) > 1:
                listed = ", ".join(f"{e!r} in {s!r}" for s, e in owners)
                raise DatasetError(
                    f"{path}: training case {case.name!r} is covered by {len(owners)} entries ({listed}); "
                    f"each case must belong to exactly one patient of one split"
                )
        return tuple(c for c in self.cases if _owners(c.name, {split: self.splits[split]}))

    def patients_of_split(self, split: str) -> tuple[str, ...]:
        """The sorted patient ids of the training cases of ``split``."""
        return tuple(sorted({c.patient for c in self.cases_of_split(split)}))


# ---------------------------------------------------------------------- parsing helpers
def _read_json(path: Path, *, what: str, hint: str) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise DatasetError(f"{path}: {what} not found; {hint}") from e
    except OSError as e:
        raise DatasetError(f"{path}: cannot read {what} ({e.strerror or e})") from e
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); fix the file") from e


def _parse_labels(meta: Mapping[str, Any], path: Path) -> dict[str, int]:
    raw = meta.get("labels")
    if not isinstance(raw, Mapping) or not raw:
        raise DatasetError(f'{path}: needs a "labels" object mapping names to integers, e.g. {{"background": 0}}')
    labels: dict[str, int] = {}
    for name, value in raw.items():
        if isinstance(value, bool) or not isinstance(value, int):
            raise DatasetError(
                f"{path}: label {name!r} has value {value!r}; only integer labels are supported "
                f"(region-based labels are not)"
            )
        labels[str(name)] = value
    if labels.get("background") != 0:
        raise DatasetError(f'{path}: labels must include "background": 0 (nnU-Net v2 convention); add it')
    ignore = labels.get("ignore")
    classes = sorted(v for k, v in labels.items() if k != "ignore")
    if classes != list(range(len(classes))):
        raise DatasetError(f"{path}: class labels must be consecutive integers from 0, got {classes}; renumber them")
    if ignore is not None and ignore <= classes[-1]:
        raise DatasetError(
            f'{path}: the "ignore" label must be the highest label (nnU-Net v2), got ignore={ignore} '
            f"with classes up to {classes[-1]}; set it to {classes[-1] + 1}"
        )
    return labels


def _parse_channel_names(meta: Mapping[str, Any], path: Path) -> dict[str, str]:
    raw = meta.get("channel_names", meta.get("modality"))
    if not isinstance(raw, Mapping) or not raw:
        raise DatasetError(f'{path}: needs a "channel_names" object, e.g. {{"0": "MRI"}}')
    keys = sorted(raw, key=lambda k: int(k) if str(k).isdigit() else -1)
    if keys != [str(i) for i in range(len(keys))]:
        raise DatasetError(f'{path}: channel_names keys must be "0", "1", ... in order, got {list(raw)}')
    return {k: str(raw[k]) for k in keys}


def _list_images(folder: Path, ending: str, channel_names: Mapping[str, str]) -> dict[str, tuple[Path, ...]]:
    """Group ``CASE_XXXX<ending>`` files by case; every case must have exactly the declared channels."""
    found: dict[str, dict[int, Path]] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not path.name.endswith(ending) or not path.is_file():
            continue
        match = _CHANNEL_RE.match(path.name[: -len(ending)])
        if match is None:
            raise DatasetError(f"{path}: image file names need a channel suffix; rename it to CASE_0000{ending}")
        found.setdefault(match["case"], {})[int(match["channel"])] = path
    expected = list(range(len(channel_names)))
    result: dict[str, tuple[Path, ...]] = {}
    for case, channels in found.items():
        if sorted(channels) != expected:
            missing = [f"{case}_{i:04d}{ending}" for i in expected if i not in channels]
            extra = [channels[i].name for i in sorted(channels) if i not in expected]
            detail = f"missing {', '.join(missing)}" if missing else f"unexpected {', '.join(extra)}"
            raise DatasetError(
                f"{folder}: case {case!r} has channels {sorted(channels)} but dataset.json declares "
                f"{len(expected)} ({detail}); fix the files or channel_names"
            )
        result[case] = tuple(channels[i] for i in expected)
    return result


def _list_label_files(folder: Path, ending: str, images: Mapping[str, Sequence[Path]]) -> dict[str, Path]:
    if not folder.is_dir():
        return {}
    result: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not path.name.endswith(ending) or not path.is_file():
            continue
        case = path.name[: -len(ending)]
        if case not in images:
            raise DatasetError(
                f"{path}: no image for case {case!r} in {folder.parent / 'imagesTr'}; "
                f"add {case}_0000{ending} there or remove this file"
            )
        result[case] = path
    return result


def _read_splits(path: Path, fold: int) -> tuple[dict[str, tuple[str, ...]], int | None]:
    if not path.is_file():
        return {}, None
    data = _read_json(path, what="splits.json", hint="")
    used_fold: int | None = None
    if isinstance(data, list):
        if isinstance(fold, bool) or not isinstance(fold, int) or not 0 <= fold < len(data):
            raise DatasetError(f"{path}: holds {len(data)} folds; choose fold 0..{len(data) - 1}, not {fold!r}")
        data, used_fold = data[fold], fold
    elif fold != 0:
        raise DatasetError(f"{path}: holds one set of splits, not a list of folds; use fold=0, not {fold!r}")
    if not isinstance(data, Mapping):
        raise DatasetError(
            f'{path}: expected {{"train": [...], "val": [...]}} or a list of such folds, got {type(data).__name__}'
        )
    splits: dict[str, tuple[str, ...]] = {}
    for name, entries in data.items():
        if not isinstance(entries, list) or not all(isinstance(e, str) and e for e in entries):
            raise DatasetError(f"{path}: split {name!r} must be a list of patient or case ids (non-empty strings)")
        duplicates = sorted(e for e, n in Counter(entries).items() if n > 1)
        if duplicates:
            raise DatasetError(f"{path}: split {name!r} lists {', '.join(duplicates)} more than once; remove repeats")
        splits[str(name)] = tuple(entries)
    return splits, used_fold
