"""Geometry properties over random affines, shapes and dtypes (hypothesis).

Volume I/O: ``write_volume`` -> ``read_volume`` gives back the array and the reference's affine, for NIfTI-1/2
(``.nii`` / ``.nii.gz``, every qform/sform code combination, either byte order) and, through SimpleITK, for NRRD
and MetaImage (spacing, origin and direction bit for bit), including flips (det < 0), oblique rotations and
anisotropic spacings; across formats the affine survives to float32 (NIfTI) precision.

Preprocessing: ``invert(preprocess(x))`` is on the input grid with the input geometry: a field that is linear in
millimetres, sampled at the network voxel centres, comes back as the same field at the input voxel centres (clamped
to the span of the network centres, where interpolation cannot extrapolate), so the axis order, the resampling
scale, the half-voxel convention and the padding crop are all checked, not just the shape. Label maps on the
model's path (nearest neighbour in, one-hot, linear interpolation back, argmax) come back voxel by voxel as
predicted by the few input voxels that reach each one (see :func:`_sources`), which gives the agreement threshold.
"""

from __future__ import annotations

import itertools
import math
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk  # noqa: N813
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import ndimage
from scipy.spatial.transform import Rotation

from confkd.config import PreprocessConfig
from confkd.data.preprocessing import invert, invert_chunks, preprocess, preprocess_label
from confkd.data.volume import read_volume, write_volume

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])
LPS_TO_RAS_4 = np.diag([-1.0, -1.0, 1.0, 1.0])

# 48 signed axis permutations (every axis-aligned orientation: RAS, LPS, LAS, axial / sagittal / coronal ...)
SIGNED_PERMUTATIONS = [
    np.diag(signs)[:, list(perm)]
    for perm in itertools.permutations(range(3))
    for signs in itertools.product((1, -1), repeat=3)
]


@st.composite
def directions(draw: st.DrawFn) -> np.ndarray:
    """An orthonormal 3x3 direction matrix: axis aligned (any signed permutation) or oblique, det +1 or -1."""
    if draw(st.booleans()):
        return SIGNED_PERMUTATIONS[draw(st.integers(0, len(SIGNED_PERMUTATIONS) - 1))].astype(np.float64)
    euler = draw(st.tuples(*[st.floats(-180.0, 180.0, allow_nan=False)] * 3))
    flip = draw(st.tuples(*[st.sampled_from([1.0, -1.0])] * 3))
    return Rotation.from_euler("xyz", euler, degrees=True).as_matrix() @ np.diag(flip)


