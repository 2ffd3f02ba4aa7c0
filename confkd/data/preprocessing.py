"""Preprocessing shared by training and inference (stored with the model), and its exact inverse.

Forward, :func:`preprocess`: a volume indexed ``[i, j, k]`` with its spacing in mm becomes network input.

* 2D (``spatial_dims == 2``): the slice axis (:func:`select_slice_axis`) is moved first, every slice is resampled
  in-plane to the target spacing, intensities are clipped and normalised, and H and W are padded to a multiple of
  ``pad_multiple``: ``[S, 1, H', W']``.
* 3D: the slice axis is moved first as well, so that ``target_spacing`` always reads ``(through-plane, in-plane,
  in-plane)`` whatever the file's axis order; the whole volume is resampled, normalised and padded:
  ``[1, 1, D', H', W']``.

Everything the way back needs is a :class:`PreprocessState` (plain ints, floats and tuples; JSON via
:meth:`~PreprocessState.to_dict`). :func:`invert` maps network outputs back to ``[C, i, j, k]`` on the input grid,
so that the argmax happens there; :func:`preprocess_label` / :func:`invert_labels` do the same for label maps.

Geometry convention: resampling keeps the field of view, i.e. the outer voxel *edges* (torch's ``align_corners=False``
half-pixel convention for linear modes, ``nearest-exact`` index mapping for labels). A size ``n -> n' = round(n s / t)``
has the effective spacing ``n s / n'`` (recorded as ``network_spacing``; close to, not exactly, ``t``), and resampling
back with ``size=n`` puts every voxel centre where it came from, so the inverse is exact in shape and geometry.
``align_corners=True`` (keep the outer voxel *centres*) would be invertible too, but its effective spacing
``(n - 1) s / (n' - 1)`` strays further from the target on small images, and nnU-Net / scikit-image use edges.

The parts: this module holds the forward path (:func:`preprocess`, :func:`preprocess_state`,
:func:`preprocess_slices`, :func:`preprocess_label`) and re-exports the rest, so that all the names above import from
here; :mod:`confkd.data.preprocess_geometry` holds :class:`PreprocessState` and the geometry rules (slice axis,
median spacing, sizes, padding), :mod:`confkd.data.preprocess_inverse` the way back (:func:`invert`,
:func:`invert_chunks`, :func:`invert_labels`).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from confkd.config import PreprocessConfig
from confkd.data.intensity import compute_intensity_params, normalise_
from confkd.data.preprocess_geometry import (
    PreprocessState,
    _axis_order,
    _check_spacing,
    _new_size,
    _padding,
    _resolve_target,
    _spatial_dims,
    median_spacing,
    select_slice_axis,
)
from confkd.data.preprocess_inverse import _fresh, _nearest, invert, invert_chunks, invert_labels
from confkd.errors import GeometryError, UnsupportedImageError

__all__ = [
    "PreprocessState",
    "compute_intensity_params",
    "invert",
    "invert_chunks",
    "invert_labels",
    "median_spacing",
    "preprocess",
    "preprocess_label",
    "preprocess_slices",
    "preprocess_state",
    "select_slice_axis",
]

logger = logging.getLogger(__name__)

ArrayLike = np.ndarray | torch.Tensor
DeviceLike = str | torch.device | None


def _volume(array: ArrayLike, what: str = "volume") -> ArrayLike:
    if not isinstance(array, torch.Tensor):
        array = np.asarray(array)
    if array.ndim != 3 or 0 in array.shape:
        raise GeometryError(
            f"expected a non-empty 3D {what} indexed [i, j, k], got shape {tuple(array.shape)}; "
            "select one channel / time frame first"
        )
    kind = array.dtype.kind if isinstance(array, np.ndarray) else ("c" if array.is_complex() else "f")
    if kind not in "biuf":
        raise UnsupportedImageError(f"cannot preprocess a {what} of dtype {array.dtype}; expected real numbers")
    return array


def _tensor(array: ArrayLike) -> torch.Tensor:
    """A zero-copy tensor view of ``array`` where torch can hold it (copies only odd layouts and dtypes)."""
    if isinstance(array, torch.Tensor):
        return array.detach()
    a = array
    if not a.dtype.isnative:  # big-endian NIfTI data
        a = a.astype(a.dtype.newbyteorder("="))
    if a.dtype in (np.uint16, np.uint32, np.uint64):  # torch has little arithmetic for these
        a = a.astype(np.int32 if a.dtype == np.uint16 else np.int64)
    if any(s < 0 for s in a.strides):
        a = np.ascontiguousarray(a)
    with warnings.catch_warnings():  # read-only memory-mapped images: we only ever read from the view
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(a)


def _pad_arg(padding: Sequence[tuple[int, int]]) -> list[int]:
    """F.pad's argument: (before, after) pairs starting from the last dimension."""
    return [p for pair in reversed(padding) for p in pair]


