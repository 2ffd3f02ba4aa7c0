"""``confkd export``: the deployable student of a checkpoint as a verified, self-describing ONNX model.

:func:`export_model` writes ``MODEL_DIR/model.onnx`` and ``MODEL_DIR/manifest.json`` (schema:
:mod:`confkd.inference.manifest`). The graph is the shared encoder and the *student* decoder only, wrapped by
:class:`ProbabilitiesAndEntropy`:

* input ``image``: float32 ``[N, C, H, W]`` (2D) or ``[N, C, D, H, W]`` (3D), batch and spatial axes dynamic, each
  spatial size a multiple of the divisor and within the manifest's declared bounds;
* outputs ``probabilities`` ``[N, K, *spatial]`` (softmax over classes) and ``entropy`` ``[N, *spatial]``
  (Shannon entropy in nats; confidence = 1 - entropy / log K).

Exporter: the TorchScript-based one (``dynamo=False``). The torch.export-based exporter needs ``onnxscript``, which
confkd does not depend on, and gives nothing this graph needs (convolutions, norms, softmax: all traced exactly,
with no data-dependent control flow). The network skips its shape checks while tracing so that no example size is
baked into the graph.

The export happens in a temporary sibling of MODEL_DIR that is renamed into place only after the full ONNX checker
and the verification against PyTorch pass; a failure leaves no MODEL_DIR behind.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from confkd.errors import ExportError
from confkd.inference.manifest import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST_NAME,
    Bounds,
    Manifest,
    canonical_json,
    file_sha256,
)
from confkd.io_utils import atomic_write_text
from confkd.training.checkpoint import CheckpointError, checkpoint_config, load_student
from confkd.training.network import SegmentationNetwork, count_parameters

from .manifest import build_manifest, config_sha256, default_bounds, metadata_props
from .verify import Verification, verify_onnx

__all__ = [
    "DEFAULT_OPSET",
    "INPUT_NAME",
    "MODEL_FILE",
    "OUTPUT_NAMES",
    "ExportResult",
    "ProbabilitiesAndEntropy",
    "check_no_teacher",
    "export_model",
    "load_student",
]

logger = logging.getLogger(__name__)

DEFAULT_OPSET = 17  # LayerNorm/InstanceNorm fused ops, TensorRT 8.6+ and onnxruntime >= 1.14 all read it
MODEL_FILE = "model.onnx"
INPUT_NAME = "image"
OUTPUT_NAMES = ("probabilities", "entropy")
_AXES = {2: ("height", "width"), 3: ("depth", "height", "width")}


class ProbabilitiesAndEntropy(nn.Module):
    """The student network with its deployment head: logits -> (probabilities, entropy).

    Shape:
        ``[N, C, *spatial]`` -> ``([N, K, *spatial], [N, *spatial])``. The entropy uses ``log_softmax`` (exact for
        probabilities that underflow to 0, unlike ``log(p)``).
    """

    def __init__(self, network: SegmentationNetwork) -> None:
        super().__init__()
        self.network = network

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        logits = self.network(x)
        log_p = torch.log_softmax(logits, dim=1)
        p = torch.exp(log_p)
        return p, -(p * log_p).sum(dim=1)


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_model` wrote: the directory, its manifest and the verification numbers."""

    model_dir: Path
    onnx_path: Path
    manifest: Manifest
    verification: Verification


def check_no_teacher(model: Any, student: nn.Module, where: str) -> int:
    """Raise :class:`ExportError` unless the ONNX ``model``'s weights can only be the student's.

    Checks: no initializer name mentions ``teacher``, and the float initializers hold no more values than the
    student's state (parameters and buffers; constant folding may fuse some, never add a decoder's worth).
    Returns the number of float values in the initializers.
    """
    from onnx import TensorProto

    names = [init.name for init in model.graph.initializer]
    leaked = [n for n in names if "teacher" in n.lower()]
    if leaked:
        raise ExportError(f"{where}: teacher weights in the exported graph ({', '.join(leaked[:5])}); export refused")
    floats = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16)
    values = sum(math.prod(init.dims) for init in model.graph.initializer if init.data_type in floats)
    budget = sum(t.numel() for t in student.state_dict().values() if t.is_floating_point())
    if values > budget:
        raise ExportError(
            f"{where}: the graph holds {values} weight values but the student has {budget} "
            f"({count_parameters(student)} parameters); something besides the student was exported"
        )
    return values


