"""Tests for confkd.data.preprocessing: geometry of the forward map and its inverse, intensities, state."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage

from confkd.config import PreprocessConfig
from confkd.data.preprocessing import (
    PreprocessState,
    compute_intensity_params,
    invert,
    invert_labels,
    median_spacing,
    preprocess,
    preprocess_label,
    select_slice_axis,
)
from confkd.errors import ConfigError, DatasetError, GeometryError


def _one_hot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[S, H, W] -> [S, C, H, W]; [1, D, H, W] -> [1, C, D, H, W] (float32)."""
    return F.one_hot(labels, num_classes).movedim(-1, 1).float()


def _blobs(shape: tuple[int, ...], sigma: tuple[float, ...], num_classes: int = 4, seed: int = 0) -> np.ndarray:
    """A smooth multi-class label map: argmax of smoothed noise fields."""
    rng = np.random.default_rng(seed)
    fields = np.stack([ndimage.gaussian_filter(rng.normal(size=shape), sigma) for _ in range(num_classes)])
    return fields.argmax(0).astype(np.uint8)


def _agreement_after_roundtrip(label: np.ndarray, state: PreprocessState, num_classes: int) -> torch.Tensor:
    net = preprocess_label(label, state)
    return invert(_one_hot(net, num_classes), state).argmax(0)


# ---------------------------------------------------------------------------------------------- slice axis


@pytest.mark.parametrize(
    ("spacing", "expected"),
    [
        ((1.2, 1.2, 8.0), 2),
        ((8.0, 1.0, 1.0), 0),
        ((1.0, 8.0, 1.0), 1),
        ((1.0, 1.0, 1.0), 2),  # isotropic: ties go to the last axis
        ((2.0, 2.0, 1.0), 1),
        ((3.0, 1.0, 3.0), 2),
        ((1.0, 1.0, 0.99999994), 2),  # float32 header noise still counts as a tie
    ],
)
def test_select_slice_axis_picks_lowest_resolution(spacing, expected):
    assert select_slice_axis(spacing, PreprocessConfig()) == expected


def test_select_slice_axis_honours_config_and_rejects_bad_values():
    assert select_slice_axis((1.0, 1.0, 8.0), PreprocessConfig(slice_axis=0)) == 0
    assert select_slice_axis((8.0, 1.0, 1.0), PreprocessConfig(slice_axis=1)) == 1
    with pytest.raises(GeometryError, match="spacing"):
        select_slice_axis((1.0, 0.0, 8.0), PreprocessConfig())
    with pytest.raises(GeometryError, match="spacing"):
        select_slice_axis((1.0, 8.0), PreprocessConfig())


def test_median_spacing_orders_each_case_by_its_slice_axis():
    spacings = [(1.5, 1.5, 10.0), (1.2, 1.2, 10.0), (8.0, 0.8, 0.8)]
    assert median_spacing(spacings, PreprocessConfig(spatial_dims=2)) == pytest.approx((1.2, 1.2))
    assert median_spacing(spacings, PreprocessConfig(spatial_dims=3)) == pytest.approx((10.0, 1.2, 1.2))
    with pytest.raises(DatasetError):
        median_spacing([], PreprocessConfig())


# --------------------------------------------------------------------------------------- shapes and inverse

SHAPE, SPACING = (13, 21, 7), (1.3, 0.9, 4.1)


def test_known_shapes_2d():
    cfg = PreprocessConfig(spatial_dims=2, target_spacing=(1.0, 1.0), pad_multiple=16)
    x, state = preprocess(np.zeros(SHAPE, np.float32), SPACING, cfg)
    # slice axis k; H = round(13 * 1.3) = 17, W = round(21 * 0.9) = 19, both padded to 32 (extra voxel at the end)
    assert tuple(x.shape) == (7, 1, 32, 32)
    assert state.slice_axis == 2
    assert state.resampled_shape == (17, 19)
    assert state.padding == ((7, 8), (6, 7))
    assert state.network_spacing == pytest.approx((13 * 1.3 / 17, 21 * 0.9 / 19))


