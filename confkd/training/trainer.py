"""The training loop: :func:`train` turns a dataset and a :class:`~confkd.config.Config` into a run directory.

The run directory's files are described in :mod:`confkd.training.run_dir`, the checks a config passes before
anything is written (dataset, machine, the run being resumed) in :mod:`confkd.training.run_config`, the
optimiser, schedule and budget in :mod:`confkd.training.optimization`, and the student / teacher validation in
:mod:`confkd.training.validation`; this module is the loop that ties them.

One step: draw a mixed batch on the host (:class:`~confkd.training.data.MixedBatchSampler`), copy it to the
device (pinned memory, non-blocking), augment it there, forward under autocast, the ConfKD objective in float32,
backward through a GradScaler (a no-op unless fp16), optimiser and per-step LR schedule. Every ``train.log_every``
steps the mean loss terms are logged (a host-device sync point); every ``train.val_every`` steps and at the end
rank 0 validates and writes ``checkpoint_last.pt`` (and ``checkpoint_best.pt`` on a new best student mean Dice).

Exact resume: every source of randomness is a generator whose state is checkpointed (the sampler's and the
augmentation's generators, torch / NumPy / Python global states, per rank), and so are the model, optimiser,
scheduler, grad scaler, step and best metric; on the CPU a resumed run reproduces the uninterrupted one bit for bit.

Interruption: SIGINT / SIGTERM set a flag; the loop stops at the next step boundary, writes ``checkpoint_last.pt``
(the full resume state, without validating: a validation that was due runs first thing after ``--resume``) and
raises :class:`TrainingInterrupted`, a ``KeyboardInterrupt`` (the CLI exits 130). The loss terms accumulated since
the last log line are part of the resume state, so the logged trajectory of an interrupted and resumed run is that
of an uninterrupted one. Under ``torchrun`` the ranks must stop at the same step: the flag is summed across ranks
with the loss means, so it is only looked at every ``train.log_every`` steps, and every rank stops there when any
rank was signalled. A second signal abandons the step in progress (one process; the last checkpoint stays) or is
ignored (several: the launcher forwards the terminal's signal, so each rank sees two; its kill timeout is the hard
stop). A signal the process was told to ignore (``nohup``) stays ignored.

Distributed (``torchrun``): one process per device, DDP with ``find_unused_parameters=False`` (the decoder
branches the objective cannot reach are frozen instead, see :mod:`confkd.training.optimization`);
``train.sync_batchnorm`` turns BatchNorm into SyncBatchNorm (CUDA only). Each rank draws its own items (generator
seeded with the rank); only rank 0 writes files and validates while the others wait at a barrier.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import os
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor, nn

from confkd.config import Config
from confkd.data.dataset import NnUNetDataset
from confkd.data.manifest import Manifest, build_manifest_from_config
from confkd.errors import DeviceError, RunDirectoryError
from confkd.training import distributed as ddp
from confkd.training.augment import augment_batch
from confkd.training.checkpoint import (
    load_checkpoint,
    make_checkpoint,
    rank_state,
    restore_train_state,
    save_checkpoint,
    train_state,
    unwrap_model,
)
from confkd.training.data import MixedBatchSampler, TrainingSet, sampler_seed
from confkd.training.distributed import resolve_amp, resolve_device
from confkd.training.interrupt import StopFlag, TrainingInterrupted
from confkd.training.losses import confkd_objective
from confkd.training.network import create_model
from confkd.training.optimization import build_optimizer, freeze_unreachable_branches, lr_factor, total_steps
from confkd.training.run_config import (
    RESUMABLE_CHANGES,
    check_config,
    config_differences,
    resolve_config,
    resumed_config,
)
from confkd.training.run_dir import BEST_CHECKPOINT, LAST_CHECKPOINT, RunLog, RunRecords, check_run_dir, write_run_files
from confkd.training.validation import format_validation, read_validation_cases, validate

__all__ = [
    "RESUMABLE_CHANGES",
    "DeviceError",
    "RunDirectoryError",
    "TrainCallback",
    "TrainResult",
    "TrainingInterrupted",
    "config_differences",
    "lr_factor",
    "resolve_amp",
    "resolve_device",
    "total_steps",
    "train",
]

logger = logging.getLogger(__name__)


class TrainCallback(Protocol):
    """Progress hooks; the CLI implements them with a progress bar. Called on rank 0 only."""

    def on_step(self, step: int, total_steps: int, terms: dict[str, float], images_per_s: float) -> None:
        """Called every ``train.log_every`` steps and at the last one with the mean loss terms since the last call."""

    def on_validation(self, step: int, metrics: dict[str, Any]) -> None:
        """Called after each validation with ``{"student": {...}, "teacher": {...}}`` (see :func:`train`)."""


@dataclass(frozen=True)
class TrainResult:
    """What a finished run produced. ``best_metric``: best student mean validation Dice (None: no validation)."""

    run_dir: Path
    best_checkpoint: Path
    last_checkpoint: Path
    best_metric: float | None
    steps: int
    images_per_s: float


def _log_state(sums: Mapping[str, Tensor], count: int) -> dict[str, Any]:
    """The loss sums of the steps since the last log line, for a checkpoint (on the CPU: another rank unpickles it).

    Resuming adds the next steps to exactly these float32 sums, so the next logged means are bit for bit those of an
    uninterrupted run.
    """
    return {"sums": {k: v.detach().cpu() for k, v in sums.items()}, "count": count}


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 (seed the legacy global state third-party code uses)
    torch.manual_seed(seed)


# -------------------------------------------------------------------------------------------------- train
def train(
    dataset_dir: str | Path,
    config: Config,
    run_dir: str | Path,
    *,
    device: str = "auto",
    resume: bool = False,
    callback: TrainCallback | None = None,
    log_every: int | None = None,
) -> TrainResult:
    """Train ``config``'s model on ``dataset_dir`` into ``run_dir`` (see the module docstring).

    Args:
        dataset_dir: an nnU-Net v2 raw dataset (``splits.json`` for validation; ``scribblesTr/`` for scribbles).
        config: the requested config; ``preprocess.target_spacing`` and ``train.patch_size`` may be null.
        run_dir: created if missing; must be empty unless ``resume``.
        device: ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        resume: continue from ``run_dir/checkpoint_last.pt``; the config must equal the saved one except for
            ``train.iterations`` / ``train.epochs`` / ``train.log_every`` / ``train.val_every`` (null target spacing
            / patch size take the saved values).
        callback: progress hooks (rank 0).
        log_every: when given, replaces ``train.log_every`` (and is saved as such in the resolved config).

    Validation records in ``metrics.jsonl`` look like ``{"kind": "val", "step": ..., "epoch": ..., "student":
    {"dice": {"RV": ...}, "hd95": {...}, "mean_dice": ..., "mean_hd95": ...}, "teacher": {...}, "best": ...}``;
    undefined values (HD95 with an empty mask) are null.

    Raises:
        ConfigError, DatasetError, DeviceError, RunDirectoryError, CheckpointError: bad input; nothing is
        written before the inputs are checked.
        TrainingInterrupted: SIGINT / SIGTERM during the loop; ``checkpoint_last.pt`` holds the step it stopped at.
    """
    if log_every is not None:
        config = dataclasses.replace(config, train=dataclasses.replace(config.train, log_every=log_every))
    dev = ddp.resolve_process_device(device)
    info = ddp.init_distributed(dev)
    flags = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    cudnn = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    log = RunLog(enabled=info.is_main)
    failed = True
    try:
        run_dir = Path(run_dir)
        problem = ddp.broadcast_object(info, check_run_dir(run_dir, resume) if info.is_main else None)
        if problem:
            raise RunDirectoryError(problem)
        log.start()
        run = _Run(Path(dataset_dir), config, run_dir, dev, info, resume, callback)
        run.setup()
        if info.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            log.to_file(run_dir / "train.log")
        try:
            result = run.run()
        except TrainingInterrupted:
            failed = False  # every rank agreed to stop here: leave the process group in step
            raise
        failed = False
        return result
    finally:
        torch.use_deterministic_algorithms(flags[0], warn_only=flags[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn
        log.close()
        ddp.cleanup_distributed(info, failed=failed)


class _Run:
    """One training run's state; :meth:`run` is the whole of it."""

    def __init__(
        self,
        dataset_dir: Path,
        config: Config,
        run_dir: Path,
        device: torch.device,
        info: ddp.DistInfo,
        resume: bool,
        callback: TrainCallback | None,
    ) -> None:
        self.run_dir, self.device, self.info, self.callback = run_dir, device, info, callback
        self.last_path, self.best_path = run_dir / LAST_CHECKPOINT, run_dir / BEST_CHECKPOINT
        self.dataset = NnUNetDataset.open(dataset_dir)
        self.manifest: Manifest = build_manifest_from_config(self.dataset, config.data)
        self.resume_ckpt = load_checkpoint(self.last_path) if resume else None
        if self.resume_ckpt is not None:
            config = resumed_config(config, self.resume_ckpt, self.manifest, self.last_path)
        check_config(config, self.dataset, self.manifest, device, info.world_size)
        self.config = config

    # -- setup
    def setup(self) -> None:
        """Load the data, build the model and optimiser, restore a resumed state; writes nothing."""
        cfg, info, dev = self.config, self.info, self.device
        if cfg.train.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS determinism needs it
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
        else:
            torch.backends.cudnn.benchmark = True  # fixed patch size: the autotuner pays off
        _seed_everything(cfg.train.seed)
        self.data = TrainingSet.load(self.manifest, cfg.preprocess, threads=max(1, cfg.train.num_workers))
        self.config = cfg = resolve_config(cfg, self.data)
        patch = cfg.train.patch_size
        assert patch is not None  # resolve_config sets it
        self.sampler = MixedBatchSampler(
            self.data,
            cfg.train.strong_per_batch,
            cfg.train.weak_per_batch,
            patch,
            seed=cfg.train.seed,
            rank=info.rank,
            foreground_fraction=cfg.train.foreground_fraction,
            pin_memory=dev.type == "cuda",
        )
        self.global_batch = self.sampler.batch_size * info.world_size
        self.total = total_steps(cfg.train, self.data.num_items, self.global_batch)
        self.augment_generator = torch.Generator().manual_seed(sampler_seed(cfg.train.seed, info.rank, 1))
        split = cfg.data.val_split
        self.val_cases = read_validation_cases(self.manifest, split, cfg.preprocess) if info.is_main else []
        if info.is_main and not self.val_cases:
            logger.warning("no labelled case in split %r: checkpoint_best.pt will be the last model", split)

        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        model = create_model(cfg.model, cfg.preprocess.spatial_dims)
        frozen = freeze_unreachable_branches(model, cfg.loss)
        if frozen:
            logger.info("frozen (the objective never reaches them): %s decoder", ", ".join(frozen))
        self.channels_last = dev.type == "cuda" and cfg.train.channels_last
        fmt = torch.channels_last if cfg.preprocess.spatial_dims == 2 else torch.channels_last_3d
        model.to(dev)
        if self.channels_last:
            model.to(memory_format=fmt)  # type: ignore[call-overload]
        self.memory_format = fmt if self.channels_last else torch.contiguous_format
        self.optimizer = build_optimizer(model, cfg.train, dev)  # after freezing: frozen branches stay out
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_factor(cfg.train.schedule, self.total))
        self.amp = resolve_amp(cfg.train.amp, dev)
        self.scaler = torch.amp.GradScaler(dev.type, enabled=self.amp == torch.float16)
        self.step = 0
        self.best: float | None = None
        # the loss sums since the last log line and a validation skipped by an interruption (see _resume_log)
        self.resumed_log: Mapping[str, Any] | None = None
        self.validation_due = False
        torch.manual_seed(sampler_seed(cfg.train.seed, info.rank, 2))  # dropout: a different stream per rank
        if self.resume_ckpt is not None:
            model.load_state_dict(self.resume_ckpt["model"])
            self.step, self.best = restore_train_state(
                self.resume_ckpt["train"],
                optimizer=self.optimizer,
                scheduler=self.scheduler,
                scaler=self.scaler,
                sampler=self.sampler,
                augment_generator=self.augment_generator,
                rank=info.rank,
                world_size=info.world_size,
            )
            saved = self.resume_ckpt["train"]
            if len(saved["ranks"]) == info.world_size:  # else the random streams restart too (a warning said so)
                self.resumed_log = saved["ranks"][info.rank].get("log")
            self.validation_due = bool(saved.get("validation_due", False))
            logger.info("resumed from %s at step %d", self.last_path, self.step)
        self.ddp_model = ddp.wrap_model(model, info, dev, sync_batchnorm=cfg.train.sync_batchnorm)
        # the module validation and checkpoints use: ``model`` itself (its BatchNorm layers converted, if asked)
        self.model: nn.Module = unwrap_model(self.ddp_model)

    def _checkpoint(self, train_state: Mapping[str, Any] | None) -> dict[str, Any]:
        return make_checkpoint(
            self.model,
            self.config,
            label_names=self.dataset.label_names,
            ignore_index=self.manifest.ignore_index,
            dataset_name=self.dataset.name,
            dataset_fingerprint=self.manifest.fingerprint,
            strong_patients=self.manifest.strong_patients(),
            step=self.step,
            train_state=train_state,
        )

    # -- the loop
    def run(self) -> TrainResult:
        cfg, info = self.config, self.info
        resumed = self.resume_ckpt is not None
        self.records: RunRecords | None = None
        self._logged = False
        if info.is_main:
            write_run_files(self.run_dir, cfg, self.manifest, resumed=resumed)
            self.records = RunRecords(self.run_dir, resumed_at=self.step if resumed else None)
        self.resume_ckpt = None  # free the host copy of the weights
        logger.info(
            "training %s (%s) for %d steps from step %d: batch %d strong + %d weak per rank x %d rank(s), patch %s, "
            "device %s, amp %s",
            cfg.name,
            cfg.model.name,
            self.total,
            self.step,
            self.sampler.n_strong,
            self.sampler.n_weak,
            info.world_size,
            list(cfg.train.patch_size or ()),
            self.device,
            self.amp,
        )
        sums, count = self._resume_log()
        images, seconds, run_images, run_seconds = 0, 0.0, 0, 0.0
        stop = StopFlag(repeats_abort=not info.enabled)
        interrupted = False
        tic = time.perf_counter()
        try:
            if self.validation_due:  # the interrupted run stopped where a validation was due: it comes first
                self._validate_and_save(final=self.step >= self.total, log=_log_state(sums, count))
            with stop.installed():
                while self.step < self.total:
                    terms = self._step()
                    for key, value in terms.items():
                        sums[key] = sums[key] + value if key in sums else value.clone()
                    count += 1
                    images += self.global_batch
                    self.step += 1
                    last = self.step == self.total
                    stopping = False
                    if self.step % cfg.train.log_every == 0 or last:
                        keys = list(sums)  # the same terms, in the same order, on every rank
                        local = torch.stack([sums[k] for k in keys]).float() / count
                        if info.enabled:  # the stop flags travel with the means: any rank's signal stops all
                            local = torch.cat([local, local.new_tensor([float(stop.requested)])])
                        stacked = ddp.mean_across_ranks(info, local)
                        if info.enabled:
                            stopping, stacked = bool(stacked[-1] > 0), stacked[:-1]
                        means = dict(zip(keys, stacked.tolist(), strict=True))  # sync point
                        seconds = time.perf_counter() - tic
                        rate = images / seconds if seconds > 0 else 0.0
                        run_images, run_seconds = run_images + images, run_seconds + seconds
                        self._log_step(means, rate)
                        sums, count, images, tic = {}, 0, 0, time.perf_counter()
                    if not info.enabled:  # one process stops at any step boundary; ranks only where they meet, above
                        stopping = stop.requested
                    validate = self.step % cfg.train.val_every == 0 or last
                    if stopping and not last:  # the last step finishes the run anyway
                        self._save_last(log=_log_state(sums, count), validation_due=validate)
                        interrupted = True
                        break
                    if validate:
                        self._validate_and_save(final=last, log=_log_state(sums, count))
                        tic = time.perf_counter()  # validation is not training throughput
        finally:
            if self.records is not None:
                self.records.close()  # also when interrupted: the records up to here stay readable
        if interrupted:
            logger.warning("stopped at step %d by %s; %s resumes the run", self.step, stop.signal_name, self.last_path)
            raise TrainingInterrupted(self.step, self.last_path, stop.signal_name or "a signal to another rank")
        ddp.broadcast_buffers(info, self.model)
        # release DDP's reducer (it holds the process group and its threads) before the group is destroyed
        self.ddp_model = self.model
        gc.collect()  # DDP sits in reference cycles: collect it now, not at interpreter exit
        throughput = run_images / run_seconds if run_seconds > 0 else 0.0
        logger.info("done: %d steps, %.1f images/s, best student mean Dice %s", self.step, throughput, self.best)
        return TrainResult(self.run_dir, self.best_path, self.last_path, self.best, self.step, throughput)

    def _step(self) -> dict[str, Tensor]:
        cfg, dev = self.config, self.device
        batch = self.sampler.sample()
        image = batch.image.to(dev, non_blocking=True).float()
        label = batch.label.to(dev, non_blocking=True)
        is_strong = batch.is_strong.to(dev, non_blocking=True)
        ignore = self.manifest.ignore_index
        gen = self.augment_generator
        image, (label,) = augment_batch(image, [label], cfg.augment, generator=gen, fill_values=[ignore])
        image = image.contiguous(memory_format=self.memory_format)
        with torch.autocast(dev.type, dtype=self.amp or torch.float32, enabled=self.amp is not None):
            outputs = self.ddp_model(image)
        # one label map serves both: the objective reads dense labels on strong rows and sparse ones on weak rows
        objective = confkd_objective(outputs, is_strong, label, label, cfg.loss, ignore)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(objective.total).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return {"total": objective.total.detach(), **objective.terms}

    def _epoch(self) -> float:
        return self.step * self.global_batch / max(1, self.data.num_items)

    def _log_step(self, terms: dict[str, float], rate: float) -> None:
        if self.records is None:  # not rank 0
            return
        lr = self.optimizer.param_groups[0]["lr"]
        world = self.info.world_size
        first = not self._logged
        self._logged = True
        self.records.train_step(
            self.step, epoch=self._epoch(), lr=lr, losses=terms, images_per_s=rate, world_size=world
        )
        if first:  # at once: the run is visibly alive (metrics.jsonl is otherwise rewritten every few seconds)
            self.records.flush()
        text = " ".join(f"{k} {v:.4f}" for k, v in terms.items())
        logger.info("step %d/%d  %s  lr %.3g  %.1f img/s", self.step, self.total, text, lr, rate)
        if self.callback is not None:
            self.callback.on_step(self.step, self.total, terms, rate)

    def _resume_log(self) -> tuple[dict[str, Tensor], int]:
        """The loss sums and step count since the last log line, as the checkpoint resumed from left them."""
        log = self.resumed_log or {"sums": {}, "count": 0}
        return {k: v.to(self.device) for k, v in log["sums"].items()}, int(log["count"])

    def _rank_states(self, log: Mapping[str, Any]) -> list[dict[str, Any]]:
        """Every rank's random streams and pending loss sums, indexed by rank (collective: every rank calls it)."""
        return ddp.all_gather_objects(self.info, {**rank_state(self.sampler, self.augment_generator), "log": log})

    def _train_state(self, ranks: list[dict[str, Any]]) -> dict[str, Any]:
        return train_state(
            step=self.step,
            best_metric=self.best,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            scaler=self.scaler,
            ranks=ranks,
        )

    def _save_last(self, *, log: Mapping[str, Any], validation_due: bool) -> None:
        """``checkpoint_last.pt`` at this step without validating (an interruption); collective."""
        ranks = self._rank_states(log)
        if self.records is not None:  # rank 0
            state = {**self._train_state(ranks), "validation_due": validation_due}
            save_checkpoint(self._checkpoint(state), self.last_path)
            self.records.flush()
        ddp.barrier(self.info)

    def _validate_and_save(self, *, final: bool, log: Mapping[str, Any]) -> None:
        # collective: every rank takes part
        ranks = self._rank_states(log)
        if self.records is not None:  # rank 0
            metrics = None
            if self.val_cases:
                batch = max(1, self.sampler.batch_size)
                label_names = self.dataset.label_names
                metrics = validate(self.model, self.val_cases, self.config, label_names, self.device, self.amp, batch)
            score = None if metrics is None else (metrics["student"]["mean_dice"] or 0.0)
            improved = score is not None and (self.best is None or score > self.best)
            if improved:
                self.best = score
            save_checkpoint(self._checkpoint(self._train_state(ranks)), self.last_path)
            if improved or (final and not self.val_cases):
                save_checkpoint(self._checkpoint(None), self.best_path)
            if metrics is not None:
                self.records.validation(self.step, epoch=self._epoch(), metrics=metrics, best=improved)
                best = "  (best)" if improved else ""
                logger.info("validation step %d: %s%s", self.step, format_validation(metrics), best)
                if self.callback is not None:
                    self.callback.on_validation(self.step, metrics)
            else:
                self.records.flush()
        ddp.barrier(self.info)
