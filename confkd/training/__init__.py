"""Training: the dual-branch network and the ConfKD losses."""

from __future__ import annotations

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

__all__ = [
    "MODELS",
    "BranchOutputs",
    "ConfKDLoss",
    "DualBranchUNet",
    "UNet",
    "confidence_from_probabilities",
    "confkd_objective",
    "count_parameters",
    "create_model",
    "cross_entropy",
    "entropy",
    "kl_distillation",
    "partial_cross_entropy",
    "pseudo_mask_cross_entropy",
]
