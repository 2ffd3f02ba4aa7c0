"""The way back: network outputs of one volume mapped to its input grid by the :class:`PreprocessState` of
:func:`~confkd.data.preprocessing.preprocess`.

:func:`invert` maps per-class outputs back whole (``C x volume``), :func:`invert_chunks` a few slices at a time (so
that an argmax or a confidence can be streamed into an ``[i, j, k]`` array), :func:`invert_labels` an integer label
map (nearest neighbour). Each crops the padding, resamples to exactly the native size and restores the axis order.

Part of :mod:`confkd.data.preprocessing`, which re-exports these names and states the geometry convention that makes
the inverse exact in shape and geometry; its label path shares the nearest-neighbour resampling defined here.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F

from confkd.data.preprocess_geometry import PreprocessState
from confkd.errors import GeometryError

__all__ = ["invert", "invert_chunks", "invert_labels"]


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


def invert_labels(labels: torch.Tensor, state: PreprocessState) -> torch.Tensor:
    """Map an integer label map from network space back to the input grid (nearest neighbour, dtype kept).

    Shape:
        ``[S, H', W']`` (2D) or ``[1, D', H', W']`` (3D) -> contiguous ``[i, j, k]``.
    """
    _check_network(labels, state, "invert_labels", channels=False)
    t = labels if state.spatial_dims == 2 else labels[0]
    t = _nearest(_crop(t, state.padding), state.native_shape)
    return _fresh(_to_original(t, state).contiguous(), labels)


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


def _fresh(result: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """Never hand back the caller's memory (no resampling, no padding and no permutation leave nothing to copy)."""
    return result.clone() if result.data_ptr() == source.data_ptr() else result