spacings = st.tuples(*[st.floats(0.2, 12.0, allow_nan=False)] * 3)
origins = st.tuples(*[st.floats(-500.0, 500.0, allow_nan=False)] * 3)
shapes = st.tuples(*[st.integers(1, 7)] * 3)
REFERENCE_DTYPES = ["int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "float32", "float64"]
LABEL_DTYPES = ["bool", "uint8", "int8", "int16", "uint16", "int32", "int64", "float32"]


def _affine(direction: np.ndarray, spacing: tuple[float, ...], origin: tuple[float, ...]) -> np.ndarray:
    out = np.eye(4)
    out[:3, :3] = direction @ np.diag(spacing)
    out[:3, 3] = origin
    return out


def _folder(factory: pytest.TempPathFactory) -> Path:
    return Path(tempfile.mkdtemp(dir=factory.getbasetemp()))


def _random_data(shape: tuple[int, ...], dtype: str, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    info = np.iinfo(dtype) if np.dtype(dtype).kind in "iu" else None
    if info is None:
        return rng.normal(0.0, 100.0, size=shape).astype(dtype)
    return rng.integers(max(int(info.min), -30000), min(int(info.max), 30000), size=shape, endpoint=True).astype(dtype)


def _labels(shape: tuple[int, ...], dtype: str, seed: int) -> np.ndarray:
    """Integer labels in ``dtype``; negative ones and ones above 255 (stored as int16) where the dtype allows."""
    rng = np.random.default_rng(seed)
    if dtype == "bool":
        return rng.random(shape) > 0.5
    lo = 0 if np.dtype(dtype).kind == "u" else -2
    hi = {"uint8": 255, "int8": 100}.get(dtype, 300)
    return rng.integers(lo, hi, size=shape, endpoint=True).astype(dtype)


def _nifti_header_geometry(header: nib.Nifti1Header) -> tuple:
    q, qc = header.get_qform(coded=True)
    s, sc = header.get_sform(coded=True)
    return (
        None if q is None else q.tolist(),
        int(qc),
        None if s is None else s.tolist(),
        int(sc),
        header["pixdim"].tolist(),
        int(header["xyzt_units"]),
    )


# ------------------------------------------------------------------------------------------------- NIfTI


@SETTINGS
@given(
    direction=directions(),
    spacing=spacings,
    origin=origins,
    shape=shapes,
    codes=st.sampled_from([(1, 1), (1, 2), (2, 4), (0, 1), (1, 0), (0, 4), (0, 0), (3, 3)]),
    sform_differs=st.booleans(),
    suffix=st.sampled_from([".nii", ".nii.gz"]),
    klass=st.sampled_from([nib.Nifti1Image, nib.Nifti2Image]),
    endian=st.sampled_from(["<", ">"]),
    dtype=st.sampled_from(REFERENCE_DTYPES),
    label_dtype=st.sampled_from(LABEL_DTYPES),
    seed=st.integers(0, 2**16),
)
def test_nifti_write_read_keeps_array_and_header_geometry(
    tmp_path_factory,
    direction,
    spacing,
    origin,
    shape,
    codes,
    sform_differs,
    suffix,
    klass,
    endian,
    dtype,
    label_dtype,
    seed,
) -> None:
    folder = _folder(tmp_path_factory)
    qcode, scode = codes
    qform = _affine(direction, spacing, origin)
    # an sform that is not the qform: another rotation and origin, and a shear the qform could not represent
    sform = qform.copy()
    if sform_differs:
        sform[:3, :3] = Rotation.from_euler("z", 17.0, degrees=True).as_matrix() @ sform[:3, :3]
        sform[0, 1] += 0.25 * spacing[1]
        sform[:3, 3] += (3.0, -4.0, 5.0)
    data = _random_data(shape, dtype, seed)
    hdr = klass.header_class(endianness=endian)
    hdr.set_data_shape(shape)
    hdr.set_data_dtype(data.dtype)
    hdr.set_qform(qform, code=qcode)
    hdr.set_sform(sform, code=scode)
    hdr.set_xyzt_units("mm", "sec")
    nib.save(klass(data, None, header=hdr), folder / f"ref{suffix}")
    on_disk = nib.load(folder / f"ref{suffix}")

    ref = read_volume(folder / f"ref{suffix}")
    assert ref.format == ("nifti2" if klass is nib.Nifti2Image else "nifti1")
    np.testing.assert_array_equal(ref.array, data)
    assert ref.array.dtype.isnative
    np.testing.assert_array_equal(ref.affine, on_disk.affine)  # nibabel's best affine: sform, qform, pixdim
    if scode:
        np.testing.assert_allclose(ref.affine, sform, rtol=0, atol=1e-4 * max(1.0, float(np.abs(sform).max())))
    elif qcode:
        np.testing.assert_allclose(ref.affine, qform, rtol=0, atol=1e-4 * max(1.0, float(np.abs(qform).max())))

    labels = _labels(shape, label_dtype, seed + 1)
    out = write_volume(labels, ref, folder / f"labels{suffix}")
    back = read_volume(out)
    np.testing.assert_array_equal(back.array, labels.astype(np.int64))
    np.testing.assert_array_equal(back.affine, ref.affine)
    out_img = nib.load(out)
    assert type(out_img) is type(on_disk)
    assert _nifti_header_geometry(out_img.header) == _nifti_header_geometry(on_disk.header)

    values = _random_data(shape, "float64", seed + 2)
    back = read_volume(write_volume(values, ref, folder / f"float{suffix}", kind="float"))
    np.testing.assert_array_equal(back.array, values.astype(np.float32))
    np.testing.assert_array_equal(back.affine, ref.affine)

    conf = np.random.default_rng(seed + 3).random(shape)
    back = read_volume(write_volume(conf, ref, folder / f"conf{suffix}", kind="float", scale=1 / 255))
    assert float(np.abs(back.array - conf).max()) <= 1 / 510 + 1e-6
    np.testing.assert_array_equal(back.affine, ref.affine)


# ------------------------------------------------------------------------------------------ NRRD, MetaImage


def _sitk_image(array_ijk: np.ndarray, spacing, origin, direction) -> sitk.Image:
    image = sitk.GetImageFromArray(np.ascontiguousarray(array_ijk.transpose(2, 1, 0)), isVector=False)
    image.SetSpacing(tuple(float(v) for v in spacing))
    image.SetOrigin(tuple(float(v) for v in origin))
    image.SetDirection(tuple(float(v) for v in np.asarray(direction).ravel()))
    return image


def _geometry(image: sitk.Image) -> tuple:
    return image.GetSpacing(), image.GetOrigin(), image.GetDirection()


@SETTINGS
@given(
    direction=directions(),
    spacing=spacings,
    origin=origins,
    shape=shapes,
    suffix=st.sampled_from([".nrrd", ".nhdr", ".mha", ".mhd"]),
    dtype=st.sampled_from(REFERENCE_DTYPES),
    label_dtype=st.sampled_from(LABEL_DTYPES),
    seed=st.integers(0, 2**16),
)
def test_itk_write_read_keeps_array_and_exact_geometry(
    tmp_path_factory, direction, spacing, origin, shape, suffix, dtype, label_dtype, seed
) -> None:
    folder = _folder(tmp_path_factory)
    data = _random_data(shape, dtype, seed)
    sitk.WriteImage(_sitk_image(data, spacing, origin, direction), str(folder / f"ref{suffix}"))
    direct = sitk.ReadImage(str(folder / f"ref{suffix}"))

    ref = read_volume(folder / f"ref{suffix}")
    np.testing.assert_array_equal(ref.array, data)
    # the RAS affine of ITK's own LPS geometry
    expected = np.eye(4)
    expected[:3, :3] = LPS_TO_RAS @ np.asarray(direct.GetDirection()).reshape(3, 3) @ np.diag(direct.GetSpacing())
    expected[:3, 3] = LPS_TO_RAS @ np.asarray(direct.GetOrigin())
    np.testing.assert_allclose(ref.affine, expected, rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(ref.affine, LPS_TO_RAS_4 @ _affine(direction, spacing, origin), rtol=1e-6, atol=1e-6)

    labels = _labels(shape, label_dtype, seed + 1)
    out = write_volume(labels, ref, folder / f"labels{suffix}")
    written = sitk.ReadImage(str(out))
    assert _geometry(written) == _geometry(direct)  # bit for bit
    back = read_volume(out)
    np.testing.assert_array_equal(back.array, labels.astype(np.int64))
    np.testing.assert_array_equal(back.affine, ref.affine)

    values = _random_data(shape, "float64", seed + 2)
    out = write_volume(values, ref, folder / f"float{suffix}", kind="float")
    assert _geometry(sitk.ReadImage(str(out))) == _geometry(direct)
    np.testing.assert_array_equal(read_volume(out).array, values.astype(np.float32))


@SETTINGS
@given(
    direction=directions(),
    spacing=spacings,
    origin=origins,
    shape=shapes,
    source=st.sampled_from([".nii.gz", ".nrrd", ".mha"]),
    target=st.sampled_from([".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd"]),
    seed=st.integers(0, 2**16),
)
def test_cross_format_write_keeps_the_affine(
    tmp_path_factory, direction, spacing, origin, shape, source, target, seed
) -> None:
    """Any reference format written as any other: same voxels, same RAS affine (to NIfTI's float32 when one is)."""
    folder = _folder(tmp_path_factory)
    affine = _affine(direction, spacing, origin)
    data = _random_data(shape, "int16", seed)
    if source == ".nii.gz":
        nib.save(nib.Nifti1Image(data, affine), folder / "ref.nii.gz")
    else:
        lps = LPS_TO_RAS_4 @ affine
        sitk.WriteImage(
            _sitk_image(data, spacing, lps[:3, 3], lps[:3, :3] / np.array(spacing)), str(folder / f"ref{source}")
        )
    ref = read_volume(folder / f"ref{source}")
    labels = _labels(shape, "uint8", seed + 1)
    back = read_volume(write_volume(labels, ref, folder / f"out{target}"))
    np.testing.assert_array_equal(back.array, labels)
    # NIfTI holds its matrices as float32: a relative 2^-24 of the largest entry, a little more after the
    # quaternion round trip of the qform
    nifti = ".nii" in source + target
    scale = max(1.0, float(np.abs(ref.affine).max()))
    atol = 1e-5 * scale if nifti else 1e-9 * scale
    np.testing.assert_allclose(back.affine, ref.affine, rtol=0, atol=atol)
    assert back.spacing == pytest.approx(ref.spacing, rel=1e-5 if nifti else 1e-12)


# ------------------------------------------------------------------------------------------- preprocessing


def _axis_centres(state, shape, spacing, net_axis: int) -> tuple[np.ndarray, int]:
    """Centres (mm from the volume's edge) of the network voxels along network axis ``net_axis``, and the padding
    before them. The slice axis of a 2D model is not resampled: its centres are the input's."""
    in_axis = state.axis_order[net_axis]
    if state.spatial_dims == 2 and net_axis == 0:
        return (np.arange(shape[in_axis]) + 0.5) * spacing[in_axis], 0
    k = net_axis - (3 - state.spatial_dims)
    return (np.arange(state.resampled_shape[k]) + 0.5) * state.network_spacing[k], state.padding[k][0]


def _along(values: np.ndarray, axis: int) -> np.ndarray:
    view = [1, 1, 1]
    view[axis] = len(values)
    return values.reshape(view)


@st.composite
def geometries(draw: st.DrawFn) -> tuple:
    nd = draw(st.sampled_from([2, 3]))
    shape = draw(st.tuples(*[st.integers(1, 20)] * 3))
    spacing = draw(st.tuples(*[st.floats(0.3, 6.0)] * 3))
    target = draw(st.none() | st.tuples(*[st.floats(0.3, 6.0)] * nd))
    cfg = PreprocessConfig(
        spatial_dims=nd,
        slice_axis=draw(st.sampled_from([None, 0, 1, 2])),
        pad_multiple=draw(st.integers(1, 9)),
        target_spacing=target,
        normalization="none",
        clip_percentiles=(0.0, 100.0),
    )
    return shape, spacing, cfg


@SETTINGS
@given(geometry=geometries(), slope=st.tuples(*[st.floats(-2.0, 2.0)] * 3), channels=st.integers(1, 3))
def test_invert_maps_a_linear_field_back_to_the_input_voxel_centres(geometry, slope, channels) -> None:
    shape, spacing, cfg = geometry
    _, state = preprocess(np.zeros(shape, np.float32), spacing, cfg)
    nd, order = state.spatial_dims, state.axis_order
    # network outputs: f(x) = (c + 1) * sum_a slope_a * x_a (x_a: mm from the edge along input axis a) at the
    # network voxel centres; NaN in the padding
    inner, values = [], np.zeros((1, 1, 1))
    for net_axis in range(3):
        centres, before = _axis_centres(state, shape, spacing, net_axis)
        inner.append(slice(before, before + len(centres)))
        values = values + slope[order[net_axis]] * _along(centres, net_axis)
    network = torch.full((state.network_shape[0] if nd == 2 else 1, channels, *state.network_shape[-nd:]), math.nan)
    for c in range(channels):
        block = torch.from_numpy((c + 1) * values).float()
        if nd == 2:
            network[:, c, inner[1], inner[2]] = block
        else:
            network[0, c, inner[0], inner[1], inner[2]] = block
    out = invert(network, state)
    assert tuple(out.shape) == (channels, *shape)
    assert torch.isfinite(out).all()  # the padding (NaN) is cropped, never interpolated in

    expected = np.zeros((1, 1, 1))
    for in_axis in range(3):
        net_axis = order.index(in_axis)
        x = (np.arange(shape[in_axis]) + 0.5) * spacing[in_axis]
        centres, _ = _axis_centres(state, shape, spacing, net_axis)
        x = np.clip(x, centres[0], centres[-1])  # linear interpolation holds the outer network centres' values
        expected = expected + slope[in_axis] * _along(x, in_axis)
    scale = 1.0 + float(np.abs(expected).max())
    for c in range(channels):
        np.testing.assert_allclose(out[c].double().numpy(), (c + 1) * expected, rtol=0, atol=2e-5 * scale * (c + 1))
    # the chunked inverse is the same map
    slabs = np.zeros((channels, *shape), np.float32)
    in_network_order = np.transpose(slabs, (0, *(1 + a for a in order)))  # a view
    for start, chunk in invert_chunks(network, state, max_slices=1 + shape[order[0]] // 3):
        in_network_order[:, start : start + chunk.shape[0]] = chunk.transpose(0, 1).numpy()
    np.testing.assert_allclose(slabs, out.numpy(), rtol=0, atol=1e-5 * scale * channels)


@SETTINGS
@given(geometry=geometries(), slope=st.tuples(*[st.floats(-2.0, 2.0)] * 3))
def test_preprocess_samples_a_linear_image_at_the_network_voxel_centres(geometry, slope) -> None:
    shape, spacing, cfg = geometry
    image = np.zeros((1, 1, 1))
    for a in range(3):
        image = image + slope[a] * _along((np.arange(shape[a]) + 0.5) * spacing[a], a)
    x, state = preprocess(image, spacing, cfg)
    net = (x[:, 0] if state.spatial_dims == 2 else x[0, 0]).double().numpy()  # network axis order
    inner, expected = [], np.zeros((1, 1, 1))
    for net_axis, in_axis in enumerate(state.axis_order):
        centres, before = _axis_centres(state, shape, spacing, net_axis)
        inner.append(slice(before, before + len(centres)))
        first, last = 0.5 * spacing[in_axis], (shape[in_axis] - 0.5) * spacing[in_axis]
        centres = np.clip(centres, first, last)  # beyond the outer input centres the edge value is held
        expected = expected + slope[in_axis] * _along(centres, net_axis)
    scale = 1.0 + float(np.abs(image).max())
    np.testing.assert_allclose(
        net[tuple(inner)], np.broadcast_to(expected, net[tuple(inner)].shape), rtol=0, atol=2e-5 * scale
    )
    padding = np.ones(net.shape, bool)
    padding[tuple(inner)] = False
    assert (net[padding] == state.pad_value).all()


def _sources(n: int, m: int) -> tuple[np.ndarray, np.ndarray]:
    """For each of ``n`` input voxels along an axis resampled to ``m`` network voxels: the first and last input
    voxel whose label can reach it on the way there and back.

    Back: linear interpolation with ``align_corners=False`` blends the network voxels bracketing the input centre,
    ``floor(src)`` and ``floor(src) + 1`` with ``src = (i + 0.5) m / n - 0.5`` clamped to ``[0, m - 1]`` (widened by
    1e-4 for float32 rounding). There: network voxel ``o`` holds input voxel ``floor((o + 0.5) n / m)``
    (``nearest-exact``), which is monotone in ``o``, so the first and last of them bound the set.
    """
    src = np.maximum((np.arange(n) + 0.5) * (m / n) - 0.5, 0.0)
    lo = np.clip(np.floor(src - 1e-4), 0, m - 1).astype(int)
    hi = np.clip(np.floor(src + 1e-4) + 1, 0, m - 1).astype(int)
    held = np.minimum(np.floor((np.arange(m) + 0.5) * (n / m)).astype(int), n - 1)
    return held[lo], held[hi]


@SETTINGS
@given(geometry=geometries(), seed=st.integers(0, 2**16), smooth=st.floats(0.0, 4.0), classes=st.integers(2, 5))
def test_label_roundtrip_on_the_model_path_is_predicted_by_the_voxels_that_reach_each_voxel(
    geometry, seed, smooth, classes
) -> None:
    """preprocess_label -> one-hot -> invert -> argmax, the model's path for a label map, voxel by voxel.

    Each input voxel comes back as one of the labels of the input voxels that reach it (:func:`_sources`: at most
    2-3 per resampled axis), and as exactly their label when they agree. So the agreement over the volume is at
    least the fraction of voxels whose sources all carry the voxel's own label: that is the threshold, computed
    per example, 1 when nothing is resampled and close to 1 - (boundary voxels) otherwise; a half-voxel shift of
    either grid (legacy ``nearest``, ``align_corners=True``) breaks the prediction.
    """
    shape, spacing, cfg = geometry
    rng = np.random.default_rng(seed)
    fields = rng.normal(size=(classes, *shape))
    if smooth > 0:
        fields = np.stack([ndimage.gaussian_filter(f, smooth, mode="nearest") for f in fields])
    label = fields.argmax(0).astype(np.uint8)
    _, state = preprocess(label.astype(np.float32), spacing, cfg)
    network = preprocess_label(label, state)
    back = invert(F.one_hot(network, classes).movedim(-1, 1).float(), state).argmax(0).numpy()

    ranges = []  # per input axis: [n, width] indices of the input voxels that reach each voxel
    for in_axis, n in enumerate(shape):
        net_axis = state.axis_order.index(in_axis)
        k = net_axis - (3 - state.spatial_dims)
        if k < 0 or state.resampled_shape[k] == n:  # the 2D slice axis, or not resampled: the voxel itself
            ranges.append(np.arange(n)[:, None])
            continue
        first, last = _sources(n, state.resampled_shape[k])
        width = int((last - first).max()) + 1
        ranges.append(np.minimum(first[:, None] + np.arange(width), last[:, None]))
    reached = np.stack(
        [
            label[np.ix_(ranges[0][:, a], ranges[1][:, b], ranges[2][:, c])]
            for a in range(ranges[0].shape[1])
            for b in range(ranges[1].shape[1])
            for c in range(ranges[2].shape[1])
        ]
    )
    assert (reached == back).any(0).all(), "a voxel came back with a label none of its sources has"
    agreeing = reached.min(0) == reached.max(0)
    np.testing.assert_array_equal(back[agreeing], reached[0][agreeing])
    threshold = float((agreeing & (reached[0] == label)).mean())
    assert float((back == label).mean()) >= threshold
    if state.resampled_shape == state.native_shape:
        assert threshold == 1.0 and np.array_equal(back, label)  # permutation and padding only: exact
