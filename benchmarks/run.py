"""confkd benchmarks: network throughput per backend, end-to-end ``segment``, the MONAI-style peer, memory, scale.

    python benchmarks/run.py [--quick] [--smoke] [--out benchmarks/results.json] [--volumes-from DIR_OR_GLOB]
    python benchmarks/run.py --quick --device cuda [--compile] [--scale]   # the GPU rows

Builds its own model (default-size student: width 16, depth 4, 4 classes, random weights; a real checkpoint and
its ONNX export) and synthetic ACDC-sized volumes in a temporary folder. Every configuration runs in its own
subprocess, so its peak memory is that process's ``ru_maxrss``. Prints a table and writes JSON. See
docs/performance.md for the figures and what limits them.

``--device cuda`` runs the GPU rows instead, in this process (one CUDA start-up; the GPU's peak memory is reset
before each row): the network per precision / memory layout (TorchRunner with its input on the host or on the GPU,
and the network alone), onnxruntime's CUDA provider when it has one, ``confkd segment`` end to end with the GPU's
utilisation sampled by nvidia-smi, and the naive peer on the GPU. Every row records an ``error`` instead of
stopping the run, and the JSON is rewritten after each row. ``--compile`` adds torch.compile (in a subprocess with a
hard time cap), ``--scale`` the scale rows (torch on the GPU).
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import hashlib
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SIZES: dict[str, dict[str, Any]] = {
    "smoke": {"volumes": 3, "shape": (64, 72, 4), "width": 4, "depth": 2, "net_s": 0.3, "scale": [(64, 64, 8)]},
    "quick": {
        "volumes": 30,
        "shape": (216, 256, 10),
        "width": 16,
        "depth": 4,
        "net_s": 3.0,
        "scale": [(128, 128, 30), (256, 256, 60), (512, 512, 150)],
    },
    "full": {
        "volumes": 30,
        "shape": (216, 256, 10),
        "width": 16,
        "depth": 4,
        "net_s": 8.0,
        "scale": [(128, 128, 30), (256, 256, 60), (512, 512, 150), (512, 512, 300)],
    },
}
SPACING = (1.5625, 1.5625, 10.0)  # ACDC-like: in-plane 1.56 mm, 10 mm slices
CT_SPACING = (0.78125, 0.78125, 1.25)  # the scale volumes: CT-like, resampled to the model's 1.5625 mm
NET_SHAPES = [(8, 1, 224, 224), (1, 1, 256, 256)]
GPU_NET_SHAPES: list[tuple[int, ...]] = [*NET_SHAPES, (32, 1, 224, 224)]
#: cuda: seconds of timed calls per (row, shape, variant); three variants per row
GPU_NET_S = {"smoke": 0.1, "quick": 0.4, "full": 1.0}
#: cuda network rows: name -> (TorchRunner amp, channels_last)
GPU_CONFIGS: dict[str, tuple[str, bool]] = {
    "torch-eager-fp32": ("off", False),
    "torch-fp32-channels-last": ("off", True),
    "torch-amp-bf16": ("bf16", False),
    "torch-amp-bf16-channels-last": ("bf16", True),
    "torch-amp-fp16-channels-last": ("fp16", True),
}
COMPILE_NAME = "torch-compile-bf16-channels-last"
#: torch.compile: compile + warm-up seconds after which its remaining shapes are skipped; the subprocess that runs
#: it is killed at the cap plus COMPILE_MARGIN_S (CUDA start-up, the timed calls)
COMPILE_CAP_S = 60.0
COMPILE_MARGIN_S = 25.0
VOLUME_SUFFIXES = (".nii", ".nii.gz")


# ---------------------------------------------------------------------------------------------- setup


def build_model(work: Path, width: int, depth: int) -> tuple[Path, Path]:

    from confkd.config import config_from_dict
    from confkd.export.onnx_export import export_model
    from confkd.training.checkpoint import save_untrained_checkpoint

    cfg = config_from_dict(
        {
            "model": {"width": width, "depth": depth, "num_classes": 4},
            "preprocess": {"target_spacing": [SPACING[0], SPACING[1]]},
            "train": {"patch_size": [224, 224]},
        }
    )
    path = save_untrained_checkpoint(
        cfg,
        work / "student.pt",
        label_names=("background", "RV", "MYO", "LV"),
        ignore_index=4,
        warmup_shape=(4, 1, 64, 64),  # non-trivial BatchNorm statistics
        dataset_name="benchmark",
    )
    export_model(path, work / "model")
    return path, work / "model"


def _phantom(shape: tuple[int, ...], seed: int) -> Any:
    import numpy as np

    rng = np.random.default_rng(seed)
    i, j = np.mgrid[: shape[0], : shape[1]]
    ci, cj = shape[0] / 2 + rng.normal(0, 5), shape[1] / 2 + rng.normal(0, 5)
    r = np.hypot(i - ci, j - cj)[..., None] * (1 + 0.03 * np.arange(shape[2]))
    vol = 300 * (r < shape[0] / 6) + 150 * (r < shape[0] / 3) + rng.normal(100, 30, shape)
    return np.clip(vol, -1024, 3000).astype(np.int16)


def write_volumes(folder: Path, n: int, shape: tuple[int, int, int]) -> list[Path]:
    import nibabel as nib
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    affine = np.diag([*SPACING, 1.0])
    paths = []
    for k in range(n):
        img = nib.Nifti1Image(_phantom(shape, k), affine)
        img.header.set_xyzt_units("mm", "sec")
        path = folder / f"case{k:03d}.nii.gz"
        nib.save(img, path)
        paths.append(path)
    return paths


def find_volumes(spec: str, n: int) -> list[Path]:
    """The first ``n`` (sorted) ``*.nii`` / ``*.nii.gz`` files of a folder, or of what a glob pattern matches."""
    folder = Path(spec).expanduser()
    if folder.is_dir():
        found = [p for p in folder.iterdir() if p.is_file() and p.name.lower().endswith(VOLUME_SUFFIXES)]
    else:
        found = [Path(p) for p in glob.glob(os.path.expanduser(spec), recursive=True) if Path(p).is_file()]
    found.sort()
    if not found:
        raise ValueError(f"--volumes-from {spec}: no *.nii / *.nii.gz files found")
    return found[:n]


# ---------------------------------------------------------------------------------------------- children


def _maxrss_mb() -> float:
    """Peak resident memory of this process in MiB: VmHWM, which (unlike ru_maxrss) an exec resets on Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux, bytes on macOS


