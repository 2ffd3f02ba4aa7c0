"""The batch pipeline behind ``confkd segment``: read ahead, infer in one thread, write behind, never lose work.

:func:`run_batch` takes resolved inputs (:mod:`confkd.inference.inputs`) and a model loaded once by the caller.
Reader threads read and preprocess the next cases while the calling thread runs the inference and writer threads
write the previous results; the queues between them are bounded, so memory stays bounded however long the batch
(:mod:`confkd.inference.workers`). What lands in OUT_DIR, and how every file is written atomically, is in
:mod:`confkd.inference.outputs`; the QA report and the flags in :mod:`confkd.inference.report`.

Complete cases (:func:`~confkd.inference.outputs.is_complete`) are skipped unless ``overwrite``.

Several devices: with a :class:`~confkd.inference.multidevice.DevicePool` as the model, every case runs in one of
the pool's worker processes (one per device) instead of this process's threads; everything else here (skipping,
failures, signals, flags, summary) is the same.

Failures: any exception in one case (reading, preprocessing, inference, writing; an expected
:class:`~confkd.errors.ConfKDError` or not) fails that case only: one outcome through the callback (or a log line),
one line in ``failures.jsonl``, and the batch goes on; unexpected exception types are named in the message and
their traceback goes to the debug log. A re-run retries every case that is not complete, so the failures of an
earlier run are retried without bookkeeping; ``failures.jsonl`` keeps the history, each line with its run id.
A case too large for ``max_voxels`` (its header, before decoding; its network grid, before allocating it) fails
like any other. A full disk fails the cases being written; when ``failures.jsonl`` or ``summary.csv`` cannot be
written either, the batch still runs to its end and then raises :class:`~confkd.inference.outputs.OutputDirError`.
See docs/reliability.md.

Interruption: the first SIGINT / SIGTERM stops taking new cases; the case being inferred is finished and written,
queued results are written, the summary is written and :class:`BatchInterrupted` is raised (the CLI exits 130).
A second signal cuts the inference in progress short (that case stays incomplete and is redone by the next run);
results already inferred are still written. Signal handlers are installed only when
:func:`run_batch` runs in the main thread, and the previous ones are restored afterwards.

At the end, interrupted or not, the flags are recomputed over every complete report in OUT_DIR (earlier runs and
other shards included) and ``summary.csv`` is rewritten atomically: one row per complete case, plus one per case
whose latest recorded failure has no complete output.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, Protocol

from confkd.data.volume import DEFAULT_MAX_VOXELS
from confkd.inference.inputs import CaseInput, InputProblem, ResolvedInputs, display_path, printable
from confkd.inference.multidevice import DeviceBatch, DevicePool
from confkd.inference.outputs import (
    FAILURES_FILE,
    SUMMARY_FILE,
    OutputDirError,
    append_failures,
    is_complete,
    prepare_out_dir,
    read_failures,
)
from confkd.inference.report import CONFIDENCE_FLOOR, apply_batch_flags, load_reports, utc_now, write_summary
from confkd.inference.workers import Batch, CaseOutcome

if TYPE_CHECKING:
    from confkd.inference.model import LoadedModel

__all__ = ["BatchCallback", "BatchInterrupted", "BatchResult", "CaseOutcome", "run_batch"]

logger = logging.getLogger(__name__)


@dataclass
class BatchResult:
    """A run's outcomes (input order is not kept: cases finish in pipeline order) and totals.

    ``flagged`` counts flagged cases over every complete report in OUT_DIR after the run.
    """

    out_dir: Path
    run_id: str
    outcomes: list[CaseOutcome] = field(default_factory=list)
    seconds: float = 0.0
    flagged: int = 0
    interrupted: bool = False

    def _with(self, status: str) -> list[CaseOutcome]:
        return [o for o in self.outcomes if o.status == status]

    @property
    def ok(self) -> list[CaseOutcome]:
        return self._with("ok")

    @property
    def failed(self) -> list[CaseOutcome]:
        return self._with("failed")

    @property
    def skipped(self) -> list[CaseOutcome]:
        return self._with("skipped")

    @property
    def scans_per_s(self) -> float:
        """Cases segmented (written) per second of the run's wall time."""
        return len(self.ok) / self.seconds if self.seconds > 0 else 0.0

    @property
    def summary_path(self) -> Path:
        return self.out_dir / SUMMARY_FILE

    @property
    def failures_path(self) -> Path:
        return self.out_dir / FAILURES_FILE


