"""Medical volumes that carry their geometry: one :class:`Volume` type, one reader, one writer.

``read_volume`` reads NIfTI-1/NIfTI-2 (``.nii``, ``.nii.gz``, via nibabel), NRRD (``.nrrd``, ``.nhdr``),
MetaImage (``.mha``, ``.mhd``) and DICOM (a series folder, or one ``.dcm`` file), the last three via SimpleITK.
Every reader returns the voxels indexed ``[i, j, k]`` (or ``[i, j, k, t]``), nibabel's order, and a
(4, 4) float64 affine mapping voxel indices to world RAS+ millimetres, nibabel's convention, whatever the
format. ``write_volume`` writes a label map or a float map in exactly a reference volume's geometry.

Dimensionality rules, applied by every reader:

* 2D images become 3D with one slice. ITK formats pad the geometry as ITK does (unit spacing, identity k axis);
  a 2D NIfTI whose third affine column is zero (pixdim[3] = 0) gets a 1 mm unit normal there.
* trailing singleton dimensions beyond the third are dropped: ``(x, y, z, 1) -> (x, y, z)``.
* true 4D images ``(x, y, z, t)`` stay 4D; :meth:`Volume.frames` splits them into 3D volumes.
* more non-singleton dimensions, complex voxels and vector/RGB voxels raise ``UnsupportedImageError``.

Float maps may be stored as uint8 with a scale (``scale=1/255`` for a confidence in [0, 1]): in NIfTI the scale
is ``scl_slope``; in NRRD/MetaImage it is the metadata key :data:`SCALE_KEY`. ``read_volume`` applies it in both
cases, so such files read back as float32 values ``stored * scale``.
"""

from __future__ import annotations

import gzip
import logging
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from confkd.errors import ConfKDError, GeometryError, UnsupportedImageError, VolumeReadError, VolumeWriteError
from confkd.io_utils import split_image_suffix

if TYPE_CHECKING:
    from confkd.data.io_sitk import ItkGeometry

__all__ = [
    "DEFAULT_MAX_VOXELS",
    "FORMATS",
    "SCALE_KEY",
    "Volume",
    "image_format",
    "read_volume",
    "write_volume",
]

logger = logging.getLogger(__name__)

FORMATS = ("nifti1", "nifti2", "nrrd", "mha", "mhd", "dicom")
#: metadata key holding the scale of a uint8-quantised float map in NRRD / MetaImage files
SCALE_KEY = "confkd_scale"
#: ``confkd segment``'s default ``max_voxels``: 2^31 voxels (8 GiB as float32) is beyond any clinical CT or MR
#: (a 512 x 512 x 2000 whole-body CT has about 2^29), yet refuses a corrupt header before it can exhaust memory. A fixed
#: number, not one derived from the free RAM, so that whether a case is accepted does not depend on the machine.
DEFAULT_MAX_VOXELS = 2**31

_SUFFIX_FORMAT = {
    ".nii": "nifti1",
    ".nii.gz": "nifti1",
    ".nrrd": "nrrd",
    ".nhdr": "nrrd",
    ".mha": "mha",
    ".mhd": "mhd",
    ".dcm": "dicom",
}
_KNOWN = ".nii, .nii.gz, .nrrd, .nhdr, .mha, .mhd, .dcm or a DICOM series folder"


def one_line(error: BaseException, limit: int = 200) -> str:
    """A library exception's message squeezed onto one line (ITK's span several, with C++ source paths)."""
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    itk = [ln.split("ERROR:", 1)[1].strip() for ln in lines if "ERROR:" in ln]
    text = itk[-1] if itk else " ".join(lines) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _where(path: Path | None) -> str:
    return str(path) if path is not None else "<in-memory volume>"


