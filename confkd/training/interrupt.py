"""Stopping a training run cleanly on SIGINT / SIGTERM (see :mod:`confkd.training.trainer` for the protocol).

:class:`StopFlag` turns the first signal into a flag the loop polls at step boundaries; :class:`TrainingInterrupted`
is what :func:`~confkd.training.trainer.train` raises after it has written ``checkpoint_last.pt``.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

__all__ = ["StopFlag", "TrainingInterrupted"]

logger = logging.getLogger("confkd.training.trainer")


class TrainingInterrupted(KeyboardInterrupt):  # a KeyboardInterrupt: callers that catch that keep working
    """SIGINT / SIGTERM stopped the run at ``step``; ``checkpoint`` (``checkpoint_last.pt``) resumes it exactly."""

    def __init__(self, step: int, checkpoint: Path, signal_name: str) -> None:
        super().__init__(f"training interrupted by {signal_name} at step {step}")
        self.step, self.checkpoint, self.signal_name = step, checkpoint, signal_name


class StopFlag:
    """Set by the first SIGINT / SIGTERM while :meth:`installed`; see the module docstring for repeated signals."""

    def __init__(self, *, repeats_abort: bool) -> None:
        self.signal_name: str | None = None
        self._repeats_abort = repeats_abort

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signal_name is None:
            self.signal_name = signal.Signals(signum).name
            logger.warning("%s: stopping at the next step boundary (checkpoint_last.pt is written)", self.signal_name)
        elif self._repeats_abort:
            raise KeyboardInterrupt

    @contextmanager
    def installed(self) -> Iterator[StopFlag]:
        """Route SIGINT and SIGTERM here (main thread only; ignored signals stay ignored), then restore them."""
        wanted = [signal.SIGINT, *([signal.SIGTERM] if hasattr(signal, "SIGTERM") else [])]
        previous = {}
        if threading.current_thread() is threading.main_thread():
            previous = {sig: signal.getsignal(sig) for sig in wanted}
            previous = {sig: old for sig, old in previous.items() if old is not signal.SIG_IGN}
        for sig in previous:
            signal.signal(sig, self._handle)
        try:
            yield self
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old if old is not None else signal.SIG_DFL)
