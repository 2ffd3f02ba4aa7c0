"""Self-describing checkpoints: weights plus everything needed to rebuild, run and resume the model.

A checkpoint is a plain dict that ``torch.load(path, weights_only=True)`` can read: only tensors, dicts, lists,
tuples, strings, numbers, booleans and None (NumPy and Python RNG states are converted). Keys:

=================  ==========================================================================================
``format``         :data:`FORMAT` (``"confkd-checkpoint"``); ``format_version``: :data:`FORMAT_VERSION`
``config``         the resolved :class:`~confkd.config.Config` as a dict (target spacing filled in)
``preprocessing``  the resolved preprocessing (spatial dims, target spacing, slice axis, clipping, normalisation,
                   pad multiple): a copy of ``config["preprocess"]`` for readers that only want that
``labels``         class names by index (background first) and ``ignore_index``
``dataset``        name, fingerprint (see :func:`~confkd.data.manifest.dataset_fingerprint`), strong patients
``versions``       confkd, torch, python
``step``           optimisation steps behind the weights
``model``          the model's ``state_dict`` (unwrapped from DDP / ``torch.compile``)
``train``          resume state (optional; :func:`train_state`): step, best metric, optimizer, scheduler, grad
                   scaler and, per rank, the sampler's, the augmentation's and the global RNG states
=================  ==========================================================================================
"""

from __future__ import annotations

import logging
import platform
import random
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from confkd.config import Config, config_from_dict
from confkd.errors import CheckpointError, ConfigError
from confkd.io_utils import atomic_path
from confkd.training.network import DualBranchUNet, SegmentationNetwork, UNet, create_model

if TYPE_CHECKING:
    from confkd.training.data import MixedBatchSampler

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "CheckpointError",
    "build_model_from_checkpoint",
    "capture_rng_state",
    "load_checkpoint",
    "load_student",
    "make_checkpoint",
    "rank_state",
    "restore_rng_state",
    "restore_train_state",
    "save_checkpoint",
    "save_untrained_checkpoint",
    "student_state_dict",
    "train_state",
    "unwrap_model",
]

logger = logging.getLogger(__name__)

FORMAT = "confkd-checkpoint"
FORMAT_VERSION = 1
_REQUIRED = ("format", "format_version", "config", "preprocessing", "labels", "dataset", "versions", "model")


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module inside DistributedDataParallel / DataParallel and ``torch.compile`` wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):  # torch.compile
            model = model._orig_mod
        else:
            return model


def _versions() -> dict[str, str]:
    import confkd

    return {"confkd": confkd.__version__, "torch": str(torch.__version__), "python": platform.python_version()}


