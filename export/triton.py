"""``confkd export --triton``: a Triton Inference Server model repository next to the exported model.

Layout written into the exported directory (``MODEL_DIR``)::

    MODEL_DIR/triton/                       pass this folder to ``tritonserver --model-repository``
      <name>/
        config.pbtxt                        ModelConfig in protobuf text format (see :func:`triton_config`)
        confkd_manifest.json                a byte copy of MODEL_DIR/manifest.json (Triton does not read it)
        configs/cpu.pbtxt                   ONNX only: the same config with KIND_CPU instances
                                            (``tritonserver --model-config-name=cpu``)
        1/model.onnx                        a byte copy of the verified ONNX (platform onnxruntime_onnx), or
        1/model.plan                        the TensorRT engine of ``--trt`` (platform tensorrt_plan)

Triton's documented layout has, beside ``config.pbtxt``, label files of any name and a ``configs/`` folder, and it
ignores sub-folders whose names are not numbers; the manifest copy is such an extra file, for people and tools
that look at the repository (``confkd segment --backend triton`` reads the manifest of ``--model MODEL_DIR``).

The config: ``max_batch_size`` = the manifest's max batch (the ONNX graph's first axis is the batch, so ``dims``
omit it); the input ``image`` ``[C, -1, -1(, -1)]``; the outputs ``probabilities`` ``[K, -1, ...]`` and
``entropy`` ``[-1, ...]``, all ``TYPE_FP32``; dynamic batching with the manifest's opt and max batch as preferred
sizes; one GPU instance; the ONNX file's sha256 as the parameter :data:`HASH_PARAMETER`, which the Triton runner
compares with the local manifest. Written configs are parsed back with Triton's own ``ModelConfig`` protobuf
(shipped with ``tritonclient``) when it is installed, and checked against the manifest.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from confkd.errors import ExportError
from confkd.inference.manifest import MANIFEST_NAME, Bounds, Manifest, file_sha256, load_manifest
from confkd.inference.runners_triton import (
    HASH_PARAMETER,
    TRITON_DIR,
    check_model_name,
    config_problems,
    expected_tensors,
    sanitize_model_name,
)

__all__ = [
    "CONFIG_FILE",
    "CPU_CONFIG",
    "DEFAULT_QUEUE_DELAY_US",
    "MANIFEST_COPY",
    "PLATFORMS",
    "TRITON_DIR",
    "TritonRepository",
    "model_config_proto",
    "parse_config",
    "preferred_batch_sizes",
    "triton_config",
    "write_triton_repository",
]

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.pbtxt"
CPU_CONFIG = "configs/cpu.pbtxt"
MANIFEST_COPY = "confkd_manifest.json"
VERSION = "1"
#: kind -> (Triton platform, default model file name in the version folder)
PLATFORMS = {"onnx": ("onnxruntime_onnx", "model.onnx"), "plan": ("tensorrt_plan", "model.plan")}
#: how long the dynamic batcher waits to fill a preferred batch: 1 ms, small next to a 2D batch's inference
DEFAULT_QUEUE_DELAY_US = 1000


@dataclass(frozen=True)
class TritonRepository:
    """What :func:`write_triton_repository` wrote: the repository root and the model's files."""

    root: Path
    model_name: str
    platform: str
    config_path: Path
    model_path: Path


def preferred_batch_sizes(bounds: Bounds) -> list[int]:
    """The dynamic batcher's preferred sizes: the manifest's opt and max batch, those above 1."""
    _, opt, hi = bounds.batch
    return sorted({b for b in (opt, hi) if b > 1})


def _compute_capability(sm: str) -> str:
    """``"sm_90"`` -> ``"9.0"``, the key format of ``cc_model_filenames``."""
    digits = sm.removeprefix("sm_")
    if not digits.isdigit() or len(digits) < 2:
        raise ExportError(f"compute capability {sm!r}: expected sm_<major><minor>, e.g. sm_90")
    return f"{digits[:-1]}.{digits[-1]}"


