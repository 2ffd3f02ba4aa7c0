"""Volume I/O: real headers written by nibabel and SimpleITK, read back and compared field by field."""

from __future__ import annotations

import gzip
import os
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk  # noqa: N813
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.spatial.transform import Rotation

from confkd.data import io_nifti, io_sitk
from confkd.data.volume import SCALE_KEY, Volume, image_format, read_volume, write_volume
from confkd.errors import GeometryError, UnsupportedImageError, VolumeReadError, VolumeWriteError

NIBABEL_DATA = Path(nib.__file__).parent / "tests" / "data"
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


def _data_root() -> Path:
    env = os.environ.get("CONFKD_DATA_DIR")
    # tests/data/test_volume.py -> parents[2] is the repository; the shared data sit beside it
    return Path(env) if env else Path(__file__).resolve().parents[3] / "shared" / "data"


def _affine(euler_deg=(0.0, 0.0, 0.0), spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), flip=(1, 1, 1)) -> np.ndarray:
    out = np.eye(4)
    rotation = Rotation.from_euler("xyz", euler_deg, degrees=True).as_matrix() @ np.diag(flip)
    out[:3, :3] = rotation @ np.diag(spacing)
    out[:3, 3] = origin
    return out


def _save_nifti(
    path: Path,
    data: np.ndarray,
    qform: np.ndarray | None,
    sform: np.ndarray | None = None,
    *,
    qcode: int = 1,
    scode: int = 1,
    klass: type = nib.Nifti1Image,
    endian: str | None = None,
    dtype: object = None,
    zooms4: float | None = None,
) -> Path:
    """A NIfTI file with explicitly chosen qform/sform (matrix and code), byte order and descrip."""
    hdr = klass.header_class(endianness=endian)
    hdr.set_data_shape(data.shape)
    hdr.set_data_dtype(dtype if dtype is not None else data.dtype)
    if qform is not None:
        hdr.set_qform(qform, code=qcode)
    hdr.set_sform(sform if sform is not None else qform, code=scode)
    if zooms4 is not None:
        hdr.set_zooms((*hdr.get_zooms()[:3], zooms4))
    hdr.set_xyzt_units("mm", "sec")
    hdr["descrip"] = b"confkd test reference"
    nib.save(klass(data, None, header=hdr), path)
    return path


def _sitk_image(array_ijk: np.ndarray, spacing, origin, direction) -> sitk.Image:
    voxels = np.ascontiguousarray(array_ijk.transpose(tuple(range(array_ijk.ndim))[::-1]))
    image = sitk.GetImageFromArray(voxels, isVector=False)
    image.SetSpacing(tuple(float(v) for v in spacing))
    image.SetOrigin(tuple(float(v) for v in origin))
    image.SetDirection(tuple(float(v) for v in np.asarray(direction).ravel()))
    return image


def _sitk_ijk(image: sitk.Image) -> np.ndarray:
    array = sitk.GetArrayFromImage(image)
    return array.transpose(tuple(range(array.ndim))[::-1])


def _assert_same_nifti_geometry(out: nib.Nifti1Header, ref: nib.Nifti1Header) -> None:
    for getter in ("get_qform", "get_sform"):
        m_out, c_out = getattr(out, getter)(coded=True)
        m_ref, c_ref = getattr(ref, getter)(coded=True)
        assert int(c_out) == int(c_ref), getter
        if m_ref is None:
            assert m_out is None
        else:
            np.testing.assert_array_equal(m_out, m_ref, err_msg=getter)
    np.testing.assert_array_equal(out["pixdim"], ref["pixdim"])
    assert out["xyzt_units"] == ref["xyzt_units"]
    assert out["descrip"] == ref["descrip"]
    assert bool(out["qform_code"] == ref["qform_code"]) and bool(out["sform_code"] == ref["sform_code"])


