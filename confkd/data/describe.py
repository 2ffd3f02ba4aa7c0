"""A human-readable summary of a volume's geometry (used by ``confkd info`` and QA reports)."""

from __future__ import annotations

from typing import Any

import numpy as np

from confkd.data.volume import Volume

__all__ = ["describe_volume", "obliquity_degrees"]


def obliquity_degrees(affine: np.ndarray) -> float:
    """Largest angle (degrees) between a voxel axis and the nearest world axis; 0 for axis-aligned volumes."""
    rot = np.asarray(affine, dtype=np.float64)[:3, :3]
    norms = np.linalg.norm(rot, axis=0)
    norms[norms == 0] = 1.0
    cosines = np.abs(rot / norms).max(axis=0)
    return float(np.degrees(np.arccos(np.clip(cosines, -1.0, 1.0))).max())


def describe_volume(volume: Volume) -> dict[str, Any]:
    """Shape, spacing, orientation code (e.g. ``"LPS"``), obliquity, qform/sform codes and dtype of a volume."""
    import nibabel as nib

    codes = "-"
    header = volume.header
    if header is not None and hasattr(header, "get_qform"):
        q = int(header.get_qform(coded=True)[1] or 0)
        s = int(header.get_sform(coded=True)[1] or 0)
        codes = f"{q}/{s}"
    return {
        "format": volume.format,
        "shape": tuple(int(n) for n in volume.shape),
        "spacing": tuple(float(x) for x in volume.spacing),
        "orientation": "".join(nib.orientations.aff2axcodes(volume.affine)),
        "obliquity_deg": obliquity_degrees(volume.affine),
        "codes": codes,
        "dtype": str(volume.array.dtype),
    }
