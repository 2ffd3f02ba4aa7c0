"""What ``confkd segment`` reads: INPUTS resolved to cases, case names, output suffixes and shards.

``resolve_inputs`` turns the command line's INPUTS into :class:`CaseInput` records, one per case:

* an image file (``.nii``, ``.nii.gz``, ``.nrrd``, ``.nhdr``, ``.mha``, ``.mhd``) is one case;
* a ``.dcm`` file stands for its folder's DICOM series (so ``series/*.dcm`` is one case, not one per slice);
* a folder is a DICOM series when it directly holds ``.dcm`` files, or holds no other image file and GDCM finds a
  series in it; any other folder contributes its image files and its DICOM subfolders (one level, no recursion);
* a glob pattern (``*``, ``?``, ``[``; ``**`` recurses) is expanded here as well, for shells that do not
  (Windows) and for quoted patterns. Matches are treated like a folder's entries.

Hidden files (a leading dot, such as our own temporary files) and non-image files found in folders or by
patterns are skipped; a file named explicitly with an unknown suffix, or a path that does not exist, becomes a
failed case (:class:`InputProblem`) so that it is reported and the rest of the batch still runs. The same file
reached twice (named and inside a named folder) is one case.

Case names: the file name without its image suffix, minus a trailing nnU-Net channel suffix ``_0000``; a DICOM
series is named after its folder. Names are sanitised for file names (:func:`sanitize_case_name`), so nothing
read from an input can place an output outside OUT_DIR. Two different inputs whose names are equal, ignoring
case (case-insensitive file systems would make their outputs collide), are both refused with a message naming
the other: an output is never silently overwritten by another input's.

Output suffix (:func:`output_suffix`): the input's own for ``.nii.gz``, ``.nii``, ``.nrrd`` and ``.mha``; a
detached-header input (``.nhdr`` -> ``.nrrd``, ``.mhd`` -> ``.mha``) gives the single-file variant of the same
format, because a header + data pair cannot be replaced atomically as one file; DICOM gives ``.nii.gz``.

Shards (:func:`shard_of`): case ``c`` belongs to shard ``int(sha256(c)) % N``. The assignment depends on the case
name alone, so every machine computes the same split and adding inputs never moves an existing case.
"""

from __future__ import annotations

import glob
import hashlib
import logging
import os
import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from confkd.errors import ConfKDError
from confkd.io_utils import split_image_suffix

__all__ = [
    "CaseInput",
    "InputError",
    "InputProblem",
    "ResolvedInputs",
    "case_name",
    "display_path",
    "output_suffix",
    "parse_shard",
    "printable",
    "resolve_inputs",
    "sanitize_case_name",
    "select_shard",
    "shard_of",
]

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
# detached headers (.nhdr, .mhd) become the single-file variant of their format: one file renames atomically
_OUTPUT_SUFFIX = {
    ".nii.gz": ".nii.gz",
    ".nii": ".nii",
    ".nrrd": ".nrrd",
    ".nhdr": ".nrrd",
    ".mha": ".mha",
    ".mhd": ".mha",
}
CHANNEL_SUFFIX = "_0000"
# the longest output name is "<case>_preview.png"; atomic_path adds ".", ".XXXXXXXX.tmp" and the suffix again:
# 200 bytes for the case keeps every temporary name under the usual 255-byte limit
MAX_CASE_BYTES = 200
_GLOB_CHARS = re.compile(r"[*?\[]")
_UNSAFE = set('/\\<>:"|?*')
_WINDOWS_RESERVED = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(10)), *(f"LPT{i}" for i in range(10))}


class InputError(ConfKDError, ValueError):
    """The command line's inputs cannot be used as given (a malformed ``--shard``, ...)."""


@dataclass(frozen=True)
class CaseInput:
    """One case to segment: its (sanitised) name, where it is read from and the suffix of its outputs."""

    case: str
    path: Path
    suffix: str
    is_dicom: bool = False


@dataclass(frozen=True)
class InputProblem:
    """An input that cannot become a case; reported as a failed case at stage ``"input"``.

    ``case`` is the name it would have had (used for sharding and the reports).
    """

    case: str
    path: Path
    message: str
    error_type: str = "InputError"


@dataclass(frozen=True)
class ResolvedInputs:
    """Cases sorted by name, plus the inputs that could not become cases.

    ``unmatched`` lists glob patterns that matched no image (a warning, not a failure).
    """

    cases: tuple[CaseInput, ...]
    problems: tuple[InputProblem, ...] = ()
    unmatched: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.cases) + len(self.problems)

    def shard(self, index: int, count: int) -> ResolvedInputs:
        """The cases and problems of shard ``index`` of ``count`` (see :func:`shard_of`)."""
        check_shard(index, count)
        return ResolvedInputs(
            cases=tuple(c for c in self.cases if shard_of(c.case, count) == index),
            problems=tuple(p for p in self.problems if shard_of(p.case, count) == index),
            unmatched=self.unmatched,
        )


# ------------------------------------------------------------------------------------------------ names