def _device(device: DeviceLike, like: ArrayLike) -> torch.device:
    if device is not None:
        return torch.device(device)
    return like.device if isinstance(like, torch.Tensor) else torch.device("cpu")


def preprocess(
    array: ArrayLike,
    spacing: Sequence[float],
    cfg: PreprocessConfig,
    *,
    device: DeviceLike = None,
    target_spacing: Sequence[float] | None = None,
) -> tuple[torch.Tensor, PreprocessState]:
    """Turn a volume into network input.

    Args:
        array: ``[i, j, k]`` image (numpy or torch; any real dtype). It is not modified.
        spacing: voxel size in mm along i, j, k.
        cfg: the model's preprocessing config.
        device: where resampling runs and the result lives; ``None``: the input tensor's device (CPU for numpy).
        target_spacing: overrides ``cfg.target_spacing`` (e.g. the dataset median resolved at training time);
            both ``None`` keeps the native spacing.

    Returns:
        ``(image, state)``: contiguous float32 ``[S, 1, H', W']`` (2D) or ``[1, 1, D', H', W']`` (3D), and the
        :class:`PreprocessState` for :func:`invert`.
    """
    state = preprocess_state(array, spacing, cfg, target_spacing=target_spacing)
    return preprocess_slices(array, state, device=device), state


def preprocess_state(
    array: ArrayLike, spacing: Sequence[float], cfg: PreprocessConfig, *, target_spacing: Sequence[float] | None = None
) -> PreprocessState:
    """The :class:`PreprocessState` of :func:`preprocess` without the image: the geometry and the intensity map.

    The intensity parameters come from the whole volume (:func:`compute_intensity_params`); nothing of
    network size is allocated, so that :func:`preprocess_slices` can then stream the volume slab by slab.
    """
    nd = _spatial_dims(cfg)
    data = _volume(array)
    sp = _check_spacing(spacing)
    axis = select_slice_axis(sp, cfg)
    order = _axis_order(axis)
    native = tuple(int(data.shape[a]) for a in order)[-nd:]
    native_sp = tuple(sp[a] for a in order)[-nd:]
    target = _resolve_target(cfg, nd, target_spacing)
    resampled = (
        native
        if target is None
        else tuple(_new_size(n, s, t) for n, s, t in zip(native, native_sp, target, strict=True))
    )
    padding = _padding(resampled, cfg.pad_multiple)
    lo, hi, offset, scale = compute_intensity_params(data, cfg)
    pad_value = float(normalise_(torch.tensor([lo], dtype=torch.float32), lo, hi, offset, scale))
    return PreprocessState(
        spatial_dims=nd,
        original_shape=tuple(int(n) for n in data.shape),
        original_spacing=sp,
        slice_axis=axis,
        native_shape=native,
        resampled_shape=resampled,
        padding=padding,
        network_spacing=tuple(n * s / m for n, s, m in zip(native, native_sp, resampled, strict=True)),
        clip_lo=lo,
        clip_hi=hi,
        offset=offset,
        scale=scale,
        pad_value=pad_value,
    )


