"""Building a TensorRT engine from an exported ONNX model (TensorRT 10 Python API, imported lazily).

* one explicit optimisation profile: min/opt/max for the batch and every spatial axis (the manifest's bounds);
* fp16: every layer may run in half precision except the normalisations (InstanceNorm / BatchNorm-derived
  reductions: ``ReduceMean``, ``Pow``, ``Sqrt``, ``Div`` of the normalisation, and TensorRT's fused
  ``NORMALIZATION`` layers) and the softmax / entropy tail, which are pinned to fp32 with per-layer precision and
  ``OBEY_PRECISION_CONSTRAINTS``: a variance summed in fp16 overflows on 512x512 slices, and the entropy of
  near-one-hot probabilities loses all its digits in fp16;
* a timing cache file, loaded before and saved after the build;
* every parser error is reported (node, code, description), not just the first.

The layer-selection logic (:func:`keep_fp32`) is plain Python and tested without TensorRT.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from confkd.errors import ExportError
from confkd.inference.runners_trt import TRT_INSTALL_HINT

if TYPE_CHECKING:
    from .engine_cache import EngineProfile

__all__ = ["FP32_LAYER_TYPES", "FP32_OUTPUT_NAMES", "build_engine", "keep_fp32"]

logger = logging.getLogger(__name__)

#: TensorRT layer type names (``trt.LayerType`` members) pinned to fp32 under ``--precision fp16``
FP32_LAYER_TYPES = frozenset({"NORMALIZATION", "SOFTMAX", "REDUCE", "UNARY"})
#: ONNX node name fragments of the deployment head (softmax, log-softmax, entropy) pinned to fp32
FP32_OUTPUT_NAMES = ("softmax", "log", "exp", "reducesum", "neg", "mul_", "instancenorm", "batchnorm")


def keep_fp32(layer_type: str, layer_name: str) -> bool:
    """Whether a layer runs in fp32 in an fp16 engine: normalisation and reduction layers, and the head."""
    name = layer_name.lower()
    return layer_type in FP32_LAYER_TYPES or any(fragment in name for fragment in FP32_OUTPUT_NAMES)


def _import_trt() -> Any:
    try:
        import tensorrt as trt
    except ImportError as e:
        raise ExportError(f"--trt needs TensorRT: {TRT_INSTALL_HINT}") from e
    return trt


def build_engine(
    onnx_path: Path, profile: EngineProfile, precision: str, timing_cache: Path
) -> bytes:  # pragma: no cover - needs TensorRT and an NVIDIA GPU (tests marked trt)
    """Parse ``onnx_path`` and build a serialised engine for ``profile`` in ``precision`` (``fp32``/``fp16``)."""
    trt = _import_trt()
    log = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(log)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, log)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [
            f"node {parser.get_error(i).node()} ({parser.get_error(i).node_name()}): "
            f"{parser.get_error(i).code()} {parser.get_error(i).desc()}"
            for i in range(parser.num_errors)
        ]
        summary = f"{onnx_path}: TensorRT's ONNX parser failed with {len(errors)} error(s): "
        raise ExportError(summary + "; ".join(errors))
    config = builder.create_builder_config()
    opt_profile = builder.create_optimization_profile()
    opt_profile.set_shape(profile.input_name, profile.min_shape, profile.opt_shape, profile.max_shape)
    config.add_optimization_profile(opt_profile)
    if precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        pinned = 0
        for i in range(network.num_layers):
            layer = network.get_layer(i)
            if keep_fp32(layer.type.name, layer.name):
                layer.precision = trt.float32
                for j in range(layer.num_outputs):
                    layer.set_output_type(j, trt.float32)
                pinned += 1
        logger.info("fp16 engine: %d of %d layers pinned to fp32", pinned, network.num_layers)
    for j in range(network.num_outputs):
        network.get_output(j).dtype = trt.float32
    blob = timing_cache.read_bytes() if timing_cache.is_file() else b""
    cache = config.create_timing_cache(blob)
    config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(f"{onnx_path}: TensorRT could not build an engine (profile {profile.to_dict()})")
    from confkd.io_utils import atomic_write_bytes

    atomic_write_bytes(timing_cache, bytes(config.get_timing_cache().serialize()))
    return bytes(serialized)
