"""Loading a model for inference: what a path is decides how it loads, and which backends can run it.

A small registry of model formats (:data:`MODEL_FORMATS`), tried in order: each says how to recognise a path,
which backends run it (the first is what ``backend="auto"`` picks) and how to load it. Today only training
checkpoints load (PyTorch, the student only); exported models (``manifest.json`` + ONNX, TensorRT engines) are
recognised and refused with the fix, and their loaders slot in here when ``confkd export`` exists.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import torch

from confkd.config import Config
from confkd.errors import ConfigError, ModelFileError
from confkd.inference.runners import Amp, Runner, TorchRunner
from confkd.training.checkpoint import (
    CheckpointError,
    checkpoint_config,
    load_checkpoint,
    student_state_dict,
)
from confkd.training.distributed import resolve_device
from confkd.training.network import create_model

__all__ = [
    "MODEL_FORMATS",
    "Backend",
    "LoadedModel",
    "ModelFormat",
    "ModelLoadError",
    "UnsupportedModelError",
    "file_sha256",
    "load_model",
]

logger = logging.getLogger(__name__)


class ModelLoadError(ModelFileError):
    """A path cannot be loaded as a model for inference (missing, unrecognised, wrong backend).

    A :class:`~confkd.errors.ModelFileError`, as :class:`~confkd.errors.CheckpointError` is: catch that one
    type for "the model could not be loaded".
    """


class UnsupportedModelError(ModelLoadError):
    """A recognised model format this confkd cannot run yet (exported ONNX / TensorRT models)."""


class Backend(str, Enum):
    """Who runs the network."""

    AUTO = "auto"
    TORCH = "torch"
    ONNXRUNTIME = "onnxruntime"
    TENSORRT = "tensorrt"


@dataclass(frozen=True)
class LoadedModel:
    """A model ready for :mod:`confkd.inference.engine`.

    Attributes:
        runner: runs the deployable student network on its device.
        config: the resolved training config; its ``preprocess`` section is what inference applies.
        label_names: class value -> name, background included, the ignore label excluded.
        model_hash: sha256 (hex) of the model file.
        model_version: e.g. ``"confkd 0.1.0 / confkd.yaml"``: the confkd that trained it and the config name.
        source: the model file.
    """

    runner: Runner
    config: Config
    label_names: dict[int, str]
    model_hash: str
    model_version: str
    source: Path


Loader = Callable[[Path, Backend, torch.device, dict[str, Any]], LoadedModel]


@dataclass(frozen=True)
class ModelFormat:
    """One kind of model artefact: how to recognise it, what runs it, how to load it (``None``: not yet)."""

    name: str
    description: str
    matches: Callable[[Path], bool]
    backends: tuple[Backend, ...]
    loader: Loader | None


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    """sha256 hex digest of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _load_checkpoint(path: Path, backend: Backend, device: torch.device, options: dict[str, Any]) -> LoadedModel:
    """A training checkpoint -> :class:`TorchRunner` of the student (encoder + student decoder) only.

    The full model is built on the CPU so that its student can be filled from :func:`student_state_dict`; the
    teacher decoder is never given weights, and is dropped with the full model before anything moves to the
    device.
    """
    ckpt = load_checkpoint(path, map_location="cpu")
    config = checkpoint_config(ckpt)
    student = create_model(config.model, config.preprocess.spatial_dims).student_network()
    try:
        student.load_state_dict(student_state_dict(ckpt))
    except RuntimeError as e:
        raise CheckpointError(f"{path}: the student's weights do not fit the model its config describes ({e})") from e
    labels = ckpt["labels"]
    ignore = labels.get("ignore_index")
    names = {i: str(n) for i, n in enumerate(labels["names"]) if i != ignore}
    if len(names) != config.model.num_classes:
        raise CheckpointError(
            f"{path}: {len(names)} label names {list(names.values())} for a model with "
            f"{config.model.num_classes} classes; the checkpoint is inconsistent"
        )
    version = ckpt.get("versions", {}).get("confkd", "unknown")
    del ckpt  # the teacher's and the optimizer's tensors go here
    runner = TorchRunner(student, device=device, **options)
    return LoadedModel(
        runner=runner,
        config=config,
        label_names=names,
        model_hash=file_sha256(path),
        model_version=f"confkd {version} / {config.name}.yaml",
        source=path,
    )


