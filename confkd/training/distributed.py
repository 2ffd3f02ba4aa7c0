"""Where a run executes: the device, its mixed precision, and the process group of runs launched by ``torchrun``.

``torchrun`` sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; :func:`init_distributed` reads them, joins the
process group (NCCL on CUDA, Gloo on CPU) and pins each process to its local GPU. Without them everything here
degrades to single-process no-ops, so the trainer has a single code path.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from confkd.errors import ConfigError, DeviceError, DistributedError

__all__ = [
    "DeviceError",
    "DistInfo",
    "DistributedError",
    "all_gather_objects",
    "barrier",
    "broadcast_buffers",
    "broadcast_object",
    "cleanup_distributed",
    "init_distributed",
    "mean_across_ranks",
    "resolve_amp",
    "resolve_device",
    "resolve_process_device",
    "wrap_model",
]

logger = logging.getLogger(__name__)

#: how long a rank waits for the others (rank 0 validates while the others wait at a barrier)
TIMEOUT = datetime.timedelta(minutes=60)


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` -> a checked torch device.

    Under torchrun, ``"auto"`` and ``"cuda"`` mean this process's ``cuda:LOCAL_RANK``.
    """
    text = str(device).strip().lower()
    if text == "auto":
        text = "cuda" if torch.cuda.is_available() else "cpu"
    if text == "cpu":
        return torch.device("cpu")
    if text == "cuda" or text.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise DeviceError(f"device {device!r}: cuda requested but torch sees no GPU; use --device cpu")
        if text == "cuda":
            return torch.device("cuda", local_rank)
        index = text.split(":", 1)[1]
        if not index.isdigit():
            raise ConfigError(f"device {device!r}: expected cuda:N with N an integer")
        if int(index) >= torch.cuda.device_count():
            raise DeviceError(f"device {device!r}: torch sees {torch.cuda.device_count()} GPU(s) (cuda:0...)")
        return torch.device("cuda", int(index))
    raise ConfigError(f"unknown device {device!r}; available options are: auto, cpu, cuda, cuda:N")


def resolve_process_device(device: str) -> torch.device:
    """:func:`resolve_device` for this process, which under torchrun must take its own GPU (``cuda:LOCAL_RANK``)."""
    local_rank = _env_int("LOCAL_RANK") or 0
    dev = resolve_device(device, local_rank)
    if (_env_int("WORLD_SIZE") or 1) > 1 and dev.type == "cuda" and dev.index != local_rank:
        raise DeviceError(
            f"device {device!r} under torchrun: every process would use {dev}; pass --device cuda (or auto) so that "
            "each process takes cuda:LOCAL_RANK"
        )
    return dev


def resolve_amp(setting: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``train.amp``: auto = bf16 on CUDA when supported, else fp16; off on the CPU."""
    if setting == "off" or (setting == "auto" and device.type != "cuda"):
        return None
    if setting == "bf16" or (setting == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    if setting in ("fp16", "auto"):
        return torch.float16
    raise ConfigError(f"train.amp={setting!r}; available options are: auto, off, bf16, fp16")


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the run. ``owns_group``: this code initialised the process group (and ends it)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str) -> int | None:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return None
    try:
        return int(raw)
    except ValueError as e:
        raise DistributedError(f"environment variable {name}={raw!r} must be an integer (set by torchrun)") from e


def init_distributed(device: torch.device) -> DistInfo:
    """Join the process group described by torchrun's environment, if any.

    ``device`` decides the backend: NCCL for CUDA (each rank then uses ``cuda:LOCAL_RANK``; the caller passes the
    resolved device), Gloo otherwise. An already initialised group is reused and left to its owner.
    """
    world = _env_int("WORLD_SIZE")
    rank = _env_int("RANK")
    if world is None or world <= 1 or rank is None:
        return DistInfo()
    local = _env_int("LOCAL_RANK") or 0
    if not dist.is_available():
        raise DistributedError("WORLD_SIZE > 1 but this torch build has no torch.distributed support")
    owns = False
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend, timeout=TIMEOUT)
        owns = True
        logger.info("joined process group: rank %d of %d (%s)", rank, world, backend)
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local, owns_group=owns)


def cleanup_distributed(info: DistInfo, *, failed: bool = False) -> None:
    """Destroy the process group if :func:`init_distributed` created it (after a barrier unless ``failed``)."""
    if info.owns_group and dist.is_initialized():
        # a rank leaving while another still talks to it aborts Gloo ("terminate called without an active
        # exception"): meet first; skipped when unwinding from an error, where the others may never arrive
        if not failed:
            dist.barrier()
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def broadcast_object(info: DistInfo, obj: Any, src: int = 0) -> Any:
    """``obj`` from rank ``src`` on every rank (pickled; for small control values only)."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_objects(info: DistInfo, obj: Any) -> list[Any]:
    """Every rank's ``obj``, indexed by rank (pickled; for small values such as RNG states)."""
    if not info.enabled:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def mean_across_ranks(info: DistInfo, values: torch.Tensor) -> torch.Tensor:
    """The element-wise mean of ``values`` over the ranks (a copy; ``values`` itself when not distributed)."""
    if not info.enabled:
        return values
    total = values.clone()
    dist.all_reduce(total)  # SUM: the one reduction every backend has
    return total / info.world_size


def broadcast_buffers(info: DistInfo, model: nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank.

    DDP broadcasts buffers at the *start* of each forward, so after the last step each rank still holds the
    statistics of its own last batch; this makes the final models identical everywhere.
    """
    if not info.enabled:
        return
    for buffer in model.buffers():
        dist.broadcast(buffer.data, src=0)


def wrap_model(model: nn.Module, info: DistInfo, device: torch.device, *, sync_batchnorm: bool = False) -> nn.Module:
    """The module a training step calls: ``model`` itself in one process, DistributedDataParallel around it in several.

    ``sync_batchnorm``: first turn every BatchNorm of ``model`` into a SyncBatchNorm (batch statistics over all
    ranks; CUDA only, see :func:`~confkd.training.run_config.check_config`). The conversion replaces the modules
    inside ``model`` but moves the very same parameter and buffer tensors into them, so an optimiser built on
    ``model.parameters()`` stays valid and the ``state_dict`` keys (hence checkpoints) do not change.

    ``find_unused_parameters=False``: the trainer freezes the branches the objective cannot reach instead.
    """
    if not info.enabled:
        return model
    if sync_batchnorm:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=False)
