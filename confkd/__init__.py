"""confkd: medical image segmentation with mixed supervision (ConfKD), from training to deployment.

Liu, Desrosiers, Ben Ayed, Dolz. "Segmentation with mixed supervision: confidence maximization helps
knowledge distillation." Medical Image Analysis, 2022 (arXiv:2109.10902).

Importing ``confkd`` is cheap and CPU-safe: it never imports typer, onnxruntime or tensorrt.
"""

from __future__ import annotations

from importlib import metadata as _metadata

from confkd.config import Config, load_config
from confkd.errors import ConfigError, ConfKDError, DatasetError, GeometryError, VolumeReadError

try:
    __version__ = _metadata.version("confkd")
except _metadata.PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

__all__ = [
    "ConfKDError",
    "Config",
    "ConfigError",
    "DatasetError",
    "GeometryError",
    "VolumeReadError",
    "__version__",
    "load_config",
]
