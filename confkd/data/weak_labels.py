"""Weak (sparse) labels generated from dense ones, for datasets without scribbles.

Every generator takes a dense integer label of shape ``(X, Y)`` or ``(X, Y, Z)`` and returns a sparse label of
the same shape and an integer dtype: each annotated voxel carries its true class, every other voxel carries
``ignore_index``. No generator ever annotates a voxel with a class other than its dense label (the seeds of
class ``c`` are a subset of ``label == c``); voxels already equal to ``ignore_index`` are never annotated.

``slice_axis=None`` works in full 2D/3D; an integer works slice by slice along that axis (as for ACDC, where
each short-axis slice was annotated separately), so that every slice that shows a structure gets seeds.
Units are voxels; anisotropic spacing is not taken into account.

Sources (``make_weak_label``):

- ``"erosion"``: :func:`erosion_seeds`, the paper's eroded masks.
- ``"discs"``: :func:`random_discs`, a few discs (balls in 3D) inside each structure.
- ``"bbox"``: :func:`bbox_interior`, the central part of each structure's bounding box.
"""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
from scipy import ndimage

from confkd.config import DataConfig
from confkd.errors import ConfigError

__all__ = [
    "GENERATED_SOURCES",
    "bbox_interior",
    "case_rng",
    "default_weak_params",
    "erosion_seeds",
    "make_weak_label",
    "random_discs",
    "weak_params_from_config",
]

# source -> the parameter names make_weak_label accepts for it
GENERATED_SOURCES: dict[str, tuple[str, ...]] = {
    "erosion": ("iterations",),
    "discs": ("count", "radius"),
    "bbox": ("shrink", "margin"),
}


# ---------------------------------------------------------------------- shared plumbing
def _prepare(label: np.ndarray, ignore_index: int, slice_axis: int | None) -> tuple[np.ndarray, int | None]:
    """Validate ``label`` (integral values, 2D/3D) and normalise ``slice_axis``; returns an int64 copy."""
    label = np.asarray(label)
    if label.ndim not in (2, 3):
        raise ValueError(f"label must be 2D or 3D, got shape {label.shape}")
    integral = np.issubdtype(label.dtype, np.integer) or label.dtype == bool
    if not integral and not (
        np.issubdtype(label.dtype, np.floating) and np.all(np.isfinite(label) & (label == np.rint(label)))
    ):
        raise ValueError(f"label must hold integers, got dtype {label.dtype}; round and cast it first")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int | np.integer):
        raise ValueError(f"ignore_index must be an integer, got {ignore_index!r}")
    if slice_axis is not None:
        if label.ndim != 3:
            raise ValueError(f"slice_axis={slice_axis} needs a 3D label, got shape {label.shape}; use None")
        if not -3 <= slice_axis < 3:
            raise ValueError(f"slice_axis must be 0, 1, 2 (or None for full 3D), got {slice_axis}")
        slice_axis %= 3
    return label.astype(np.int64), slice_axis


def _output_dtype(dtype: np.dtype[Any], dense: np.ndarray, ignore_index: int) -> np.dtype[Any]:
    """The input's integer dtype when it can hold ``ignore_index`` and every class, else the smallest that can."""
    values = [int(ignore_index)] + ([int(dense.min()), int(dense.max())] if dense.size else [])
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        if all(info.min <= v <= info.max for v in values):
            return np.dtype(dtype)
    for candidate in (np.int16, np.int32, np.int64):
        info = np.iinfo(candidate)
        if all(info.min <= v <= info.max for v in values):
            return np.dtype(candidate)
    raise ValueError(f"ignore_index {ignore_index} does not fit in int64")  # pragma: no cover