def test_known_shapes_3d():
    cfg = PreprocessConfig(spatial_dims=3, target_spacing=(2.0, 1.0, 1.0), pad_multiple=8)
    x, state = preprocess(np.zeros(SHAPE, np.float32), SPACING, cfg)
    # network order (k, i, j): D = round(7 * 4.1 / 2) = 14, H = 17, W = 19 -> padded to 16, 24, 24
    assert tuple(x.shape) == (1, 1, 16, 24, 24)
    assert state.resampled_shape == (14, 17, 19)
    assert state.padding == ((1, 1), (3, 4), (2, 3))


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("slice_axis", [None, 0, 1, 2])
@pytest.mark.parametrize("resample", [False, True])
@pytest.mark.parametrize("pad_multiple", [1, 16])
def test_inverse_restores_shape_and_labels(spatial_dims, slice_axis, resample, pad_multiple):
    target = None if not resample else (1.0, 1.0) if spatial_dims == 2 else (3.0, 1.0, 1.0)
    cfg = PreprocessConfig(
        spatial_dims=spatial_dims, slice_axis=slice_axis, target_spacing=target, pad_multiple=pad_multiple
    )
    rng = np.random.default_rng(0)
    image = rng.normal(size=SHAPE).astype(np.float32)
    label = rng.integers(0, 4, SHAPE)
    x, state = preprocess(image, SPACING, cfg)
    assert x.dtype == torch.float32
    assert x.is_contiguous()
    assert tuple(x.shape) == (
        (state.network_shape[0], 1, *state.network_shape[1:]) if spatial_dims == 2 else (1, 1, *state.network_shape)
    )
    assert all(n % pad_multiple == 0 for n in x.shape[-spatial_dims:])
    net_label = preprocess_label(label, state)
    assert net_label.dtype == torch.int64
    assert tuple(net_label.shape) == (x.shape[0], *x.shape[2:])
    probs = invert(_one_hot(net_label, 4), state)
    assert tuple(probs.shape) == (4, *SHAPE)
    assert probs.is_contiguous()
    back = invert_labels(net_label, state)
    assert tuple(back.shape) == SHAPE
    if not resample:  # pure permutation and padding: exact, even for a noise label
        assert torch.equal(probs.argmax(0), torch.from_numpy(label))
        assert torch.equal(back, torch.from_numpy(label))


@settings(max_examples=40, deadline=None)
@given(
    shape=st.tuples(*[st.integers(1, 23)] * 3),
    spacing=st.tuples(*[st.floats(0.3, 6.0)] * 3),
    spatial_dims=st.sampled_from([2, 3]),
    slice_axis=st.sampled_from([None, 0, 1, 2]),
    target=st.none() | st.tuples(*[st.floats(0.3, 6.0)] * 3),
    pad_multiple=st.integers(1, 9),
    channels=st.integers(1, 3),
)
def test_roundtrip_property(shape, spacing, spatial_dims, slice_axis, target, pad_multiple, channels):
    cfg = PreprocessConfig(spatial_dims=spatial_dims, slice_axis=slice_axis, pad_multiple=pad_multiple)
    target = None if target is None else target[-spatial_dims:]
    image = np.random.default_rng(1).normal(size=shape)
    x, state = preprocess(image, spacing, cfg, target_spacing=target)
    state = PreprocessState.from_dict(json.loads(json.dumps(state.to_dict())))
    for n, (before, after) in zip(x.shape[-spatial_dims:], state.padding, strict=True):
        assert n % pad_multiple == 0
        assert 0 <= after - before <= 1
        assert before + after < pad_multiple
    assert torch.isfinite(x).all()
    probs = torch.rand(x.shape[0], channels, *x.shape[2:])
    assert tuple(invert(probs, state).shape) == (channels, *shape)
    label = torch.randint(0, 3, shape)
    back = invert_labels(preprocess_label(label, state), state)
    assert tuple(back.shape) == shape
    if all(m >= n for m, n in zip(state.resampled_shape, state.native_shape, strict=True)):
        # nearest-exact there and back is the identity whenever no axis shrinks
        assert torch.equal(back, label)


def test_label_maps_never_alias_the_input():
    label = torch.randint(0, 3, (4, 5, 6))
    _, state = preprocess(np.zeros((4, 5, 6)), (9.0, 1.0, 1.0), PreprocessConfig(pad_multiple=1))
    net = preprocess_label(label, state)  # slice axis 0, no resampling, no padding: nothing to do
    assert torch.equal(net, label)
    assert net.data_ptr() != label.data_ptr()
    assert invert_labels(net, state).data_ptr() != net.data_ptr()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64, torch.int64])
def test_invert_dtypes(dtype):
    _, state = preprocess(np.zeros((9, 7, 3)), (1.0, 1.0, 3.0), PreprocessConfig(target_spacing=(1.3, 0.6)))
    probs = torch.ones(3, 2, *state.network_shape[1:], dtype=dtype)
    out = invert(probs, state)
    assert out.dtype == (dtype if dtype.is_floating_point else torch.float32)
    torch.testing.assert_close(out, torch.ones_like(out))


