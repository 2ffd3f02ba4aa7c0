"""The TensorRT runner, and the check that an engine file may be loaded on this machine.

``tensorrt`` is imported when a runner is built, never at module import, so this module imports on any machine.
Inputs and outputs are torch CUDA tensors whose pointers are handed to the execution context (no copies).

An engine is only valid for the ONNX graph, GPU, TensorRT version, precision and profile it was built for
(``trt_engines/README.md``). Every engine has a JSON sidecar recording those fields and the engine's sha256;
:func:`sidecar_problem` compares a sidecar with the running machine and the engine bytes, and any mismatch means
"rebuild" (:mod:`confkd.export.engine_cache`) or "refuse" (a bare ``.engine`` file given to ``confkd segment``).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from confkd.errors import DeviceError
from confkd.inference.manifest import Manifest
from confkd.inference.runners import ExportedModelRunner, RunnerError, check_runner_input, run_in_batches

__all__ = [
    "SIDECAR_FIELDS",
    "GpuIdentity",
    "TrtRunner",
    "gpu_identity",
    "sidecar_problem",
    "tensorrt_available",
    "tensorrt_version",
]

logger = logging.getLogger(__name__)

#: the fields a sidecar must hold (the key's parts, the engine hash, and the manifest it serves)
SIDECAR_FIELDS = (
    "key",
    "onnx_sha256",
    "gpu_name",
    "compute_capability",
    "tensorrt_version",
    "precision",
    "profile",
    "engine_sha256",
    "built_at",
    "manifest",
)

TRT_INSTALL_HINT = "pip install 'confkd[trt]' (TensorRT needs an NVIDIA GPU)"

GpuIdentity = tuple[str, str]  # (name, compute capability "sm_90")


def tensorrt_available() -> bool:
    """Whether ``import tensorrt`` would succeed (without importing it)."""
    import importlib.util

    return importlib.util.find_spec("tensorrt") is not None


def tensorrt_version() -> str:
    """The installed TensorRT's version. Raises :class:`RunnerError` with the install hint when absent."""
    try:
        import tensorrt as trt
    except ImportError as e:
        raise RunnerError(f"the tensorrt backend needs TensorRT: {TRT_INSTALL_HINT}") from e
    return str(trt.__version__)


def gpu_identity(device: torch.device) -> GpuIdentity:
    """GPU name and compute capability of a CUDA device, e.g. ``("NVIDIA H100 80GB HBM3", "sm_90")``."""
    if device.type != "cuda" or not torch.cuda.is_available():
        raise DeviceError(f"TensorRT runs on an NVIDIA GPU; device {device} is not one (use --backend onnxruntime)")
    major, minor = torch.cuda.get_device_capability(device)
    return torch.cuda.get_device_name(device), f"sm_{major}{minor}"


def sidecar_problem(
    sidecar: Mapping[str, Any], engine_bytes: bytes, *, gpu: GpuIdentity, trt_version: str, expected_key: str | None
) -> str | None:
    """Why an engine must not be loaded here (``None``: it may be).

    Checks the sidecar's fields, its key (when the caller computed one), the running GPU and TensorRT version, and
    the engine bytes' sha256 (a truncated or swapped file).
    """
    missing = [f for f in SIDECAR_FIELDS if f not in sidecar]
    if missing:
        return f"sidecar lacks {', '.join(missing)}"
    if expected_key is not None and sidecar["key"] != expected_key:
        return f"sidecar key {str(sidecar['key'])[:12]}... is not the expected {expected_key[:12]}..."
    if (sidecar["gpu_name"], sidecar["compute_capability"]) != tuple(gpu):
        return f"built for {sidecar['gpu_name']} ({sidecar['compute_capability']}), this is {gpu[0]} ({gpu[1]})"
    if sidecar["tensorrt_version"] != trt_version:
        return f"built by TensorRT {sidecar['tensorrt_version']}, this is TensorRT {trt_version}"
    if hashlib.sha256(engine_bytes).hexdigest() != sidecar["engine_sha256"]:
        return "engine bytes do not match the sidecar's sha256 (corrupt or replaced file)"
    return None


class TrtRunner(ExportedModelRunner):  # pragma: no cover - needs TensorRT and an NVIDIA GPU (tests marked trt)
    """Run a serialised TensorRT engine built from an exported model.

    Args:
        engine_bytes: the serialised engine (already checked with :func:`sidecar_problem`).
        manifest: the exported model's manifest: shapes, divisor; the bounds are the engine's profile, so
            ``max_tile`` / ``max_batch`` come from them.
        device: the CUDA device the engine was built for.
    """

    name = "tensorrt"

    def __init__(self, engine_bytes: bytes, manifest: Manifest, *, device: torch.device) -> None:
        try:
            import tensorrt as trt
        except ImportError as e:
            raise RunnerError(f"the tensorrt backend needs TensorRT: {TRT_INSTALL_HINT}") from e
        if device.type != "cuda":
            raise DeviceError(f"TensorRT runs on an NVIDIA GPU; device {device} is not one")
        self._init_from_manifest(manifest, device)
        self._logger = trt.Logger(trt.Logger.WARNING)
        with torch.cuda.device(device):
            self._runtime = trt.Runtime(self._logger)
            self.engine = self._runtime.deserialize_cuda_engine(engine_bytes)
            if self.engine is None:
                raise RunnerError("TensorRT could not deserialise the engine (built by another version or GPU?)")
            self.context = self.engine.create_execution_context()

    def __call__(self, x: Tensor) -> Tensor:
        """``[N, C, *tile]`` float32 -> probabilities ``[N, K, *tile]`` float32 on the GPU."""
        check_runner_input(self, x)
        if any(s < m for s, m in zip(x.shape[2:], self.min_tile, strict=True)):
            raise RunnerError(f"tensorrt runner: tile {tuple(x.shape[2:])} is below the profile's min {self.min_tile}")
        return run_in_batches(x, self.max_batch, self._run)

    def _run(self, x: Tensor) -> Tensor:
        x = x.detach().to(self.device, torch.float32).contiguous()
        n, spatial = x.shape[0], tuple(x.shape[2:])
        probs = torch.empty((n, self.num_classes, *spatial), dtype=torch.float32, device=self.device)
        entropy = torch.empty((n, *spatial), dtype=torch.float32, device=self.device)
        self.context.set_input_shape(self.input_name, tuple(x.shape))
        self.context.set_tensor_address(self.input_name, x.data_ptr())
        self.context.set_tensor_address(self.output_names[0], probs.data_ptr())
        self.context.set_tensor_address(self.output_names[1], entropy.data_ptr())
        stream = torch.cuda.current_stream(self.device)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RunnerError(f"TensorRT execution failed for input shape {tuple(x.shape)}")
        return probs