def _apply(
    label: np.ndarray,
    ignore_index: int,
    slice_axis: int | None,
    fn: Callable[[np.ndarray, np.ndarray], None],
) -> np.ndarray:
    """Run ``fn(dense, out)`` on the whole array or on each slice along ``slice_axis``; ``out`` starts as ignore."""
    dense, axis = _prepare(label, ignore_index, slice_axis)
    dtype = _output_dtype(np.asarray(label).dtype, dense, ignore_index)
    out = np.full(dense.shape, ignore_index, dtype=np.int64)
    if axis is None:
        fn(dense, out)
    else:
        dense_view, out_view = np.moveaxis(dense, axis, 0), np.moveaxis(out, axis, 0)
        for i in range(dense_view.shape[0]):
            fn(dense_view[i], out_view[i])  # out_view[i] is a view: fn writes through to out
    return out.astype(dtype)


def _classes(dense: np.ndarray, classes: Iterable[int] | None, ignore_index: int) -> list[int]:
    present = [int(c) for c in np.unique(dense) if c != ignore_index]
    if classes is None:
        return present
    wanted = {int(c) for c in classes}
    if ignore_index in wanted:
        raise ValueError(f"classes must not include ignore_index {ignore_index}")
    return [c for c in present if c in wanted]


def _box(mask: np.ndarray) -> tuple[slice, ...]:
    """The bounding box of a non-empty mask."""
    found = ndimage.find_objects(mask.astype(np.int8))[0]
    assert found is not None  # the caller only passes non-empty masks
    return tuple(found)


# ---------------------------------------------------------------------- erosion seeds
def _deepest_erosion(mask: np.ndarray, iterations: int) -> np.ndarray:
    """The mask eroded ``iterations`` times, or as many times as keeps it non-empty (0 = the mask itself).

    Erosion is computed in the mask's bounding box padded by one voxel: with ``border_value=0`` that is the same
    as eroding the full array, and much cheaper for small structures.
    """
    box = tuple(slice(max(s.start - 1, 0), s.stop + 1) for s in _box(mask))
    current = mask[box]
    for _ in range(iterations):
        eroded = ndimage.binary_erosion(current, border_value=0)
        if not eroded.any():
            break
        current = eroded
    result = np.zeros_like(mask)
    result[box] = current
    return result


def erosion_seeds(
    label: np.ndarray,
    *,
    classes: Iterable[int] | None = None,
    iterations: int = 10,
    ignore_index: int,
    slice_axis: int | None = None,
    per_component: bool = False,
) -> np.ndarray:
    """Seeds from iterated binary erosion of each class mask (background included unless ``classes`` says so).

    Each class mask (per slice when ``slice_axis`` is set) is eroded ``iterations`` times with the
    face-connected structuring element; when it would vanish, the largest number of iterations that keeps it
    non-empty is used instead (down to 0, the mask itself), so every class present in a slice keeps a seed.
    With ``per_component=True`` the fallback is decided for each connected component separately, so a thin
    structure next to a thick one of the same class keeps a seed too.

    Shape: ``label`` ``(X, Y)`` or ``(X, Y, Z)`` -> same shape, ``ignore_index`` where unannotated.
    """
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 0:
        raise ValueError(f"iterations must be a non-negative integer, got {iterations!r}")

    def fn(dense: np.ndarray, out: np.ndarray) -> None:
        for c in _classes(dense, classes, ignore_index):
            mask = dense == c
            if per_component:
                components, n = ndimage.label(mask)
                for k in range(1, n + 1):
                    out[_deepest_erosion(components == k, iterations)] = c
            else:
                out[_deepest_erosion(mask, iterations)] = c

    return _apply(label, ignore_index, slice_axis, fn)


# ---------------------------------------------------------------------- random discs
def _ball_offsets(radius: int, ndim: int) -> np.ndarray:
    """Integer offsets ``(n, ndim)`` of a Euclidean ball of ``radius`` voxels."""
    grid = np.mgrid[(slice(-radius, radius + 1),) * ndim].reshape(ndim, -1).T
    return grid[(grid**2).sum(axis=1) <= radius**2]


