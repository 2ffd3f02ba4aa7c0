"""The exceptions the library raises. The CLI maps them to exit codes and one-line messages.

Every message names the offending file or value and, where there is one, the fix.
"""

from __future__ import annotations

__all__ = [
    "ConfKDError",
    "ConfigError",
    "DatasetError",
    "GeometryError",
    "UnsupportedImageError",
    "VolumeReadError",
    "VolumeWriteError",
]


class ConfKDError(Exception):
    """Base class of every error confkd raises on purpose (bad input, bad config, bad artefact)."""


class ConfigError(ConfKDError, ValueError):
    """A configuration file or override is invalid (unknown key, wrong type, bad value)."""


class VolumeReadError(ConfKDError, OSError):
    """A medical image could not be read (missing, unreadable, corrupt, unknown format)."""


class UnsupportedImageError(VolumeReadError):
    """An image was read but cannot be handled (dimensionality, data type, ...)."""


class GeometryError(ConfKDError, ValueError):
    """An image's geometry is unusable or two geometries disagree (singular affine, shape mismatch, ...)."""


class VolumeWriteError(ConfKDError, OSError):
    """An output volume could not be written."""


class DatasetError(ConfKDError, ValueError):
    """A dataset folder, dataset.json, splits.json or case manifest is missing or inconsistent."""
