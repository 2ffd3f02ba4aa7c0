"""NRRD, MetaImage and DICOM via SimpleITK, with geometry converted to nibabel's conventions.

SimpleITK arrays are ``[k, j, i]`` (``[t, k, j, i]``); they are transposed to ``[i, j, k]`` (``[i, j, k, t]``).
The RAS affine is ``diag(-1, -1, 1) @ direction @ diag(spacing)`` with translation ``diag(-1, -1, 1) @ origin``
(ITK works in LPS). The exact ITK spacing, origin and direction are kept in ``Volume.itk_geometry`` so that
writers reproduce them bit for bit. A 4D image must not mix its 4th axis with the spatial ones.

A uint8 float map written with a scale records it as the metadata key ``confkd_scale``; reading multiplies by it.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from confkd.data.volume import (
    SCALE_KEY,
    Volume,
    check_dtype,
    check_voxels,
    normalize_shape,
    one_line,
)
from confkd.errors import GeometryError, UnsupportedImageError, VolumeReadError
from confkd.io_utils import atomic_path

__all__ = ["ItkGeometry", "read_dicom_series", "read_sitk", "write_sitk"]

logger = logging.getLogger(__name__)

_IMAGE_IO = {"nrrd": "NrrdImageIO", "mha": "MetaImageIO", "mhd": "MetaImageIO", "dicom": "GDCMImageIO"}
_NAMES = {"nrrd": "NRRD", "mha": "MetaImage", "mhd": "MetaImage", "dicom": "DICOM"}
# metadata that describe the file's structure, not the patient: never copied onto a written image
_STRUCTURAL_PREFIXES = ("ITK_", "NRRD_", SCALE_KEY)
_METAIO_RESERVED = {"Modality", "AnatomicalOrientation", "ElementType", "ElementSpacing"}


# LPS (ITK, DICOM) <-> RAS (nibabel): negate the first two world axes; its own inverse
_FLIP = np.diag([-1.0, -1.0, 1.0])


@dataclass(frozen=True)
class ItkGeometry:
    """SimpleITK's own geometry of an image, kept bit for bit so that writers can reproduce it exactly.

    ``spacing`` and ``origin`` have one entry per ITK image dimension (2, 3 or 4); ``direction`` is the row-major
    flattened ``dimension x dimension`` direction-cosine matrix. World coordinates are LPS millimetres.
    ``nrrd_axes`` (3D NRRD only): the file's exact "space directions" in LPS, row-major 3x3 whose columns are the
    axis vectors. NRRD stores these products of spacing and direction, not the two factors, and
    ``direction * spacing`` need not give them back to the last bit.
    """

    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]
    nrrd_axes: tuple[float, ...] | None = None

    @property
    def dimension(self) -> int:
        return len(self.spacing)

    def _matrix(self) -> np.ndarray:
        n = self.dimension
        return np.asarray(self.direction, dtype=np.float64).reshape(n, n)

    def affine(self) -> np.ndarray:
        """(4, 4) voxel ``[i, j, k]`` -> RAS+ mm affine of the first three dimensions.

        A 2D geometry is padded as ITK pads it: unit spacing along an identity k axis.
        """
        n = min(self.dimension, 3)
        direction, spacing, origin = np.eye(3), np.ones(3), np.zeros(3)
        direction[:n, :n] = self._matrix()[:n, :n]
        spacing[:n] = self.spacing[:n]
        origin[:n] = self.origin[:n]
        out = np.eye(4)
        out[:3, :3] = _FLIP @ direction @ np.diag(spacing)
        out[:3, 3] = _FLIP @ origin
        return out

    def is_separable(self) -> bool:
        """True when the dimensions beyond the third do not mix with the spatial ones (always for <= 3D)."""
        m = self._matrix()
        return self.dimension <= 3 or not (m[:3, 3:].any() or m[3:, :3].any())

    def with_dimension(self, n: int, extra_spacing: float = 1.0) -> ItkGeometry:
        """The same spatial geometry with ``n`` (3 or 4) dimensions; an added 4th axis gets ``extra_spacing``."""
        if n == self.dimension:
            return self
        if self.dimension == 2 or n < 3:
            raise GeometryError(f"cannot turn a {self.dimension}D ITK geometry into {n}D")
        m = np.eye(n)
        k = min(n, self.dimension)
        m[:k, :k] = self._matrix()[:k, :k]
        spacing = (*self.spacing[:k], *([extra_spacing] * (n - k)))
        origin = (*self.origin[:k], *([0.0] * (n - k)))
        return ItkGeometry(spacing, origin, tuple(float(v) for v in m.ravel()))

    @classmethod
    def from_affine(cls, affine: np.ndarray) -> ItkGeometry:
        """3D LPS geometry of a RAS affine: spacing = column norms, direction = columns / spacing."""
        matrix = np.asarray(affine, dtype=np.float64)
        lps = _FLIP @ matrix[:3, :3]
        spacing = np.linalg.norm(lps, axis=0)
        return cls(
            tuple(float(v) for v in spacing),
            tuple(float(v) for v in _FLIP @ matrix[:3, 3]),
            tuple(float(v) for v in (lps / spacing).ravel()),
        )


# NRRD "space" values whose axes ITK turns into LPS by negating these world axes
_NRRD_SPACES = {
    "left-posterior-superior": (1.0, 1.0, 1.0),
    "lps": (1.0, 1.0, 1.0),
    "right-anterior-superior": (-1.0, -1.0, 1.0),
    "ras": (-1.0, -1.0, 1.0),
    "left-anterior-superior": (1.0, -1.0, 1.0),
    "las": (1.0, -1.0, 1.0),
}


def _nrrd_axes(path: Path, geometry: ItkGeometry) -> tuple[float, ...] | None:
    """The exact LPS "space directions" of a 3D NRRD header, or ``None`` when absent or not understood."""
    try:
        with open(path, "rb") as f:
            head = f.read(1 << 16)
    except OSError:
        return None
    fields: dict[str, str] = {}
    for raw in head.split(b"\n\n", 1)[0].decode("latin-1").splitlines():
        key, sep, value = raw.partition(":")
        if sep and not value.startswith("="):  # "key:=value" lines are key/value metadata, not fields
            fields[key.strip().lower()] = value.strip()
    signs = _NRRD_SPACES.get(fields.get("space", "").lower())
    vectors = re.findall(r"\(([^)]*)\)", fields.get("space directions", ""))
    if signs is None or geometry.dimension != 3 or len(vectors) != 3:
        return None
    try:
        columns = np.array([[float(v) for v in vec.split(",")] for vec in vectors]).T * np.array(signs)[:, None]
    except ValueError:
        return None
    expected = geometry._matrix() * np.asarray(geometry.spacing)
    if columns.shape != (3, 3) or not np.allclose(columns, expected, rtol=1e-9, atol=1e-12):
        return None  # not what ITK read: trust ITK's factors instead
    return tuple(float(v) for v in columns.ravel())


def _sitk() -> Any:
    import SimpleITK as sitk  # noqa: N813  (hard dependency, imported lazily: slow to import)

    return sitk


def _check_pixels(reader: Any, where: str) -> None:
    """Refuse complex and vector/RGB images from the header, before decoding."""
    sitk = _sitk()
    components = int(reader.GetNumberOfComponents())
    pixel = sitk.GetPixelIDValueAsString(reader.GetPixelID())
    if "complex" in pixel:
        raise UnsupportedImageError(f"{where}: complex voxels ({pixel}) are not supported; save magnitude or phase")
    if components != 1:
        raise UnsupportedImageError(f"{where}: {components}-component (vector / RGB) voxels are not supported")


def _volume_from_image(image: Any, metadata: dict[str, str], fmt: str, path: Path) -> Volume:
    """Transpose a SimpleITK image to ``[i, j, k(, t)]`` and attach its RAS affine and exact ITK geometry."""
    sitk = _sitk()
    where = str(path)
    geometry = ItkGeometry(
        tuple(float(v) for v in image.GetSpacing()),
        tuple(float(v) for v in image.GetOrigin()),
        tuple(float(v) for v in image.GetDirection()),
    )
    array = sitk.GetArrayFromImage(image)
    check_dtype(array.dtype, where)
    array = array.transpose(tuple(range(array.ndim))[::-1])
    shape = normalize_shape(array.shape, where)
    array = array.reshape(shape)
    if len(shape) == 4 and not geometry.is_separable():
        raise UnsupportedImageError(f"{where}: 4D direction matrix mixes the 4th axis with space; not supported")
    if geometry.dimension > 4 or (geometry.dimension == 4 and len(shape) == 3):
        geometry = geometry.with_dimension(len(shape)) if geometry.is_separable() else geometry
    if SCALE_KEY in metadata:
        try:
            scale = float(metadata[SCALE_KEY])
        except ValueError as e:
            raise VolumeReadError(f"{where}: metadata {SCALE_KEY}={metadata[SCALE_KEY]!r} is not a number") from e
        array = array.astype(np.float32) * np.float32(scale)
    return Volume(array, geometry.affine(), fmt, path, metadata, geometry)


def read_sitk(path: Path, fmt: str, *, max_voxels: int | None = None) -> Volume:
    """Read one NRRD / MetaImage / DICOM file.

    Raises:
        VolumeReadError: unreadable header or data, too many voxels (checked from the header alone).
        UnsupportedImageError: complex, vector/RGB or >4D image.
    """
    sitk = _sitk()
    where = str(path)
    reader = sitk.ImageFileReader()
    reader.SetImageIO(_IMAGE_IO[fmt])
    reader.SetFileName(where)
    try:
        reader.ReadImageInformation()
    except RuntimeError as e:
        raise VolumeReadError(f"{where}: not a readable {_NAMES[fmt]} file ({one_line(e)})") from e
    size = tuple(int(n) for n in reader.GetSize())
    normalize_shape(size, where)
    check_voxels(size, max_voxels, where)
    _check_pixels(reader, where)
    try:
        image = reader.Execute()
    except RuntimeError as e:
        raise VolumeReadError(f"{where}: voxel data are truncated or corrupt ({one_line(e)})") from e
    metadata = {k: reader.GetMetaData(k) for k in reader.GetMetaDataKeys()}
    volume = _volume_from_image(image, metadata, fmt, path)
    if fmt == "nrrd" and volume.itk_geometry is not None:
        axes = _nrrd_axes(path, volume.itk_geometry)
        if axes is not None:
            volume = replace(volume, itk_geometry=replace(volume.itk_geometry, nrrd_axes=axes))
    return volume


def read_dicom_series(folder: Path, *, max_voxels: int | None = None, series_uid: str | None = None) -> Volume:
    """Read the one DICOM series in ``folder`` (or the series ``series_uid``), sorted by slice position.

    ``header`` is the first slice's tags, keyed ``"gggg|eeee"``.

    Raises:
        VolumeReadError: no series, several series and no ``series_uid`` (the message lists the UIDs), an unknown
            ``series_uid``, unreadable slices, too many voxels.
    """
    sitk = _sitk()
    where = str(folder)
    try:
        uids = list(sitk.ImageSeriesReader.GetGDCMSeriesIDs(where))
    except RuntimeError as e:
        raise VolumeReadError(f"{where}: cannot scan the folder for DICOM series ({one_line(e)})") from e
    if not uids:
        raise VolumeReadError(f"{where}: no DICOM series found in this folder")
    if series_uid is None:
        if len(uids) > 1:
            raise VolumeReadError(
                f"{where}: holds {len(uids)} DICOM series ({', '.join(sorted(uids))}); pass series_uid= to pick one"
            )
        series_uid = uids[0]
    elif series_uid not in uids:
        raise VolumeReadError(f"{where}: no DICOM series {series_uid!r}; found {', '.join(sorted(uids))}")
    files = list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(where, series_uid))
    info = sitk.ImageFileReader()
    info.SetImageIO("GDCMImageIO")
    info.SetFileName(files[0])
    try:
        info.ReadImageInformation()
    except RuntimeError as e:
        raise VolumeReadError(f"{files[0]}: not a readable DICOM file ({one_line(e)})") from e
    _check_pixels(info, where)
    size = tuple(int(n) for n in info.GetSize())
    check_voxels((*size[:2], len(files) * int(np.prod(size[2:], dtype=np.int64))), max_voxels, where)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    reader.MetaDataDictionaryArrayUpdateOn()
    try:
        image = reader.Execute()
    except RuntimeError as e:
        raise VolumeReadError(f"{where}: cannot read DICOM series {series_uid} ({one_line(e)})") from e
    metadata = {k: reader.GetMetaData(0, k) for k in reader.GetMetaDataKeys(0)}
    logger.debug("%s: DICOM series %s, %d slices", where, series_uid, len(files))
    return _volume_from_image(image, metadata, "dicom", folder)


def _target_geometry(reference: Volume, ndim: int) -> ItkGeometry:
    """The ITK geometry to write: the reference's exact one while it still yields its affine, else derived."""
    geometry = reference.itk_geometry
    if geometry is None or not np.array_equal(geometry.affine(), reference.affine):
        geometry = ItkGeometry.from_affine(reference.affine)
    if geometry.dimension == 2:
        return geometry  # written back as a 2D image (the data have one slice)
    extra = 1.0
    header = reference.header
    if ndim == 4 and hasattr(header, "get_zooms") and len(header.get_zooms()) > 3:
        extra = float(header.get_zooms()[3]) or 1.0  # a NIfTI reference's frame interval
    return geometry.with_dimension(ndim, extra_spacing=extra)


