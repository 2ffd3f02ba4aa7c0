"""confkd benchmarks: network throughput per backend, end-to-end ``segment``, the MONAI-style peer, memory, scale.

    python benchmarks/run.py [--quick] [--smoke] [--out benchmarks/results.json]

Builds its own model (default-size student: width 16, depth 4, 4 classes, random weights; a real checkpoint and
its ONNX export) and synthetic ACDC-sized volumes in a temporary folder. Every configuration runs in its own
subprocess, so its peak memory is that process's ``ru_maxrss``. Prints a table and writes JSON. See
docs/performance.md for the figures and what limits them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SIZES = {
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
        h.update(np.ascontiguousarray(np.asanyarray(nib.load(path).dataobj)).tobytes())
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

    model = load_model(job["model_dir"], backend="onnxruntime", device="cpu")
    shape = tuple(job["shape"])
    vol = Volume(_phantom(shape, 0), np.diag([*CT_SPACING, 1.0]), "nifti1")
    reset = _reset_peak()  # building the phantom's float64 temporaries is not the engine's memory
    base = _maxrss_mb()
    start = time.perf_counter()
    result = segment_volume(vol, model)
    wall = time.perf_counter() - start
    return {
        "shape": list(shape),
        "seconds": wall,
        "timings": result.timings,
        "maxrss_mb": _maxrss_mb(),
        "rss_before_mb": base,
        "peak_reset": reset,
        "input_mb": vol.array.nbytes / 2**20,
    }


CHILDREN = {"net": child_net, "e2e": child_e2e, "peer": child_peer, "scale": child_scale}


def spawn(job: dict[str, Any], *, in_process: bool = False) -> dict[str, Any]:
    if in_process:  # --smoke: no interpreter start-ups; peak memory is then the whole run's
        sys.path.insert(0, str(HERE))
        result = CHILDREN[job["kind"]](job)
        result.setdefault("maxrss_mb", _maxrss_mb())
        return result
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
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        run_child(args.child)
        return 0
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    size = SIZES[mode]
    t0 = time.perf_counter()
    results: dict[str, Any] = {"mode": mode, "machine": machine(), "net": {}, "e2e": {}, "peer": {}, "scale": []}
    with tempfile.TemporaryDirectory(prefix="confkd-bench-") as tmp:
        work = Path(tmp)
        ckpt, model_dir = build_model(work, size["width"], size["depth"])
        inputs = [str(p) for p in write_volumes(work / "scans", size["volumes"], size["shape"])]
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
