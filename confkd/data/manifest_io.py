"""The case manifest's types and its file: entries, the rule that built them, JSON persistence, the fingerprint.

A :class:`Manifest` holds one :class:`ManifestEntry` per case (absolute paths in memory) and the
:class:`ManifestRule` that decided their :class:`Supervision`. It is saved as JSON with paths relative to the
dataset root, together with a fingerprint of the dataset (:func:`dataset_fingerprint`: SHA-256 of dataset.json,
splits.json and the sorted case names) checked when the manifest is loaded against a dataset. Loading checks every
object of the file against a schema (exact fields, JSON kinds) and names the bad field.

Part of :mod:`confkd.data.manifest`, which builds manifests, states the supervision rule and re-exports these names.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, get_args

import numpy as np

from confkd.config import WeakSource
from confkd.data.dataset import NnUNetDataset
from confkd.data.weak_labels import case_rng, make_weak_label
from confkd.errors import DatasetError
from confkd.io_utils import atomic_write_text

__all__ = [
    "FORMAT_VERSION",
    "WEAK_SOURCES",
    "Manifest",
    "ManifestEntry",
    "ManifestRule",
    "Supervision",
    "dataset_fingerprint",
]

FORMAT_VERSION = 1
WEAK_SOURCES: tuple[str, ...] = get_args(WeakSource)


class Supervision(str, Enum):
    """How a case is supervised during training."""

    STRONG = "strong"  # dense label
    WEAK = "weak"  # sparse label
    NONE = "none"  # image only (validation, test, unlabelled)


@dataclass(frozen=True)
class ManifestEntry:
    """One case. Paths are absolute in memory and relative to the dataset root on disk.

    ``weak_source`` is set for weak cases only: "scribbles" means read ``scribble_path``, any other source means
    generate the sparse label from ``label_path`` with the manifest's ``rule.weak_params``.
    """

    case: str
    patient: str
    split: str
    supervision: Supervision
    image_paths: tuple[Path, ...]
    label_path: Path | None
    scribble_path: Path | None
    weak_source: str | None = None


@dataclass(frozen=True)
class ManifestRule:
    """The inputs that built a manifest. ``strong_patients`` is the explicit list, or None when drawn with ``seed``."""

    split: str
    val_split: str | None
    n_strong: int
    seed: int
    weak_source: str
    strong_patients: tuple[str, ...] | None = None
    weak_params: Mapping[str, Any] = field(default_factory=dict)
    weak_seed: int = 0
    fold: int | None = None


# JSON schema of each object: field -> (JSON kind, nullable); kinds are the keys of _KIND_CHECKS
_ENTRY_SCHEMA = {
    "case": ("str", False), "patient": ("str", False), "split": ("str", False), "supervision": ("str", False),
    "image_paths": ("list[str]", False), "label_path": ("str", True), "scribble_path": ("str", True),
    "weak_source": ("str", True),
}  # fmt: skip
_RULE_SCHEMA = {
    "split": ("str", False), "val_split": ("str", True), "n_strong": ("int", False), "seed": ("int", False),
    "weak_source": ("str", False), "strong_patients": ("list[str]", True), "weak_params": ("object", False),
    "weak_seed": ("int", False), "fold": ("int", True),
}  # fmt: skip
_TOP_SCHEMA = {
    "format_version": ("int", False), "dataset_root": ("str", False), "fingerprint": ("str", False),
    "num_classes": ("int", False), "ignore_index": ("int", False), "rule": ("object", False),
    "entries": ("list", False),
}  # fmt: skip
_KIND_CHECKS = {
    "str": lambda v: isinstance(v, str),
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "object": lambda v: isinstance(v, dict),
    "list": lambda v: isinstance(v, list),
    "list[str]": lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
}


@dataclass(frozen=True)
class Manifest:
    """Every case of the training and validation splits with its supervision.

    ``ignore_index`` is the value unannotated voxels of sparse labels carry: the dataset's "ignore" label, or
    ``num_classes`` when dataset.json has none (datasets without scribbles).
    """

    entries: tuple[ManifestEntry, ...]
    rule: ManifestRule
    dataset_root: Path
    fingerprint: str
    num_classes: int
    ignore_index: int

    # ------------------------------------------------------------------ queries
    def strong_cases(self) -> tuple[ManifestEntry, ...]:
        return tuple(e for e in self.entries if e.supervision is Supervision.STRONG)

    def weak_cases(self) -> tuple[ManifestEntry, ...]:
        return tuple(e for e in self.entries if e.supervision is Supervision.WEAK)

    def cases(self, split: str) -> tuple[ManifestEntry, ...]:
        """The entries of ``split`` (e.g. "train" or "val")."""
        return tuple(e for e in self.entries if e.split == split)

    def strong_patients(self) -> tuple[str, ...]:
        return tuple(sorted({e.patient for e in self.strong_cases()}))

    def summary(self) -> dict[str, dict[str, int]]:
        """``{"strong": {"patients": p, "cases": c}, "weak": {...}, "none": {...}}``."""
        result: dict[str, dict[str, int]] = {}
        for kind in Supervision:
            chosen = [e for e in self.entries if e.supervision is kind]
            result[kind.value] = {"patients": len({e.patient for e in chosen}), "cases": len(chosen)}
        return result

    def weak_label_for(self, entry: ManifestEntry, label: np.ndarray, *, slice_axis: int | None) -> np.ndarray:
        """Generate ``entry``'s sparse label from its dense ``label`` with the recorded source and parameters.

        The random generator depends on ``rule.weak_seed`` and the case name only, not on the loading order.
        """
        if entry.weak_source in (None, "scribbles"):
            raise DatasetError(
                f"case {entry.case!r}: its sparse label is not generated (weak_source={entry.weak_source!r}); "
                f"read {entry.scribble_path} instead"
            )
        return make_weak_label(
            label,
            entry.weak_source,
            ignore_index=self.ignore_index,
            slice_axis=slice_axis,
            params=self.rule.weak_params,
            rng=case_rng(self.rule.weak_seed, entry.case),
        )

    # ------------------------------------------------------------------ persistence
    def to_json(self) -> str:
        """The manifest as JSON text, with paths relative to ``dataset_root``."""

        def rel(path: Path | None) -> str | None:
            if path is None:
                return None
            try:
                return path.relative_to(self.dataset_root).as_posix()
            except ValueError:
                return str(path)

        entries = [
            {
                **dataclasses.asdict(e),
                "supervision": e.supervision.value,
                "image_paths": [rel(p) for p in e.image_paths],
                "label_path": rel(e.label_path),
                "scribble_path": rel(e.scribble_path),
            }
            for e in self.entries
        ]
        data = {
            "format_version": FORMAT_VERSION,
            "dataset_root": str(self.dataset_root),
            "fingerprint": self.fingerprint,
            "num_classes": self.num_classes,
            "ignore_index": self.ignore_index,
            "rule": dataclasses.asdict(self.rule),  # tuples are written as JSON lists
            "entries": entries,
        }
        return json.dumps(data, indent=2) + "\n"

    def save(self, path: str | Path) -> None:
        """Write :meth:`to_json` to ``path`` atomically."""
        atomic_write_text(Path(path), self.to_json())

    @classmethod
    def load(cls, path: str | Path, dataset_root: str | Path | NnUNetDataset | None = None) -> Manifest:
        """Read a manifest written by :meth:`save`.

        With ``dataset_root`` (a folder or an opened dataset) paths are resolved against it and the dataset
        fingerprint is checked; otherwise against the root stored in the file. Raises :class:`DatasetError`.
        """
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except OSError as e:
            raise DatasetError(f"{path}: cannot read manifest ({e.strerror or e})") from e
        except json.JSONDecodeError as e:
            raise DatasetError(f"{path}: not valid JSON (line {e.lineno}: {e.msg}); rebuild the manifest") from e
        manifest = _manifest_from_dict(data, path, dataset_root)
        if dataset_root is not None:
            dataset = (
                dataset_root
                if isinstance(dataset_root, NnUNetDataset)
                else NnUNetDataset.open(dataset_root, fold=manifest.rule.fold or 0)
            )
            manifest.check_dataset(dataset, path)
        return manifest

    def check_dataset(self, dataset: NnUNetDataset, source: str | Path = "manifest") -> None:
        """Raise :class:`DatasetError` unless ``dataset`` has this manifest's fingerprint."""
        actual = dataset_fingerprint(dataset)
        if actual != self.fingerprint:
            raise DatasetError(
                f"{source}: built for a dataset with fingerprint {self.fingerprint[:12]}…, but {dataset.root} has "
                f"{actual[:12]}… (dataset.json, splits.json or the case list changed); rebuild the manifest"
            )


