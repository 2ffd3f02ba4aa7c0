"""The MONAI-style peer: the pipeline a user would write without confkd, one volume at a time.

LoadImage -> EnsureChannelFirst -> Spacing (in-plane to the model's spacing) -> percentile clip + z-score ->
slices through ``sliding_window_inference`` with the same network (torch eager, or the same ONNX Runtime session
as a callable) -> softmax -> argmax -> back to the input grid -> SaveImage, as MONAI's tutorials do it: no overlap of
reading, compute and writing. Without MONAI installed (``pip install monai``) the same steps are written with
nibabel + torch (``naive``), in the same style.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

Predictor = Callable[[torch.Tensor], torch.Tensor]


def monai_available() -> bool:
    try:
        import monai  # noqa: F401
    except ImportError:
        return False
    return True


def _roi(h: int, w: int, divisor: int, max_tile: int) -> tuple[int, int]:
    # the same network work as confkd: the whole (padded) slice when it fits the model's max tile
    return tuple(min(-(-n // divisor) * divisor, max_tile) for n in (h, w))  # type: ignore[return-value]


def run_monai(paths: list[Path], out: Path, predictor: Predictor, cfg: dict[str, Any]) -> None:
    """Segment ``paths`` into ``out`` the MONAI way. ``cfg``: target_spacing, clip, divisor, max_tile."""
    from monai.inferers import sliding_window_inference
    from monai.transforms import (
        ClipIntensityPercentiles,
        Compose,
        EnsureChannelFirst,
        LoadImage,
        NormalizeIntensity,
        Resize,
        SaveImage,
        Spacing,
    )

    lo, hi = cfg["clip"]
    sy, sx = cfg["target_spacing"]
    pre = Compose(
        [
            LoadImage(image_only=True),
            EnsureChannelFirst(),
            Spacing(pixdim=(sy, sx, -1), mode="bilinear"),  # -1: keep the slice spacing
            ClipIntensityPercentiles(lower=lo, upper=hi),
            NormalizeIntensity(),
        ]
    )
    out.mkdir(parents=True, exist_ok=True)
    saver = SaveImage(
        output_dir=str(out), output_postfix="seg", output_ext=".nii.gz", separate_folder=False, print_log=False
    )
    with torch.inference_mode():
        for path in paths:
            img = pre(str(path))  # [1, H, W, D] MetaTensor
            original = LoadImage(image_only=True)(str(path))
            x = img.as_tensor().permute(3, 0, 1, 2).contiguous()  # slices as a batch [D, 1, H, W]
            roi = _roi(x.shape[2], x.shape[3], cfg["divisor"], cfg["max_tile"])
            logits = sliding_window_inference(x, roi, sw_batch_size=4, predictor=predictor, overlap=0.5)
            probs = torch.softmax(torch.as_tensor(logits), dim=1)
            labels = probs.argmax(dim=1, keepdim=True).permute(1, 2, 3, 0)  # [1, H, W, D]
            labels = Resize(spatial_size=(*original.shape[:2], -1), mode="nearest")(labels.float())
            seg = original.clone()
            seg.set_array(torch.as_tensor(labels)[0].to(torch.uint8))
            saver(seg[None], meta_data=original.meta)


def run_naive(paths: list[Path], out: Path, predictor: Predictor, cfg: dict[str, Any]) -> None:
    """The same steps with nibabel + torch (when MONAI is absent)."""
    import nibabel as nib

    lo, hi = cfg["clip"]
    out.mkdir(parents=True, exist_ok=True)
    with torch.inference_mode():
        for path in paths:
            img = nib.load(path)
            data = np.asanyarray(img.dataobj).astype(np.float32)
            zooms = img.header.get_zooms()[:2]
            spacing = cfg["target_spacing"]
            size = [max(1, round(n * z / s)) for n, z, s in zip(data.shape[:2], zooms, spacing, strict=True)]
            x = torch.from_numpy(data).permute(2, 0, 1)[:, None]  # [D, 1, H, W]
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            a, b = np.percentile(x.numpy(), [lo, hi])
            x = x.clamp(float(a), float(b))
            x = (x - x.mean()) / x.std().clamp_min(1e-8)
            div = cfg["divisor"]
            ph, pw = (-size[0]) % div, (-size[1]) % div
            x = F.pad(x, (0, pw, 0, ph))
            parts = [predictor(x[i : i + 4]) for i in range(0, x.shape[0], 4)]
            probs = torch.softmax(torch.cat(parts), dim=1)[:, :, : size[0], : size[1]]
            labels = probs.argmax(dim=1, keepdim=True).float()
            labels = F.interpolate(labels, size=data.shape[:2], mode="nearest")[:, 0].permute(1, 2, 0)
            seg = nib.Nifti1Image(labels.to(torch.uint8).numpy(), img.affine, img.header)
            seg.set_data_dtype(np.uint8)
            name = path.name.removesuffix(".nii.gz")
            nib.save(seg, out / f"{name}_seg.nii.gz")


def ort_predictor(onnx_path: Path, threads: int) -> Predictor:
    """The exported graph as a MONAI predictor: the logits' stand-in is the graph's probabilities (softmax twice is
    monotone, so the argmax is unchanged)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(onnx_path), sess_options=options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def predict(x: torch.Tensor) -> torch.Tensor:
        (probs, _) = session.run(None, {name: np.ascontiguousarray(x.numpy(), dtype=np.float32)})
        return torch.from_numpy(np.log(np.maximum(probs, 1e-30)))

    return predict
