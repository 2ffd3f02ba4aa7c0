"""What ``confkd segment`` leaves in OUT_DIR, and how it gets there without ever leaving a partial file.

Per case: ``<case>_seg<ext>`` (labels), ``<case>_conf<ext>`` (confidence, uint8 with scale 1/255: read back in
[0, 1] within 1/510), optionally ``<case>_preview.png``, and ``<case>.json`` (the QA report), which is written last:
a case is *complete* when its report parses, names this case's seg and conf files (and the preview when one is
asked for), and they all exist. Per folder: ``summary.csv`` and ``failures.jsonl``.

:func:`write_case_images` writes the images of a case to hidden ``.part`` files first (each one atomically), and
renames them into place only when all of them succeeded; an existing report is removed before those renames, so a
crash between two renames leaves an incomplete case (redone by the next run), never a report describing images of
another run. A failed write removes its part files; the previous outputs stay untouched; its message names the
output (not the part file) and the system's reason. :func:`write_case_report` writes the report last; if that
fails (a full disk), it removes the images just renamed into place, so a failed case leaves no outputs.

``failures.jsonl`` is an append-only history: one JSON object per line and failed case, with ``run_id``, ``time``
(UTC), ``case``, ``input``, ``stage`` (``input``, ``read``, ``preprocess``, ``infer`` or ``write``), ``error_type``
and ``message``. Each line is one ``write`` to a file opened in append mode, so concurrent shards on one local
file system do not interleave lines (on NFS, give each shard its own OUT_DIR). A line torn by a full disk is
skipped on reading, and the next append starts a new line.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from confkd.errors import ConfKDError, VolumeWriteError
from confkd.inference.inputs import CaseInput, display_path, printable
from confkd.inference.report import read_report, write_report
from confkd.io_utils import atomic_path

if TYPE_CHECKING:
    from confkd.data.volume import Volume

__all__ = [
    "CONFIDENCE_SCALE",
    "FAILURES_FILE",
    "SUMMARY_FILE",
    "OutputDirError",
    "append_failures",
    "failure_records",
    "is_complete",
    "output_names",
    "prepare_out_dir",
    "read_failures",
    "write_case_images",
    "write_case_report",
]

logger = logging.getLogger(__name__)

FAILURES_FILE = "failures.jsonl"
SUMMARY_FILE = "summary.csv"
#: confidence maps are stored as uint8 with this scale
CONFIDENCE_SCALE = 1 / 255
# leftovers of a killed run (our ".part" files, atomic_path's ".tmp" files) are removed after this many seconds;
# younger ones may belong to another shard writing into the same folder right now
STALE_S = 3600.0
_STALE = re.compile(r"^\..+\.(part|tmp)(\.[A-Za-z0-9.]+)?$")
# a part file ".<name>.<run id>.part<suffix>" is written through atomic_path, whose temporary name adds another
# ".", ".XXXXXXXX.tmp" and the suffix: 59 bytes with the longest run id and suffix. Output names of the longest
# case names (MAX_CASE_BYTES + "_preview.png") would pass the usual 255-byte limit, so long ones are shortened
_PART_NAME_BYTES = 120


class OutputDirError(ConfKDError, OSError):
    """OUT_DIR cannot be created or written."""


def output_names(case: CaseInput, *, preview: bool = False) -> dict[str, str]:
    """File names (inside OUT_DIR) of a case's outputs: ``seg``, ``conf``, maybe ``preview``, and ``report``."""
    names = {"seg": f"{case.case}_seg{case.suffix}", "conf": f"{case.case}_conf{case.suffix}"}
    if preview:
        names["preview"] = f"{case.case}_preview.png"
    names["report"] = f"{case.case}.json"
    return names


def is_complete(out_dir: Path, case: CaseInput, *, preview: bool = False) -> bool:
    """The case's report parses, names this case's seg and conf files, and every output asked for exists."""
    names = output_names(case, preview=preview)
    report = read_report(out_dir / names["report"])
    if report is None or report.get("case") != case.case:
        return False
    listed = report.get("outputs")
    if not isinstance(listed, dict) or listed.get("seg") != names["seg"] or listed.get("conf") != names["conf"]:
        return False
    return all((out_dir / name).is_file() for key, name in names.items() if key != "report")


def prepare_out_dir(out_dir: Path, *, stale_s: float = STALE_S) -> None:
    """Create ``out_dir``, check that it is writable, and remove temporary files older than ``stale_s``.

    Raises:
        OutputDirError: it cannot be created or written (the message names it and the fix).
    """
    probe = out_dir / ".confkd_write_probe"
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(probe) as tmp:
            tmp.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise OutputDirError(
            f"{display_path(out_dir)}: cannot write the output folder ({e.strerror or e}); choose another --out"
        ) from e
    now = time.time()
    for path in out_dir.iterdir():
        if _STALE.match(path.name):
            with contextlib.suppress(OSError):
                if path.is_file() and now - path.stat().st_mtime > stale_s:
                    path.unlink()
                    logger.debug("removed stale temporary file %s", display_path(path))


