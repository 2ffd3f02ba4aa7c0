"""The CPU rows, one child job each (``run.py`` runs every job in its own subprocess, so its peak memory is that
process's): the network per backend, ``confkd segment`` end to end, the peer, one large volume (scale)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from bench_common import (
    CT_SPACING,
    NET_SHAPES,
    gpu_peak_mb,
    gpu_peak_reset,
    labels_digest,
    maxrss_mb,
    peer_config,
    peer_flavour,
    phantom,
    pure_network_seconds,
    reset_peak,
    shape_key,
    stage_means,
)


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
        out[shape_key(shape)] = shape[0] / per_call
    return {"slices_per_s": out, "threads": torch.get_num_threads()}


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
    stages = stage_means(out, len(paths))
    rss = maxrss_mb()  # before the pure-network pass below
    network = pure_network_seconds(paths, model)
    return {
        "ok": len(result.ok),
        "wall_s": wall,
        "scans_per_s": len(result.ok) / wall,
        "stage_mean_s": stages,
        "network_s": network,
        "labels": labels_digest(out, "*_seg.nii.gz"),
        "maxrss_mb": rss,
    }


def child_peer(job: dict[str, Any]) -> dict[str, Any]:
    import peer

    from confkd.inference.manifest import load_manifest
    from confkd.training.checkpoint import load_student

    paths = [Path(p) for p in job["inputs"]]
    manifest = load_manifest(Path(job["model_dir"]))
    if job["backend"] == "torch":
        network, _ = load_student(job["checkpoint"])
        predictor: Any = network.eval()
    else:
        predictor = peer.ort_predictor(Path(job["model_dir"]) / manifest.model_file, os.cpu_count() or 1)
    flavour, run = peer_flavour(job.get("peer", "auto"))
    start = time.perf_counter()
    run(paths, Path(job["out"]), predictor, peer_config(manifest))
    wall = time.perf_counter() - start
    return {"flavour": flavour, "wall_s": wall, "scans_per_s": len(paths) / wall}


def child_scale(job: dict[str, Any]) -> dict[str, Any]:
    """One CT-sized volume through ``segment_volume``; also a GPU row (``device``: cuda, backend torch)."""
    import numpy as np

    from confkd.data.volume import Volume
    from confkd.inference.engine import segment_volume
    from confkd.inference.model import load_model

    backend, device = job.get("backend", "onnxruntime"), job.get("device", "cpu")
    model = load_model(job["checkpoint"] if backend == "torch" else job["model_dir"], backend=backend, device=device)
    shape = tuple(job["shape"])
    vol = Volume(phantom(shape, 0), np.diag([*CT_SPACING, 1.0]), "nifti1")
    reset = reset_peak()  # building the phantom's float64 temporaries is not the engine's memory
    base = maxrss_mb()
    gpu_peak_reset(model.runner.device)
    start = time.perf_counter()
    result = segment_volume(vol, model)
    wall = time.perf_counter() - start
    out = {
        "shape": list(shape),
        "seconds": wall,
        "timings": result.timings,
        "maxrss_mb": maxrss_mb(),
        "rss_before_mb": base,
        "peak_reset": reset,
        "input_mb": vol.array.nbytes / 2**20,
    }
    if device != "cpu":
        out.update(backend=backend, device=device, gpu_peak_mb=gpu_peak_mb(model.runner.device))
    return out