def _tensor_block(kind: str, specs: list[Any]) -> list[str]:
    lines = [f"{kind} ["]
    for i, spec in enumerate(specs):
        dims = ", ".join(str(d) for d in spec.dims)
        lines += [
            "  {",
            f'    name: "{spec.name}"',
            f"    data_type: {spec.data_type}",
            f"    dims: [ {dims} ]",
            "  }" + ("," if i < len(specs) - 1 else ""),
        ]
    return [*lines, "]"]


def triton_config(
    manifest: Manifest,
    model_name: str,
    *,
    platform: str = "onnxruntime_onnx",
    instance_kind: str = "KIND_GPU",
    queue_delay_us: int = DEFAULT_QUEUE_DELAY_US,
    compute_capability: str | None = None,
) -> str:
    """``config.pbtxt`` of the exported model (protobuf text format of Triton's ``ModelConfig``).

    ``compute_capability`` (``"sm_90"``, plans only) adds ``cc_model_filenames`` so that the server picks the plan
    only on the GPU generation it was built for.
    """
    if platform not in {p for p, _ in PLATFORMS.values()}:
        raise ExportError(
            f"unknown Triton platform {platform!r}; available: {', '.join(p for p, _ in PLATFORMS.values())}"
        )
    if instance_kind not in ("KIND_GPU", "KIND_CPU"):
        raise ExportError(f"instance kind {instance_kind!r}: KIND_GPU or KIND_CPU")
    check_model_name(model_name)
    spec_in, specs_out = expected_tensors(manifest)
    lines = [
        f"# written by confkd export --triton from {manifest.model_version}",
        f'name: "{model_name}"',
        f'platform: "{platform}"',
        "# the ONNX graph's first axis is the batch: dims below omit it",
        f"max_batch_size: {manifest.bounds.batch[2]}",
        *_tensor_block("input", [spec_in]),
        *_tensor_block("output", list(specs_out)),
        "# requests are batched together only when their tiles have the same shape",
        "dynamic_batching {",
    ]
    preferred = preferred_batch_sizes(manifest.bounds)
    if preferred:
        lines.append(f"  preferred_batch_size: [ {', '.join(map(str, preferred))} ]")
    lines += [f"  max_queue_delay_microseconds: {int(queue_delay_us)}", "}"]
    if instance_kind == "KIND_GPU":
        note = (
            "# a CPU-only server: tritonserver --model-config-name=cpu (configs/cpu.pbtxt, KIND_CPU)"
            if platform == "onnxruntime_onnx"
            else "# a TensorRT plan runs on the GPU it was built for only"
        )
        lines += [note]
    else:
        lines += ["# one instance: ONNX Runtime already uses every core for one request"]
    lines += ["instance_group [", "  {", "    count: 1", f"    kind: {instance_kind}", "  }", "]"]
    if compute_capability is not None:
        lines += [f'cc_model_filenames [ {{ key: "{_compute_capability(compute_capability)}" value: "model.plan" }} ]']
    lines += [
        "# the sha256 of the exported model.onnx; confkd segment --backend triton compares it with --model's manifest",
        f'parameters {{ key: "{HASH_PARAMETER}" value {{ string_value: "{manifest.onnx_sha256}" }} }}',
    ]
    return "\n".join(lines) + "\n"


def model_config_proto() -> Any | None:
    """Triton's ``model_config_pb2`` module as shipped in ``tritonclient`` (``None`` when not installed).

    Loaded from its file: ``import tritonclient.grpc.model_config_pb2`` would import the gRPC client first, which
    needs ``grpcio`` (not part of ``tritonclient[http]``).
    """
    import sys

    cached = sys.modules.get("confkd_triton_model_config_pb2")
    if cached is not None:
        return cached
    spec = importlib.util.find_spec("tritonclient")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "grpc" / "model_config_pb2.py"
    module_spec = importlib.util.spec_from_file_location("confkd_triton_model_config_pb2", path)
    if not path.is_file() or module_spec is None or module_spec.loader is None:
        return None
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:  # protobuf missing or too old for the generated code (VersionError, ImportError)
        logger.warning("cannot load Triton's model_config_pb2 from %s (%s): configs are not parsed back", path, e)
        return None
    sys.modules["confkd_triton_model_config_pb2"] = module  # its descriptors may be registered only once
    return module