def make_checkpoint(
    model: nn.Module,
    config: Config,
    *,
    label_names: Sequence[str],
    ignore_index: int,
    dataset_name: str,
    dataset_fingerprint: str,
    strong_patients: Sequence[str] = (),
    step: int = 0,
    train_state: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Assemble the checkpoint dict (tensors stay where they are; :func:`save_checkpoint` writes them).

    ``step``: the optimisation steps behind these weights. ``train_state``: what resuming needs (last checkpoint).

    ``config`` must be resolved: a null ``preprocess.target_spacing`` would not reproduce the preprocessing.
    """
    if config.preprocess.target_spacing is None:
        raise ConfigError(
            "make_checkpoint needs the resolved config: preprocess.target_spacing is null; set it to the spacing "
            "the model was trained at (the training-set median)"
        )
    ckpt: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": config.to_dict(),
        "preprocessing": config.to_dict()["preprocess"],
        "labels": {"names": list(label_names), "ignore_index": int(ignore_index)},
        "dataset": {
            "name": dataset_name,
            "fingerprint": dataset_fingerprint,
            "strong_patients": list(strong_patients),
        },
        "versions": _versions(),
        "step": int(step),
        "model": unwrap_model(model).state_dict(),
    }
    if train_state is not None:
        ckpt["train"] = dict(train_state)
    return ckpt


def save_checkpoint(checkpoint: Mapping[str, Any], path: str | Path) -> Path:
    """Write ``checkpoint`` atomically (a crash leaves the previous file intact); returns the path."""
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(dict(checkpoint), tmp)
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device | None = "cpu") -> dict[str, Any]:
    """Read and validate a checkpoint written by :func:`save_checkpoint` (``weights_only=True``: no code runs).

    Raises:
        CheckpointError: missing, truncated, corrupt or foreign file, or an unsupported format version; the
            message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch.load on foreign bytes raises anything (KeyError on a text file, ...)
        raise CheckpointError(f"{path}: not a readable confkd checkpoint (corrupt or foreign: {_reason(e)})") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        found = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"{path}: not a confkd checkpoint (format {found!r}, expected {FORMAT!r})")
    version = ckpt.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format_version {version!r} is not supported by this confkd (reads up to "
            f"{FORMAT_VERSION}); upgrade confkd"
        )
    missing = [k for k in _REQUIRED if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks {', '.join(missing)}; it is incomplete or corrupt")
    ckpt["path"] = str(path)
    return ckpt


def _reason(error: BaseException) -> str:
    """The informative line of a torch.load error (its first lines are generic advice)."""
    blocked = re.search(r"GLOBAL ([\w.]+)", str(error))
    if blocked:  # weights_only met a function or class to call: refused before anything ran
        # torch's own advice (weights_only=False, add_safe_globals) would run the pickled code: never repeat it
        return f"it pickles {blocked.group(1)}, refused: a checkpoint may only hold tensors and plain data"
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    specific = [ln for ln in lines if "error:" in ln.lower()]
    text = (specific or lines or [type(error).__name__])[-1 if specific else 0]
    return text if len(text) <= 200 else text[:197] + "..."


def checkpoint_config(ckpt: Mapping[str, Any]) -> Config:
    """The :class:`Config` stored in a checkpoint (raises :class:`CheckpointError` when it does not validate)."""
    try:
        return config_from_dict(ckpt["config"])
    except ConfigError as e:
        raise CheckpointError(f"{ckpt.get('path', 'checkpoint')}: its config does not validate ({e})") from e


def build_model_from_checkpoint(ckpt: Mapping[str, Any]) -> tuple[DualBranchUNet | UNet, Config]:
    """Rebuild the trained model (on the CPU, in eval mode) and its config from a loaded checkpoint."""
    config = checkpoint_config(ckpt)
    model = create_model(config.model, config.preprocess.spatial_dims)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise CheckpointError(
            f"{ckpt.get('path', 'checkpoint')}: weights do not fit the model its config describes ({e})"
        ) from e
    return model.eval(), config


def student_state_dict(ckpt: Mapping[str, Any]) -> dict[str, Tensor]:
    """The deployable student's weights, keyed as :class:`~confkd.training.network.SegmentationNetwork`'s.

    ``encoder.*`` is kept; the student decoder (``student.*`` of the dual model, ``decoder.*`` of the
    single-branch U-Net) becomes ``decoder.*``; the teacher decoder is dropped.
    """
    name = checkpoint_config(ckpt).model.name
    prefix = "student." if name == "dual_unet" else "decoder."
    out: dict[str, Tensor] = {}
    for key, value in ckpt["model"].items():
        if key.startswith("encoder."):
            out[key] = value
        elif key.startswith(prefix):
            out["decoder." + key[len(prefix) :]] = value
    return out


# ---------------------------------------------------------------------------------------------- RNG states
def capture_rng_state() -> dict[str, Any]:
    """Torch (CPU and every CUDA device), NumPy legacy global and Python ``random`` states, weights_only-safe."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()  # noqa: NPY002 (the legacy global state is what we save)
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else [],
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "python": {"version": int(version), "internal": list(internal), "gauss_next": gauss_next},
    }


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state` (CUDA states only when the device count matches)."""
    torch.set_rng_state(state["torch"].cpu())
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda])
    np_state = state["numpy"]
    keys = np_state["keys"].cpu().numpy().astype(np.uint32)
    legacy = (np_state["kind"], keys, np_state["pos"], np_state["has_gauss"], np_state["gauss"])
    np.random.set_state(legacy)  # noqa: NPY002
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss_next"]))


