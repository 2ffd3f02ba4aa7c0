"""Loading a model for inference: what a path is decides how it loads, and which backends can run it.

A small registry of model formats (:data:`MODEL_FORMATS`), tried in order: each says how to recognise a path,
which backends run it and how to load it.

=====================  ==========================  =====================================================
format                 backends                    ``backend="auto"`` picks
=====================  ==========================  =====================================================
exported directory     onnxruntime, tensorrt,      tensorrt when TensorRT is installed, CUDA is visible and
(``manifest.json`` +   triton                      an ``engine_provider`` was given; else onnxruntime
``model.onnx``)                                    (its CUDA provider when onnxruntime-gpu has one); never triton
TensorRT engine        tensorrt                    tensorrt (needs the ``<engine>.json`` sidecar)
training checkpoint    torch                       torch (the student only)
=====================  ==========================  =====================================================

A bare ``.onnx`` file is refused: the preprocessing and labels travel in the exported directory's manifest.
The TensorRT engine cache lives in :mod:`confkd.export.engine_cache` (imports run ``cli -> export -> confkd``), so
the tensorrt backend of an exported directory gets its engine from an injected ``engine_provider``
(``confkd segment`` passes the cache's).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import torch

from confkd.config import Config, config_from_dict
from confkd.errors import ConfigError, ManifestError, ModelFileError
from confkd.inference.manifest import Manifest, default_bounds, file_sha256, load_manifest, manifest_from_dict
from confkd.inference.runners import Amp, Runner, TorchRunner
from confkd.training.checkpoint import (
    CheckpointError,
    checkpoint_config,
    load_student,
)
from confkd.training.distributed import resolve_device

__all__ = [
    "MODEL_FORMATS",
    "Backend",
    "EngineProvider",
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
    TRITON = "triton"


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
#: (exported directory, its manifest, device, precision) -> serialised engine bytes, validated for this machine
EngineProvider = Callable[[Path, Manifest, torch.device, str], bytes]


@dataclass(frozen=True)
class ModelFormat:
    """One kind of model artefact: how to recognise it, what runs it, how to load it (``None``: not yet)."""

    name: str
    description: str
    matches: Callable[[Path], bool]
    backends: tuple[Backend, ...]
    loader: Loader | None


def _load_checkpoint(path: Path, backend: Backend, device: torch.device, options: dict[str, Any]) -> LoadedModel:
    """A training checkpoint -> :class:`TorchRunner` of the student (encoder + student decoder) only.

    The full model is built on the CPU so that its student can be filled from :func:`student_state_dict`; the
    teacher decoder is never given weights, and is dropped with the full model before anything moves to the
    device.
    """
    student, ckpt = load_student(path)
    config = checkpoint_config(ckpt)
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
    torch_options = {k: options[k] for k in ("amp", "channels_last", "max_batch")}
    # tile exactly as the exported model will (its declared max bound), so that every backend blends the same
    # tiles: with instance norm a network's output depends on the tile it sees
    bounds = default_bounds(config.preprocess.spatial_dims, student.divisor, config.train.patch_size)
    runner = TorchRunner(student, device=device, max_tile=bounds.max_spatial, **torch_options)
    return LoadedModel(
        runner=runner,
        config=config,
        label_names=names,
        model_hash=file_sha256(path),
        model_version=f"confkd {version} / {config.name}.yaml",
        source=path,
    )


def _exported_model(manifest: Manifest, runner: Runner, path: Path) -> LoadedModel:
    try:
        config = config_from_dict(manifest.config)
    except ConfigError as e:
        raise ManifestError(f"{path}: the manifest's config does not validate ({e})") from e
    return LoadedModel(
        runner=runner,
        config=config,
        label_names=manifest.label_names,
        model_hash=manifest.onnx_sha256,
        model_version=manifest.model_version,
        source=path,
    )


def _load_exported(path: Path, backend: Backend, device: torch.device, options: dict[str, Any]) -> LoadedModel:
    """An exported directory -> :class:`OrtRunner`, (tensorrt) :class:`TrtRunner` with a cached engine, or
    (triton) :class:`TritonRunner` sending the tiles to a Triton server."""
    manifest = load_manifest(path)  # checks the ONNX file's sha256 first
    if backend is Backend.TRITON:
        from confkd.inference.runners_triton import TritonRunner, default_model_name

        url = options.get("url")
        if not url:
            raise ModelLoadError(f"{path}: the triton backend needs the server's address (--url HOST:PORT)")
        name = options.get("triton_model") or default_model_name(path)
        return _exported_model(manifest, TritonRunner(url, name, manifest), path)
    if backend is Backend.TENSORRT:
        from confkd.inference.runners_trt import TrtRunner, tensorrt_version

        tensorrt_version()  # the install hint when TensorRT is absent
        provider: EngineProvider | None = options.get("engine_provider")
        if provider is None:
            raise ModelLoadError(
                f"{path}: the tensorrt backend needs an engine provider (the engine cache of confkd.export): "
                "use `confkd segment --backend tensorrt`, or pass engine_provider=confkd.export.engine_cache."
                "engine_provider()"
            )
        engine = provider(path, manifest, device, str(options.get("precision", "fp16")))
        return _exported_model(manifest, TrtRunner(engine, manifest, device=device), path)
    from confkd.inference.runners_onnx import OrtRunner

    runner = OrtRunner(path / manifest.model_file, manifest, device=device, threads=options.get("threads"))
    return _exported_model(manifest, runner, path)


def _load_engine(path: Path, backend: Backend, device: torch.device, options: dict[str, Any]) -> LoadedModel:
    """A cached ``<key>.engine`` with its ``<key>.json`` sidecar; refused unless built for this GPU and TensorRT."""
    from confkd.inference.runners_trt import TrtRunner, gpu_identity, sidecar_problem, tensorrt_version

    version = tensorrt_version()
    sidecar_path = path.with_suffix(".json")
    try:
        sidecar = json.loads(sidecar_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelLoadError(
            f"{path}: no readable sidecar {sidecar_path.name}; load the exported directory instead "
            "(the engine is rebuilt from its ONNX)"
        ) from e
    engine = path.read_bytes()
    problem = sidecar_problem(sidecar, engine, gpu=gpu_identity(device), trt_version=version, expected_key=None)
    if problem:
        raise ModelLoadError(f"{path}: refusing a stale or foreign engine: {problem}; load the exported directory")
    manifest = manifest_from_dict(sidecar["manifest"], f"{sidecar_path} manifest")
    return _exported_model(manifest, TrtRunner(engine, manifest, device=device), path)


def _refuse_bare_onnx(path: Path, backend: Backend, device: torch.device, options: dict[str, Any]) -> LoadedModel:
    raise UnsupportedModelError(
        f"{path}: a bare ONNX file carries no manifest; pass the exported directory (manifest.json + model.onnx) "
        "written by `confkd export`"
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
        (Backend.ONNXRUNTIME, Backend.TENSORRT, Backend.TRITON),
        _load_exported,
    ),
    ModelFormat(
        "onnx", "an ONNX model", _suffix_in(".onnx"), (Backend.ONNXRUNTIME, Backend.TENSORRT), _refuse_bare_onnx
    ),
    ModelFormat("tensorrt", "a TensorRT engine", _suffix_in(".engine"), (Backend.TENSORRT,), _load_engine),
    ModelFormat("checkpoint", "a training checkpoint", Path.is_file, (Backend.TORCH,), _load_checkpoint),
)


def _backend(value: str | Backend) -> Backend:
    try:
        return Backend(value)
    except ValueError as e:
        options = ", ".join(b.value for b in Backend)
        raise ConfigError(f"unknown backend {value!r}; available options are: {options}") from e


def _auto_backend(fmt: ModelFormat, device: torch.device, engine_provider: EngineProvider | None) -> Backend:
    """The fastest backend available for this format here (see the module docstring's table)."""
    if fmt.name == "exported":
        from confkd.inference.runners_trt import tensorrt_available

        if engine_provider is not None and device.type == "cuda" and tensorrt_available():
            return Backend.TENSORRT
        return Backend.ONNXRUNTIME
    return fmt.backends[0]


def _ort_has_cuda() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


def load_model(
    path: str | Path,
    *,
    backend: str = "auto",
    device: str = "auto",
    amp: Amp = "auto",
    channels_last: bool = True,
    max_batch: int = 32,
    precision: str = "fp16",
    engine_provider: EngineProvider | None = None,
    threads: int | None = None,
    url: str | None = None,
    triton_model: str | None = None,
) -> LoadedModel:
    """Load a model for inference.

    Args:
        path: a training checkpoint (``.pt``), an exported directory (``confkd export``: ``manifest.json`` +
            ``model.onnx``) or a cached TensorRT ``.engine`` with its sidecar.
        backend: ``"auto"`` (the fastest available for the format, see the module docstring), ``"torch"``,
            ``"onnxruntime"``, ``"tensorrt"`` or ``"triton"`` (a Triton server, ``url``).
        device: ``"auto"`` (CUDA when available, else the CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``. With
            onnxruntime, ``"auto"`` falls back to the CPU when onnxruntime has no CUDA provider.
        amp, channels_last, max_batch: passed to :class:`~confkd.inference.runners.TorchRunner`.
        precision: TensorRT engine precision (``"fp32"`` / ``"fp16"``) asked of ``engine_provider``.
        engine_provider: where the tensorrt backend of an exported directory gets its engine (the cache of
            :mod:`confkd.export.engine_cache`); without one, ``auto`` never picks tensorrt for a directory.
        threads: ONNX Runtime intra-op threads on the CPU (``None``: its default).
        url, triton_model: the triton backend's server (``HOST:PORT``) and model name (default: the one
            ``confkd export --triton`` wrote into the exported directory). The network runs on the server, the
            rest locally on the CPU, so ``device`` must be ``"auto"`` or ``"cpu"``.

    Raises:
        ModelLoadError: missing path, an unrecognised directory, or a backend that cannot run this format.
        UnsupportedModelError: a bare ``.onnx`` file (pass its exported directory).
        ManifestError: an exported directory with a bad manifest or a modified ONNX file.
        CheckpointError: a file that is not a readable confkd checkpoint.
        ConfigError: unknown backend or device name. DeviceError: CUDA requested but absent.
        RunnerError: tensorrt requested without TensorRT installed, or triton without tritonclient (the message
            gives the pip command); a Triton server that is unreachable, not ready, or serves another model.
        Every message starts with the path (or names the bad value) and fits on one line.
    """
    p = Path(path)
    chosen = _backend(backend)
    if chosen is Backend.TRITON and device not in ("auto", "cpu"):
        raise ConfigError(
            f"device {device!r}: with the triton backend the server runs the network on its own GPUs (its "
            "instance_group) and the client works on the CPU; use device auto or cpu"
        )
    dev = torch.device("cpu") if chosen is Backend.TRITON else resolve_device(device)
    if not p.exists():
        raise ModelLoadError(f"{p}: no such file or directory")
    fmt = next((f for f in MODEL_FORMATS if f.matches(p)), None)
    if fmt is None or fmt.loader is None:
        known = "; ".join(f.description for f in MODEL_FORMATS)
        raise ModelLoadError(f"{p}: not a model; expected one of: {known}")
    if chosen is Backend.AUTO:
        chosen = _auto_backend(fmt, dev, engine_provider)
    elif chosen not in fmt.backends:
        runs_on = ", ".join(b.value for b in fmt.backends)
        raise ModelLoadError(
            f"{p}: {fmt.description} runs on the {runs_on} backend, not {chosen.value}; "
            f"use backend auto or {fmt.backends[0].value}"
            + (", or export it first (`confkd export`)" if fmt.name == "checkpoint" else "")
        )
    if chosen is Backend.ONNXRUNTIME and device == "auto" and dev.type == "cuda" and not _ort_has_cuda():
        logger.info("onnxruntime has no CUDA execution provider: running on the CPU")
        dev = torch.device("cpu")
    options = {
        "amp": amp,
        "channels_last": channels_last,
        "max_batch": max_batch,
        "precision": precision,
        "engine_provider": engine_provider,
        "threads": threads,
        "url": url,
        "triton_model": triton_model,
    }
    model = fmt.loader(p, chosen, dev, options)
    logger.info("loaded %s (%s) on %s with %s", p, model.model_version, dev, chosen.value)
    return model