def _reset_peak() -> bool:
    """Reset this process's peak-RSS counter (Linux: ``5 > /proc/self/clear_refs``), so that what was allocated
    to build the test input does not count; False where that is not possible."""
    import gc

    gc.collect()
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _timeit(fn: Any, seconds: float) -> float:
    """Seconds per call: warm up twice, then repeat for about ``seconds``."""
    fn()
    fn()
    n, start = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds and n >= 3:
            return elapsed / n


def child_net(job: dict[str, Any]) -> dict[str, Any]:
    import torch

    from confkd.inference.manifest import load_manifest
    from confkd.inference.runners import TorchRunner
    from confkd.inference.runners_onnx import OrtRunner
    from confkd.training.checkpoint import load_student

    backend = job["backend"]
    if backend == "onnxruntime":
        model_dir = Path(job["model_dir"])
        manifest = load_manifest(model_dir)
        runner: Any = OrtRunner(model_dir / manifest.model_file, manifest, device=torch.device("cpu"))
    else:
        network, _ = load_student(job["checkpoint"])
        runner = TorchRunner(network, device="cpu", amp="off", channels_last=backend == "torch-channels-last")
    out = {}
    for shape in NET_SHAPES:
        x = torch.randn(shape)
        per_call = _timeit(lambda x=x: runner(x), job["seconds"])
        out["x".join(map(str, shape))] = shape[0] / per_call
    return {"slices_per_s": out, "threads": torch.get_num_threads()}


def _labels_digest(out: Path, pattern: str) -> str:
    import nibabel as nib
    import numpy as np

    h = hashlib.sha256()
    for path in sorted(out.glob(pattern)):
        h.update(path.name.encode())
        img: Any = nib.load(path)
        h.update(np.ascontiguousarray(np.asanyarray(img.dataobj)).tobytes())
    return h.hexdigest()[:16]


def pure_network_seconds(paths: list[Path], model: Any) -> float:
    """The network alone on the batch: the runner on every preprocessed volume, batched as the engine does."""
    import torch

    from confkd.data.volume import read_volume
    from confkd.inference.engine import batch_size_for, prepare

    images = [prepare(read_volume(p), model).slices(0) for p in paths]
    runner = model.runner
    total = 0.0
    with torch.inference_mode():
        for x in images:
            n = batch_size_for(runner, x.shape[2:])
            start = time.perf_counter()
            for b in range(0, x.shape[0], n):
                runner(x[b : b + n])
            _sync(runner.device)  # CUDA runners return before the GPU is done
            total += time.perf_counter() - start
    return total