class BatchInterrupted(KeyboardInterrupt):  # a KeyboardInterrupt: the CLI exits 130
    """The batch stopped on SIGINT / SIGTERM; ``result`` holds what was done (and written) before."""

    def __init__(self, result: BatchResult, signal_name: str = "SIGINT") -> None:
        super().__init__(f"batch interrupted by {signal_name}")
        self.result = result
        self.signal_name = signal_name


class BatchCallback(Protocol):
    """Progress hooks, called from the thread that called :func:`run_batch`; the CLI draws a progress bar."""

    def on_start(self, total: int, skipped: int) -> None:
        """``total`` cases will be attempted (input problems included); ``skipped`` were complete already."""

    def on_case(self, outcome: CaseOutcome) -> None:
        """One case finished (``ok`` or ``failed``)."""


# ---------------------------------------------------------------------------------------------- signals


@contextlib.contextmanager
def _signals(on_signal: Callable[[int], None]) -> Iterator[None]:
    """Route SIGINT and SIGTERM to ``on_signal`` (main thread only); restore the previous handlers after.

    A signal the process was told to ignore stays ignored (``nohup``, or SIGINT of a shell's background job).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    wanted = [signal.SIGINT, *([signal.SIGTERM] if hasattr(signal, "SIGTERM") else [])]
    previous = {sig: signal.getsignal(sig) for sig in wanted}
    previous = {sig: old for sig, old in previous.items() if old is not signal.SIG_IGN}

    def handler(signum: int, frame: FrameType | None) -> None:
        on_signal(signum)

    for sig in previous:
        signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old if old is not None else signal.SIG_DFL)


# ---------------------------------------------------------------------------------------------- the run


def _run_id() -> str:
    return f"{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}-{os.getpid()}"


def _failure_record(run_id: str, o: CaseOutcome) -> dict[str, Any]:
    return {
        "run_id": run_id,
        "time": utc_now(),
        "case": o.case,
        "input": o.input,
        "stage": o.stage,
        "error_type": o.error_type,
        "message": o.message,
    }


def _problem_outcome(problem: InputProblem) -> CaseOutcome:
    return CaseOutcome(
        problem.case,
        display_path(problem.path),
        "failed",
        stage="input",
        error_type=problem.error_type,
        message=problem.message,
    )


def run_batch(
    inputs: ResolvedInputs | Sequence[CaseInput],
    out_dir: str | Path,
    model: LoadedModel | DevicePool,
    *,
    overwrite: bool = False,
    tta: bool = False,
    preview: bool = False,
    low_confidence: float = 0.5,
    prefetch: int = 2,
    writers: int = 1,
    readers: int = 1,
    confidence_floor: float = CONFIDENCE_FLOOR,
    max_voxels: int | None = DEFAULT_MAX_VOXELS,
    progress: BatchCallback | None = None,
) -> BatchResult:
    """Segment every case of ``inputs`` into ``out_dir`` with an already loaded ``model``.

    Args:
        inputs: resolved (and sharded) inputs; their problems are recorded as failed cases (stage ``"input"``).
        out_dir: created if missing.
        model: loaded once by the caller; or a :class:`~confkd.inference.multidevice.DevicePool` (one worker
            process per device, each with the model loaded, taking cases from a shared counter; same outputs).
        overwrite: redo complete cases too (their outputs are replaced only once the new ones are written).
        tta: flip test-time augmentation (the engine's).
        preview: also write ``<case>_preview.png`` (a case without it is not complete).
        low_confidence: voxels below this confidence count as low-confidence in the reports.
        prefetch: prepared cases waiting for inference, at most. ``readers`` / ``writers``: thread counts.
        confidence_floor: absolute floor of the batch flag (see :mod:`confkd.inference.report`).
        max_voxels: memory guard: a case whose image (from its header, before decoding) or network grid (after
            resampling to the model's spacing) holds more voxels fails with a one-line message; ``None``: no limit.
        progress: hooks for a progress display; without it, each case is logged at INFO (failures at WARNING).

    Returns:
        The outcomes; failed cases do not raise.

    Raises:
        BatchInterrupted: SIGINT / SIGTERM; its ``result`` holds what was done, and summary.csv is written.
        OutputDirError: ``out_dir`` cannot be created or written; also after the run, when ``failures.jsonl`` or
            ``summary.csv`` could not be written (a full disk): the cases reported ok are complete even then.
        ValueError: a bad numeric argument.
    """
    if not 0.0 < low_confidence <= 1.0:
        raise ValueError(f"low_confidence must be in (0, 1]; got {low_confidence}")
    for name, value in (("prefetch", prefetch), ("writers", writers), ("readers", readers)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1; got {value}")
    if max_voxels is not None and max_voxels < 1:
        raise ValueError(f"max_voxels must be >= 1 or None (no limit); got {max_voxels}")
    resolved = inputs if isinstance(inputs, ResolvedInputs) else ResolvedInputs(tuple(inputs))
    out = Path(out_dir)
    prepare_out_dir(out)
    start = time.perf_counter()
    result = BatchResult(out_dir=out, run_id=_run_id())

    todo: list[CaseInput] = []
    for case in resolved.cases:
        if not overwrite and is_complete(out, case, preview=preview):
            result.outcomes.append(CaseOutcome(case.case, display_path(case.path), "skipped"))
        else:
            todo.append(case)
    if result.skipped:
        logger.debug("%d complete cases skipped (use overwrite to redo them)", len(result.skipped))
    if progress is not None:
        progress.on_start(len(todo) + len(resolved.problems), len(result.skipped))

    # bookkeeping files that could not be written (a full disk): the batch goes on, run_batch raises at the end
    unwritten: dict[str, str] = {}

    def record(outcomes: Sequence[CaseOutcome]) -> None:
        # messages may quote non-UTF-8 file names: escape them once, here, for the terminal and every file
        outcomes = [replace(o, message=printable(o.message)) if o.message else o for o in outcomes]
        result.outcomes.extend(outcomes)
        try:
            append_failures(
                out / FAILURES_FILE, [_failure_record(result.run_id, o) for o in outcomes if o.status == "failed"]
            )
        except OSError as e:
            unwritten[FAILURES_FILE] = e.strerror or str(e)
            logger.error("cannot append to %s (%s)", display_path(out / FAILURES_FILE), unwritten[FAILURES_FILE])
        for o in outcomes:
            if progress is not None:
                progress.on_case(o)
            elif o.status == "failed":
                logger.warning("%s failed (%s): %s", o.case, o.stage, o.message)
            else:
                logger.info("%s done in %.2f s%s", o.case, o.seconds, " (flagged)" if o.flagged else "")

    record([_problem_outcome(p) for p in resolved.problems])
    options: dict[str, Any] = {
        "run_id": result.run_id,
        "tta": tta,
        "preview": preview,
        "low_confidence": low_confidence,
        "floor": confidence_floor,
        "prefetch": prefetch,
        "readers": readers,
        "writers": writers,
        "max_voxels": max_voxels,
    }
    # several devices: each worker process of the pool runs a Batch with these options (see multidevice)
    batch: Batch | DeviceBatch = (
        model.batch(todo, out, **options) if isinstance(model, DevicePool) else Batch(todo, out, model, **options)
    )
    signals: list[str] = []

    def on_signal(signum: int) -> None:
        if not batch.stop.is_set():  # first: finish what is in flight, take nothing new
            signals.append(signal.Signals(signum).name)
            batch.stop.set()
            return
        batch.abort.set()  # again: cut the inference in progress short
        if batch.inferring:
            raise KeyboardInterrupt

    with _signals(on_signal):
        try:
            batch.run(record)
        except KeyboardInterrupt:  # a second signal during an inference, or Ctrl-C outside our handlers
            batch.abort.set()
            if not signals:
                signals.append("SIGINT")
        finally:
            # the summary is written under our handlers too: a late signal cannot cut it short
            result.interrupted = bool(signals)
            result.seconds = time.perf_counter() - start
            try:
                reports = load_reports(out)
                result.flagged = apply_batch_flags(out, reports, floor=confidence_floor)
                failures = {c: f for c, f in read_failures(out / FAILURES_FILE).items() if c not in reports}
                write_summary(out / SUMMARY_FILE, reports, failures)
            except OSError as e:
                unwritten[SUMMARY_FILE] = e.strerror or str(e)
                logger.error("cannot write %s (%s)", display_path(out / SUMMARY_FILE), unwritten[SUMMARY_FILE])
    if result.interrupted:
        raise BatchInterrupted(result, signals[0])
    if unwritten:
        files = "; ".join(f"{name} ({why})" for name, why in unwritten.items())
        raise OutputDirError(
            f"{display_path(out)}: cannot write {files}; the cases reported ok are complete, re-run to redo the others"
        )
    return result