ROT = (15.0, -25.0, 40.0)
NIFTI_CASES = {
    "oblique": {"qform": _affine(ROT, (0.9, 1.1, 3.0), (-80.0, 12.5, 40.0))},
    "ras_axis_aligned": {"qform": _affine(spacing=(0.7, 0.8, 2.0), origin=(10.0, -20.0, 5.0))},
    "lps_axis_aligned": {"qform": _affine(spacing=(0.7, 0.8, 2.0), origin=(10.0, 20.0, 5.0), flip=(-1, -1, 1))},
    "anisotropic_1.25x1.25x8": {"qform": _affine((0.0, 0.0, 12.0), (1.25, 1.25, 8.0), (3.0, 4.0, -5.0))},
    "big_endian": {"qform": _affine(ROT, (1.0, 1.5, 2.5), (1.0, 2.0, 3.0)), "endian": ">"},
    "nifti2": {"qform": _affine(ROT, (0.8, 0.8, 4.0), (7.0, 8.0, 9.0)), "klass": nib.Nifti2Image},
    "qform_ne_sform": {
        "qform": _affine(ROT, (1.0, 1.0, 2.0), (0.0, 0.0, 0.0)),
        "sform": _affine((-5.0, 30.0, 10.0), (1.0, 1.0, 2.0), (50.0, -60.0, 70.0)),
        "qcode": 1,
        "scode": 2,
    },
    "sform_only_mni": {"qform": None, "sform": _affine(ROT, (2.0, 2.0, 2.0), (-90, -126, -72)), "qcode": 0, "scode": 4},
}


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
@pytest.mark.parametrize("case", list(NIFTI_CASES))
def test_nifti_label_and_float_round_trip(tmp_path: Path, case: str, suffix: str) -> None:
    rng = np.random.default_rng(0)
    spec = dict(NIFTI_CASES[case])
    data = rng.integers(-1000, 3000, size=(7, 6, 5)).astype(np.int16)
    ref_path = _save_nifti(tmp_path / f"ref{suffix}", data, **spec)
    ref_img = nib.load(ref_path)
    if case == "big_endian":
        assert ref_img.header.endianness == ">"
    if case == "qform_ne_sform":
        assert not np.allclose(ref_img.header.get_qform(), ref_img.header.get_sform())

    ref = read_volume(ref_path)
    assert ref.format == ("nifti2" if case == "nifti2" else "nifti1")
    np.testing.assert_array_equal(ref.array, data)
    assert ref.array.dtype.isnative
    np.testing.assert_array_equal(ref.affine, ref_img.affine)
    expected = spec["sform"] if spec.get("sform") is not None else spec["qform"]
    np.testing.assert_allclose(ref.affine, expected, atol=1e-4)  # float32 on disk

    labels = rng.integers(0, 4, size=ref.shape)
    out = write_volume(labels, ref, tmp_path / f"label{suffix}")
    out_img = nib.load(out)
    assert type(out_img) is type(ref_img)
    _assert_same_nifti_geometry(out_img.header, ref_img.header)
    assert out_img.header.get_data_dtype() == np.uint8
    assert (out_img.dataobj.slope, out_img.dataobj.inter) == (1.0, 0.0)  # nibabel moves scl_* to the proxy
    back = read_volume(out)
    assert back.shape == ref.shape
    np.testing.assert_allclose(back.affine, ref.affine, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(back.array, labels)
    if case == "qform_ne_sform":  # both kept, separately
        assert not np.allclose(out_img.header.get_qform(), out_img.header.get_sform())

    values = rng.normal(size=ref.shape).astype(np.float32)
    out = write_volume(values, ref, tmp_path / f"float{suffix}", kind="float")
    out_img = nib.load(out)
    _assert_same_nifti_geometry(out_img.header, ref_img.header)
    assert out_img.header.get_data_dtype() == np.float32
    back = read_volume(out)
    assert back.array.dtype == np.float32
    np.testing.assert_array_equal(back.array, values)


def test_labels_above_255_use_int16(tmp_path: Path) -> None:
    ref = read_volume(_save_nifti(tmp_path / "ref.nii.gz", np.zeros((3, 4, 5), np.int16), _affine()))
    labels = np.zeros(ref.shape, np.int64)
    labels[0, 0, 0], labels[1, 1, 1] = 300, -2
    out = write_volume(labels, ref, tmp_path / "out.nii.gz")
    assert nib.load(out).header.get_data_dtype() == np.int16
    np.testing.assert_array_equal(read_volume(out).array, labels)


@pytest.mark.parametrize("suffix", [".nii.gz", ".mha", ".nrrd", ".mhd"])
def test_confidence_as_uint8_with_scale(tmp_path: Path, suffix: str) -> None:
    ref = read_volume(_save_nifti(tmp_path / "ref.nii.gz", np.zeros((6, 5, 4), np.int16), _affine(ROT, (1, 2, 3))))
    conf = np.random.default_rng(1).random(ref.shape)
    conf[0, 0, 0], conf[1, 0, 0] = 0.0, 1.0
    out = write_volume(conf, ref, tmp_path / f"conf{suffix}", kind="float", scale=1 / 255)
    back = read_volume(out)
    assert back.array.dtype.kind == "f"
    assert float(np.abs(back.array - conf).max()) <= 1 / 255 / 2 + 1e-6
    assert back.array.min() >= 0.0 and back.array.max() <= 1.0 + 1e-6
    if suffix == ".nii.gz":
        hdr = nib.load(out).header
        assert hdr.get_data_dtype() == np.uint8
        assert nib.load(out).dataobj.slope == pytest.approx(1 / 255)
    else:
        raw = sitk.ReadImage(str(out))
        assert raw.GetPixelID() == sitk.sitkUInt8
        assert float(raw.GetMetaData(SCALE_KEY)) == 1 / 255


@pytest.mark.parametrize("name", ["example_nifti2.nii.gz", "example4d.nii.gz", "anatomical.nii", "standard.nii.gz"])
def test_nibabel_sample_files(tmp_path: Path, name: str) -> None:
    path = NIBABEL_DATA / name
    if not path.is_file():
        pytest.skip(f"{path} not shipped with this nibabel")
    img = nib.load(path)
    vol = read_volume(path)
    assert vol.format == ("nifti2" if isinstance(img, nib.Nifti2Image) else "nifti1")
    assert vol.shape == img.shape
    np.testing.assert_array_equal(vol.array, np.asanyarray(img.dataobj))
    assert vol.array.dtype.isnative  # anatomical.nii is big-endian
    np.testing.assert_array_equal(vol.affine, img.affine)

    labels = (vol.array > np.median(vol.array)).astype(np.uint8)
    out_img = nib.load(write_volume(labels, vol, tmp_path / "labels.nii.gz"))
    assert type(out_img) is type(img)
    _assert_same_nifti_geometry(out_img.header, img.header)
    np.testing.assert_array_equal(np.asanyarray(out_img.dataobj), labels)

    frames = list(vol.frames())
    assert len(frames) == (vol.shape[3] if vol.is_4d else 1)
    for t, frame in enumerate(frames):
        assert frame.shape == vol.shape[:3] and not frame.is_4d
        assert frame.header.get_data_shape() == vol.shape[:3]
        np.testing.assert_array_equal(frame.affine, vol.affine)
        np.testing.assert_array_equal(frame.array, vol.array[..., t] if vol.is_4d else vol.array)
    if vol.is_4d:  # one frame's segmentation, written with the 4D reference
        out_img = nib.load(write_volume(labels[..., 1], vol, tmp_path / "frame1.nii.gz"))
        assert out_img.shape == vol.shape[:3]
        np.testing.assert_array_equal(out_img.affine, vol.affine)
        np.testing.assert_array_equal(out_img.header.get_zooms(), img.header.get_zooms()[:3])


OBLIQUE_LPS = Rotation.from_euler("xyz", [20.0, -10.0, 35.0], degrees=True).as_matrix()


@pytest.mark.parametrize(("suffix", "fmt"), [(".nrrd", "nrrd"), (".nhdr", "nrrd"), (".mha", "mha"), (".mhd", "mhd")])
def test_sitk_formats_keep_exact_geometry(tmp_path: Path, suffix: str, fmt: str) -> None:
    rng = np.random.default_rng(2)
    data = rng.integers(0, 1000, size=(6, 5, 4)).astype(np.int16)
    image = _sitk_image(data, (1.25, 1.25, 8.0), (-101.3, 22.7, 35.1), OBLIQUE_LPS)
    image.SetMetaData("confkd_test_note", "kept")
    ref_path = tmp_path / f"ref{suffix}"
    sitk.WriteImage(image, str(ref_path))
    direct = sitk.ReadImage(str(ref_path))

    vol = read_volume(ref_path)
    assert vol.format == fmt == image_format(ref_path)
    np.testing.assert_array_equal(vol.array, _sitk_ijk(direct))
    np.testing.assert_array_equal(vol.array, data)
    assert vol.spacing == pytest.approx(direct.GetSpacing(), abs=1e-12)
    # the same geometry written as NIfTI by ITK and read by nibabel gives the same RAS affine
    sitk.WriteImage(direct, str(tmp_path / "same.nii.gz"))
    np.testing.assert_allclose(vol.affine, nib.load(tmp_path / "same.nii.gz").affine, atol=1e-4)

    labels = rng.integers(0, 3, size=vol.shape)
    out = sitk.ReadImage(str(write_volume(labels, vol, tmp_path / f"labels{suffix}")))
    assert out.GetSpacing() == direct.GetSpacing()  # bit for bit
    assert out.GetOrigin() == direct.GetOrigin()
    assert out.GetDirection() == direct.GetDirection()
    assert out.GetPixelID() == sitk.sitkUInt8
    assert out.GetMetaData("confkd_test_note") == "kept"
    np.testing.assert_array_equal(_sitk_ijk(out), labels)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_cross_format_writes_keep_reference_geometry(tmp_path: Path) -> None:
    nifti = read_volume(
        _save_nifti(tmp_path / "ref.nii.gz", np.zeros((5, 4, 3), np.int16), _affine(ROT, (0.7, 0.9, 6.0)))
    )
    labels = np.ones(nifti.shape, np.uint8)
    as_mha = read_volume(write_volume(labels, nifti, tmp_path / "out.mha"))
    np.testing.assert_allclose(as_mha.affine, nifti.affine, rtol=0, atol=1e-9)

    sitk.WriteImage(
        _sitk_image(np.zeros((5, 4, 3), np.int16), (0.8, 0.6, 5.0), (12.5, -7.25, 3.0), OBLIQUE_LPS),
        str(tmp_path / "ref.mha"),
    )
    mha = read_volume(tmp_path / "ref.mha")
    expected = np.eye(4)
    expected[:3, :3] = LPS_TO_RAS @ OBLIQUE_LPS @ np.diag([0.8, 0.6, 5.0])
    expected[:3, 3] = LPS_TO_RAS @ [12.5, -7.25, 3.0]
    np.testing.assert_allclose(mha.affine, expected, atol=1e-12)
    out_img = nib.load(write_volume(labels, mha, tmp_path / "out.nii.gz"))
    np.testing.assert_allclose(out_img.affine, expected, atol=1e-5)
    assert out_img.header.get_qform(coded=True)[1] == 1 and out_img.header.get_sform(coded=True)[1] == 1


def _write_dicom_series(folder: Path, data_ijk: np.ndarray, spacing, origin, direction, series_uid: str) -> None:
    """One file per slice with the tags ImageSeriesReader sorts on (after SimpleITK's DicomSeriesFromArray)."""
    folder.mkdir(parents=True, exist_ok=True)
    image = _sitk_image(data_ijk, spacing, origin, direction)
    d = image.GetDirection()
    shared = {
        "0008|0008": "DERIVED\\SECONDARY",
        "0008|0021": "20240101",
        "0008|0031": "120000",
        "0008|0060": "MR",
        "0008|103e": "confkd test series",
        "0020|000d": "1.2.826.0.1.3680043.2.1125.7",
        "0020|000e": series_uid,
        "0020|0037": "\\".join(str(v) for v in (d[0], d[3], d[6], d[1], d[4], d[7])),
    }
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(image.GetDepth()):
        slice_k = image[:, :, k]
        for tag, value in shared.items():
            slice_k.SetMetaData(tag, value)
        slice_k.SetMetaData("0008|0018", f"{series_uid}.{k + 1}")
        slice_k.SetMetaData("0020|0013", str(k + 1))
        slice_k.SetMetaData("0020|0032", "\\".join(str(v) for v in image.TransformIndexToPhysicalPoint((0, 0, k))))
        writer.SetFileName(str(folder / f"{series_uid.rsplit('.', 1)[1]}_{k}.dcm"))
        writer.Execute(slice_k)


def test_dicom_series(tmp_path: Path) -> None:
    data = np.arange(5 * 6 * 4, dtype=np.int16).reshape(5, 6, 4)
    spacing, origin = (0.75, 0.8, 5.0), (-100.5, 20.25, 30.0)
    folder = tmp_path / "series"
    _write_dicom_series(folder, data, spacing, origin, OBLIQUE_LPS, "1.2.826.0.1.3680043.2.1125.1.1")

    vol = read_volume(folder)
    assert vol.format == "dicom" == image_format(folder)
    np.testing.assert_array_equal(vol.array, data)
    assert vol.header["0020|000e"].strip() == "1.2.826.0.1.3680043.2.1125.1.1"
    expected = np.eye(4)
    expected[:3, :3] = LPS_TO_RAS @ OBLIQUE_LPS @ np.diag(spacing)
    expected[:3, 3] = LPS_TO_RAS @ np.asarray(origin)
    np.testing.assert_allclose(vol.affine, expected, atol=1e-5)  # DICOM decimal strings

    out_img = nib.load(write_volume(data > 50, vol, tmp_path / "labels.nii.gz"))
    assert isinstance(out_img, nib.Nifti1Image)
    assert out_img.header.get_qform(coded=True)[1] == 1 and out_img.header.get_sform(coded=True)[1] == 1
    np.testing.assert_allclose(out_img.affine, vol.affine, atol=1e-4)
    np.testing.assert_allclose(out_img.header.get_qform(), vol.affine, atol=1e-4)
    np.testing.assert_array_equal(np.asanyarray(out_img.dataobj), (data > 50).astype(np.uint8))

    _write_dicom_series(folder, data[::-1], spacing, origin, OBLIQUE_LPS, "1.2.826.0.1.3680043.2.1125.1.2")
    with pytest.raises(VolumeReadError) as info:
        read_volume(folder)
    message = str(info.value)
    assert "\n" not in message and message.startswith(str(folder))
    assert "1.2.826.0.1.3680043.2.1125.1.1" in message and "1.2.826.0.1.3680043.2.1125.1.2" in message
    picked = read_volume(folder, series_uid="1.2.826.0.1.3680043.2.1125.1.2")
    np.testing.assert_array_equal(picked.array, data[::-1])
    with pytest.raises(VolumeReadError, match="no DICOM series"):
        read_volume(folder, series_uid="1.2.3")
    with pytest.raises(VolumeReadError, match="max_voxels"):
        read_volume(folder, series_uid="1.2.826.0.1.3680043.2.1125.1.1", max_voxels=data.size - 1)
    (tmp_path / "empty").mkdir()
    with pytest.raises(VolumeReadError, match="no DICOM series found"):
        read_volume(tmp_path / "empty")


def test_2d_images_become_one_slice_3d(tmp_path: Path) -> None:
    data = np.arange(30, dtype=np.int16).reshape(5, 6)
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(data.shape)
    hdr.set_zooms((0.5, 0.75))
    nib.save(nib.Nifti1Image(data, None, header=hdr), tmp_path / "flat.nii.gz")
    vol = read_volume(tmp_path / "flat.nii.gz")
    assert vol.shape == (5, 6, 1)
    np.testing.assert_array_equal(vol.array[..., 0], data)
    assert abs(np.linalg.det(vol.affine[:3, :3])) > 0

    rotation = np.array([[0.6, -0.8], [0.8, 0.6]])
    image = sitk.GetImageFromArray(data.T.copy())
    image.SetSpacing((0.7, 0.9))
    image.SetOrigin((3.0, 4.0))
    image.SetDirection(tuple(rotation.ravel()))
    sitk.WriteImage(image, str(tmp_path / "flat.mha"))
    vol = read_volume(tmp_path / "flat.mha")
    assert vol.shape == (5, 6, 1)
    assert vol.spacing == pytest.approx((0.7, 0.9, 1.0))
    np.testing.assert_array_equal(vol.affine[:3, 2], [0.0, 0.0, 1.0])
    np.testing.assert_allclose(vol.affine[:2, :2], LPS_TO_RAS[:2, :2] @ rotation @ np.diag([0.7, 0.9]))
    out = sitk.ReadImage(str(write_volume(vol.array > 10, vol, tmp_path / "labels.mha")))
    assert out.GetDimension() == 2
    assert (out.GetSpacing(), out.GetOrigin(), out.GetDirection()) == (
        image.GetSpacing(),
        image.GetOrigin(),
        image.GetDirection(),
    )


def test_4d_nifti_frames_and_4d_write(tmp_path: Path) -> None:
    data = np.random.default_rng(3).normal(size=(6, 5, 3, 4)).astype(np.float32)
    path = _save_nifti(tmp_path / "cine.nii.gz", data, _affine(ROT, (1.4, 1.4, 8.0)), zooms4=0.05)
    vol = read_volume(path)
    assert vol.is_4d and vol.ndim_spatial == 3 and vol.shape == data.shape
    frames = list(vol.frames())
    assert len(frames) == 4
    assert all(f.header["dim"][0] == 3 and f.shape == data.shape[:3] for f in frames)
    np.testing.assert_array_equal(frames[2].array, data[..., 2])

    labels = (data > 0).astype(np.uint8)
    out = write_volume(labels, vol, tmp_path / "labels.nii.gz")
    back = read_volume(out)
    assert back.shape == data.shape
    np.testing.assert_array_equal(back.array, labels)
    _assert_same_nifti_geometry(nib.load(out).header, nib.load(path).header)
    assert nib.load(out).header.get_zooms()[3] == pytest.approx(0.05)
    as_mha = sitk.ReadImage(str(write_volume(labels, vol, tmp_path / "labels.mha")))
    assert as_mha.GetDimension() == 4 and as_mha.GetSpacing()[3] == pytest.approx(0.05)
    np.testing.assert_array_equal(_sitk_ijk(as_mha), labels)


def test_4d_metaimage_frames(tmp_path: Path) -> None:
    data = np.arange(4 * 3 * 2 * 5, dtype=np.int16).reshape(4, 3, 2, 5)
    direction4 = np.eye(4)
    direction4[:3, :3] = OBLIQUE_LPS
    image = _sitk_image(data, (1.0, 1.5, 6.0, 0.03), (1.0, 2.0, 3.0, 0.0), direction4)
    sitk.WriteImage(image, str(tmp_path / "cine.mha"))
    vol = read_volume(tmp_path / "cine.mha")
    assert vol.shape == data.shape
    np.testing.assert_array_equal(vol.array, data)
    assert [f.shape for f in vol.frames()] == [data.shape[:3]] * 5
    out = sitk.ReadImage(str(write_volume(data % 3, vol, tmp_path / "labels.mha")))
    assert (out.GetSpacing(), out.GetOrigin(), out.GetDirection()) == (
        image.GetSpacing(),
        image.GetOrigin(),
        image.GetDirection(),
    )
    frame = next(vol.frames())
    out3 = sitk.ReadImage(str(write_volume(frame.array % 3, frame, tmp_path / "frame.mha")))
    assert out3.GetDimension() == 3 and out3.GetSpacing() == image.GetSpacing()[:3]


@pytest.mark.parametrize(("shape", "expected"), [((4, 5, 3, 1), (4, 5, 3)), ((4, 5, 3, 1, 1), (4, 5, 3))])
def test_trailing_singletons_are_squeezed(tmp_path: Path, shape: tuple, expected: tuple) -> None:
    path = _save_nifti(tmp_path / "x.nii.gz", np.ones(shape, np.int16), _affine())
    vol = read_volume(path)
    assert vol.shape == expected and not vol.is_4d
    out = write_volume(vol.array, vol, tmp_path / "y.nii.gz")
    assert nib.load(out).shape == expected


def test_5d_rejected(tmp_path: Path) -> None:
    path = _save_nifti(tmp_path / "five.nii.gz", np.ones((4, 4, 3, 2, 2), np.int16), _affine())
    with pytest.raises(UnsupportedImageError, match=r"\(4, 4, 3, 2, 2\)") as info:
        read_volume(path)
    assert str(info.value).startswith(str(path))


def test_complex_and_vector_rejected(tmp_path: Path) -> None:
    path = _save_nifti(tmp_path / "c.nii.gz", np.ones((3, 3, 3), np.complex64), _affine())
    with pytest.raises(UnsupportedImageError, match="complex"):
        read_volume(path)
    rgb = np.zeros((3, 3, 3), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    path = _save_nifti(tmp_path / "rgb.nii.gz", rgb, _affine())
    with pytest.raises(UnsupportedImageError, match="RGB"):
        read_volume(path)
    sitk.WriteImage(sitk.GetImageFromArray(np.ones((3, 3, 3), np.complex64)), str(tmp_path / "c.mha"))
    with pytest.raises(UnsupportedImageError, match="complex"):
        read_volume(tmp_path / "c.mha")
    sitk.WriteImage(sitk.GetImageFromArray(np.ones((3, 3, 3, 3), np.uint8), isVector=True), str(tmp_path / "v.nrrd"))
    with pytest.raises(UnsupportedImageError, match="3-component"):
        read_volume(tmp_path / "v.nrrd")


def _valid_nii_gz_bytes(tmp_path: Path) -> bytes:
    path = _save_nifti(tmp_path / "valid.nii.gz", np.arange(4000, dtype=np.int16).reshape(20, 20, 10), _affine())
    return path.read_bytes()


def _make_bad(tmp_path: Path, case: str) -> Path:
    if case == "missing":
        return tmp_path / "absent.nii.gz"
    if case == "zero_byte":
        path = tmp_path / "empty.nii.gz"
        path.touch()
    elif case == "truncated_gzip":
        path = tmp_path / "cut.nii.gz"
        path.write_bytes(_valid_nii_gz_bytes(tmp_path)[:-40])
    elif case == "truncated_nii":
        path = tmp_path / "cut.nii"
        path.write_bytes(gzip.decompress(_valid_nii_gz_bytes(tmp_path))[:2000])
    elif case == "wrong_magic":
        raw = bytearray(gzip.decompress(_valid_nii_gz_bytes(tmp_path)))
        raw[344:348] = b"xyz\0"
        path = tmp_path / "magic.nii"
        path.write_bytes(bytes(raw))
    elif case == "not_gzip":
        path = tmp_path / "plain.nii.gz"
        path.write_bytes(b"this is not a gzip stream at all" * 20)
    elif case == "garbage_mha":
        path = tmp_path / "garbage.mha"
        path.write_bytes(b"\x00\x01 definitely not MetaImage \xff" * 10)
    elif case == "unknown_suffix":
        path = tmp_path / "picture.png"
        path.write_bytes(b"\x89PNG")
    return path


@pytest.mark.parametrize(
    "case",
    [
        "missing",
        "zero_byte",
        "truncated_gzip",
        "truncated_nii",
        "wrong_magic",
        "not_gzip",
        "garbage_mha",
        "unknown_suffix",
    ],
)
def test_read_errors_are_one_line_and_chained(tmp_path: Path, case: str) -> None:
    path = _make_bad(tmp_path, case)
    with pytest.raises(VolumeReadError) as info:
        read_volume(path)
    message = str(info.value)
    assert type(info.value) is VolumeReadError
    assert "\n" not in message
    assert message.startswith(f"{path}: ")
    if case not in ("zero_byte", "unknown_suffix"):  # those have no underlying exception
        assert info.value.__cause__ is not None


def test_singular_affine_is_a_geometry_error(tmp_path: Path) -> None:
    path = tmp_path / "flat.nii.gz"
    _save_nifti(path, np.ones((3, 3, 3), np.int16), qform=None, sform=np.diag([1.0, 1.0, 0.0, 1.0]), qcode=0, scode=1)
    with pytest.raises(GeometryError, match="singular") as info:
        read_volume(path)
    assert str(info.value).startswith(str(path))
    with pytest.raises(GeometryError):
        Volume(np.zeros((2, 2, 2)), np.zeros((4, 4)), "nifti1")
    with pytest.raises(GeometryError):
        Volume(np.zeros((2, 2, 2)), np.full((4, 4), np.nan), "nifti1")


def test_max_voxels_refused_before_decoding(tmp_path: Path) -> None:
    good = _save_nifti(tmp_path / "good.nii.gz", np.ones((4, 5, 6), np.int16), _affine())
    assert read_volume(good, max_voxels=120).shape == (4, 5, 6)
    with pytest.raises(VolumeReadError, match="max_voxels=119"):
        read_volume(good, max_voxels=119)
    # the data of these files are truncated: refusing them by size proves no voxel was decoded
    cut = _make_bad(tmp_path, "truncated_gzip")
    with pytest.raises(VolumeReadError, match="max_voxels"):
        read_volume(cut, max_voxels=10)
    sitk.WriteImage(sitk.GetImageFromArray(np.ones((6, 5, 4), np.int16)), str(tmp_path / "big.mha"))
    raw = (tmp_path / "big.mha").read_bytes()
    (tmp_path / "big.mha").write_bytes(raw[:-100])
    with pytest.raises(VolumeReadError, match="max_voxels"):
        read_volume(tmp_path / "big.mha", max_voxels=10)
    with pytest.raises(VolumeReadError, match="truncated or corrupt"):
        read_volume(tmp_path / "big.mha")


def test_write_shape_mismatch_and_bad_data(tmp_path: Path) -> None:
    ref = read_volume(_save_nifti(tmp_path / "ref.nii.gz", np.zeros((3, 4, 5), np.int16), _affine()))
    before = sorted(tmp_path.iterdir())
    with pytest.raises(GeometryError, match=r"\(3, 4, 6\)"):
        write_volume(np.zeros((3, 4, 6)), ref, tmp_path / "out.nii.gz")
    with pytest.raises(VolumeWriteError, match="non-integer"):
        write_volume(np.full(ref.shape, 0.5), ref, tmp_path / "out.nii.gz")
    with pytest.raises(VolumeWriteError, match="outside int16"):
        write_volume(np.full(ref.shape, 70000), ref, tmp_path / "out.nii.gz")
    with pytest.raises(VolumeWriteError, match="cannot write"):
        write_volume(np.zeros(ref.shape), ref, tmp_path / "out.png")
    with pytest.raises(ValueError, match="scale"):
        write_volume(np.zeros(ref.shape), ref, tmp_path / "out.nii.gz", kind="label", scale=0.1)
    assert sorted(tmp_path.iterdir()) == before


def test_no_temp_file_left_when_the_writer_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ref = read_volume(_save_nifti(tmp_path / "ref.nii.gz", np.zeros((3, 4, 5), np.int16), _affine()))
    existing = tmp_path / "out.nii.gz"
    existing.write_bytes(b"previous result")

    def broken_save(img: object, filename: Path) -> None:
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(io_nifti.nib, "save", broken_save)
    with pytest.raises(VolumeWriteError, match="disk full") as info:
        write_volume(np.ones(ref.shape), ref, existing)
    assert isinstance(info.value.__cause__, OSError)
    assert existing.read_bytes() == b"previous result"

    def broken_writer(image: object, target: Path) -> None:
        Path(target).write_bytes(b"partial")
        if Path(target).suffix in (".mhd", ".nhdr"):  # detached headers come with a data file
            Path(target).with_suffix(".zraw").write_bytes(b"partial")
        raise RuntimeError("sitk::ERROR: cannot write")

    monkeypatch.setattr(io_sitk, "_execute_writer", broken_writer)
    for name in ("out.mha", "out.mhd", "out.nhdr"):
        with pytest.raises(VolumeWriteError, match="cannot write"):
            write_volume(np.ones(ref.shape), ref, tmp_path / name)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.nii.gz", "ref.nii.gz"]


def test_volume_api(tmp_path: Path) -> None:
    vol = read_volume(
        _save_nifti(tmp_path / "ref.nii.gz", np.zeros((3, 4, 5), np.int16), _affine(ROT, (1.25, 1.25, 8)))
    )
    assert vol.spacing == pytest.approx((1.25, 1.25, 8.0), abs=1e-6)
    assert vol.ndim_spatial == 3 and not vol.is_4d
    assert list(vol.frames()) == [vol]
    assert "array(" not in repr(vol) and "(3, 4, 5)" in repr(vol)
    with pytest.raises(ValueError, match="read-only"):
        vol.affine[0, 0] = 2.0
    stacked = vol.with_array(np.zeros((3, 4, 5, 2), np.float32))
    assert stacked.is_4d and stacked.header.get_data_shape() == (3, 4, 5, 2)
    np.testing.assert_array_equal(stacked.affine, vol.affine)
    with pytest.raises(GeometryError, match=r"\(3, 4, 6\)"):
        vol.with_array(np.zeros((3, 4, 6)))
    assert image_format(tmp_path / "x.NII.GZ") == "nifti1" and image_format(tmp_path / "x.nhdr") == "nrrd"
    nifti2 = _save_nifti(tmp_path / "two.nii", np.zeros((2, 2, 2), np.int16), _affine(), klass=nib.Nifti2Image)
    assert image_format(nifti2) == "nifti2"
    with pytest.raises(VolumeReadError, match="unknown image format"):
        image_format(tmp_path / "x.png")
    in_memory = Volume(np.zeros((3, 4, 5)), _affine(ROT, (2.0, 1.0, 3.0), (5.0, 6.0, 7.0)), "nifti1")
    out_img = nib.load(write_volume(np.ones((3, 4, 5)), in_memory, tmp_path / "mem.nii.gz"))
    np.testing.assert_allclose(out_img.affine, in_memory.affine, atol=1e-5)
    assert out_img.header.get_qform(coded=True)[1] == 1 and out_img.header.get_sform(coded=True)[1] == 1


@settings(max_examples=15, deadline=None)
@given(
    euler=st.tuples(*[st.floats(-180, 180)] * 3),
    spacing=st.tuples(*[st.floats(0.2, 12.0)] * 3),
    origin=st.tuples(*[st.floats(-300.0, 300.0)] * 3),
    suffix=st.sampled_from([".nii.gz", ".mha", ".nrrd"]),
)
def test_geometry_round_trip_property(tmp_path_factory: pytest.TempPathFactory, euler, spacing, origin, suffix) -> None:
    folder = Path(tempfile.mkdtemp(dir=tmp_path_factory.getbasetemp()))
    data = np.zeros((4, 3, 2), np.int16)
    if suffix == ".nii.gz":
        ref = read_volume(_save_nifti(folder / "ref.nii.gz", data, _affine(euler, spacing, origin)))
        np.testing.assert_allclose(ref.affine, _affine(euler, spacing, origin), atol=1e-3)
        out = write_volume(np.ones(data.shape), ref, folder / "out.nii.gz")
        np.testing.assert_array_equal(read_volume(out).affine, ref.affine)
        _assert_same_nifti_geometry(nib.load(out).header, nib.load(folder / "ref.nii.gz").header)
    else:
        direction = Rotation.from_euler("xyz", euler, degrees=True).as_matrix()
        sitk.WriteImage(_sitk_image(data, spacing, origin, direction), str(folder / f"ref{suffix}"))
        direct = sitk.ReadImage(str(folder / f"ref{suffix}"))
        ref = read_volume(folder / f"ref{suffix}")
        out = sitk.ReadImage(str(write_volume(np.ones(data.shape), ref, folder / f"out{suffix}")))
        assert (out.GetSpacing(), out.GetOrigin(), out.GetDirection()) == (
            direct.GetSpacing(),
            direct.GetOrigin(),
            direct.GetDirection(),
        )
        np.testing.assert_array_equal(read_volume(folder / f"out{suffix}").affine, ref.affine)


# ------------------------------------------------------------------------------------------- real ACDC data

ACDC = _data_root() / "acdc"


@pytest.mark.data
@pytest.mark.skipif(not (ACDC / "imagesTr").is_dir(), reason="ACDC not found under ../shared/data or CONFKD_DATA_DIR")
def test_acdc_image_and_label_round_trip(tmp_path: Path) -> None:
    image_path = ACDC / "imagesTr" / "patient001_frame01_0000.nii.gz"
    label_path = ACDC / "labelsTr" / "patient001_frame01.nii.gz"
    if not image_path.is_file() or not label_path.is_file():
        pytest.skip("patient001_frame01 missing from the ACDC copy")
    image, label = read_volume(image_path), read_volume(label_path)
    nib_image, itk_image = nib.load(image_path), sitk.ReadImage(str(image_path))
    np.testing.assert_array_equal(image.array, np.asanyarray(nib_image.dataobj))
    np.testing.assert_array_equal(image.array, _sitk_ijk(itk_image))
    np.testing.assert_array_equal(image.affine, nib_image.affine)
    assert image.spacing == pytest.approx(itk_image.GetSpacing(), abs=1e-5)
    np.testing.assert_allclose(label.affine, image.affine, atol=1e-6)
    assert set(np.unique(label.array)) <= {0, 1, 2, 3}

    out = write_volume(label.array, image, tmp_path / "patient001_frame01.nii.gz")
    out_img = nib.load(out)
    _assert_same_nifti_geometry(out_img.header, nib_image.header)
    np.testing.assert_array_equal(np.asanyarray(out_img.dataobj), label.array)
    itk_out = sitk.ReadImage(str(out))
    assert itk_out.GetSpacing() == pytest.approx(itk_image.GetSpacing(), abs=1e-9)
    assert itk_out.GetOrigin() == pytest.approx(itk_image.GetOrigin(), abs=1e-6)
    assert itk_out.GetDirection() == pytest.approx(itk_image.GetDirection(), abs=1e-9)

    image_out = read_volume(write_volume(image.array, image, tmp_path / "image.nii.gz", kind="float"))
    np.testing.assert_array_equal(image_out.array, image.array.astype(np.float32))
    np.testing.assert_array_equal(image_out.affine, image.affine)
    as_mha = read_volume(write_volume(label.array, image, tmp_path / "label.mha"))
    np.testing.assert_allclose(as_mha.affine, image.affine, rtol=0, atol=1e-9)
    np.testing.assert_array_equal(as_mha.array, label.array)