def child_e2e(job: dict[str, Any]) -> dict[str, Any]:
    from confkd.inference.inputs import resolve_inputs
    from confkd.inference.model import load_model
    from confkd.inference.pipeline import run_batch

    backend = job["backend"]
    model = load_model(job["checkpoint"] if backend == "torch" else job["model_dir"], backend=backend, device="cpu")
    paths = [Path(p) for p in job["inputs"]]
    out = Path(job["out"])
    start = time.perf_counter()
    result = run_batch(resolve_inputs(paths), out, model)
    wall = time.perf_counter() - start
    stages: dict[str, float] = {}
    for report in out.glob("*.json"):
        for k, v in json.loads(report.read_text())["timings_s"].items():
            stages[k] = stages.get(k, 0.0) + v / len(paths)
    rss = _maxrss_mb()  # before the pure-network pass below
    network = pure_network_seconds(paths, model)
    return {
        "ok": len(result.ok),
        "wall_s": wall,
        "scans_per_s": len(result.ok) / wall,
        "stage_mean_s": stages,
        "network_s": network,
        "labels": _labels_digest(out, "*_seg.nii.gz"),
        "maxrss_mb": rss,
    }


def child_peer(job: dict[str, Any]) -> dict[str, Any]:
    import peer

    from confkd.inference.manifest import load_manifest
    from confkd.training.checkpoint import load_student

    paths = [Path(p) for p in job["inputs"]]
    manifest = load_manifest(Path(job["model_dir"]))
    cfg = {
        "target_spacing": manifest.preprocessing["target_spacing"],
        "clip": manifest.preprocessing["clip_percentiles"],
        "divisor": manifest.divisor,
        "max_tile": manifest.bounds.max_spatial[0],
    }
    if job["backend"] == "torch":
        network, _ = load_student(job["checkpoint"])
        predictor: Any = network.eval()
    else:
        predictor = peer.ort_predictor(Path(job["model_dir"]) / manifest.model_file, os.cpu_count() or 1)
    wanted = job.get("peer", "auto")
    flavour = "monai" if wanted == "monai" or (wanted == "auto" and peer.monai_available()) else "naive"
    run = peer.run_monai if flavour == "monai" else peer.run_naive
    start = time.perf_counter()
    run(paths, Path(job["out"]), predictor, cfg)
    wall = time.perf_counter() - start
    return {"flavour": flavour, "wall_s": wall, "scans_per_s": len(paths) / wall}


def child_scale(job: dict[str, Any]) -> dict[str, Any]:
    import numpy as np

    from confkd.data.volume import Volume
    from confkd.inference.engine import segment_volume
    from confkd.inference.model import load_model

    backend, device = job.get("backend", "onnxruntime"), job.get("device", "cpu")
    model = load_model(job["checkpoint"] if backend == "torch" else job["model_dir"], backend=backend, device=device)
    shape = tuple(job["shape"])
    vol = Volume(_phantom(shape, 0), np.diag([*CT_SPACING, 1.0]), "nifti1")
    reset = _reset_peak()  # building the phantom's float64 temporaries is not the engine's memory
    base = _maxrss_mb()
    _gpu_peak_reset(model.runner.device)
    start = time.perf_counter()
    result = segment_volume(vol, model)
    wall = time.perf_counter() - start
    out = {
        "shape": list(shape),
        "seconds": wall,
        "timings": result.timings,
        "maxrss_mb": _maxrss_mb(),
        "rss_before_mb": base,
        "peak_reset": reset,
        "input_mb": vol.array.nbytes / 2**20,
    }
    if device != "cpu":
        out.update(backend=backend, device=device, gpu_peak_mb=_gpu_peak_mb(model.runner.device))
    return out


# ---------------------------------------------------------------------------------------------- GPU rows
# Each takes a ``device`` ("cuda", or "cpu" to exercise the code without a GPU) and runs in this process.


def _sync(device: Any) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _gpu_peak_reset(device: Any) -> None:
    import gc

    import torch

    if torch.device(device).type == "cuda":
        gc.collect()
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _gpu_peak_mb(device: Any) -> float | None:
    """Peak GPU memory allocated by torch since :func:`_gpu_peak_reset`, MiB (None on the CPU)."""
    import torch

    if torch.device(device).type != "cuda":
        return None
    return float(torch.cuda.max_memory_allocated(device)) / 2**20


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:500]


def _time_per_call(fn: Callable[[], Any], seconds: float, device: Any) -> float:
    """Seconds per call of an already warmed-up ``fn``, synchronising the device: one call calibrates how many
    calls fill about ``seconds`` (at least 3), then those run back to back and the device is synchronised once."""
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    one = time.perf_counter() - start
    n = max(3, min(10_000, math.ceil(seconds / max(one, 1e-6))))
    start = time.perf_counter()
    for _ in range(n):
        fn()
    _sync(device)
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
    _gpu_peak_reset(dev)
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
        key = "x".join(map(str, shape))
        if compile and warm_total > compile_cap_s:
            out["shape_errors"][key] = f"skipped: compile + warm-up took {warm_total:.0f} s > {compile_cap_s:.0f} s"
            continue
        try:
            _gpu_peak_reset(dev)
            x_host = torch.randn(shape)
            x_dev = x_host.to(dev).contiguous(memory_format=runner.memory_format)
            start = time.perf_counter()
            for _ in range(2):
                runner(x_host)
                runner(x_dev)
                net_only(x_dev)
            _sync(dev)
            out["warmup_s"][key] = time.perf_counter() - start
            warm_total += out["warmup_s"][key]
            out["output_device"] = str(runner(x_dev).device)
            n = shape[0]
            out["slices_per_s"][key] = n / _time_per_call(partial(runner, x_host), seconds, dev)
            out["runner_device_in_slices_per_s"][key] = n / _time_per_call(partial(runner, x_dev), seconds, dev)
            out["network_only_slices_per_s"][key] = n / _time_per_call(partial(net_only, x_dev), seconds, dev)
            out["peak_mb_per_shape"][key] = _gpu_peak_mb(dev)
            del x_host, x_dev
        except Exception as e:  # e.g. out of memory: the other shapes still run
            out["shape_errors"][key] = _error(e)
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


