"""Data: volumes with their geometry, nnU-Net-layout datasets, case manifests, weak labels, preprocessing.

Names are loaded on first use, so that ``import confkd.data.volume`` (used by ``confkd info``) does not pay for
torch, which only :mod:`confkd.data.preprocessing` needs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "Volume": "volume",
    "read_volume": "volume",
    "write_volume": "volume",
    "image_format": "volume",
    "describe_volume": "describe",
    "Case": "dataset",
    "NnUNetDataset": "dataset",
    "Manifest": "manifest",
    "ManifestEntry": "manifest",
    "Supervision": "manifest",
    "build_manifest": "manifest",
    "build_manifest_from_config": "manifest",
    "make_weak_label": "weak_labels",
    "erosion_seeds": "weak_labels",
    "random_discs": "weak_labels",
    "bbox_interior": "weak_labels",
    "PreprocessState": "preprocessing",
    "preprocess": "preprocessing",
    "preprocess_label": "preprocessing",
    "invert": "preprocessing",
    "invert_labels": "preprocessing",
    "median_spacing": "preprocessing",
    "make_phantom": "phantoms",
    "write_phantom_dataset": "phantoms",
}

__all__ = [
    "Case",
    "Manifest",
    "ManifestEntry",
    "NnUNetDataset",
    "PreprocessState",
    "Supervision",
    "Volume",
    "bbox_interior",
    "build_manifest",
    "build_manifest_from_config",
    "describe_volume",
    "erosion_seeds",
    "image_format",
    "invert",
    "invert_labels",
    "make_phantom",
    "make_weak_label",
    "median_spacing",
    "preprocess",
    "preprocess_label",
    "random_discs",
    "read_volume",
    "write_phantom_dataset",
    "write_volume",
]

if TYPE_CHECKING:
    from confkd.data.dataset import Case, NnUNetDataset
    from confkd.data.describe import describe_volume
    from confkd.data.manifest import Manifest, ManifestEntry, Supervision, build_manifest, build_manifest_from_config
    from confkd.data.phantoms import make_phantom, write_phantom_dataset
    from confkd.data.preprocessing import (
        PreprocessState,
        invert,
        invert_labels,
        median_spacing,
        preprocess,
        preprocess_label,
    )
    from confkd.data.volume import Volume, image_format, read_volume, write_volume
    from confkd.data.weak_labels import bbox_interior, erosion_seeds, make_weak_label, random_discs


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'confkd.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"confkd.data.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
