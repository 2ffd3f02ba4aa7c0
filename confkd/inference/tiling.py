"""Sliding-window inference over any :class:`~confkd.inference.runners.Runner`: tiles, Gaussian blending, flip TTA.

The input is a batch of ``B`` items of the same spatial size (the slices of a 2D model, or the one volume of
a 3D model) and every item is cut with the same grid, so the blending weights are computed once. Tiles of
several items are batched into one runner call.

Blending follows nnU-Net / MONAI's ``"gaussian"`` mode: each tile's probabilities are weighted by a separable
Gaussian centred on the tile (sigma = 1/8 of the tile size per axis, maximum 1) and the weighted sum is divided
by the sum of weights. Tile starts are evenly spaced between 0 and ``size - tile`` with at least the requested
overlap (nnU-Net's ``compute_steps_for_sliding_window``), so the first and last tiles touch the borders and
every voxel is covered.

Test-time augmentation averages the probabilities of flipped copies (flip the input, run, flip the output
back) tile by tile, before blending; since the Gaussian is symmetric this equals blending each flip
separately.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from confkd.errors import ConfigError, GeometryError
from confkd.inference.runners import Runner, RunnerError

__all__ = [
    "SIGMA_SCALE",
    "TilePlan",
    "flip_dims",
    "gaussian_importance",
    "item_unit",
    "plan_tiles",
    "run_windows",
    "to_device",
]

#: Gaussian sigma as a fraction of the tile size (nnU-Net, MONAI's ``sigma_scale``)
SIGMA_SCALE = 0.125

#: largest float32 accumulator for a group of items when it cannot be ``out`` itself
GROUP_BYTES = 256 << 20

Window = tuple[slice, ...]


@dataclass(frozen=True)
class TilePlan:
    """How one item of spatial size ``size`` is cut into tiles of ``tile`` (multiples of the divisor).

    Where the item is smaller than a tile (its size is not a multiple of the divisor) it is padded to
    ``padded`` first. ``starts`` holds the tile starts per axis; :attr:`windows` is their product.
    """

    size: tuple[int, ...]
    padded: tuple[int, ...]
    tile: tuple[int, ...]
    starts: tuple[tuple[int, ...], ...]

    @property
    def windows(self) -> list[Window]:
        """Every tile's index window into the padded item, in C order of the tile starts."""
        return [
            tuple(slice(s, s + t) for s, t in zip(corner, self.tile, strict=True))
            for corner in itertools.product(*self.starts)
        ]

    @property
    def num_tiles(self) -> int:
        return math.prod(len(s) for s in self.starts)

    @property
    def single(self) -> bool:
        """One tile covers the item exactly: the runner sees whole items, no blending."""
        return self.tile == self.size


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def tile_starts(size: int, tile: int, overlap: float) -> tuple[int, ...]:
    """Evenly spaced starts from 0 to ``size - tile`` whose step is at most ``tile * (1 - overlap)``."""
    if size <= tile:
        return (0,)
    target_step = tile * (1.0 - overlap)
    n = math.ceil((size - tile) / target_step) + 1
    step = (size - tile) / (n - 1)
    return tuple(round(i * step) for i in range(n))


def plan_tiles(size: Sequence[int], *, divisor: int, max_tile: Sequence[int] | None, overlap: float = 0.5) -> TilePlan:
    """The tiling of an item of spatial ``size`` for a network whose inputs are multiples of ``divisor``.

    Each tile size is the item's size rounded up to the divisor, capped at ``max_tile`` rounded down to it.

    Raises:
        ConfigError: ``overlap`` outside [0, 1).
        GeometryError: ``max_tile`` of the wrong length or smaller than the divisor.
    """
    if not 0.0 <= overlap < 1.0:
        raise ConfigError(f"overlap must be in [0, 1), got {overlap!r}")
    size = tuple(int(s) for s in size)
    if max_tile is not None and len(max_tile) != len(size):
        raise GeometryError(f"max_tile {tuple(max_tile)} has {len(max_tile)} sizes; the input has {len(size)} axes")
    tile = []
    for axis, n in enumerate(size):
        t = _round_up(n, divisor)
        if max_tile is not None:
            cap = int(max_tile[axis]) // divisor * divisor
            if cap < 1:
                raise GeometryError(
                    f"max_tile {tuple(max_tile)} is smaller than the network's divisor {divisor} along axis {axis}"
                )
            t = min(t, cap)
        tile.append(t)
    padded = tuple(max(n, t) for n, t in zip(size, tile, strict=True))
    starts = tuple(tile_starts(n, t, overlap) for n, t in zip(padded, tile, strict=True))
    return TilePlan(size=size, padded=padded, tile=tuple(tile), starts=starts)