def dataset_fingerprint(dataset: NnUNetDataset) -> str:
    """SHA-256 of dataset.json's bytes, splits.json's bytes (empty when absent) and the sorted case names."""
    digest = hashlib.sha256()
    for name in ("dataset.json", "splits.json"):
        file = dataset.root / name
        content = file.read_bytes() if file.is_file() else b""
        digest.update(f"{name}:{len(content)}:".encode())
        digest.update(content)
    digest.update("\n".join(sorted(c.name for c in dataset.cases)).encode("utf-8"))
    return digest.hexdigest()


# ---------------------------------------------------------------------- loading
def _checked(data: Any, schema: Mapping[str, tuple[str, bool]], where: str, path: Path) -> dict[str, Any]:
    """``data`` as a dict after checking it has exactly the fields of ``schema``, each of the right JSON kind."""
    if not isinstance(data, Mapping):
        raise DatasetError(f"{path}: {where} must be a JSON object with fields {', '.join(schema)}")
    unknown = sorted(map(str, set(data) - set(schema)))
    if unknown:
        raise DatasetError(
            f"{path}: unknown field{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} in {where}; "
            f"valid fields: {', '.join(schema)}"
        )
    missing = [k for k in schema if k not in data]
    if missing:
        raise DatasetError(f"{path}: {where} lacks {', '.join(missing)}; rebuild the manifest")
    for key, (kind, nullable) in schema.items():
        value = data[key]
        if not (value is None and nullable) and not _KIND_CHECKS[kind](value):
            shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
            raise DatasetError(f"{path}: {where}.{key} must be {kind}{' or null' if nullable else ''}, got {shown}")
    return dict(data)


