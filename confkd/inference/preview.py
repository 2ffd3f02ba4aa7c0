"""``--preview``: a PNG montage per case so that a reviewer can scan a batch by eye.

Up to :data:`MAX_SLICES` slices along the slice axis (the largest-spacing axis, ties to the last, as the
preprocessing chooses), evenly spaced through the slices that hold any foreground label (all slices when none
does). Two rows: the image (1st-99th percentile window of the shown slices) with the labels alpha-blended in
distinct colours; the confidence map in a perceptual colour map (viridis, from its published anchor colours;
dark purple = 0, yellow = 1).

Each tile is :data:`TILE` pixels high and as wide as the slice's physical aspect ratio asks (clamped to 1/4-4
times the height); tiles are separated by :data:`GAP` black pixels. Pixels are nearest-neighbour, so label edges
stay crisp. Display convention: the first in-plane axis runs left to right, the second bottom to top.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from confkd.io_utils import atomic_path

__all__ = ["GAP", "MAX_SLICES", "TILE", "montage_size", "preview_slices", "write_preview"]

MAX_SLICES = 6
TILE = 128
GAP = 2
ALPHA = 0.45
# label colours (1, 2, 3, ...): distinct hues, repeated beyond the list
_PALETTE = np.array(
    [
        (230, 25, 75),
        (60, 180, 75),
        (0, 130, 200),
        (255, 225, 25),
        (245, 130, 48),
        (145, 30, 180),
        (70, 240, 240),
        (240, 50, 230),
        (210, 245, 60),
        (250, 190, 212),
    ],
    dtype=np.float32,
)
# viridis at 0, 1/8, ..., 1 (matplotlib's published table, sampled); linear interpolation in between
_VIRIDIS = np.array(
    [
        (68, 1, 84),
        (71, 44, 122),
        (59, 81, 139),
        (44, 113, 142),
        (33, 144, 141),
        (39, 173, 129),
        (92, 200, 99),
        (170, 220, 50),
        (253, 231, 37),
    ],
    dtype=np.float32,
)


def _slice_axis(spacing: Sequence[float]) -> int:
    largest = max(spacing)
    return max(a for a, s in enumerate(spacing) if math.isclose(s, largest, rel_tol=1e-5))


def preview_slices(labels: np.ndarray, axis: int, max_slices: int = MAX_SLICES) -> list[int]:
    """Up to ``max_slices`` indices along ``axis``, evenly spaced from the first to the last labelled slice."""
    n = labels.shape[axis]
    other = tuple(a for a in range(labels.ndim) if a != axis)
    labelled = np.flatnonzero(np.any(labels > 0, axis=other))
    lo, hi = (int(labelled[0]), int(labelled[-1])) if labelled.size else (0, n - 1)
    count = min(max_slices, hi - lo + 1)
    return sorted({round(v) for v in np.linspace(lo, hi, count)}) if count > 1 else [(lo + hi) // 2]


def _tile_width(shape2d: tuple[int, int], spacing2d: tuple[float, float], tile: int) -> int:
    width_mm, height_mm = shape2d[0] * spacing2d[0], shape2d[1] * spacing2d[1]
    return int(min(max(round(tile * width_mm / height_mm), tile // 4), tile * 4))


def montage_size(shape: Sequence[int], spacing: Sequence[float], n_slices: int, tile: int = TILE) -> tuple[int, int]:
    """``(width, height)`` in pixels of the montage of ``n_slices`` slices of a volume (see the module docstring)."""
    axis = _slice_axis(spacing)
    plane = [a for a in range(3) if a != axis]
    width = _tile_width((shape[plane[0]], shape[plane[1]]), (spacing[plane[0]], spacing[plane[1]]), tile)
    return n_slices * width + (n_slices - 1) * GAP, 2 * tile + GAP


def _grey(image: np.ndarray) -> np.ndarray:
    finite = image[np.isfinite(image)]
    lo, hi = np.percentile(finite, (1, 99)) if finite.size else (0.0, 1.0)
    scale = float(hi - lo) if hi > lo else 1.0
    out = np.clip((np.nan_to_num(image, nan=lo) - lo) / scale, 0.0, 1.0) * 255.0
    return out.astype(np.float32)


def _viridis(values: np.ndarray) -> np.ndarray:
    x = np.clip(np.nan_to_num(values.astype(np.float32), nan=0.0), 0.0, 1.0) * (len(_VIRIDIS) - 1)
    i = np.minimum(np.floor(x).astype(np.intp), len(_VIRIDIS) - 2)
    t = (x - i)[..., None]
    return _VIRIDIS[i] * (1 - t) + _VIRIDIS[i + 1] * t


def _overlay(grey: np.ndarray, labels: np.ndarray) -> np.ndarray:
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    mask = labels > 0
    if mask.any():
        colours = _PALETTE[(labels[mask].astype(np.intp) - 1) % len(_PALETTE)]
        rgb[mask] = (1 - ALPHA) * rgb[mask] + ALPHA * colours
    return rgb


def write_preview(
    path: Path,
    image: np.ndarray,
    labels: np.ndarray,
    confidence: np.ndarray,
    spacing: Sequence[float],
    *,
    max_slices: int = MAX_SLICES,
    tile: int = TILE,
) -> Path:
    """Write the montage PNG atomically; returns ``path``.

    Shape:
        ``image``, ``labels``, ``confidence``: ``[i, j, k]`` (the first frame is used for ``[i, j, k, t]``).
    """
    from PIL import Image  # lazy: only --preview needs Pillow

    if image.ndim == 4:
        image, labels, confidence = image[..., 0], labels[..., 0], confidence[..., 0]
    axis = _slice_axis(spacing)
    indices = preview_slices(labels, axis, max_slices)
    width, height = montage_size(image.shape, spacing, len(indices), tile)
    tile_w = (width - (len(indices) - 1) * GAP) // len(indices)
    shown = np.take(image, indices, axis=axis).astype(np.float32)
    grey_all = np.moveaxis(_grey(shown), axis, 0)
    canvas = Image.new("RGB", (width, height))
    for n, index in enumerate(indices):
        lab = np.take(labels, index, axis=axis)
        conf = np.take(confidence, index, axis=axis)
        top = _overlay(grey_all[n], lab)
        bottom = _viridis(conf)
        x = n * (tile_w + GAP)
        for row, rgb in enumerate((top, bottom)):
            # [first in-plane, second in-plane] -> rows = second axis upwards, columns = first axis
            pixels = np.ascontiguousarray(np.flipud(rgb.transpose(1, 0, 2))).round().astype(np.uint8)
            im = Image.fromarray(pixels).resize((tile_w, tile), Image.Resampling.NEAREST)
            canvas.paste(im, (x, row * (tile + GAP)))
    with atomic_path(Path(path)) as tmp:
        canvas.save(tmp, format="PNG")
    return Path(path)
