"""The triton backend with the real tritonclient: request/response mapping, and `confkd segment --backend triton`
against a stand-in for the remote server that speaks the real protocol.

The stand-in (:class:`KServeStub`) is a stdlib HTTP server implementing the KServe v2 REST endpoints that the
runner uses (``v2/health/ready``, ``v2/models/NAME/ready``, ``v2/models/NAME/config``, ``v2/models/NAME/infer``
with Triton's binary tensor extension). It serves the repository that ``confkd export --triton`` wrote: the
config parsed from its ``config.pbtxt`` with Triton's own ModelConfig protobuf, and the repository's
``1/model.onnx`` run with ONNX Runtime, checking each request's shape against the config as Triton does. No
Triton server and no GPU were available where these tests were written.
"""

from __future__ import annotations

import json
import re
import sys
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from confkd.cli.main import app
from confkd.config import config_from_dict
from confkd.data.phantoms import make_phantom
from confkd.errors import ConfigError
from confkd.export.triton import parse_config
from confkd.inference.manifest import load_manifest
from confkd.inference.model import ModelLoadError, load_model
from confkd.inference.runners import Runner, RunnerError
from confkd.inference.runners_onnx import OrtRunner
from confkd.inference.runners_triton import (
    TritonRunner,
    build_request,
    decode_probabilities,
    import_tritonclient_http,
)
from confkd.training.checkpoint import save_untrained_checkpoint

http = pytest.importorskip("tritonclient.http")

cli = CliRunner()


