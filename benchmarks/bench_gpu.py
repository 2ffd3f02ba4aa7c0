"""The GPU rows, in ``run.py``'s process: the network per precision / memory layout (TorchRunner and the network
alone), onnxruntime's CUDA provider, ``confkd segment`` end to end with nvidia-smi sampling the GPU, the peer on the
GPU. Each takes a ``device`` ("cuda", or "cpu" to exercise the code without a GPU)."""

from __future__ import annotations

import contextlib
import math
import subprocess
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from bench_common import (
    gpu_peak_mb,
    gpu_peak_reset,
    labels_digest,
    maxrss_mb,
    peer_config,
    peer_flavour,
    pure_network_seconds,
    shape_key,
    short_error,
    stage_means,
    sync,
)

#: torch.compile: compile + warm-up seconds after which its remaining shapes are skipped; the subprocess that runs
#: it is killed at the cap plus run.py's COMPILE_MARGIN_S (CUDA start-up, the timed calls)
COMPILE_CAP_S = 60.0


def _time_per_call(fn: Callable[[], Any], seconds: float, device: Any) -> float:
    """Seconds per call of an already warmed-up ``fn``, synchronising the device: one call calibrates how many
    calls fill about ``seconds`` (at least 3), then those run back to back and the device is synchronised once."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    one = time.perf_counter() - start
    n = max(3, min(10_000, math.ceil(seconds / max(one, 1e-6))))
    start = time.perf_counter()
    for _ in range(n):
        fn()
    sync(device)
    return (time.perf_counter() - start) / n


def gpu_net_row(
    checkpoint: str,
    device: str,
    *,
    amp: str,
    channels_last: bool,
    shapes: list[tuple[int, ...]],
    seconds: float,
    compile: bool = False,
    compile_cap_s: float = COMPILE_CAP_S,
) -> dict[str, Any]:
    """One network row: slices/s per shape of a fresh TorchRunner, three ways.

    ``slices_per_s``: the runner on a host (CPU, pageable) input: the copy to the device, the input checks,
    autocast, the network and a float32 softmax; the result stays on the device. ``runner_device_in_slices_per_s``:
    the same with the input already on the device (what the engine passes: it copies through pinned memory first).
    ``network_only_slices_per_s``: the nn.Module alone on a device input in the runner's memory format, under the
    same autocast, no softmax. Peak GPU memory is reset before each shape (model weights included).
    """
    import torch

    from confkd.inference.runners import TorchRunner
    from confkd.training.checkpoint import load_student

    dev = torch.device(device)
    gpu_peak_reset(dev)
    network, _ = load_student(checkpoint)
    runner = TorchRunner(network, device=dev, amp=amp, channels_last=channels_last)  # type: ignore[arg-type]
    if compile:
        compiled: Any = torch.compile(runner.network)  # mode default
        runner.network = compiled
    net = runner.network

    def net_only(x: Any) -> Any:
        with torch.inference_mode():
            if runner.amp is None:
                return net(x)
            with torch.autocast(dev.type, dtype=runner.amp):
                return net(x)

    out: dict[str, Any] = {
        "amp": str(runner.amp).removeprefix("torch.") if runner.amp is not None else "off",
        "channels_last": channels_last,
        "compiled": compile,
        "slices_per_s": {},
        "runner_device_in_slices_per_s": {},
        "network_only_slices_per_s": {},
        "warmup_s": {},
        "peak_mb_per_shape": {},
        "shape_errors": {},
    }
    warm_total = 0.0
    for shape in shapes:
        key = shape_key(shape)
        if compile and warm_total > compile_cap_s:
            out["shape_errors"][key] = f"skipped: compile + warm-up took {warm_total:.0f} s > {compile_cap_s:.0f} s"
            continue
        try:
            gpu_peak_reset(dev)
            x_host = torch.randn(shape)
            x_dev = x_host.to(dev).contiguous(memory_format=runner.memory_format)
            start = time.perf_counter()
            for _ in range(2):
                runner(x_host)
                runner(x_dev)
                net_only(x_dev)
            sync(dev)
            out["warmup_s"][key] = time.perf_counter() - start
            warm_total += out["warmup_s"][key]
            out["output_device"] = str(runner(x_dev).device)
            n = shape[0]
            out["slices_per_s"][key] = n / _time_per_call(partial(runner, x_host), seconds, dev)
            out["runner_device_in_slices_per_s"][key] = n / _time_per_call(partial(runner, x_dev), seconds, dev)
            out["network_only_slices_per_s"][key] = n / _time_per_call(partial(net_only, x_dev), seconds, dev)
            out["peak_mb_per_shape"][key] = gpu_peak_mb(dev)
            del x_host, x_dev
        except Exception as e:  # e.g. out of memory: the other shapes still run
            out["shape_errors"][key] = short_error(e)
    if compile:
        out["compile_and_warmup_s"] = warm_total
    peaks = [v for v in out["peak_mb_per_shape"].values() if v is not None]
    out["peak_mb"] = max(peaks) if peaks else None
    if not out["shape_errors"]:
        del out["shape_errors"]
    return out


def child_gpu_net(job: dict[str, Any]) -> dict[str, Any]:
    return gpu_net_row(
        job["checkpoint"],
        job["device"],
        amp=job["amp"],
        channels_last=job["channels_last"],
        shapes=[tuple(s) for s in job["shapes"]],
        seconds=job["seconds"],
        compile=job.get("compile", False),
        compile_cap_s=job.get("compile_cap_s", COMPILE_CAP_S),
    )


def ort_skip_reason(device_type: str, providers: list[str], version: str) -> str | None:
    if device_type == "cuda" and "CUDAExecutionProvider" not in providers:
        return f"onnxruntime {version} has no CUDAExecutionProvider (providers: {', '.join(providers)})"
    return None


def gpu_ort_row(model_dir: str, device: str, *, shapes: list[tuple[int, ...]], seconds: float) -> dict[str, Any]:
    """onnxruntime on ``device`` (its CUDA provider with IO binding on torch's buffers), host and device input; a
    ``skipped`` row when ``device`` is CUDA and this onnxruntime has no CUDAExecutionProvider."""
    import onnxruntime
    import torch

    from confkd.inference.manifest import load_manifest
    from confkd.inference.runners_onnx import OrtRunner

    dev = torch.device(device)
    reason = ort_skip_reason(dev.type, list(onnxruntime.get_available_providers()), onnxruntime.__version__)
    if reason:
        return {"skipped": reason}
    gpu_peak_reset(dev)
    manifest = load_manifest(Path(model_dir))
    runner = OrtRunner(Path(model_dir) / manifest.model_file, manifest, device=dev)
    out: dict[str, Any] = {
        "providers": list(runner.session.get_providers()),
        "slices_per_s": {},
        "runner_device_in_slices_per_s": {},
        "peak_mb_per_shape": {},
        "shape_errors": {},
    }
    for shape in shapes:
        key = shape_key(shape)
        try:
            gpu_peak_reset(dev)
            x_host = torch.randn(shape)
            x_dev = x_host.to(dev)
            for _ in range(2):
                runner(x_host)
                runner(x_dev)
            out["slices_per_s"][key] = shape[0] / _time_per_call(partial(runner, x_host), seconds, dev)
            out["runner_device_in_slices_per_s"][key] = shape[0] / _time_per_call(partial(runner, x_dev), seconds, dev)
            out["peak_mb_per_shape"][key] = gpu_peak_mb(dev)  # torch's allocations only (IO buffers)
        except Exception as e:
            out["shape_errors"][key] = short_error(e)
    if not out["shape_errors"]:
        del out["shape_errors"]
    return out


class GpuMonitor:
    """``nvidia-smi ... -lms`` sampling GPU utilisation and memory in the background while a block runs.

    ``summary()``: samples, mean / max utilisation (%), max memory used (MiB, every process on that GPU), or an
    ``error`` when nvidia-smi is missing or gave no samples. Never raises.
    """

    def __init__(self, exe: str = "nvidia-smi", interval_ms: int = 100, uuid: str | None = None) -> None:
        self.exe, self.interval_ms, self.uuid = exe, interval_ms, uuid
        self.proc: subprocess.Popen[bytes] | None = None
        self.error: str | None = None
        self.file: Any = None

    def __enter__(self) -> GpuMonitor:
        query = "--query-gpu=uuid,utilization.gpu,memory.used"
        cmd = [self.exe, query, "--format=csv,noheader,nounits", "-lms", str(self.interval_ms)]
        try:
            self.file = tempfile.TemporaryFile()
            self.proc = subprocess.Popen(cmd, stdout=self.file, stderr=subprocess.DEVNULL)
        except OSError as e:
            self.error = f"{self.exe} not available ({short_error(e)})"
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            with contextlib.suppress(OSError):
                self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def samples(self) -> list[tuple[float, float]]:
        """(utilisation %, memory used MiB) of this GPU (``uuid``); of the only GPU listed when that does not match
        (MIG, an odd UUID format); of every GPU listed otherwise."""
        if self.file is None:
            return []
        self.file.seek(0)
        rows: dict[str, list[tuple[float, float]]] = {}
        for line in self.file.read().decode(errors="replace").splitlines():
            parts = [p.strip() for p in line.split(",")]
            if len(parts) != 3:
                continue
            try:
                rows.setdefault(parts[0].removeprefix("GPU-"), []).append((float(parts[1]), float(parts[2])))
            except ValueError:
                continue
        if self.uuid and self.uuid.removeprefix("GPU-") in rows:
            return rows[self.uuid.removeprefix("GPU-")]
        return [r for group in rows.values() for r in group]

    def summary(self) -> dict[str, Any]:
        if self.error:
            return {"error": self.error}
        rows = self.samples()
        if not rows:
            rc = self.proc.returncode if self.proc is not None else None
            return {"error": f"{self.exe} gave no samples (exit status {rc})"}
        util = [u for u, _ in rows]
        return {
            "samples": len(rows),
            "interval_ms": self.interval_ms,
            "util_mean": sum(util) / len(util),
            "util_max": max(util),
            "mem_used_max_mib": max(m for _, m in rows),
        }


def _gpu_uuid(device: Any) -> str | None:
    import torch

    try:
        return str(torch.cuda.get_device_properties(device).uuid)
    except Exception:
        return None


def gpu_e2e(checkpoint: str, inputs: list[str], out: str, device: str, *, smi: str = "nvidia-smi") -> dict[str, Any]:
    """``confkd segment`` (run_batch, its defaults: amp auto, channels-last) with the torch backend on ``device``,
    the runner warmed up once first (``warmup_s``), nvidia-smi sampling the GPU during the batch."""
    import torch

    from confkd.data.volume import read_volume
    from confkd.inference.engine import batch_size_for, prepare
    from confkd.inference.inputs import resolve_inputs
    from confkd.inference.model import load_model
    from confkd.inference.pipeline import run_batch

    dev = torch.device(device)
    gpu_peak_reset(dev)
    model = load_model(checkpoint, backend="torch", device=device)
    runner = model.runner
    paths = [Path(p) for p in inputs]
    start = time.perf_counter()
    x = prepare(read_volume(paths[0]), model).slices(0)
    with torch.inference_mode():
        runner(x[: batch_size_for(runner, x.shape[2:])])
    sync(dev)
    warmup = time.perf_counter() - start
    del x
    gpu_peak_reset(dev)
    folder = Path(out)
    with GpuMonitor(smi, uuid=_gpu_uuid(dev) if dev.type == "cuda" else None) as monitor:
        start = time.perf_counter()
        result = run_batch(resolve_inputs(paths), folder, model)
        wall = time.perf_counter() - start
    stages = stage_means(folder, len(paths))
    peak = gpu_peak_mb(dev)
    rss = maxrss_mb()
    network = pure_network_seconds(paths, model)
    return {
        "device": str(runner.device),
        "amp": str(getattr(runner, "amp", None)).removeprefix("torch."),
        "ok": len(result.ok),
        "failed": len(result.failed),
        "warmup_s": warmup,
        "wall_s": wall,
        "scans_per_s": len(result.ok) / wall,
        "stage_mean_s": stages,
        "network_s": network,
        "e2e_over_network": wall / network if network > 0 else None,
        "gpu_peak_mb": peak,
        "gpu_monitor": monitor.summary(),
        "labels": labels_digest(folder, "*_seg.nii.gz"),
        "maxrss_mb": rss,
    }


def gpu_peer(
    checkpoint: str, model_dir: str, inputs: list[str], out: str, device: str, *, wanted: str = "auto"
) -> dict[str, Any]:
    """The peer (``peer.py``) with the torch network on ``device``: as a user writes it, float32 eager, each batch
    of slices copied to the device and its logits back (the peer's pre- and postprocessing stay on the CPU)."""
    import torch

    from confkd.inference.manifest import load_manifest
    from confkd.training.checkpoint import load_student

    dev = torch.device(device)
    gpu_peak_reset(dev)
    manifest = load_manifest(Path(model_dir))
    network, _ = load_student(checkpoint)
    network = network.eval().to(dev)

    def predictor(x: Any) -> Any:
        return network(x.to(dev)).float().cpu()

    flavour, run = peer_flavour(wanted)
    paths = [Path(p) for p in inputs]
    start = time.perf_counter()
    run(paths, Path(out), predictor, peer_config(manifest))
    sync(dev)
    wall = time.perf_counter() - start
    return {
        "flavour": flavour,
        "precision": "fp32 eager",
        "device": str(dev),
        "wall_s": wall,
        "scans_per_s": len(paths) / wall,
        "gpu_peak_mb": gpu_peak_mb(dev),
        "maxrss_mb": maxrss_mb(),
    }
