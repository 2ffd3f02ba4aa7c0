"""Network runners: one callable protocol that every backend implements, and the PyTorch runner.

A :class:`Runner` turns a batch of preprocessed tiles into softmax probabilities on its device. Everything
else (preprocessing, batching, sliding window with Gaussian blending, flip TTA, the inverse, argmax and
confidence) lives in :mod:`confkd.inference.engine` and is shared by every backend, as MONAI's
``sliding_window_inference`` takes any callable predictor. ONNX Runtime and TensorRT runners (the export issue)
implement the same protocol.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import Literal, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from confkd.errors import ConfigError, ConfKDError, GeometryError
from confkd.inference.manifest import Manifest
from confkd.training.distributed import resolve_amp, resolve_device

__all__ = ["Amp", "Runner", "RunnerError", "TorchRunner", "check_runner_input", "run_in_batches"]

logger = logging.getLogger(__name__)

Amp = Literal["off", "bf16", "fp16", "auto"]


class RunnerError(ConfKDError, RuntimeError):
    """A runner cannot be built, or returned something other than ``[N, K, *tile]`` probabilities."""


@runtime_checkable
class Runner(Protocol):
    """What the engine needs from a backend.

    Attributes:
        name: ``"torch"``, ``"onnxruntime"`` or ``"tensorrt"``.
        device: where inputs are expected and outputs are returned.
        spatial_dims: 2 (slices) or 3 (volumes).
        in_channels: image channels ``C``.
        num_classes: output classes ``K``, background included.
        divisor: every spatial size of an input must be a multiple of this (``2**depth``).
        max_tile: largest spatial input size accepted (``None``: unlimited); larger inputs are tiled by the engine.
        max_batch: largest batch per call.

    Shape:
        ``__call__``: float32 ``[N, C, *tile]`` on ``device``, ``N <= max_batch``, each tile size a multiple of
        ``divisor`` and at most ``max_tile`` -> float32 softmax probabilities ``[N, K, *tile]`` on ``device``.
        The result may be a buffer the runner reuses on its next call (TensorRT output bindings): consume or copy
        it before calling again, and never modify it in place.
    """

    name: str
    device: torch.device
    spatial_dims: int
    in_channels: int
    num_classes: int
    divisor: int
    max_tile: tuple[int, ...] | None
    max_batch: int

    def __call__(self, x: Tensor) -> Tensor: ...


def run_in_batches(x: Tensor, max_batch: int, run: Callable[[Tensor], Tensor]) -> Tensor:
    """``run`` on ``x`` at most ``max_batch`` samples at a time; the results concatenated along the batch axis."""
    parts = [run(x[start : start + max_batch]) for start in range(0, x.shape[0], max_batch)]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def check_runner_input(runner: Runner, x: Tensor) -> None:
    """Raise :class:`GeometryError` unless ``x`` is a batch ``runner`` accepts (rank, channels, sizes, batch).

    The message names the offending size and the fix, as :func:`~confkd.training.network.check_input_shape`.
    """
    nd = runner.spatial_dims
    if x.dim() != nd + 2 or x.shape[1] != runner.in_channels:
        layout = "N, C, H, W" if nd == 2 else "N, C, D, H, W"
        raise GeometryError(
            f"{runner.name} runner: expected [{layout}] with C={runner.in_channels}, got shape {tuple(x.shape)}"
        )
    spatial = tuple(int(s) for s in x.shape[2:])
    if any(s % runner.divisor for s in spatial):
        raise GeometryError(
            f"{runner.name} runner: tile size {spatial} is not a multiple of {runner.divisor}; pad or tile the input"
        )
    if runner.max_tile is not None and any(s > m for s, m in zip(spatial, runner.max_tile, strict=True)):
        raise GeometryError(
            f"{runner.name} runner: tile size {spatial} exceeds max_tile {runner.max_tile}; use the sliding window"
        )


def _memory_format(spatial_dims: int) -> torch.memory_format:
    return torch.channels_last if spatial_dims == 2 else torch.channels_last_3d


class TorchRunner:
    """The student network (encoder + student decoder) of a checkpoint, run with PyTorch.

    Args:
        network: a module with one tensor in and logits out, carrying ``spatial_dims``, ``in_channels``,
            ``num_classes`` and ``divisor`` attributes: :class:`~confkd.training.network.SegmentationNetwork`
            from ``model.student_network()``. It is moved to ``device`` and put in eval mode (in place).
        device: ``torch.device``, or a string for :func:`~confkd.training.distributed.resolve_device`
            (``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"``).
        amp: autocast dtype: ``"auto"`` is bf16 on CUDA when supported, else fp16, and off on the CPU; ``"bf16"``
            and ``"fp16"`` force it (also on the CPU); ``"off"`` runs float32.
        channels_last: NHWC / NDHWC weights and inputs. Measured faster on the CPU too (oneDNN, default model at
            224x224: ~75 vs ~42 slices/s on 2 cores), so it is not restricted to CUDA.
        max_batch: largest batch per forward pass; bigger calls are split.
        max_tile: advertised tile limit (``None``: any size; PyTorch has no fixed input shape).

    Calls run under :func:`torch.inference_mode`, so outputs are inference tensors.
    """

    name = "torch"

    def __init__(
        self,
        network: nn.Module,
        *,
        device: str | torch.device,
        amp: Amp = "auto",
        channels_last: bool = True,
        max_batch: int = 32,
        max_tile: tuple[int, ...] | None = None,
    ) -> None:
        self.device = device if isinstance(device, torch.device) else resolve_device(device)
        if hasattr(network, "teacher"):
            raise RunnerError(
                f"TorchRunner runs the deployable student only; got a {type(network).__name__} with a teacher "
                "decoder: pass model.student_network()"
            )
        try:
            self.spatial_dims = int(network.spatial_dims)  # type: ignore[arg-type]
            self.in_channels = int(network.in_channels)  # type: ignore[arg-type]
            self.num_classes = int(network.num_classes)  # type: ignore[arg-type]
            self.divisor = int(network.divisor)  # type: ignore[arg-type]
        except AttributeError as e:
            raise RunnerError(
                f"TorchRunner needs a network with spatial_dims, in_channels, num_classes and divisor attributes "
                f"(model.student_network()); {type(network).__name__} lacks {e.name}"
            ) from e
        if not isinstance(max_batch, int) or max_batch < 1:
            raise ConfigError(f"max_batch must be a positive integer, got {max_batch!r}")
        if max_tile is not None:
            max_tile = tuple(int(s) for s in max_tile)
            if len(max_tile) != self.spatial_dims or any(s < self.divisor for s in max_tile):
                raise ConfigError(
                    f"max_tile {max_tile} must be {self.spatial_dims} sizes of at least {self.divisor} (the divisor)"
                )
        self.max_batch = max_batch
        self.max_tile = max_tile
        self.amp = resolve_amp(amp, self.device)
        self.memory_format = _memory_format(self.spatial_dims) if channels_last else torch.contiguous_format
        network.to(self.device).eval()
        if channels_last:
            network.to(memory_format=self.memory_format)  # type: ignore[call-overload]  # missing from the stubs
        self.network = network
        logger.debug(
            "torch runner on %s: amp %s, %s, max_batch %d, max_tile %s",
            self.device,
            self.amp,
            self.memory_format,
            max_batch,
            max_tile,
        )

    def __repr__(self) -> str:
        return (
            f"TorchRunner(device={self.device}, spatial_dims={self.spatial_dims}, classes={self.num_classes}, "
            f"amp={self.amp}, memory_format={self.memory_format}, max_batch={self.max_batch})"
        )

    def _autocast(self) -> contextlib.AbstractContextManager[object]:
        if self.amp is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp)

    @torch.inference_mode()
    def __call__(self, x: Tensor) -> Tensor:
        """Softmax probabilities, float32 ``[N, K, *tile]`` on :attr:`device` (see :class:`Runner`)."""
        check_runner_input(self, x)
        x = x.to(device=self.device, dtype=torch.float32, non_blocking=True)
        if self.memory_format != torch.contiguous_format:
            x = x.contiguous(memory_format=self.memory_format)
        return run_in_batches(x, self.max_batch, self._probabilities)

    def _probabilities(self, x: Tensor) -> Tensor:
        with self._autocast():
            logits = self.network(x)
        if not isinstance(logits, Tensor):
            raise RunnerError(
                f"the network returned {type(logits).__name__}, not a logits tensor; pass model.student_network()"
            )
        # softmax outside autocast, in float32; back to the standard layout the engine indexes
        return torch.softmax(logits.float(), dim=1).contiguous()


class ExportedModelRunner:
    """What every runner over an exported model reads from its manifest (the Runner fields and the I/O names)."""

    device: torch.device
    spatial_dims: int
    in_channels: int
    num_classes: int
    divisor: int
    max_tile: tuple[int, ...] | None
    min_tile: tuple[int, ...]
    max_batch: int
    input_name: str
    output_names: list[str]

    def _init_from_manifest(self, manifest: Manifest, device: torch.device) -> None:
        self.device = device
        self.spatial_dims = manifest.spatial_dims
        self.in_channels = manifest.in_channels
        self.num_classes = manifest.num_classes
        self.divisor = manifest.divisor
        self.max_tile = tuple(manifest.bounds.max_spatial)
        self.min_tile = tuple(manifest.bounds.min_spatial)
        self.max_batch = manifest.bounds.batch[2]
        self.input_name = manifest.input_name
        self.output_names = list(manifest.output_names)
