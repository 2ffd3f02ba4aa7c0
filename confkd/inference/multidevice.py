"""Several devices in one machine: one worker process per device over a shared queue of cases.

:class:`DevicePool` starts one process per device (``multiprocessing``'s *spawn* context: no CUDA state is
inherited), and each loads the model on its device. ``run_batch(inputs, out_dir, pool)`` then works exactly as
with one loaded model, except that each process runs the whole per-case pipeline of
:mod:`confkd.inference.workers` (read, preprocess, infer, write the images and the report) and takes its next case
from a counter shared by all of them, so a fast device takes more cases. The parent process does what
``run_batch`` does for one device: it skips complete cases, records input problems, receives every outcome,
appends ``failures.jsonl``, drives the progress display, and at the end recomputes the flags and writes
``summary.csv`` once. The outputs are those of a single-process run.

* A failing case fails that case only (as in one process); the worker goes on.
* A worker that dies (killed, out of memory): the cases it held are recorded as failed (``WorkerDied``); the others
  take the rest of the batch. When every worker is gone the untaken cases are recorded as failed too.
* SIGINT / SIGTERM go to ``run_batch`` in the parent, which tells the workers through two shared events: the first
  signal stops taking cases (in-flight cases are finished and written), the second cuts the inferences in progress
  short. The workers ignore SIGINT (a terminal's Ctrl-C reaches the whole process group: the parent decides); a
  SIGTERM sent to a worker itself stops it as it would stop the parent; workers whose parent died stop too. As in
  one process, every file is written atomically: no partial file is left.
* A pool runs one batch; its workers exit after it (``close`` ends them early; the pool is a context manager).

Devices are named as for ``--device``: ``cuda:N`` (or just ``N``) and ``cpu`` (several ``cpu`` entries run
several CPU workers, for testing).
"""

from __future__ import annotations

import _thread
import contextlib
import logging
import multiprocessing as mp
import os
import queue
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from confkd.errors import ConfigError, ConfKDError
from confkd.inference.inputs import CaseInput, display_path
from confkd.inference.workers import POLL_S, Batch, CaseOutcome, drive

if TYPE_CHECKING:
    from confkd.inference.model import LoadedModel

__all__ = ["DeviceBatch", "DevicePool", "Loader", "WorkerError", "parse_devices"]

logger = logging.getLogger(__name__)

#: ``loader(device)`` -> the model on that device; called in each worker, so it must pickle (a module-level
#: function or a ``functools.partial`` of one)
Loader = Callable[[str], "LoadedModel"]
# seconds a worker gets to finish after the batch (or after close) before it is terminated
JOIN_S = 30.0


class WorkerError(ConfKDError, RuntimeError):
    """A worker process could not start (its model did not load on its device) or died before it was ready."""


def parse_devices(text: str) -> tuple[str, ...]:
    """``"0,1"`` -> ``("cuda:0", "cuda:1")``; entries ``N``, ``cuda:N``, ``cuda`` or ``cpu``, checked.

    Raises:
        ConfigError: an empty list or entry, or an unknown name. DeviceError: a GPU torch does not see.
    """
    from confkd.training.distributed import resolve_device

    entries = [e.strip().lower() for e in text.split(",")]
    if not text.strip() or any(not e for e in entries):
        raise ConfigError(
            f"--devices {text!r}: expected a comma-separated list such as 0,1 or cuda:0,cuda:1 or cpu,cpu"
        )
    if "auto" in entries:
        raise ConfigError(f"--devices {text!r}: name each device (0,1 or cuda:0,cuda:1 or cpu); auto is not one")
    return tuple(str(resolve_device(f"cuda:{e}" if e.isdigit() else e)) for e in entries)


# ---------------------------------------------------------------------------------------------- the worker


