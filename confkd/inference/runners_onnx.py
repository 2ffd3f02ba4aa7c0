"""The ONNX Runtime runner: an exported student graph behind the :class:`~confkd.inference.runners.Runner` protocol.

``onnxruntime`` is imported when a runner is built, never when this module is imported (``import confkd`` stays
light). Execution providers: the CPU always; CUDA and TensorRT when ``onnxruntime-gpu`` provides them and the runner
is asked for a CUDA device.

The graph has two outputs, ``probabilities`` and ``entropy``. The runner returns the probabilities only: the
segment pipeline blends tiles, averages flips and resamples back to the input grid, and the confidence it reports
is defined on those *final* probabilities, so it is recomputed there. The graph's ``entropy`` output serves callers
that use the network output directly (one tile, no resampling).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from confkd.inference.manifest import Manifest
from confkd.inference.runners import ExportedModelRunner, RunnerError, check_runner_input, run_in_batches

__all__ = ["OrtRunner", "ort_providers"]

logger = logging.getLogger(__name__)


def ort_providers(device: torch.device, available: list[str]) -> list[str]:
    """The execution providers to request, best first: TensorRT and CUDA for a CUDA device, always the CPU last.

    Raises:
        RunnerError: a CUDA device was asked for but this onnxruntime has no CUDA provider.
    """
    if device.type != "cuda":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in available:
        raise RunnerError(
            f"onnxruntime has no CUDA execution provider (available: {', '.join(available)}); install "
            "onnxruntime-gpu (pip uninstall -y onnxruntime && pip install 'confkd[gpu]') or use --device cpu"
        )
    wanted = ["TensorrtExecutionProvider", "CUDAExecutionProvider"]
    return [p for p in wanted if p in available] + ["CPUExecutionProvider"]


class OrtRunner(ExportedModelRunner):
    """Run ``model.onnx`` of an exported directory with ONNX Runtime.

    Args:
        onnx_path: the ONNX file (its hash is checked by :func:`~confkd.inference.manifest.load_manifest`).
        manifest: its manifest: shapes, divisor and the declared bounds (``max_tile`` / ``max_batch``).
        device: ``cpu`` or ``cuda[:N]``; a CUDA device needs onnxruntime-gpu.
        threads: intra-op threads on the CPU (``None``: ONNX Runtime's default, one per physical core).
    """

    name = "onnxruntime"

    def __init__(
        self, onnx_path: Path, manifest: Manifest, *, device: torch.device, threads: int | None = None
    ) -> None:
        import onnxruntime as ort  # lazy: heavy, and optional for a torch-only user

        self._init_from_manifest(manifest, device)
        self.output_name = self.output_names[0]
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads is not None:
            options.intra_op_num_threads = threads
        self.providers = ort_providers(device, list(ort.get_available_providers()))
        provider_options: list[dict[str, Any]] = [
            {"device_id": device.index or 0} if p != "CPUExecutionProvider" else {} for p in self.providers
        ]
        try:
            self.session = ort.InferenceSession(
                str(onnx_path), sess_options=options, providers=self.providers, provider_options=provider_options
            )
        except Exception as e:  # onnxruntime raises its own exception types for a bad graph
            raise RunnerError(f"{onnx_path}: ONNX Runtime cannot load the model ({type(e).__name__}: {e})") from e
        logger.info("onnxruntime session on %s (providers %s)", device, ", ".join(self.session.get_providers()))

    def __call__(self, x: Tensor) -> Tensor:
        """``[N, C, *tile]`` float32 -> softmax probabilities ``[N, K, *tile]`` float32 on ``device``."""
        check_runner_input(self, x)
        return run_in_batches(x, self.max_batch, self._cuda if self.device.type == "cuda" else self._cpu)

    def _cpu(self, x: Tensor) -> Tensor:
        array = np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())
        (probs,) = self.session.run([self.output_name], {self.input_name: array})
        return torch.from_numpy(probs)

    def _cuda(self, x: Tensor) -> Tensor:  # pragma: no cover - needs onnxruntime-gpu and a GPU
        # IO binding on torch's CUDA buffers: no host round trip
        x = x.detach().to(self.device, torch.float32).contiguous()
        out = torch.empty((x.shape[0], self.num_classes, *x.shape[2:]), dtype=torch.float32, device=self.device)
        binding = self.session.io_binding()
        index = self.device.index or 0
        binding.bind_input(self.input_name, "cuda", index, np.float32, tuple(x.shape), x.data_ptr())
        binding.bind_output(self.output_name, "cuda", index, np.float32, tuple(out.shape), out.data_ptr())
        self.session.run_with_iobinding(binding)
        return out
