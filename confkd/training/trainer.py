"""The training loop: :func:`train` turns a dataset and a :class:`~confkd.config.Config` into a run directory.

A run directory holds ``config.yaml`` (the *resolved* config: the training-set median spacing and the patch size
filled in, so that it reproduces preprocessing exactly), ``manifest.json``, ``metrics.jsonl`` (one JSON object
per logged step and per validation), ``checkpoint_last.pt`` (with everything needed to resume exactly),
``checkpoint_best.pt`` (best student mean validation Dice), ``train.log`` and, when tensorboard is installed,
``tb/``.

One step: draw a mixed batch on the host (:class:`~confkd.training.data.MixedBatchSampler`), copy it to the
device (pinned memory, non-blocking), augment it there, forward under autocast, the ConfKD objective in float32,
backward through a GradScaler (a no-op unless fp16), optimiser and per-step LR schedule.

Exact resume: every source of randomness is a generator whose state is checkpointed (the sampler's and the
augmentation's generators, torch / NumPy / Python global states, per rank), and so are the model, optimiser,
scheduler, grad scaler, step and best metric; on the CPU a resumed run reproduces the uninterrupted one bit for bit.

Distributed (``torchrun``): one process per device, DDP with ``find_unused_parameters=False``. Decoder branches
the objective can never reach (the teacher when ``lambda_strong == 0``; the student when every student term has
weight 0) are frozen (``requires_grad=False``) instead: DDP then expects no gradient for them, and no step pays
for the unused-parameter search. Each rank draws its own items (generator seeded with the rank); only rank 0
writes files and validates while the others wait at a barrier.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import logging.handlers
import math
import os
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor, nn

from confkd.config import Config, LossConfig, TrainConfig, config_from_dict, save_config
from confkd.data.dataset import NnUNetDataset
from confkd.data.manifest import Manifest, build_manifest_from_config
from confkd.errors import ConfigError, ConfKDError, DatasetError
from confkd.inference.predict import predict_volume
from confkd.io_utils import atomic_write_text
from confkd.metrics import evaluate_case, summarize
from confkd.training import distributed as ddp
from confkd.training.augment import augment_batch
from confkd.training.checkpoint import (
    capture_rng_state,
    load_checkpoint,
    make_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from confkd.training.data import (
    MixedBatchSampler,
    TrainingSet,
    ValidationCase,
    default_patch_size,
    read_validation_cases,
    sampler_seed,
)
from confkd.training.distributed import DeviceError, resolve_amp, resolve_device
from confkd.training.losses import confkd_objective
from confkd.training.network import DualBranchUNet, create_model

__all__ = [
    "DEFAULT_LOG_EVERY",
    "DeviceError",
    "RunDirectoryError",
    "TrainCallback",
    "TrainResult",
    "resolve_amp",
    "resolve_device",
    "train",
]

logger = logging.getLogger(__name__)

#: steps between log lines / metrics.jsonl records (each one is a host-device sync point)
DEFAULT_LOG_EVERY = 10
#: the keys a resumed run may change
RESUMABLE_CHANGES = ("train.iterations", "train.epochs")
_FLUSH_SECONDS = 15.0


class RunDirectoryError(ConfKDError, ValueError):
    """The run directory cannot be used (not empty without resume, nothing to resume, a file in the way)."""


class TrainCallback(Protocol):
    """Progress hooks; the CLI implements them with a progress bar. Called on rank 0 only."""

    def on_step(self, step: int, total_steps: int, terms: dict[str, float], images_per_s: float) -> None:
        """Called every ``log_every`` steps and at the last one with the mean loss terms since the previous call."""

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


# --------------------------------------------------------------------------------------------- resolution
def total_steps(cfg: TrainConfig, num_items: int, global_batch: int) -> int:
    """``train.iterations``, or ``epochs x ceil(training items / global batch)`` when ``train.epochs`` is set."""
    if cfg.epochs is None:
        return cfg.iterations
    return cfg.epochs * max(1, math.ceil(num_items / global_batch))


def lr_factor(schedule: str, total: int) -> Callable[[int], float]:
    """Per-step LR multiplier: constant, cosine (to 0 at ``total``) or poly (nnU-Net's ``(1 - t)^0.9``)."""
    if schedule == "constant":
        return lambda step: 1.0
    if schedule == "cosine":
        return lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))
    if schedule == "poly":
        return lambda step: max(0.0, 1.0 - step / total) ** 0.9
    raise ConfigError(f"train.schedule={schedule!r}; available options are: constant, cosine, poly")