# -------------------------------------------------------------------------------------------- resume state
def rank_state(sampler: MixedBatchSampler, augment_generator: torch.Generator) -> dict[str, Any]:
    """One rank's random streams: the sampler's and the augmentation's generators and the global RNG states."""
    return {"sampler": sampler.state_dict(), "augment": augment_generator.get_state(), "rng": capture_rng_state()}


def train_state(
    *,
    step: int,
    best_metric: float | None,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    ranks: list[dict[str, Any]],
) -> dict[str, Any]:
    """A checkpoint's ``train`` entry; ``ranks``: every rank's :func:`rank_state`, indexed by rank."""
    return {
        "step": step,
        "best_metric": best_metric,
        "world_size": len(ranks),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "ranks": ranks,
    }


def restore_train_state(
    state: Mapping[str, Any],
    *,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    sampler: MixedBatchSampler,
    augment_generator: torch.Generator,
    rank: int,
    world_size: int,
) -> tuple[int, float | None]:
    """Load a :func:`train_state` into these objects (and the global RNGs); returns its step and best metric.

    The random streams are per rank: on another number of processes they restart (a warning says so).
    """
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    ranks = state["ranks"]
    if len(ranks) == world_size:
        mine = ranks[rank]
        sampler.load_state_dict(mine["sampler"])
        augment_generator.set_state(mine["augment"])
        restore_rng_state(mine["rng"])
    else:
        logger.warning(
            "resuming on %d processes a run saved from %d: random streams restart (not an exact resume)",
            world_size,
            len(ranks),
        )
    return int(state["step"]), state["best_metric"]


def load_student(checkpoint: str | Path) -> tuple[SegmentationNetwork, dict[str, Any]]:
    """The checkpoint's student (encoder + student decoder) in eval mode, on the CPU, and the checkpoint dict.

    Only the student's weights are loaded (:func:`student_state_dict`); the teacher decoder is never filled, and is
    dropped with the full model it was built in. Export and inference both start here.
    """
    ckpt = load_checkpoint(checkpoint, map_location="cpu")
    config = checkpoint_config(ckpt)
    student = create_model(config.model, config.preprocess.spatial_dims).student_network()
    try:
        student.load_state_dict(student_state_dict(ckpt))
    except RuntimeError as e:
        raise CheckpointError(
            f"{checkpoint}: the student's weights do not fit the model its config describes ({e})"
        ) from e
    return student.eval(), ckpt


def save_untrained_checkpoint(
    config: Config,
    path: str | Path,
    *,
    label_names: Sequence[str],
    ignore_index: int,
    seed: int = 0,
    warmup_shape: Sequence[int] | None = None,
    dataset_name: str = "untrained",
) -> Path:
    """Save a model with seeded random weights as a real checkpoint (benchmarks, smoke tests, pipeline checks).

    ``warmup_shape`` (e.g. ``(4, 1, 64, 64)``): one forward pass of random data in train mode first, so that
    BatchNorm running statistics are not the trivial 0/1. ``config`` must be resolved, as for
    :func:`make_checkpoint`.
    """
    torch.manual_seed(seed)
    model = create_model(config.model, config.preprocess.spatial_dims)
    if warmup_shape is not None:
        model.train()
        with torch.no_grad():
            model(torch.randn(*warmup_shape))
    ckpt = make_checkpoint(
        model.eval(),
        config,
        label_names=label_names,
        ignore_index=ignore_index,
        dataset_name=dataset_name,
        dataset_fingerprint="0" * 64,
    )
    return save_checkpoint(ckpt, path)
