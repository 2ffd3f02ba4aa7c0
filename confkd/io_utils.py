"""Small filesystem helpers: atomic writes, so an interrupted run never leaves a partial file."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_path", "atomic_write_bytes", "atomic_write_text", "split_image_suffix"]

# multi-part suffixes first: "a.nii.gz" must give ".nii.gz", not ".gz"
_IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm")


def split_image_suffix(name: str) -> tuple[str, str]:
    """Split ``"case_0000.nii.gz"`` into ``("case_0000", ".nii.gz")`` (case-insensitive suffix match)."""
    lower = name.lower()
    for suffix in _IMAGE_SUFFIXES:
        if lower.endswith(suffix):
            return name[: -len(suffix)], name[len(name) - len(suffix) :]
    stem, dot, ext = name.rpartition(".")
    return (stem, dot + ext) if dot and stem else (name, "")


@contextlib.contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``final``; on success it is renamed over ``final``, otherwise removed.

    The temporary name keeps ``final``'s image suffix so that writers that dispatch on the extension
    (nibabel, SimpleITK) pick the right format. The rename is atomic on POSIX within one filesystem.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    _, suffix = split_image_suffix(final.name)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=f".tmp{suffix}", dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        # mkstemp creates files 0600; give the result the permissions a plain open() would have
        if tmp.is_file():
            os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _umask() -> int:
    # os.umask can only be read by setting it; do it once, at import time it is process-wide anyway
    global _UMASK
    if _UMASK is None:
        _UMASK = os.umask(0o022)
        os.umask(_UMASK)
    return _UMASK


_UMASK: int | None = None


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary file, fsync, rename)."""
    with atomic_path(Path(path)) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_text(path: Path, text: str) -> None:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    atomic_write_bytes(Path(path), text.encode("utf-8"))
