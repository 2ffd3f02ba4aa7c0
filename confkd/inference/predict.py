"""A simple whole-volume predictor: preprocess -> batched network passes -> probabilities on the input grid.

Used by validation during training (it returns the teacher's probabilities too, from the same forward pass) and
as the reference the inference engine (:mod:`confkd.inference.engine`) is tested against: both preprocess with
:func:`preprocess_image` and give the same student argmax. Every step is the one training used: :func:`preprocess_image`
is also what :mod:`confkd.training.data` calls, so training and inference cannot drift apart.

Softmax happens in network space and the *probabilities* are resampled back to the input grid
(:func:`~confkd.data.preprocessing.invert`, bilinear / trilinear), as nnU-Net does: a convex combination of
distributions is a distribution, so the result sums to 1 per voxel and the argmax is taken on the original grid.

3D volumes go through the network whole (no sliding window): fine for cropped data such as the hippocampus set;
large 3D scans go through the engine, which tiles them and keeps memory bounded (labels and confidence only,
never the ``K x volume`` probabilities on the input grid).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from confkd.config import PreprocessConfig
from confkd.data.preprocessing import PreprocessState, invert, preprocess
from confkd.data.volume import Volume
from confkd.errors import GeometryError

__all__ = ["DEFAULT_BATCH_SIZE", "VolumePrediction", "forward_probabilities", "predict_volume", "preprocess_image"]

#: slices per forward pass (2D)
DEFAULT_BATCH_SIZE = 16

ArrayLike = np.ndarray | Tensor


def preprocess_image(
    channels: Sequence[ArrayLike],
    spacing: Sequence[float],
    cfg: PreprocessConfig,
    *,
    target_spacing: Sequence[float] | None = None,
    device: str | torch.device | None = None,
) -> tuple[Tensor, PreprocessState]:
    """Preprocess each channel of one case (intensities normalised per channel, as nnU-Net) and stack them.

    Shape:
        ``C`` arrays ``[i, j, k]`` (same shape) -> float32 ``[S, C, H', W']`` (2D) or ``[1, C, D', H', W']`` (3D),
        and the geometry shared by the channels (the first channel's :class:`PreprocessState`).
    """
    if len(channels) == 0:
        raise GeometryError("preprocess_image: no image channels given")
    shapes = {tuple(c.shape) for c in channels}
    if len(shapes) != 1:
        raise GeometryError(f"the image channels of one case must have the same shape, got {sorted(shapes)}")
    first, state = preprocess(channels[0], spacing, cfg, device=device, target_spacing=target_spacing)
    if len(channels) == 1:
        return first, state
    rest = [preprocess(c, spacing, cfg, device=device, target_spacing=target_spacing)[0] for c in channels[1:]]
    return torch.cat([first, *rest], dim=1), state


@dataclass(frozen=True)
class VolumePrediction:
    """Class probabilities on the input grid, ``[C, i, j, k]`` float32, summing to 1 over ``C``.

    ``teacher`` is set for models that return :class:`~confkd.training.network.BranchOutputs` (for the
    single-branch U-Net it equals ``student``); ``None`` for plain one-output networks (an exported student).
    """

    student: Tensor
    teacher: Tensor | None
    state: PreprocessState


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager[object]:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


@torch.no_grad()
def forward_probabilities(
    model: nn.Module,
    x: Tensor,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    autocast_dtype: torch.dtype | None = None,
) -> dict[str, Tensor]:
    """Softmax probabilities of each branch for a preprocessed image, ``batch_size`` slices per pass (2D).

    ``model`` returns :class:`BranchOutputs` (keys ``"student"`` and ``"teacher"``; the *same* tensor object for
    both when the model returns one tensor twice, as the single-branch U-Net does) or one logits tensor (key
    ``"student"`` only). The caller chooses the mode (``model.eval()``); this function does not change it.

    Shape:
        ``x``: ``[S, C, H, W]`` or ``[1, C, D, H, W]`` on the model's device -> float32 ``[S, K, H, W]`` or
        ``[1, K, D, H, W]`` per branch, on the same device.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    out: dict[str, Tensor] = {}
    shared = False  # the single-branch U-Net returns one tensor as both branches: compute it once
    for start in range(0, x.shape[0], batch_size):
        with _autocast(x.device, autocast_dtype):
            result = model(x[start : start + batch_size])
        if isinstance(result, Tensor):
            branches = {"student": result}
        else:
            shared = result[1] is result[0]
            branches = {"student": result[0]} if shared else {"student": result[0], "teacher": result[1]}
        for name, logits in branches.items():
            if name not in out:
                out[name] = torch.empty((x.shape[0], *logits.shape[1:]), dtype=torch.float32, device=x.device)
            out[name][start : start + batch_size] = torch.softmax(logits.float(), dim=1)
    if shared:
        out["teacher"] = out["student"]
    return out


def predict_volume(
    model: nn.Module,
    image: Volume | ArrayLike | Sequence[Volume] | Sequence[ArrayLike],
    cfg: PreprocessConfig,
    *,
    spacing: Sequence[float] | None = None,
    target_spacing: Sequence[float] | None = None,
    device: str | torch.device | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    autocast_dtype: torch.dtype | None = None,
) -> VolumePrediction:
    """Predict class probabilities for a whole volume on its own grid.

    Args:
        model: a network returning ``BranchOutputs`` or a logits tensor, already on ``device`` and in the mode
            wanted (normally ``eval()``).
        image: one :class:`Volume` or ``[i, j, k]`` array, or one per input channel.
        cfg: the model's preprocessing (from its checkpoint).
        spacing: voxel size in mm along i, j, k; taken from the volume when ``image`` is a :class:`Volume`.
        target_spacing: overrides ``cfg.target_spacing`` (both ``None``: native spacing, no resampling).
        device: where preprocessing and the network run; ``None``: the model's device.
        batch_size: slices per forward pass (2D).
        autocast_dtype: ``torch.bfloat16`` / ``torch.float16`` for mixed precision, ``None`` for float32.

    Shape:
        ``image`` ``[i, j, k]`` -> :class:`VolumePrediction` of ``[K, i, j, k]`` float32 probabilities on ``device``.
    """
    channels: list[ArrayLike] = []
    items = list(image) if isinstance(image, list | tuple) else [image]
    for item in items:
        if isinstance(item, Volume):
            if item.is_4d:
                raise GeometryError(f"{item.path}: a 4D volume; predict each frame (Volume.frames()) separately")
            spacing = item.spacing if spacing is None else spacing
            channels.append(item.array)
        else:
            channels.append(item)  # type: ignore[arg-type]
    if spacing is None:
        raise GeometryError("predict_volume: give `spacing` (mm along i, j, k) for an array image")
    if device is None:
        param = next(iter(model.parameters()), None)
        device = param.device if param is not None else torch.device("cpu")
    dev = torch.device(device)
    x, state = preprocess_image(channels, spacing, cfg, target_spacing=target_spacing, device=dev)
    probs = forward_probabilities(model, x, batch_size=batch_size, autocast_dtype=autocast_dtype)
    del x
    student = invert(probs["student"], state)
    teacher = probs.get("teacher")
    if teacher is not None:
        teacher = student if teacher is probs["student"] else invert(teacher, state)
    return VolumePrediction(student=student, teacher=teacher, state=state)
