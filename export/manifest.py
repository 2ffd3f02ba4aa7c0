"""Building an exported model's manifest (the schema and the reader live in :mod:`confkd.inference.manifest`).

The manifest and the ONNX ``metadata_props`` carry the same facts (every field but ``onnx_sha256`` and
``verification``, which only exist after the file is written), each value as JSON text in the metadata.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from confkd.inference.manifest import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST_NAME,
    MANIFEST_ONLY_FIELDS,
    Bounds,
    Manifest,
    canonical_json,
    default_bounds,
    file_sha256,
    load_manifest,
    manifest_from_dict,
)

__all__ = [
    "MANIFEST_NAME",
    "METADATA_ONLY_IN_MANIFEST",
    "Bounds",
    "Manifest",
    "build_manifest",
    "config_sha256",
    "default_bounds",
    "file_sha256",
    "load_manifest",
    "manifest_from_dict",
    "metadata_from_props",
    "metadata_props",
]

#: manifest fields that the ONNX metadata cannot hold (they are computed from the written file)
METADATA_ONLY_IN_MANIFEST = MANIFEST_ONLY_FIELDS


def config_sha256(config: Mapping[str, Any]) -> str:
    """sha256 of the training config as canonical JSON (sorted keys, no whitespace)."""
    return hashlib.sha256(canonical_json(config).encode("utf-8")).hexdigest()


def build_manifest(fields: Mapping[str, Any]) -> Manifest:
    """The format fields added to ``fields``, validated strictly."""
    return manifest_from_dict({"format": FORMAT, "format_version": FORMAT_VERSION, **fields})


def metadata_props(manifest_fields: Mapping[str, Any]) -> dict[str, str]:
    """ONNX ``metadata_props``: ``confkd.<field>`` -> the field as JSON text."""
    return {
        f"confkd.{k}": json.dumps(v, sort_keys=True)
        for k, v in manifest_fields.items()
        if k not in METADATA_ONLY_IN_MANIFEST
    }


def metadata_from_props(props: Mapping[str, str]) -> dict[str, Any]:
    """Inverse of :func:`metadata_props` (other producers' keys are ignored)."""
    return {k[len("confkd.") :]: json.loads(v) for k, v in props.items() if k.startswith("confkd.")}