def display_path(path: str | Path) -> str:
    """``path`` as printable text: undecodable bytes of a non-UTF-8 file name become ``\\xNN`` escapes."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def printable(text: str) -> str:
    """``text`` (a message that may quote a non-UTF-8 file name) safe to print and to write as UTF-8: undecodable
    bytes, held as surrogate escapes, become ``\\xNN`` as in :func:`display_path`; other lone surrogates
    ``\\udNNN``."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def sanitize_case_name(name: str) -> str:
    """A case name safe to use as a file name prefix inside OUT_DIR.

    Path separators, characters Windows forbids (``<>:"|?*``), control characters and undecodable bytes
    become ``_``; leading dots become ``_`` (no hidden files, no ``..``); trailing dots and spaces are dropped
    (Windows); reserved device names get a trailing ``_``; an empty name becomes ``case``; a name longer than
    :data:`MAX_CASE_BYTES` UTF-8 bytes is cut and given an 8-hex-digit hash of the full name, so it stays unique.
    """
    chars = []
    for ch in name:
        category = unicodedata.category(ch)
        chars.append("_" if ch in _UNSAFE or category.startswith("C") else ch)
    text = "".join(chars).rstrip(" .")
    stripped = text.lstrip(".")
    text = "_" * (len(text) - len(stripped)) + stripped
    if not text:
        text = "case"
    if text.split(".")[0].upper() in _WINDOWS_RESERVED:
        text += "_"
    if len(text.encode("utf-8")) > MAX_CASE_BYTES:
        digest = hashlib.sha256(name.encode("utf-8", "surrogateescape")).hexdigest()[:8]
        head = text.encode("utf-8")[: MAX_CASE_BYTES - 9].decode("utf-8", "ignore")
        text = f"{head}-{digest}"
    return text


def case_name(path: str | Path, *, is_dicom: bool | None = None) -> str:
    """The sanitised case name of an input: file name minus image suffix and a trailing ``_0000``.

    A DICOM series (a folder, or ``is_dicom``) is named after its folder; a ``.dcm`` file after its parent folder.
    """
    p = Path(path)
    if is_dicom is None:
        is_dicom = p.is_dir() or p.name.lower().endswith(".dcm")
    if is_dicom and not p.is_dir() and p.name.lower().endswith(".dcm"):
        p = p.parent
    if is_dicom:
        stem = p.resolve().name if p.name in ("", ".", "..") else p.name
    else:
        stem, _ = split_image_suffix(p.name)
        if stem.endswith(CHANNEL_SUFFIX) and len(stem) > len(CHANNEL_SUFFIX):
            stem = stem[: -len(CHANNEL_SUFFIX)]
    return sanitize_case_name(stem)


def output_suffix(path: str | Path, *, is_dicom: bool = False) -> str:
    """The suffix of a case's outputs: the input's own, ``.nhdr`` -> ``.nrrd``, ``.mhd`` -> ``.mha``, DICOM ->
    ``.nii.gz``.

    Raises:
        InputError: not an image suffix we write.
    """
    if is_dicom:
        return ".nii.gz"
    _, suffix = split_image_suffix(Path(path).name)
    out = _OUTPUT_SUFFIX.get(suffix.lower())
    if out is None:
        raise InputError(
            f"{display_path(path)}: unknown image format {suffix or '(no suffix)'!r}; expected "
            f"{', '.join(IMAGE_SUFFIXES)}, a .dcm file or a DICOM series folder"
        )
    return out


# ------------------------------------------------------------------------------------------------ shards