def spawn_capped(job: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    """:func:`spawn` with a hard time limit: the child's whole process group (inductor's compile workers too) is
    killed when it runs past ``timeout_s``, and a ``skipped`` row comes back."""
    import signal

    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(job)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return {"skipped": f"killed after {timeout_s:.0f} s (compile + warm-up cap {job.get('compile_cap_s')} s)"}
    if proc.returncode != 0:
        tail = stderr.strip().splitlines()[-1:] or [f"exit status {proc.returncode}"]
        return {"error": f"child {job['kind']} failed: {tail[0][:500]}", "stderr_tail": stderr[-3000:]}
    result: dict[str, Any] = json.loads(stdout.strip().splitlines()[-1])
    return result


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
    _gpu_peak_reset(dev)
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
        key = "x".join(map(str, shape))
        try:
            _gpu_peak_reset(dev)
            x_host = torch.randn(shape)
            x_dev = x_host.to(dev)
            for _ in range(2):
                runner(x_host)
                runner(x_dev)
            out["slices_per_s"][key] = shape[0] / _time_per_call(partial(runner, x_host), seconds, dev)
            out["runner_device_in_slices_per_s"][key] = shape[0] / _time_per_call(partial(runner, x_dev), seconds, dev)
            out["peak_mb_per_shape"][key] = _gpu_peak_mb(dev)  # torch's allocations only (IO buffers)
        except Exception as e:
            out["shape_errors"][key] = _error(e)
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
            self.error = f"{self.exe} not available ({_error(e)})"
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
    _gpu_peak_reset(dev)
    model = load_model(checkpoint, backend="torch", device=device)
    runner = model.runner
    paths = [Path(p) for p in inputs]
    start = time.perf_counter()
    x = prepare(read_volume(paths[0]), model).slices(0)
    with torch.inference_mode():
        runner(x[: batch_size_for(runner, x.shape[2:])])
    _sync(dev)
    warmup = time.perf_counter() - start
    del x
    _gpu_peak_reset(dev)
    folder = Path(out)
    with GpuMonitor(smi, uuid=_gpu_uuid(dev) if dev.type == "cuda" else None) as monitor:
        start = time.perf_counter()
        result = run_batch(resolve_inputs(paths), folder, model)
        wall = time.perf_counter() - start
    stages: dict[str, float] = {}
    for report in folder.glob("*.json"):
        for k, v in json.loads(report.read_text())["timings_s"].items():
            stages[k] = stages.get(k, 0.0) + v / len(paths)
    peak = _gpu_peak_mb(dev)
    rss = _maxrss_mb()
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
        "labels": _labels_digest(folder, "*_seg.nii.gz"),
        "maxrss_mb": rss,
    }


def gpu_peer(
    checkpoint: str, model_dir: str, inputs: list[str], out: str, device: str, *, wanted: str = "auto"
) -> dict[str, Any]:
    """The peer (``peer.py``) with the torch network on ``device``: as a user writes it, float32 eager, each batch
    of slices copied to the device and its logits back (the peer's pre- and postprocessing stay on the CPU)."""
    import torch

    sys.path.insert(0, str(HERE))
    import peer

    from confkd.inference.manifest import load_manifest
    from confkd.training.checkpoint import load_student

    dev = torch.device(device)
    _gpu_peak_reset(dev)
    manifest = load_manifest(Path(model_dir))
    cfg = {
        "target_spacing": manifest.preprocessing["target_spacing"],
        "clip": manifest.preprocessing["clip_percentiles"],
        "divisor": manifest.divisor,
        "max_tile": manifest.bounds.max_spatial[0],
    }
    network, _ = load_student(checkpoint)
    network = network.eval().to(dev)

    def predictor(x: Any) -> Any:
        return network(x.to(dev)).float().cpu()

    flavour = "monai" if wanted == "monai" or (wanted == "auto" and peer.monai_available()) else "naive"
    run = peer.run_monai if flavour == "monai" else peer.run_naive
    paths = [Path(p) for p in inputs]
    start = time.perf_counter()
    run(paths, Path(out), predictor, cfg)
    _sync(dev)
    wall = time.perf_counter() - start
    return {
        "flavour": flavour,
        "precision": "fp32 eager",
        "device": str(dev),
        "wall_s": wall,
        "scans_per_s": len(paths) / wall,
        "gpu_peak_mb": _gpu_peak_mb(dev),
        "maxrss_mb": _maxrss_mb(),
    }


