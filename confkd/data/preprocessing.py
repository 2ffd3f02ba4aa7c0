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
"""

from __future__ import annotations

import dataclasses
import logging
import math
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from confkd.config import PreprocessConfig
from confkd.data.intensity import compute_intensity_params, normalise_
from confkd.errors import ConfigError, DatasetError, GeometryError, UnsupportedImageError

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

# Spacings come from float32 headers: 1.0 and 0.99999994 are the same spacing when looking for ties.
_TIE_RTOL = 1e-5


@dataclass(frozen=True)
class PreprocessState:
    """What :func:`invert` needs to map network outputs of one volume back to its input grid.

    ``original_*`` are in the input's axis order ``[i, j, k]``. Everything else is in *network axis order*: the
    slice axis first, then the other two in their original order. ``native_shape``, ``resampled_shape``,
    ``padding`` and ``network_spacing`` cover the resampled axes only: ``(H, W)`` in 2D, ``(D, H, W)`` in 3D.
    Intensities were mapped as ``(clip(x, clip_lo, clip_hi) - offset) / scale``; padding holds ``pad_value``.
    """

    spatial_dims: int
    original_shape: tuple[int, ...]
    original_spacing: tuple[float, ...]
    slice_axis: int
    native_shape: tuple[int, ...]
    resampled_shape: tuple[int, ...]
    padding: tuple[tuple[int, int], ...]
    network_spacing: tuple[float, ...]
    clip_lo: float
    clip_hi: float
    offset: float
    scale: float
    pad_value: float

    def __post_init__(self) -> None:
        nd = self.spatial_dims
        ok = (
            nd in (2, 3)
            and len(self.original_shape) == 3
            and len(self.original_spacing) == 3
            and 0 <= self.slice_axis <= 2
            and len(self.native_shape) == len(self.resampled_shape) == len(self.padding) == nd
            and tuple(self.original_shape[a] for a in self.axis_order)[-nd:] == self.native_shape
        )
        if not ok:
            raise GeometryError(f"inconsistent PreprocessState {self}; it was not made by confkd.preprocess")

    @property
    def axis_order(self) -> tuple[int, ...]:
        """Original axes in network order: ``array.transpose(axis_order)`` puts the slice axis first."""
        return _axis_order(self.slice_axis)

    @property
    def network_shape(self) -> tuple[int, ...]:
        """Spatial shape of the network tensor: ``(S, H', W')`` in 2D, ``(D', H', W')`` in 3D."""
        padded = tuple(n + b + a for n, (b, a) in zip(self.resampled_shape, self.padding, strict=True))
        return (self.original_shape[self.slice_axis], *padded) if self.spatial_dims == 2 else padded

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (tuples become lists)."""
        return {k: _lists(v) for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PreprocessState:
        """Rebuild a state from :meth:`to_dict` output (lists or tuples)."""
        names = [f.name for f in dataclasses.fields(cls)]
        unknown, missing = sorted(set(d) - set(names)), [n for n in names if n not in d]
        if unknown or missing:
            raise ConfigError(
                f"preprocess state: unknown keys {unknown}, missing keys {missing}; valid keys: {', '.join(names)}"
            )
        return cls(**{k: _tuples(v) for k, v in d.items()})


def _lists(v: Any) -> Any:
    return [_lists(x) for x in v] if isinstance(v, list | tuple) else v


def _tuples(v: Any) -> Any:
    return tuple(_tuples(x) for x in v) if isinstance(v, list | tuple) else v


def _axis_order(slice_axis: int) -> tuple[int, ...]:
    return (slice_axis, *(a for a in range(3) if a != slice_axis))


def _check_spacing(spacing: Sequence[float]) -> tuple[float, ...]:
    sp = tuple(float(s) for s in spacing)
    if len(sp) != 3 or not all(math.isfinite(s) and s > 0 for s in sp):
        raise GeometryError(f"spacing {tuple(spacing)} must be 3 positive finite numbers (mm along i, j, k)")
    return sp


def select_slice_axis(spacing: Sequence[float], cfg: PreprocessConfig) -> int:
    """``cfg.slice_axis`` if set, else the lowest-resolution (largest-spacing) axis; ties go to the last one.

    Isotropic data is therefore sliced along k. Spacings within a relative 1e-5 count as tied.
    """
    sp = _check_spacing(spacing)
    if cfg.slice_axis is not None:  # PreprocessConfig has checked it is 0, 1 or 2
        return int(cfg.slice_axis)
    largest = max(sp)
    return max(a for a, s in enumerate(sp) if math.isclose(s, largest, rel_tol=_TIE_RTOL))


def median_spacing(spacings: Sequence[Sequence[float]], cfg: PreprocessConfig) -> tuple[float, ...]:
    """The dataset-median target spacing: in-plane ``(sh, sw)`` in 2D, ``(sd, sh, sw)`` in 3D.

    Each case's spacing is first put in network axis order (its slice axis first, by :func:`select_slice_axis`),
    so that volumes stored with different axis orders agree.
    """
    if len(spacings) == 0:
        raise DatasetError("median_spacing: no spacings given; the dataset has no cases")
    ordered = []
    for spacing in spacings:
        sp = _check_spacing(spacing)
        ordered.append([sp[a] for a in _axis_order(select_slice_axis(sp, cfg))])
    med = np.median(np.asarray(ordered, dtype=np.float64), axis=0)
    return tuple(float(v) for v in med[-_spatial_dims(cfg) :])


def _spatial_dims(cfg: PreprocessConfig) -> int:
    if cfg.spatial_dims not in (2, 3):
        raise ConfigError(f"preprocess.spatial_dims={cfg.spatial_dims!r} must be 2 or 3")
    return int(cfg.spatial_dims)


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


def _resolve_target(cfg: PreprocessConfig, nd: int, target_spacing: Sequence[float] | None) -> tuple[float, ...] | None:
    target = target_spacing if target_spacing is not None else cfg.target_spacing
    if target is None:
        return None
    t = tuple(float(s) for s in target)
    if len(t) != nd or not all(math.isfinite(s) and s > 0 for s in t):
        raise ConfigError(
            f"target spacing {tuple(target)} must be {nd} positive numbers in mm for spatial_dims={nd} "
            f"({'in-plane (h, w)' if nd == 2 else '(slice axis, h, w)'}), or null for the native spacing"
        )
    return t


def _padding(shape: Sequence[int], multiple: int) -> tuple[tuple[int, int], ...]:
    totals = [-n % multiple for n in shape]
    return tuple((t // 2, t - t // 2) for t in totals)  # the odd voxel goes on the far side


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


def _new_size(n: int, spacing: float, target: float) -> int:
    return max(1, math.floor(n * spacing / target + 0.5))  # halves round up, not to even


def _nearest(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Nearest-neighbour resampling of the last ``len(size)`` dims by index gathering (any dtype, exact).

    Output voxel ``o`` takes input voxel ``floor((o + 0.5) * n_in / n_out)``: torch's ``nearest-exact``, the
    label counterpart of ``align_corners=False``. When no axis shrinks, the way back is the identity.
    """
    first = x.ndim - len(size)
    for d, n_out in enumerate(size):
        n_in = x.shape[first + d]
        if n_in != n_out:
            pos = (torch.arange(n_out, dtype=torch.float64) + 0.5) * (n_in / n_out)
            idx = pos.floor_().long().clamp_(max=n_in - 1).to(x.device)
            x = x.index_select(first + d, idx)
    return x


def _check_network(t: torch.Tensor, state: PreprocessState, what: str, channels: bool) -> None:
    spatial = state.network_shape
    if state.spatial_dims == 2:
        expected = (spatial[0], "C", *spatial[1:]) if channels else spatial
    else:
        expected = (1, "C", *spatial) if channels else (1, *spatial)
    got = tuple(t.shape)
    if len(got) != len(expected) or any(e != "C" and e != g for e, g in zip(expected, got, strict=True)):
        raise GeometryError(
            f"{what}: expected a tensor of shape [{', '.join(map(str, expected))}] (the network output for "
            f"this volume), got {list(got)}"
        )


def _crop(t: torch.Tensor, padding: Sequence[tuple[int, int]]) -> torch.Tensor:
    first = t.ndim - len(padding)
    for d, (before, after) in enumerate(padding):
        t = t.narrow(first + d, before, t.shape[first + d] - before - after)
    return t


def _to_original(t: torch.Tensor, state: PreprocessState) -> torch.Tensor:
    """``[..., *network-order spatial]`` -> ``[..., i, j, k]`` (a view)."""
    lead = t.ndim - 3
    back = [state.axis_order.index(a) + lead for a in range(3)]
    return t.permute(*range(lead), *back)


def invert(probabilities: torch.Tensor, state: PreprocessState) -> torch.Tensor:
    """Map per-class network outputs back to the input grid.

    Crops the padding, resamples back to exactly the native in-plane (2D) / volume (3D) size with
    ``interpolate(size=...)`` (bilinear / trilinear, ``align_corners=False``) and moves the slice axis back.
    Probabilities and logits both work (the map is linear). Floating dtypes are kept; others become float32.
    Memory: the ``C x volume`` result plus one class at a time.

    Shape:
        ``[S, C, H', W']`` (2D) or ``[1, C, D', H', W']`` (3D) -> contiguous ``[C, i, j, k]``.
    """
    _check_network(probabilities, state, "invert", channels=True)
    p = _crop(probabilities, state.padding)
    dtype = p.dtype if p.is_floating_point() else torch.float32
    out = torch.empty((p.shape[1], *state.original_shape), dtype=dtype, device=p.device)
    # ``out`` seen in network axis order; one class at a time keeps the peak at one C x volume plus one class
    dst = out.permute(0, *(1 + a for a in state.axis_order))
    mode = "bilinear" if state.spatial_dims == 2 else "trilinear"
    for c in range(p.shape[1]):
        pc = p[:, c : c + 1].to(dtype)  # [S, 1, H, W] or [1, 1, D, H, W]
        if state.resampled_shape != state.native_shape:
            pc = F.interpolate(pc, size=state.native_shape, mode=mode, align_corners=False)
        dst[c].copy_(pc[:, 0] if state.spatial_dims == 2 else pc[0, 0])
    return out


def invert_chunks(
    probabilities: torch.Tensor, state: PreprocessState, *, max_slices: int
) -> Iterator[tuple[int, torch.Tensor]]:
    """:func:`invert` a few slices at a time, so that no ``C x volume`` copy is ever made on the input grid.

    Yields ``(start, chunk)`` for consecutive chunks along the slice axis (the first network axis):
    ``chunk`` is float32 ``[n, C, H, W]`` (``n <= max_slices``), the input-grid slices ``start .. start + n - 1``
    in network axis order, so ``np.transpose(a, state.axis_order)[start : start + n]`` is where slice-shaped
    results (``[n, H, W]``: an argmax, a confidence) go in an ``[i, j, k]`` array ``a``. Without resampling a
    chunk may be a view of ``probabilities``: read it, do not modify it.

    2D: each slice is cropped and resampled on its own, exactly as :func:`invert` (same values). 3D: the
    in-plane part of the trilinear resampling is applied to the source slices a chunk needs, then the linear
    interpolation across slices (``align_corners=False``, as ``interpolate``), which equals :func:`invert` up to
    float rounding. Memory: one chunk (plus, in 3D with resampling across slices, its ``n + 1`` source slices).

    Shape:
        ``[S, C, H', W']`` (2D) or ``[1, C, D', H', W']`` (3D) -> chunks of ``[n, C, *native in-plane]``.
    """
    _check_network(probabilities, state, "invert_chunks", channels=True)
    if max_slices < 1:
        raise ValueError(f"max_slices must be >= 1, got {max_slices}")
    p = _crop(probabilities, state.padding)
    if state.spatial_dims == 3:  # [1, C, D, H, W] -> [D, C, H, W]: slices first, as in 2D
        p = p[0].transpose(0, 1)
    size = tuple(state.native_shape[-2:])

    def in_plane(rows: torch.Tensor) -> torch.Tensor:
        rows = rows.float()
        if tuple(rows.shape[-2:]) == size:
            return rows
        return F.interpolate(rows, size=size, mode="bilinear", align_corners=False)

    n_in = p.shape[0]  # slices in network space; 2D slices are never resampled across
    n_out = state.native_shape[0] if state.spatial_dims == 3 else n_in
    for start in range(0, n_out, max_slices):
        stop = min(start + max_slices, n_out)
        if n_in == n_out:
            yield start, in_plane(p[start:stop])
            continue
        # interpolate()'s source coordinate for align_corners=False, in float32 as torch computes it
        scale = torch.tensor(n_in / n_out, dtype=torch.float32)
        src = ((torch.arange(start, stop, dtype=torch.float32) + 0.5) * scale - 0.5).clamp_(min=0)
        i0 = src.floor().long()
        i1 = (i0 + 1).clamp_(max=n_in - 1)
        lam = (src - i0.float()).to(p.device)[:, None, None, None]
        first = int(i0[0])
        rows = in_plane(p[first : int(i1[-1]) + 1])
        i0, i1 = (i0 - first).to(p.device), (i1 - first).to(p.device)
        yield start, rows.index_select(0, i0).mul_(1 - lam).add_(rows.index_select(0, i1).mul_(lam))


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


def invert_labels(labels: torch.Tensor, state: PreprocessState) -> torch.Tensor:
    """Map an integer label map from network space back to the input grid (nearest neighbour, dtype kept).

    Shape:
        ``[S, H', W']`` (2D) or ``[1, D', H', W']`` (3D) -> contiguous ``[i, j, k]``.
    """
    _check_network(labels, state, "invert_labels", channels=False)
    t = labels if state.spatial_dims == 2 else labels[0]
    t = _nearest(_crop(t, state.padding), state.native_shape)
    return _fresh(_to_original(t, state).contiguous(), labels)


def _fresh(result: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """Never hand back the caller's memory (no resampling, no padding and no permutation leave nothing to copy)."""
    return result.clone() if result.data_ptr() == source.data_ptr() else result
