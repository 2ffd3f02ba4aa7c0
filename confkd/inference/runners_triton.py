"""The Triton runner: an exported student served by NVIDIA Triton Inference Server, behind the Runner protocol.

Only the network runs on the server. Preprocessing, tiling, blending, TTA, the inverse and the confidence stay
local, exactly as with the other backends, so the local exported directory (its ``manifest.json``) is required:
it carries the preprocessing and labels, and the runner checks that the server's model configuration
(``GET v2/models/NAME/config``) has the manifest's input and output names, data types and dims before the first
request. The model repository that ``confkd export --triton`` writes also records the ONNX file's sha256 as the
config parameter :data:`HASH_PARAMETER`; when the server reports one, it must be the manifest's.

Transport: ``tritonclient.http`` (KServe v2 REST with Triton's binary tensor extension), imported when a runner is
built, never at module import. Tensors go as raw little-endian float32 after a JSON header; only the
``probabilities`` output is requested (the pipeline recomputes the confidence on its final probabilities).
``device`` is the CPU: the client's tensors live in host memory, and the server's GPU is chosen by its own
``instance_group``.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from confkd.errors import ConfigError
from confkd.inference.manifest import Manifest
from confkd.inference.runners import ExportedModelRunner, RunnerError, check_runner_input, run_in_batches

__all__ = [
    "DATA_TYPE",
    "HASH_PARAMETER",
    "TRITON_INSTALL_HINT",
    "TensorSpec",
    "TritonRunner",
    "build_request",
    "check_model_name",
    "config_problems",
    "decode_probabilities",
    "default_model_name",
    "expected_tensors",
    "import_tritonclient_http",
    "sanitize_model_name",
]

logger = logging.getLogger(__name__)

TRITON_INSTALL_HINT = "pip install 'confkd[triton]' (tritonclient[http])"
#: model-config data type of every tensor (the wire data type is ``FP32``)
DATA_TYPE = "TYPE_FP32"
WIRE_DATA_TYPE = "FP32"
#: model-config parameter holding the sha256 of the exported ONNX file the served model was built from
HASH_PARAMETER = "confkd.onnx_sha256"
#: the sub-folder of an exported directory that ``confkd export --triton`` fills with a model repository
TRITON_DIR = "triton"

_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


def sanitize_model_name(name: str) -> str:
    """A Triton model (directory) name from any string: characters other than ``[A-Za-z0-9_.-]`` become ``_``."""
    cleaned = re.sub(r"[^A-Za-z0-9_.-]", "_", name).lstrip(".")
    return cleaned or "confkd"


def check_model_name(name: str) -> str:
    """``name`` when it is a usable Triton model name (one directory name); else :class:`ConfigError`."""
    if not _NAME_RE.match(name) or len(name) > 200:
        raise ConfigError(
            f"Triton model name {name!r}: use letters, digits, '_', '.' and '-' only (it is a directory name), "
            f"for example {sanitize_model_name(name)!r}"
        )
    return name


def default_model_name(model_dir: Path) -> str:
    """The model name ``confkd export --triton`` used: the only folder in ``model_dir/triton``, else the
    sanitised name of ``model_dir``."""
    repo = model_dir / TRITON_DIR
    names = sorted(p.name for p in repo.iterdir() if p.is_dir()) if repo.is_dir() else []
    return names[0] if len(names) == 1 else sanitize_model_name(model_dir.resolve().name)


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of a Triton model config: ``dims`` without the batch axis, ``-1`` for a dynamic size."""

    name: str
    data_type: str
    dims: tuple[int, ...]


def expected_tensors(manifest: Manifest) -> tuple[TensorSpec, tuple[TensorSpec, ...]]:
    """The input and the outputs a Triton config of this exported model must declare (``max_batch_size > 0``:
    the first, batch, axis of the ONNX graph is implicit).

    Shape:
        input ``[C, *(-1,) * spatial_dims]``; ``probabilities`` ``[K, -1, ...]``; ``entropy`` ``[-1, ...]``.
    """
    dynamic = (-1,) * manifest.spatial_dims
    probabilities, entropy = manifest.output_names
    return TensorSpec(manifest.input_name, DATA_TYPE, (manifest.in_channels, *dynamic)), (
        TensorSpec(probabilities, DATA_TYPE, (manifest.num_classes, *dynamic)),
        TensorSpec(entropy, DATA_TYPE, dynamic),
    )


def _dims(value: Any) -> tuple[int, ...] | None:
    # the protobuf JSON mapping writes int64 as strings; Triton's own JSON writes numbers: accept both
    try:
        return tuple(int(v) for v in value)
    except (TypeError, ValueError):
        return None


