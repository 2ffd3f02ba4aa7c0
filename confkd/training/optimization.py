"""What a run optimises and how: the branches the objective reaches, the optimiser, the LR schedule, the budget.

Decoder branches the ConfKD objective can never reach (the teacher when ``lambda_strong == 0``; the student when
every student term has weight 0) are frozen (``requires_grad=False``) and left out of the optimiser. Under DDP
(``find_unused_parameters=False``) that is what keeps such a branch from being waited for: DDP expects no gradient
for a frozen parameter, and no step pays for the unused-parameter search.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from confkd.config import LossConfig, TrainConfig
from confkd.errors import ConfigError
from confkd.training.network import DualBranchUNet

__all__ = ["build_optimizer", "freeze_unreachable_branches", "lr_factor", "total_steps"]


def freeze_unreachable_branches(model: nn.Module, loss: LossConfig) -> list[str]:
    """Freeze the decoders the objective never back-propagates into; returns their names (``teacher``, ``student``)."""
    if not isinstance(model, DualBranchUNet):
        return []  # one decoder serves both outputs
    student_terms = (loss.lambda_weak, loss.lambda_kl, loss.lambda_ent, loss.lambda_pseudo, float(loss.student_strong))
    teacher_used = loss.lambda_strong > 0  # the KL term detaches the teacher
    # with every weight 0 the objective returns student.sum() * 0, which still reaches the student
    student_used = any(w > 0 for w in student_terms) or not teacher_used
    frozen = [name for name, used in (("teacher", teacher_used), ("student", student_used)) if not used]
    for name in frozen:
        getattr(model, name).requires_grad_(False)
    return frozen


def build_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """``train.optimizer`` (Adam or AdamW) over the parameters that train; fused kernels on CUDA."""
    params = [p for p in model.parameters() if p.requires_grad]
    kwargs: dict[str, Any] = {"lr": cfg.lr, "betas": cfg.betas, "weight_decay": cfg.weight_decay}
    if device.type == "cuda":
        kwargs["fused"] = True
    opt_cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return opt_cls(params, **kwargs)


def lr_factor(schedule: str, total: int) -> Callable[[int], float]:
    """Per-step LR multiplier: constant, cosine (to 0 at ``total``) or poly (nnU-Net's ``(1 - t)^0.9``)."""
    if schedule == "constant":
        return lambda step: 1.0
    if schedule == "cosine":
        return lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))
    if schedule == "poly":
        return lambda step: max(0.0, 1.0 - step / total) ** 0.9
    raise ConfigError(f"train.schedule={schedule!r}; available options are: constant, cosine, poly")


def total_steps(cfg: TrainConfig, num_items: int, global_batch: int) -> int:
    """``train.iterations``, or ``epochs x ceil(training items / global batch)`` when ``train.epochs`` is set."""
    if cfg.epochs is None:
        return cfg.iterations
    return cfg.epochs * max(1, math.ceil(num_items / global_batch))