def gaussian_importance(
    tile: Sequence[int], *, sigma_scale: float = SIGMA_SCALE, device: torch.device | None = None
) -> Tensor:
    """Separable Gaussian weights over a tile: centred, sigma = ``sigma_scale * tile`` per axis, maximum 1.

    Strictly positive everywhere (about 3e-4 per axis at the border), so every covered voxel has a weight.

    Shape:
        float32 ``[*tile]``.
    """
    weights: Tensor | None = None
    for n in tile:
        x = torch.arange(n, dtype=torch.float64) - (n - 1) / 2
        g = torch.exp(-0.5 * (x / (sigma_scale * n)) ** 2)
        weights = g if weights is None else weights[..., None] * g
    assert weights is not None  # tile has at least one axis
    return (weights / weights.max()).to(device=device, dtype=torch.float32)


def flip_dims(spatial_dims: int, tta: bool) -> list[tuple[int, ...]]:
    """The flips to average, as tensor dims of ``[N, C, *spatial]``: every subset of the spatial axes with TTA.

    2D: identity, H, W, both. 3D: the 8 combinations. Without TTA: identity only.
    """
    axes = tuple(range(2, 2 + spatial_dims))
    if not tta:
        return [()]
    return [combo for r in range(len(axes) + 1) for combo in itertools.combinations(axes, r)]


def to_device(x: Tensor, device: torch.device) -> Tensor:
    """``x`` on ``device``; CPU -> CUDA goes through pinned memory with a non-blocking copy.

    The pinned staging buffer comes from torch's caching host allocator, which does not hand it out again
    before the copy has completed.
    """
    if x.device == device:
        return x
    if device.type == "cuda" and x.device.type == "cpu":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


def predict_batch(runner: Runner, x: Tensor, flips: Sequence[tuple[int, ...]]) -> Tensor:
    """Probabilities of one batch, averaged over ``flips`` (flip the input, run, flip the output back).

    Shape:
        ``[N, C, *tile]`` on the runner's device -> ``[N, K, *tile]`` float32 (a fresh tensor when there are
        several flips; with one it may be the runner's own buffer: consume it before the next call).
    """
    total: Tensor | None = None
    for dims in flips:
        p = runner(x.flip(dims) if dims else x)
        expected = (x.shape[0], runner.num_classes, *x.shape[2:])
        if tuple(p.shape) != expected:
            raise RunnerError(
                f"{runner.name} runner returned shape {tuple(p.shape)} for input {tuple(x.shape)}; "
                f"expected probabilities of shape {expected}"
            )
        if dims:
            p = p.flip(dims)
        if len(flips) == 1:
            return p
        if total is None:
            total = p.to(device=x.device, dtype=torch.float32, copy=True)
        else:
            total += p
    assert total is not None  # flips is never empty
    return total.div_(len(flips))


def _all_channels(window: Window) -> tuple[slice, ...]:
    return (slice(None), *window)


def _clamp_batch(batch_size: int, runner: Runner) -> int:
    return max(1, min(batch_size, runner.max_batch))