def _tensor_problem(kind: str, spec: TensorSpec, declared: Mapping[str, Any] | None) -> str | None:
    if declared is None:
        return f"no {kind} {spec.name!r}"
    data_type = declared.get("data_type", "TYPE_INVALID")
    if data_type != spec.data_type:
        return f"{kind} {spec.name!r} is {data_type}, expected {spec.data_type}"
    dims = _dims(declared.get("dims", ()))
    if dims != spec.dims:
        return (
            f"{kind} {spec.name!r} has dims {list(dims) if dims else declared.get('dims')}, expected {list(spec.dims)}"
        )
    if declared.get("reshape"):
        return f"{kind} {spec.name!r} has a reshape; the exported graph needs none"
    return None


def config_problems(config: Mapping[str, Any], manifest: Manifest) -> list[str]:
    """Why a Triton model config (the JSON of ``ModelConfig``, proto field names) cannot serve this manifest's
    model; empty when it can.

    Checked: ``max_batch_size >= 1`` (the graph's first axis is the batch), the input and the ``probabilities``
    output (names, ``TYPE_FP32``, dims as :func:`expected_tensors`), the ``entropy`` output when declared, no
    extra input, and the :data:`HASH_PARAMETER` when the config has one.
    """
    problems = []
    try:
        max_batch = int(config.get("max_batch_size", 0))
    except (TypeError, ValueError):
        max_batch = 0
    if max_batch < 1:
        problems.append(
            f"max_batch_size is {config.get('max_batch_size', 0)!r}; the exported graph has a batch axis, so it "
            "must be >= 1"
        )
    spec_in, specs_out = expected_tensors(manifest)
    inputs = {str(t.get("name")): t for t in config.get("input", [])}
    outputs = {str(t.get("name")): t for t in config.get("output", [])}
    extra = sorted(set(inputs) - {spec_in.name})
    if extra:
        problems.append(f"unexpected input(s) {', '.join(extra)}")
    problem = _tensor_problem("input", spec_in, inputs.get(spec_in.name))
    if problem:
        problems.append(problem)
    for i, spec in enumerate(specs_out):
        if i > 0 and spec.name not in outputs:
            continue  # only the probabilities are requested; a config may leave the entropy out
        problem = _tensor_problem("output", spec, outputs.get(spec.name))
        if problem:
            problems.append(problem)
    parameter = (config.get("parameters") or {}).get(HASH_PARAMETER)
    served = parameter.get("string_value") if isinstance(parameter, Mapping) else None
    if served is not None and served != manifest.onnx_sha256:
        problems.append(
            f"the served model was built from ONNX sha256 {str(served)[:12]}..., the manifest's is "
            f"{manifest.onnx_sha256[:12]}...: a different export"
        )
    return problems


def import_tritonclient_http() -> Any:
    """``tritonclient.http``, or :class:`RunnerError` with the install command."""
    try:
        import tritonclient.http as http
    except ImportError as e:
        raise RunnerError(f"the triton backend needs tritonclient: {TRITON_INSTALL_HINT}") from e
    return http


def build_request(http: Any, x: np.ndarray, input_name: str, output_name: str) -> tuple[list[Any], list[Any]]:
    """The ``InferInput`` (``x`` as binary FP32) and the one ``InferRequestedOutput`` (binary) of a request.

    Shape:
        ``x``: float32 ``[N, C, *tile]`` (C-contiguous; sent as is, little-endian).
    """
    if x.dtype != np.float32:
        raise RunnerError(f"triton runner: input must be float32, got {x.dtype}")
    tensor = http.InferInput(input_name, [int(s) for s in x.shape], WIRE_DATA_TYPE)
    tensor.set_data_from_numpy(np.ascontiguousarray(x), binary_data=True)
    return [tensor], [http.InferRequestedOutput(output_name, binary_data=True)]


def decode_probabilities(result: Any, output_name: str, expected_shape: Sequence[int]) -> np.ndarray:
    """The ``output_name`` tensor of an ``InferResult`` as a writable float32 array of ``expected_shape``."""
    array = result.as_numpy(output_name)
    if array is None:
        raise RunnerError(f"triton runner: the response has no output {output_name!r}")
    if array.dtype != np.float32 or tuple(array.shape) != tuple(expected_shape):
        raise RunnerError(
            f"triton runner: output {output_name!r} is {array.dtype} {list(array.shape)}, expected float32 "
            f"{list(expected_shape)}"
        )
    return np.array(array, copy=True)  # the response buffer is read-only bytes


def _split_url(url: str) -> tuple[str, bool]:
    """``HOST:PORT`` (tritonclient takes no scheme) and whether to use TLS."""
    for scheme, ssl in (("http://", False), ("https://", True)):
        if url.startswith(scheme):
            return url[len(scheme) :].rstrip("/"), ssl
    if "://" in url:
        raise ConfigError(f"--url {url!r}: expected HOST:PORT (Triton's HTTP port, 8000 by default)")
    return url.rstrip("/"), False


