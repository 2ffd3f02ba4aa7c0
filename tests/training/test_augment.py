"""Batched training augmentation: labels move with the image, exact where a transform is exact, reproducible."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from confkd.config import AugmentConfig
from confkd.errors import GeometryError
from confkd.training.augment import AugmentParams, _affine_grid, apply_params, augment_batch, sample_params

IGNORE = 255
OFF = AugmentConfig(
    p_rotate=0.0,
    p_scale=0.0,
    p_flip=0.0,
    p_elastic=0.0,
    p_gamma=0.0,
    p_contrast=0.0,
    p_brightness=0.0,
    p_noise=0.0,
)
SPATIAL = dataclasses.replace(OFF, p_rotate=1.0, p_scale=1.0, p_flip=0.5, p_elastic=1.0, elastic_alpha=0.05)
INTENSITY = dataclasses.replace(OFF, p_gamma=1.0, p_contrast=1.0, p_brightness=1.0, p_noise=1.0)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def heart_labels(n: int, *spatial: int, seed: int = 0) -> torch.Tensor:
    """``[n, *spatial]`` int64 cardiac-like maps: LV disc (3) in a myocardial ring (2), an RV blob (1), background 0."""
    g = gen(seed)
    axes = [(torch.arange(s, dtype=torch.float32) + 0.5) / s - 0.5 for s in spatial]
    coords = torch.meshgrid(*axes, indexing="ij")
    shift = (torch.rand(n, len(spatial), generator=g) - 0.5) * 0.2
    out = torch.zeros(n, *spatial, dtype=torch.int64)
    for i in range(n):
        lv = sum((c - shift[i, a]) ** 2 for a, c in enumerate(coords)) ** 0.5
        rv = sum((c - shift[i, a] - (0.18 if a == len(spatial) - 1 else 0.0)) ** 2 for a, c in enumerate(coords)) ** 0.5
        out[i][rv < 0.2] = 1
        out[i][lv < 0.17] = 2
        out[i][lv < 0.11] = 3
    return out


def sparse_from(dense: torch.Tensor, fraction: float = 0.1, seed: int = 1) -> torch.Tensor:
    keep = torch.rand(dense.shape, generator=gen(seed)) < fraction
    return torch.where(keep, dense, IGNORE)


def neutral(n: int, dims: int = 2, **fields: torch.Tensor) -> AugmentParams:
    """Parameters that do nothing, with ``fields`` replaced."""
    return dataclasses.replace(sample_params(n, dims, OFF, generator=gen()), **fields)


def angles(n: int, degrees: float, dims: int = 2, axis: int = 0) -> torch.Tensor:
    out = torch.zeros(n, 1 if dims == 2 else 3, dtype=torch.float64)
    out[:, axis] = math.radians(degrees)
    return out


# ------------------------------------------------------------------------------------------- identity
def test_disabled_returns_the_inputs_themselves() -> None:
    image, dense = torch.randn(2, 1, 8, 8), torch.zeros(2, 8, 8, dtype=torch.int64)
    out, labels = augment_batch(image, [dense], AugmentConfig(enabled=False), generator=gen(), fill_values=[IGNORE])
    assert out is image
    assert labels[0] is dense


def test_all_probabilities_zero_is_bit_identical() -> None:
    image, dense = torch.randn(6, 2, 32, 32), heart_labels(6, 32, 32)
    out, (lab,) = augment_batch(image, [dense], OFF, generator=gen(), fill_values=[IGNORE])
    assert torch.equal(out, image)
    assert torch.equal(lab, dense)


def test_samples_that_draw_nothing_stay_bit_identical_while_others_change() -> None:
    cfg = dataclasses.replace(SPATIAL, p_rotate=0.3, p_scale=0.3, p_flip=0.2, p_elastic=0.2, p_gamma=0.2)
    image, dense = torch.randn(32, 1, 32, 32), heart_labels(32, 32, 32)
    params = sample_params(32, 2, cfg, generator=gen(3))
    out, (lab,) = apply_params(image, [dense], params, fill_values=[IGNORE])
    untouched = ~params.resampled() & ~params.flip.any(dim=1) & (params.gamma == 1)
    assert 0 < int(untouched.sum()) < 32  # both kinds in the batch, or the test proves nothing
    for i in range(32):
        same = torch.equal(out[i], image[i]) and torch.equal(lab[i], dense[i])
        assert same == bool(untouched[i]), f"sample {i}"


def test_inputs_are_never_modified() -> None:
    image, dense = torch.randn(16, 1, 32, 32), heart_labels(16, 32, 32)
    before = image.clone(), dense.clone()
    cfg = dataclasses.replace(OFF, p_rotate=0.5, p_flip=0.5, p_noise=0.5)
    params = sample_params(16, 2, cfg, generator=gen())
    assert 0 < int(params.resampled().sum()) < 16  # partial updates are the risky path
    apply_params(image, [dense], params, fill_values=[IGNORE])
    assert torch.equal(image, before[0])
    assert torch.equal(dense, before[1])


# ----------------------------------------------------------------------------------------- consistency
def _agreement(image: torch.Tensor, label: torch.Tensor) -> float:
    valid = label != IGNORE
    return float((image[:, 0].round().to(torch.int64) == label)[valid].float().mean())


def test_labels_follow_the_image() -> None:
    """The image is the label map as float; after the same transform, round(bilinear) = nearest almost everywhere
    (they differ only on one-voxel class boundaries). Labels warped with another draw agree far less."""
    dense = heart_labels(16, 96, 96)
    out, (lab,) = augment_batch(dense[:, None].float(), [dense], SPATIAL, generator=gen(0), fill_values=[IGNORE])
    assert (lab == IGNORE).any()  # rotations and zoom-outs pushed voxels out of view
    assert _agreement(out, lab) >= 0.97  # measured 0.993-0.994 over seeds (boundary voxels differ)
    _, (other,) = augment_batch(dense[:, None].float(), [dense], SPATIAL, generator=gen(1), fill_values=[IGNORE])
    assert _agreement(out, other) < 0.9


def test_sparse_labels_agree_with_dense_labels_wherever_annotated() -> None:
    dense = heart_labels(16, 64, 64)
    sparse = sparse_from(dense)
    cfg = dataclasses.replace(SPATIAL, elastic_alpha=0.1)
    _, (d, s) = augment_batch(torch.randn(16, 1, 64, 64), [dense, sparse], cfg, generator=gen(), fill_values=[7, 7])
    annotated = (s != IGNORE) & (s != 7)
    assert annotated.sum() > 0.05 * s.numel()
    assert torch.equal(s[annotated], d[annotated])
    assert torch.equal(s == 7, d == 7)  # both see the same field of view


@settings(max_examples=20, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    p=st.floats(0.0, 1.0),
    fill=st.sampled_from([-1, 4, 255]),
    size=st.sampled_from([(16, 16), (12, 20)]),
)
def test_labels_only_hold_input_values_or_the_fill(seed: int, p: float, fill: int, size: tuple[int, int]) -> None:
    cfg = dataclasses.replace(SPATIAL, p_rotate=p, p_scale=p, p_flip=p, p_elastic=p, elastic_alpha=0.1)
    dense = heart_labels(4, *size, seed=seed)
    sparse = sparse_from(dense, seed=seed)
    _, (d, s) = augment_batch(
        torch.randn(4, 1, *size), [dense, sparse], cfg, generator=gen(seed), fill_values=[fill] * 2
    )
    assert set(d.unique().tolist()) <= {*dense.unique().tolist(), fill}
    assert set(s.unique().tolist()) <= {*sparse.unique().tolist(), fill}
    annotated = (s != IGNORE) & (s != fill)
    assert torch.equal(s[annotated], d[annotated])


def test_out_of_view_voxels_get_the_fill_value_and_the_image_minimum() -> None:
    """Zooming out by 2 shows the input in the central half; the rest is outside the field of view."""
    image = torch.randn(3, 2, 32, 32) + 5.0
    dense = torch.randint(0, 4, (3, 32, 32))
    params = neutral(3, scale=torch.full((3,), 0.5, dtype=torch.float64))
    out, (lab,) = apply_params(image, [dense], params, fill_values=[IGNORE])
    inside = torch.zeros(32, 32, dtype=torch.bool)
    inside[8:24, 8:24] = True
    assert (lab[:, ~inside] == IGNORE).all()
    assert (lab[:, inside] != IGNORE).all()
    low = image.amin(dim=(2, 3))
    far = torch.ones(32, 32, dtype=torch.bool)
    far[6:26, 6:26] = False  # away from the bilinear seam
    assert torch.allclose(out[:, :, far], low[:, :, None].expand(3, 2, int(far.sum())), atol=1e-5)


# -------------------------------------------------------------------------------------- exact transforms
def test_flips_equal_torch_flip_exactly() -> None:
    cfg = dataclasses.replace(OFF, p_flip=0.5)
    image, dense = torch.randn(16, 2, 24, 20), heart_labels(16, 24, 20)
    sparse = sparse_from(dense)
    params = sample_params(16, 2, cfg, generator=gen(5))
    assert len({tuple(row.tolist()) for row in params.flip}) == 4  # every combination of axes occurs
    out, (d, s) = apply_params(image, [dense, sparse], params, fill_values=[IGNORE, IGNORE])
    for i in range(16):
        axes = [a for a in range(2) if params.flip[i, a]]
        assert torch.equal(out[i], image[i].flip([a + 1 for a in axes]))
        assert torch.equal(d[i], dense[i].flip(axes))
        assert torch.equal(s[i], sparse[i].flip(axes))


def test_every_sample_flipped_equals_flipping_the_batch() -> None:
    image, dense = torch.randn(4, 1, 16, 16), heart_labels(4, 16, 16)
    cfg = dataclasses.replace(OFF, p_flip=1.0)
    out, (lab,) = augment_batch(image, [dense], cfg, generator=gen(), fill_values=[IGNORE])
    assert torch.equal(out, image.flip(2, 3))
    assert torch.equal(lab, dense.flip(1, 2))


@pytest.mark.parametrize(("degrees", "k"), [(90.0, 1), (-90.0, -1), (180.0, 2)])
def test_right_angle_rotation_equals_rot90(degrees: float, k: int) -> None:
    image, dense = torch.randn(4, 1, 32, 32), heart_labels(4, 32, 32)
    out, (lab,) = apply_params(image, [dense], neutral(4, angles=angles(4, degrees)), fill_values=[IGNORE])
    assert torch.equal(lab, torch.rot90(dense, k, dims=(-2, -1)))
    torch.testing.assert_close(out, torch.rot90(image, k, dims=(-2, -1)), atol=1e-5, rtol=0)


def test_flip_combined_with_rotation_is_the_flipped_rotation() -> None:
    dense = heart_labels(2, 32, 32)
    flip = torch.tensor([[True, False], [False, True]])
    _, (rotated,) = apply_params(dense[:, None].float(), [dense], neutral(2, angles=angles(2, 30)), fill_values=[9])
    both = neutral(2, angles=angles(2, 30), flip=flip)
    _, (lab,) = apply_params(dense[:, None].float(), [dense], both, fill_values=[9])
    assert torch.equal(lab[0], rotated[0].flip(0))
    assert torch.equal(lab[1], rotated[1].flip(1))


def test_rotation_is_rigid_on_non_square_patches() -> None:
    """A disc stays a disc (not an ellipse) when a 48 x 96 patch is rotated by 45 degrees."""
    yy, xx = torch.meshgrid(torch.arange(48.0) + 0.5, torch.arange(96.0) + 0.5, indexing="ij")
    disc = (((yy - 24) ** 2 + (xx - 48) ** 2) < 12**2).long()[None]
    _, (lab,) = apply_params(disc[:, None].float(), [disc], neutral(1, angles=angles(1, 45)), fill_values=[IGNORE])
    rows, cols = lab[0].eq(1).nonzero().unbind(1)
    height, width = int(rows.max() - rows.min()) + 1, int(cols.max() - cols.min()) + 1
    assert abs(height - width) <= 1
    assert abs(int(lab.eq(1).sum()) - int(disc.sum())) <= 0.03 * int(disc.sum())


def test_scale_above_one_magnifies() -> None:
    square = torch.zeros(1, 64, 64, dtype=torch.int64)
    square[:, 24:40, 24:40] = 1
    _, (lab,) = apply_params(square[:, None].float(), [square], neutral(1, scale=torch.tensor([2.0])), fill_values=[9])
    assert int(lab.eq(1).sum()) == 4 * 16 * 16
    assert bool(lab[0, 16:48, 16:48].eq(1).all())


def test_elastic_displacement_peaks_at_alpha_times_the_patch_size() -> None:
    """Channels holding the x and y voxel coordinates (as patch fractions) read back the displacement exactly
    (coordinates are linear, so bilinear interpolation is exact) away from the border, where no voxel can be
    displaced out of view."""
    h, w, alpha = 48, 64, 0.05
    yy, xx = torch.meshgrid((torch.arange(h) + 0.5) / h, (torch.arange(w) + 0.5) / w, indexing="ij")
    image = torch.stack([xx, yy])[None].expand(8, 2, h, w)
    params = neutral(8, elastic=torch.full((8,), alpha, dtype=torch.float64))
    out, _ = apply_params(image, [], params, fill_values=[])
    margin = math.ceil(alpha * max(h, w)) + 2
    moved = (out - image)[:, :, margin:-margin, margin:-margin]
    shift = moved.abs().amax(dim=1)
    peak = shift.flatten(1).amax(dim=1)
    assert torch.all(peak <= alpha + 1e-5)
    assert float(peak.max()) >= 0.97 * alpha  # the largest displacement is alpha, not a smaller or larger value
    assert float(shift.mean()) > 0.2 * alpha  # a displacement everywhere, not a few spikes
    assert float(shift.mean()) < 0.8 * alpha
    # smooth (sigma = 10% of the patch): neighbours move together; white noise would differ by up to 2 alpha
    assert float((moved[..., 1:] - moved[..., :-1]).abs().max()) < 0.3 * alpha
    assert float((moved[..., 1:, :] - moved[..., :-1, :]).abs().max()) < 0.3 * alpha


@pytest.mark.parametrize("spatial", [(7, 9), (4, 7, 9)])
def test_broadcast_grid_equals_torch_affine_grid(spatial: tuple[int, ...]) -> None:
    """The grid is built as a broadcast sum (one pass instead of F.affine_grid's base grid + bmm): same values."""
    dims = len(spatial)
    linear = torch.randn(5, dims, dims, generator=gen(), dtype=torch.float64)
    grid = _affine_grid(linear, spatial, torch.float32, torch.device("cpu"))
    theta = torch.cat([linear, torch.zeros(5, dims, 1, dtype=torch.float64)], dim=2)
    expected = F.affine_grid(theta, [5, 1, *spatial], align_corners=False).float()
    torch.testing.assert_close(grid, expected, atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------------ randomness
def test_same_seed_same_output_and_different_seed_different_output() -> None:
    cfg = dataclasses.replace(AugmentConfig(), p_noise=0.5, p_elastic=0.5)
    image, dense = torch.randn(8, 1, 32, 32), heart_labels(8, 32, 32)
    a_img, (a_lab,) = augment_batch(image, [dense], cfg, generator=gen(11), fill_values=[IGNORE])
    b_img, (b_lab,) = augment_batch(image, [dense], cfg, generator=gen(11), fill_values=[IGNORE])
    c_img, (c_lab,) = augment_batch(image, [dense], cfg, generator=gen(12), fill_values=[IGNORE])
    assert torch.equal(a_img, b_img)
    assert torch.equal(a_lab, b_lab)
    assert not torch.equal(a_img, c_img)
    assert not torch.equal(a_lab, c_lab)


def test_augment_batch_is_sample_params_then_apply_params() -> None:
    cfg = AugmentConfig(p_noise=1.0, p_elastic=1.0)
    image, dense = torch.randn(4, 1, 32, 32), heart_labels(4, 32, 32)
    a_img, (a_lab,) = augment_batch(image, [dense], cfg, generator=gen(2), fill_values=[IGNORE])
    params = sample_params(4, 2, cfg, generator=gen(2))
    b_img, (b_lab,) = apply_params(image, [dense], params, fill_values=[IGNORE])
    assert torch.equal(a_img, b_img)
    assert torch.equal(a_lab, b_lab)


def test_number_of_draws_does_not_depend_on_the_probabilities() -> None:
    g1, g2 = gen(4), gen(4)
    sample_params(8, 2, OFF, generator=g1)
    sample_params(8, 2, AugmentConfig(), generator=g2)
    assert torch.equal(g1.get_state(), g2.get_state())


# ------------------------------------------------------------------------------------------- intensity
def test_intensity_transforms_touch_the_image_only() -> None:
    image, dense = torch.randn(6, 1, 32, 32), heart_labels(6, 32, 32)
    sparse = sparse_from(dense)
    out, (d, s) = augment_batch(image, [dense, sparse], INTENSITY, generator=gen(), fill_values=[IGNORE, IGNORE])
    assert torch.equal(d, dense)
    assert torch.equal(s, sparse)
    assert not torch.isclose(out, image).all(dim=(1, 2, 3)).any()


def test_noise_standard_deviation_matches_the_config() -> None:
    cfg = dataclasses.replace(OFF, p_noise=1.0, noise_std=0.1)
    out, _ = augment_batch(torch.full((8, 1, 64, 64), 3.0), [], cfg, generator=gen(), fill_values=[])
    assert abs(float(out.std()) - 0.1) < 0.01
    assert abs(float(out.mean()) - 3.0) < 0.01


def test_gamma_acts_on_the_min_max_rescaled_image() -> None:
    ramp = torch.linspace(-2.0, 6.0, 64).reshape(1, 1, 8, 8).expand(2, 1, 8, 8)
    out, _ = apply_params(ramp, [], neutral(2, gamma=torch.tensor([2.0, 0.5], dtype=torch.float64)), fill_values=[])
    unit = (ramp + 2.0) / 8.0
    torch.testing.assert_close(out[0], unit[0] ** 2 * 8.0 - 2.0, atol=1e-5, rtol=0)
    torch.testing.assert_close(out[1], unit[1] ** 0.5 * 8.0 - 2.0, atol=1e-5, rtol=0)


def test_contrast_keeps_the_mean_and_brightness_multiplies() -> None:
    image = torch.randn(2, 2, 16, 16) + 1.0
    contrast = neutral(2, contrast=torch.tensor([1.2, 0.8], dtype=torch.float64))
    out, _ = apply_params(image, [], contrast, fill_values=[])
    torch.testing.assert_close(out.mean(dim=(2, 3)), image.mean(dim=(2, 3)), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.std(dim=(2, 3)), image.std(dim=(2, 3)) * torch.tensor([[1.2], [0.8]]))
    bright = neutral(2, brightness=torch.tensor([1.25, 0.75], dtype=torch.float64))
    out, _ = apply_params(image, [], bright, fill_values=[])
    torch.testing.assert_close(out, image * torch.tensor([1.25, 0.75]).reshape(2, 1, 1, 1))


# ---------------------------------------------------------------------------------------------------- 3D
def test_3d_shapes_and_label_consistency() -> None:
    dense = heart_labels(3, 24, 32, 32)
    sparse = sparse_from(dense)
    cfg = dataclasses.replace(SPATIAL, rotate_degrees=30.0)
    out, (d, s) = augment_batch(dense[:, None].float(), [dense, sparse], cfg, generator=gen(), fill_values=[9, 9])
    assert out.shape == (3, 1, 24, 32, 32)
    assert d.shape == s.shape == (3, 24, 32, 32)
    assert not torch.equal(d, dense)
    annotated = (s != IGNORE) & (s != 9)
    assert torch.equal(s[annotated], d[annotated])
    valid = d != 9
    assert float((out[:, 0].round().long() == d)[valid].float().mean()) >= 0.95


@pytest.mark.parametrize(("axis", "dims"), [(0, (-2, -1)), (1, (-1, -3)), (2, (-3, -2))])
def test_3d_right_angle_rotations_about_each_axis(axis: int, dims: tuple[int, int]) -> None:
    """Angle ``i`` rotates about tensor axis ``i`` (depth, height, width); +90 degrees is ``rot90(k=1)``."""
    dense = torch.randint(0, 5, (2, 12, 12, 12))
    params = neutral(2, dims=3, angles=angles(2, 90.0, dims=3, axis=axis))
    _, (lab,) = apply_params(dense[:, None].float(), [dense], params, fill_values=[IGNORE])
    assert torch.equal(lab, torch.rot90(dense, 1, dims=dims))


# --------------------------------------------------------------------------------------- dtypes, devices
def test_dtypes_memory_format_and_autocast() -> None:
    image, dense = torch.randn(4, 3, 32, 32), heart_labels(4, 32, 32).to(torch.int32)
    cfg = dataclasses.replace(AugmentConfig(), p_elastic=0.5)
    ref_img, (ref_lab,) = augment_batch(image, [dense], cfg, generator=gen(1), fill_values=[IGNORE])
    assert ref_img.dtype == torch.float32
    assert ref_lab.dtype == torch.int64
    last = image.to(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        img, (lab,) = augment_batch(last, [dense], cfg, generator=gen(1), fill_values=[IGNORE])
    assert torch.equal(img, ref_img)
    assert torch.equal(lab, ref_lab)
    half, _ = augment_batch(image.bfloat16(), [dense], cfg, generator=gen(1), fill_values=[IGNORE])
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), ref_img, atol=0.1, rtol=0.02)


@pytest.mark.gpu
def test_cuda_matches_cpu() -> None:
    cfg = dataclasses.replace(AugmentConfig(), p_elastic=0.5, p_noise=0.5)
    image, dense = torch.randn(8, 1, 64, 64), heart_labels(8, 64, 64)
    sparse = sparse_from(dense)
    cpu_img, cpu_labels = augment_batch(image, [dense, sparse], cfg, generator=gen(3), fill_values=[IGNORE] * 2)
    gpu_img, gpu_labels = augment_batch(
        image.cuda(), [dense.cuda(), sparse.cuda()], cfg, generator=gen(3), fill_values=[IGNORE] * 2
    )
    assert gpu_img.device.type == "cuda"
    assert gpu_img.dtype == torch.float32
    assert all(lab.dtype == torch.int64 and lab.device.type == "cuda" for lab in gpu_labels)
    torch.testing.assert_close(gpu_img.cpu(), cpu_img, atol=1e-3, rtol=1e-3)
    for cpu_lab, gpu_lab in zip(cpu_labels, gpu_labels, strict=True):
        assert float((gpu_lab.cpu() == cpu_lab).float().mean()) > 0.999  # nearest ties may round differently
    with torch.autocast("cuda", dtype=torch.float16):
        amp_img, amp_labels = augment_batch(
            image.cuda(), [dense.cuda(), sparse.cuda()], cfg, generator=gen(3), fill_values=[IGNORE] * 2
        )
    torch.testing.assert_close(amp_img, gpu_img, atol=1e-6, rtol=0)  # grids never computed in half precision
    assert torch.equal(amp_labels[0], gpu_labels[0])


# ------------------------------------------------------------------------------------------------ errors
def test_bad_inputs_name_the_problem() -> None:
    image, dense = torch.randn(2, 1, 8, 8), torch.zeros(2, 8, 8, dtype=torch.int64)
    cfg = AugmentConfig()
    with pytest.raises(GeometryError, match=r"\[N, C, H, W\]"):
        augment_batch(torch.randn(2, 8, 8), [dense], cfg, generator=gen(), fill_values=[0])
    with pytest.raises(GeometryError, match=r"labels\[0\] has shape \(2, 8, 9\)"):
        augment_batch(image, [torch.zeros(2, 8, 9, dtype=torch.int64)], cfg, generator=gen(), fill_values=[0])
    with pytest.raises(TypeError, match="integer class indices"):
        augment_batch(image, [dense.float()], cfg, generator=gen(), fill_values=[0])
    with pytest.raises(TypeError, match="floating point"):
        augment_batch(dense[:, None], [dense], cfg, generator=gen(), fill_values=[0])
    with pytest.raises(ValueError, match="one per label"):
        augment_batch(image, [dense, dense], cfg, generator=gen(), fill_values=[0])
    with pytest.raises(GeometryError, match="sample_params"):
        apply_params(image, [dense], sample_params(3, 2, cfg, generator=gen()), fill_values=[0])
