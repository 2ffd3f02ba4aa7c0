"""What the benchmark reports besides its measurements: the machine, the ratios the targets are stated in, and
the tables ``run.py`` prints (CPU rows; GPU rows)."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Any

from bench_common import GPU_NET_SHAPES, NET_SHAPES, shape_key, short_error

NET_SHAPES_STR = [shape_key(s) for s in NET_SHAPES]


# ---------------------------------------------------------------------------------------------- machine


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
        info["driver_error"] = short_error(e)
    return info


# ---------------------------------------------------------------------------------------------- CPU rows


def _stage_ms(v: dict[str, Any]) -> str:
    """An end-to-end row's mean milliseconds per stage: read, preprocess, infer, postprocess, write."""
    st = v["stage_mean_s"]
    return "".join(f"{1000 * st.get(k, 0):>6.0f}" for k in ("read", "preprocess", "infer", "postprocess", "write"))


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
        ms = _stage_ms(v)
        print(
            f"  confkd segment {b:<14}{v['scans_per_s']:>7.2f}{v['wall_s']:>9.2f}{v['network_s']:>11.2f}"
            f"{v['maxrss_mb']:>10.0f} {ms}"
        )
    for b, v in r["peer"].items():
        label = f"peer ({v['flavour']}) {b}"
        print(f"  {label:<29}{v['scans_per_s']:>7.2f}{v['wall_s']:>9.2f}{'':>11}{v['maxrss_mb']:>10.0f}")
    print("\nscale (one volume, onnxruntime)   seconds   ms/slice   peak MB   input MB")
    for v in r["scale"]:
        shape = shape_key(v["shape"])
        print(
            f"  {shape:<32}{v['seconds']:>8.2f}{1000 * v['seconds'] / v['shape'][2]:>11.1f}"
            f"{v['maxrss_mb']:>10.0f}{v['input_mb']:>11.0f}"
        )
    print("\nratios (targets: ort/eager >= 1.5, peer/e2e >= 2, e2e/network <= 1.15)")
    for k, v in r["ratios"].items():
        print(f"  {k:<50}{v:>7.2f}")


# ---------------------------------------------------------------------------------------------- GPU rows


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


def row_status(v: dict[str, Any]) -> str | None:
    for key in ("error", "skipped"):
        if key in v:
            return f"{key}: {v[key]}"
    return None


def _print_status(label: str, width: int, v: dict[str, Any]) -> bool:
    """Print a row that failed or was skipped (its label, then why) and say so; False for a row with results."""
    status = row_status(v)
    if status:
        print(f"  {label:<{width}}{status}")
    return status is not None


def print_gpu_table(r: dict[str, Any]) -> None:
    m = r.get("machine", {})
    g = m.get("gpu", {})
    versions = f"torch {m.get('torch')} (CUDA {g.get('torch_cuda')}), driver {g.get('driver')}"
    head = f"confkd benchmarks ({r['mode']}, {r.get('device')}): {g.get('name')}"
    print(f"\n{head}, {versions}, onnxruntime {m.get('onnxruntime')}")
    print(f"host: {m.get('cpu')}, {m.get('cores')} cores; TensorRT: not measured here")
    shapes = [shape_key(s) for s in GPU_NET_SHAPES]
    print(f"\n{'network, slices/s':<50}" + "".join(f"{s:>14}" for s in shapes) + "  peak MB")
    ways = (
        ("slices_per_s", "runner, host in"),
        ("runner_device_in_slices_per_s", "runner, GPU in"),
        ("network_only_slices_per_s", "network only"),
    )
    for name, v in r["net"].items():
        if _print_status(name, 48, v):
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
        if _print_status(label, 28, v):
            continue
        ms = _stage_ms(v)
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
        if _print_status(label, 28, v):
            continue
        print(f"  {label:<28}{v['scans_per_s']:>7.2f}{v['wall_s']:>9.2f}{'':>11}{_fmt(v.get('gpu_peak_mb'), '.0f', 8)}")
    if r["scale"]:
        print("\nscale (one volume, torch cuda)    seconds   ms/slice   GPU MB   peak MB   input MB")
        for v in r["scale"]:
            shape = shape_key(v["shape"])
            if _print_status(shape, 32, v):
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