def gpu_machine(device: str) -> dict[str, Any]:
    """The GPU, its driver and CUDA / cuDNN versions, onnxruntime's providers."""
    import onnxruntime
    import torch

    dev = torch.device(device)
    info: dict[str, Any] = {"torch_cuda": torch.version.cuda, "ort_providers": onnxruntime.get_available_providers()}
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        info.update(
            name=torch.cuda.get_device_name(dev),
            capability=f"{props.major}.{props.minor}",
            memory_gib=props.total_memory / 2**30,
            device_count=torch.cuda.device_count(),
            cudnn=torch.backends.cudnn.version(),
            cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
            cudnn_benchmark=torch.backends.cudnn.benchmark,
            matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32,
            bf16_supported=torch.cuda.is_bf16_supported(),
        )
    try:
        proc = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version,name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
        first = proc.stdout.strip().splitlines()[:1]
        info["driver"] = first[0].split(",")[0].strip() if proc.returncode == 0 and first else None
    except (OSError, subprocess.TimeoutExpired) as e:
        info["driver"] = None
        info["driver_error"] = _error(e)
    return info


CHILDREN = {
    "net": child_net,
    "e2e": child_e2e,
    "peer": child_peer,
    "scale": child_scale,
    "gpu_net": child_gpu_net,
}


