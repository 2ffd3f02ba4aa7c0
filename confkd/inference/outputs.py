"""What ``confkd segment`` leaves in OUT_DIR, and how it gets there without ever leaving a partial file.

Per case: ``<case>_seg<ext>`` (labels), ``<case>_conf<ext>`` (confidence, uint8 with scale 1/255: read back in
[0, 1] within 1/510), optionally ``<case>_preview.png``, and ``<case>.json`` (the QA report), which is written last:
a case is *complete* when its report parses, names this case's seg and conf files (and the preview when one is
asked for), and they all exist. Per folder: ``summary.csv`` and ``failures.jsonl``.

:func:`write_case_images` writes the images of a case to hidden ``.part`` files first (each one atomically), and
renames them into place only when all of them succeeded; an existing report is removed before those renames, so a
crash between two renames leaves an incomplete case (redone by the next run), never a report describing images of
another run. A failed write removes its part files; the previous outputs stay untouched.

``failures.jsonl`` is an append-only history: one JSON object per line and failed case, with ``run_id``, ``time``
(UTC), ``case``, ``input``, ``stage`` (``input``, ``read``, ``preprocess``, ``infer`` or ``write``), ``error_type``
and ``message``. Each line is one ``write`` to a file opened in append mode, so concurrent shards on one local
file system do not interleave lines (on NFS, give each shard its own OUT_DIR).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from confkd.errors import ConfKDError
from confkd.inference.inputs import CaseInput, display_path
from confkd.inference.report import read_report
from confkd.io_utils import atomic_path

if TYPE_CHECKING:
    from confkd.data.volume import Volume

__all__ = [
    "CONFIDENCE_SCALE",
    "FAILURES_FILE",
    "SUMMARY_FILE",
    "OutputDirError",
    "append_failures",
    "is_complete",
    "output_names",
    "prepare_out_dir",
    "read_failures",
    "write_case_images",
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
    parts = {key: out_dir / f".{names[key]}.{tag}.part{suffixes[key]}" for key in names if key != "report"}
    try:
        write_volume(labels, volume, parts["seg"], kind="label")
        write_volume(confidence, volume, parts["conf"], kind="float", scale=CONFIDENCE_SCALE)
        if preview:
            from confkd.inference.preview import write_preview

            write_preview(parts["preview"], np.asarray(volume.array), labels, confidence, volume.spacing)
        # the old report goes first: from here until the new one lands the case reads as incomplete
        with contextlib.suppress(FileNotFoundError):
            (out_dir / names["report"]).unlink()
        for key, part in parts.items():
            os.replace(part, out_dir / names[key])
    finally:
        for part in parts.values():
            with contextlib.suppress(OSError):
                part.unlink()
    return {key: names[key] for key in parts}


def append_failures(path: Path, records: Iterable[Mapping[str, Any]]) -> None:
    """Append one JSON line per record to ``failures.jsonl`` (ASCII JSON; one ``write`` per line), then fsync."""
    lines = [json.dumps(dict(r)) + "\n" for r in records]
    if not lines:
        return
    with open(path, "a", encoding="utf-8") as f:
        for line in lines:
            f.write(line)
            f.flush()
        os.fsync(f.fileno())


def read_failures(path: Path) -> dict[str, dict[str, Any]]:
    """The latest record per case in ``failures.jsonl`` (malformed lines, e.g. a torn last line, are skipped)."""
    out: dict[str, dict[str, Any]] = {}
    try:
        lines = Path(path).read_text(encoding="utf-8", errors="replace").splitlines()
    except FileNotFoundError:
        return out
    for line in lines:
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if isinstance(record, dict) and isinstance(record.get("case"), str):
                out[record["case"]] = record
    return out
