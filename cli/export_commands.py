"""``confkd export``: a checkpoint's student as a verified ONNX model directory, optionally a TensorRT engine and a
Triton Inference Server model repository (``OUT/triton/``).

Exit codes: 0 exported (and verified), 2 any library error (unreadable checkpoint, OUT in the way, checker or
verification failure, TensorRT missing); the message is one line and OUT is not left behind (a failure of the
--trt or --triton step, which runs after the export, leaves the verified OUT without the engine / OUT/triton).
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from confkd.cli._common import console, fail, show_table
from confkd.errors import ConfKDError


class Precision(str, Enum):
    """TensorRT engine precision."""

    fp32 = "fp32"
    fp16 = "fp16"


def export(
    checkpoint: Annotated[Path, typer.Argument(help="A training checkpoint (.pt).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The model directory to create (must not exist).")],
    trt: Annotated[bool, typer.Option("--trt", help="Also build a TensorRT engine into the cache.")] = False,
    precision: Annotated[Precision, typer.Option(help="TensorRT engine precision.")] = Precision.fp16,
    opset: Annotated[int, typer.Option(help="ONNX opset.")] = 17,
    engine_dir: Annotated[
        Path | None, typer.Option(help="Engine cache (default: $CONFKD_ENGINE_DIR, else trt_engines/).")
    ] = None,
    triton: Annotated[
        bool,
        typer.Option(
            "--triton", help="Also write a Triton model repository into OUT/triton/ (the TensorRT plan with --trt)."
        ),
    ] = False,
    triton_name: Annotated[
        str | None, typer.Option(help="The model's name in the Triton repository (default: OUT's folder name).")
    ] = None,
) -> None:
    """Export the student (encoder + student decoder) to ONNX with its manifest, verified against PyTorch."""
    if opset < 13:
        fail(f"--opset {opset}: needs 13 or newer (opset 13 is the oldest with the needed Softmax semantics)")
    from confkd.export.onnx_export import export_model

    if triton_name is not None:
        from confkd.inference.runners_triton import check_model_name

        if not triton:
            fail("--triton-name needs --triton")
        try:
            check_model_name(triton_name)  # before the export, which takes a while
        except ConfKDError as e:
            fail(f"--triton-name: {e}")
    try:
        result = export_model(checkpoint, out, opset=opset)
        rows = [
            ["model", str(result.onnx_path)],
            ["max |dp| vs torch", f"{result.verification.summary()['max_abs_diff_probabilities']:.2e}"],
            ["max |dH| vs torch", f"{result.verification.summary()['max_abs_diff_entropy']:.2e}"],
            ["argmax agreement", f"{result.verification.summary()['min_argmax_agreement']:.4%}"],
        ]
        if trt:
            import torch

            from confkd.export.engine_cache import get_or_build_engine
            from confkd.inference.runners_trt import gpu_identity, tensorrt_version

            version = tensorrt_version()
            device = torch.device("cuda")
            cached = get_or_build_engine(
                out, precision=precision.value, engine_dir=engine_dir, gpu=gpu_identity(device), trt_version=version
            )
            rows.append(["engine", str(cached.path)])
        if triton:
            from confkd.export.triton import write_triton_repository

            plan = cached if trt else None  # the engine just built: Triton serves the TensorRT plan
            repo = write_triton_repository(
                out,
                model_name=triton_name,
                plan=plan.engine if plan else None,
                compute_capability=plan.sidecar["compute_capability"] if plan else None,
            )
            rows.append(["triton repository", f"{repo.root} (model {repo.model_name}, {repo.platform})"])
    except ConfKDError as e:
        fail(str(e))
    show_table(["export", "value"], rows)
    console.print(f"exported {checkpoint} -> {out}", highlight=False)