def _manifest_from_dict(data: Any, path: Path, dataset_root: str | Path | NnUNetDataset | None) -> Manifest:
    top = _checked(data, _TOP_SCHEMA, "the manifest", path)
    if top["format_version"] != FORMAT_VERSION:
        raise DatasetError(
            f"{path}: format_version {top['format_version']!r} is not supported (expected {FORMAT_VERSION})"
        )
    if isinstance(dataset_root, NnUNetDataset):
        root = dataset_root.root
    elif dataset_root is not None:
        root = Path(dataset_root).expanduser().resolve()
    else:
        root = Path(top["dataset_root"])

    rule = _checked(top["rule"], _RULE_SCHEMA, "rule", path)
    if rule["weak_source"] not in WEAK_SOURCES:
        raise DatasetError(f"{path}: rule.weak_source {rule['weak_source']!r} is not one of {', '.join(WEAK_SOURCES)}")
    if rule["strong_patients"] is not None:
        rule["strong_patients"] = tuple(rule["strong_patients"])

    valid_supervision = [s.value for s in Supervision]
    entries = []
    for i, raw in enumerate(top["entries"]):
        item = _checked(raw, _ENTRY_SCHEMA, f"entries[{i}]", path)
        if item["supervision"] not in valid_supervision:
            raise DatasetError(
                f"{path}: entries[{i}].supervision {item['supervision']!r} is not one of {', '.join(valid_supervision)}"
            )
        item["supervision"] = Supervision(item["supervision"])
        item["image_paths"] = tuple(root / p for p in item["image_paths"])
        for key in ("label_path", "scribble_path"):
            item[key] = None if item[key] is None else root / item[key]
        entries.append(ManifestEntry(**item))
    return Manifest(
        entries=tuple(entries),
        rule=ManifestRule(**rule),
        dataset_root=root,
        fingerprint=top["fingerprint"],
        num_classes=top["num_classes"],
        ignore_index=top["ignore_index"],
    )