def preprocess_slices(
    array: ArrayLike,
    state: PreprocessState,
    start: int = 0,
    stop: int | None = None,
    *,
    device: DeviceLike = None,
) -> torch.Tensor:
    """Network input for the slices ``start .. stop - 1`` (along the slice axis) of ``array``, mapped by ``state``.

    ``state`` is :func:`preprocess_state` of the whole ``array``. In 2D each slice is normalised, resampled
    in-plane and padded on its own, so a slab gives exactly the rows ``start:stop`` of :func:`preprocess`
    (same values). 3D resamples across slices: only the whole volume (the default range) is allowed.

    Shape:
        ``[i, j, k]`` -> contiguous float32 ``[stop - start, 1, H', W']`` (2D) or ``[1, 1, D', H', W']`` (3D).
    """
    nd = state.spatial_dims
    data = _volume(array)
    if tuple(int(n) for n in data.shape) != state.original_shape:
        raise GeometryError(f"volume of shape {tuple(data.shape)} does not match its state {state.original_shape}")
    order = state.axis_order
    n_slices = state.original_shape[state.slice_axis]
    stop = n_slices if stop is None else stop
    if not 0 <= start < stop <= n_slices or (nd == 3 and (start, stop) != (0, n_slices)):
        raise ValueError(f"slices {start}:{stop} out of range for {n_slices} slices ({nd}D)")
    whole = (start, stop) == (0, n_slices)
    if isinstance(data, torch.Tensor):
        src = data.detach().permute(order)
        src = src if whole else src[start:stop]
    else:
        src = _tensor(data if whole else np.transpose(data, order)[start:stop])
        if whole:
            src = src.permute(order)
    src = src.to(_device(device, data))
    lo, hi, offset, scale = state.clip_lo, state.clip_hi, state.offset, state.scale
    # one copy that casts to float32 and moves the slice axis first; everything after is in place or resampling
    x = torch.empty(tuple(src.shape), dtype=torch.float32, device=src.device)
    x.copy_(src)
    x_is_float = src.is_floating_point()
    del src
    if x_is_float:
        torch.nan_to_num_(x, nan=lo, posinf=lo, neginf=lo)
    # normalising before resampling is the same map (linear interpolation commutes with an affine map, and the
    # clip keeps outliers from bleeding into neighbours), and the cheaper one when resampling upsamples
    normalise_(x, lo, hi, offset, scale)
    x = x[:, None] if nd == 2 else x[None, None]
    if state.resampled_shape != state.native_shape:
        x = F.interpolate(
            x, size=state.resampled_shape, mode="bilinear" if nd == 2 else "trilinear", align_corners=False
        )
    if any(p for pair in state.padding for p in pair):
        x = F.pad(x, _pad_arg(state.padding), value=state.pad_value)
    logger.debug("preprocess %s [%d:%d] -> %s", state.original_shape, start, stop, tuple(x.shape))
    return x.contiguous()


def preprocess_label(
    label: ArrayLike, state: PreprocessState, *, pad_value: int = 0, device: DeviceLike = None
) -> torch.Tensor:
    """Apply the geometry of ``state`` to an ``[i, j, k]`` label map (dense or sparse), nearest neighbour.

    Pad with ``pad_value``: 0 (background) for dense labels, the ignore index for sparse ones. Float label
    maps (as nibabel's ``get_fdata`` returns) are accepted when they hold whole numbers.

    Shape:
        ``[i, j, k]`` -> contiguous int64 ``[S, H', W']`` (2D) or ``[1, D', H', W']`` (3D).
    """
    lab = _volume(label, "label map")
    if tuple(lab.shape) != state.original_shape:
        raise GeometryError(
            f"label map of shape {tuple(lab.shape)} does not match its image {state.original_shape}; "
            "preprocess the image this label belongs to first"
        )
    src = _tensor(lab)
    t = src.to(_device(device, lab))
    if t.is_floating_point() and not bool((t == t.round()).all()):
        raise GeometryError("label map holds non-integer values; was it resampled with linear interpolation?")
    t = t.permute(state.axis_order).to(torch.int64)
    t = _nearest(t, state.resampled_shape)
    if any(p for pair in state.padding for p in pair):
        t = F.pad(t, _pad_arg(state.padding), value=pad_value)
    return _fresh((t if state.spatial_dims == 2 else t[None]).contiguous(), src)