class TritonRunner(ExportedModelRunner):
    """Send batches of tiles to a model on a Triton server; the results come back as CPU tensors.

    Args:
        url: the server's HTTP endpoint, ``HOST:PORT`` (``http://`` / ``https://`` prefixes accepted).
        model_name: the model's name on the server (its folder in the model repository).
        manifest: the local exported directory's manifest: shapes, divisor, bounds, and the reference the server's
            model config is checked against.
        model_version: ``""``: the server's version policy picks.
        connection_timeout, network_timeout: seconds, passed to ``tritonclient.http.InferenceServerClient``.

    ``max_batch`` is the manifest's max batch, or the server's ``max_batch_size`` when that is smaller. One HTTP
    client per calling thread (tritonclient's clients are gevent-based and must stay in their thread).

    Raises:
        RunnerError: tritonclient missing, server unreachable or not ready, model not ready, or a model config
            that does not match the manifest (every mismatch listed, on one line).
    """

    name = "triton"

    def __init__(
        self,
        url: str,
        model_name: str,
        manifest: Manifest,
        *,
        model_version: str = "",
        connection_timeout: float = 10.0,
        network_timeout: float = 300.0,
    ) -> None:
        self._http = import_tritonclient_http()
        self._init_from_manifest(manifest, torch.device("cpu"))
        self.url, self._ssl = _split_url(url)
        self.model_name = check_model_name(model_name)
        self.model_version = model_version
        self._timeouts = (connection_timeout, network_timeout)
        self._local = threading.local()
        self.output_name = self.output_names[0]
        where = f"Triton server {self.url}"
        client = self._client()
        try:
            server_ready = client.is_server_ready()
            model_ready = server_ready and client.is_model_ready(model_name, model_version)
            config = client.get_model_config(model_name, model_version) if model_ready else {}
        except Exception as e:  # gevent/socket/tritonclient raise many types (refused, timeout, DNS, HTTP errors)
            raise RunnerError(f"{where}: unreachable or not answering ({type(e).__name__}: {e})") from e
        if not server_ready:
            raise RunnerError(f"{where}: the server is not ready (GET v2/health/ready); check its log")
        if not model_ready:
            raise RunnerError(
                f"{where}: model {model_name!r} is not ready (not in the repository, or it failed to load); "
                f"list the repository with POST {self.url}/v2/repository/index, or pass --model-name"
            )
        problems = config_problems(config, manifest)
        if problems:
            raise RunnerError(f"{where}: model {model_name!r} does not match the local manifest: {'; '.join(problems)}")
        self.max_batch = min(self.max_batch, int(config["max_batch_size"]))
        logger.info("triton model %s on %s (max batch %d)", model_name, self.url, self.max_batch)

    def __repr__(self) -> str:
        return f"TritonRunner(url={self.url!r}, model={self.model_name!r}, max_batch={self.max_batch})"

    def _client(self) -> Any:
        client = getattr(self._local, "client", None)
        if client is None:
            connect, network = self._timeouts
            try:
                client = self._http.InferenceServerClient(
                    self.url, connection_timeout=connect, network_timeout=network, ssl=self._ssl
                )
            except Exception as e:  # tritonclient raises its own exception for a malformed URL
                raise RunnerError(f"Triton server {self.url}: cannot create a client ({e})") from e
            self._local.client = client
        return client

    def __call__(self, x: Tensor) -> Tensor:
        """``[N, C, *tile]`` float32 -> softmax probabilities ``[N, K, *tile]`` float32 on the CPU."""
        check_runner_input(self, x)
        return run_in_batches(x, self.max_batch, self._infer_tensor)

    def _infer_tensor(self, x: Tensor) -> Tensor:
        chunk = x.detach().to("cpu", torch.float32)
        return torch.from_numpy(self._infer(np.ascontiguousarray(chunk.numpy())))

    def _infer(self, array: np.ndarray) -> np.ndarray:
        inputs, outputs = build_request(self._http, array, self.input_name, self.output_name)
        try:
            result = self._client().infer(self.model_name, inputs, model_version=self.model_version, outputs=outputs)
        except Exception as e:  # InferenceServerException for HTTP errors, socket errors for a lost server
            raise RunnerError(
                f"Triton server {self.url}: inference of {list(array.shape)} on {self.model_name!r} failed "
                f"({type(e).__name__}: {e})"
            ) from e
        return decode_probabilities(result, self.output_name, (array.shape[0], self.num_classes, *array.shape[2:]))
