"""The exceptions the library raises. The CLI maps them to exit codes and one-line messages.

Every message names the offending file or value and, where there is one, the fix.

Hierarchy (each also derives from the built-in exception that describes it, so generic handlers keep working)::

    ConfKDError
    ├── ConfigError            ValueError
    ├── DatasetError           ValueError
    ├── GeometryError          ValueError
    ├── VolumeReadError        OSError
    │   └── UnsupportedImageError
    ├── VolumeWriteError       OSError
    ├── ModelFileError         ValueError
    │   ├── CheckpointError
    │   └── ManifestError
    ├── ExportError            RuntimeError
    │   └── VerificationError
    ├── RunDirectoryError      ValueError
    ├── DeviceError            RuntimeError
    └── DistributedError       RuntimeError
"""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "ConfKDError",
    "ConfigError",
    "DatasetError",
    "DeviceError",
    "DistributedError",
    "ExportError",
    "GeometryError",
    "ManifestError",
    "ModelFileError",
    "RunDirectoryError",
    "UnsupportedImageError",
    "VerificationError",
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


class ModelFileError(ConfKDError, ValueError):
    """A trained-model file (checkpoint, exported student, engine) is missing, corrupt, foreign or too new.

    Export and inference raise a subclass of this for their own artefacts, so a caller that loads "a model" can
    catch one exception whatever the file's kind.
    """


class CheckpointError(ModelFileError):
    """A file is not a readable confkd checkpoint (foreign, corrupt, truncated or from a newer version)."""


class ManifestError(ModelFileError):
    """An exported model directory's ``manifest.json`` is missing, invalid, or does not match its ONNX file."""


class ExportError(ConfKDError, RuntimeError):
    """A model cannot be exported (ONNX export, checker, teacher weights in the graph, TensorRT build)."""


class VerificationError(ExportError):
    """The exported graph disagrees with PyTorch beyond the documented tolerances."""


class RunDirectoryError(ConfKDError, ValueError):
    """The run directory cannot be used (not empty without resume, nothing to resume, a file in the way)."""


class DeviceError(ConfKDError, RuntimeError):
    """The requested device does not exist on this machine (e.g. cuda requested but torch sees no GPU)."""


class DistributedError(ConfKDError, RuntimeError):
    """The torchrun environment is inconsistent or the process group cannot be set up."""