def random_discs(
    label: np.ndarray,
    *,
    count: int = 2,
    radius: int = 3,
    rng: np.random.Generator,
    ignore_index: int,
    slice_axis: int | None = None,
    classes: Iterable[int] | None = None,
) -> np.ndarray:
    """``count`` discs (balls in 3D) of ``radius`` voxels per class (per slice when ``slice_axis`` is set).

    Centres are drawn uniformly, without replacement, among the class voxels farther than ``radius`` from
    the nearest voxel outside the class (so the whole disc fits); when no voxel is that deep, among the
    deepest voxels. Each disc is clipped to the class mask, so it never annotates another class.

    Shape: ``label`` ``(X, Y)`` or ``(X, Y, Z)`` -> same shape, ``ignore_index`` where unannotated.
    """
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"count must be a positive integer, got {count!r}")
    if isinstance(radius, bool) or not isinstance(radius, int) or radius < 0:
        raise ValueError(f"radius must be a non-negative integer, got {radius!r}")
    if not isinstance(rng, np.random.Generator):
        raise ValueError(f"rng must be a numpy.random.Generator (numpy.random.default_rng(seed)), got {rng!r}")

    def fn(dense: np.ndarray, out: np.ndarray) -> None:
        offsets = _ball_offsets(radius, dense.ndim)
        shape = np.array(dense.shape)
        for c in _classes(dense, classes, ignore_index):
            mask = dense == c
            # distance to the nearest non-class voxel; the array border does not count as outside
            depth = ndimage.distance_transform_edt(mask)
            candidates = np.argwhere(depth > radius)
            if len(candidates) == 0:
                candidates = np.argwhere(depth == depth.max())
            chosen = candidates[rng.choice(len(candidates), size=min(count, len(candidates)), replace=False)]
            for centre in chosen:
                points = centre + offsets
                points = points[np.all((points >= 0) & (points < shape), axis=1)]
                index = tuple(points.T)
                out[index] = np.where(mask[index], c, out[index])

    return _apply(label, ignore_index, slice_axis, fn)


# ---------------------------------------------------------------------- bounding-box interiors
def bbox_interior(
    label: np.ndarray,
    *,
    shrink: float = 0.5,
    margin: int = 2,
    ignore_index: int,
    slice_axis: int | None = None,
    classes: Iterable[int] | None = None,
) -> np.ndarray:
    """The central part of each foreground class's bounding box, intersected with the class mask.

    Per class (per slice when ``slice_axis`` is set) the bounding box is shrunk about its centre to the
    fraction ``shrink`` of its extent along each axis and intersected with the class mask. When that misses
    the structure (a ring such as the myocardium, whose box centre lies in the cavity), the class voxels
    nearest to the box centre in the box's own scale are kept, so each structure keeps at least one seed.
    Background (class 0) seeds are the background voxels outside the union of all foreground boxes, each
    grown by ``margin`` voxels.

    Shape: ``label`` ``(X, Y)`` or ``(X, Y, Z)`` -> same shape, ``ignore_index`` where unannotated.
    """
    if not 0.0 < float(shrink) <= 1.0:
        raise ValueError(f"shrink must be in (0, 1], got {shrink!r}")
    if isinstance(margin, bool) or not isinstance(margin, int) or margin < 0:
        raise ValueError(f"margin must be a non-negative integer, got {margin!r}")

    def fn(dense: np.ndarray, out: np.ndarray) -> None:
        selected = _classes(dense, classes, ignore_index)
        foreground = [int(c) for c in np.unique(dense) if c not in (0, ignore_index)]
        outside_boxes = np.ones(dense.shape, dtype=bool)
        for c in foreground:
            mask = dense == c
            box = _box(mask)
            outside_boxes[tuple(slice(max(s.start - margin, 0), s.stop + margin) for s in box)] = False
            if c not in selected:
                continue
            # normalised Chebyshev distance from the box centre: 1 on the box faces, shrink on the kept box
            lo = np.array([s.start for s in box], dtype=float)
            hi = np.array([s.stop - 1 for s in box], dtype=float)
            centre, half = (lo + hi) / 2, np.maximum((hi - lo + 1) / 2, 0.5)
            points = np.argwhere(mask)
            t = np.max(np.abs(points - centre) / half, axis=1)
            keep = t <= shrink + 1e-9
            if not keep.any():
                keep = t <= t.min() + 1e-9
            out[tuple(points[keep].T)] = c
        if 0 in selected:
            out[outside_boxes & (dense == 0)] = 0

    return _apply(label, ignore_index, slice_axis, fn)