def check_affine(affine: np.ndarray, where: str) -> None:
    """Raise ``GeometryError`` unless ``affine`` is a finite, invertible (4, 4) homogeneous matrix."""
    if affine.shape != (4, 4):
        raise GeometryError(f"{where}: affine must be (4, 4); got {affine.shape}")
    if not np.isfinite(affine).all():
        raise GeometryError(f"{where}: affine contains NaN or infinity")
    if not np.array_equal(affine[3], [0.0, 0.0, 0.0, 1.0]):
        raise GeometryError(f"{where}: affine's last row must be [0, 0, 0, 1]; got {affine[3].tolist()}")
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    det = abs(float(np.linalg.det(affine[:3, :3])))
    if spacing.min() == 0.0 or det <= 1e-12 * float(np.prod(spacing)):
        raise GeometryError(
            f"{where}: singular voxel-to-world affine (voxel sizes {spacing.round(6).tolist()}, "
            f"|det| {det:.3g}); the header's qform/sform or pixdim is broken"
        )


def _header_for_shape(header: Any, shape: tuple[int, ...]) -> Any:
    """A copy of ``header`` describing data of ``shape`` (nibabel headers get their dim field updated)."""
    if hasattr(header, "set_data_shape"):
        out = header.copy()
        if tuple(out.get_data_shape()) != tuple(shape):
            out.set_data_shape(shape)
        return out
    if isinstance(header, dict):
        return dict(header)
    return header