def spawn(job: dict[str, Any], *, in_process: bool = False) -> dict[str, Any]:
    if in_process:  # --smoke: no interpreter start-ups; peak memory is then the whole run's
        sys.path.insert(0, str(HERE))
        value = CHILDREN[job["kind"]](job)
        value.setdefault("maxrss_mb", _maxrss_mb())
        return value
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(job)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark child {job['kind']} failed:\n{proc.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def run_child(job_text: str) -> None:
    sys.path.insert(0, str(HERE))
    job = json.loads(job_text)
    result = CHILDREN[job["kind"]](job)
    result.setdefault("maxrss_mb", _maxrss_mb())
    print(json.dumps(result))


# ---------------------------------------------------------------------------------------------- main


def machine() -> dict[str, Any]:
    import numpy as np
    import onnxruntime
    import torch

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "numpy": np.__version__,
        "cuda": torch.cuda.is_available(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repeats, scale up to 512x512x150")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks that the benchmark runs")
    parser.add_argument("--out", type=Path, default=HERE / "results.json")
    parser.add_argument(
        "--peer", choices=("auto", "monai", "naive"), default="auto", help="the peer: MONAI when installed (auto)"
    )
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), default="cpu", help="cuda: the GPU rows instead of the CPU ones"
    )
    parser.add_argument(
        "--volumes-from",
        metavar="DIR_OR_GLOB",
        help="real scans for end to end and the peer: the first 30 (smoke: 3) *.nii / *.nii.gz, sorted, of a folder "
        "or a glob pattern, instead of synthetic phantoms",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help=f"cuda: also torch.compile (bf16, channels-last), last; skipped past {COMPILE_CAP_S:.0f} s of compile",
    )
    parser.add_argument("--scale", action="store_true", help="cuda: also the scale rows (torch on the GPU)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        run_child(args.child)
        return 0
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    size = SIZES[mode]
    volumes = None
    if args.volumes_from:
        try:
            volumes = find_volumes(args.volumes_from, size["volumes"])
        except ValueError as e:
            print(e, file=sys.stderr)
            return 2
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("CUDA not available: torch sees no GPU; run without --device cuda", file=sys.stderr)
            return 2
        return main_gpu(args, mode, size, volumes)
    t0 = time.perf_counter()
    results: dict[str, Any] = {"mode": mode, "machine": machine(), "net": {}, "e2e": {}, "peer": {}, "scale": []}
    if volumes is not None:
        results["volumes_from"] = [str(p) for p in volumes]
    with tempfile.TemporaryDirectory(prefix="confkd-bench-") as tmp:
        work = Path(tmp)
        ckpt, model_dir = build_model(work, size["width"], size["depth"])
        if volumes is None:
            inputs = [str(p) for p in write_volumes(work / "scans", size["volumes"], size["shape"])]
        else:
            inputs = [str(p) for p in volumes]
        common = {"checkpoint": str(ckpt), "model_dir": str(model_dir)}
        for backend in ("torch-eager", "torch-channels-last", "onnxruntime"):
            job = {"kind": "net", "backend": backend, "seconds": size["net_s"], **common}
            results["net"][backend] = spawn(job, in_process=args.smoke)
        for backend in ("torch", "onnxruntime"):
            job = {"kind": "e2e", "backend": backend, "inputs": inputs, "out": str(work / f"e2e-{backend}"), **common}
            results["e2e"][backend] = spawn(job, in_process=args.smoke)
            job = {"kind": "peer", "backend": backend, "inputs": inputs, "out": str(work / f"peer-{backend}"), **common}
            job["peer"] = args.peer
            results["peer"][backend] = spawn(job, in_process=args.smoke)
        for shape in size["scale"]:
            results["scale"].append(spawn({"kind": "scale", "shape": list(shape), **common}, in_process=args.smoke))
    results["ratios"] = ratios(results)
    results["seconds"] = time.perf_counter() - t0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print_table(results)
    print(f"\nwrote {args.out} in {results['seconds']:.0f} s")
    return 0


def main_gpu(
    args: argparse.Namespace, mode: str, size: dict[str, Any], volumes: list[Path] | None, device: str = "cuda"
) -> int:
    """The GPU rows, in this process; each row's failure is recorded (``error``) and the run goes on. The JSON is
    rewritten after every row, so that a run cut short still leaves what it measured. (``device="cpu"`` runs the
    same code without a GPU, to check it.)"""
    t0 = time.perf_counter()
    results: dict[str, Any] = {"mode": mode, "device": device, "net": {}, "e2e": {}, "peer": {}, "scale": []}
    results["errors"] = {}
    results["volumes_from"] = [str(p) for p in volumes] if volumes is not None else "synthetic"

    def save() -> None:
        results["seconds"] = time.perf_counter() - t0
        try:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(results, indent=2, default=str) + "\n")
        except OSError as e:
            print(f"cannot write {args.out}: {_error(e)}", file=sys.stderr)

    def row(label: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        start = time.perf_counter()
        try:
            value = fn()
        except Exception as e:
            value = {"error": _error(e)}
            print("".join(traceback.format_exception(e)[-3:]).rstrip(), file=sys.stderr)
        value["row_s"] = time.perf_counter() - start
        status = "ok"
        for key in ("error", "skipped"):
            if key in value:
                status = f"{key}: {value[key]}"
        if "error" in value:
            results["errors"][label] = value["error"]
        elapsed = time.perf_counter() - t0
        print(f"[{elapsed:6.1f} s] {label}: {status} ({value['row_s']:.1f} s)", file=sys.stderr, flush=True)
        save()
        return value

    results["machine"] = row("machine", lambda: {**machine(), "gpu": gpu_machine(device)})
    seconds = GPU_NET_S[mode]
    shapes = GPU_NET_SHAPES
    with tempfile.TemporaryDirectory(prefix="confkd-bench-") as tmp:
        work = Path(tmp)
        built: dict[str, Any] = row(
            "build model",
            lambda: dict(
                zip(("checkpoint", "model_dir"), map(str, build_model(work, size["width"], size["depth"])), strict=True)
            ),
        )
        if "error" in built:
            return finish_gpu(args, results, save)
        ckpt, model_dir = built["checkpoint"], built["model_dir"]
        if volumes is None:
            made = row(
                "volumes",
                lambda: {"paths": [str(p) for p in write_volumes(work / "scans", size["volumes"], size["shape"])]},
            )
            inputs: list[str] = made.get("paths", [])
        else:
            inputs = [str(p) for p in volumes]
        for name, (amp, channels_last) in GPU_CONFIGS.items():
            results["net"][name] = row(
                f"net {name}",
                partial(
                    gpu_net_row, ckpt, device, amp=amp, channels_last=channels_last, shapes=shapes, seconds=seconds
                ),
            )
        results["net"]["onnxruntime-cuda"] = row(
            "net onnxruntime-cuda", lambda: gpu_ort_row(model_dir, device, shapes=shapes, seconds=seconds)
        )
        if inputs:
            results["e2e"]["torch"] = row("e2e torch", lambda: gpu_e2e(ckpt, inputs, str(work / "e2e-torch"), device))
            results["peer"]["torch"] = row(
                "peer torch",
                lambda: gpu_peer(ckpt, model_dir, inputs, str(work / "peer-torch"), device, wanted=args.peer),
            )
        for shape in size["scale"] if args.scale else []:
            job = {
                "shape": list(shape),
                "backend": "torch",
                "device": device,
                "checkpoint": ckpt,
                "model_dir": model_dir,
            }
            value = row(f"scale {'x'.join(map(str, shape))}", partial(child_scale, job))
            value.setdefault("shape", list(shape))
            results["scale"].append(value)
        if args.compile:
            cap = COMPILE_CAP_S
            job = {"kind": "gpu_net", "checkpoint": ckpt, "device": device, "amp": "bf16", "channels_last": True}
            job.update(compile=True, compile_cap_s=cap, shapes=[list(s) for s in shapes], seconds=seconds)
            results["net"][COMPILE_NAME] = row(f"net {COMPILE_NAME}", lambda: spawn_capped(job, cap + COMPILE_MARGIN_S))
    return finish_gpu(args, results, save)


def finish_gpu(args: argparse.Namespace, results: dict[str, Any], save: Callable[[], None]) -> int:
    try:
        results["ratios"] = gpu_ratios(results)
    except Exception as e:
        results["ratios"] = {}
        results["errors"]["ratios"] = _error(e)
    save()
    try:
        print_gpu_table(results)
    except Exception as e:
        print(f"cannot print the table ({_error(e)}); the results are in {args.out}")
    failed = len(results["errors"])
    print(f"\nwrote {args.out} in {results['seconds']:.0f} s" + (f"; {failed} row(s) failed" if failed else ""))
    return 0


def gpu_ratios(r: dict[str, Any]) -> dict[str, float]:
    """Speed-ups over the float32 eager row (the runner with its input on the device), and end to end."""
    out: dict[str, float] = {}
    base = r["net"].get("torch-eager-fp32", {}).get("runner_device_in_slices_per_s", {})
    for name, v in r["net"].items():
        if name == "torch-eager-fp32":
            continue
        for shape, value in v.get("runner_device_in_slices_per_s", {}).items():
            if base.get(shape):
                out[f"{name}_vs_eager_fp32[{shape}]"] = value / base[shape]
    e2e, peer = r["e2e"].get("torch", {}), r["peer"].get("torch", {})
    if e2e.get("wall_s") and e2e.get("network_s"):
        out["e2e_over_network[torch-cuda]"] = e2e["wall_s"] / e2e["network_s"]
    if e2e.get("wall_s") and peer.get("wall_s"):
        out["e2e_vs_peer[torch-cuda]"] = peer["wall_s"] / e2e["wall_s"]
    return out


def _fmt(value: Any, spec: str, width: int) -> str:
    return f"{value:>{width}{spec}}" if isinstance(value, int | float) else f"{'-':>{width}}"


def _status(v: dict[str, Any]) -> str | None:
    for key in ("error", "skipped"):
        if key in v:
            return f"{key}: {v[key]}"
    return None


def print_gpu_table(r: dict[str, Any]) -> None:
    m = r.get("machine", {})
    g = m.get("gpu", {})
    versions = f"torch {m.get('torch')} (CUDA {g.get('torch_cuda')}), driver {g.get('driver')}"
    head = f"confkd benchmarks ({r['mode']}, {r.get('device')}): {g.get('name')}"
    print(f"\n{head}, {versions}, onnxruntime {m.get('onnxruntime')}")
    print(f"host: {m.get('cpu')}, {m.get('cores')} cores; TensorRT: not measured here")
    shapes = ["x".join(map(str, s)) for s in GPU_NET_SHAPES]
    print(f"\n{'network, slices/s':<50}" + "".join(f"{s:>14}" for s in shapes) + "  peak MB")
    ways = (
        ("slices_per_s", "runner, host in"),
        ("runner_device_in_slices_per_s", "runner, GPU in"),
        ("network_only_slices_per_s", "network only"),
    )
    for name, v in r["net"].items():
        status = _status(v)
        if status:
            print(f"  {name:<48}{status}")
            continue
        first = True
        for key, label in ways:
            if key not in v:
                continue
            row = "".join(_fmt(v[key].get(s), ".1f", 14) for s in shapes)
            peak = _fmt(v.get("peak_mb"), ".0f", 9) if first else ""
            print(f"  {name if first else '':<33}{label:<15}{row}{peak}")
            first = False
        for shape, err in v.get("shape_errors", {}).items():
            print(f"  {'':<33}{shape}: {err}")
    print(
        "\nend to end (batch, cuda)      scans/s   wall s  network s  GPU MB  util mean/max %  "
        "read  prep  infer  post  write (ms)"
    )
    for b, v in r["e2e"].items():
        label = f"confkd segment {b}"
        status = _status(v)
        if status:
            print(f"  {label:<28}{status}")
            continue
        st = v["stage_mean_s"]
        ms = "".join(f"{1000 * st.get(k, 0):>6.0f}" for k in ("read", "preprocess", "infer", "postprocess", "write"))
        mon = v.get("gpu_monitor", {})
        util = f"{mon['util_mean']:>6.0f} /{mon['util_max']:>4.0f}" if "util_mean" in mon else f"{'n/a':>11}"
        print(
            f"  {label:<28}{v['scans_per_s']:>7.2f}{v['wall_s']:>9.2f}{v['network_s']:>11.2f}"
            f"{_fmt(v.get('gpu_peak_mb'), '.0f', 8)}{util:>17}  {ms}"
        )
        if "error" in mon:
            print(f"  {'':<28}GPU utilisation: {mon['error']}")
    for b, v in r["peer"].items():
        label = f"peer ({v.get('flavour', '?')}) {b}"
        status = _status(v)
        if status:
            print(f"  {label:<28}{status}")
            continue
        print(f"  {label:<28}{v['scans_per_s']:>7.2f}{v['wall_s']:>9.2f}{'':>11}{_fmt(v.get('gpu_peak_mb'), '.0f', 8)}")
    if r["scale"]:
        print("\nscale (one volume, torch cuda)    seconds   ms/slice   GPU MB   peak MB   input MB")
        for v in r["scale"]:
            shape = "x".join(map(str, v["shape"]))
            status = _status(v)
            if status:
                print(f"  {shape:<32}{status}")
                continue
            print(
                f"  {shape:<32}{v['seconds']:>8.2f}{1000 * v['seconds'] / v['shape'][2]:>11.1f}"
                f"{_fmt(v.get('gpu_peak_mb'), '.0f', 9)}{v['maxrss_mb']:>10.0f}{v['input_mb']:>11.0f}"
            )
    print("\nratios (speed-ups: runner with its input on the GPU, over torch-eager-fp32)")
    for k, v in r.get("ratios", {}).items():
        print(f"  {k:<60}{v:>7.2f}")
    if r.get("errors"):
        print("\nerrors")
        for k, v in r["errors"].items():
            print(f"  {k}: {v}")


def ratios(r: dict[str, Any]) -> dict[str, float]:
    net, e2e, peer = r["net"], r["e2e"], r["peer"]
    out = {}
    for shape in net["onnxruntime"]["slices_per_s"]:
        ort, eager = net["onnxruntime"]["slices_per_s"][shape], net["torch-eager"]["slices_per_s"][shape]
        out[f"ort_vs_torch_eager[{shape}]"] = ort / eager
        out[f"ort_vs_torch_channels_last[{shape}]"] = ort / net["torch-channels-last"]["slices_per_s"][shape]
    for b in ("torch", "onnxruntime"):
        out[f"e2e_vs_peer[{b}]"] = peer[b]["wall_s"] / e2e[b]["wall_s"]
        out[f"e2e_over_network[{b}]"] = e2e[b]["wall_s"] / e2e[b]["network_s"]
    return out


def print_table(r: dict[str, Any]) -> None:
    m = r["machine"]
    versions = f"torch {m['torch']}, onnxruntime {m['onnxruntime']}"
    print(f"\nconfkd benchmarks ({r['mode']}): {m['cpu']}, {m['cores']} cores, {versions}")
    print("TensorRT / AMP / torch.compile: skipped (no CUDA)" if not m["cuda"] else "CUDA present: GPU rows not run")
    print("\nnetwork, slices/s            " + "".join(f"{s:>14}" for s in NET_SHAPES_STR) + "   peak MB")
    for name, v in r["net"].items():
        row = "".join(f"{v['slices_per_s'][s]:>14.1f}" for s in NET_SHAPES_STR)
        print(f"  {name:<27}{row}{v['maxrss_mb']:>10.0f}")
    print("\nend to end (batch)            scans/s   wall s  network s   peak MB   read  prep  infer  post  write (ms)")
    for b, v in r["e2e"].items():
        st = v["stage_mean_s"]
        ms = "".join(f"{1000 * st.get(k, 0):>6.0f}" for k in ("read", "preprocess", "infer", "postprocess", "write"))
        print(
            f"  confkd segment {b:<14}{v['scans_per_s']:>7.2f}{v['wall_s']:>9.2f}{v['network_s']:>11.2f}"
            f"{v['maxrss_mb']:>10.0f} {ms}"
        )
    for b, v in r["peer"].items():
        label = f"peer ({v['flavour']}) {b}"
        print(f"  {label:<29}{v['scans_per_s']:>7.2f}{v['wall_s']:>9.2f}{'':>11}{v['maxrss_mb']:>10.0f}")
    print("\nscale (one volume, onnxruntime)   seconds   ms/slice   peak MB   input MB")
    for v in r["scale"]:
        shape = "x".join(map(str, v["shape"]))
        print(
            f"  {shape:<32}{v['seconds']:>8.2f}{1000 * v['seconds'] / v['shape'][2]:>11.1f}"
            f"{v['maxrss_mb']:>10.0f}{v['input_mb']:>11.0f}"
        )
    print("\nratios (targets: ort/eager >= 1.5, peer/e2e >= 2, e2e/network <= 1.15)")
    for k, v in r["ratios"].items():
        print(f"  {k:<50}{v:>7.2f}")


NET_SHAPES_STR = ["x".join(map(str, s)) for s in NET_SHAPES]

if __name__ == "__main__":
    sys.exit(main())
