"""Merging the output folders of sharded ``confkd segment`` runs into one summary, as one unsharded run writes it.

N machines run ``confkd segment --shard I/N --out OUT_I``; :func:`merge_outputs` reads every ``OUT_I`` and writes
into ``MERGED``:

* ``summary.csv``: one row per case of the union (same columns, rows sorted by case), exactly as one run over the
  whole batch would write it. The flags are recomputed over the union: the robust z-score of
  :func:`~confkd.inference.report.batch_flags` depends on the whole batch (its median and MAD), so each shard's own
  flags, computed over the shard, can differ from the batch's.
* ``failures.jsonl``: every failure line of every shard (the history), in time order; none without failures.

The sources are what ``confkd segment`` itself summarises at the end of a run: the complete case reports
(``<case>.json`` whose outputs exist) and ``failures.jsonl`` of each folder; a case whose latest failure has no
complete output is a ``failed`` row. So gather whole OUT_DIRs (or at least their reports, images and
``failures.jsonl``), not only their ``summary.csv``.

Checks: a case present in two folders (complete or failed) is refused, naming both. With ``shards`` (the N of
``--shard I/N``) the folders must be the N shards' own: N folders, each holding the cases of one shard only (or
none: a shard without cases still writes its ``summary.csv``), no shard in two folders; so a missing shard, or
shards run with another N, is an error. The shard folders are read only, unless
``update_reports``: then the reports whose flags differ from the batch's are rewritten in place (atomically), as
segment does when shards share one OUT_DIR.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from confkd.errors import ConfKDError
from confkd.inference.inputs import display_path, shard_of
from confkd.inference.outputs import FAILURES_FILE, SUMMARY_FILE, failure_records
from confkd.inference.report import (
    CONFIDENCE_FLOOR,
    batch_flags,
    foreground_confidence,
    load_reports,
    write_report,
    write_summary,
)
from confkd.io_utils import atomic_write_text

__all__ = ["MergeError", "MergeResult", "merge_outputs"]

logger = logging.getLogger(__name__)


class MergeError(ConfKDError, ValueError):
    """The folders cannot be merged as given (not segment outputs, a case in two folders, a shard missing, ...)."""


@dataclass(frozen=True)
class MergeResult:
    """What was merged. ``flagged`` counts the flagged cases of the union; ``updated`` the shard reports rewritten."""

    out_dir: Path
    sources: tuple[Path, ...]
    ok: int
    failed: int
    flagged: int
    failure_lines: int
    updated: int = 0

    @property
    def summary_path(self) -> Path:
        return self.out_dir / SUMMARY_FILE

    @property
    def failures_path(self) -> Path:
        return self.out_dir / FAILURES_FILE


@dataclass
class _Folder:
    path: Path
    reports: dict[str, dict[str, Any]]
    failed: dict[str, dict[str, Any]]  # latest failure record of each case without a complete output
    lines: list[dict[str, Any]]  # every failure record, in file order

    @property
    def cases(self) -> set[str]:
        return set(self.reports) | set(self.failed)


def _read_folder(path: Path) -> _Folder:
    if not path.is_dir():
        raise MergeError(f"{display_path(path)}: not a folder; pass the --out folders of the segment shards")
    reports = load_reports(path)
    lines = failure_records(path / FAILURES_FILE)
    if not reports and not lines and not (path / SUMMARY_FILE).is_file():
        raise MergeError(
            f"{display_path(path)}: not a confkd segment output folder (no case reports, {SUMMARY_FILE} or "
            f"{FAILURES_FILE})"
        )
    latest = {record["case"]: record for record in lines}  # the last line of a case wins, as in read_failures
    failed = {case: record for case, record in latest.items() if case not in reports}
    return _Folder(path, reports, failed, lines)


def _check_sources(folders: Sequence[Path], out_dir: Path) -> list[Path]:
    if not folders:
        raise MergeError("no folders to merge: pass the --out folders of the segment shards")
    seen: dict[Path, Path] = {}
    for folder in folders:
        key = folder.resolve()
        if key in seen:
            raise MergeError(f"{display_path(folder)}: given twice (as {display_path(seen[key])}); pass each once")
        seen[key] = folder
    if out_dir.resolve() in seen:
        raise MergeError(
            f"--out {display_path(out_dir)} is one of the folders being merged; write the merge to a new folder"
        )
    if out_dir.is_dir() and load_reports(out_dir):
        raise MergeError(
            f"--out {display_path(out_dir)} holds segment outputs (case reports); write the merge to a new folder"
        )
    return list(folders)


def _check_duplicates(folders: Sequence[_Folder]) -> None:
    owner: dict[str, Path] = {}
    for folder in folders:
        for case in sorted(folder.cases):
            if case in owner:
                raise MergeError(
                    f"case {case!r} is in both {display_path(owner[case])} and {display_path(folder.path)}: each case "
                    "must come from one shard (same --shard N for every shard, each folder given once)"
                )
            owner[case] = folder.path


def _check_shards(folders: Sequence[_Folder], count: int) -> None:
    """One folder per shard: each holds the cases of one shard of ``count`` (or none), no shard twice, none missing."""
    if count < 1:
        raise MergeError(f"--shards {count}: must be >= 1")
    holder: dict[int, Path] = {}
    for folder in folders:
        indices = sorted({shard_of(case, count) for case in folder.cases})
        if len(indices) > 1:
            listed = ", ".join(f"{i}/{count}" for i in indices)
            raise MergeError(
                f"{display_path(folder.path)}: holds cases of shards {listed}, not of one --shard I/{count} run "
                f"(was it run with another N than {count}?)"
            )
        for index in indices:
            if index in holder:
                raise MergeError(
                    f"{display_path(holder[index])} and {display_path(folder.path)} both hold cases of shard "
                    f"{index}/{count}; pass one folder per shard"
                )
            holder[index] = folder.path
    if len(folders) != count:
        missing = ", ".join(f"{i}/{count}" for i in range(count) if i not in holder)
        raise MergeError(
            f"--shards {count}: {len(folders)} folder(s) given, one per shard expected; shard(s) {missing or '(none)'} "
            "missing: no folder holds their cases (a shard without cases still needs its folder)"
        )


def _merged_failure_lines(folders: Sequence[_Folder]) -> str:
    records = [(str(r.get("time", "")), i, j, r) for i, f in enumerate(folders) for j, r in enumerate(f.lines)]
    records.sort(key=lambda item: item[:3])  # time order; ties keep folder order, then file order
    return "".join(json.dumps(record) + "\n" for *_, record in records)


def merge_outputs(
    folders: Sequence[str | Path],
    out_dir: str | Path,
    *,
    shards: int | None = None,
    confidence_floor: float = CONFIDENCE_FLOOR,
    update_reports: bool = False,
) -> MergeResult:
    """Merge the OUT_DIRs of sharded segment runs into ``out_dir`` (``summary.csv`` and ``failures.jsonl``).

    Args:
        folders: the shards' OUT_DIRs (read only unless ``update_reports``).
        out_dir: created if missing; must not be one of ``folders`` nor hold case reports.
        shards: the N of ``--shard I/N``, when known: ``folders`` must then be the N shards' own (one per shard).
        confidence_floor: the absolute floor of the flags, as given to ``run_batch`` (default 0.5).
        update_reports: rewrite the shard reports whose flags differ from the batch's.

    Raises:
        MergeError: a folder that is not a segment output or given twice, a case in two folders, a missing shard.
        OSError: ``out_dir`` cannot be written.
    """
    out = Path(out_dir)
    paths = _check_sources([Path(f) for f in folders], out)
    read = [_read_folder(p) for p in paths]
    _check_duplicates(read)
    if shards is not None:
        _check_shards(read, shards)

    reports: dict[str, dict[str, Any]] = {}
    home: dict[str, Path] = {}
    failed: dict[str, Mapping[str, Any]] = {}
    for folder in read:
        for case, report in folder.reports.items():
            reports[case] = dict(report)  # a copy: the shard's own flags stay in its folder's report
            home[case] = folder.path
        failed.update(folder.failed)
    cases = sorted(reports)
    flags = batch_flags([foreground_confidence(reports[c]) for c in cases], floor=confidence_floor)
    updated = 0
    for case, reasons in zip(cases, flags, strict=True):
        report = reports[case]
        changed = report.get("flag_reasons") != reasons or report.get("flagged") != bool(reasons)
        report["flagged"] = bool(reasons)
        report["flag_reasons"] = reasons
        if changed and update_reports:
            write_report(home[case] / f"{case}.json", report)
            updated += 1

    out.mkdir(parents=True, exist_ok=True)
    write_summary(out / SUMMARY_FILE, reports, failed)
    lines = _merged_failure_lines(read)
    if lines:
        atomic_write_text(out / FAILURES_FILE, lines)
    else:  # as a run without failures: no failures.jsonl (not even an earlier merge's)
        (out / FAILURES_FILE).unlink(missing_ok=True)
    result = MergeResult(
        out_dir=out,
        sources=tuple(paths),
        ok=len(reports),
        failed=len(failed),
        flagged=sum(1 for reasons in flags if reasons),
        failure_lines=sum(len(f.lines) for f in read),
        updated=updated,
    )
    logger.debug(
        "merged %d folder(s): %d ok, %d failed, %d flagged -> %s",
        len(paths),
        result.ok,
        result.failed,
        result.flagged,
        display_path(out),
    )
    return result