def config_differences(saved: Mapping[str, Any], requested: Mapping[str, Any], prefix: str = "") -> list[str]:
    """``key: saved -> requested`` for every leaf that differs, except :data:`RESUMABLE_CHANGES`."""
    out = []
    for key in sorted(set(saved) | set(requested)):
        path = f"{prefix}{key}"
        a, b = saved.get(key), requested.get(key)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out.extend(config_differences(a, b, f"{path}."))
        elif a != b and path not in RESUMABLE_CHANGES:
            out.append(f"{path}: {a!r} (saved) != {b!r} (requested)")
    return out


def _freeze_unreachable_branches(model: nn.Module, loss: LossConfig) -> list[str]:
    """Freeze the decoders the objective never back-propagates into (see the module docstring)."""
    if not isinstance(model, DualBranchUNet):
        return []  # one decoder serves both outputs
    student_terms = (loss.lambda_weak, loss.lambda_kl, loss.lambda_ent, loss.lambda_pseudo, float(loss.student_strong))
    teacher_used = loss.lambda_strong > 0  # the KL term detaches the teacher
    # with every weight 0 the objective returns student.sum() * 0, which still reaches the student
    student_used = any(w > 0 for w in student_terms) or not teacher_used
    frozen = [name for name, used in (("teacher", teacher_used), ("student", student_used)) if not used]
    for name in frozen:
        getattr(model, name).requires_grad_(False)
    return frozen