def _worker_main(
    index: int,
    device: str,
    loader: Loader,
    jobs: Any,
    results: Any,
    counter: Any,
    stop: Any,
    abort: Any,
    threads: int,
    log_level: int,
) -> None:
    """A worker process: load the model, say ready, run the batch it is sent, report outcomes, say done.

    Signals: SIGINT is ignored (inherited from the start; a terminal's Ctrl-C reaches the whole process group and
    the parent coordinates the shutdown). SIGTERM kills an idle worker (it holds nothing); during the batch it acts
    as on the parent: the first stops taking cases, the second cuts the inference short.
    """
    logging.basicConfig(level=log_level, format=f"%(levelname)s %(name)s [{device}]: %(message)s")
    try:
        import torch

        torch.set_num_threads(threads)
        if device.startswith("cuda"):
            torch.cuda.set_device(torch.device(device))
        model = loader(device)
    except BaseException as e:  # the parent turns this into one WorkerError line
        message = str(e) if isinstance(e, ConfKDError) else f"{type(e).__name__}: {e}"
        results.put(("error", index, message))
        return
    results.put(("ready", index, None))
    parent = mp.parent_process()
    while True:
        try:
            job = jobs.get(timeout=POLL_S)
            break
        except queue.Empty:
            if parent is not None and not parent.is_alive():  # orphaned before any work
                return
    if job is None:
        return
    cases, out_dir, options = job

    def claim() -> int:
        with counter.get_lock():
            taken = int(counter.value)
            counter.value = taken + 1
        if taken < len(cases):
            results.put(("take", index, taken))
        return taken

    batch = Batch(cases, out_dir, model, claim=claim, **options)
    finished = threading.Event()

    def on_sigint(signum: int, frame: FrameType | None) -> None:
        # raised only through _thread.interrupt_main below: the parent's second signal cuts the inference short
        if batch.abort.is_set() and batch.inferring:
            raise KeyboardInterrupt

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        if not batch.stop.is_set():
            batch.stop.set()
            return
        batch.abort.set()
        if batch.inferring:
            raise KeyboardInterrupt

    def watch() -> None:
        while not finished.wait(POLL_S):
            orphaned = parent is not None and not parent.is_alive()
            if stop.is_set() or orphaned:
                batch.stop.set()
            if abort.is_set() or orphaned:
                batch.abort.set()
                if batch.inferring:
                    _thread.interrupt_main()
                return

    signal.signal(signal.SIGINT, on_sigint)
    signal.signal(signal.SIGTERM, on_sigterm)
    watcher = threading.Thread(target=watch, name="watch", daemon=True)
    watcher.start()
    try:
        drive(batch, lambda outcomes: results.put(("outcomes", index, list(outcomes))))
    except KeyboardInterrupt:
        pass  # the inference in progress was abandoned; drive wrote every result inferred before
    finally:
        finished.set()
        results.put(("done", index, None))


# ---------------------------------------------------------------------------------------------- the parent