class KServeStub:
    """A KServe v2 / Triton HTTP server for one model repository, on 127.0.0.1 (see the module docstring).

    ``edit_config`` changes the config the server reports (to test the runner's refusals); ``requests`` records
    ``(model, input shape)`` of every inference.
    """

    def __init__(self, repo: Path, edit_config: Callable[[dict[str, Any]], None] | None = None) -> None:
        import onnxruntime as ort

        self.models: dict[str, tuple[dict[str, Any], Any]] = {}
        for folder in sorted(p for p in repo.iterdir() if p.is_dir()):
            config = parse_config((folder / "config.pbtxt").read_text())
            assert config is not None
            # Triton's JSON has numbers where protobuf's JSON mapping has int64 strings
            for tensor in config["input"] + config["output"]:
                tensor["dims"] = [int(d) for d in tensor["dims"]]
            if edit_config is not None:
                edit_config(config)
            session = ort.InferenceSession(str(folder / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
            self.models[folder.name] = (config, session)
        self.requests: list[tuple[str, tuple[int, ...]]] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> KServeStub:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()

    def infer(self, name: str, body: bytes, header_length: int) -> tuple[int, dict[str, Any], bytes]:
        """One v2 inference request -> (status, JSON header, binary tail)."""
        if name not in self.models:
            return 400, {"error": f"Request for unknown model: '{name}' is not found"}, b""
        config, session = self.models[name]
        request = json.loads(body[:header_length])
        tail, offset, feeds = body[header_length:], 0, {}
        declared = {t["name"]: t for t in config["input"]}
        for tensor in request["inputs"]:
            spec = declared.get(tensor["name"])
            shape = [int(s) for s in tensor["shape"]]
            if spec is None or tensor["datatype"] != "FP32":
                return 400, {"error": f"unexpected input {tensor['name']} {tensor['datatype']}"}, b""
            if len(shape) != len(spec["dims"]) + 1 or not 1 <= shape[0] <= config["max_batch_size"]:
                return 400, {"error": f"unexpected shape for input '{tensor['name']}': {shape}"}, b""
            if any(d not in (-1, s) for d, s in zip(spec["dims"], shape[1:], strict=True)):
                return 400, {"error": f"unexpected shape for input '{tensor['name']}': {shape}"}, b""
            size = tensor["parameters"]["binary_data_size"]
            feeds[tensor["name"]] = np.frombuffer(tail[offset : offset + size], "<f4").reshape(shape)
            offset += size
        self.requests.append((name, tuple(next(iter(feeds.values())).shape)))
        wanted = request.get("outputs") or [{"name": t["name"]} for t in config["output"]]
        results = session.run([o["name"] for o in wanted], feeds)
        outputs, blobs = [], []
        for o, array in zip(wanted, results, strict=True):
            entry: dict[str, Any] = {"name": o["name"], "datatype": "FP32", "shape": list(array.shape)}
            if o.get("parameters", {}).get("binary_data", False):
                blob = np.ascontiguousarray(array, "<f4").tobytes()
                entry["parameters"] = {"binary_data_size": len(blob)}
                blobs.append(blob)
            else:
                entry["data"] = array.ravel().tolist()
            outputs.append(entry)
        return 200, {"model_name": name, "model_version": "1", "outputs": outputs}, b"".join(blobs)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as Triton

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _send(self, status: int, header: dict[str, Any] | None = None, tail: bytes = b"") -> None:
                body = json.dumps(header).encode() if header is not None else b""
                self.send_response(status)
                self.send_header("Content-Type", "application/octet-stream" if tail else "application/json")
                if tail:
                    self.send_header("Inference-Header-Content-Length", str(len(body)))
                self.send_header("Content-Length", str(len(body) + len(tail)))
                self.end_headers()
                self.wfile.write(body + tail)

            def do_GET(self) -> None:
                path = self.path.split("?")[0]
                if path == "/v2/health/ready":
                    return self._send(200)
                match = re.fullmatch(r"/v2/models/([^/]+)(?:/versions/(\d+))?/(ready|config)", path)
                if match is None:
                    return self._send(404, {"error": f"unknown path {path}"})
                name, version, what = match.groups()
                if name not in stub.models or version not in (None, "1"):
                    return self._send(400, {"error": f"Request for unknown model: '{name}' is not found"})
                return self._send(200, stub.models[name][0] if what == "config" else None)

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                match = re.fullmatch(r"/v2/models/([^/]+)(?:/versions/\d+)?/infer", self.path)
                if match is None:
                    return self._send(404, {"error": f"unknown path {self.path}"})
                header_length = int(self.headers.get("Inference-Header-Content-Length", len(body)))
                status, header, tail = stub.infer(match.group(1), body, header_length)
                self._send(status, header, tail)

        return Handler


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("triton")
    cfg = config_from_dict(
        {
            "model": {"width": 8, "depth": 3, "num_classes": 4, "norm": "instance"},
            "preprocess": {"target_spacing": [1.5, 1.5], "pad_multiple": 8},
            "train": {"patch_size": [128, 128]},
        }
    )
    path = save_untrained_checkpoint(
        cfg, root / "model.pt", label_names=("background", "RV", "MYO", "LV"), ignore_index=4, seed=1
    )
    result = cli.invoke(app, ["export", str(path), "--out", str(root / "exported"), "--triton"])
    assert result.exit_code == 0, result.output
    return root / "exported"


@pytest.fixture
def server(exported: Path) -> Iterator[KServeStub]:
    with KServeStub(exported / "triton") as stub:
        yield stub


def test_request_carries_the_tensor_as_binary_fp32() -> None:
    x = np.arange(2 * 1 * 8 * 16, dtype=np.float32).reshape(2, 1, 8, 16) / 7
    inputs, outputs = build_request(http, x, "image", "probabilities")
    assert [(i.name(), i.shape(), i.datatype()) for i in inputs] == [("image", [2, 1, 8, 16], "FP32")]
    assert [o.name() for o in outputs] == ["probabilities"]
    body, header_length = http.InferenceServerClient.generate_request_body(inputs, outputs=outputs)
    header = json.loads(body[:header_length])
    assert header["inputs"] == [
        {"name": "image", "shape": [2, 1, 8, 16], "datatype": "FP32", "parameters": {"binary_data_size": x.nbytes}}
    ]
    assert header["outputs"] == [{"name": "probabilities", "parameters": {"binary_data": True}}]
    assert body[header_length:] == x.astype("<f4").tobytes()  # raw little-endian, C order
    with pytest.raises(RunnerError, match="float32"):
        build_request(http, x.astype(np.float64), "image", "probabilities")


def test_response_decodes_to_the_onnxruntime_probabilities(exported: Path) -> None:
    manifest = load_manifest(exported)
    ort_runner = OrtRunner(exported / "model.onnx", manifest, device=torch.device("cpu"))
    x = torch.randn(3, 1, 40, 64, generator=torch.Generator().manual_seed(0))
    expected = ort_runner(x).numpy()
    blob = expected.astype("<f4").tobytes()
    header = json.dumps(
        {
            "model_name": "m",
            "outputs": [
                {
                    "name": "probabilities",
                    "datatype": "FP32",
                    "shape": [3, 4, 40, 64],
                    "parameters": {"binary_data_size": len(blob)},
                }
            ],
        }
    ).encode()
    result = http.InferenceServerClient.parse_response_body(header + blob, header_length=len(header))
    decoded = decode_probabilities(result, "probabilities", (3, 4, 40, 64))
    assert decoded.flags.writeable and np.array_equal(decoded, expected)
    with pytest.raises(RunnerError, match=r"expected float32 \[3, 4, 40, 32\]"):
        decode_probabilities(result, "probabilities", (3, 4, 40, 32))
    with pytest.raises(RunnerError, match="no output 'entropy'"):
        decode_probabilities(result, "entropy", (3, 40, 64))


def test_runner_matches_onnxruntime_through_the_server(exported: Path, server: KServeStub) -> None:
    loaded = load_model(exported, backend="triton", url=server.url)
    runner = loaded.runner
    assert isinstance(runner, TritonRunner) and isinstance(runner, Runner)
    assert runner.model_name == "exported" and runner.device == torch.device("cpu")
    assert runner.max_batch == 32 and runner.max_tile == (256, 256) and runner.divisor == 8
    ort_runner = OrtRunner(exported / "model.onnx", load_manifest(exported), device=torch.device("cpu"))
    x = torch.randn(5, 1, 48, 64, generator=torch.Generator().manual_seed(1))
    assert torch.equal(runner(x), ort_runner(x))
    assert server.requests == [("exported", (5, 1, 48, 64))]


def test_segment_triton_equals_onnxruntime_voxel_for_voxel(exported: Path, server: KServeStub, tmp_path: Path) -> None:
    scans = []
    for i in range(2):
        ph = make_phantom(700 + i, size=(160, 144), slices=5)
        scans.append(tmp_path / "scans" / f"case{i}.nii.gz")
        scans[-1].parent.mkdir(exist_ok=True)
        nib.save(nib.Nifti1Image(ph.image, ph.affine), scans[-1])
    common = ["segment", *map(str, scans), "--model", str(exported), "--device", "cpu"]
    for backend, extra in (("onnxruntime", []), ("triton", ["--url", server.url, "--model-name", "exported"])):
        result = cli.invoke(app, [*common, "--out", str(tmp_path / backend), "--backend", backend, *extra])
        assert result.exit_code == 0, result.output
    assert len(server.requests) >= 2
    for scan in scans:
        name = scan.name.replace(".nii.gz", "")
        for kind in ("seg", "conf"):
            a, b = (
                np.asarray(nib.load(tmp_path / d / f"{name}_{kind}.nii.gz").dataobj) for d in ("onnxruntime", "triton")
            )
            assert np.array_equal(a, b), (name, kind)
        report = json.loads((tmp_path / "triton" / f"{name}.json").read_text())
        assert report["model"]["backend"] == "triton" and report["model"]["device"] == "cpu"


def test_refusals_in_one_line(exported: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ph = make_phantom(1, size=(64, 64), slices=2)
    scan = tmp_path / "case.nii.gz"
    nib.save(nib.Nifti1Image(ph.image, ph.affine), scan)
    segment = ["segment", str(scan), "--out", str(tmp_path / "out"), "--model", str(exported)]

    def wrong_channels(config: dict[str, Any]) -> None:
        config["input"][0]["dims"] = [3, -1, -1]

    with KServeStub(exported / "triton", wrong_channels) as stub:
        with pytest.raises(RunnerError, match=r"input 'image' has dims \[3, -1, -1\], expected \[1, -1, -1\]"):
            load_model(exported, backend="triton", url=stub.url)
        with pytest.raises(RunnerError, match="model 'nope' is not ready"):
            load_model(exported, backend="triton", url=stub.url, triton_model="nope")

    def other_export(config: dict[str, Any]) -> None:
        config["parameters"]["confkd.onnx_sha256"]["string_value"] = "f" * 64

    with KServeStub(exported / "triton", other_export) as stub:
        result = cli.invoke(app, [*segment, "--backend", "triton", "--url", stub.url])
        assert result.exit_code == 2 and "a different export" in result.output
    closed = KServeStub(exported / "triton")  # bound, never served: a port that refuses connections
    closed.server.server_close()
    with pytest.raises(RunnerError, match="unreachable"):
        load_model(exported, backend="triton", url=closed.url)
    with pytest.raises(ModelLoadError, match="--url"):
        load_model(exported, backend="triton")
    with pytest.raises(ConfigError, match="device 'cuda'"):
        load_model(exported, backend="triton", device="cuda", url="127.0.0.1:1")
    result = cli.invoke(app, [*segment, "--backend", "triton"])
    assert result.exit_code == 2 and "needs --url" in result.output
    result = cli.invoke(app, [*segment, "--url", "127.0.0.1:1"])
    assert result.exit_code == 2 and "--backend triton only" in result.output
    monkeypatch.setitem(sys.modules, "tritonclient.http", None)  # as if tritonclient were not installed
    with pytest.raises(RunnerError, match=r"pip install 'confkd\[triton\]'"):
        import_tritonclient_http()
