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
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

# siblings in benchmarks/, which is sys.path[0] when this file runs as a script (and in every child it spawns)
from bench_common import GPU_NET_SHAPES, build_model, find_volumes, maxrss_mb, shape_key, short_error, write_volumes
from bench_cpu import child_e2e, child_net, child_peer, child_scale
from bench_gpu import COMPILE_CAP_S, child_gpu_net, gpu_e2e, gpu_net_row, gpu_ort_row, gpu_peer
from bench_report import gpu_machine, gpu_ratios, machine, print_gpu_table, print_table, ratios, row_status

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
#: the torch.compile subprocess is killed at its compile + warm-up cap (bench_gpu.COMPILE_CAP_S) plus this margin
#: (CUDA start-up, the timed calls)
COMPILE_MARGIN_S = 25.0


# ---------------------------------------------------------------------------------------------- children

CHILDREN: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "net": child_net,
    "e2e": child_e2e,
    "peer": child_peer,
    "scale": child_scale,
    "gpu_net": child_gpu_net,
}


def _child_argv(job: dict[str, Any]) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(job)]


def _run_job(job: dict[str, Any]) -> dict[str, Any]:
    value = CHILDREN[job["kind"]](job)
    value.setdefault("maxrss_mb", maxrss_mb())
    return value


def spawn(job: dict[str, Any], *, in_process: bool = False) -> dict[str, Any]:
    if in_process:  # --smoke: no interpreter start-ups; peak memory is then the whole run's
        return _run_job(job)
    proc = subprocess.run(_child_argv(job), capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark child {job['kind']} failed:\n{proc.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def spawn_capped(job: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    """:func:`spawn` with a hard time limit: the child's whole process group (inductor's compile workers too) is
    killed when it runs past ``timeout_s``, and a ``skipped`` row comes back."""
    import signal

    proc = subprocess.Popen(
        _child_argv(job),
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


def run_child(job_text: str) -> None:
    print(json.dumps(_run_job(json.loads(job_text))))


# ---------------------------------------------------------------------------------------------- main


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
            print(f"cannot write {args.out}: {short_error(e)}", file=sys.stderr)

    def row(label: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        start = time.perf_counter()
        try:
            value = fn()
        except Exception as e:
            value = {"error": short_error(e)}
            print("".join(traceback.format_exception(e)[-3:]).rstrip(), file=sys.stderr)
        value["row_s"] = time.perf_counter() - start
        status = row_status(value) or "ok"
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
            value = row(f"scale {shape_key(shape)}", partial(child_scale, job))
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
        results["errors"]["ratios"] = short_error(e)
    save()
    try:
        print_gpu_table(results)
    except Exception as e:
        print(f"cannot print the table ({short_error(e)}); the results are in {args.out}")
    failed = len(results["errors"])
    print(f"\nwrote {args.out} in {results['seconds']:.0f} s" + (f"; {failed} row(s) failed" if failed else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
