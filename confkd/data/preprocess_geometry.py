"""The geometry of preprocessing: each volume's network grid, and the :class:`PreprocessState` that records it.

:func:`select_slice_axis` picks the axis that goes first (the lowest-resolution one unless configured),
:func:`median_spacing` the dataset-median target spacing in network axis order; a resampled axis gets
``round(n s / t)`` voxels (halves up), and padding brings each resampled axis to a multiple of ``pad_multiple``,
the odd voxel on the far side. :class:`PreprocessState` holds the result for one volume, with the intensity map,
as plain numbers (JSON via :meth:`~PreprocessState.to_dict`).

Part of :mod:`confkd.data.preprocessing` (which re-exports the public names and describes the whole map); this
module needs no torch.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from confkd.config import PreprocessConfig
from confkd.errors import ConfigError, DatasetError, GeometryError

__all__ = ["PreprocessState", "median_spacing", "select_slice_axis"]

# Spacings come from float32 headers: 1.0 and 0.99999994 are the same spacing when looking for ties.
_TIE_RTOL = 1e-5


@dataclass(frozen=True)
class PreprocessState:
    """What :func:`~confkd.data.preprocessing.invert` needs to map network outputs of one volume back to its input grid.

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


def _new_size(n: int, spacing: float, target: float) -> int:
    return max(1, math.floor(n * spacing / target + 0.5))  # halves round up, not to even


def _padding(shape: Sequence[int], multiple: int) -> tuple[tuple[int, int], ...]:
    totals = [-n % multiple for n in shape]
    return tuple((t // 2, t - t // 2) for t in totals)  # the odd voxel goes on the far side