def _copied_metadata(reference: Volume, out_format: str) -> dict[str, str]:
    """Patient / acquisition metadata of a same-family reference; structural keys are left to the writer."""
    header = reference.header
    family = {"mha": "metaio", "mhd": "metaio", "nrrd": "nrrd"}
    if not isinstance(header, dict) or family.get(reference.format) != family[out_format]:
        return {}
    out = {}
    for key, value in header.items():
        if key.startswith(_STRUCTURAL_PREFIXES) or (out_format != "nrrd" and key in _METAIO_RESERVED):
            continue
        out[str(key)] = str(value)
    return out


def _execute_writer(image: Any, target: Path) -> None:
    sitk = _sitk()
    writer = sitk.ImageFileWriter()
    writer.SetFileName(str(target))
    writer.SetUseCompression(True)
    writer.Execute(image)


def write_sitk(data: np.ndarray, reference: Volume, final: Path, out_format: str, *, slope: float | None) -> None:
    """Write ``data`` (on-disk dtype, shape ``reference.shape``) as NRRD / MetaImage to ``final`` atomically.

    Detached headers (``.nhdr``, ``.mhd``) name their data file after themselves, so the pair is written into a
    private temporary folder and moved into place data first, header last.
    """
    sitk = _sitk()
    geometry = _target_geometry(reference, data.ndim)
    voxels = data[:, :, 0] if geometry.dimension == 2 else data
    image = sitk.GetImageFromArray(
        np.ascontiguousarray(voxels.transpose(tuple(range(voxels.ndim))[::-1])), isVector=False
    )
    if out_format == "nrrd" and geometry.nrrd_axes is not None:
        # NRRD writes spacing * direction: unit spacing and the file's own axis vectors give them back exactly
        image.SetSpacing((1.0, 1.0, 1.0))
        image.SetDirection(geometry.nrrd_axes)
    else:
        image.SetSpacing(geometry.spacing)
        image.SetDirection(geometry.direction)
    image.SetOrigin(geometry.origin)
    for key, value in _copied_metadata(reference, out_format).items():
        image.SetMetaData(key, value)
    if slope is not None:
        image.SetMetaData(SCALE_KEY, repr(float(slope)))
    if final.name.lower().endswith((".nhdr", ".mhd")):
        final.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=f".{final.name}.", dir=final.parent) as staging:
            staged = Path(staging) / final.name
            _execute_writer(image, staged)
            for produced in sorted(Path(staging).iterdir()):
                if produced != staged:
                    with atomic_path(final.parent / produced.name) as tmp:
                        os.replace(produced, tmp)
            with atomic_path(final) as tmp:
                os.replace(staged, tmp)
    else:
        with atomic_path(final) as tmp:
            _execute_writer(image, tmp)