def write_case_images(
    out_dir: Path,
    case: CaseInput,
    volume: Volume,
    labels: np.ndarray,
    confidence: np.ndarray,
    *,
    preview: bool,
    tag: str,
) -> dict[str, str]:
    """Write a case's label map, confidence map and optional preview, all or none; return their file names.

    The report is not written here (the caller writes it last); an existing one is removed before the images are
    renamed into place. ``tag`` (the run id) makes the part-file names unique to this run.

    Shape:
        ``labels`` and ``confidence``: ``volume.shape``.
    """
    from confkd.data.volume import write_volume

    names = output_names(case, preview=preview)
    # hidden part files keep the full image suffix: write_volume picks the format from it
    suffixes = {"seg": case.suffix, "conf": case.suffix, "preview": ".png"}
    parts = {key: out_dir / f".{_short(names[key])}.{tag}.part{suffixes[key]}" for key in names if key != "report"}
    key = "seg"  # the output being written, for the error message
    try:
        write_volume(labels, volume, parts["seg"], kind="label")
        key = "conf"
        write_volume(confidence, volume, parts["conf"], kind="float", scale=CONFIDENCE_SCALE)
        if preview:
            from confkd.inference.preview import write_preview

            key = "preview"
            write_preview(parts["preview"], np.asarray(volume.array), labels, confidence, volume.spacing)
        # the old report goes first: from here until the new one lands the case reads as incomplete
        key = "report"
        with contextlib.suppress(FileNotFoundError):
            (out_dir / names["report"]).unlink()
        for key, part in parts.items():  # key names the file in an error
            os.replace(part, out_dir / names[key])
    except OSError as e:
        error = _write_error(out_dir / names[key], e)
        if error is e:
            raise
        raise error from e
    finally:
        for part in parts.values():
            with contextlib.suppress(OSError):
                part.unlink()
    return {key: names[key] for key in parts}


def _write_error(path: Path, error: OSError) -> OSError:
    """A one-line error naming the output ``path`` (not its hidden part file) and the system's reason (a full
    disk: "No space left on device"); ``error`` itself when it is not the system's (bad data for the kind)."""
    from confkd.data.volume import one_line

    cause = error.__cause__ if isinstance(error, VolumeWriteError) else error
    if not isinstance(cause, OSError):
        return error
    return VolumeWriteError(f"{display_path(path)}: cannot write ({cause.strerror or one_line(cause)})")


def write_case_report(out_dir: Path, case: CaseInput, report: dict[str, Any], images: Mapping[str, str]) -> None:
    """Write the case's report, last: from now on the case is complete.

    When the report cannot be written, the ``images`` just renamed into place are removed too, so that a failed
    case leaves no outputs behind (the next run redoes it).

    Raises:
        VolumeWriteError: naming the report file and the system's reason.
    """
    path = out_dir / output_names(case)["report"]
    try:
        write_report(path, report)
    except OSError as e:
        for name in images.values():
            with contextlib.suppress(OSError):
                (out_dir / name).unlink()
        raise VolumeWriteError(f"{display_path(path)}: cannot write the report ({e.strerror or e})") from e


def _short(name: str) -> str:
    """``name``, or its first bytes plus a hash of the whole when it is longer than ``_PART_NAME_BYTES``."""
    raw = name.encode("utf-8", "surrogateescape")
    if len(raw) <= _PART_NAME_BYTES:
        return name
    digest = hashlib.sha256(raw).hexdigest()[:8]
    return f"{raw[: _PART_NAME_BYTES - 9].decode('utf-8', 'ignore')}-{digest}"


def append_failures(path: Path, records: Iterable[Mapping[str, Any]]) -> None:
    """Append one JSON line per record to ``failures.jsonl`` (ASCII JSON; one ``write`` per line), then fsync.

    A torn last line (a write cut short by a full disk) is ended first, so it stays a malformed line of its own,
    skipped on reading, instead of swallowing the next record.
    """
    lines = [json.dumps(dict(r)) + "\n" for r in records]
    if not lines:
        return
    if _torn(path):
        lines[0] = "\n" + lines[0]
    with open(path, "a", encoding="utf-8") as f:
        for line in lines:
            f.write(line)
            f.flush()
        os.fsync(f.fileno())


def _torn(path: Path) -> bool:
    """The file exists, is not empty and does not end with a newline."""
    try:
        with open(path, "rb") as f:
            if f.seek(0, os.SEEK_END) == 0:
                return False
            f.seek(-1, os.SEEK_END)
            return f.read(1) != b"\n"
    except OSError:
        return False


def failure_records(path: Path) -> list[dict[str, Any]]:
    """Every record of a ``failures.jsonl``, in order, as stored (malformed lines, e.g. a torn last line, are
    skipped; a missing file has none)."""
    out: list[dict[str, Any]] = []
    try:
        lines = Path(path).read_text(encoding="utf-8", errors="replace").splitlines()
    except FileNotFoundError:
        return out
    for line in lines:
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if isinstance(record, dict) and isinstance(record.get("case"), str):
                out.append(record)
    return out


def read_failures(path: Path) -> dict[str, dict[str, Any]]:
    """The latest record per case in ``failures.jsonl`` (see :func:`failure_records`)."""
    out: dict[str, dict[str, Any]] = {}
    for record in failure_records(path):
        # JSON may hold lone surrogates ("\udcff": an undecodable file name); they cannot be written as UTF-8
        record = {k: printable(v) if isinstance(v, str) else v for k, v in record.items()}
        out[record["case"]] = record
    return out