def parse_config(text: str, where: str = CONFIG_FILE) -> dict[str, Any] | None:
    """``config.pbtxt`` text -> the ``ModelConfig`` as a JSON-style dict (proto field names, as Triton's
    ``v2/models/NAME/config`` answers); ``None`` when tritonclient is not installed.

    Raises:
        ExportError: the text is not a valid ``ModelConfig`` (unknown field, bad enum value, syntax).
    """
    proto = model_config_proto()
    if proto is None:
        return None
    from google.protobuf import json_format, text_format

    try:
        message = text_format.Parse(text, proto.ModelConfig())
    except text_format.ParseError as e:
        raise ExportError(f"{where}: not a valid Triton ModelConfig ({e})") from e
    return dict(json_format.MessageToDict(message, preserving_proto_field_name=True))


def _check_written(config_path: Path, manifest: Manifest) -> None:
    parsed = parse_config(config_path.read_text(encoding="utf-8"), str(config_path))
    if parsed is None:
        logger.info("tritonclient is not installed: %s not parsed back", config_path)
        return
    problems = config_problems(parsed, manifest)
    if problems:
        raise ExportError(f"{config_path}: the written config does not match the manifest: {'; '.join(problems)}")


def write_triton_repository(
    model_dir: str | Path,
    *,
    model_name: str | None = None,
    plan: bytes | None = None,
    compute_capability: str | None = None,
    queue_delay_us: int = DEFAULT_QUEUE_DELAY_US,
) -> TritonRepository:
    """Write ``model_dir/triton/<model_name>/`` (see the module docstring) for an exported directory.

    Args:
        model_dir: an exported directory (its manifest and ONNX hash are checked first).
        model_name: the model's name on the server; default: ``model_dir``'s name, sanitised.
        plan: a serialised TensorRT engine built from this model (``tensorrt_plan`` instead of the ONNX file);
            ``compute_capability`` (``"sm_90"``) is the GPU it was built for.

    The repository is built in a temporary sibling and renamed into place at the end: a failure leaves no
    ``triton/`` folder behind.

    Raises:
        ManifestError: not an exported directory, or a modified ONNX file. ExportError: ``triton/`` exists, a bad
            model name, or a written config that does not parse back or does not match the manifest.
    """
    model_dir = Path(model_dir)
    manifest = load_manifest(model_dir)
    name = check_model_name(model_name if model_name is not None else sanitize_model_name(model_dir.resolve().name))
    root = model_dir / TRITON_DIR
    if root.exists():
        raise ExportError(f"{root}: already exists; remove it to write the Triton repository again")
    platform, model_file = PLATFORMS["plan" if plan is not None else "onnx"]
    tmp = Path(tempfile.mkdtemp(prefix=f".{TRITON_DIR}.", suffix=".tmp", dir=model_dir))
    try:
        folder = tmp / name
        (folder / VERSION).mkdir(parents=True)
        target = folder / VERSION / model_file
        if plan is None:
            shutil.copyfile(model_dir / manifest.model_file, target)
            if file_sha256(target) != manifest.onnx_sha256:
                raise ExportError(f"{target}: the copy of {manifest.model_file} does not hash to the manifest's sha256")
        else:
            target.write_bytes(plan)
        shutil.copyfile(model_dir / MANIFEST_NAME, folder / MANIFEST_COPY)
        config = triton_config(
            manifest, name, platform=platform, queue_delay_us=queue_delay_us, compute_capability=compute_capability
        )
        (folder / CONFIG_FILE).write_text(config, encoding="utf-8")
        _check_written(folder / CONFIG_FILE, manifest)
        if plan is None:
            (folder / CPU_CONFIG).parent.mkdir()
            cpu = triton_config(
                manifest, name, platform=platform, instance_kind="KIND_CPU", queue_delay_us=queue_delay_us
            )
            (folder / CPU_CONFIG).write_text(cpu, encoding="utf-8")
            _check_written(folder / CPU_CONFIG, manifest)
        os.replace(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("Triton model repository %s (model %s, %s)", root, name, platform)
    return TritonRepository(root, name, platform, root / name / CONFIG_FILE, root / name / VERSION / model_file)