def test_invert_checks_the_shape_it_is_given():
    _, state = preprocess(np.zeros(SHAPE), SPACING, PreprocessConfig(pad_multiple=16))
    with pytest.raises(GeometryError, match=r"\[7, C, 16, 32\]"):
        invert(torch.zeros(7, 4, 16, 31), state)
    with pytest.raises(GeometryError, match=r"\[7, 16, 32\]"):
        invert_labels(torch.zeros(7, 1, 16, 32, dtype=torch.int64), state)
    with pytest.raises(GeometryError, match="does not match its image"):
        preprocess_label(np.zeros((13, 21, 8)), state)


def test_bad_inputs_are_named():
    cfg = PreprocessConfig()
    with pytest.raises(GeometryError, match="3D"):
        preprocess(np.zeros((4, 4)), (1.0, 1.0, 1.0), cfg)
    with pytest.raises(ConfigError, match="2 positive numbers"):
        preprocess(np.zeros((4, 4, 4)), (1.0, 1.0, 1.0), cfg, target_spacing=(1.0, 1.0, 1.0))
    with pytest.raises(GeometryError, match="spacing"):
        preprocess(np.zeros((4, 4, 4)), (1.0, math.nan, 1.0), cfg)
    _, state = preprocess(np.zeros((4, 4, 4)), (1.0, 1.0, 1.0), cfg)
    with pytest.raises(GeometryError, match="non-integer"):
        preprocess_label(np.full((4, 4, 4), 0.5), state)


# -------------------------------------------------------------------------------------------------- geometry


@pytest.mark.parametrize(
    ("spatial_dims", "target", "resampled", "threshold"),
    [
        # 1.5 -> 1.0 mm loses nothing: measured 100.00 %. A half-voxel shift of the label grid (torch's legacy
        # "nearest") measures 96.2 %, align_corners=True 99.77 %, so 99.9 % catches both.
        (2, (1.0, 1.0), (92, 113), 0.999),  # 112.5 rounds up to 113
        (3, (8.0, 1.0, 1.0), (9, 92, 113), 0.999),
        # 1.5 -> 2.25 mm drops detail for good: measured 95.4 %
        (2, (2.25, 2.25), (41, 50), 0.94),
    ],
)
def test_resampled_label_roundtrip_agrees(spatial_dims, target, resampled, threshold):
    shape, spacing = (61, 75, 9), (1.5, 1.5, 8.0)
    label = _blobs(shape, sigma=(4.0, 4.0, 0.7))
    cfg = PreprocessConfig(spatial_dims=spatial_dims, target_spacing=target)
    _, state = preprocess(label.astype(np.float32), spacing, cfg)
    assert state.resampled_shape == resampled
    agreement = (_agreement_after_roundtrip(label, state, 4) == torch.from_numpy(label)).float().mean().item()
    assert agreement >= threshold, f"agreement {agreement:.4f}"


def test_forward_resampling_is_a_ramp_at_the_right_positions():
    """An intensity ramp along i, resampled 1.5 -> 1.0 mm, is the ramp sampled at the new voxel centres."""
    n = 12
    image = np.broadcast_to(np.arange(n, dtype=np.float32)[:, None, None], (n, 5, 3)).copy()
    cfg = PreprocessConfig(
        target_spacing=(1.0, 1.0), clip_percentiles=(0.0, 100.0), normalization="none", pad_multiple=1
    )
    x, state = preprocess(image, (1.5, 1.0, 5.0), cfg)
    assert state.resampled_shape == (18, 5)
    centres = (np.arange(18) + 0.5) * n / 18 - 0.5  # new voxel centres in old voxel units (edges kept)
    expected = np.clip(centres, 0, n - 1)
    np.testing.assert_allclose(x[0, 0, :, 2].numpy(), expected, atol=1e-5)


@pytest.mark.parametrize("target", [(1.0, 1.0), (2.3, 0.6)])
def test_invert_keeps_a_constant_field_constant(target):
    cfg = PreprocessConfig(target_spacing=target, pad_multiple=16)
    x, state = preprocess(np.zeros((19, 11, 4)), (1.5, 1.5, 6.0), cfg)
    probs = torch.full((x.shape[0], 3, *x.shape[2:]), 0.25)
    probs[..., : state.padding[0][0], :] = math.nan  # padding must be cropped, never blended in
    probs[..., -state.padding[1][1] :] = math.nan
    out = invert(probs, state)
    assert tuple(out.shape) == (3, 19, 11, 4)
    torch.testing.assert_close(out, torch.full_like(out, 0.25), atol=1e-6, rtol=0)


