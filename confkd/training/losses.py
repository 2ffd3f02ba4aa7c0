"""The terms of the ConfKD objective, as pure functions, and their weighted combination.

Conventions shared by every function here:

* ``logits`` are ``[N, C, *spatial]`` (any number of spatial dims, including none); label maps are
  ``[N, *spatial]`` integers; per-voxel ``mask`` arguments are boolean ``[N, *spatial]`` or anything that
  broadcasts to it (``[N, 1, 1]`` selects whole images).
* Every reduction is a mean over the selected voxels and is *exactly* zero, with zero (not NaN) gradients,
  when no voxel is selected, so a batch without strong or without weak images needs no special case.
* Rows are selected with masks rather than boolean indexing: no host sync, static shapes
  (``torch.compile``-friendly), at the price of computing a cheap per-voxel term on unselected rows.
* float16/bfloat16 logits are upcast to float32 before any softmax.
* Logits must be finite; very confident logits (probabilities that underflow to 0) are fine.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from confkd.config import LossConfig
from confkd.errors import ConfigError, DatasetError, GeometryError
from confkd.training.network import BranchOutputs

__all__ = [
    "ConfKDLoss",
    "ObjectiveOutput",
    "confidence_from_probabilities",
    "confkd_objective",
    "cross_entropy",
    "entropy",
    "entropy_map",
    "kl_distillation",
    "partial_cross_entropy",
    "pseudo_mask_cross_entropy",
]


# --------------------------------------------------------------------------------------------- helpers
def _upcast(x: Tensor) -> Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _check_logits(logits: Tensor, name: str = "logits") -> None:
    if logits.dim() < 2:
        raise GeometryError(f"{name} must be [N, C, *spatial], got shape {tuple(logits.shape)}")


def _check_labels_shape(logits: Tensor, target: Tensor, name: str) -> None:
    _check_logits(logits)
    expected = (logits.shape[0], *logits.shape[2:])
    if tuple(target.shape) != expected:
        raise GeometryError(
            f"{name} has shape {tuple(target.shape)} but logits {tuple(logits.shape)} need {expected} ([N, *spatial])"
        )
    if target.dtype.is_floating_point or target.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer class indices, got dtype {target.dtype}")


def _check_mask(mask: Tensor | None, voxel_shape: tuple[int, ...]) -> None:
    if mask is None:
        return
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor, got dtype {mask.dtype}")
    try:
        ok = torch.broadcast_shapes(mask.shape, voxel_shape) == voxel_shape
    except RuntimeError as e:
        raise GeometryError(
            f"mask of shape {tuple(mask.shape)} does not broadcast to the voxel shape {voxel_shape}"
        ) from e
    if not ok:
        raise GeometryError(f"mask of shape {tuple(mask.shape)} does not broadcast to the voxel shape {voxel_shape}")


def _masked_mean(values: Tensor, mask: Tensor | None) -> Tensor:
    """Mean of ``values`` over ``mask`` (broadcast); exactly 0 with zero gradients when nothing is selected."""
    if mask is None:
        return values.sum() / max(values.numel(), 1)
    mask = mask.expand(values.shape)
    # torch.where, not values * mask: an inf/NaN in an unselected voxel must not leak into the sum
    return torch.where(mask, values, 0).sum() / mask.sum().clamp_min(1)


def _check_label_range(target: Tensor, num_classes: int, valid: Tensor | None, ignore_index: int | None) -> None:
    # note: this is a CPU-GPU sync point; it turns CUDA's opaque device-side assert into a readable error
    bad = (target < 0) | (target >= num_classes)
    if valid is not None:
        bad = bad & valid
    if bool(bad.any()):
        value = int(target[bad][0])
        raise DatasetError(
            f"label value {value} is outside [0, {num_classes}) and is not the ignore index ({ignore_index}): "
            f"the labels do not match model.num_classes={num_classes}, or they use another ignore index"
        )


# ------------------------------------------------------------------------------------ supervised terms
def cross_entropy(
    logits: Tensor, target: Tensor, ignore_index: int | None = None, *, mask: Tensor | None = None
) -> Tensor:
    """Cross-entropy averaged over the voxels that are labelled (``!= ignore_index``) and selected by ``mask``.

    Exactly 0 (with zero gradients) when no voxel qualifies. Labels outside ``[0, C)`` that are not
    ``ignore_index`` raise :class:`~confkd.errors.DatasetError`.

    Shape:
        - logits: ``[N, C, *spatial]``
        - target: ``[N, *spatial]``, integer class indices (any integer dtype)
        - mask: ``[N, *spatial]`` bool, or broadcastable to it; ``None`` selects every voxel
        - Output: scalar
    """
    _check_labels_shape(logits, target, "target")
    voxel_shape = tuple(target.shape)
    _check_mask(mask, voxel_shape)
    valid: Tensor | None = None
    if ignore_index is not None:
        valid = target != ignore_index
    if mask is not None:
        valid = mask.expand(voxel_shape) if valid is None else valid & mask
    _check_label_range(target, logits.shape[1], valid, ignore_index)
    target = target.long()
    # unselected voxels may hold anything (ignore index, garbage in rows of the other kind): point them at
    # class 0 so cross_entropy stays in range; _masked_mean drops them
    safe = target if valid is None else torch.where(valid, target, 0)
    per_voxel = F.cross_entropy(_upcast(logits), safe, reduction="none")
    return _masked_mean(per_voxel, valid)


def partial_cross_entropy(logits: Tensor, sparse: Tensor, ignore_index: int, *, mask: Tensor | None = None) -> Tensor:
    """Partial cross-entropy: CE over the annotated voxels of a sparse label map only.

    Voxels equal to ``ignore_index`` are unannotated: their logits get no gradient and do not change the
    value. Mean over annotated (and ``mask``-selected) voxels; exactly 0, with zero gradients, when none is
    annotated.

    Shape:
        - logits: ``[N, C, *spatial]``
        - sparse: ``[N, *spatial]``, integer, ``ignore_index`` where unannotated
        - mask: ``[N, *spatial]`` bool or broadcastable; ``None`` selects every voxel
        - Output: scalar
    """
    return cross_entropy(logits, sparse, ignore_index, mask=mask)


# -------------------------------------------------------------------------------------- distillation
def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ConfigError(f"the distillation temperature (loss.temperature) must be > 0, got {temperature!r}")


def kl_distillation(
    student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0, mask: Tensor | None = None
) -> Tensor:
    """``T^2 * KL(p_t || p_s)`` with ``p = softmax(logits / T)``, averaged over the (masked) voxels.

    ``KL(p_t || p_s) = sum_c p_t,c (log p_t,c - log p_s,c)`` per voxel. The teacher is detached here, so no
    gradient reaches it through this term. Both log-probabilities come from ``log_softmax`` (no log of a
    softmax). The ``T^2`` factor keeps gradient magnitudes comparable across temperatures (Hinton et al.).

    Shape:
        - student_logits, teacher_logits: ``[N, C, *spatial]``
        - mask: ``[N, *spatial]`` bool or broadcastable; ``None`` selects every voxel
        - Output: scalar
    """
    _check_logits(student_logits, "student_logits")
    if student_logits.shape != teacher_logits.shape:
        raise GeometryError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} differ"
        )
    _check_temperature(temperature)
    _check_mask(mask, (student_logits.shape[0], *student_logits.shape[2:]))
    log_ps = F.log_softmax(_upcast(student_logits) / temperature, dim=1)
    log_pt = F.log_softmax(_upcast(teacher_logits.detach()) / temperature, dim=1)
    # a p_t that underflows to 0 multiplies a finite difference: the term is 0, never NaN
    per_voxel = (log_pt.exp() * (log_pt - log_ps)).sum(dim=1)
    return _masked_mean(per_voxel, mask) * (temperature * temperature)


# ------------------------------------------------------------------------------------------- entropy
def _log_num_classes(num_classes: int) -> float:
    if num_classes < 2:
        raise ConfigError(f"a normalised entropy needs at least 2 classes, got {num_classes}")
    return math.log(num_classes)


def entropy_map(logits: Tensor, normalize: bool = False) -> Tensor:
    """Per-voxel Shannon entropy ``H = -sum_c p_c log p_c`` of ``softmax(logits)`` (nats; ``/ log C`` if ``normalize``).

    Computed as ``logsumexp(z) - sum_c p_c z_c`` on max-shifted logits ``z``: exact for uniform logits
    (``H = log C``), 0 (not NaN) for classes whose probability underflows, finite gradients everywhere.

    Shape:
        - logits: ``[N, C, *spatial]``
        - Output: ``[N, *spatial]``
    """
    _check_logits(logits)
    z = _upcast(logits)
    # softmax is shift-invariant, so the max carries no gradient worth keeping
    z = z - z.amax(dim=1, keepdim=True).detach()
    h = torch.logsumexp(z, dim=1) - (torch.softmax(z, dim=1) * z).sum(dim=1)
    if normalize:
        h = h / _log_num_classes(logits.shape[1])
    return h


def entropy(logits: Tensor, normalize: bool = False, mask: Tensor | None = None) -> Tensor:
    """Mean Shannon entropy of ``softmax(logits)`` over the (masked) voxels; minimising it sharpens predictions.

    Shape:
        - logits: ``[N, C, *spatial]``
        - mask: ``[N, *spatial]`` bool or broadcastable; ``None`` selects every voxel
        - Output: scalar (in ``[0, log C]``, or ``[0, 1]`` when ``normalize``)
    """
    _check_logits(logits)
    _check_mask(mask, (logits.shape[0], *logits.shape[2:]))
    return _masked_mean(entropy_map(logits, normalize), mask)


def confidence_from_probabilities(probs: Tensor, class_dim: int = 1) -> Tensor:
    """Per-voxel confidence ``1 - H(p) / log C`` of a probability map, clamped to ``[0, 1]``.

    1 for a one-hot distribution, 0 for a uniform one. ``0 log 0`` is taken as 0. ``probs`` are used as
    given (already averaged over test-time augmentations or tiles, for instance); no gradient is intended.

    Shape:
        - probs: ``[N, C, *spatial]`` (``class_dim=1``) or ``[C, *spatial]`` (``class_dim=0``)
        - Output: ``probs``'s shape without ``class_dim``
    """
    p = _upcast(probs).clamp_min(0)
    h = -torch.special.xlogy(p, p).sum(dim=class_dim)
    return (1.0 - h / _log_num_classes(probs.shape[class_dim])).clamp(0.0, 1.0)


def pseudo_mask_cross_entropy(logits: Tensor, threshold: float = 0.0, mask: Tensor | None = None) -> Tensor:
    """CE of the predictions against their own detached argmax (the paper's pseudo-mask baseline).

    Voxels whose maximum probability is below ``threshold`` are excluded; the mean is over the remaining
    (masked) voxels, exactly 0 when none remains.

    Shape:
        - logits: ``[N, C, *spatial]``
        - mask: ``[N, *spatial]`` bool or broadcastable; ``None`` selects every voxel
        - Output: scalar
    """
    _check_logits(logits)
    if not 0.0 <= threshold <= 1.0:
        raise ConfigError(f"the pseudo-mask threshold (loss.pseudo_threshold) must be in [0, 1], got {threshold!r}")
    _check_mask(mask, (logits.shape[0], *logits.shape[2:]))
    log_p = F.log_softmax(_upcast(logits), dim=1)
    max_log_p, pseudo = log_p.detach().max(dim=1)
    nll = -log_p.gather(1, pseudo.unsqueeze(1)).squeeze(1)
    keep: Tensor | None = None
    if threshold > 0:
        keep = max_log_p.exp() >= threshold
    if mask is not None:
        keep = mask.expand(nll.shape) if keep is None else keep & mask
    return _masked_mean(nll, keep)


# ---------------------------------------------------------------------------------------- the objective
class ObjectiveOutput(NamedTuple):
    """``total``: the weighted sum to backpropagate. ``terms``: each computed term's *unweighted*, detached
    value (zero-weight terms are absent), for logging."""

    total: Tensor
    terms: dict[str, Tensor]


def confkd_objective(
    outputs: BranchOutputs,
    is_strong: Tensor,
    dense: Tensor,
    sparse: Tensor,
    cfg: LossConfig,
    ignore_index: int,
) -> ObjectiveOutput:
    """The ConfKD objective (see :class:`~confkd.config.LossConfig`)::

        total = lambda_strong * CE(teacher, dense)             on strong images
              + lambda_weak   * pCE(student, sparse)           on weak images
              + lambda_kl     * T^2 KL(teacher_T || student_T) on ``kl_on`` images (teacher detached)
              + lambda_ent    * H(student)                     on ``entropy_on`` images
              + lambda_pseudo * CE(student, argmax student)    on ``entropy_on`` images
              + CE(student, dense) on strong images            if ``student_strong`` (weight 1)

    Each term is a mean over its own voxels, so it is exactly 0 in a batch without the images it needs.
    Zero-weight terms are not computed. ``ignore_index`` marks unlabelled voxels in ``sparse`` and, if
    present, in ``dense`` (padding). With a single-branch :class:`~confkd.training.network.UNet`,
    teacher and student are the same tensor: use ``lambda_strong`` *or* ``student_strong``, not both.

    Shape:
        - outputs: :class:`BranchOutputs` of two ``[N, C, *spatial]`` logit tensors
        - is_strong: ``[N]`` bool, True for densely labelled images
        - dense: ``[N, *spatial]`` integer; read only on strong rows
        - sparse: ``[N, *spatial]`` integer; read only on weak rows
        - Output: :class:`ObjectiveOutput` (scalar total, dict of scalars)
    """
    student, teacher = outputs.student, outputs.teacher
    _check_logits(student, "student logits")
    if is_strong.dtype != torch.bool or tuple(is_strong.shape) != (student.shape[0],):
        raise GeometryError(
            f"is_strong must be a bool tensor of shape ({student.shape[0]},), "
            f"got {is_strong.dtype} {tuple(is_strong.shape)}"
        )
    strong = is_strong.reshape(-1, *([1] * (student.dim() - 2)))
    weak = ~strong
    coverage: dict[str, Tensor | None] = {"strong": strong, "weak": weak, "all": None}

    terms: dict[str, Tensor] = {}
    total: Tensor | None = None

    def add(name: str, weight: float, value: Tensor) -> None:
        nonlocal total
        terms[name] = value.detach()
        weighted = value * weight
        total = weighted if total is None else total + weighted

    if cfg.lambda_strong:
        add("strong_ce", cfg.lambda_strong, cross_entropy(teacher, dense, ignore_index, mask=strong))
    if cfg.lambda_weak:
        add("weak_pce", cfg.lambda_weak, partial_cross_entropy(student, sparse, ignore_index, mask=weak))
    if cfg.lambda_kl:
        kl = kl_distillation(student, teacher, cfg.temperature, mask=coverage[cfg.kl_on])
        add("kl", cfg.lambda_kl, kl)
    if cfg.lambda_ent:
        ent = entropy(student, normalize=cfg.entropy_normalize, mask=coverage[cfg.entropy_on])
        add("entropy", cfg.lambda_ent, ent)
    if cfg.lambda_pseudo:
        pseudo = pseudo_mask_cross_entropy(student, cfg.pseudo_threshold, mask=coverage[cfg.entropy_on])
        add("pseudo_ce", cfg.lambda_pseudo, pseudo)
    if cfg.student_strong:
        add("student_strong_ce", 1.0, cross_entropy(student, dense, ignore_index, mask=strong))
    if total is None:
        # every weight is zero: still return a graph-connected zero so an unconditional backward() works
        total = student.sum() * 0.0
    return ObjectiveOutput(total, terms)


class ConfKDLoss(nn.Module):
    """:func:`confkd_objective` bound to a :class:`LossConfig` (which validates itself) and an ignore index."""

    def __init__(self, cfg: LossConfig, ignore_index: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.ignore_index = ignore_index

    def forward(self, outputs: BranchOutputs, is_strong: Tensor, dense: Tensor, sparse: Tensor) -> ObjectiveOutput:
        return confkd_objective(outputs, is_strong, dense, sparse, self.cfg, self.ignore_index)