@dataclass(frozen=True, eq=False)
class Volume:
    """Voxels plus the geometry that places them in the patient.

    Attributes:
        array: voxel data, shape ``(I, J, K)`` or ``(I, J, K, T)``, indexed ``[i, j, k(, t)]`` as in nibabel
            (SimpleITK's ``[k, j, i]`` arrays are transposed). Big-endian data are converted to native order.
        affine: (4, 4) float64, read-only: voxel index ``[i, j, k, 1]`` -> world RAS+ millimetres, for every format.
        format: the source format, one of :data:`FORMATS`.
        path: the file (or DICOM folder) the geometry came from; ``None`` for a volume built in memory.
        header: NIfTI: the nibabel header (qform, sform, pixdim, units, descrip... are reused on write);
            other formats: a ``dict[str, str]`` of SimpleITK metadata (DICOM: the first slice's tags).
        itk_geometry: for SimpleITK formats, the exact spacing/origin/direction read, so a writer reproduces them
            bit for bit; writers ignore it once it no longer yields ``affine``. ``None`` for NIfTI.
    """

    array: np.ndarray
    affine: np.ndarray
    format: str
    path: Path | None = None
    header: Any = None
    itk_geometry: ItkGeometry | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        path = Path(self.path) if self.path is not None else None
        where = _where(path)
        array = np.asanyarray(self.array)
        if array.ndim not in (3, 4):
            raise GeometryError(f"{where}: a Volume's array must be [i, j, k] or [i, j, k, t]; got {array.shape}")
        affine = np.array(self.affine, dtype=np.float64)
        check_affine(affine, where)
        affine.setflags(write=False)
        if self.format not in FORMATS:
            raise ValueError(f"{where}: unknown volume format {self.format!r}; expected one of {FORMATS}")
        object.__setattr__(self, "array", array)
        object.__setattr__(self, "affine", affine)
        object.__setattr__(self, "path", path)

    def __repr__(self) -> str:  # never print the voxels
        spacing = tuple(round(s, 4) for s in self.spacing)
        return (
            f"Volume(shape={self.shape}, dtype={self.array.dtype}, spacing={spacing}, "
            f"format={self.format!r}, path={_where(self.path)!r})"
        )

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size along i, j, k in mm: the column norms of ``affine[:3, :3]``."""
        s = np.linalg.norm(self.affine[:3, :3], axis=0)
        return float(s[0]), float(s[1]), float(s[2])

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(n) for n in self.array.shape)

    @property
    def ndim_spatial(self) -> int:
        return 3

    @property
    def is_4d(self) -> bool:
        return self.array.ndim == 4

    def frames(self) -> Iterator[Volume]:
        """Yield the 3D volumes ``array[..., t]`` of a 4D volume (same affine, header adjusted to 3D).

        A 3D volume yields itself once.
        """
        if not self.is_4d:
            yield self
            return
        geometry = self.itk_geometry.with_dimension(3) if self.itk_geometry is not None else None
        for t in range(self.shape[3]):
            frame = self.array[..., t]
            yield replace(self, array=frame, header=_header_for_shape(self.header, frame.shape), itk_geometry=geometry)

    def with_array(self, array: np.ndarray) -> Volume:
        """The same geometry around new voxels ``array`` of shape ``(I, J, K)`` or ``(I, J, K, T)``.

        Raises:
            GeometryError: the spatial shape of ``array`` differs from ``self.shape[:3]``.
        """
        array = np.asanyarray(array)
        if array.ndim not in (3, 4) or array.shape[:3] != self.shape[:3]:
            raise GeometryError(
                f"{_where(self.path)}: new array of shape {array.shape} does not fit the volume's spatial "
                f"shape {self.shape[:3]}"
            )
        geometry = self.itk_geometry
        if geometry is not None and geometry.dimension == 4 and array.ndim == 3:
            geometry = geometry.with_dimension(3)
        return replace(self, array=array, header=_header_for_shape(self.header, array.shape), itk_geometry=geometry)


# ----------------------------------------------------------------------------------------------- reading


def image_format(path: str | Path) -> str:
    """The format of ``path``: ``"dicom"`` for a folder, otherwise by suffix (case-insensitive).

    ``.nii``/``.nii.gz`` give ``"nifti2"`` when an existing file's header size says so, else ``"nifti1"``.

    Raises:
        VolumeReadError: unknown suffix.
    """
    p = Path(path)
    if p.is_dir():
        return "dicom"
    _, suffix = split_image_suffix(p.name)
    fmt = _SUFFIX_FORMAT.get(suffix.lower())
    if fmt is None:
        raise VolumeReadError(f"{p}: unknown image format {suffix or '(no suffix)'!r}; expected {_KNOWN}")
    if fmt == "nifti1" and p.is_file():
        fmt = _sniff_nifti_version(p)
    return fmt


def _sniff_nifti_version(path: Path) -> str:
    """``"nifti2"`` if the first int32 (sizeof_hdr, either byte order) is 540, else ``"nifti1"``."""
    try:
        opener = gzip.open if path.name.lower().endswith(".gz") else open
        with opener(path, "rb") as f:
            head = f.read(4)
    except (OSError, EOFError):
        return "nifti1"  # the reader reports the real problem
    if len(head) == 4 and 540 in (int.from_bytes(head, "little"), int.from_bytes(head, "big")):
        return "nifti2"
    return "nifti1"


def normalize_shape(shape: tuple[int, ...], where: str) -> tuple[int, ...]:
    """The ``(I, J, K)`` or ``(I, J, K, T)`` shape a raw image shape is read as (see the module docstring)."""
    raw = tuple(int(n) for n in shape)
    if len(raw) < 2:
        raise UnsupportedImageError(f"{where}: {len(raw)}D image of shape {raw}; need 2D, 3D or 4D")
    if len(raw) == 2:
        return (*raw, 1)
    out = raw
    while len(out) > 3 and out[-1] == 1:
        out = out[:-1]
    if len(out) > 4:
        raise UnsupportedImageError(
            f"{where}: image of shape {raw} has more than one non-singleton dimension beyond i, j, k; "
            "only 3D and 4D (i, j, k, t) images are supported"
        )
    return out


def check_voxels(shape: tuple[int, ...], max_voxels: int | None, where: str, what: str = "image") -> None:
    """Raise ``VolumeReadError`` when a grid of ``shape`` holds more than ``max_voxels`` voxels (``None``: no limit).

    Readers pass the header's shape, before decoding any voxel; ``what`` names the grid in the message.
    """
    n = math.prod(int(d) for d in shape) if shape else 0  # Python ints: a corrupt header cannot overflow
    if max_voxels is not None and n > max_voxels:
        raise VolumeReadError(
            f"{where}: {what} of shape {tuple(int(d) for d in shape)} has {n} voxels, more than "
            f"max_voxels={max_voxels} (confkd segment --max-voxels)"
        )


def check_dtype(dtype: np.dtype, where: str) -> None:
    """Raise ``UnsupportedImageError`` for complex, RGB / structured or non-numeric voxel types."""
    if dtype.kind == "c":
        raise UnsupportedImageError(f"{where}: complex voxels ({dtype}) are not supported; save magnitude or phase")
    if dtype.fields is not None or dtype.kind not in "biuf":
        raise UnsupportedImageError(f"{where}: voxel type {dtype} (RGB / vector / non-numeric) is not supported")


def read_volume(path: str | Path, *, max_voxels: int | None = None, series_uid: str | None = None) -> Volume:
    """Read a NIfTI, NRRD, MetaImage file or a DICOM series folder into a :class:`Volume`.

    Args:
        path: the image file, or the folder holding one DICOM series.
        max_voxels: refuse, before decoding any voxel, an image whose header shape holds more voxels.
        series_uid: for a DICOM folder holding several series, the SeriesInstanceUID to read.

    Raises:
        VolumeReadError: missing, empty, truncated or corrupt file, unknown suffix, too many voxels, or a DICOM
            folder holding several series (the message lists their UIDs). The message is ``"<path>: <problem>"``.
        UnsupportedImageError: complex, vector/RGB, or more than 4D image.
        GeometryError: singular or non-finite affine.
    """
    p = Path(path)
    try:
        size = p.stat().st_size
    except FileNotFoundError as e:
        raise VolumeReadError(f"{p}: no such file or directory") from e
    except OSError as e:
        raise VolumeReadError(f"{p}: cannot access ({e.strerror or one_line(e)})") from e
    try:  # the readers' own messages for this are vague ("Could not read file")
        if p.is_dir():
            os.listdir(p)
        else:
            open(p, "rb").close()
    except OSError as e:
        raise VolumeReadError(f"{p}: cannot open for reading ({e.strerror or one_line(e)})") from e
    fmt = image_format(p)
    if not p.is_dir() and size == 0:
        raise VolumeReadError(f"{p}: file is empty (0 bytes)")
    if max_voxels is not None and max_voxels < 1:
        raise ValueError(f"max_voxels must be a positive integer; got {max_voxels}")
    if series_uid is not None and not (fmt == "dicom" and p.is_dir()):
        raise ValueError(f"{p}: series_uid is only meaningful for a DICOM series folder")
    if fmt in ("nifti1", "nifti2"):
        from confkd.data.io_nifti import read_nifti

        volume = read_nifti(p, max_voxels=max_voxels)
    elif p.is_dir():
        from confkd.data.io_sitk import read_dicom_series

        volume = read_dicom_series(p, max_voxels=max_voxels, series_uid=series_uid)
    else:
        from confkd.data.io_sitk import read_sitk

        volume = read_sitk(p, fmt, max_voxels=max_voxels)
    logger.debug("read %r", volume)
    return volume


# ----------------------------------------------------------------------------------------------- writing


def _output_format(path: Path) -> str:
    _, suffix = split_image_suffix(path.name)
    fmt = _SUFFIX_FORMAT.get(suffix.lower())
    if fmt is None or fmt == "dicom":
        raise VolumeWriteError(
            f"{path}: cannot write {suffix or '(no suffix)'!r}; use .nii.gz, .nii, .nrrd, .nhdr, .mha or .mhd"
        )
    return "nifti" if fmt == "nifti1" else fmt


def _encode(array: np.ndarray, kind: str, scale: float | None, where: str) -> tuple[np.ndarray, float | None]:
    """Cast ``array`` to its on-disk dtype; return it and the scale to record (``None``: no scaling)."""
    if kind == "label":
        if array.dtype.kind not in "biuf":
            raise VolumeWriteError(f"{where}: labels must be integers; got {array.dtype}")
        if array.dtype.kind == "f" and not (np.isfinite(array).all() and (array == np.rint(array)).all()):
            raise VolumeWriteError(
                f"{where}: kind='label' needs integer labels; got {array.dtype} with non-integer values "
                "(use kind='float' for probability maps)"
            )
        lo, hi = (int(array.min()), int(array.max())) if array.size else (0, 0)
        if lo >= 0 and hi < 256:
            return array.astype(np.uint8), None
        if lo >= -32768 and hi <= 32767:
            return array.astype(np.int16), None
        raise VolumeWriteError(f"{where}: labels span [{lo}, {hi}], outside int16; relabel them")
    if array.dtype.kind not in "biuf":
        raise VolumeWriteError(f"{where}: float maps must be real numbers; got {array.dtype}")
    if scale is None:
        return array.astype(np.float32), None
    if not np.isfinite(array).all():
        raise VolumeWriteError(f"{where}: NaN or infinity cannot be stored as uint8 with scale={scale}")
    quantised = np.rint(array.astype(np.float64) / scale)
    clipped = int(np.count_nonzero((quantised < 0) | (quantised > 255)))
    if clipped:
        logger.warning("%s: %d voxels outside [0, %g] clipped to fit uint8", where, clipped, 255 * scale)
    return np.clip(quantised, 0, 255).astype(np.uint8), float(scale)


def write_volume(
    array: np.ndarray,
    reference: Volume,
    path: str | Path,
    *,
    kind: Literal["label", "float"] = "label",
    scale: float | None = None,
) -> Path:
    """Write ``array`` in exactly ``reference``'s geometry, atomically; return the path written.

    The output format follows ``path``'s suffix (``.nii.gz``, ``.nii``, ``.nrrd``, ``.nhdr``, ``.mha``, ``.mhd``),
    whatever ``reference.format``. NIfTI outputs of a NIfTI reference reuse its header (qform and sform with their
    codes, pixdim, units, descrip; NIfTI-2 stays NIfTI-2; output is native-endian); NIfTI outputs of other
    references get ``qform = sform = affine`` with code 1 (scanner), stored in float32 as NIfTI-1 requires.
    NRRD/MetaImage outputs reuse the reference's exact ITK spacing, origin and direction when it has them.

    Args:
        array: shape ``reference.shape`` ``(I, J, K)`` or ``(I, J, K, T)``; a 3D array with a 4D reference is
            written in the geometry of one frame.
        kind: ``"label"``: integer labels stored as uint8 (all in [0, 255]) or int16, no scaling, NIfTI intent
            "label". ``"float"``: float32, or uint8 with ``scale`` (value = stored * scale; values outside
            ``[0, 255 * scale]`` are clipped with a warning).
        scale: only with ``kind="float"``, e.g. ``1 / 255`` for a confidence in [0, 1].

    Raises:
        GeometryError: ``array``'s shape does not match ``reference``.
        VolumeWriteError: unwritable path, unsupported suffix, or data the chosen kind cannot store.
    """
    final = Path(path)
    where = str(final)
    if kind not in ("label", "float"):
        raise ValueError(f"kind must be 'label' or 'float'; got {kind!r}")
    if scale is not None and (kind != "float" or not np.isfinite(scale) or scale <= 0):
        raise ValueError(f"scale must be a positive number and needs kind='float'; got scale={scale}, kind={kind!r}")
    out_format = _output_format(final)
    array = np.asanyarray(array)
    if array.shape != reference.shape:
        if reference.is_4d and array.shape == reference.shape[:3]:
            reference = next(reference.frames())
        else:
            raise GeometryError(
                f"{where}: array shape {array.shape} does not match the reference's shape {reference.shape} "
                f"({_where(reference.path)})"
            )
    data, slope = _encode(array, kind, scale, where)
    try:
        if out_format == "nifti":
            from confkd.data.io_nifti import write_nifti

            write_nifti(data, reference, final, kind=kind, slope=slope)
        else:
            from confkd.data.io_sitk import write_sitk

            write_sitk(data, reference, final, out_format, slope=slope)
    except ConfKDError:
        raise
    except (OSError, RuntimeError, ValueError) as e:
        raise VolumeWriteError(f"{where}: cannot write ({one_line(e)})") from e
    logger.debug("wrote %s %s %s in the geometry of %s", kind, data.dtype, data.shape, _where(reference.path))
    return final