def test_invert_keeps_a_linear_ramp_linear():
    """Network outputs h' back on the input grid are h' at the input voxel centres, exactly in the interior."""
    n, m = 18, 12  # 1.0 mm -> 1.5 mm in the forward map, so the inverse upsamples 12 -> 18
    cfg = PreprocessConfig(target_spacing=(1.5, 1.0), pad_multiple=16)
    x, state = preprocess(np.zeros((n, 7, 3)), (1.0, 1.0, 4.0), cfg)
    assert state.resampled_shape == (m, 7)
    (hb, _), (wb, _) = state.padding
    probs = torch.full((x.shape[0], 2, *x.shape[2:]), 1e6)  # garbage in the padding
    ramp = torch.arange(m, dtype=torch.float32)[:, None].expand(m, 7)
    probs[:, 0, hb : hb + m, wb : wb + 7] = ramp
    probs[:, 1, hb : hb + m, wb : wb + 7] = 2 * ramp + 1
    out = invert(probs, state)
    centres = (torch.arange(n, dtype=torch.float64) + 0.5) * m / n - 0.5
    interior = (centres >= 0) & (centres <= m - 1)
    assert interior.sum() == n - 2  # only the outermost voxel on each side falls outside the sampled range
    torch.testing.assert_close(out[0, interior, 3, 1].double(), centres[interior], atol=1e-5, rtol=0)
    torch.testing.assert_close(out[1, interior, 3, 1].double(), 2 * centres[interior] + 1, atol=1e-5, rtol=0)


def test_3d_moves_the_slice_axis_first():
    image = np.random.default_rng(0).normal(size=(5, 6, 7)).astype(np.float32)
    cfg = PreprocessConfig(spatial_dims=3, pad_multiple=1, normalization="none", clip_percentiles=(0.0, 100.0))
    x, state = preprocess(image, (1.0, 8.0, 1.0), cfg)
    assert state.slice_axis == 1
    np.testing.assert_array_equal(x[0, 0].numpy(), image.transpose(1, 0, 2))


# ------------------------------------------------------------------------------------------------ intensities


def _ramp_volume() -> np.ndarray:
    return np.arange(100, dtype=np.float32).reshape(10, 10, 1)


def test_zscore_known_answer():
    cfg = PreprocessConfig(clip_percentiles=(0.0, 100.0), pad_multiple=1)
    assert compute_intensity_params(_ramp_volume(), cfg) == pytest.approx((0.0, 99.0, 49.5, math.sqrt(833.25)))
    x, _ = preprocess(_ramp_volume(), (1.0, 1.0, 1.0), cfg)
    assert x.mean().item() == pytest.approx(0.0, abs=1e-6)
    assert x.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-6)


def test_clipping_with_percentiles():
    cfg = PreprocessConfig(clip_percentiles=(1.0, 99.0), normalization="minmax", pad_multiple=1)
    lo, hi, offset, scale = compute_intensity_params(_ramp_volume(), cfg)
    assert (lo, hi, offset, scale) == pytest.approx((0.99, 98.01, 0.99, 97.02))
    x, _ = preprocess(_ramp_volume(), (1.0, 1.0, 1.0), cfg)
    assert x.min().item() == 0.0
    assert x.max().item() == pytest.approx(1.0)
    assert x[0, 0, 5, 0].item() == pytest.approx((50 - 0.99) / 97.02)
    clipped = compute_intensity_params(_ramp_volume(), PreprocessConfig(clip_percentiles=(1.0, 99.0)))
    expected = np.clip(np.arange(100.0), 0.99, 98.01)
    assert clipped == pytest.approx((0.99, 98.01, expected.mean(), expected.std()))


def test_none_only_clips():
    cfg = PreprocessConfig(clip_percentiles=(1.0, 99.0), normalization="none", pad_multiple=1)
    x, _ = preprocess(_ramp_volume(), (1.0, 1.0, 1.0), cfg)
    np.testing.assert_allclose(x[0, 0].numpy(), np.clip(np.arange(100.0), 0.99, 98.01).reshape(10, 10), rtol=1e-6)


