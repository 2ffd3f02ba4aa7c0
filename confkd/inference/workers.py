"""The threads and queues of the batch pipeline (used by :func:`confkd.inference.pipeline.run_batch`).

* reader threads: :func:`~confkd.data.volume.read_volume` + :func:`engine.prepare` of the next cases, into a queue
  of at most ``prefetch`` prepared cases (CPU work that overlaps inference);
* the calling thread: :func:`engine.infer`, the only device work, one case at a time;
* writer threads, behind a queue of at most ``writers`` results: images, then the report.

So at most ``prefetch`` + ``readers`` prepared cases and ``writers`` + ``writers`` results are held at any time,
whatever the batch length. Every exception of a case becomes a failed :class:`CaseOutcome`; outcomes go through a
queue to the calling thread, which alone reports them. Two events steer the shutdown: ``stop`` (take no new case;
finish what is in flight and write every result) and ``abort`` (the inference in progress was cut short; readers
give up delivering). Results already inferred are always written: writing is short, inferring was not.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from confkd.errors import ConfKDError
from confkd.inference.inputs import CaseInput, display_path
from confkd.inference.outputs import write_case_images, write_case_report
from confkd.inference.report import build_report

if TYPE_CHECKING:
    from confkd.data.volume import Volume
    from confkd.inference.model import LoadedModel

__all__ = ["Batch", "CaseOutcome", "drive"]

logger = logging.getLogger(__name__)

# seconds between checks of the stop flags while a thread waits on a queue
POLL_S = 0.1


@dataclass(frozen=True)
class CaseOutcome:
    """What happened to one case in a run. ``seconds``: the sum of its stage times (cases overlap in time).

    ``stage`` of a failure: ``input``, ``read``, ``preprocess``, ``infer`` or ``write``.
    """

    case: str
    input: str
    status: Literal["ok", "failed", "skipped"]
    seconds: float = 0.0
    stage: str | None = None
    error_type: str | None = None
    message: str | None = None
    flagged: bool = False


def _one_line(error: BaseException, limit: int = 300) -> str:
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    text = " ".join(lines) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def failure(case: str, path: str, stage: str, error: BaseException) -> CaseOutcome:
    """A failed outcome; unexpected exception types are named in the message, their traceback is logged (debug)."""
    if isinstance(error, ConfKDError):
        message = _one_line(error)
    else:
        message = f"{type(error).__name__}: {_one_line(error)}"
        logger.debug("case %s failed at %s", case, stage, exc_info=error)
    return CaseOutcome(case, path, "failed", stage=stage, error_type=type(error).__name__, message=message)


@dataclass
class _Prepared:
    case: CaseInput
    volume: Volume
    prepared: Any  # engine.PreparedVolume; dropped once inferred
    timings: dict[str, float]


@dataclass
class _Inferred:
    case: CaseInput
    volume: Volume
    labels: np.ndarray
    confidence: np.ndarray
    timings: dict[str, float]


_DONE = object()


class Batch:
    """One run's work: the cases, the queues, the flags, and what each thread does."""

    def __init__(
        self,
        cases: Sequence[CaseInput],
        out_dir: Path,
        model: LoadedModel,
        *,
        run_id: str,
        tta: bool,
        preview: bool,
        low_confidence: float,
        floor: float,
        prefetch: int,
        readers: int,
        writers: int,
        claim: Callable[[], int] | None = None,
        max_voxels: int | None = None,
    ) -> None:
        """``claim``: returns the index of the next case to take (past the end: none left); the default counts
        within this batch, :mod:`confkd.inference.multidevice` passes a counter shared by several processes.
        ``max_voxels``: the memory guard of the reader and of the network grid (``None``: no limit)."""
        from confkd.inference import engine  # lazy: torch

        self.engine = engine
        self.cases = list(cases)
        self.max_voxels = max_voxels
        self.out_dir = out_dir
        self.model = model
        self.run_id = run_id
        self.tta, self.preview = tta, preview
        self.low_confidence, self.floor = low_confidence, floor
        self.n_readers = max(1, min(readers, len(self.cases)))
        self.n_writers = writers
        self.read_q: queue.Queue[Any] = queue.Queue(maxsize=prefetch)
        self.write_q: queue.Queue[Any] = queue.Queue(maxsize=writers)
        self.done_q: queue.Queue[CaseOutcome] = queue.Queue()
        self.stop = threading.Event()
        self.abort = threading.Event()
        self.inferring = False  # read by the signal handler: only an inference is cut short by a second signal
        self._next = 0
        self._lock = threading.Lock()
        self._claim = claim if claim is not None else self._claim_next
        self.model_info = {
            "backend": str(getattr(model.runner, "name", "unknown")),
            "device": str(getattr(model.runner, "device", "unknown")),
            "hash": model.model_hash,
            "version": model.model_version,
            "source": display_path(model.source),
        }

    def put(self, q: queue.Queue[Any], item: Any, until: threading.Event) -> bool:
        """Put ``item`` on a bounded queue unless ``until`` is set first."""
        while not until.is_set():
            try:
                q.put(item, timeout=POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def _claim_next(self) -> int:
        self._next += 1
        return self._next - 1

    def _take(self) -> CaseInput | None:
        with self._lock:
            if self.stop.is_set():
                return None
            index = self._claim()
            return self.cases[index] if index < len(self.cases) else None

    def run(self, record: Callable[[Sequence[CaseOutcome]], None]) -> None:
        """Process the batch in this process: :func:`drive`."""
        drive(self, record)

    def reader(self) -> None:
        from confkd.data.volume import read_volume

        try:
            while (case := self._take()) is not None:
                stage = "read"
                try:
                    t0 = time.perf_counter()
                    volume = read_volume(case.path, max_voxels=self.max_voxels)
                    t1 = time.perf_counter()
                    stage = "preprocess"
                    # a 4D volume frame by frame
                    prepared = self.engine.prepare(volume, self.model, max_voxels=self.max_voxels)
                    t2 = time.perf_counter()
                except Exception as e:
                    self.done_q.put(failure(case.case, display_path(case.path), stage, e))
                    continue
                item = _Prepared(case, volume, prepared, {"read": t1 - t0, "preprocess": t2 - t1})
                if not self.put(self.read_q, item, self.stop):
                    return
        finally:
            self.put(self.read_q, _DONE, self.abort)

    def infer(self, item: _Prepared) -> _Inferred:
        result = self.engine.infer(item.prepared, self.model, tta=self.tta)
        item.prepared = None  # free the network input before the next case is taken
        timings = {**item.timings, "infer": 0.0, "postprocess": 0.0}
        timings.update({k: float(v) for k, v in result.timings.items() if k in ("infer", "postprocess")})
        return _Inferred(item.case, item.volume, result.labels, result.confidence, timings)

    def writer(self) -> None:
        while True:
            try:
                item = self.write_q.get(timeout=POLL_S)
            except queue.Empty:
                continue
            if item is _DONE:
                return
            try:
                self.done_q.put(self.write(item))
            except Exception as e:
                self.done_q.put(failure(item.case.case, display_path(item.case.path), "write", e))

    def write(self, item: _Inferred) -> CaseOutcome:
        t0 = time.perf_counter()
        images = write_case_images(
            self.out_dir, item.case, item.volume, item.labels, item.confidence, preview=self.preview, tag=self.run_id
        )
        item.timings["write"] = time.perf_counter() - t0
        item.timings["total"] = sum(item.timings.values())
        report = build_report(
            case=item.case.case,
            input_path=display_path(item.case.path),
            shape=item.volume.shape,
            affine=item.volume.affine,
            image_format=item.volume.format,
            labels=item.labels,
            confidence=item.confidence,
            label_names=self.model.label_names,
            low_confidence=self.low_confidence,
            timings=item.timings,
            model=self.model_info,
            outputs=images,
            run_id=self.run_id,
            tta=self.tta,
            floor=self.floor,
        )
        write_case_report(self.out_dir, item.case, report, images)  # last: the case is complete
        return CaseOutcome(
            item.case.case,
            display_path(item.case.path),
            "ok",
            seconds=item.timings["total"],
            flagged=bool(report["flagged"]),
        )


def drive(batch: Batch, record: Callable[[Sequence[CaseOutcome]], None]) -> None:
    """Start the threads, infer in this thread, then shut down in order: readers, then writers (joined).

    A KeyboardInterrupt raised during an inference (the second signal) ends the loop; the shutdown still runs.
    """
    readers = [threading.Thread(target=batch.reader, name=f"read-{i}", daemon=True) for i in range(batch.n_readers)]
    writers = [threading.Thread(target=batch.writer, name=f"write-{i}", daemon=True) for i in range(batch.n_writers)]
    for t in (*readers, *writers):
        t.start()

    def drain() -> None:
        outcomes = []
        with contextlib.suppress(queue.Empty):
            while True:
                outcomes.append(batch.done_q.get_nowait())
        if outcomes:
            record(outcomes)

    try:
        finished = 0
        while finished < len(readers) and not batch.stop.is_set():
            drain()
            try:
                item = batch.read_q.get(timeout=POLL_S)
            except queue.Empty:
                continue
            if item is _DONE:
                finished += 1
                continue
            batch.inferring = True
            try:
                inferred = batch.infer(item)
            except Exception as e:
                batch.done_q.put(failure(item.case.case, display_path(item.case.path), "infer", e))
                continue
            finally:
                batch.inferring = False
            del item
            batch.put(batch.write_q, inferred, batch.abort)
            del inferred
    finally:
        batch.stop.set()  # readers take no new case
        while any(t.is_alive() for t in readers):  # unblock readers waiting on a full queue; their work is dropped
            with contextlib.suppress(queue.Empty):
                batch.read_q.get(timeout=POLL_S)
        for _ in writers:
            batch.put(batch.write_q, _DONE, threading.Event())
        for t in writers:
            t.join()
        drain()