def _item_group(plan: TilePlan, num_classes: int, batch_size: int, n_items: int) -> int:
    item_bytes = 4 * num_classes * math.prod(plan.padded)
    return max(1, min(n_items, -(-4 * batch_size // len(plan.windows)), GROUP_BYTES // item_bytes))


def item_unit(plan: TilePlan, runner: Runner, *, batch_size: int, n_items: int, out_dtype: torch.dtype) -> int:
    """Items per aligned slab: :func:`run_windows` on consecutive slabs of ``n * item_unit(...)`` items (the last
    one shorter) makes exactly the runner calls (same tiles in the same batches) it makes on all ``n_items``
    at once, so that a caller can stream the items and get the same values.
    """
    batch_size = _clamp_batch(batch_size, runner)
    if plan.single:
        return batch_size
    if out_dtype == torch.float32 and plan.padded == plan.size:  # in place: batches run across items
        return batch_size // math.gcd(batch_size, len(plan.windows))
    return _item_group(plan, runner.num_classes, batch_size, n_items)


def run_windows(
    x: Tensor,
    runner: Runner,
    plan: TilePlan,
    *,
    out: Tensor,
    flips: Sequence[tuple[int, ...]] = ((),),
    batch_size: int,
    pad_value: float = 0.0,
) -> int:
    """Probabilities of every item of ``x`` into ``out``: whole items in batches, or tiled and blended.

    Args:
        x: ``[B, C, *plan.size]`` network input (CPU or the runner's device).
        runner: the backend.
        plan: from :func:`plan_tiles` for ``plan.size``.
        out: ``[B, K, *plan.size]`` on the runner's device, any float dtype; receives normalised probabilities.
        flips: from :func:`flip_dims`.
        batch_size: tiles (or whole items) per runner call, at most ``runner.max_batch``.
        pad_value: the normalised background, for items smaller than a tile.

    Returns:
        The number of tiles evaluated (items x tiles per item), each with ``len(flips)`` runner passes.

    Memory: with blending, the float32 accumulator is ``out`` itself when it is float32 and no padding is
    needed; otherwise one for a group of items (at most :data:`GROUP_BYTES`), plus the group's input on the
    device.
    """
    n_items = x.shape[0]
    device = runner.device
    batch_size = _clamp_batch(batch_size, runner)
    if plan.single:
        for start in range(0, n_items, batch_size):
            xb = to_device(x[start : start + batch_size], device)
            out[start : start + xb.shape[0]].copy_(predict_batch(runner, xb, flips))
        return n_items

    importance = gaussian_importance(plan.tile, device=device)
    windows = plan.windows
    weight = torch.zeros(plan.padded, dtype=torch.float32, device=device)
    for w in windows:
        weight[w] += importance
    pad = [p for n, m in zip(reversed(plan.size), reversed(plan.padded), strict=True) for p in (0, m - n)]
    needs_pad = plan.padded != plan.size
    in_place = out.dtype == torch.float32 and not needs_pad
    crop = (slice(None), slice(None), *(slice(0, n) for n in plan.size))
    # in place, ``out`` is the accumulator and ``x`` needs no copy: one group, every batch full; otherwise items
    # whose tiles fill about four batches (only a group's last batch runs part-full)
    group = n_items if in_place else _item_group(plan, out.shape[1], batch_size, n_items)
    for g0 in range(0, n_items, group):
        g1 = min(g0 + group, n_items)
        xg = to_device(x[g0:g1], device)
        if needs_pad:
            xg = F.pad(xg, pad, value=pad_value)
        acc = out[g0:g1] if in_place else torch.empty((g1 - g0, out.shape[1], *plan.padded), device=device)
        acc.zero_()
        pairs = [(i, w) for i in range(g1 - g0) for w in windows]
        for b0 in range(0, len(pairs), batch_size):
            chunk = pairs[b0 : b0 + batch_size]
            tiles = torch.stack([xg[i][_all_channels(w)] for i, w in chunk])
            probs = predict_batch(runner, tiles, flips)
            for j, (i, w) in enumerate(chunk):
                acc[i][_all_channels(w)].addcmul_(probs[j], importance)
        acc /= weight
        if not in_place:
            out[g0:g1].copy_(acc[crop])
    return n_items * len(windows)