# ---------------------------------------------------------------------- dispatch
def default_weak_params(source: str) -> dict[str, Any]:
    """The default generator parameters of ``source`` (read from the generator's signature)."""
    _check_source(source)
    generator = _GENERATORS[source]
    signature = inspect.signature(generator)
    return {name: signature.parameters[name].default for name in GENERATED_SOURCES[source]}


def weak_params_from_config(source: str, data_cfg: DataConfig) -> dict[str, Any]:
    """The generator parameters of ``source``: the defaults, overridden by a :class:`~confkd.config.DataConfig`."""
    params = default_weak_params(source)
    if source == "erosion":
        params["iterations"] = data_cfg.erosion_iterations
    elif source == "discs":
        params.update(count=data_cfg.disc_count, radius=data_cfg.disc_radius)
    else:
        params["shrink"] = data_cfg.bbox_shrink
    return params


def case_rng(seed: int, case: str) -> np.random.Generator:
    """A generator for one case that does not depend on the order in which cases are loaded.

    The case name is hashed with SHA-256 (stable across processes, unlike ``hash()``).
    """
    digest = int.from_bytes(hashlib.sha256(case.encode("utf-8")).digest()[:8], "little")
    return np.random.default_rng([int(seed), digest])


_GENERATORS: dict[str, Callable[..., np.ndarray]] = {
    "erosion": erosion_seeds,
    "discs": random_discs,
    "bbox": bbox_interior,
}


def _check_source(source: str) -> None:
    if source == "scribbles":
        raise ConfigError(
            "weak_source 'scribbles' is read from scribblesTr, not generated; "
            f"generated sources are: {', '.join(GENERATED_SOURCES)}"
        )
    if source not in GENERATED_SOURCES:
        raise ConfigError(
            f"unknown weak-label source {source!r}; available options are: {', '.join(GENERATED_SOURCES)}"
        )


def make_weak_label(
    label: np.ndarray,
    source: str,
    *,
    ignore_index: int,
    slice_axis: int | None = None,
    params: Mapping[str, Any] | None = None,
    data_cfg: DataConfig | None = None,
    rng: np.random.Generator | int | None = None,
) -> np.ndarray:
    """Generate a sparse label from ``label`` with ``source`` ("erosion", "discs" or "bbox").

    Parameters come from ``params`` (only the names in ``GENERATED_SOURCES[source]``), or from ``data_cfg``,
    or the generator defaults. ``rng`` (a Generator or a seed) is required by "discs"; when it is None and
    ``data_cfg`` is given, ``data_cfg.weak_seed`` is used.
    """
    _check_source(source)
    if params is not None and data_cfg is not None:
        raise ConfigError("pass either params or data_cfg to make_weak_label, not both")
    if data_cfg is not None:
        params = weak_params_from_config(source, data_cfg)
        if rng is None:
            rng = data_cfg.weak_seed
    kwargs = dict(params or {})
    unknown = sorted(set(kwargs) - set(GENERATED_SOURCES[source]))
    if unknown:
        raise ConfigError(
            f"unknown parameter{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} for weak source "
            f"{source!r}; valid parameters: {', '.join(GENERATED_SOURCES[source])}"
        )
    if source == "erosion":
        return erosion_seeds(label, ignore_index=ignore_index, slice_axis=slice_axis, **kwargs)
    if source == "bbox":
        return bbox_interior(label, ignore_index=ignore_index, slice_axis=slice_axis, **kwargs)
    if rng is None:
        raise ConfigError("weak source 'discs' draws random centres: pass rng (a numpy Generator or an int seed)")
    generator = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    return random_discs(label, ignore_index=ignore_index, slice_axis=slice_axis, rng=generator, **kwargs)