@contextlib.contextmanager
def _sigint_ignored() -> Iterator[None]:
    """Children started here inherit an ignored SIGINT (main thread only: signals are set there)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


class DevicePool:
    """One worker process per device, each with the model loaded; pass it to ``run_batch`` as the model.

    Construction starts the workers and waits until every one has loaded its model.

    Raises:
        WorkerError: a worker's model did not load on its device (the message names the device and the error);
            the other workers are ended.
    """

    def __init__(self, loader: Loader, devices: Sequence[str]) -> None:
        if not devices:
            raise ConfigError("a device pool needs at least one device")
        self.devices = tuple(devices)
        ctx = mp.get_context("spawn")
        self._results: Any = ctx.Queue()
        self._jobs: list[Any] = [ctx.Queue() for _ in self.devices]
        self._counter: Any = ctx.Value("q", 0)
        self._stop: Any = ctx.Event()
        self._abort: Any = ctx.Event()
        self._used = False
        threads = max(1, (os.cpu_count() or 1) // len(self.devices))
        level = logging.getLogger().getEffectiveLevel()
        self._procs = [
            ctx.Process(
                target=_worker_main,
                args=(
                    i,
                    dev,
                    loader,
                    self._jobs[i],
                    self._results,
                    self._counter,
                    self._stop,
                    self._abort,
                    threads,
                    level,
                ),
                name=f"confkd-segment-{i}-{dev}",
                daemon=True,
            )
            for i, dev in enumerate(self.devices)
        ]
        try:
            with _sigint_ignored():
                for proc in self._procs:
                    proc.start()
            self._wait_ready()
        except BaseException:
            self.close(timeout=0.0)
            raise
        logger.info("%d worker process(es) ready on %s", len(self.devices), ", ".join(self.devices))

    def _wait_ready(self) -> None:
        ready: set[int] = set()
        while len(ready) < len(self._procs):
            try:
                kind, index, message = self._results.get(timeout=POLL_S)
            except queue.Empty:
                for i, proc in enumerate(self._procs):
                    if i not in ready and not proc.is_alive():
                        raise WorkerError(
                            f"the worker process for device {self.devices[i]} exited (code {proc.exitcode}) before "
                            "its model was loaded"
                        ) from None
                continue
            if kind == "error":
                raise WorkerError(f"device {self.devices[index]}: {message}")
            ready.add(index)

    def batch(self, cases: Sequence[CaseInput], out_dir: Path, **options: Any) -> DeviceBatch:
        """The work of one ``run_batch``: ``options`` are the keyword arguments of :class:`Batch` but the model."""
        if self._used:
            raise RuntimeError("a DevicePool runs one batch; start another pool for the next one")
        self._used = True
        return DeviceBatch(self, list(cases), out_dir, options)

    def close(self, timeout: float = JOIN_S) -> None:
        """End the workers: idle ones at once, busy ones after ``timeout`` seconds (then terminated)."""
        for jobs, proc in zip(self._jobs, self._procs, strict=True):
            if proc.is_alive() and not self._used:
                with contextlib.suppress(OSError, ValueError):
                    jobs.put(None)
        deadline = time.monotonic() + timeout
        for proc in self._procs:
            if proc.pid is None:  # never started
                continue
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                proc.terminate()  # idle: it exits; busy: it stops taking cases
                proc.join(5.0)
            if proc.is_alive():
                proc.kill()
                proc.join()
        self._used = True

    def __enter__(self) -> DevicePool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class DeviceBatch:
    """What ``run_batch`` drives for a :class:`DevicePool`: the same ``stop`` / ``abort`` events as a
    :class:`~confkd.inference.workers.Batch`, forwarded to the workers; ``inferring`` is always false (the parent
    never infers, so a second signal never raises here)."""

    inferring = False

    def __init__(self, pool: DevicePool, cases: list[CaseInput], out_dir: Path, options: dict[str, Any]) -> None:
        self.pool = pool
        self.cases = cases
        self.out_dir = out_dir
        self.options = options
        self.stop = threading.Event()
        self.abort = threading.Event()

    def run(self, record: Callable[[Sequence[CaseOutcome]], None]) -> None:
        """Send the batch to every worker; record outcomes as they come until every worker is done or gone."""
        pool = self.pool
        with pool._counter.get_lock():
            pool._counter.value = 0
        for jobs in pool._jobs:
            jobs.put((self.cases, self.out_dir, self.options))
        held: list[dict[str, CaseInput]] = [{} for _ in pool._procs]  # cases taken and not yet reported
        running = set(range(len(pool._procs)))
        try:
            while running:
                if self.stop.is_set():
                    pool._stop.set()
                if self.abort.is_set():
                    pool._abort.set()
                try:
                    message = pool._results.get(timeout=POLL_S)
                except queue.Empty:
                    for index in [i for i in running if not pool._procs[i].is_alive()]:
                        self._drain(held, running, record, wait=0.5)  # its last messages may still be in flight
                        if index in running:
                            running.discard(index)
                            record(self._lost(index, held[index]))
                    continue
                self._handle(message, held, running, record)
            if not self.stop.is_set():
                self._record_untaken(record)
        finally:
            pool._stop.set()
            if self.abort.is_set() or running:
                pool._abort.set()
            pool.close()

    def _handle(
        self,
        message: tuple[str, int, Any],
        held: list[dict[str, CaseInput]],
        running: set[int],
        record: Callable[[Sequence[CaseOutcome]], None],
    ) -> None:
        kind, index, payload = message
        if kind == "take":
            case = self.cases[payload]
            held[index][case.case] = case
        elif kind == "outcomes":
            for outcome in payload:
                held[index].pop(outcome.case, None)
            record(payload)
        elif kind == "done":
            running.discard(index)

    def _drain(
        self,
        held: list[dict[str, CaseInput]],
        running: set[int],
        record: Callable[[Sequence[CaseOutcome]], None],
        wait: float,
    ) -> None:
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                message = self.pool._results.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                return
            self._handle(message, held, running, record)

    def _lost(self, index: int, held: dict[str, CaseInput]) -> list[CaseOutcome]:
        proc = self.pool._procs[index]
        device = self.pool.devices[index]
        logger.warning("the worker process on %s died (exit code %s)", device, proc.exitcode)
        message = (
            f"the worker process on {device} died (exit code {proc.exitcode}) while it held this case; run the "
            "same command again to redo it"
        )
        return [
            CaseOutcome(c.case, display_path(c.path), "failed", stage="infer", error_type="WorkerDied", message=message)
            for c in held.values()
        ]

    def _record_untaken(self, record: Callable[[Sequence[CaseOutcome]], None]) -> None:
        """Every worker is gone but the counter did not reach the end: no one will take the rest."""
        taken = int(self.pool._counter.value)
        rest = self.cases[taken:]
        if rest:
            message = "not processed: every worker process died; run the same command again"
            record(
                [
                    CaseOutcome(
                        c.case, display_path(c.path), "failed", stage="infer", error_type="WorkerDied", message=message
                    )
                    for c in rest
                ]
            )
