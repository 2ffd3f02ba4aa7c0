"""NIfTI-1 / NIfTI-2 reading and writing with nibabel, keeping the header (and so the geometry) exact.

Reading: ``array = np.asanyarray(img.dataobj)``, so voxels are scaled only when ``scl_slope`` is set (a
uint8 confidence with slope 1/255 reads back as floats in [0, 1]); ``affine = img.affine``, nibabel's best affine
(sform if its code is set, else qform, else pixdim). Big-endian voxels are converted to native byte order.

Writing with a NIfTI reference copies its header: qform and sform matrices and codes, pixdim, xyzt_units,
descrip, extensions... Only the data shape and dtype, the scaling (reset, or ``scl_slope = scale``), the intent
(``label`` for label maps, none for float maps) and cal_min/cal_max (reset: they describe the reference's
intensities) change. A NIfTI-2 reference gives NIfTI-2 output; the output is native-endian.
"""

from __future__ import annotations

import logging
import sys
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError

from confkd.data.volume import Volume, check_dtype, check_voxels, normalize_shape, one_line
from confkd.errors import VolumeReadError
from confkd.io_utils import atomic_path

__all__ = ["read_nifti", "write_nifti"]

logger = logging.getLogger(__name__)

_NATIVE = "<" if sys.byteorder == "little" else ">"
# what nibabel / gzip / zlib raise on corrupt, truncated or foreign files
_DECODE_ERRORS = (ImageFileError, OSError, EOFError, zlib.error, ValueError, TypeError)


def read_nifti(path: Path, *, max_voxels: int | None = None) -> Volume:
    """Read a ``.nii`` / ``.nii.gz`` file; see the module docstring for the conventions.

    Raises:
        VolumeReadError: unreadable or corrupt file (wrong magic, truncated gzip or data), too many voxels.
        UnsupportedImageError: complex / RGB voxels, more than 4 non-singleton dimensions.
        GeometryError: singular affine.
    """
    where = str(path)
    try:
        img = nib.load(path, mmap=False)
    except _DECODE_ERRORS as e:
        raise VolumeReadError(f"{where}: not a readable NIfTI file ({one_line(e)})") from e
    if not isinstance(img, nib.Nifti1Image):  # Nifti2Image subclasses Nifti1Image
        raise VolumeReadError(f"{where}: nibabel read it as {type(img).__name__}, not as a NIfTI image")
    fmt = "nifti2" if isinstance(img, nib.Nifti2Image) else "nifti1"
    header = img.header
    raw_shape = tuple(int(n) for n in header.get_data_shape())
    shape = normalize_shape(raw_shape, where)
    check_voxels(raw_shape, max_voxels, where)
    check_dtype(header.get_data_dtype(), where)
    try:
        data = np.asanyarray(img.dataobj)
    except _DECODE_ERRORS as e:
        raise VolumeReadError(f"{where}: voxel data are truncated or corrupt ({one_line(e)})") from e
    except MemoryError as e:  # within max_voxels, yet more than this machine can hold
        raise VolumeReadError(f"{where}: not enough memory to decode {raw_shape} voxels") from e
    if data.dtype.byteorder not in ("=", "|", _NATIVE):
        data = data.astype(data.dtype.newbyteorder("="))
    data = data.reshape(shape)
    affine = np.array(img.affine, dtype=np.float64)
    if len(raw_shape) == 2 and not affine[:3, 2].any():
        # a 2D file may leave pixdim[3] at 0: give its single slice a 1 mm unit normal so the affine inverts
        normal = np.cross(affine[:3, 0], affine[:3, 1])
        norm = float(np.linalg.norm(normal))
        if norm > 0:
            affine[:3, 2] = normal / norm
    out_header = header.copy()
    if raw_shape != shape:
        out_header.set_data_shape(shape)
    return Volume(data, affine, fmt, path, out_header)


def _header_from(reference: Volume) -> tuple[type[nib.Nifti1Image], nib.Nifti1Header]:
    """The image class and a header carrying exactly ``reference``'s geometry."""
    header = reference.header
    if reference.format in ("nifti1", "nifti2") and isinstance(header, nib.Nifti1Header):
        klass = nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image
        hdr = header.copy()
        if hdr.endianness != _NATIVE:
            hdr = hdr.as_byteswapped(_NATIVE)
        if not np.allclose(hdr.get_best_affine(), reference.affine, rtol=0.0, atol=1e-6):
            # the Volume's affine was changed after reading: it, not the stale header, is the geometry
            logger.warning(
                "%s: header's qform/sform differ from the volume's affine; writing the affine into both",
                reference.path,
            )
            _, qcode = hdr.get_qform(coded=True)
            _, scode = hdr.get_sform(coded=True)
            hdr.set_qform(reference.affine, code=int(qcode) or 1)
            hdr.set_sform(reference.affine, code=int(scode) or int(qcode) or 1)
        return klass, hdr
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(reference.shape)
    hdr.set_qform(reference.affine, code=1)  # 1 = scanner: DICOM / ITK world coordinates
    hdr.set_sform(reference.affine, code=1)
    hdr.set_xyzt_units("mm", "sec")
    geometry = reference.itk_geometry
    if reference.is_4d and geometry is not None and geometry.dimension == 4:
        zooms = list(hdr.get_zooms())
        zooms[3] = geometry.spacing[3]
        hdr.set_zooms(zooms)
    return nib.Nifti1Image, hdr


def write_nifti(data: np.ndarray, reference: Volume, final: Path, *, kind: str, slope: float | None) -> None:
    """Write ``data`` (already in its on-disk dtype, shape ``reference.shape``) to ``final`` atomically.

    ``slope`` not ``None``: ``data`` is uint8 and ``scl_slope = slope``, ``scl_inter = 0`` are recorded.
    """
    klass, hdr = _header_from(reference)
    if tuple(hdr.get_data_shape()) != data.shape:  # set_data_shape resets pixdim beyond the data's dims to 1
        hdr.set_data_shape(data.shape)
    hdr.set_data_dtype(data.dtype)
    img = klass(data, None, header=hdr)  # affine None: the header's qform/sform are kept untouched
    out = img.header
    out.set_data_dtype(data.dtype)
    # nibabel resets scl_* when it builds an image; with NaN it writes unscaled data (dtype already fits)
    out.set_slope_inter(slope, 0.0 if slope is not None else None)
    out.set_intent("label" if kind == "label" else "none")
    out["cal_min"] = 0.0
    out["cal_max"] = 0.0
    with atomic_path(final) as tmp:
        nib.save(img, tmp)