# ----------------------------------------------------------------------------------------------- run files
class _MetricsLog:
    """``metrics.jsonl``, rewritten atomically (every few seconds and at validations) from the records in memory."""

    def __init__(self, path: Path, keep_until: int | None) -> None:
        self.path = path
        self.records: list[dict[str, Any]] = []
        if keep_until is not None and path.is_file():  # resume: drop what came after the checkpoint
            for line in path.read_text(encoding="utf-8").splitlines():
                if line.strip() and json.loads(line).get("step", 0) <= keep_until:
                    self.records.append(json.loads(line))
        self._last_flush = time.monotonic()

    def append(self, record: dict[str, Any], *, flush: bool = False) -> None:
        self.records.append(record)
        if flush or time.monotonic() - self._last_flush > _FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        atomic_write_text(self.path, "".join(json.dumps(r, allow_nan=False) + "\n" for r in self.records))
        self._last_flush = time.monotonic()


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _tensorboard(run_dir: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(str(run_dir / "tb"))
    except Exception as e:  # tensorboard is optional: missing, or broken by its own dependencies
        logger.debug("no tensorboard logging (%s)", e)
        return None


def _check_run_dir(run_dir: Path, resume: bool) -> str | None:
    """The problem with ``run_dir`` for this request, or None."""
    if run_dir.exists() and not run_dir.is_dir():
        return f"{run_dir}: exists and is not a directory; choose another --out"
    last = run_dir / "checkpoint_last.pt"
    if resume and not last.is_file():
        return f"{run_dir}: nothing to resume ({last.name} not found); start without --resume"
    if not resume and run_dir.is_dir() and any(run_dir.iterdir()):
        return f"{run_dir}: not empty; choose a new --out directory, or pass --resume to continue the run in it"
    return None


# --------------------------------------------------------------------------------------------- validation
def _validate(
    model: nn.Module,
    cases: list[ValidationCase],
    config: Config,
    label_names: tuple[str, ...],
    device: torch.device,
    amp: torch.dtype | None,
    batch_size: int,
) -> dict[str, Any]:
    """Per-class and mean Dice / HD95 (mm) of the student and the teacher on the validation cases."""
    classes = list(range(1, config.model.num_classes))
    scores: dict[str, list[Any]] = {"student": [], "teacher": []}
    was_training = model.training
    model.eval()
    try:
        for case in cases:
            pred = predict_volume(
                model,
                list(case.channels),
                config.preprocess,
                spacing=case.spacing,
                device=device,
                batch_size=batch_size,
                autocast_dtype=amp,
            )
            student = pred.student.argmax(0).cpu().numpy()
            same = pred.teacher is None or pred.teacher is pred.student
            teacher = student if same else pred.teacher.argmax(0).cpu().numpy()  # type: ignore[union-attr]
            scores["student"].append(evaluate_case(student, case.label, classes, case.spacing))
            scores["teacher"].append(evaluate_case(teacher, case.label, classes, case.spacing))
    finally:
        model.train(was_training)
    out: dict[str, Any] = {}
    for branch, cases_metrics in scores.items():
        summary = summarize(cases_metrics, classes)
        out[branch] = {
            "dice": {label_names[c]: _finite(summary["dice"][c].mean) for c in classes},
            "hd95": {label_names[c]: _finite(summary["hd95"][c].mean) for c in classes},
            "mean_dice": _finite(summary["dice"]["mean"].mean),
            "mean_hd95": _finite(summary["hd95"]["mean"].mean),
        }
    return out


# -------------------------------------------------------------------------------------------------- train
def train(
    dataset_dir: str | Path,
    config: Config,
    run_dir: str | Path,
    *,
    device: str = "auto",
    resume: bool = False,
    callback: TrainCallback | None = None,
    log_every: int = DEFAULT_LOG_EVERY,
) -> TrainResult:
    """Train ``config``'s model on ``dataset_dir`` into ``run_dir`` (see the module docstring).

    Args:
        dataset_dir: an nnU-Net v2 raw dataset (``splits.json`` for validation; ``scribblesTr/`` for scribbles).
        config: the requested config; ``preprocess.target_spacing`` and ``train.patch_size`` may be null.
        run_dir: created if missing; must be empty unless ``resume``.
        device: ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        resume: continue from ``run_dir/checkpoint_last.pt``; the config must equal the saved one except for
            ``train.iterations`` / ``train.epochs`` (null target spacing / patch size take the saved values).
        callback: progress hooks (rank 0).
        log_every: steps between metrics records and log lines.

    Validation records in ``metrics.jsonl`` look like ``{"kind": "val", "step": ..., "epoch": ..., "student":
    {"dice": {"RV": ...}, "hd95": {...}, "mean_dice": ..., "mean_hd95": ...}, "teacher": {...}, "best": ...}``;
    undefined values (HD95 with an empty mask) are null.

    Raises:
        ConfigError, DatasetError, DeviceError, RunDirectoryError, CheckpointError: bad input; nothing is
        written before the inputs are checked.
    """
    if log_every < 1:
        raise ConfigError(f"log_every must be >= 1, got {log_every}")
    local_rank = int(os.environ.get("LOCAL_RANK", "0") or 0)
    dev = resolve_device(device, local_rank)
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 and dev.type == "cuda" and dev.index != local_rank:
        raise DeviceError(
            f"device {device!r} under torchrun: every process would use {dev}; pass --device cuda (or auto) so that "
            "each process takes cuda:LOCAL_RANK"
        )
    info = ddp.init_distributed(dev)
    flags = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    cudnn = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    package_logger = logging.getLogger("confkd")
    old_level = package_logger.level
    # log records wait in memory until the inputs are checked and the data loaded: a run that fails that early
    # leaves no file behind (its directory would otherwise no longer be empty for the next attempt)
    early = logging.handlers.MemoryHandler(capacity=100_000, flushLevel=logging.CRITICAL + 1)
    handlers: list[logging.Handler] = [early] if info.is_main else []
    failed = True
    try:
        run_dir = Path(run_dir)
        problem = ddp.broadcast_object(info, _check_run_dir(run_dir, resume) if info.is_main else None)
        if problem:
            raise RunDirectoryError(problem)
        for handler in handlers:
            package_logger.addHandler(handler)
        if handlers and package_logger.getEffectiveLevel() > logging.INFO:
            package_logger.setLevel(logging.INFO)
        run = _Run(Path(dataset_dir), config, run_dir, dev, info, resume, callback, log_every)
        run.setup()
        if info.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            # the log is the run's one append-only stream (an atomic rewrite per line would make no sense)
            file_handler = logging.FileHandler(run_dir / "train.log", encoding="utf-8")
            file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
            early.setTarget(file_handler)
            early.flush()
            package_logger.removeHandler(early)
            package_logger.addHandler(file_handler)
            handlers.append(file_handler)
        result = run.run()
        failed = False
        return result
    finally:
        torch.use_deterministic_algorithms(flags[0], warn_only=flags[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn
        for handler in handlers:
            package_logger.removeHandler(handler)
            handler.close()
        package_logger.setLevel(old_level)
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
        log_every: int,
    ) -> None:
        self.run_dir, self.device, self.info, self.callback, self.log_every = run_dir, device, info, callback, log_every
        self.last_path, self.best_path = run_dir / "checkpoint_last.pt", run_dir / "checkpoint_best.pt"
        self.dataset = NnUNetDataset.open(dataset_dir)
        self.manifest: Manifest = build_manifest_from_config(self.dataset, config.data)
        self.resume_ckpt = load_checkpoint(self.last_path) if resume else None
        if self.resume_ckpt is not None:
            config = self._resumed_config(config, self.resume_ckpt)
        self._check_config(config)
        self.config = config

    # -- checks
    def _resumed_config(self, config: Config, ckpt: Mapping[str, Any]) -> Config:
        saved, requested = ckpt["config"], config.to_dict()
        for section, key in (("preprocess", "target_spacing"), ("train", "patch_size")):
            if requested[section][key] is None:  # null means "resolve it": the saved run did
                requested[section][key] = saved.get(section, {}).get(key)
        diffs = config_differences(saved, requested)
        if diffs:
            raise ConfigError(
                f"{self.last_path}: cannot resume with a different config ({len(diffs)} key(s) differ: "
                f"{'; '.join(diffs)}); only {', '.join(RESUMABLE_CHANGES)} may change"
            )
        if ckpt["dataset"].get("fingerprint") != self.manifest.fingerprint:
            raise DatasetError(
                f"{self.last_path}: was trained on another dataset (fingerprint differs from {self.dataset.root})"
            )
        if "train" not in ckpt:
            raise ConfigError(f"{self.last_path}: holds no training state to resume from")
        return config_from_dict(requested)

    def _check_config(self, config: Config) -> None:
        model, name = config.model, self.dataset.root
        if model.num_classes != self.manifest.num_classes:
            raise ConfigError(
                f"model.num_classes={model.num_classes} but {name} has {self.manifest.num_classes} classes "
                f"({', '.join(self.dataset.label_names)}); set model.num_classes={self.manifest.num_classes}"
            )
        if model.in_channels != self.dataset.num_channels:
            raise ConfigError(
                f"model.in_channels={model.in_channels} but {name} has {self.dataset.num_channels} image channel(s); "
                f"set model.in_channels={self.dataset.num_channels}"
            )
        divisor = 2**model.depth
        if config.preprocess.pad_multiple % divisor:
            raise ConfigError(
                f"preprocess.pad_multiple={config.preprocess.pad_multiple} is not a multiple of 2**model.depth="
                f"{divisor}: whole volumes would not fit the network; set preprocess.pad_multiple={divisor}"
            )
        patch = config.train.patch_size
        if patch is not None and (len(patch) != config.preprocess.spatial_dims or any(p % divisor for p in patch)):
            raise ConfigError(
                f"train.patch_size={list(patch)} needs {config.preprocess.spatial_dims} sizes divisible by "
                f"2**model.depth={divisor}, e.g. {[max(divisor, p // divisor * divisor) for p in patch]}"
            )

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
        patch = cfg.train.patch_size
        if patch is None:
            multiple = math.lcm(cfg.preprocess.pad_multiple, 2**cfg.model.depth)
            patch = default_patch_size(self.data.item_shapes(), multiple, cfg.preprocess.spatial_dims)
        self.config = cfg = dataclasses.replace(
            cfg,
            preprocess=dataclasses.replace(cfg.preprocess, target_spacing=self.data.target_spacing),
            train=dataclasses.replace(cfg.train, patch_size=tuple(patch)),
        )
        self.sampler = MixedBatchSampler(
            self.data,
            cfg.train.strong_per_batch,
            cfg.train.weak_per_batch,
            patch,
            seed=cfg.train.seed,
            rank=info.rank,
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
        frozen = _freeze_unreachable_branches(model, cfg.loss)
        if frozen:
            logger.info("frozen (the objective never reaches them): %s decoder", ", ".join(frozen))
        self.channels_last = dev.type == "cuda" and cfg.train.channels_last
        fmt = torch.channels_last if cfg.preprocess.spatial_dims == 2 else torch.channels_last_3d
        model.to(dev)
        if self.channels_last:
            model.to(memory_format=fmt)  # type: ignore[call-overload]
        self.memory_format = fmt if self.channels_last else torch.contiguous_format
        self.model = model
        params = [p for p in model.parameters() if p.requires_grad]
        kwargs: dict[str, Any] = {"lr": cfg.train.lr, "betas": cfg.train.betas, "weight_decay": cfg.train.weight_decay}
        if dev.type == "cuda":
            kwargs["fused"] = True
        opt_cls = torch.optim.AdamW if cfg.train.optimizer == "adamw" else torch.optim.Adam
        self.optimizer = opt_cls(params, **kwargs)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_factor(cfg.train.schedule, self.total))
        self.amp = resolve_amp(cfg.train.amp, dev)
        self.scaler = torch.amp.GradScaler(dev.type, enabled=self.amp == torch.float16)
        self.step = 0
        self.best: float | None = None
        torch.manual_seed(sampler_seed(cfg.train.seed, info.rank, 2))  # dropout: a different stream per rank
        if self.resume_ckpt is not None:
            self._restore(self.resume_ckpt)
        self.ddp_model: nn.Module = model
        if info.enabled:
            ids = [dev.index] if dev.type == "cuda" else None
            self.ddp_model = nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=False)

    def _restore(self, ckpt: Mapping[str, Any]) -> None:
        state = ckpt["train"]
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.step, self.best = int(state["step"]), state["best_metric"]
        ranks = state["ranks"]
        if len(ranks) == self.info.world_size:
            mine = ranks[self.info.rank]
            self.sampler.load_state_dict(mine["sampler"])
            self.augment_generator.set_state(mine["augment"])
            restore_rng_state(mine["rng"])
        else:
            logger.warning(
                "resuming on %d processes a run saved from %d: random streams restart (not an exact resume)",
                self.info.world_size,
                len(ranks),
            )
        logger.info("resumed from %s at step %d", self.last_path, self.step)

    def _train_state(self, ranks: list[Any]) -> dict[str, Any]:
        return {
            "step": self.step,
            "best_metric": self.best,
            "world_size": self.info.world_size,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "ranks": ranks,
        }

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
        if info.is_main:
            save_config(cfg, self.run_dir / "config.yaml")
            if self.resume_ckpt is None:
                self.manifest.save(self.run_dir / "manifest.json")
        self.metrics = _MetricsLog(self.run_dir / "metrics.jsonl", self.step if self.resume_ckpt is not None else None)
        self.tb = _tensorboard(self.run_dir) if info.is_main else None
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
        sums: dict[str, Tensor] = {}
        count, images, seconds, run_images, run_seconds = 0, 0, 0.0, 0, 0.0
        tic = time.perf_counter()
        try:
            while self.step < self.total:
                terms = self._step()
                for key, value in terms.items():
                    sums[key] = sums[key] + value if key in sums else value.clone()
                count += 1
                images += self.global_batch
                self.step += 1
                last = self.step == self.total
                if self.step % self.log_every == 0 or last:
                    keys = list(sums)  # the same terms, in the same order, on every rank
                    stacked = ddp.mean_across_ranks(info, torch.stack([sums[k] for k in keys]).float() / count)
                    means = dict(zip(keys, stacked.tolist(), strict=True))  # sync point
                    seconds = time.perf_counter() - tic
                    rate = images / seconds if seconds > 0 else 0.0
                    run_images, run_seconds = run_images + images, run_seconds + seconds
                    self._log_step(means, rate)
                    sums, count, images, tic = {}, 0, 0, time.perf_counter()
                if self.step % cfg.train.val_every == 0 or last:
                    self._validate_and_save(final=last)
                    tic = time.perf_counter()  # validation is not training throughput
        finally:
            if info.is_main:
                self.metrics.flush()  # also when interrupted: the records up to here stay readable
            if self.tb is not None:
                self.tb.close()
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

    def _log_step(self, terms: dict[str, float], rate: float) -> None:
        if not self.info.is_main:
            return
        lr = self.optimizer.param_groups[0]["lr"]
        epoch = self.step * self.global_batch / max(1, self.data.num_items)
        record = {
            "kind": "train",
            "step": self.step,
            "epoch": epoch,
            "lr": lr,
            "losses": {k: _finite(v) for k, v in terms.items()},
            "images_per_s": rate,
            "world_size": self.info.world_size,
        }
        self.metrics.append(record)
        text = " ".join(f"{k} {v:.4f}" for k, v in terms.items())
        logger.info("step %d/%d  %s  lr %.3g  %.1f img/s", self.step, self.total, text, lr, rate)
        if self.tb is not None:
            for key, value in terms.items():
                self.tb.add_scalar(f"loss/{key}", value, self.step)
            self.tb.add_scalar("lr", lr, self.step)
            self.tb.add_scalar("images_per_s", rate, self.step)
        if self.callback is not None:
            self.callback.on_step(self.step, self.total, terms, rate)

    def _validate_and_save(self, *, final: bool) -> None:
        rank_state = {
            "sampler": self.sampler.state_dict(),
            "augment": self.augment_generator.get_state(),
            "rng": capture_rng_state(),
        }
        ranks = ddp.all_gather_objects(self.info, rank_state)  # collective: every rank takes part
        if self.info.is_main:
            metrics = None
            if self.val_cases:
                batch = max(1, self.sampler.batch_size)
                label_names = self.dataset.label_names
                metrics = _validate(self.model, self.val_cases, self.config, label_names, self.device, self.amp, batch)
            score = None if metrics is None else (metrics["student"]["mean_dice"] or 0.0)
            improved = score is not None and (self.best is None or score > self.best)
            if improved:
                self.best = score
            save_checkpoint(self._checkpoint(self._train_state(ranks)), self.last_path)
            if improved or (final and not self.val_cases):
                save_checkpoint(self._checkpoint(None), self.best_path)
            if metrics is not None:
                epoch = self.step * self.global_batch / max(1, self.data.num_items)
                record = {"kind": "val", "step": self.step, "epoch": epoch, **metrics, "best": improved}
                self.metrics.append(record, flush=True)
                s, t = metrics["student"], metrics["teacher"]
                logger.info(
                    "validation step %d: student mean Dice %s HD95 %s | teacher mean Dice %s HD95 %s%s",
                    self.step,
                    s["mean_dice"],
                    s["mean_hd95"],
                    t["mean_dice"],
                    t["mean_hd95"],
                    "  (best)" if improved else "",
                )
                if self.tb is not None:
                    for branch in ("student", "teacher"):
                        for key in ("mean_dice", "mean_hd95"):
                            if metrics[branch][key] is not None:
                                self.tb.add_scalar(f"val/{branch}_{key}", metrics[branch][key], self.step)
                if self.callback is not None:
                    self.callback.on_validation(self.step, metrics)
            else:
                self.metrics.flush()
        ddp.barrier(self.info)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 (seed the legacy global state third-party code uses)
    torch.manual_seed(seed)