@pytest.mark.parametrize("normalization", ["zscore", "minmax"])
@pytest.mark.parametrize("value", [0.0, 7.0, math.nan])
def test_constant_or_empty_volume_gives_zeros(normalization, value):
    cfg = PreprocessConfig(normalization=normalization)
    x, state = preprocess(np.full((9, 9, 3), value), (1.0, 1.0, 3.0), cfg)
    assert torch.equal(x, torch.zeros_like(x))
    assert state.scale == 1.0


def test_non_finite_voxels_become_the_clip_minimum():
    image = _ramp_volume()
    image[0, :3, 0] = [np.nan, np.inf, -np.inf]
    cfg = PreprocessConfig(clip_percentiles=(0.0, 100.0), pad_multiple=16)
    lo, hi, offset, scale = compute_intensity_params(image, cfg)
    assert (lo, hi, offset) == pytest.approx((3.0, 99.0, 51.0))  # the finite voxels 3..99
    x, state = preprocess(image, (1.0, 1.0, 1.0), cfg)
    assert torch.isfinite(x).all()
    hb, wb = state.padding[0][0], state.padding[1][0]
    torch.testing.assert_close(x[0, 0, hb, wb : wb + 4], torch.full((4,), (3.0 - 51.0) / scale))
    assert x.min().item() == state.pad_value


@pytest.mark.parametrize("dtype", [np.int16, np.uint8, np.uint16, np.float64, ">i2"])
def test_input_dtypes_give_the_same_float32_result(dtype):
    image = np.random.default_rng(0).integers(0, 200, (8, 9, 4))
    reference, _ = preprocess(image.astype(np.float32), (1.0, 1.0, 2.0), PreprocessConfig())
    x, _ = preprocess(image.astype(dtype), (1.0, 1.0, 2.0), PreprocessConfig())
    assert x.dtype == torch.float32
    torch.testing.assert_close(x, reference)


def test_input_is_left_untouched_and_read_only_input_is_fine():
    image = np.random.default_rng(0).normal(size=(40, 50, 3)).astype(np.float32)
    image.setflags(write=False)
    before = image.copy()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        preprocess(image, (1.0, 1.0, 2.0), PreprocessConfig(target_spacing=(0.7, 0.7)))
    np.testing.assert_array_equal(image, before)


def test_large_volume_percentiles_match_numpy():
    """Volumes over 4M voxels take the bracketed selection path; it must equal np.percentile."""
    image = np.random.default_rng(0).standard_t(3, size=(256, 256, 80)).astype(np.float32)
    cfg = PreprocessConfig(clip_percentiles=(0.5, 99.5))
    lo, hi, _, _ = compute_intensity_params(image, cfg)
    assert (lo, hi) == pytest.approx(tuple(np.percentile(image, (0.5, 99.5))), rel=1e-6)