def check_shard(index: int, count: int) -> None:
    """Raise :class:`InputError` unless ``0 <= index < count``."""
    if count < 1 or not 0 <= index < count:
        raise InputError(f"--shard {index}/{count}: need 0 <= I < N with N >= 1 (shards are numbered 0 to N-1)")


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` -> ``(I, N)``, checked.

    Raises:
        InputError: not of the form ``I/N`` with integers ``0 <= I < N``.
    """
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if match is None:
        raise InputError(f"--shard {text!r}: expected I/N with integers 0 <= I < N, e.g. --shard 0/4")
    index, count = int(match.group(1)), int(match.group(2))
    check_shard(index, count)
    return index, count


def shard_of(case: str, count: int) -> int:
    """The shard (``0 .. count-1``) of a case: ``int(sha256(case name, UTF-8)) % count``."""
    digest = hashlib.sha256(case.encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(digest, "big") % count


def select_shard(cases: Sequence[CaseInput], index: int, count: int) -> list[CaseInput]:
    """The cases of shard ``index`` of ``count``, in their given order."""
    check_shard(index, count)
    return [c for c in cases if shard_of(c.case, count) == index]


# ------------------------------------------------------------------------------------------------ resolution


def _is_image_file(path: Path) -> bool:
    lower = path.name.lower()
    return any(lower.endswith(s) for s in IMAGE_SUFFIXES)


def _hidden(path: Path) -> bool:
    return path.name.startswith(".")


def _gdcm_finds_series(folder: Path) -> bool:
    import SimpleITK as sitk  # noqa: N813 (lazy: GDCM scans are only needed for extension-less DICOM folders)

    try:
        return bool(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))
    except RuntimeError:
        return False


def _listing(folder: Path) -> list[Path]:
    try:
        return sorted(p for p in folder.iterdir() if not _hidden(p))
    except OSError as e:
        logger.warning("%s: cannot list folder (%s)", display_path(folder), e.strerror or e)
        return []


def _is_dicom_folder(folder: Path, entries: list[Path] | None = None) -> bool:
    entries = _listing(folder) if entries is None else entries
    files = [p for p in entries if p.is_file()]
    if any(p.name.lower().endswith(".dcm") for p in files):
        return True
    # extension-less DICOM files (common on scanner exports): ask GDCM, but only where nothing else is an image
    if files and not any(_is_image_file(p) for p in files):
        return _gdcm_finds_series(folder)
    return False


class _Collector:
    """Accumulates cases by resolved path (de-duplicated) and problems, in order."""

    def __init__(self, exclude: Path | None) -> None:
        self.found: dict[Path, CaseInput] = {}
        self.problems: list[InputProblem] = []
        self.exclude = exclude.resolve() if exclude is not None else None

    def _excluded(self, path: Path) -> bool:
        return self.exclude is not None and path.resolve().parent == self.exclude

    def add_file(self, path: Path, *, explicit: bool) -> None:
        if path.name.lower().endswith(".dcm"):
            self.add_dicom(path.parent)
            return
        if not _is_image_file(path):
            if explicit:
                try:
                    output_suffix(path)
                except InputError as e:
                    self.problems.append(InputProblem(case_name(path, is_dicom=False), path, str(e)))
            else:
                logger.debug("skipping %s: not an image file", display_path(path))
            return
        if not explicit and self._excluded(path):
            logger.debug("skipping %s: it is inside the output folder", display_path(path))
            return
        key = path.resolve()
        if key not in self.found:
            self.found[key] = CaseInput(case_name(path, is_dicom=False), path, output_suffix(path))

    def add_dicom(self, folder: Path) -> None:
        key = folder.resolve()
        if key not in self.found:
            self.found[key] = CaseInput(case_name(folder, is_dicom=True), folder, ".nii.gz", is_dicom=True)

    def add_folder(self, folder: Path) -> None:
        entries = _listing(folder)
        if _is_dicom_folder(folder, entries):
            self.add_dicom(folder)
            return
        before = len(self.found)
        for entry in entries:
            if entry.is_dir():
                if _is_dicom_folder(entry):
                    self.add_dicom(entry)
            elif entry.is_file() and _is_image_file(entry):
                self.add_file(entry, explicit=False)
        if len(self.found) == before:
            logger.warning("%s: no image files or DICOM series in this folder", display_path(folder))

    def add_missing(self, path: Path) -> None:
        self.problems.append(
            InputProblem(case_name(path, is_dicom=False), path, f"{display_path(path)}: no such file or directory")
        )


def resolve_inputs(inputs: Iterable[str | Path], *, exclude: Path | None = None) -> ResolvedInputs:
    """Resolve the command line's INPUTS (files, DICOM folders, folders, glob patterns) to cases.

    Args:
        inputs: as typed; strings that do not exist as paths and contain ``*``, ``?`` or ``[`` are globs.
        exclude: a folder (OUT_DIR) whose files are never picked up from a folder listing or a pattern, so that
            segmenting ``scans/`` into ``scans/`` does not segment its own outputs on the next run.

    Returns:
        The cases sorted by name (collisions removed and reported as problems), the problems, and the patterns
        that matched nothing.
    """
    collector = _Collector(exclude)
    unmatched: list[str] = []
    for item in inputs:
        text = os.fspath(item)
        path = Path(text)
        if path.is_dir():
            collector.add_folder(path)
        elif path.is_file():
            collector.add_file(path, explicit=True)
        elif _GLOB_CHARS.search(text):
            matches = sorted(glob.glob(text, recursive=True))  # glob skips hidden files, like a shell
            if not matches:
                unmatched.append(text)
            for match in map(Path, matches):
                if match.is_dir():
                    collector.add_folder(match)
                elif match.is_file():
                    collector.add_file(match, explicit=False)
        else:
            collector.add_missing(path)
    return _without_collisions(list(collector.found.values()), collector.problems, unmatched)


def _without_collisions(cases: list[CaseInput], problems: list[InputProblem], unmatched: list[str]) -> ResolvedInputs:
    by_name: dict[str, list[CaseInput]] = {}
    for case in cases:
        by_name.setdefault(case.case.casefold(), []).append(case)
    kept: list[CaseInput] = []
    for group in by_name.values():
        if len(group) == 1:
            kept.append(group[0])
            continue
        for case in group:
            others = ", ".join(display_path(o.path) for o in group if o is not case)
            problems.append(
                InputProblem(
                    case.case,
                    case.path,
                    f"{display_path(case.path)}: case name {case.case!r} is also the name of {others}; "
                    "outputs would overwrite each other: rename one input or segment them into separate --out folders",
                    "CaseNameCollision",
                )
            )
    kept.sort(key=lambda c: c.case)
    problems.sort(key=lambda p: (p.case, str(p.path)))
    return ResolvedInputs(tuple(kept), tuple(problems), tuple(unmatched))
