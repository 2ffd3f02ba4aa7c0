"""What the CPU and the GPU benchmark rows share: the model and volumes they measure, peak-memory and device helpers,
the end-to-end and peer bookkeeping. A sibling of ``run.py`` (imported with ``benchmarks/`` on ``sys.path``)."""

from __future__ import annotations

import glob
import hashlib
import json
import os
import resource
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

SPACING = (1.5625, 1.5625, 10.0)  # ACDC-like: in-plane 1.56 mm, 10 mm slices
CT_SPACING = (0.78125, 0.78125, 1.25)  # the scale volumes: CT-like, resampled to the model's 1.5625 mm
NET_SHAPES = [(8, 1, 224, 224), (1, 1, 256, 256)]
GPU_NET_SHAPES: list[tuple[int, ...]] = [*NET_SHAPES, (32, 1, 224, 224)]
VOLUME_SUFFIXES = (".nii", ".nii.gz")


def shape_key(shape: Any) -> str:
    """``(8, 1, 224, 224)`` -> ``"8x1x224x224"``: the key of a shape in the JSON and the tables."""
    return "x".join(map(str, shape))


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


def phantom(shape: tuple[int, ...], seed: int) -> Any:
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
        img = nib.Nifti1Image(phantom(shape, k), affine)
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


# ---------------------------------------------------------------------------------------------- memory, devices


def maxrss_mb() -> float:
    """Peak resident memory of this process in MiB: VmHWM, which (unlike ru_maxrss) an exec resets on Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux, bytes on macOS


def reset_peak() -> bool:
    """Reset this process's peak-RSS counter (Linux: ``5 > /proc/self/clear_refs``), so that what was allocated
    to build the test input does not count; False where that is not possible."""
    import gc

    gc.collect()
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def sync(device: Any) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def gpu_peak_reset(device: Any) -> None:
    import gc

    import torch

    if torch.device(device).type == "cuda":
        gc.collect()
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def gpu_peak_mb(device: Any) -> float | None:
    """Peak GPU memory allocated by torch since :func:`gpu_peak_reset`, MiB (None on the CPU)."""
    import torch

    if torch.device(device).type != "cuda":
        return None
    return float(torch.cuda.max_memory_allocated(device)) / 2**20


def short_error(e: BaseException) -> str:
    """``Type: first line of the message``, at most 500 characters: what a row records instead of a traceback."""
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:500]


# ---------------------------------------------------------------------------------------------- end to end, peer


def stage_means(folder: Path, n: int) -> dict[str, float]:
    """Mean seconds per stage over the ``n`` scans of a batch, from the QA reports (``*.json``) in ``folder``."""
    stages: dict[str, float] = {}
    for report in folder.glob("*.json"):
        for k, v in json.loads(report.read_text())["timings_s"].items():
            stages[k] = stages.get(k, 0.0) + v / n
    return stages


def labels_digest(out: Path, pattern: str) -> str:
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
            sync(runner.device)  # CUDA runners return before the GPU is done
            total += time.perf_counter() - start
    return total


def peer_config(manifest: Any) -> dict[str, Any]:
    """What ``peer.py`` needs of the model's manifest: target_spacing, clip, divisor, max_tile."""
    return {
        "target_spacing": manifest.preprocessing["target_spacing"],
        "clip": manifest.preprocessing["clip_percentiles"],
        "divisor": manifest.divisor,
        "max_tile": manifest.bounds.max_spatial[0],
    }


def peer_flavour(wanted: str) -> tuple[str, Callable[..., None]]:
    """The peer to run for ``--peer`` (auto: MONAI when installed) and its entry point in ``peer.py``."""
    import peer

    flavour = "monai" if wanted == "monai" or (wanted == "auto" and peer.monai_available()) else "naive"
    return flavour, peer.run_monai if flavour == "monai" else peer.run_naive