def test_torch_input_matches_numpy_input():
    image = np.random.default_rng(0).normal(size=(12, 10, 5)).astype(np.float32)
    cfg = PreprocessConfig(target_spacing=(0.8, 1.3))
    a, state_a = preprocess(image, (1.0, 1.0, 3.0), cfg)
    b, state_b = preprocess(torch.from_numpy(image), (1.0, 1.0, 3.0), cfg)
    assert state_a == state_b
    torch.testing.assert_close(a, b, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------- padding


@pytest.mark.parametrize("pad_multiple", [1, 8, 16, 32])
def test_padding_multiple_and_value(pad_multiple):
    image = np.random.default_rng(0).normal(size=(10, 13, 3)).astype(np.float32)
    x, state = preprocess(image, (1.0, 1.0, 3.0), PreprocessConfig(pad_multiple=pad_multiple))
    h, w = x.shape[-2:]
    assert h % pad_multiple == 0
    assert w % pad_multiple == 0
    (hb, ha), (wb, wa) = state.padding
    assert (hb + 10 + ha, wb + 13 + wa) == (h, w)
    inside = torch.zeros(h, w, dtype=torch.bool)
    inside[hb : hb + 10, wb : wb + 13] = True
    assert (x[:, 0, ~inside] == state.pad_value).all()
    assert state.pad_value == x.min().item()
    label = preprocess_label(np.ones((10, 13, 3), np.uint8), state, pad_value=4)
    assert (label[:, ~inside] == 4).all()
    assert (label[:, inside] == 1).all()


def test_3d_pads_all_three_axes():
    x, state = preprocess(np.zeros((5, 6, 7)), (1.0, 1.0, 1.0), PreprocessConfig(spatial_dims=3, pad_multiple=4))
    assert tuple(x.shape) == (1, 1, 8, 8, 8)
    assert state.padding == ((0, 1), (1, 2), (1, 1))  # network order (k, i, j)


# ----------------------------------------------------------------------------------------------------- state


def test_state_json_roundtrip_and_helpful_errors():
    _, state = preprocess(np.zeros(SHAPE), SPACING, PreprocessConfig(target_spacing=(1.0, 1.0)))
    restored = PreprocessState.from_dict(json.loads(json.dumps(state.to_dict())))
    assert restored == state
    d = state.to_dict()
    d["flavour"] = 1
    with pytest.raises(ConfigError, match="valid keys: spatial_dims"):
        PreprocessState.from_dict(d)
    d = state.to_dict()
    d["native_shape"] = [99, 99]
    with pytest.raises(GeometryError):
        PreprocessState.from_dict(d)


# ------------------------------------------------------------------------------------------- size and devices


@pytest.mark.slow
def test_ct_sized_volume():  # its speed is measured by benchmarks/run.py, not asserted here
    image = np.random.default_rng(0).normal(0, 300, (512, 512, 300)).astype(np.int16)
    cfg = PreprocessConfig(target_spacing=(1.0, 1.0))
    x, _ = preprocess(image, (0.7, 0.7, 2.5), cfg)
    assert tuple(x.shape) == (300, 1, 368, 368)
    assert x.dtype == torch.float32 and bool(torch.isfinite(x).all())


@pytest.mark.gpu  # skipped by conftest without CUDA
def test_cuda_matches_cpu():
    image = np.random.default_rng(0).normal(size=(40, 50, 6)).astype(np.float32)
    cfg = PreprocessConfig(target_spacing=(0.7, 1.3))
    a, state = preprocess(image, (1.0, 1.0, 3.0), cfg)
    b, _ = preprocess(image, (1.0, 1.0, 3.0), cfg, device="cuda")
    assert b.device.type == "cuda"
    torch.testing.assert_close(b.cpu(), a, atol=1e-5, rtol=1e-5)
    probs = torch.rand(a.shape[0], 4, *a.shape[2:])
    torch.testing.assert_close(invert(probs.cuda(), state).cpu(), invert(probs, state), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------- real data


@pytest.fixture(scope="module")
def acdc_median_spacing(acdc_dir: Path) -> tuple[float, ...]:
    nib = pytest.importorskip("nibabel")
    spacings = [nib.load(p).header.get_zooms()[:3] for p in sorted((acdc_dir / "imagesTr").glob("*.nii.gz"))]
    return median_spacing(spacings, PreprocessConfig(spatial_dims=2))


@pytest.mark.data
def test_acdc_median_in_plane_spacing(acdc_median_spacing):
    assert acdc_median_spacing == pytest.approx((1.48438, 1.48438), abs=1e-4)  # over the 170 training volumes


@pytest.mark.data
@pytest.mark.parametrize("target", ["1mm", "median"])
def test_acdc_label_roundtrip(acdc_dir: Path, acdc_median_spacing, target):
    """One real cine-MRI volume (1.5625 mm in-plane, 10 mm slices) resampled and back.

    Measured on patient001_frame01: at 1.0 mm agreement 100.00 %, Dice 1.0000 for RV, MYO and LV; at the
    dataset median 1.4844 mm agreement 99.97 %, Dice RV 0.9939, MYO 0.9895, LV 0.9976.
    """
    nib = pytest.importorskip("nibabel")
    img = nib.load(acdc_dir / "imagesTr" / "patient001_frame01_0000.nii.gz")
    label = np.asarray(nib.load(acdc_dir / "labelsTr" / "patient001_frame01.nii.gz").dataobj)
    spacing = tuple(float(s) for s in img.header.get_zooms()[:3])
    cfg = PreprocessConfig(target_spacing=(1.0, 1.0) if target == "1mm" else acdc_median_spacing)
    x, state = preprocess(np.asarray(img.dataobj), spacing, cfg)
    assert state.slice_axis == 2
    assert state.resampled_shape != state.native_shape
    assert torch.isfinite(x).all()
    back = _agreement_after_roundtrip(label, state, 4).numpy()
    agreement = float((back == label).mean())
    dice = {c: 2 * ((back == c) & (label == c)).sum() / ((back == c).sum() + (label == c).sum()) for c in (1, 2, 3)}
    assert agreement >= 0.995, f"agreement {agreement:.4f}"
    assert min(dice.values()) >= 0.98, f"Dice per class {dice}"
