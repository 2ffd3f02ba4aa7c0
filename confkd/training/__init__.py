"""Training: the dual-branch network, the ConfKD losses, augmentation, checkpoints and the training loop.

:func:`train` and :class:`TrainResult` are loaded on first use: the loop pulls in the data pipeline, the metrics
(SciPy) and the inference path, which ``import confkd.training`` alone should not pay for.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from confkd.training.augment import augment_batch
from confkd.training.checkpoint import build_model_from_checkpoint, load_checkpoint
from confkd.training.losses import (
    ConfKDLoss,
    confidence_from_probabilities,
    confkd_objective,
    cross_entropy,
    entropy,
    kl_distillation,
    partial_cross_entropy,
    pseudo_mask_cross_entropy,
)
from confkd.training.network import MODELS, BranchOutputs, DualBranchUNet, UNet, count_parameters, create_model

if TYPE_CHECKING:
    from confkd.training.trainer import TrainResult, train

_LAZY = {"train": "trainer", "TrainResult": "trainer"}

__all__ = [
    "MODELS",
    "BranchOutputs",
    "ConfKDLoss",
    "DualBranchUNet",
    "TrainResult",
    "UNet",
    "augment_batch",
    "build_model_from_checkpoint",
    "confidence_from_probabilities",
    "confkd_objective",
    "count_parameters",
    "create_model",
    "cross_entropy",
    "entropy",
    "kl_distillation",
    "load_checkpoint",
    "partial_cross_entropy",
    "pseudo_mask_cross_entropy",
    "train",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'confkd.training' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"confkd.training.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