def _is_exported_dir(path: Path) -> bool:
    return path.is_dir() and ((path / "manifest.json").is_file() or any(path.glob("*.onnx")))


def _suffix_in(*suffixes: str) -> Callable[[Path], bool]:
    return lambda path: path.is_file() and path.suffix.lower() in suffixes


#: tried in order; the first whose ``matches`` accepts the path loads it
MODEL_FORMATS: tuple[ModelFormat, ...] = (
    ModelFormat(
        "exported",
        "an exported model directory (manifest.json + ONNX)",
        _is_exported_dir,
        (Backend.ONNXRUNTIME, Backend.TENSORRT),
        None,
    ),
    ModelFormat("onnx", "an ONNX model", _suffix_in(".onnx"), (Backend.ONNXRUNTIME, Backend.TENSORRT), None),
    ModelFormat("tensorrt", "a TensorRT engine", _suffix_in(".engine", ".plan", ".trt"), (Backend.TENSORRT,), None),
    ModelFormat("checkpoint", "a training checkpoint", Path.is_file, (Backend.TORCH,), _load_checkpoint),
)


def _backend(value: str | Backend) -> Backend:
    try:
        return Backend(value)
    except ValueError as e:
        options = ", ".join(b.value for b in Backend)
        raise ConfigError(f"unknown backend {value!r}; available options are: {options}") from e


def load_model(
    path: str | Path,
    *,
    backend: str = "auto",
    device: str = "auto",
    amp: Amp = "auto",
    channels_last: bool = True,
    max_batch: int = 32,
) -> LoadedModel:
    """Load a model for inference.

    Args:
        path: a training checkpoint (``.pt``). Exported ONNX / TensorRT models are recognised and refused until
            ``confkd export`` exists.
        backend: ``"auto"`` (what the format runs on: torch for a checkpoint), ``"torch"``, ``"onnxruntime"``
            or ``"tensorrt"``.
        device: ``"auto"`` (CUDA when available, else the CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        amp, channels_last, max_batch: passed to :class:`~confkd.inference.runners.TorchRunner`.

    Raises:
        ModelLoadError: missing path, an unrecognised directory, or a backend that cannot run this format.
        UnsupportedModelError: an exported model (not supported yet).
        CheckpointError: a file that is not a readable confkd checkpoint.
        ConfigError: unknown backend or device name. DeviceError: CUDA requested but absent.
        Every message starts with the path (or names the bad value) and fits on one line.
    """
    p = Path(path)
    chosen = _backend(backend)
    dev = resolve_device(device)
    if not p.exists():
        raise ModelLoadError(f"{p}: no such file or directory")
    fmt = next((f for f in MODEL_FORMATS if f.matches(p)), None)
    if fmt is None:
        known = "; ".join(f.description for f in MODEL_FORMATS)
        raise ModelLoadError(f"{p}: not a model; expected one of: {known}")
    if fmt.loader is None:
        raise UnsupportedModelError(
            f"{p}: exported ONNX/TensorRT models are supported once `confkd export` exists; "
            "pass a training checkpoint (.pt)"
        )
    if chosen is Backend.AUTO:
        chosen = fmt.backends[0]
    elif chosen not in fmt.backends:
        runs_on = ", ".join(b.value for b in fmt.backends)
        raise ModelLoadError(
            f"{p}: {fmt.description} runs on the {runs_on} backend, not {chosen.value}; "
            f"use backend auto or {fmt.backends[0].value}"
            + (", or export it first (`confkd export`)" if fmt.name == "checkpoint" else "")
        )
    options = {"amp": amp, "channels_last": channels_last, "max_batch": max_batch}
    model = fmt.loader(p, chosen, dev, options)
    logger.info("loaded %s (%s) on %s with %s", p, model.model_version, dev, chosen.value)
    return model
