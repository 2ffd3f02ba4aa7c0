"""Training-time augmentation as batched torch ops on the training device (2D and 3D).

One call augments a batch: the image ``[N, C, *spatial]`` and any number of label maps ``[N, *spatial]``
(typically the dense and the sparse label) move together, so every label stays aligned with its image.

The work is split in two so that tests and resumable training can see and replay the draws:

* :func:`sample_params` draws every per-sample parameter (tensors of shape ``[N]``) from one CPU
  :class:`torch.Generator`, plus one seed from which the random fields (elastic displacement, noise) are
  drawn; nothing else is random.
* :func:`apply_params` applies them; it is deterministic. :func:`augment_batch` is the two in one call.

Spatial transforms (rotation, isotropic scaling, elastic deformation) are folded into ONE sampling grid per
sample (``affine_grid`` plus a smooth displacement field), so each tensor is interpolated once: bilinear for
the image, nearest for the labels. Flips are exact permutations (``torch.flip``), applied after the
resampling. Samples that draw no transform are never resampled and come out bit-identical.

Conventions:

* Rotation ``+theta`` in the (height, width) plane maps the output point ``p`` to the input point
  ``R(theta) p`` in voxel units about the patch centre, so ``+90°`` equals ``torch.rot90(x, 1, dims=(-2, -1))``
  on square inputs. In 3D three angles rotate about the depth, height and width axes (``R_d R_h R_w``),
  each uniform in ``±rotate_degrees``; ``+90°`` about each is ``torch.rot90(x, 1, dims=...)`` with dims
  ``(-2, -1)``, ``(-1, -3)`` and ``(-3, -2)`` on cubes. Rotation is in voxel units (resample to isotropic
  spacing first).
* Scale ``s > 1`` magnifies: the anatomy appears ``s`` times larger (the output samples the input at ``p / s``).
* Elastic: white noise on a coarse grid is smoothed with a Gaussian of width ``elastic_sigma`` (fraction of
  the patch size per axis), normalised so that the largest displacement of each sample is ``elastic_alpha``
  (fraction of the patch size along each axis), and upsampled linearly to the patch.
* Out-of-view image voxels take the per-sample, per-channel minimum (no artificial black edge in z-scored
  data); out-of-view label voxels take ``fill_values`` (use the ignore index so losses skip them).
* Intensity transforms, image only and after the spatial ones, per sample and channel: gamma on the
  min-max-rescaled image mapped back (nnU-Net), contrast around the mean, multiplicative brightness, and
  additive Gaussian noise of standard deviation ``noise_std``. Factors are uniform in their ranges.
* Work runs in float32 (float64 inputs stay float64) with autocast disabled, so sampling grids are never
  computed in half precision; the image keeps its dtype, labels come back int64. Label values must be
  integers of magnitude below 2**24 (they are resampled as float32, which holds them exactly).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from confkd.config import AugmentConfig
from confkd.errors import GeometryError

__all__ = ["AugmentParams", "apply_params", "augment_batch", "sample_params"]

# the coarse elastic grid holds this many noise cells per Gaussian sigma (cheap and still smooth)
_CELLS_PER_SIGMA = 4.0
_GAMMA_EPS = 1e-7


@dataclass(frozen=True)
class AugmentParams:
    """Per-sample augmentation parameters, CPU tensors whose first dim is the batch size ``N``.

    Every field holds its neutral value where the transform was not drawn, so the parameters alone say
    what happens to each sample (edit them with :func:`dataclasses.replace` to force a transform).

    Shape:
        angles: ``[N, 1]`` (2D) or ``[N, 3]`` (3D), radians, float64 (0: no rotation).
        scale: ``[N]`` float64 (1: no scaling).
        flip: ``[N, D]`` bool, one column per spatial axis in tensor order (depth, height, width).
        elastic: ``[N]`` float64, largest displacement as a fraction of the patch size (0: none).
        gamma, contrast, brightness: ``[N]`` float64 (1: unchanged).
        noise_std: ``[N]`` float64 (0: no noise).
    """

    angles: Tensor
    scale: Tensor
    flip: Tensor
    elastic: Tensor
    gamma: Tensor
    contrast: Tensor
    brightness: Tensor
    noise_std: Tensor
    elastic_sigma: float
    field_seed: int  # seeds the CPU generator of the elastic and noise fields

    @property
    def spatial_dims(self) -> int:
        return int(self.flip.shape[1])

    def resampled(self) -> Tensor:
        """``[N]`` bool: samples that need a sampling grid (rotation, scaling or elastic deformation)."""
        return (self.angles != 0).any(dim=1) | (self.scale != 1) | (self.elastic != 0)

    def select(self, index: Tensor) -> AugmentParams:
        """The parameters of the samples ``index`` (a CPU long tensor), same field seed."""
        per_sample = {
            f.name: getattr(self, f.name)[index]
            for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), Tensor)
        }
        return dataclasses.replace(self, **per_sample)


def sample_params(n: int, spatial_dims: int, cfg: AugmentConfig, *, generator: torch.Generator) -> AugmentParams:
    """Draw the augmentation of ``n`` samples from ``generator`` (a CPU generator).

    The number of draws depends only on ``n`` and ``spatial_dims``, never on the probabilities, so a config
    change does not shift the random stream of later batches.
    """
    if spatial_dims not in (2, 3):
        raise GeometryError(f"spatial_dims={spatial_dims} is not supported; use 2 or 3")
    if generator.device.type != "cpu":
        raise ValueError(
            f"augmentation draws from a CPU generator, got one on {generator.device}; pass torch.Generator()"
        )
    n_angles = 1 if spatial_dims == 2 else 3

    def rand(*shape: int) -> Tensor:
        return torch.rand(shape, generator=generator, dtype=torch.float64)

    def uniform(bounds: tuple[float, float], draw: Tensor) -> Tensor:
        return bounds[0] + (bounds[1] - bounds[0]) * draw

    coins = rand(n, 7)
    do = {name: coins[:, i] for i, name in enumerate(("rot", "scale", "elastic", "gamma", "con", "bri", "noise"))}
    values = rand(n, n_angles + 4)
    flip_draws = rand(n, spatial_dims)
    field_seed = int(torch.randint(0, 2**62, (1,), generator=generator))

    one, zero = torch.ones(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    max_angle = math.radians(cfg.rotate_degrees)
    angles = (values[:, :n_angles] * 2.0 - 1.0) * max_angle
    return AugmentParams(
        angles=torch.where((do["rot"] < cfg.p_rotate)[:, None], angles, 0.0),
        scale=torch.where(do["scale"] < cfg.p_scale, uniform(cfg.scale_range, values[:, n_angles]), one),
        flip=flip_draws < cfg.p_flip,
        elastic=torch.where(do["elastic"] < cfg.p_elastic, one * cfg.elastic_alpha, zero),
        gamma=torch.where(do["gamma"] < cfg.p_gamma, uniform(cfg.gamma_range, values[:, n_angles + 1]), one),
        contrast=torch.where(do["con"] < cfg.p_contrast, uniform(cfg.contrast_range, values[:, n_angles + 2]), one),
        brightness=torch.where(
            do["bri"] < cfg.p_brightness, uniform(cfg.brightness_range, values[:, n_angles + 3]), one
        ),
        noise_std=torch.where(do["noise"] < cfg.p_noise, one * cfg.noise_std, zero),
        elastic_sigma=cfg.elastic_sigma,
        field_seed=field_seed,
    )


def augment_batch(
    image: Tensor,
    labels: Sequence[Tensor],
    cfg: AugmentConfig,
    *,
    generator: torch.Generator,
    fill_values: Sequence[int],
) -> tuple[Tensor, list[Tensor]]:
    """Augment a batch: draw with :func:`sample_params`, apply with :func:`apply_params`.

    Shape:
        image: ``[N, C, H, W]`` or ``[N, C, D, H, W]``, floating point, on any device.
        labels: each ``[N, *spatial]``, integer; ``fill_values[i]`` marks out-of-view voxels of ``labels[i]``.
        Returns the image (same dtype) and the labels (int64), same shapes. With ``cfg.enabled`` false the
        inputs themselves are returned.
    """
    if not cfg.enabled:
        return image, list(labels)
    _check_inputs(image, labels, fill_values)
    params = sample_params(image.shape[0], image.dim() - 2, cfg, generator=generator)
    return apply_params(image, labels, params, fill_values=fill_values)


def apply_params(
    image: Tensor, labels: Sequence[Tensor], params: AugmentParams, *, fill_values: Sequence[int]
) -> tuple[Tensor, list[Tensor]]:
    """Apply drawn parameters (deterministic). Inputs are never modified in place. Shapes as :func:`augment_batch`."""
    _check_inputs(image, labels, fill_values)
    n, dims = image.shape[0], image.dim() - 2
    if params.flip.shape != (n, dims):
        raise GeometryError(
            f"parameters were drawn for {params.flip.shape[0]} samples in {params.flip.shape[1]}D, "
            f"but the image is {tuple(image.shape)}; call sample_params(n={n}, spatial_dims={dims}, ...)"
        )
    field_gen = torch.Generator().manual_seed(params.field_seed)
    work = torch.float64 if image.dtype == torch.float64 else torch.float32
    with torch.autocast(device_type=image.device.type, enabled=False):
        img = _Batch(image, work)
        maps = [_Batch(label, torch.int64) for label in labels]
        # -- spatial: one grid per resampled sample (flips folded in); the others are never interpolated
        resampled = params.resampled()
        rows = _Rows(resampled, image.device)
        if rows:
            grid = _sampling_grid(params.select(rows.cpu_index), image.shape[2:], work, image.device, field_gen)
            img.put(rows, _resample_image(img.take(rows), grid))
            for batch, fill in zip(maps, fill_values, strict=True):
                batch.put(rows, _resample_label(batch.take(rows), grid, fill))
        for axis in range(dims):  # exact flips of the samples that were not resampled
            rows = _Rows(params.flip[:, axis] & ~resampled, image.device)
            if rows:
                img.put(rows, img.take(rows).flip(axis + 2))
                for batch in maps:
                    batch.put(rows, batch.take(rows).flip(axis + 1))
        # -- intensity: image only
        _intensity(img, params, field_gen)
    return img.value.to(image.dtype), [batch.value for batch in maps]


# --------------------------------------------------------------------------------------------- helpers
def _check_inputs(image: Tensor, labels: Sequence[Tensor], fill_values: Sequence[int]) -> None:
    if image.dim() not in (4, 5):
        raise GeometryError(
            f"image must be [N, C, H, W] or [N, C, D, H, W], got shape {tuple(image.shape)} (add the channel dim)"
        )
    if not image.dtype.is_floating_point:
        raise TypeError(f"image must be floating point, got dtype {image.dtype} (convert with .float())")
    voxel_shape = (image.shape[0], *image.shape[2:])
    for i, label in enumerate(labels):
        if tuple(label.shape) != voxel_shape:
            raise GeometryError(
                f"labels[{i}] has shape {tuple(label.shape)}, but the image {tuple(image.shape)} needs {voxel_shape}"
            )
        if label.dtype.is_floating_point or label.dtype == torch.bool:
            raise TypeError(f"labels[{i}] must hold integer class indices, got dtype {label.dtype}")
        if label.device != image.device:
            raise ValueError(f"labels[{i}] is on {label.device} but the image is on {image.device}")
    if len(fill_values) != len(labels):
        raise ValueError(
            f"fill_values has {len(fill_values)} entries for {len(labels)} label tensors; give one per label "
            "(the ignore index, e.g. [255, 255] for dense and sparse labels)"
        )


class _Rows:
    """The samples a transform touches, chosen from a CPU ``[N]`` bool mask (no device synchronisation)."""

    def __init__(self, mask: Tensor, device: torch.device) -> None:
        self.cpu_index = mask.nonzero().flatten()
        self.everything = bool(mask.all())
        self.index = self.cpu_index.to(device)

    def __bool__(self) -> bool:
        return self.cpu_index.numel() > 0


class _Batch:
    """A batch tensor updated row-wise without touching the caller's tensor.

    The input is copied at most once, on the first partial update (a conversion to ``dtype`` already is a
    copy); later updates write in place. Replacing every row adopts the new values without a copy.
    """

    def __init__(self, x: Tensor, dtype: torch.dtype) -> None:
        self.value = x.to(dtype)
        self.owned = self.value is not x

    def take(self, rows: _Rows) -> Tensor:
        return self.value if rows.everything else self.value.index_select(0, rows.index)

    def put(self, rows: _Rows, values: Tensor) -> None:
        if rows.everything:
            self.value, self.owned = values, True
            return
        if not self.owned:
            self.value, self.owned = self.value.clone(), True
        self.value.index_copy_(0, rows.index, values.to(self.value.dtype))


def _rotation(angles: Tensor) -> Tensor:
    """``[K, d, d]`` rotation matrices acting on grid coordinates (x=width, y=height[, z=depth])."""
    c, s = torch.cos(angles), torch.sin(angles)
    one, zero = torch.ones_like(c[:, 0]), torch.zeros_like(c[:, 0])
    if angles.shape[1] == 1:
        return torch.stack([c[:, 0], -s[:, 0], s[:, 0], c[:, 0]], dim=1).reshape(-1, 2, 2)

    def matrix(*rows: Tensor) -> Tensor:
        return torch.stack(rows, dim=1).reshape(-1, 3, 3)

    # about depth (z): rotates x-y, the in-plane rotation of 2D; about height (y): z-x; about width (x): y-z
    rz = matrix(c[:, 0], -s[:, 0], zero, s[:, 0], c[:, 0], zero, zero, zero, one)
    ry = matrix(c[:, 1], zero, s[:, 1], zero, one, zero, -s[:, 1], zero, c[:, 1])
    rx = matrix(one, zero, zero, zero, c[:, 2], -s[:, 2], zero, s[:, 2], c[:, 2])
    return rz @ ry @ rx


def _sampling_grid(
    params: AugmentParams, spatial: Sequence[int], dtype: torch.dtype, device: torch.device, gen: torch.Generator
) -> Tensor:
    """``[K, *spatial, d]`` normalised input coordinates for every output voxel (``align_corners=False``)."""
    dims = len(spatial)
    # voxel-unit transform, conjugated into normalised coordinates so rotations stay rigid on non-square patches
    size = torch.tensor(list(spatial)[::-1], dtype=torch.float64)  # grid order: width, height[, depth]
    linear = _rotation(params.angles) / params.scale[:, None, None]
    linear = linear * size[None, None, :] / size[None, :, None]
    # flipping output axis a (tensor order) negates the grid column of that axis: out(p) = warped(F p)
    signs = 1.0 - 2.0 * params.flip.flip(1).to(torch.float64)  # to grid order (x = last tensor axis)
    linear = linear * signs[:, None, :]
    grid = _affine_grid(linear, spatial, dtype, device)
    elastic = params.elastic.nonzero().flatten()
    if elastic.numel() > 0:
        field = _displacement(params.elastic[elastic], params.elastic_sigma, spatial, gen)
        field = F.interpolate(
            field.to(device=device, dtype=dtype), size=tuple(spatial), mode=_LINEAR[dims], align_corners=False
        )
        grid.index_add_(0, elastic.to(device), field.movedim(1, -1))
    return grid


def _affine_grid(linear: Tensor, spatial: Sequence[int], dtype: torch.dtype, device: torch.device) -> Tensor:
    """``F.affine_grid`` without translation, as a broadcast sum of per-axis terms (no ``[K, *spatial, d+1]`` base
    grid and no batched matmul: one pass over the output instead of several)."""
    k, dims = linear.shape[0], len(spatial)
    terms = []
    for axis, size in enumerate(spatial):
        column = dims - 1 - axis  # tensor axis -> grid component (x is the last tensor axis)
        centres = (torch.arange(size, dtype=torch.float64) * 2.0 + 1.0) / size - 1.0  # align_corners=False
        shape = [1] * dims
        shape[axis] = size
        term = centres.reshape(1, *shape, 1) * linear[:, :, column].reshape(k, *([1] * dims), dims)
        terms.append(term.to(device=device, dtype=dtype))
    grid = terms[0]
    for term in terms[1:]:  # small terms first: only the last sum is full size
        grid = grid + term
    return grid.contiguous()


_LINEAR = {2: "bilinear", 3: "trilinear"}


def _displacement(alpha: Tensor, sigma: float, spatial: Sequence[int], gen: torch.Generator) -> Tensor:
    """Coarse smooth displacement ``[K, d, *coarse]`` (normalised units), largest component ``2 * alpha``.

    Noise is drawn on a grid of about ``4 / sigma`` cells per axis, padded by the kernel radius, and smoothed
    by a separable Gaussian with valid convolutions, so no border effect shrinks the field at the edges.
    """
    k, dims = alpha.shape[0], len(spatial)
    sigma = min(sigma, 1.0)  # wider kernels give the same near-linear field at a higher cost
    coarse = [min(size, math.ceil(_CELLS_PER_SIGMA / sigma)) for size in spatial]
    sigmas = [sigma * c for c in coarse]
    radii = [max(1, math.ceil(3.0 * s)) for s in sigmas]
    noise_shape = [c + 2 * r for c, r in zip(coarse, radii, strict=True)]
    field = torch.randn((k * dims, 1, *noise_shape), generator=gen, dtype=torch.float32)
    conv = F.conv2d if dims == 2 else F.conv3d
    for axis, (s, r) in enumerate(zip(sigmas, radii, strict=True)):
        taps = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=torch.float32) / s) ** 2)
        shape = [1] * dims
        shape[axis] = 2 * r + 1
        field = conv(field, (taps / taps.sum()).reshape(1, 1, *shape))
    field = field.reshape(k, dims, *coarse)
    peak = field.abs().amax(dim=tuple(range(1, dims + 2)), keepdim=True).clamp_min(1e-12)
    return field / peak * (2.0 * alpha.to(torch.float32)).reshape(k, *([1] * (dims + 1)))


def _resample_image(image: Tensor, grid: Tensor) -> Tensor:
    """Bilinear resampling; out-of-view voxels take the per-sample, per-channel minimum."""
    low = image.amin(dim=tuple(range(2, image.dim())), keepdim=True)
    warped = F.grid_sample(image - low, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return warped + low


def _resample_label(label: Tensor, grid: Tensor, fill: int) -> Tensor:
    """Nearest resampling of an int64 label map; out-of-view voxels become ``fill``.

    ``label - fill`` is resampled with zero padding and ``fill`` added back: out-of-view voxels read 0 and
    return ``fill``, and in-view voxels get their value back exactly (float32 holds integers below 2**24).
    """
    shifted = label.to(torch.float32).sub_(fill).unsqueeze(1)
    warped = F.grid_sample(shifted, grid.to(torch.float32), mode="nearest", padding_mode="zeros", align_corners=False)
    return warped.squeeze(1).add_(fill).to(torch.int64)


def _intensity(image: _Batch, params: AugmentParams, gen: torch.Generator) -> None:
    """Gamma, contrast, brightness, noise, each on the samples that drew it only (others stay bit-identical)."""
    ndim = image.value.dim()
    spatial = tuple(range(2, ndim))
    device, dtype = image.value.device, image.value.dtype

    def per_sample(values: Tensor, rows: _Rows) -> Tensor:
        return values[rows.cpu_index].to(device=device, dtype=dtype).reshape(-1, *([1] * (ndim - 1)))

    rows = _Rows(params.gamma != 1, device)
    if rows:
        x = image.take(rows)
        low = x.amin(dim=spatial, keepdim=True)
        span = x.amax(dim=spatial, keepdim=True) - low
        image.put(rows, ((x - low) / (span + _GAMMA_EPS)).pow(per_sample(params.gamma, rows)) * span + low)
    rows = _Rows(params.contrast != 1, device)
    if rows:
        x = image.take(rows)
        mean = x.mean(dim=spatial, keepdim=True)
        image.put(rows, (x - mean) * per_sample(params.contrast, rows) + mean)
    rows = _Rows(params.brightness != 1, device)
    if rows:
        image.put(rows, image.take(rows) * per_sample(params.brightness, rows))
    rows = _Rows(params.noise_std != 0, device)
    if rows:
        x = image.take(rows)
        noise = torch.randn(tuple(x.shape), generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)
        image.put(rows, x + noise * per_sample(params.noise_std, rows))
