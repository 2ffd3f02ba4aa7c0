"""The run directory: what may be written where, and the files a run keeps up to date.

=======================  ===================================================================================
``config.yaml``          the *resolved* config (target spacing and patch size filled in): reproduces the run
``manifest.json``        which case had which supervision (written once; a resumed run keeps the first one)
``metrics.jsonl``        one JSON object per logged step and per validation (:class:`RunRecords`)
``checkpoint_last.pt``   everything needed to resume exactly; ``checkpoint_best.pt``: best student mean Dice
``train.log``            the ``confkd`` loggers' records (:class:`RunLog`)
``tb/``                  TensorBoard scalars, when tensorboard is installed (:class:`RunRecords`)
=======================  ===================================================================================

Only rank 0 of a distributed run writes here.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import math
import time
from pathlib import Path
from typing import Any

from confkd.config import Config, save_config
from confkd.data.manifest import Manifest
from confkd.errors import RunDirectoryError
from confkd.io_utils import atomic_write_text

__all__ = [
    "BEST_CHECKPOINT",
    "LAST_CHECKPOINT",
    "MetricsLog",
    "RunDirectoryError",
    "RunLog",
    "RunRecords",
    "check_run_dir",
    "open_tensorboard",
    "write_run_files",
]

logger = logging.getLogger(__name__)

LAST_CHECKPOINT = "checkpoint_last.pt"
BEST_CHECKPOINT = "checkpoint_best.pt"
#: the longest metrics.jsonl lags behind the run in memory (validations flush at once)
_FLUSH_SECONDS = 15.0
BRANCHES = ("student", "teacher")


def check_run_dir(run_dir: Path, resume: bool) -> str | None:
    """The problem with ``run_dir`` for this request (the message of a :class:`RunDirectoryError`), or None."""
    if run_dir.exists() and not run_dir.is_dir():
        return f"{run_dir}: exists and is not a directory; choose another --out"
    last = run_dir / LAST_CHECKPOINT
    if resume and not last.is_file():
        return f"{run_dir}: nothing to resume ({last.name} not found); start without --resume"
    if not resume and run_dir.is_dir() and any(run_dir.iterdir()):
        return f"{run_dir}: not empty; choose a new --out directory, or pass --resume to continue the run in it"
    return None


def write_run_files(run_dir: Path, config: Config, manifest: Manifest, *, resumed: bool) -> None:
    """``config.yaml`` (the resolved config) and, for a new run, ``manifest.json``."""
    save_config(config, run_dir / "config.yaml")
    if not resumed:
        manifest.save(run_dir / "manifest.json")


class RunLog:
    """Routes the ``confkd`` loggers' records (INFO and up) to ``train.log`` for the duration of a run.

    :meth:`start` holds the records in memory; :meth:`to_file` writes them and everything after to the file. The
    records wait until the inputs are checked and the data loaded, so a run that fails that early leaves no file
    behind (its directory would otherwise no longer be empty for the next attempt). ``enabled`` False (ranks other
    than 0): nothing is routed anywhere. :meth:`close` restores the logger as it was.
    """

    def __init__(self, *, enabled: bool) -> None:
        self._logger = logging.getLogger("confkd")
        self._old_level = self._logger.level
        self._enabled = enabled
        self._early = logging.handlers.MemoryHandler(capacity=100_000, flushLevel=logging.CRITICAL + 1)
        self._handlers: list[logging.Handler] = []

    def start(self) -> None:
        if not self._enabled:
            return
        self._logger.addHandler(self._early)
        self._handlers.append(self._early)
        if self._logger.getEffectiveLevel() > logging.INFO:
            self._logger.setLevel(logging.INFO)

    def to_file(self, path: Path) -> None:
        if not self._enabled:
            return
        # the log is the run's one append-only stream (an atomic rewrite per line would make no sense)
        file_handler = logging.FileHandler(path, encoding="utf-8")
        file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        self._early.setTarget(file_handler)
        self._early.flush()
        self._logger.removeHandler(self._early)
        self._logger.addHandler(file_handler)
        self._handlers.append(file_handler)

    def close(self) -> None:
        for handler in self._handlers:
            self._logger.removeHandler(handler)
            handler.close()
        self._handlers = []
        self._logger.setLevel(self._old_level)


class MetricsLog:
    """``metrics.jsonl``, rewritten atomically (every few seconds and at validations) from the records in memory.

    ``keep_until``: a resumed run's step; the records after it (written after that checkpoint) are dropped.
    Non-finite numbers are written as null, so that every line is strict JSON.
    """

    def __init__(self, path: Path, keep_until: int | None) -> None:
        self.path = path
        self.records: list[dict[str, Any]] = []
        if keep_until is not None and path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                if line.strip() and json.loads(line).get("step", 0) <= keep_until:
                    self.records.append(json.loads(line))
        self._last_flush = time.monotonic()

    def append(self, record: dict[str, Any], *, flush: bool = False) -> None:
        self.records.append(_json_safe(record))
        if flush or time.monotonic() - self._last_flush > _FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        atomic_write_text(self.path, "".join(json.dumps(r, allow_nan=False) + "\n" for r in self.records))
        self._last_flush = time.monotonic()


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    return obj


def open_tensorboard(run_dir: Path) -> Any:
    """A ``SummaryWriter`` on ``run_dir/tb``, or None when tensorboard cannot be used."""
    try:
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(str(run_dir / "tb"))
    except Exception as e:  # tensorboard is optional: missing, or broken by its own dependencies
        logger.debug("no tensorboard logging (%s)", e)
        return None


class RunRecords:
    """Rank 0's records of a run's progress: ``metrics.jsonl`` (:class:`MetricsLog`) and TensorBoard scalars.

    ``resumed_at``: the step a resumed run continues from (later records of the interrupted run are dropped).
    Call :meth:`close` at the end, also when interrupted: the records up to there stay readable.
    """

    def __init__(self, run_dir: Path, *, resumed_at: int | None) -> None:
        self.metrics = MetricsLog(run_dir / "metrics.jsonl", resumed_at)
        self.tb = open_tensorboard(run_dir)

    def train_step(
        self, step: int, *, epoch: float, lr: float, losses: dict[str, float], images_per_s: float, world_size: int
    ) -> None:
        """A ``"kind": "train"`` record: the mean loss terms since the previous one, and the throughput."""
        record = {
            "kind": "train",
            "step": step,
            "epoch": epoch,
            "lr": lr,
            "losses": losses,
            "images_per_s": images_per_s,
            "world_size": world_size,
        }
        self.metrics.append(record)
        if self.tb is not None:
            for key, value in losses.items():
                self.tb.add_scalar(f"loss/{key}", value, step)
            self.tb.add_scalar("lr", lr, step)
            self.tb.add_scalar("images_per_s", images_per_s, step)

    def validation(self, step: int, *, epoch: float, metrics: dict[str, Any], best: bool) -> None:
        """A ``"kind": "val"`` record, written at once (``metrics``: :func:`~confkd.training.validation.validate`'s)."""
        self.metrics.append({"kind": "val", "step": step, "epoch": epoch, **metrics, "best": best}, flush=True)
        if self.tb is not None:
            for branch in BRANCHES:
                for key in ("mean_dice", "mean_hd95"):
                    if metrics[branch][key] is not None:
                        self.tb.add_scalar(f"val/{branch}_{key}", metrics[branch][key], step)

    def flush(self) -> None:
        self.metrics.flush()

    def close(self) -> None:
        self.metrics.flush()
        if self.tb is not None:
            self.tb.close()
