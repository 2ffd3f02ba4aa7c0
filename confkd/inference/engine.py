"""The inference path every backend shares: preprocess -> network probabilities -> labels and confidence.

Three stages, so that a pipeline can overlap them (read + :func:`prepare` in reader threads, :func:`infer` on
the device, writing in writer threads); :func:`segment_volume` runs them in a row.

1. :func:`prepare` (CPU): :func:`~confkd.inference.predict.preprocess_image` with the model's resolved
   preprocessing, exactly as training; a 4D volume frame by frame.
2. :func:`infer`: the runner's softmax probabilities in network space (``K x S x H' x W'``; float16 on CUDA for
   2D models, float32 otherwise), slices batched, tiled with Gaussian blending where a slice exceeds the runner's
   ``max_tile`` (3D: always, with the checkpoint's patch size), optionally averaged over flips. Then, a chunk of
   slices at a time (:func:`~confkd.data.preprocessing.invert_chunks`), the probabilities go back to the input
   grid, where the argmax (ties: the lowest class) and the confidence ``1 - H(p) / log K`` of the *final*
   probabilities are taken. No other ``K x volume`` copy is made.

2D models stream: :func:`infer` runs a group of slices at a time (:func:`group_slices`, about
:data:`GROUP_BYTES` of probabilities, aligned to the runner's batches so that the values do not depend on the
grouping) through the network and back to the input grid, and a large volume (over :data:`STREAM_BYTES` of
network input) is not preprocessed whole in :func:`prepare` either: prepare computes the intensity parameters
from the whole volume and each group is normalised, resampled and padded when infer reaches it. Memory beyond
the input and the two results is then a constant, whatever the number of slices; small volumes are still
preprocessed in :func:`prepare`, in the pipeline's reader threads.

The result is on the input grid: ``labels`` and ``confidence`` have the volume's shape (4D for 4D input), ready
to be written with the input as geometry reference.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from confkd.data.preprocessing import PreprocessState, invert_chunks, preprocess_slices, preprocess_state
from confkd.data.volume import Volume, check_voxels
from confkd.errors import ConfKDError, GeometryError
from confkd.inference.runners import Runner
from confkd.inference.tiling import TilePlan, flip_dims, item_unit, plan_tiles, run_windows

if TYPE_CHECKING:
    from confkd.inference.model import LoadedModel

__all__ = [
    "CPU_BATCH_VOXELS",
    "InferenceError",
    "PreparedVolume",
    "SegmentationResult",
    "argmax_lowest",
    "group_slices",
    "infer",
    "labels_and_confidence",
    "prepare",
    "segment_volume",
]

logger = logging.getLogger(__name__)

#: on the CPU, voxels per runner call: small batches stay in cache (measured: 4 slices of 224^2 run faster per
#: slice than 32) and bound the activations' memory (~350 bytes per voxel for the default 2D model)
CPU_BATCH_VOXELS = 1 << 18
#: bytes of one chunk of float32 input-grid probabilities in the postprocessing
CHUNK_BYTES = 32 << 20
#: 2D: bytes of the float32 network-space probabilities of one group of slices streamed through infer
GROUP_BYTES = 32 << 20
#: 2D: a frame whose float32 network input is larger than this is preprocessed group by group inside
#: :func:`infer` instead of whole in :func:`prepare` (smaller ones are prepared whole, in the reader threads)
STREAM_BYTES = 64 << 20


class InferenceError(ConfKDError, RuntimeError):
    """Inference produced unusable output (non-finite probabilities), naming the volume."""


@dataclass
class PreparedVolume:
    """A volume after preprocessing: CPU tensors, or what is needed to stream them, and the way back.

    Attributes:
        images: per frame (one for 3D input), float32 ``[S, C, H', W']`` (2D model) or ``[1, C, D', H', W']``;
            ``None`` for a large 2D frame that :func:`infer` preprocesses group by group from ``sources``.
        states: per frame, the :class:`PreprocessState` for the inverse (the first channel's).
        shape: the input volume's shape, ``(I, J, K)`` or ``(I, J, K, T)``: the shape of the results.
        affine: the input's voxel-to-world affine (4, 4).
        path: the input file, for messages; ``None`` for an in-memory volume.
        timings: seconds spent so far (``"preprocess"``).
        sources: per frame, ``None`` when ``images`` holds it, else per channel the input array (a view, not
            a copy) and its :class:`PreprocessState` (intensity parameters from the whole frame).
    """

    images: list[Tensor | None]
    states: list[PreprocessState]
    shape: tuple[int, ...]
    affine: np.ndarray
    path: Path | None = None
    timings: dict[str, float] = field(default_factory=dict)
    sources: list[list[tuple[np.ndarray | Tensor, PreprocessState]] | None] = field(default_factory=list)

    @property
    def is_4d(self) -> bool:
        return len(self.shape) == 4

    @property
    def spacing(self) -> tuple[float, float, float]:
        s = np.linalg.norm(self.affine[:3, :3], axis=0)
        return float(s[0]), float(s[1]), float(s[2])

    def slices(self, frame: int, start: int = 0, stop: int | None = None) -> Tensor:
        """Network input of frame ``frame``, slices ``start .. stop - 1`` (2D; 3D: the whole frame only).

        A view of ``images[frame]`` when it is held, else preprocessed now from ``sources[frame]``: the same
        values either way.
        """
        image = self.images[frame]
        if image is not None:
            return image[start:stop]
        source = self.sources[frame]
        assert source is not None  # prepare() sets one of the two
        parts = [preprocess_slices(a, st, start, stop, device="cpu") for a, st in source]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


@dataclass
class SegmentationResult:
    """Labels and confidence on the input grid.

    Attributes:
        labels: uint8 (int16 when K > 256) class values, the input volume's shape (4D for 4D input).
        confidence: float32 in [0, 1], ``1 - H(p) / log K`` of the final probabilities (after blending, TTA and
            resampling back), same shape.
        timings: seconds per stage: ``"preprocess"``, ``"infer"``, ``"postprocess"`` (device work is
            synchronised before each clock reading).
    """

    labels: np.ndarray
    confidence: np.ndarray
    timings: dict[str, float]


def _where(path: Path | None) -> str:
    return str(path) if path is not None else "<in-memory volume>"


def _channels(volume: Volume | Sequence[Volume]) -> list[Volume]:
    channels = [volume] if isinstance(volume, Volume) else list(volume)
    if not channels:
        raise GeometryError("prepare: no image given")
    first = channels[0]
    for other in channels[1:]:
        if other.shape != first.shape or not np.allclose(other.affine, first.affine, rtol=0, atol=1e-4):
            raise GeometryError(
                f"{_where(other.path)}: channel of shape {other.shape} does not share the geometry of "
                f"{_where(first.path)} ({first.shape}); the channels of one case must be on one grid"
            )
    return channels


def prepare(volume: Volume | Sequence[Volume], model: LoadedModel, *, max_voxels: int | None = None) -> PreparedVolume:
    """Preprocess a volume for ``model`` on the CPU (safe to run in reader threads).

    ``volume``: one :class:`Volume`, or one per input channel of a multi-channel model (same grid). 4D volumes
    are preprocessed frame by frame, each with its own intensity normalisation, as 3D training volumes are.
    ``max_voxels``: refuse (``VolumeReadError``), before allocating it, a network grid of more voxels: an
    absurd spacing (1e6 mm resampled to 1.5 mm) would otherwise exhaust the memory.
    """
    start = time.perf_counter()
    channels = _channels(volume)
    runner, cfg = model.runner, model.config.preprocess
    where = _where(channels[0].path)
    if len(channels) != runner.in_channels:
        raise GeometryError(
            f"{where}: the model takes {runner.in_channels} image channel(s), got {len(channels)}; pass one "
            "volume per channel (nnU-Net's _0000, _0001, ...)"
        )
    if runner.spatial_dims != cfg.spatial_dims:
        raise GeometryError(
            f"{_where(model.source)}: runner is {runner.spatial_dims}D but the preprocessing is "
            f"{cfg.spatial_dims}D; the model artefact is inconsistent"
        )
    first = channels[0]
    prepared = PreparedVolume([], [], first.shape, np.array(first.affine), first.path)
    for frame in zip(*(c.frames() for c in channels), strict=True):
        # as preprocess_image: each channel normalised on its own, the geometry of the first
        source = [(f.array, preprocess_state(f.array, frame[0].spacing, cfg)) for f in frame]
        state = source[0][1]
        spacing = "x".join(f"{v:.3g}" for v in frame[0].spacing)
        check_voxels(state.network_shape, max_voxels, where, f"resampled from {spacing} mm voxels, the network grid")
        network_bytes = 4 * len(source) * math.prod(state.network_shape)
        streamed = state.spatial_dims == 2 and network_bytes > STREAM_BYTES
        prepared.states.append(state)
        prepared.sources.append(source)
        prepared.images.append(None)
        if not streamed:
            prepared.images[-1] = prepared.slices(len(prepared.images) - 1)
            prepared.sources[-1] = None
    prepared.timings["preprocess"] = time.perf_counter() - start
    logger.debug(
        "prepared %s: %d frame(s) -> %s%s",
        where,
        len(prepared.states),
        prepared.states[0].network_shape,
        " (streamed)" if prepared.images[0] is None else "",
    )
    return prepared


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # note: a CPU-GPU sync point, only so that the timings are honest


def batch_size_for(runner: Runner, tile: Sequence[int]) -> int:
    """Tiles per runner call: ``runner.max_batch``, and on the CPU at most :data:`CPU_BATCH_VOXELS` voxels."""
    n = runner.max_batch
    if runner.device.type == "cpu":
        n = min(n, max(1, CPU_BATCH_VOXELS // math.prod(tile)))
    return n


def tile_plan(prepared_image: Tensor, model: LoadedModel, *, overlap: float = 0.5) -> TilePlan:
    """The tiling of one preprocessed image: 2D up to the runner's ``max_tile``; 3D the patch size.

    3D tile: the checkpoint's ``train.patch_size`` capped by ``max_tile``, either one alone, or the whole
    (padded) volume when neither is set.
    """
    runner = model.runner
    max_tile = runner.max_tile
    if runner.spatial_dims == 3:
        patch = model.config.train.patch_size
        if patch is not None and len(patch) == 3:
            cap = max_tile or patch
            max_tile = tuple(min(a, b) for a, b in zip(patch, cap, strict=True))
    return plan_tiles(tuple(prepared_image.shape[2:]), divisor=runner.divisor, max_tile=max_tile, overlap=overlap)


def group_slices(state: PreprocessState, model: LoadedModel, n_slices: int, *, overlap: float = 0.5) -> int:
    """2D: slices per group streamed through :func:`infer`: about :data:`GROUP_BYTES` of probabilities, rounded
    up to whole runs of the runner's batches (:func:`~confkd.inference.tiling.item_unit`), so that the network
    sees exactly the batches it would see on the whole volume and the results do not depend on the grouping.
    """
    runner = model.runner
    spatial = state.network_shape[1:]
    plan = plan_tiles(spatial, divisor=runner.divisor, max_tile=runner.max_tile, overlap=overlap)
    dtype = torch.float16 if runner.device.type == "cuda" else torch.float32
    unit = item_unit(plan, runner, batch_size=batch_size_for(runner, plan.tile), n_items=n_slices, out_dtype=dtype)
    want = max(1, GROUP_BYTES // (4 * runner.num_classes * math.prod(spatial)))
    return -(-want // unit) * unit


def network_probabilities(
    image: Tensor, model: LoadedModel, *, tta: bool = False, overlap: float = 0.5, pad_value: float = 0.0
) -> Tensor:
    """Softmax probabilities of one preprocessed image in network space, on the runner's device.

    Shape:
        ``[B, C, *spatial]`` -> ``[B, K, *spatial]``: float16 on CUDA for 2D models (each value is written
        once, after blending in float32), float32 otherwise.
    """
    runner = model.runner
    plan = tile_plan(image, model, overlap=overlap)
    dtype = torch.float16 if runner.device.type == "cuda" and runner.spatial_dims == 2 else torch.float32
    out = torch.empty((image.shape[0], runner.num_classes, *image.shape[2:]), dtype=dtype, device=runner.device)
    flips = flip_dims(runner.spatial_dims, tta)
    tiles = run_windows(
        image,
        runner,
        plan,
        out=out,
        flips=flips,
        batch_size=batch_size_for(runner, plan.tile),
        pad_value=pad_value,
    )
    logger.debug("%d tile(s) of %s x %d flip(s) on %s", tiles, plan.tile, len(flips), runner.device)
    return out


def _label_dtype(num_classes: int) -> tuple[np.dtype, torch.dtype]:
    if num_classes <= 256:
        return np.dtype(np.uint8), torch.uint8
    return np.dtype(np.int16), torch.int16


def argmax_lowest(probs: Tensor, dtype: torch.dtype = torch.uint8) -> Tensor:
    """The most probable class per voxel; ties go to the lowest class.

    One pass per class over contiguous memory: faster on the CPU than ``argmax(dim=1)``, whose reduction runs
    across the class stride (measured 0.15 s vs 0.71 s for 16 slices of 512 x 512, K = 4, on 2 cores).

    Shape:
        ``[N, K, *spatial]`` -> ``[N, *spatial]`` of ``dtype``.
    """
    best = probs[:, 0].clone()
    labels = torch.zeros(best.shape, dtype=dtype, device=probs.device)
    for c in range(1, probs.shape[1]):
        better = probs[:, c] > best  # strict: an equal later class does not win
        labels.masked_fill_(better, c)
        torch.maximum(best, probs[:, c], out=best)
    return labels


def labels_and_confidence(probs: Tensor, dtype: torch.dtype = torch.uint8) -> tuple[Tensor, Tensor]:
    """:func:`argmax_lowest` and :func:`~confkd.training.losses.confidence_from_probabilities` in one pass per
    class over contiguous memory (a reduction over the class axis strides across it: 2.4x slower on the CPU for
    10 slices of 216 x 256, K = 4). Same results; the entropy's summation order differs (float32 rounding).

    Shape:
        ``[N, K, *spatial]`` -> labels ``[N, *spatial]`` of ``dtype`` and confidence ``[N, *spatial]`` float32.
    """
    num_classes = probs.shape[1]
    first = probs[:, 0].float().clamp_min(0)
    best = first.clone()
    labels = torch.zeros(best.shape, dtype=dtype, device=probs.device)
    entropy = torch.special.xlogy(first, first)  # minus the entropy, accumulated
    for c in range(1, num_classes):
        pc = probs[:, c].float().clamp_min(0)
        entropy.add_(torch.special.xlogy(pc, pc))
        labels.masked_fill_(pc > best, c)  # strict: an equal later class does not win
        torch.maximum(best, pc, out=best)
    confidence = entropy.mul_(1.0 / math.log(num_classes)).add_(1.0).clamp_(0.0, 1.0)
    return labels, confidence


def _postprocess(probs: Tensor, state: PreprocessState, labels: np.ndarray, confidence: np.ndarray, where: str) -> None:
    """Invert ``probs`` chunk by chunk into the ``[i, j, k]`` arrays ``labels`` and ``confidence`` (views ok)."""
    num_classes = probs.shape[1]
    _, label_torch = _label_dtype(num_classes)
    in_plane = math.prod(state.native_shape[-2:])
    max_slices = max(1, CHUNK_BYTES // (4 * num_classes * in_plane))
    lab_view = np.transpose(labels, state.axis_order)
    conf_view = np.transpose(confidence, state.axis_order)
    for start, chunk in invert_chunks(probs, state, max_slices=max_slices):
        lab, conf = labels_and_confidence(chunk, label_torch)
        if bool(conf.isnan().any()):  # a NaN probability makes its voxel's entropy NaN: checks 1/K of the data
            raise InferenceError(
                f"{where}: the network produced non-finite probabilities (NaN); with mixed precision, try amp='off'"
            )
        stop = start + chunk.shape[0]
        lab_view[start:stop] = lab.cpu().numpy()
        conf_view[start:stop] = conf.cpu().numpy()


def infer(
    prepared: PreparedVolume, model: LoadedModel, *, tta: bool = False, overlap: float = 0.5
) -> SegmentationResult:
    """Run the network on a prepared volume and return labels and confidence on its input grid.

    Args:
        prepared: from :func:`prepare` with the same model.
        model: from :func:`~confkd.inference.model.load_model`.
        tta: average the probabilities over flips of the spatial axes (2D: 4 passes, 3D: 8).
        overlap: fraction of a tile shared with its neighbour when tiling (nnU-Net / MONAI default 0.5).

    Raises:
        InferenceError: the network produced NaN or infinite probabilities.
    """
    runner = model.runner
    device = runner.device
    label_np, _ = _label_dtype(runner.num_classes)
    labels = np.empty(prepared.shape, dtype=label_np)
    confidence = np.empty(prepared.shape, dtype=np.float32)
    timings = {"preprocess": prepared.timings.get("preprocess", 0.0), "infer": 0.0, "postprocess": 0.0}
    where = _where(prepared.path)
    with torch.inference_mode():
        for t, state in enumerate(prepared.states):
            frame = (Ellipsis, t) if prepared.is_4d else (Ellipsis,)
            groups: list[tuple[int, int | None]] = [(0, None)]
            if state.spatial_dims == 2:
                n = state.network_shape[0]
                size = group_slices(state, model, n, overlap=overlap)
                groups = [(g0, min(g0 + size, n)) for g0 in range(0, n, size)]
            for g0, g1 in groups:
                start = time.perf_counter()
                image = prepared.slices(t, g0, g1)
                middle = time.perf_counter()
                probs = network_probabilities(image, model, tta=tta, overlap=overlap, pad_value=state.pad_value)
                del image
                _sync(device)
                end = time.perf_counter()
                if g1 is None:
                    _postprocess(probs, state, labels[frame], confidence[frame], where)
                else:  # the group's input slices: 2D never resamples along the slice axis
                    part = [slice(None)] * 3
                    part[state.slice_axis] = slice(g0, g1)
                    shape = list(state.original_shape)
                    shape[state.slice_axis] = g1 - g0
                    sub = dataclasses.replace(state, original_shape=tuple(shape))
                    _postprocess(probs, sub, labels[frame][tuple(part)], confidence[frame][tuple(part)], where)
                del probs
                _sync(device)
                if prepared.images[t] is None:
                    timings["preprocess"] += middle - start
                timings["infer"] += end - middle
                timings["postprocess"] += time.perf_counter() - end
    logger.debug("segmented %s in %s", where, {k: round(v, 3) for k, v in timings.items()})
    return SegmentationResult(labels=labels, confidence=confidence, timings=timings)


def segment_volume(
    volume: Volume | Sequence[Volume], model: LoadedModel, *, tta: bool = False, overlap: float = 0.5
) -> SegmentationResult:
    """:func:`prepare` then :func:`infer`: labels and confidence of one volume on its own grid."""
    return infer(prepare(volume, model), model, tta=tta, overlap=overlap)