def _verification_sizes(bounds: Bounds, divisor: int, spatial_dims: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Two different spatial sizes inside the bounds: the opt size (capped for CPU time) and a smaller,
    non-square one."""
    cap = 256 if spatial_dims == 2 else 64
    a = tuple(
        max(lo, min(o, cap // divisor * divisor)) for lo, o in zip(bounds.min_spatial, bounds.opt_spatial, strict=True)
    )
    b = []
    for i, (lo, s, hi) in enumerate(zip(bounds.min_spatial, a, bounds.max_spatial, strict=True)):
        size = max(lo, (s * (5 + i) // 8) // divisor * divisor)
        if size == s:
            size = s + divisor if s + divisor <= hi else max(lo, s - divisor)
        b.append(size)
    return a, tuple(b)


def _fit(x: Tensor, size: tuple[int, ...]) -> Tensor:
    """Centre-crop or zero-pad the spatial axes of ``[N, C, *spatial]`` to ``size``."""
    for axis, target in enumerate(size, start=2):
        n = x.shape[axis]
        if n > target:
            start = (n - target) // 2
            x = x.narrow(axis, start, target)
        elif n < target:
            pad = [0, 0] * (x.dim() - 2)
            before = (target - n) // 2
            index = 2 * (x.dim() - 1 - axis)
            pad[index], pad[index + 1] = before, target - n - before
            x = torch.nn.functional.pad(x, pad)
    return x.contiguous()


def _phantom_batch(seed: int, batch: int, size: tuple[int, ...], ckpt: dict[str, Any]) -> Tensor:
    """A phantom volume through the checkpoint's own preprocessing, cut to ``[batch, C, *size]``."""
    from confkd.data.phantoms import make_phantom
    from confkd.inference.predict import preprocess_image

    config = checkpoint_config(ckpt)
    channels = config.model.in_channels
    ph = make_phantom(seed, size=(max(64, size[-1]), max(64, size[-2])), slices=max(8, batch))
    x, _ = preprocess_image([ph.image] * channels, ph.spacing, config.preprocess, device="cpu")
    if x.shape[0] >= batch:
        middle = (x.shape[0] - batch) // 2
        x = x[middle : middle + batch]
    else:
        x = x.repeat(math.ceil(batch / x.shape[0]), *([1] * (x.dim() - 1)))[:batch]
    return _fit(x.float(), size)


def _verification_inputs(ckpt: dict[str, Any], bounds: Bounds, divisor: int, nd: int, c: int) -> list[Any]:
    a, b = _verification_sizes(bounds, divisor, nd)
    lo, _, hi = bounds.batch
    n1, n2 = max(lo, min(2, hi)), max(lo, min(3, hi))
    gen = torch.Generator().manual_seed(0)
    return [
        ("random", torch.randn((n1, c, *a), generator=gen)),
        ("random", torch.randn((n2, c, *b), generator=gen)),
        ("phantom", _phantom_batch(1, n1, a, ckpt)),
        ("phantom", _phantom_batch(2, n2, b, ckpt)),
    ]


def _versions(ckpt: dict[str, Any]) -> dict[str, str]:
    import onnx

    import confkd

    return {
        "model": str(ckpt.get("versions", {}).get("confkd", "unknown")),
        "confkd": confkd.__version__,
        "torch": str(torch.__version__),
        "onnx": str(onnx.__version__),
    }


def _trace(wrapper: nn.Module, example: Tensor, opset: int, nd: int, path: Path) -> None:
    axes = {0: "batch", **{i + 2: name for i, name in enumerate(_AXES[nd])}}
    dynamic = {
        INPUT_NAME: axes,
        OUTPUT_NAMES[0]: axes,
        OUTPUT_NAMES[1]: {0: "batch", **{i + 1: name for i, name in enumerate(_AXES[nd])}},
    }
    with warnings.catch_warnings():
        # the legacy exporter's deprecation notice, and "instance_norm ... train=True": InstanceNorm without
        # running statistics normalises by each image's own statistics in eval mode too, which is what we want
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(
                wrapper,
                (example,),
                str(path),
                dynamo=False,
                input_names=[INPUT_NAME],
                output_names=list(OUTPUT_NAMES),
                dynamic_axes=dynamic,
                opset_version=opset,
                do_constant_folding=True,
            )
        except Exception as e:  # the exporter raises many types (SymbolicValueError, RuntimeError, ...)
            raise ExportError(f"torch.onnx.export failed at opset {opset}: {type(e).__name__}: {e}") from e


def _prepare_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{out}: already exists and is not an empty folder; choose another --out or remove it")


def export_model(
    checkpoint: str | Path, out: str | Path, *, opset: int = DEFAULT_OPSET, bounds: Bounds | None = None
) -> ExportResult:
    """Export the checkpoint's student to ``out`` (a new folder): ``model.onnx`` + ``manifest.json``.

    Raises:
        CheckpointError: unreadable checkpoint. ExportError: ``out`` is in the way, the exporter or the ONNX
            checker failed, or teacher weights reached the graph. VerificationError: ONNX Runtime disagrees with
            PyTorch beyond the tolerances of :mod:`confkd.export.verify`. In every case ``out`` is not created.
    """
    import onnx

    out = Path(out)
    _prepare_out(out)
    student, ckpt = load_student(checkpoint)
    config = checkpoint_config(ckpt)
    nd, divisor = config.preprocess.spatial_dims, student.divisor
    labels = ckpt["labels"]
    ignore = labels.get("ignore_index")
    values = [i for i in range(len(labels["names"])) if i != ignore]
    if len(values) != student.num_classes:
        raise CheckpointError(f"{checkpoint}: {len(values)} label names for {student.num_classes} classes")
    if bounds is None:
        bounds = default_bounds(nd, divisor, config.train.patch_size)
    bounds.check_divisor(divisor)
    wrapper = ProbabilitiesAndEntropy(student).eval()
    # the trace's example size does not matter (axes are dynamic), but InstanceNorm needs > 1 voxel at the bottleneck
    size = tuple(min(o, 4 * divisor) for o in bounds.opt_spatial)
    example = torch.randn(min(2, bounds.batch[2]), student.in_channels, *size)
    fields: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_file": MODEL_FILE,
        "input_name": INPUT_NAME,
        "output_names": list(OUTPUT_NAMES),
        "spatial_dims": nd,
        "in_channels": student.in_channels,
        "num_classes": student.num_classes,
        "divisor": divisor,
        "bounds": bounds.to_dict(),
        "preprocessing": ckpt["preprocessing"],
        "config": ckpt["config"],
        "labels": {
            "names": [str(labels["names"][v]) for v in values],
            "values": values,
            "ignore_index": ignore,
        },
        "model_version": f"confkd {_versions(ckpt)['model']} / {config.name}.yaml",
        "versions": _versions(ckpt),
        "config_sha256": config_sha256(ckpt["config"]),
        "checkpoint_sha256": file_sha256(Path(checkpoint)),
        "opset": opset,
    }
    fields = _json_clean(fields)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        _trace(wrapper, example, opset, nd, tmp / "traced.onnx")
        model = onnx.load(str(tmp / "traced.onnx"))
        (tmp / "traced.onnx").unlink()
        check_no_teacher(model, student, str(checkpoint))
        for key, value in metadata_props(fields).items():
            model.metadata_props.add(key=key, value=value)
        model.producer_name = "confkd"
        onnx_path = tmp / MODEL_FILE
        onnx.save(model, str(onnx_path))
        try:
            onnx.checker.check_model(str(onnx_path), full_check=True)
        except onnx.checker.ValidationError as e:
            raise ExportError(f"{checkpoint}: the exported graph fails onnx.checker (full check): {e}") from e
        inputs = _verification_inputs(ckpt, bounds, divisor, nd, student.in_channels)
        verification = verify_onnx(onnx_path, wrapper, inputs, input_name=INPUT_NAME)
        manifest = build_manifest(
            {**fields, "onnx_sha256": file_sha256(onnx_path), "verification": verification.summary()}
        )
        atomic_write_text(tmp / MANIFEST_NAME, json.dumps(manifest.to_dict(), indent=2, sort_keys=True) + "\n")
        _prepare_out(out)  # nothing appeared meanwhile
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("exported %s -> %s (%s)", checkpoint, out, verification.summary()["max_abs_diff_probabilities"])
    return ExportResult(out, out / MODEL_FILE, manifest, verification)


def _json_clean(value: Any) -> Any:
    """Tuples -> lists, NumPy scalars -> Python: what a JSON round trip gives (so manifest == metadata)."""
    return json.loads(canonical_json(_to_builtin(value)))


def _to_builtin(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _to_builtin(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_to_builtin(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value
